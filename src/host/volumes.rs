//! NFS volumes the host asks for in `/init` (`volumeMounts`, `lifecycleID`).
//!
//! Order of effects for one `/init`, all volumes in parallel and all of it
//! within [`MOUNT_TIMEOUT`] (a hard NFS mount to a dead server would
//! otherwise hang `/init` for minutes):
//!
//! 1. Volumes already mounted by this envd for the same lifecycle are left
//!    alone: a memory resume of the same lifecycle keeps its live mounts.
//! 2. Whatever is mounted at the path is unmounted, `umount --force` first
//!    (a stale NFS mount of an earlier lifecycle may never answer again),
//!    then `umount --lazy` when that fails, so the path is free either way.
//! 3. The path is created (`mkdir -p`), then `mount -t nfs` with the
//!    reference's options ([`NFS_OPTIONS`]): NFSv3 over TCP port 2049, and
//!    no attribute or lookup caching, so that a pause and resume never
//!    serves stale metadata.
//! 4. The ledger records the lifecycle the path is now mounted for.
//!
//! While volumes are being (re)mounted, a command (and a file operation
//! under a volume path) waits for them, at most the volume wait
//! (`--volume-wait`, [`DEFAULT_WAIT`]): data meant for a volume must not
//! land on the root disk underneath it. After a cold boot the saved
//! volumes are mounted again at start-up the same way, retried for as long
//! as commands would wait, since the network and the server may come up
//! after envd.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::watch;

use super::mountinfo::mount_at;
use crate::record::VolumeMount;

/// Mount options of the reference: its NFS proxy speaks only NFSv3 over
/// TCP on port 2049; `sync` so that a sandbox stopped abruptly loses no
/// acknowledged write; no caching so that pause and resume see fresh data.
pub const NFS_OPTIONS: &str = "fg,hard,sync,rsize=1048576,wsize=1048576,mountproto=tcp,mountport=2049,proto=tcp,\
port=2049,nfsvers=3,noacl,noac,lookupcache=none";

/// The most one `/init` (or the start-up restore) spends on volumes.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long commands wait for volumes, and a start-up restore retries.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// What a fallback lazy unmount may take after a forced one failed.
const LAZY_UNMOUNT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between start-up mount attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Why a volume could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request names a path or target that cannot be mounted.
    #[error("invalid volume {path:?}: {reason}")]
    Invalid {
        /// The requested mount path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A system tool failed; `output` is what it printed.
    #[error("failed to {action} NFS at {path:?}: {output}")]
    Command {
        /// `mount` or `unmount`.
        action: &'static str,
        /// The mount path.
        path: String,
        /// The tool's own message.
        output: String,
    },
    /// Not done within [`MOUNT_TIMEOUT`].
    #[error("NFS volumes not mounted within {0:?}")]
    TimedOut(Duration),
}

/// The volumes and what they are mounted for.
#[derive(Debug)]
pub struct Volumes {
    /// Mount path → the lifecycle it was mounted for.
    ledger: Mutex<BTreeMap<PathBuf, String>>,
    /// Paths being mounted right now; empty when nothing is pending.
    pending: watch::Sender<Arc<Vec<PathBuf>>>,
    /// One mounting pass at a time (start-up restore, `/init`).
    mounting: tokio::sync::Mutex<()>,
    /// How long commands wait, and a start-up restore retries.
    wait: Duration,
}

impl Default for Volumes {
    fn default() -> Self {
        Self::new(DEFAULT_WAIT)
    }
}

impl Volumes {
    /// Volumes whose commands wait at most `wait` for them.
    pub fn new(wait: Duration) -> Self {
        Self {
            ledger: Mutex::default(),
            pending: watch::Sender::new(Arc::default()),
            mounting: tokio::sync::Mutex::default(),
            wait,
        }
    }

    /// Mounts `volumes` for `lifecycle` as `/init` asks (order of effects
    /// in the module doc); fails with the first volume that failed.
    pub async fn mount_all(&self, lifecycle: &str, volumes: &[VolumeMount]) -> Result<(), VolumeError> {
        let volumes = volumes.iter().map(validate).collect::<Result<Vec<_>, _>>()?;
        let _one_pass = self.mounting.lock().await;
        let wanted: Vec<(PathBuf, &str)> = volumes
            .into_iter()
            .filter(|(path, _)| self.mounted_for(path).as_deref() != Some(lifecycle) || mount_at(path).is_none())
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let _pending = self.mark_pending(wanted.iter().map(|(path, _)| path.clone()).collect());
        let passes = wanted.iter().map(|(path, target)| async move {
            remount(path, target).await?;
            self.record(path, lifecycle);
            Ok::<(), VolumeError>(())
        });
        let all = futures_util::future::join_all(passes);
        let results =
            tokio::time::timeout(MOUNT_TIMEOUT, all).await.map_err(|_| VolumeError::TimedOut(MOUNT_TIMEOUT))?;
        results.into_iter().collect()
    }

