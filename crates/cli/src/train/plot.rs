//! A self-contained SVG chart of the run: training loss against step on the left, test
//! accuracy against step on the right. Plain SVG text: no fonts to embed, no system
//! libraries, and every browser shows it.

use std::fmt::Write;

/// One panel's series: (label, colour, points).
pub struct Series<'a> {
    pub label: &'a str,
    pub colour: &'a str,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    /// A fixed y range (accuracy: 0..100); else the data's.
    pub y_range: Option<(f64, f64)>,
    /// The legend goes bottom right (for rising curves) instead of top right.
    pub legend_bottom: bool,
    pub series: Vec<Series<'a>>,
}

const W: f64 = 460.0;
const H: f64 = 320.0;
const MARGIN: (f64, f64, f64, f64) = (64.0, 16.0, 36.0, 44.0); // left, right, top, bottom

/// Panels side by side, with `title` above them.
pub fn svg(title: &str, panels: &[Panel]) -> String {
    let width = W * panels.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        H + 20.0,
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let _ = write!(out, "<g transform=\"translate({},20)\">\n{}</g>\n", W * i as f64, draw(panel));
    }
    out.push_str("</svg>\n");
    out
}

fn draw(panel: &Panel) -> String {
    let all = || panel.series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (x0, x1) = bounds(all().map(|p| p.0));
    let (y0, y1) = panel.y_range.unwrap_or_else(|| bounds(all().map(|p| p.1)));
    let (l, r, t, b) = MARGIN;
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (W - l - r);
    let sy = |y: f64| H - b - (y - y0) / (y1 - y0) * (H - t - b);
    let mut g = format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n\
         <rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n\
         <text transform=\"translate(12,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        W / 2.0,
        t - 10.0,
        escape(panel.title),
        W - l - r,
        H - t - b,
        (l + W - r) / 2.0,
        H - 8.0,
        (t + H - b) / 2.0,
        escape(panel.y_label)
    );
    for k in 0..=4 {
        let (xv, yv) = (x0 + (x1 - x0) * k as f64 / 4.0, y0 + (y1 - y0) * k as f64 / 4.0);
        let _ = writeln!(g, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", sx(xv), H - b + 14.0, tick(xv));
        let _ = writeln!(g, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", l - 4.0, sy(yv) + 4.0, tick(yv));
        let _ = writeln!(g, "<line x1=\"{l}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>", W - r, sy(yv), sy(yv));
    }
    for (i, s) in panel.series.iter().enumerate() {
        let path: Vec<String> =
            s.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(g, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>", s.colour, path.join(" "));
        let first = if panel.legend_bottom { H - b - 10.0 - 14.0 * (panel.series.len() - 1) as f64 } else { t + 14.0 };
        let ly = first + 14.0 * i as f64;
        let _ = writeln!(
            g,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"2\"/>",
            W - r - 110.0,
            W - r - 92.0,
            s.colour
        );
        let _ = writeln!(g, "<text x=\"{}\" y=\"{}\">{}</text>", W - r - 88.0, ly + 4.0, escape(s.label));
    }
    g
}

/// Min and max, widened when degenerate so the scale never divides by zero.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    match (lo.is_finite(), hi > lo) {
        (false, _) => (0.0, 1.0),
        (true, false) => (lo - 0.5, hi + 0.5),
        (true, true) => (lo, hi),
    }
}

/// About three significant digits.
fn tick(v: f64) -> String {
    let decimals = match v.abs() {
        a if a >= 100.0 || v == v.round() => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_and_survives_degenerate_input() {
        let panel = Panel {
            title: "loss",
            y_label: "cross-entropy",
            y_range: None,
            legend_bottom: false,
            series: vec![
                Series { label: "train", colour: "#1f77b4", points: vec![(1.0, 2.3), (2.0, 1.1), (3.0, f64::NAN)] },
                Series { label: "a<b", colour: "#d62728", points: vec![(2.0, 1.0)] },
            ],
        };
        let empty = Panel {
            title: "accuracy",
            y_label: "%",
            y_range: Some((0.0, 100.0)),
            legend_bottom: true,
            series: vec![Series { label: "test", colour: "#000", points: vec![] }],
        };
        let svg = svg("run", &[panel, empty]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("a&lt;b") && !svg.contains("NaN"));
    }
}
