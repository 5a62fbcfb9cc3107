//! The state of the workload's freezing, kept apart from the cgroups it
//! acts on so that `cgroups` (which holds it) and `workload_freeze` (which
//! drives it) do not depend on each other: the lock that makes freezes
//! and thaws one at a time, the record a thaw and an upgraded envd read,
//! the watchdog's window.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A freeze nobody thaws is undone after this long (guest time, which
/// stands still while the VM is paused).
pub const WATCHDOG: Duration = Duration::from_secs(600);

/// How much to freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeMode {
    /// `user` and `ptys` only.
    Legacy,
    /// Also every other cgroup that does not hold envd.
    Hierarchy,
}

/// What a freeze leaves behind for the thaw, and for an upgraded envd.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRecord {
    /// A freeze of ours is in effect.
    pub active: bool,
    /// The mode of the freeze in effect.
    pub mode: Option<FreezeMode>,
    /// Cgroups the guest froze itself, relative to the cgroup root.
    pub guest_frozen: BTreeSet<PathBuf>,
}

/// The lock, the record and the watchdog of one workload.
#[derive(Debug)]
pub struct Freezing {
    pub(super) lock: Arc<tokio::sync::Mutex<()>>,
    record: std::sync::Mutex<FreezeRecord>,
    pub(super) watchdog: Duration,
    /// The armed watchdog; any freeze or thaw moves it on, so a timer that
    /// fires late for an earlier freeze does nothing.
    pub(super) generation: AtomicU64,
}

impl Default for Freezing {
    fn default() -> Self {
        Self { lock: Default::default(), record: Default::default(), watchdog: WATCHDOG, generation: AtomicU64::new(0) }
    }
}

impl Freezing {
    /// With a watchdog window other than [`WATCHDOG`].
    pub fn with_watchdog(watchdog: Duration) -> Self {
        Self { watchdog, ..Default::default() }
    }

    pub(super) fn record(&self) -> std::sync::MutexGuard<'_, FreezeRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}