    /// After a cold boot (or a restart of envd): mounts the saved volumes
    /// again, in the background, with retries for the volume wait.
    /// Commands wait for them from the moment this returns.
    pub fn restore(self: &Arc<Self>, lifecycle: String, volumes: Vec<VolumeMount>) {
        let volumes: Vec<(PathBuf, String)> = volumes
            .iter()
            .filter_map(|volume| match validate(volume) {
                Ok((path, target)) => Some((path, target.to_owned())),
                Err(err) => {
                    tracing::warn!("not restoring a saved volume: {err}");
                    None
                }
            })
            .collect();
        if volumes.is_empty() {
            return;
        }
        // Pending from now on, before any command can arrive.
        let paths: Vec<PathBuf> = volumes.iter().map(|(path, _)| path.clone()).collect();
        self.add_pending(&paths);
        let this = self.clone();
        tokio::spawn(async move {
            let pending = PendingGuard { volumes: &this, paths };
            let _one_pass = this.mounting.lock().await;
            let deadline = Instant::now() + this.wait;
            let passes = volumes.iter().map(|(path, target)| this.restore_one(path, target, &lifecycle, deadline));
            futures_util::future::join_all(passes).await;
            drop(pending);
        });
    }

    async fn restore_one(&self, path: &Path, target: &str, lifecycle: &str, deadline: Instant) {
        if mount_at(path).is_some_and(|mount| mount.source == target && mount.fstype.starts_with("nfs")) {
            // envd restarted while the VM kept running: the mount is live.
            self.record(path, lifecycle);
            return;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, remount(path, target)).await {
                Ok(Ok(())) => {
                    tracing::info!(path = %path.display(), "volume mounted again after start");
                    self.record(path, lifecycle);
                    return;
                }
                Ok(Err(err)) if Instant::now() + RETRY_PAUSE < deadline => {
                    tracing::debug!("restoring a volume, will retry: {err}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(err)) => return tracing::error!("restoring a volume failed: {err}"),
                Err(_) => return tracing::error!(path = %path.display(), "restoring a volume timed out"),
            }
        }
    }

    /// Waits, bounded, until no volume is pending (`path` `None`), or none
    /// that `path` lies under. Free when nothing is pending.
    pub async fn wait_ready(&self, path: Option<&Path>) {
        let blocks = |pending: &Arc<Vec<PathBuf>>| match path {
            None => !pending.is_empty(),
            Some(path) => pending.iter().any(|volume| path.starts_with(volume)),
        };
        if !blocks(&self.pending.borrow()) {
            return;
        }
        let mut pending = self.pending.subscribe();
        if tokio::time::timeout(self.wait, pending.wait_for(|p| !blocks(p))).await.is_err() {
            tracing::warn!("volumes still not mounted after {:?}: running without them", self.wait);
        }
    }

    fn mounted_for(&self, path: &Path) -> Option<String> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).get(path).cloned()
    }

    fn record(&self, path: &Path, lifecycle: &str) {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_owned(), lifecycle.to_owned());
    }

    fn forget(&self, path: &Path) {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
    }

    /// Marks `paths` pending until the returned guard is dropped.
    fn mark_pending(&self, paths: Vec<PathBuf>) -> PendingGuard<'_> {
        self.add_pending(&paths);
        PendingGuard { volumes: self, paths }
    }

    fn add_pending(&self, paths: &[PathBuf]) {
        self.pending.send_modify(|pending| {
            let mut all = pending.as_ref().clone();
            all.extend(paths.iter().cloned());
            *pending = Arc::new(all);
        });
    }
}

/// Clears its paths from the pending set, however the pass ended.
struct PendingGuard<'a> {
    volumes: &'a Volumes,
    paths: Vec<PathBuf>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        for path in &self.paths {
            // A path that failed to mount is no longer known to be mounted.
            if mount_at(path).is_none() {
                self.volumes.forget(path);
            }
        }
        self.volumes.pending.send_modify(|pending| {
            let mut rest = pending.as_ref().clone();
            for path in &self.paths {
                if let Some(at) = rest.iter().position(|p| p == path) {
                    rest.remove(at);
                }
            }
            *pending = Arc::new(rest);
        });
    }
}

