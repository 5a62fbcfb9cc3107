//! The results as one Markdown table, as JSON, and the check `--quick`
//! makes (every figure present and finite, whatever its value).

use serde_json::{Value, json};

use crate::figure::{Figure, Machine, Side, Unit};
use crate::goals::{self, Verdict};

pub fn format_value(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Time if value < 1e-3 => format!("{:.0} µs", value * 1e6),
        Unit::Time if value < 1.0 => format!("{:.2} ms", value * 1e3),
        Unit::Time => format!("{value:.2} s"),
        Unit::Rate => format!("{value:.0} MiB/s"),
        Unit::Mib => format!("{value:.1} MiB"),
    }
}

fn cell(figure: &Figure, side: Side) -> String {
    let Some(measure) = figure.get(side) else { return "—".into() };
    match measure.p99 {
        Some(p99) => format!("{} / {}", format_value(figure.unit, measure.median), format_value(figure.unit, p99)),
        None => format_value(figure.unit, measure.median),
    }
}

fn ratio_cell(figure: &Figure, sides: &[Side], of: Side) -> String {
    let ratios: Vec<String> =
        sides.iter().filter_map(|side| figure.ratio(*side, of)).map(|r| format!("{r:.2}×")).collect();
    if ratios.is_empty() { "—".into() } else { ratios.join(" / ") }
}

/// The table: one row per figure; ratios compare costs (time, memory,
/// or time per byte), so 2× means twice as slow or twice as big.
pub fn table(figures: &[Figure], machine: &Machine) -> String {
    let mut out = String::new();
    out.push_str(&format!("Machine: {}\n\n", machine.describe()));
    out.push_str(
        "Latencies are median / p99. Ratios compare costs (time, time per byte, memory): \
         1.50× = 1.5 times as slow or as big. envd: as the SDKs speak to it (Connect JSON, multipart \
         uploads); envd, binary: Connect with binary protobuf (octet-stream uploads); envd ratios are \
         envd / envd, binary where both exist.\n\n",
    );
    out.push_str(
        "| figure | envd | envd, binary | OpenSSH | raw | envd ÷ raw | OpenSSH ÷ raw | envd ÷ OpenSSH | envd peak RSS | goal: now |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let envd = [Side::Envd, Side::EnvdProto];
    let verdicts = goals::judge(figures);
    for figure in figures {
        let rss = figure.envd_peak_rss.map_or("—".into(), |mib| format!("{mib:.1} MiB"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {rss} | {} |\n",
            figure.title,
            cell(figure, Side::Envd),
            cell(figure, Side::EnvdProto),
            cell(figure, Side::OpenSsh),
            cell(figure, Side::Raw),
            ratio_cell(figure, &envd, Side::Raw),
            ratio_cell(figure, &[Side::OpenSsh], Side::Raw),
            ratio_cell(figure, &envd, Side::OpenSsh),
            goals::cell(&verdicts, figure.id),
        ));
    }
    let met = verdicts.iter().filter(|v| v.met).count();
    out.push_str(&format!("\nGoals met: {met} of {}.\n", verdicts.len()));
    out.push_str("\nHow each value was measured:\n\n");
    for figure in figures {
        let hows: Vec<String> =
            figure.values.iter().map(|(side, measure)| format!("{}: {}", side.label(), measure.how)).collect();
        out.push_str(&format!("- {}: {}\n", figure.title, hows.join("; ")));
    }
    out
}

/// Growth from the smaller burst to the larger, per side: a factor at or
/// under the ratio of the counts is linear or better.
pub fn growth(figures: &[Figure], small: &str, large: &str, factor: f64) -> String {
    let (Some(a), Some(b)) = (figures.iter().find(|f| f.id == small), figures.iter().find(|f| f.id == large)) else {
        return String::new();
    };
    let mut parts = Vec::new();
    for side in Side::ALL {
        if let (Some(x), Some(y)) = (a.get(side), b.get(side)) {
            parts.push(format!("{} ×{:.1}", side.label(), y.median / x.median));
        }
    }
    if let (Some(x), Some(y)) = (a.envd_peak_rss, b.envd_peak_rss) {
        parts.push(format!("envd peak RSS ×{:.2}", y / x));
    }
    format!("Growth from {} to {} (×{factor:.0} the commands): {}\n", a.title, b.title, parts.join(", "))
}

pub fn json(figures: &[Figure], machine: &Machine, quick: bool) -> Value {
    let verdicts: Vec<Verdict> = goals::judge(figures);
    let figures: Vec<Value> = figures
        .iter()
        .map(|figure| {
            let mut values = serde_json::Map::new();
            for (side, measure) in &figure.values {
                values.insert(
                    side.key().into(),
                    json!({"median": measure.median, "p99": measure.p99, "how": measure.how}),
                );
            }
            let mut ratios = serde_json::Map::new();
            for side in [Side::Envd, Side::EnvdProto, Side::OpenSsh] {
                for of in [Side::Raw, Side::OpenSsh] {
                    if let Some(r) = figure.ratio(side, of).filter(|_| side != of) {
                        ratios.insert(format!("{}_vs_{}", side.key(), of.key()), json!(r));
                    }
                }
            }
            let goals: Vec<Value> = verdicts
                .iter()
                .filter(|v| v.goal.figure == figure.id)
                .map(|v| json!({"goal": v.goal.text, "now": v.now, "met": v.met}))
                .collect();
            json!({
                "id": figure.id,
                "goals": goals,
                "title": figure.title,
                "unit": figure.unit.name(),
                "values": values,
                "ratios": ratios,
                "envd_peak_rss_mib": figure.envd_peak_rss,
            })
        })
        .collect();
    json!({
        "quick": quick,
        "machine": {
            "cores": machine.cores,
            "model": machine.model,
            "kernel": machine.kernel,
            "memory_gib": machine.memory_gib,
            "load_before": machine.load_before,
            "load_after": machine.load_after,
        },
        "figures": figures,
    })
}

/// Every expected figure with every expected side, and each value finite
/// and positive; returns what is missing or invalid.
pub fn check(figures: &[Figure], expected: &[(&str, &[Side])]) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, sides) in expected {
        let Some(figure) = figures.iter().find(|f| f.id == *id) else {
            problems.push(format!("figure {id} is missing"));
            continue;
        };
        for side in *sides {
            match figure.get(*side) {
                None => problems.push(format!("{id}: no {} value", side.label())),
                Some(m) if !m.is_valid() => problems.push(format!("{id}: {} value {m:?} is not finite", side.label())),
                Some(_) => {}
            }
        }
        if figure.envd_peak_rss.is_some_and(|rss| !rss.is_finite() || rss <= 0.0) {
            problems.push(format!("{id}: envd peak RSS is not finite"));
        }
    }
    problems
}
