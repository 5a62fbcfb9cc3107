//! `GET /metrics`: guest figures the orchestrator polls, from /proc and
//! statvfs.

use std::sync::Mutex;

use serde::Serialize;

/// One `/metrics` answer; every field is always present.
#[derive(Debug, Serialize)]
pub struct Metrics {
    /// Guest time, Unix seconds.
    pub ts: i64,
    /// Logical CPUs.
    pub cpu_count: u32,
    /// System-wide CPU use since the previous call, percent.
    pub cpu_used_pct: f64,
    /// Total memory, MiB.
    pub mem_total_mib: u64,
    /// Used memory, MiB.
    pub mem_used_mib: u64,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// total − free − buffers − cache, bytes.
    pub mem_used: u64,
    /// Page cache (including reclaimable slab), bytes.
    pub mem_cache: u64,
    /// Used bytes of the root filesystem.
    pub disk_used: u64,
    /// Size of the root filesystem, bytes.
    pub disk_total: u64,
}

/// Why metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A /proc file could not be read or parsed.
    #[error("reading {0}")]
    Proc(&'static str),
    /// statvfs failed.
    #[error("statvfs /: {0}")]
    Disk(nix::Error),
}

#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

/// Keeps the previous CPU reading so each call reports use since the last.
#[derive(Debug, Default)]
pub struct MetricsSampler {
    previous: Mutex<Option<CpuTimes>>,
}

impl MetricsSampler {
    /// Reads the current figures.
    pub fn sample(&self) -> Result<Metrics, MetricsError> {
        let now = cpu_times()?;
        let cpu_used_pct = {
            let mut previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
            let since = previous.replace(now).unwrap_or_default();
            let total = now.total.saturating_sub(since.total);
            let busy = now.busy.saturating_sub(since.busy);
            if total == 0 { 0.0 } else { (busy as f64 * 10_000.0 / total as f64).round() / 100.0 }
        };
        let memory = memory()?;
        let disk = nix::sys::statvfs::statvfs("/").map_err(MetricsError::Disk)?;
        let block = disk.fragment_size();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Metrics {
            ts,
            cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            cpu_used_pct,
            mem_total_mib: memory.total >> 20,
            mem_used_mib: memory.used >> 20,
            mem_total: memory.total,
            mem_used: memory.used,
            mem_cache: memory.cache,
            disk_used: (disk.blocks() - disk.blocks_available()) * block,
            disk_total: disk.blocks() * block,
        })
    }
}

fn cpu_times() -> Result<CpuTimes, MetricsError> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|_| MetricsError::Proc("/proc/stat"))?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).ok_or(MetricsError::Proc("/proc/stat"))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok(CpuTimes { busy: total.saturating_sub(idle), total })
}

struct Memory {
    total: u64,
    used: u64,
    cache: u64,
}

fn memory() -> Result<Memory, MetricsError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|_| MetricsError::Proc("/proc/meminfo"))?;
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    let total = field("MemTotal");
    if total == 0 {
        return Err(MetricsError::Proc("/proc/meminfo"));
    }
    let cache = field("Cached") + field("SReclaimable");
    let used = total.saturating_sub(field("MemFree") + field("Buffers") + cache);
    Ok(Memory { total, used, cache })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_figures() {
        let sampler = MetricsSampler::default();
        let first = sampler.sample().unwrap();
        assert!(first.mem_total > first.mem_used && first.mem_total > 0);
        assert!(first.disk_total >= first.disk_used && first.disk_total > 0);
        assert!(first.cpu_count >= 1);
        let second = sampler.sample().unwrap();
        assert!((0.0..=100.0).contains(&second.cpu_used_pct));
    }
}
