//! envd's heap gives memory back after a burst. glibc keeps what a burst
//! freed (a thousand commands' connections, pipes and buffers) in its arena
//! for reuse, so resident memory stays at the burst's peak for the rest of
//! the VM's life. Two settings and one task undo that:
//!
//! - one arena for every thread (one per thread costs resident memory for
//!   nothing at envd's concurrency);
//! - a fixed mmap threshold of 128 KiB: glibc otherwise raises it after
//!   each large free, until even megabyte buffers come from (and stay in)
//!   the arena;
//! - a trim: whenever more than [`TRIM_ABOVE`] bytes lie free in the arena,
//!   `malloc_trim` hands their whole pages back to the kernel. Checked every
//!   [`CHECK_EVERY`]; the check is a walk of the arena's free lists.

use std::time::Duration;

/// How often free memory in the arena is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Free bytes in the arena worth a trim.
pub const TRIM_ABOVE: usize = 512 << 10;
/// Allocations from this size on are mapped on their own and unmapped on free.
const MMAP_THRESHOLD: libc::c_int = 128 << 10;

/// Sets glibc's allocator up as the module doc says; call before any
/// thread starts.
pub fn configure_allocator() {
    // SAFETY: mallopt only tunes glibc's allocator; called before threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Bytes lying free inside the allocator's arenas.
pub fn free_in_heap() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's bookkeeping.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks
}

/// Gives the free pages of the heap back to the kernel; returns whether any
/// were given back.
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes the allocator's own locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Trims whenever enough lies free, for as long as envd runs.
pub async fn return_freed_memory() {
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        if free_in_heap() > TRIM_ABOVE {
            // The walk and the madvise calls take milliseconds on a large heap.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    fn a_trim_returns_the_pages_a_fragmented_heap_holds() {
        configure_allocator();
        // 64 MiB of small blocks (below the mmap threshold, so in the
        // arena); one in 16 stays alive, as a burst leaves a few buffers
        // behind, so glibc cannot shrink the heap's top by itself.
        let mut blocks: Vec<Option<Vec<u8>>> = (0..65_536).map(|i| Some(vec![i as u8; 1000])).collect();
        for (i, block) in blocks.iter_mut().enumerate() {
            if i % 16 != 0 {
                *block = None;
            }
        }
        let held = rss_bytes();
        assert!(free_in_heap() > TRIM_ABOVE, "the freed blocks lie in the arena");
        trim();
        let after = rss_bytes();
        assert!(held.saturating_sub(after) > 16 << 20, "RSS {held} before the trim, {after} after");
        assert!(blocks.iter().flatten().all(|b| b.len() == 1000), "the live blocks are untouched");
    }
}
