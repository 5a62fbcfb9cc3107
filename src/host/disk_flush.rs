//! Flushing the disk filesystems before a memory pause. The platform may
//! cold-boot a memory snapshot's disk on its own (a filesystem-only resume
//! of a memory-inclusive snapshot); that disk was never frozen, so writes
//! still in the guest's page cache at the pause would be lost. `/freeze`
//! therefore `syncfs(2)`s every writable filesystem on a block device once
//! the workload is frozen (nothing writes any more), within the freeze's
//! own deadline, and says whether every flush finished. A flush still
//! running at the deadline goes on in the background (it cannot be
//! cancelled); the answer does not wait for it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::mountinfo::writable_disk_mounts;

/// What the flush did, as `/freeze` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushReport {
    /// Writable disk filesystems found.
    pub filesystems: usize,
    /// Every one of them was flushed within the deadline.
    pub flushed: bool,
    /// Time spent, up to the deadline.
    pub flush_ms: u64,
}

/// `syncfs` of every writable disk filesystem, waited for at most `within`.
pub async fn flush_disks(within: Duration) -> FlushReport {
    let started = Instant::now();
    let mounts = tokio::task::spawn_blocking(writable_disk_mounts).await.unwrap_or_default();
    let flushes = mounts.iter().cloned().map(|mount| tokio::task::spawn_blocking(move || (syncfs_at(&mount), mount)));
    let waited =
        tokio::time::timeout(within.saturating_sub(started.elapsed()), futures_util::future::join_all(flushes));
    let flushed = match waited.await {
        Ok(outcomes) => outcomes.into_iter().all(|outcome| match outcome {
            Ok((Ok(()), _)) => true,
            Ok((Err(err), mount)) => {
                tracing::warn!(mount = %mount.display(), "flushing before the pause failed: {err}");
                false
            }
            Err(join) => {
                tracing::warn!("flushing before the pause: {join}");
                false
            }
        }),
        Err(_) => {
            tracing::warn!(within_ms = within.as_millis() as u64, "the flush before the pause did not finish in time");
            false
        }
    };
    let flush_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    FlushReport { filesystems: mounts.len(), flushed, flush_ms }
}

fn syncfs_at(mount: &Path) -> std::io::Result<()> {
    let dir: OwnedFd = std::fs::File::open(mount)?.into();
    // SAFETY: syncfs(2) on an fd this function owns.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
