//! Holding every process task still: the output pumps, the reapers and
//! starts. While paused, output stays in the kernel (pipes, terminals),
//! exits stay unreaped, and starts wait, so that the table, the fds and
//! the children describe one consistent moment.
//!
//! Each task does its work in steps, each step under a read guard; a step
//! that would wait (a read, a wait for exit) also watches the pause flag
//! and gives its guard back when it is raised, losing nothing (tokio reads
//! and waits are cancel-safe). [`Gate::pause`] raises the flag, then takes
//! the write side, which it gets once every step in progress has ended;
//! the lock is fair, so no new step starts meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, watch};

/// The pause switch of one process table.
#[derive(Debug)]
pub struct Gate {
    lock: Arc<RwLock<()>>,
    paused: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self { lock: Default::default(), paused: Arc::new(watch::channel(false).0) }
    }
}

/// Process tasks stay still while this lives.
#[derive(Debug)]
pub struct Paused {
    _write: OwnedRwLockWriteGuard<()>,
    paused: Arc<watch::Sender<bool>>,
}

impl Drop for Paused {
    fn drop(&mut self) {
        // Lowered before the write guard goes, so steps that start then run.
        self.paused.send_replace(false);
    }
}

/// The step ran out: none of the tasks is past it any more.
#[derive(Debug, thiserror::Error)]
#[error("process tasks did not pause within {0:?}")]
pub struct PauseTimeout(pub Duration);

impl Gate {
    /// One step of work; waits while paused.
    pub(super) async fn step(&self) -> OwnedRwLockReadGuard<()> {
        self.lock.clone().read_owned().await
    }

    /// Resolves once a pause is asked for.
    pub(super) async fn pause_requested(&self) {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| *p).await;
    }

    /// Pauses every task, waiting at most `within` for steps in progress.
    pub async fn pause(&self, within: Duration) -> Result<Paused, PauseTimeout> {
        self.paused.send_replace(true);
        match tokio::time::timeout(within, self.lock.clone().write_owned()).await {
            Ok(write) => Ok(Paused { _write: write, paused: self.paused.clone() }),
            Err(_) => {
                self.paused.send_replace(false);
                Err(PauseTimeout(within))
            }
        }
    }
}
