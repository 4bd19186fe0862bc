//! Minimal SVG charts (line and bar) for the compression report. Text is emitted as SVG
//! `<text>` for the viewer to render: plotting crates need a font backend (system
//! fontconfig or a bundled TTF) just to lay text out, which a headless box may lack.

use std::fmt::Write;

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart's labels and axis options.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_y: bool,
}

const W: f64 = 640.0;
const H: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;
const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Escapes text for SVG/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..=n * 2).map(|i| first + i as f64 * step).take_while(|v| *v <= hi + step * 1e-9).collect()
}

fn fmt_tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.0e}")
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    log_y: bool,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0).max(f64::MIN_POSITIVE) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        let (y, a, b) = if self.log_y { (y.max(f64::MIN_POSITIVE).log10(), self.y0.log10(), self.y1.log10()) } else { (y, self.y0, self.y1) };
        H - BOTTOM - (y - a) / (b - a).max(f64::MIN_POSITIVE) * (H - TOP - BOTTOM)
    }
}

fn frame(chart: &Chart, xs: impl Iterator<Item = f64> + Clone, ys: impl Iterator<Item = f64> + Clone, y_from_zero: bool) -> (String, Frame) {
    let (mut x0, mut x1) = xs.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let ys: Vec<f64> = ys.filter(|y| y.is_finite() && (!chart.log_y || *y > 0.0)).collect();
    let (mut y0, mut y1) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if !y0.is_finite() {
        (y0, y1) = (if chart.log_y { 1.0 } else { 0.0 }, 1.0);
    }
    if chart.log_y {
        y0 = 10f64.powf(y0.log10().floor());
        y1 = 10f64.powf(y1.log10().ceil().max(y0.log10() + 1.0));
    } else {
        if y_from_zero {
            y0 = y0.min(0.0);
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        y1 += (y1 - y0) * 0.05;
    }
    let f = Frame { x0, x1, y0, y1, log_y: chart.log_y };
    let mut s = String::new();
    let _ = write!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#);
    let _ = write!(s, r##"<rect width="{W}" height="{H}" fill="#fff"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"##, (LEFT + W - RIGHT) / 2.0, esc(chart.title));
    // axes, grid and ticks
    let (l, r, t, b) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    let y_ticks: Vec<f64> = if chart.log_y {
        let (a, c) = (y0.log10().round() as i32, y1.log10().round() as i32);
        (a..=c).map(|e| 10f64.powi(e)).collect()
    } else {
        ticks(y0, y1, 5)
    };
    for v in y_ticks {
        let y = f.py(v);
        let _ = write!(s, r##"<line x1="{l}" x2="{r}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##, l - 6.0, y + 4.0, fmt_tick(v));
    }
    for v in ticks(x0, x1, 8) {
        let x = f.px(v);
        let _ = write!(s, r##"<line x1="{x:.1}" x2="{x:.1}" y1="{b}" y2="{}" stroke="#333"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##, b + 5.0, b + 18.0, fmt_tick(v));
    }
    let _ = write!(s, r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#333"/>"##, r - l, b - t);
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (l + r) / 2.0, H - 10.0, esc(chart.x_label));
    let _ = write!(s, r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#, (t + b) / 2.0, (t + b) / 2.0, esc(chart.y_label));
    (s, f)
}

fn legend(s: &mut String, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 18.0;
        let x = W - RIGHT + 12.0;
        let _ = write!(s, r#"<rect x="{x}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{}">{}</text>"#, y - 2.0, COLORS[i % COLORS.len()], x + 20.0, y + 4.0, esc(n));
    }
}

/// A line chart of several series.
pub fn line_chart(chart: &Chart, series: &[Series]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut s, f) = frame(chart, all.clone().map(|p| p.0), all.map(|p| p.1), true);
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> =
            ser.points.iter().filter(|p| p.1.is_finite() && (!chart.log_y || p.1 > 0.0)).map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y))).collect();
        // odd series dashed, so series that coincide (q and k share a rank) stay visible
        let dash = if i % 2 == 1 { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = write!(s, r#"<polyline fill="none" stroke="{}" stroke-width="1.8"{dash} points="{}"/>"#, COLORS[i % COLORS.len()], pts.join(" "));
    }
    legend(&mut s, &series.iter().map(|x| x.name.as_str()).collect::<Vec<_>>());
    s.push_str("</svg>");
    s
}

/// Points of several series as dots; series whose `connect` flag is set are also joined
/// by a line in x order (a Pareto front).
pub fn scatter_chart(chart: &Chart, series: &[Series], connect: &[bool]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut s, f) = frame(chart, all.clone().map(|p| p.0), all.map(|p| p.1), false);
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts: Vec<(f64, f64)> = ser.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite() && (!chart.log_y || p.1 > 0.0)).collect();
        if connect.get(i).copied().unwrap_or(false) {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let line: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y))).collect();
            let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, line.join(" "));
        }
        for &(x, y) in &pts {
            let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="{}" fill="{color}" fill-opacity="0.8"/>"#, f.px(x), f.py(y), 3.5 - 0.5 * (i.min(2) as f64));
        }
    }
    legend(&mut s, &series.iter().map(|x| x.name.as_str()).collect::<Vec<_>>());
    s.push_str("</svg>");
    s
}

/// Grouped bars: `groups[g]` holds one value per name in `names`, drawn at x = g.
pub fn bar_chart(chart: &Chart, names: &[&str], groups: &[Vec<f64>]) -> String {
    let n = names.len().max(1);
    let xs = (0..groups.len()).map(|g| g as f64);
    let (mut s, f) = frame(chart, xs.clone().chain([-0.5, groups.len() as f64 - 0.5]), groups.iter().flatten().copied(), true);
    let slot = (f.px(1.0) - f.px(0.0)) * 0.8;
    for (g, vals) in groups.iter().enumerate() {
        for (k, &v) in vals.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = f.px(g as f64) - slot / 2.0 + slot * k as f64 / n as f64;
            let (ya, yb) = (f.py(v), f.py(f.y0.max(if chart.log_y { f.y0 } else { 0.0 })));
            let _ = write!(s, r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {v}</title></rect>"#, ya.min(yb), (slot / n as f64 - 1.0).max(0.5), (yb - ya).abs(), COLORS[k % COLORS.len()], esc(names[k]));
        }
    }
    legend(&mut s, names);
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let c = Chart { title: "t <x>", x_label: "layer", y_label: "rank", log_y: false };
        let svg = line_chart(&c, &[Series { name: "q".into(), points: vec![(0.0, 1.0), (1.0, 3.0)] }, Series { name: "v".into(), points: vec![(0.0, 2.0)] }]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;x&gt;"));
        let log = Chart { log_y: true, ..c };
        let svg = line_chart(&log, &[Series { name: "s".into(), points: vec![(0.0, 100.0), (1.0, 0.01), (2.0, 0.0)] }]);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let bars = bar_chart(&Chart { title: "b", x_label: "", y_label: "", log_y: false }, &["a", "b"], &[vec![1.0, 2.0], vec![3.0, f64::NAN]]);
        assert_eq!(bars.matches("<rect x=").count(), 3 + 2 + 1, "3 bars, 2 legend swatches, the plot frame");
    }

    #[test]
    fn ticks_cover_the_range_with_round_steps() {
        let t = ticks(0.0, 97.0, 5);
        assert_eq!(t.first(), Some(&0.0));
        assert!(t.last().unwrap() >= &80.0 && t.last().unwrap() <= &97.0, "{t:?}");
        assert!(t.windows(2).all(|w| ((w[1] - w[0]) - 20.0).abs() < 1e-9), "{t:?}");
    }
}
