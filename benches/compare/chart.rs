//! The results as an SVG chart, readable without the table: per figure,
//! one labelled bar per side giving its cost relative to the baseline
//! (the raw operation, or OpenSSH where nothing raw exists), on a log
//! scale centred on 1×.

use crate::figure::{Figure, Machine, Side};

const WIDTH: f64 = 980.0;
const LABEL_X: f64 = 16.0;
const PLOT_LEFT: f64 = 380.0;
const PLOT_RIGHT: f64 = 900.0;
const BAR: f64 = 14.0;
const GAP: f64 = 4.0;
const TOP: f64 = 110.0;

fn colour(side: Side) -> &'static str {
    match side {
        Side::Envd => "#1f6fb4",
        Side::EnvdProto => "#74a9cf",
        Side::OpenSsh => "#d6452f",
        Side::Raw => "#555555",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The bars of one figure: (side, ratio to the baseline).
fn bars(figure: &Figure) -> Vec<(Side, f64)> {
    let Some(baseline) = figure.baseline() else { return Vec::new() };
    [Side::Envd, Side::EnvdProto, Side::OpenSsh]
        .into_iter()
        .filter(|side| *side != baseline)
        .filter_map(|side| figure.ratio(side, baseline).filter(|r| r.is_finite() && *r > 0.0).map(|r| (side, r)))
        .collect()
}

/// Powers of ten spanning every ratio and 1×.
fn decades(figures: &[Figure]) -> (i32, i32) {
    let ratios: Vec<f64> = figures.iter().flat_map(bars).map(|(_, r)| r).collect();
    let low = ratios.iter().copied().fold(1.0f64, f64::min);
    let high = ratios.iter().copied().fold(1.0f64, f64::max);
    (low.log10().floor() as i32, (high.log10().ceil() as i32).max(1))
}

pub fn svg(figures: &[Figure], machine: &Machine) -> String {
    let (low, high) = decades(figures);
    let x = |ratio: f64| {
        let span = f64::from(high - low);
        PLOT_LEFT + (ratio.log10() - f64::from(low)) / span * (PLOT_RIGHT - PLOT_LEFT)
    };
    let mut body = String::new();
    let mut y = TOP;
    for figure in figures {
        let bars = bars(figure);
        if bars.is_empty() {
            continue;
        }
        let versus = if figure.baseline() == Some(Side::Raw) { "vs raw" } else { "vs OpenSSH" };
        body.push_str(&format!(
            "<text x=\"{LABEL_X}\" y=\"{:.1}\" class=\"figure\">{} ({versus})</text>\n",
            y + 11.0,
            escape(&figure.title)
        ));
        y += BAR + GAP;
        for (side, ratio) in bars {
            let (from, to) = (x(1.0), x(ratio));
            body.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"side\">{}</text>\n\
                 <rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{BAR}\" fill=\"{}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" class=\"value\">{ratio:.2}×</text>\n",
                LABEL_X + 16.0,
                y + 11.0,
                side.label(),
                from.min(to),
                (to - from).abs().max(1.0),
                colour(side),
                from.max(to) + 4.0,
                y + 11.0,
            ));
            y += BAR + GAP;
        }
        y += GAP * 2.0;
    }
    let height = y + 24.0;
    let mut grid = String::new();
    for decade in low..=high {
        let ratio = 10f64.powi(decade);
        let gx = x(ratio);
        let class = if decade == 0 { "one" } else { "grid" };
        let label = if decade < 0 { format!("{ratio}×") } else { format!("{ratio:.0}×") };
        grid.push_str(&format!(
            "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{:.1}\" class=\"{class}\"/>\n\
             <text x=\"{gx:.1}\" y=\"{:.1}\" class=\"tick\">{label}</text>\n",
            TOP - 6.0,
            y,
            TOP - 10.0
        ));
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" viewBox=\"0 0 {WIDTH} {height:.0}\" font-family=\"sans-serif\">\n\
         <style>.title{{font-size:16px;font-weight:bold}} .sub{{font-size:11px;fill:#444}} .figure{{font-size:12px;font-weight:bold}} \
         .side{{font-size:11px}} .value{{font-size:11px}} .tick{{font-size:10px;text-anchor:middle;fill:#444}} \
         .grid{{stroke:#ccc;stroke-width:1}} .one{{stroke:#000;stroke-width:1.5}}</style>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LABEL_X}\" y=\"24\" class=\"title\">envd beside OpenSSH, relative to the raw operation (lower is better)</text>\n\
         <text x=\"{LABEL_X}\" y=\"42\" class=\"sub\">Each bar: cost (time, time per byte, memory) ÷ the baseline's; 1× = as fast or as small; log scale. \
         Medians. Baseline: raw, or OpenSSH where nothing raw exists.</text>\n\
         <text x=\"{LABEL_X}\" y=\"74\" class=\"sub\">envd: Connect JSON and multipart uploads, as the SDKs speak to it; envd, binary: Connect binary protobuf, octet-stream uploads.</text>\n\
         <text x=\"{LABEL_X}\" y=\"58\" class=\"sub\">{}</text>\n\
         {grid}{body}</svg>\n",
        escape(&machine.describe())
    )
}
