//! The performance goals, each beside the figure it judges: a ratio of
//! costs (time, time per byte, memory) between two sides of a figure, a
//! share of a baseline's rate, or an absolute bound. Measured in the same
//! run as the baseline, never against a number from another machine.

use crate::figure::{Figure, Side};
use crate::report::format_value;

/// How a goal reads its figures and what it demands.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// cost(side) / cost(of) at most this (1.3 = at most 30 % slower).
    CostRatio { side: Side, of: Side, at_most: f64 },
    /// rate(side) at least this share of rate(of) (0.8 = 80 %).
    RateShare { side: Side, of: Side, at_least: f64 },
    /// The side's median at most this, in the figure's unit.
    Absolute { side: Side, at_most: f64 },
    /// The side's growth from the `small` figure to this one at most the
    /// `of` side's growth over the same step.
    GrowthNoWorse { side: Side, of: Side, small: &'static str },
}

/// One goal of one figure.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub figure: &'static str,
    pub text: &'static str,
    bound: Bound,
}

/// A goal as measured in this run.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub goal: Goal,
    /// The measured value as the goal states it ("2.10×", "46 %", "6.2 MiB").
    pub now: String,
    pub met: bool,
}

/// Every goal of the bench.
pub fn all() -> Vec<Goal> {
    use Bound::*;
    use Side::*;
    let goal = |figure, text, bound| Goal { figure, text, bound };
    vec![
        goal("ready", "exec → ready ≤ 3 ms", Absolute { side: Envd, at_most: 3e-3 }),
        goal("idle_rss", "≤ 4.0 MiB", Absolute { side: Envd, at_most: 4.0 }),
        goal("idle_rss_after_bursts", "≤ 6.0 MiB", Absolute { side: Envd, at_most: 6.0 }),
        goal("exec_true", "≤ 1.3× raw", CostRatio { side: Envd, of: Raw, at_most: 1.3 }),
        goal("stdout", "binary ≥ 80 % of a pipe", RateShare { side: EnvdProto, of: Raw, at_least: 0.8 }),
        goal("stdout", "JSON ≥ 1.5× OpenSSH", RateShare { side: Envd, of: OpenSsh, at_least: 1.5 }),
        goal("upload", "multipart ≥ 90 % of octet-stream", RateShare { side: Envd, of: EnvdProto, at_least: 0.9 }),
        goal("upload", "octet-stream ≥ 70 % of a durable copy", RateShare { side: EnvdProto, of: Raw, at_least: 0.7 }),
        goal("download", "≥ 85 % of raw", RateShare { side: Envd, of: Raw, at_least: 0.85 }),
        goal("stat", "≤ 1.5× a bare HTTP/1.1 round trip", CostRatio { side: Envd, of: Raw, at_most: 1.5 }),
        goal("list_dir", "≤ 0.5× OpenSSH", CostRatio { side: Envd, of: OpenSsh, at_most: 0.5 }),
        goal("list_dir", "≤ 2.5× raw", CostRatio { side: Envd, of: Raw, at_most: 2.5 }),
        goal("burst_small", "≤ 1.2× raw", CostRatio { side: Envd, of: Raw, at_most: 1.2 }),
        goal("burst_large", "≤ 1.3× raw", CostRatio { side: Envd, of: Raw, at_most: 1.3 }),
        goal("burst_large", "growth no worse than raw's", GrowthNoWorse { side: Envd, of: Raw, small: "burst_small" }),
        goal("burst_large_rss", "≤ 0.5× OpenSSH", CostRatio { side: Envd, of: OpenSsh, at_most: 0.5 }),
    ]
}

/// Measures every goal whose figures this run produced.
pub fn judge(figures: &[Figure]) -> Vec<Verdict> {
    all().into_iter().filter_map(|goal| judge_one(goal, figures)).collect()
}

fn judge_one(goal: Goal, figures: &[Figure]) -> Option<Verdict> {
    let find = |id: &str| figures.iter().find(|f| f.id == id);
    let figure = find(goal.figure)?;
    let (now, met) = match goal.bound {
        Bound::CostRatio { side, of, at_most } => {
            let ratio = figure.ratio(side, of)?;
            (format!("{ratio:.2}×"), ratio <= at_most)
        }
        Bound::RateShare { side, of, at_least } => {
            let share = 1.0 / figure.ratio(side, of)?;
            let shown = if at_least >= 1.0 { format!("{share:.2}×") } else { format!("{:.0} %", share * 100.0) };
            (shown, share >= at_least)
        }
        Bound::Absolute { side, at_most } => {
            let value = figure.get(side)?.median;
            (format_value(figure.unit, value), value <= at_most)
        }
        Bound::GrowthNoWorse { side, of, small } => {
            let small = find(small)?;
            let growth = |s: Side| Some(figure.get(s)?.median / small.get(s)?.median);
            let (mine, theirs) = (growth(side)?, growth(of)?);
            (format!("×{mine:.1} vs ×{theirs:.1}"), mine <= theirs)
        }
    };
    Some(Verdict { goal, now, met })
}

/// The goals of one figure as one table cell.
pub fn cell(verdicts: &[Verdict], figure: &str) -> String {
    let parts: Vec<String> = verdicts
        .iter()
        .filter(|v| v.goal.figure == figure)
        .map(|v| format!("{}: {} {}", v.goal.text, v.now, if v.met { "✓" } else { "✗" }))
        .collect();
    if parts.is_empty() { "—".into() } else { parts.join("; ") }
}
