//! The human-readable compression report: an HTML page with SVG charts of per-layer ranks,
//! kept FFN widths, weighted singular-value spectra and reconstruction errors, plus the
//! perplexity before and after when it was measured.

pub mod search;
pub mod svg;

use std::fmt::Write;

use crate::pipeline::CompressionReport;
use svg::{bar_chart, esc, line_chart, Chart, Series};

/// Held-out perplexity of the dense and the compressed model on the same tokens.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Perplexities {
    pub text: String,
    pub tokens: usize,
    pub seq_len: usize,
    pub dense: f64,
    pub compressed: f64,
}

const MATS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// The report's files: (file name, contents). `report.html` embeds the charts inline, and
/// each chart is also written as its own `.svg`.
/// The report files `compress` writes into its output (no perplexities yet).
pub fn compress_files(rep: &CompressionReport, model_name: &str) -> Vec<(String, String)> {
    render(rep, model_name, None)
}

/// "Where the time went": seconds and share of each phase, and the host's time blocked on
/// the GPU.
fn phase_table(p: &crate::methods::phase::PhaseSeconds) -> String {
    let total = p.total().max(f64::MIN_POSITIVE);
    let mut html = String::from("<h2>Where the time went</h2><table><tr><th>phase</th><th>seconds</th><th>share</th></tr>");
    for (name, secs) in p.rows() {
        let _ = write!(html, "<tr><td style=\"text-align:left\">{name}</td><td>{secs:.2}</td><td>{:.1}%</td></tr>", 100.0 * secs / total);
    }
    let _ = write!(html, "<tr><td style=\"text-align:left\">of which the host waited on the GPU</td><td>{:.2}</td><td>{:.1}%</td></tr>", p.blocked_on_gpu, 100.0 * p.blocked_on_gpu / total);
    if let Some(busy) = p.gpu_busy {
        let _ = write!(html, "<tr><td style=\"text-align:left\">the GPU computing (timestamp queries)</td><td>{busy:.2}</td><td>{:.1}%</td></tr>", 100.0 * busy / total);
    }
    html.push_str("</table>");
    html
}

