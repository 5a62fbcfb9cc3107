//! What envd holds from the outside: resident memory and open descriptors
//! (`/proc/<pid>/status` VmRSS, `/proc/<pid>/fd`), sampled in the
//! background while a load runs so that a test can print before / peak /
//! after and check the return to baseline; and its unreaped children.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{proc_stat, proc_status_kib};

/// Resident memory and open descriptors of one process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub rss_kib: u64,
    pub fds: usize,
}

impl Footprint {
    /// The process's footprint now.
    pub fn of(pid: u32) -> Footprint {
        Footprint { rss_kib: proc_status_kib(pid, "VmRSS"), fds: fd_count(pid) }
    }

    fn max(self, other: Footprint) -> Footprint {
        Footprint { rss_kib: self.rss_kib.max(other.rss_kib), fds: self.fds.max(other.fds) }
    }

    /// Whether this is within `slack` of `baseline` (above it; below is fine).
    pub fn within(&self, baseline: Footprint, slack: Slack) -> bool {
        self.rss_kib <= baseline.rss_kib + slack.rss_kib && self.fds <= baseline.fds + slack.fds
    }
}

/// How far above its baseline a footprint may settle.
#[derive(Debug, Clone, Copy)]
pub struct Slack {
    pub rss_kib: u64,
    pub fds: usize,
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or_else(|e| panic!("fds of {pid}: {e}"))
}

/// Children of `parent` that have exited and were not reaped (state Z).
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|f| f[0] == "Z" && f[1] == parent.to_string()))
        .collect()
}

/// Samples a process's footprint every 20 ms until stopped, keeping the peak.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<Mutex<Footprint>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(Mutex::new(Footprint::of(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                    return;
                }
                let now = Footprint::of(pid);
                let mut peak = p.lock().unwrap();
                *peak = peak.max(now);
                drop(peak);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { stop, peak, thread: Some(thread) }
    }

    /// The highest values seen so far.
    pub fn peak(&self) -> Footprint {
        *self.peak.lock().unwrap()
    }

    /// Stops sampling; returns the peak.
    pub fn finish(mut self) -> Footprint {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits up to `wait` for the footprint to come back within `slack` of
/// `baseline`; returns the last reading (the caller asserts on it).
pub async fn settle(pid: u32, baseline: Footprint, slack: Slack, wait: Duration) -> Footprint {
    let deadline = Instant::now() + wait;
    loop {
        let now = Footprint::of(pid);
        if now.within(baseline, slack) || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One row of a before / peak / after table.
#[derive(Debug, Clone)]
pub struct Row {
    pub phase: String,
    pub before: Footprint,
    pub peak: Footprint,
    pub after: Footprint,
    /// What the phase did (counts, throughput), free text.
    pub note: String,
}

/// Prints a before / peak / after table of envd's footprint, one row per
/// phase, so the figures can be quoted (`cargo test -- --nocapture`).
pub fn print_table(title: &str, rows: &[Row]) {
    let mut out = format!(
        "\n{title}\n| phase | RSS before | RSS peak | RSS after | fds before | fds peak | fds after | measured |\n|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} |\n",
            r.phase,
            mib(r.before.rss_kib),
            mib(r.peak.rss_kib),
            mib(r.after.rss_kib),
            r.before.fds,
            r.peak.fds,
            r.after.fds,
            r.note
        ));
    }
    eprintln!("{out}");
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A load figure from the environment (`ENVD_LOAD_*`), else `default`.
pub fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
