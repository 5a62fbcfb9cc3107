//! What one benchmark run produces: figures, each with the values of the
//! sides it applies to (envd over Connect JSON, envd over binary protobuf,
//! OpenSSH, the raw operation), and the ratios the README quotes.

use std::time::Duration;

/// What a figure measures, which fixes its unit and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds; lower is better.
    Time,
    /// MiB/s; higher is better.
    Rate,
    /// MiB of memory or of disk; lower is better.
    Mib,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Time => "s",
            Unit::Rate => "MiB/s",
            Unit::Mib => "MiB",
        }
    }

    /// The cost of a value: higher is always worse, so ratios of costs
    /// read the same way for every unit (2× = twice as slow or as big).
    pub fn cost(self, value: f64) -> f64 {
        match self {
            Unit::Rate => 1.0 / value,
            Unit::Time | Unit::Mib => value,
        }
    }
}

/// Who produced a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// envd as the SDKs speak to it: Connect JSON, multipart uploads.
    Envd,
    /// envd over Connect with binary protobuf; octet-stream uploads.
    EnvdProto,
    OpenSsh,
    Raw,
}

impl Side {
    pub const ALL: [Side; 4] = [Side::Envd, Side::EnvdProto, Side::OpenSsh, Side::Raw];

    pub fn key(self) -> &'static str {
        match self {
            Side::Envd => "envd",
            Side::EnvdProto => "envd_proto",
            Side::OpenSsh => "openssh",
            Side::Raw => "raw",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Side::Envd => "envd",
            Side::EnvdProto => "envd, binary",
            Side::OpenSsh => "OpenSSH",
            Side::Raw => "raw",
        }
    }
}

/// One side's result: the median, and the p99 for latencies.
#[derive(Debug, Clone)]
pub struct Measure {
    pub median: f64,
    pub p99: Option<f64>,
    /// How it was measured, in a few words.
    pub how: String,
}

impl Measure {
    pub fn once(value: f64, how: impl Into<String>) -> Measure {
        Measure { median: value, p99: None, how: how.into() }
    }

    /// Median and p99 of latency samples, in seconds.
    pub fn latencies(mut samples: Vec<Duration>, how: impl Into<String>) -> Measure {
        samples.sort();
        let at = |pct: f64| {
            let index = ((pct / 100.0) * (samples.len().saturating_sub(1)) as f64).round() as usize;
            samples.get(index).map_or(f64::NAN, Duration::as_secs_f64)
        };
        Measure { median: at(50.0), p99: Some(at(99.0)), how: how.into() }
    }

    /// MiB/s of `bytes` moved in `took`.
    pub fn rate(bytes: u64, took: Duration, how: impl Into<String>) -> Measure {
        Measure::once(bytes as f64 / MIB / took.as_secs_f64(), how)
    }

    pub fn is_valid(&self) -> bool {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        ok(self.median) && self.p99.is_none_or(ok)
    }
}

pub const MIB: f64 = (1u64 << 20) as f64;

/// One line of the table and one group of bars in the chart.
#[derive(Debug, Clone)]
pub struct Figure {
    pub id: &'static str,
    pub title: String,
    pub unit: Unit,
    pub values: Vec<(Side, Measure)>,
    /// envd's peak RSS (VmHWM) while this figure was measured, in MiB.
    pub envd_peak_rss: Option<f64>,
}

impl Figure {
    pub fn new(id: &'static str, title: impl Into<String>, unit: Unit) -> Figure {
        Figure { id, title: title.into(), unit, values: Vec::new(), envd_peak_rss: None }
    }

    pub fn with(mut self, side: Side, measure: Measure) -> Figure {
        self.values.push((side, measure));
        self
    }

    pub fn get(&self, side: Side) -> Option<&Measure> {
        self.values.iter().find(|(s, _)| *s == side).map(|(_, m)| m)
    }

    /// What the other sides are compared with: the raw operation, or
    /// OpenSSH where nothing raw exists (memory, binary size).
    pub fn baseline(&self) -> Option<Side> {
        [Side::Raw, Side::OpenSsh].into_iter().find(|side| self.get(*side).is_some())
    }

    /// cost(side) / cost(of), on medians: 2.0 = twice as slow or as big.
    pub fn ratio(&self, side: Side, of: Side) -> Option<f64> {
        let (a, b) = (self.get(side)?, self.get(of)?);
        Some(self.unit.cost(a.median) / self.unit.cost(b.median))
    }
}

/// The machine the figures came from.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {:.0} GiB RAM, Linux {}; load average before / after: {} / {}",
            self.cores, self.model, self.memory_gib, self.kernel, self.load_before, self.load_after
        )
    }
}