/// report.html and each chart as an SVG file, from a compression report.
pub fn render(rep: &CompressionReport, model_name: &str, ppl: Option<&Perplexities>) -> Vec<(String, String)> {
    let layers = &rep.layers;
    let mut charts: Vec<(String, String, String)> = Vec::new(); // (file, caption, svg)

    let ranks: Vec<Series> = (0..4)
        .map(|j| Series {
            name: format!("{} rank", MATS[j]),
            // a dense matrix is drawn at its break-even rank, where a pair would cost the same
            points: layers.iter().map(|l| (l.layer as f64, l.ranks[j].map_or(f64::NAN, |r| r as f64))).collect(),
        })
        .collect();
    charts.push((
        "report-ranks.svg".into(),
        "Attention ranks per layer (a gap means the matrix stayed dense).".into(),
        line_chart(&Chart { title: "Attention ranks", x_label: "layer", y_label: "rank", log_y: false }, &ranks),
    ));
    let ffn: Vec<Vec<f64>> = layers.iter().map(|l| vec![l.ffn_kept as f64, (l.ffn_total - l.ffn_kept) as f64]).collect();
    charts.push((
        "report-ffn.svg".into(),
        "FFN channels kept and removed per layer.".into(),
        bar_chart(&Chart { title: "FFN width", x_label: "layer", y_label: "channels", log_y: false }, &["kept", "removed"], &ffn),
    ));
    let errors: Vec<Series> = (0..4)
        .map(|j| Series { name: MATS[j].into(), points: layers.iter().filter(|l| l.ranks[j].is_some()).map(|l| (l.layer as f64, l.weighted_rel_error[j])).collect() })
        .collect();
    charts.push((
        "report-errors.svg".into(),
        "Relative activation-weighted reconstruction error ||(W - AB) S|| / ||W S|| of each factored matrix.".into(),
        line_chart(&Chart { title: "Weighted reconstruction error", x_label: "layer", y_label: "relative error", log_y: false }, &errors),
    ));
    // spectra of a few layers, normalised by the top singular value so layers compare
    let n = layers.len();
    let picks: Vec<usize> = if n <= 4 { (0..n).collect() } else { vec![0, n / 3, 2 * n / 3, n - 1] };
    for (j, m) in MATS.iter().enumerate() {
        let series: Vec<Series> = picks
            .iter()
            .map(|&i| {
                let s = &layers[i].spectra[j];
                let top = s.first().copied().unwrap_or(1.0).max(f64::MIN_POSITIVE);
                Series { name: format!("layer {}", layers[i].layer), points: s.iter().enumerate().map(|(k, v)| (k as f64 + 1.0, v / top)).collect() }
            })
            .collect();
        charts.push((
            format!("report-spectrum-{m}.svg"),
            format!("Weighted singular values of {m} (sigma_i / sigma_1, as far as computed: the kept rank, or the break-even rank under the spectrum-driven allocations; none where the matrix stayed dense)."),
            line_chart(&Chart { title: &format!("{m}: weighted spectrum"), x_label: "index i", y_label: "sigma_i / sigma_1", log_y: true }, &series),
        ));
    }
    if let Some(p) = ppl {
        charts.push((
            "report-perplexity.svg".into(),
            format!("Perplexity on {} ({} tokens, windows of {}), dense vs compressed.", p.text, p.tokens, p.seq_len),
            bar_chart(&Chart { title: "Held-out perplexity", x_label: "", y_label: "perplexity", log_y: false }, &["dense", "compressed"], &[vec![p.dense, p.compressed]]),
        ));
    }

    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>lorap-gpu report: {name}</title><style>\
         body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}figure{{margin:1.5em 0}}\
         </style></head><body><h1>LoRAP compression of {name}</h1>",
        name = esc(model_name)
    );
    let mib = rep.peak_gpu_bytes as f64 / (1u64 << 20) as f64;
    let _ = write!(
        html,
        "<table><tr><th>requested ratio</th><td>{:.2}</td></tr><tr><th>decoder parameters</th><td>{} &rarr; {} (removed {:.2}%)</td></tr>\
         <tr><th>whole model</th><td>{} &rarr; {} (removed {:.2}%)</td></tr><tr><th>method</th><td>{}</td></tr>\
         <tr><th>calibration</th><td>{} windows &times; {} tokens</td></tr><tr><th>time</th><td>{:.1} s on {}</td></tr>\
         <tr><th>peak GPU memory</th><td>{mib:.1} MiB</td></tr>",
        rep.options.ratio,
        rep.decoder_params_before,
        rep.decoder_params_after,
        100.0 * rep.achieved_decoder_ratio,
        rep.total_params_before,
        rep.total_params_after,
        100.0 * rep.achieved_total_ratio,
        esc(&method_summary(&rep.options.method)),
        rep.calibration_windows,
        rep.calibration_seq_len,
        rep.seconds,
        esc(&rep.adapter),
    );
    if let Some(p) = ppl {
        let _ = write!(html, "<tr><th>perplexity ({})</th><td>{:.3} &rarr; {:.3}</td></tr>", esc(&p.text), p.dense, p.compressed);
    }
    html.push_str("</table>");
    html.push_str(&phase_table(&rep.phases));
    for (file, caption, svg) in &charts {
        let _ = write!(html, "<figure>{svg}<figcaption>{} (<a href=\"{file}\">{file}</a>)</figcaption></figure>", esc(caption));
    }
    html.push_str("<h2>Per layer</h2><table><tr><th>layer</th><th>q</th><th>k</th><th>v</th><th>o</th><th>FFN kept</th><th>params after / before</th><th>seconds</th></tr>");
    for l in layers {
        let r = |x: Option<usize>| x.map_or("dense".to_string(), |r| r.to_string());
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{:.3}</td><td>{:.1}</td></tr>",
            l.layer,
            r(l.ranks[0]),
            r(l.ranks[1]),
            r(l.ranks[2]),
            r(l.ranks[3]),
            l.ffn_kept,
            l.ffn_total,
            l.params_after as f64 / l.params_before.max(1) as f64,
            l.seconds
        );
    }
    html.push_str("</table></body></html>\n");
    let mut files: Vec<(String, String)> = charts.into_iter().map(|(f, _, s)| (f, s)).collect();
    files.push(("report.html".into(), html));
    files
}

/// One line of the method and the options it ran with.
fn method_summary(m: &crate::methods::MethodOptions) -> String {
    use crate::methods::MethodOptions;
    match m {
        MethodOptions::Lorap(o) => format!(
            "lorap: {:?} allocation, {} SVD, {} FFN scores, {:.0}% reserve",
            o.allocation,
            if o.weighted_svd { "activation-weighted" } else { "plain" },
            if o.ffn_activation_scores { "activation-weighted" } else { "magnitude" },
            100.0 * o.reserve
        ),
        MethodOptions::Sfsd(o) => format!("sfsd: {} output covariance", if o.centred { "centred" } else { "uncentred" }),
        MethodOptions::Mpo(o) => {
            let matrices: Vec<&str> = o.matrices.iter().map(|l| l.short()).collect();
            let bond = o.max_bond.map_or("from the ratio".to_string(), |b| b.to_string());
            let which = if matrices.is_empty() { "all".to_string() } else { matrices.join(",") };
            format!("mpo: {} cores, bond {bond}, matrices {which}{}", o.cores, if o.share_centre { ", shared centre" } else { "" })
        }
    }
}
