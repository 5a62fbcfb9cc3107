//! The filesystem half of the pause hook: `sync`, then FIFREEZE, so that a
//! disk-only snapshot holds every acknowledged write; FITHAW on rollback.
//!
//! While frozen, every write to that filesystem blocks, envd's included.
//! Writers inside envd (the state file) go through [`FsFreezer::while_writable`],
//! which defers them instead. A freeze nobody thaws (and no power-off
//! follows) is undone after a deadline, so a lost host cannot hang the VM.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};

/// `_IOWR('X', 119, int)`: flush and block writes.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`: let writes through again.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Why freezing or thawing failed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// `--dev` without `--freeze-path`: freezing the root of a development
    /// machine would hang it.
    #[error("filesystem freeze is disabled in --dev mode; pass --freeze-path to freeze a test mount")]
    Disabled,
    /// The ioctl or the sync failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// FIFREEZE, FITHAW or open.
        operation: &'static str,
        /// The mount point.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct State {
    frozen: bool,
    /// Counts freezes, so a deadline timer of an older freeze does nothing.
    generation: u64,
}

/// Freezes and thaws one mounted filesystem.
#[derive(Debug)]
pub struct FsFreezer {
    target: Option<PathBuf>,
    deadline: Duration,
    state: Mutex<State>,
    thawed: watch::Sender<u64>,
}

impl FsFreezer {
    /// A freezer of `target` (none: refuse), thawing itself after `deadline`.
    pub fn new(target: Option<PathBuf>, deadline: Duration) -> Arc<Self> {
        Arc::new(Self { target, deadline, state: Mutex::default(), thawed: watch::channel(0).0 })
    }

    /// Fires after every thaw, for writers that deferred their work.
    pub fn thaws(&self) -> watch::Receiver<u64> {
        self.thawed.subscribe()
    }

    /// Syncs and freezes; freezing a frozen filesystem is success.
    pub async fn freeze(self: &Arc<Self>) -> Result<(), FreezeError> {
        let target = self.target.clone().ok_or(FreezeError::Disabled)?;
        let mut state = self.state.lock().await;
        let path = target.clone();
        tokio::task::spawn_blocking(move || ioctl(&path, FIFREEZE, "FIFREEZE", libc::EBUSY)).await.map_err(|e| {
            FreezeError::Io { operation: "FIFREEZE", path: target.clone(), source: std::io::Error::other(e) }
        })??;
        state.frozen = true;
        state.generation += 1;
        let generation = state.generation;
        let freezer = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(freezer.deadline).await;
            freezer.thaw_if_still(generation).await;
        });
        Ok(())
    }

    /// Thaws; thawing a filesystem that is not frozen is success. Runs to
    /// the end even if the caller goes away.
    pub async fn thaw(self: &Arc<Self>) -> Result<(), FreezeError> {
        let freezer = self.clone();
        let outcome = tokio::spawn(async move { freezer.thaw_locked(&mut *freezer.state.lock().await).await }).await;
        outcome.unwrap_or_else(|e| {
            Err(FreezeError::Io {
                operation: "FITHAW",
                path: self.target.clone().unwrap_or_default(),
                source: std::io::Error::other(e),
            })
        })
    }

    async fn thaw_if_still(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state.frozen && state.generation == generation {
            tracing::warn!(
                deadline_secs = self.deadline.as_secs(),
                "filesystem still frozen at the deadline: thawing it"
            );
            if let Err(err) = self.thaw_locked(&mut state).await {
                tracing::error!("deadline thaw failed: {err}");
            }
        }
    }

    async fn thaw_locked(&self, state: &mut State) -> Result<(), FreezeError> {
        let Some(target) = self.target.clone() else { return Ok(()) };
        let path = target.clone();
        tokio::task::spawn_blocking(move || ioctl(&path, FITHAW, "FITHAW", libc::EINVAL))
            .await
            .map_err(|e| FreezeError::Io { operation: "FITHAW", path: target, source: std::io::Error::other(e) })??;
        state.frozen = false;
        self.thawed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Whether the filesystem is frozen right now.
    pub async fn is_frozen(&self) -> bool {
        self.state.lock().await.frozen
    }

    /// Runs a blocking write unless the filesystem is frozen; a freeze
    /// waits for a write already running. `None`: frozen, not run.
    pub async fn while_writable<T: Send + 'static>(&self, write: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let state = self.state.lock().await;
        if state.frozen {
            return None;
        }
        let result = tokio::task::spawn_blocking(write).await.ok();
        drop(state);
        result
    }
}

/// Opens the mount point, syncs it (for a freeze) and issues `request`;
/// `benign` is the errno that means "already in that state".
fn ioctl(
    path: &std::path::Path,
    request: libc::c_ulong,
    operation: &'static str,
    benign: i32,
) -> Result<(), FreezeError> {
    let io = |source| FreezeError::Io { operation, path: path.to_owned(), source };
    let dir = std::fs::File::open(path).map_err(io)?;
    if request == FIFREEZE {
        // SAFETY: syncfs on an fd we own.
        unsafe { libc::syncfs(dir.as_raw_fd()) };
    }
    // SAFETY: FIFREEZE/FITHAW take an int argument that the kernel ignores;
    // the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(benign) {
            return Err(io(err));
        }
    }
    Ok(())
}
