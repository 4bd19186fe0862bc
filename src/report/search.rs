//! The search's files: the Pareto front as a Markdown table and SVG chart, every candidate
//! as JSON, and one plan per front point.

use crate::search::{Candidate, SearchResult};

/// The front as a Markdown table.
pub fn front_table(res: &SearchResult) -> String {
    let mut s = String::from("| point | origin | decoder removed | parameters | calib ppl | ms / token | dropped layers |\n| --- | --- | ---: | ---: | ---: | ---: | --- |\n");
    for (k, &i) in res.front.iter().enumerate() {
        let c = &res.candidates[i];
        let dropped: Vec<String> = c.plan.layers.iter().enumerate().filter(|(_, l)| l.dropped).map(|(i, _)| i.to_string()).collect();
        s += &format!("| {k:02} | {} | {:.2}% | {} | {:.3} | {:.3} | {} |\n", c.origin, 100.0 * c.decoder_ratio, c.decoder_params, c.calib_ppl, 1e3 * c.seconds_per_token, dropped.join(" "));
    }
    if let (Some(b), Some(u)) = (res.best_at_target, res.uniform_at_target) {
        let (b, u) = (&res.candidates[b], &res.candidates[u]);
        s += &format!(
            "\nAt the target ({:.2}% removed): best searched plan ({}) {:.3} vs uniform {:.3} calibration perplexity; dense {:.3}.\n",
            100.0 * res.options.target_ratio.unwrap_or(0.0), b.origin, b.calib_ppl, u.calib_ppl, res.dense_ppl
        );
    }
    s
}

/// The files `search` writes: search.json (every candidate), front.md, front.svg,
/// plan-best.json (the best plan at the target) and plan-front-NN.json per front point.
pub fn render(res: &SearchResult) -> Vec<(String, String)> {
    use crate::report::svg::{scatter_chart, Chart, Series};
    let mut files = vec![("search.json".to_string(), serde_json::to_string_pretty(res).unwrap_or_default()), ("front.md".to_string(), front_table(res))];
    let pt = |c: &Candidate| (100.0 * c.decoder_ratio, c.calib_ppl);
    let series = vec![
        Series { name: "evaluated".into(), points: res.candidates.iter().map(pt).collect() },
        Series { name: "Pareto front".into(), points: res.front.iter().map(|&i| pt(&res.candidates[i])).collect() },
        Series { name: "uniform plans".into(), points: res.candidates.iter().filter(|c| c.origin.starts_with("uniform") || c.origin == "dense").map(pt).collect() },
    ];
    let chart = Chart { title: "Search: calibration perplexity vs parameters removed", x_label: "decoder parameters removed (%)", y_label: "calibration perplexity", log_y: true };
    files.push(("front.svg".into(), scatter_chart(&chart, &series, &[false, true, false])));
    if let Some(b) = res.best_at_target {
        let mut plan = res.candidates[b].plan.clone();
        plan.note = format!("search: best at {:.2}% removed, calibration ppl {:.3}", 100.0 * res.candidates[b].decoder_ratio, res.candidates[b].calib_ppl);
        files.push(("plan-best.json".into(), serde_json::to_string_pretty(&plan).unwrap_or_default()));
    }
    for (k, &i) in res.front.iter().enumerate() {
        let mut plan = res.candidates[i].plan.clone();
        plan.note = format!("search front point {k:02}: {}, {:.2}% removed, calibration ppl {:.3}", res.candidates[i].origin, 100.0 * res.candidates[i].decoder_ratio, res.candidates[i].calib_ppl);
        files.push((format!("plan-front-{k:02}.json"), serde_json::to_string_pretty(&plan).unwrap_or_default()));
    }
    files
}

