//! The machine the figures come from, and the memory readings of the
//! daemons measured (envd's own VmHWM; the sum over sshd's processes,
//! sampled, since OpenSSH serves each connection from processes of its own).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common;
use crate::figure::Machine;

pub fn describe() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown")
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(f64::NAN);
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        memory_gib: mem_kib / (1 << 20) as f64,
        load_before: load_average(),
        load_after: String::new(),
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Resets a process's VmHWM to its current RSS (clear_refs 5).
pub fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting VmHWM through clear_refs");
}

/// VmHWM of a process in MiB.
pub fn peak_mib(pid: u32) -> f64 {
    common::proc_status_kib(pid, "VmHWM") as f64 / 1024.0
}

/// VmRSS of a process in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    common::proc_status_kib(pid, "VmRSS") as f64 / 1024.0
}

/// Sum of VmRSS over `root` and its descendants named `name`, in MiB.
pub fn tree_rss_mib(root: u32, name: &str) -> f64 {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // comm may hold spaces: the fields after it follow the last ')'.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let comm = &stat[open + 1..close];
            let ppid = stat[close + 1..].split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            parents.push((pid, ppid, comm == name));
        }
    }
    let mut tree = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid, _) in &parents {
            if tree.contains(&ppid) && !tree.contains(&pid) {
                tree.push(pid);
                grew = true;
            }
        }
    }
    let named = |pid: &u32| *pid == root || parents.iter().any(|(p, _, is_named)| p == pid && *is_named);
    // A process that exited meanwhile counts for nothing.
    tree.iter().filter(|pid| named(pid)).filter_map(|pid| rss_kib_if_alive(*pid)).map(|kib| kib as f64 / 1024.0).sum()
}

fn rss_kib_if_alive(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Samples [`tree_rss_mib`] every few milliseconds until stopped; the
/// peak is a lower bound of the true one, which no counter records.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<f64>,
}

impl PeakSampler {
    pub fn start(root: u32, name: &'static str) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = tree_rss_mib(root, name);
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(tree_rss_mib(root, name));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak.max(tree_rss_mib(root, name))
        });
        PeakSampler { stop, thread }
    }

    pub fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(f64::NAN)
    }
}

pub fn file_mib(path: &str) -> f64 {
    std::fs::metadata(path).map_or(f64::NAN, |m| m.len() as f64 / (1 << 20) as f64)
}

/// Raises the open-file limit to its hard limit: 1,000 concurrent
/// commands need more pipes than the usual soft limit of 1,024, here and
/// in the daemons started from here.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