/// A mount path must be absolute and plain; the target must not read as
/// an option to `mount`.
fn validate(volume: &VolumeMount) -> Result<(PathBuf, &str), VolumeError> {
    let invalid = |reason| VolumeError::Invalid { path: volume.path.clone(), reason };
    let path = Path::new(&volume.path);
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(invalid("the path must be absolute, without . or .."));
    }
    if path.parent().is_none() {
        return Err(invalid("the root directory cannot be a volume"));
    }
    if volume.nfs_target.is_empty() || volume.nfs_target.starts_with('-') || !volume.nfs_target.contains(':') {
        return Err(invalid("the NFS target must be host:/export"));
    }
    let normal: PathBuf = path.components().collect();
    Ok((normal, volume.nfs_target.as_str()))
}

/// Steps 2 and 3 of the module doc for one volume.
async fn remount(path: &Path, target: &str) -> Result<(), VolumeError> {
    if let Some(stale) = mount_at(path) {
        tracing::info!(path = %path.display(), source = %stale.source, "unmounting what is mounted at a volume path");
        unmount(path).await?;
    }
    let command_error =
        |action, output: String| VolumeError::Command { action, path: path.display().to_string(), output };
    tokio::fs::create_dir_all(path).await.map_err(|e| command_error("create the mount point for", e.to_string()))?;
    let mut mount = Command::new("mount");
    mount.args(["-v", "-t", "nfs", "-o", NFS_OPTIONS, target]).arg(path);
    run(mount).await.map_err(|failure| command_error("mount", failure.to_string()))
}

async fn unmount(path: &Path) -> Result<(), VolumeError> {
    let mut forced = Command::new("umount");
    forced.arg("--force").arg(path);
    let Err(output) = run(forced).await else { return Ok(()) };
    tracing::warn!(path = %path.display(), "forced unmount failed, unmounting lazily: {output}");
    let mut lazy = Command::new("umount");
    lazy.arg("--lazy").arg(path);
    let unmounted = tokio::time::timeout(LAZY_UNMOUNT_TIMEOUT, run(lazy)).await.unwrap_or(Err(ToolFailure::TimedOut));
    unmounted.map_err(|failure| VolumeError::Command {
        action: "unmount",
        path: path.display().to_string(),
        output: failure.to_string(),
    })
}

/// Why a system tool did not do its work.
#[derive(Debug, thiserror::Error)]
pub enum ToolFailure {
    /// It could not be started.
    #[error("{0}")]
    Start(#[from] std::io::Error),
    /// It ran and failed: what it printed, else its exit status.
    #[error("{0}")]
    Failed(String),
    /// It did not end in time and was killed.
    #[error("timed out")]
    TimedOut,
}

/// Runs a system tool. Killed when the caller gives up on it.
async fn run(mut command: Command) -> Result<(), ToolFailure> {
    command.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let output = command.output().await?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(ToolFailure::Failed(if text.is_empty() { output.status.to_string() } else { text }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(target: &str, path: &str) -> VolumeMount {
        VolumeMount { nfs_target: target.into(), path: path.into() }
    }

    #[test]
    fn paths_and_targets_are_checked() {
        for bad in [volume("h:/x", "rel"), volume("h:/x", "/a/../b"), volume("h:/x", "/"), volume("-o:/x", "/v")] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
        assert!(validate(&volume("h", "/v")).is_err());
        assert_eq!(validate(&volume("10.0.0.1:/vol", "/mnt/data/")).unwrap().0, PathBuf::from("/mnt/data"));
    }

    /// Far beyond any wait that should end, well inside the test's patience.
    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn nothing_pending_means_no_wait() {
        let volumes = Volumes::default();
        let ready = tokio::time::timeout(BOUND, volumes.wait_ready(None)).await;
        assert!(ready.is_ok(), "nothing is pending: no wait");
        let _guard = volumes.mark_pending(vec![PathBuf::from("/mnt/v")]);
        let ready = tokio::time::timeout(BOUND, volumes.wait_ready(Some(Path::new("/home/user")))).await;
        assert!(ready.is_ok(), "a path outside the pending volume does not wait for it");
    }

    #[tokio::test]
    async fn a_path_under_a_pending_volume_waits_until_the_guard_drops() {
        let volumes = Volumes::new(BOUND * 3);
        let guard = volumes.mark_pending(vec![PathBuf::from("/mnt/v")]);
        let under = volumes.wait_ready(Some(Path::new("/mnt/v/file")));
        let any = volumes.wait_ready(None);
        tokio::pin!(under, any);
        let still = tokio::time::timeout(Duration::from_millis(300), async { tokio::join!(&mut under, &mut any) });
        assert!(still.await.is_err(), "a path under the pending volume, and any path, wait while it is pending");
        drop(guard);
        let ready = tokio::time::timeout(BOUND, async { tokio::join!(under, any) }).await;
        assert!(ready.is_ok(), "both waits end once the guard drops");
    }
}
