//! `POST /collapse`: gathers envd's own anonymous memory into 2 MiB
//! transparent hugepages just before a pause, so that a resume faults in
//! fewer, larger frames.
//!
//! Order of effects: read `AnonHugePages` from `/proc/self/smaps_rollup`;
//! for every private, writable, anonymous mapping of `/proc/self/maps`
//! (unnamed, or `[heap]`) mark it `MADV_HUGEPAGE` (so the collapse is allowed
//! under THP `madvise` mode), then `MADV_COLLAPSE` each whole 2 MiB window
//! inside it, one window at a time, because one empty window would make a
//! whole-range collapse stop early; read `AnonHugePages` again. The kernel
//! reports success both for a window it migrated and for one that already
//! was a hugepage, so the growth of `AnonHugePages` splits the successes
//! into `collapsed` and `alreadyHuge`. A kernel without `MADV_COLLAPSE`
//! (before 6.1) refuses every window: everything is counted as skipped and
//! nothing is claimed.

use std::time::Instant;

use serde::Serialize;

const HUGE_PAGE: usize = 2 << 20;

/// What one collapse did; `chunks = collapsed + alreadyHuge + skipped`.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CollapseReport {
    /// Anonymous writable mappings looked at.
    pub regions: usize,
    /// 2 MiB windows attempted.
    pub chunks: usize,
    /// Windows whose pages were migrated into a new hugepage.
    pub collapsed: usize,
    /// Windows the kernel accepted that already were hugepages.
    pub already_huge: usize,
    /// Windows that could not be collapsed (empty, ineligible, unsupported).
    pub skipped: usize,
    /// Time taken.
    pub elapsed_ms: u64,
}

/// Why no collapse was attempted.
#[derive(Debug, thiserror::Error)]
#[error("reading /proc/self/maps: {0}")]
pub struct CollapseError(#[from] std::io::Error);

/// Collapses envd's anonymous memory; blocking (run it off the async threads).
pub fn collapse_own_memory() -> Result<CollapseReport, CollapseError> {
    let started = Instant::now();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let regions = anonymous_writable_regions(&maps);
    let before = anon_huge_bytes();
    let mut report = CollapseReport { regions: regions.len(), ..Default::default() };
    let mut accepted = 0;
    for (start, end) in regions {
        let (chunks, ok) = collapse_range(start, end);
        report.chunks += chunks;
        accepted += ok;
        report.skipped += chunks - ok;
    }
    let after = anon_huge_bytes();
    let migrated = match (before, after) {
        (Some(before), Some(after)) if after >= before => ((after - before) / HUGE_PAGE as u64) as usize,
        // Unmeasurable: every success counts as real work rather than hiding it.
        _ => accepted,
    };
    report.collapsed = migrated.min(accepted);
    report.already_huge = accepted - report.collapsed;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// `(start, end)` of private writable mappings with no file behind them.
fn anonymous_writable_regions(maps: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let inode = fields.nth(2)?;
            let name = fields.next().unwrap_or("");
            let private_rw = perms.starts_with("rw") && perms.ends_with('p');
            if !private_rw || inode != "0" || !(name.is_empty() || name == "[heap]") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?))
        })
        .collect()
}

/// Collapses each whole 2 MiB window of `[start, end)`: (windows, accepted).
fn collapse_range(start: usize, end: usize) -> (usize, usize) {
    // SAFETY: advice on a mapping of this process; MADV_HUGEPAGE and
    // MADV_COLLAPSE change only how pages are backed, never their contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
    let first = start.next_multiple_of(HUGE_PAGE);
    let mut windows = 0;
    let mut accepted = 0;
    let mut window = first;
    while window + HUGE_PAGE <= end {
        windows += 1;
        // SAFETY: as above; the window lies inside the mapping.
        if unsafe { libc::madvise(window as *mut libc::c_void, HUGE_PAGE, libc::MADV_COLLAPSE) } == 0 {
            accepted += 1;
        }
        window += HUGE_PAGE;
    }
    (windows, accepted)
}

/// `AnonHugePages` of this process in bytes, if the kernel reports it.
fn anon_huge_bytes() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let kib: u64 =
        rollup.lines().find_map(|l| l.strip_prefix("AnonHugePages:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_writable_anonymous_mappings_are_regions() {
        let maps = "\
00400000-00600000 r-xp 00000000 08:01 123 /usr/bin/envd
01000000-01400000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000600000 rw-s 00000000 00:01 9 /dev/zero (deleted)
7f0000600000-7f0000800000 r--p 00000000 00:00 0
7ffd00000000-7ffd00200000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            anonymous_writable_regions(maps),
            vec![(0x0100_0000, 0x0140_0000), (0x7f00_0000_0000, 0x7f00_0040_0000)]
        );
    }
}
