//! Freezing and thawing the workload (`/freeze`, `/unfreeze`, the thaw in
//! `/init`, the live upgrade), one at a time behind one lock.
//!
//! Order of effects of a freeze: take the lock (a caller that cannot have
//! it within its own wait budget gets [`FreezeBusy`], answered 503); unless
//! a freeze of ours is already in effect, record every cgroup the guest has
//! frozen itself (so no thaw ever undoes the guest's own `docker pause`; a
//! second freeze in the same window must not rescan, or it would record our
//! own freezes as the guest's); write `1` to `user` and `ptys`, and in
//! hierarchy mode to every other cgroup that neither holds envd nor is on
//! the allowlist (descending into their ancestors instead of freezing them,
//! since freezing a parent freezes its children); wait for the kernel to
//! confirm within the budget; arm the watchdog, which thaws after
//! [`WATCHDOG`] if no thaw came (a sandbox whose `/init` never arrived
//! would otherwise stay stopped for good).
//!
//! A thaw takes the same lock, disarms the watchdog, writes `0` to `user`
//! and `ptys` and, after a hierarchy freeze, to every cgroup whose own
//! `cgroup.freeze` reads `1` except the guest's: it discovers rather than
//! remembers, so it undoes a freeze made by an earlier envd image as well.
//! `/init` audits the frozen set before it thaws (`X-Envd-Freeze-Audit`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::OwnedMutexGuard;

use super::cgroup_tree::{ALLOWLIST, MAX_CGROUPS_CEILING, allowlisted, children, reads_frozen, walk};
use super::cgroups::{Workload, is_frozen, own_cgroup};
pub use super::freeze_state::{FreezeMode, FreezeRecord, Freezing, WATCHDOG};

/// The workload's part of the upgrade handover (its `freeze` and
/// `nextCommandCgroup` sections).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPart {
    /// The workload freeze in effect.
    #[serde(default)]
    pub freeze: FreezeRecord,
    /// The number in the next command cgroup's name.
    #[serde(default)]
    pub next_command_cgroup: u64,
}

/// A cgroup of the workload that could not be thawed (the first such
/// write's error; the others were still tried).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ThawError(#[from] std::io::Error);

/// How often `cgroup.events` is polled while waiting for a freeze.
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Default and ceiling of cgroups visited by a hierarchy freeze.
const DEFAULT_MAX_CGROUPS: usize = 512;
/// Another freeze held the lock for longer than the caller would wait.
#[derive(Debug, thiserror::Error)]
#[error("another freeze or thaw is in progress")]
pub struct FreezeBusy;

/// The answer to a freeze with a wait budget.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FreezeReport {
    /// legacy or hierarchy.
    pub mode: Option<FreezeMode>,
    /// Cgroups looked at.
    pub visited: usize,
    /// Skipped as the guest's plumbing.
    pub allowlisted: usize,
    /// The walk stopped at `maxCgroups`.
    pub truncated: bool,
    /// Already frozen by the guest itself; left frozen on thaw.
    pub pre_frozen: usize,
    /// Freezes written.
    pub requested: usize,
    /// Reported frozen within the budget.
    pub frozen: usize,
    /// Not frozen within the budget.
    pub not_frozen: usize,
    /// Writes that failed.
    pub failed: usize,
    /// Without cgroup support, nothing can be observed.
    pub unobservable: usize,
    /// Time spent writing.
    pub sweep_ms: u64,
    /// Time spent waiting.
    pub wait_ms: u64,
}

/// What the frozen set looked like at `/init`, before the thaw.
#[derive(Debug, Default, Clone, Serialize)]
pub struct FreezeAudit {
    /// Cgroups examined.
    pub visited: usize,
    /// Effectively frozen (by a write or through an ancestor).
    pub frozen: usize,
    /// The sweep's business, yet running (created after it, or missed).
    pub escaped: usize,
    /// Frozen although allowlisted, above an allowlisted cgroup, or holding
    /// envd: a bug.
    pub violations: usize,
    /// The walk hit its bound: every count is a floor.
    pub truncated: bool,
}

/// Holds off every other freeze and thaw while it lives (the upgrade).
pub type FreezeHold = OwnedMutexGuard<()>;

impl Workload {
    /// Freezes the workload; with a budget, waits until the kernel reports
    /// every written cgroup frozen. The lock is awaited for the budget only.
    pub async fn freeze(
        self: &Arc<Self>,
        mode: FreezeMode,
        max_cgroups: i64,
        wait: Option<Duration>,
    ) -> Result<FreezeReport, FreezeBusy> {
        let (_hold, report) = self.freeze_and_hold(mode, max_cgroups, wait).await?;
        Ok(report)
    }

    /// As [`Workload::freeze`], keeping the lock so nothing thaws until the
    /// returned hold is dropped.
    pub async fn freeze_and_hold(
        self: &Arc<Self>,
        mode: FreezeMode,
        max_cgroups: i64,
        wait: Option<Duration>,
    ) -> Result<(FreezeHold, FreezeReport), FreezeBusy> {
        let hold = self.lock_freezing(wait).await?;
        let report = self.freeze_held(&hold, mode, max_cgroups, wait).await;
        Ok((hold, report))
    }

    /// Takes the freeze lock, waiting at most `wait` (not at all if none).
    pub async fn lock_freezing(&self, wait: Option<Duration>) -> Result<FreezeHold, FreezeBusy> {
        let lock = self.freezing.lock.clone();
        match wait {
            Some(budget) => tokio::time::timeout(budget, lock.lock_owned()).await.map_err(|_| FreezeBusy),
            None => lock.try_lock_owned().map_err(|_| FreezeBusy),
        }
    }

    /// Freezes under a lock already held.
    pub async fn freeze_held(
        self: &Arc<Self>,
        _hold: &FreezeHold,
        mode: FreezeMode,
        max_cgroups: i64,
        wait: Option<Duration>,
    ) -> FreezeReport {
        let report = self.freeze_locked(mode, max_cgroups, wait).await;
        if report.requested > 0 {
            self.arm_watchdog();
        }
        report
    }

    /// Thaws under a lock already held.
    pub fn thaw_held(&self, _hold: &FreezeHold) -> std::io::Result<()> {
        self.thaw_locked()
    }

    async fn freeze_locked(&self, mode: FreezeMode, max_cgroups: i64, wait: Option<Duration>) -> FreezeReport {
        let mut report = FreezeReport { mode: Some(mode), ..Default::default() };
        if !self.enabled() {
            report.unobservable = 1;
            return report;
        }
        let sweep = Instant::now();
        let in_effect = self.freezing.record().active || self.own_groups().iter().any(|dir| reads_frozen(dir));
        if !in_effect {
            let (guest_frozen, truncated) = self.scan_guest_frozen();
            report.truncated |= truncated;
            self.freezing.record().guest_frozen = guest_frozen;
        }
        let mut targets = self.own_groups();
        if mode == FreezeMode::Hierarchy {
            targets.extend(self.hierarchy_targets(max_cgroups, &mut report));
        }
        report.pre_frozen = self.freezing.record().guest_frozen.len();
        let mut written = Vec::new();
        for dir in targets {
            match std::fs::write(dir.join("cgroup.freeze"), "1") {
                Ok(()) => written.push(dir),
                Err(_) => report.failed += 1,
            }
        }
        report.requested = written.len();
        report.sweep_ms = sweep.elapsed().as_millis() as u64;
        {
            let mut record = self.freezing.record();
            record.active |= report.requested > 0;
            if report.requested > 0 && record.mode != Some(FreezeMode::Hierarchy) {
                record.mode = Some(mode);
            }
        }
        if let Some(budget) = wait {
            await_frozen(written, budget, &mut report).await;
        }
        report
    }

    /// Thaws the workload; waits for a freeze in progress to finish.
    pub async fn thaw(&self) -> Result<(), ThawError> {
        let _hold = self.freezing.lock.lock().await;
        Ok(self.thaw_locked()?)
    }

    fn thaw_locked(&self) -> std::io::Result<()> {
        self.freezing.generation.fetch_add(1, Ordering::SeqCst);
        let record = {
            let mut record = self.freezing.record();
            let guest_frozen = record.guest_frozen.clone();
            std::mem::replace(&mut *record, FreezeRecord { guest_frozen, ..Default::default() })
        };
        let mut first_error = None;
        for dir in self.own_groups() {
            if let Err(err) = std::fs::write(dir.join("cgroup.freeze"), "0") {
                first_error.get_or_insert(err);
            }
        }
        if record.active && record.mode == Some(FreezeMode::Hierarchy) {
            for dir in walk(self.root(), MAX_CGROUPS_CEILING).0 {
                let relative = dir.strip_prefix(self.root()).unwrap_or(&dir);
                if reads_frozen(&dir)
                    && !record.guest_frozen.contains(relative)
                    && let Err(err) = std::fs::write(dir.join("cgroup.freeze"), "0")
                {
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Starts the watchdog of the freeze just made.
    fn arm_watchdog(self: &Arc<Self>) {
        let generation = self.freezing.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let workload = Arc::downgrade(self);
        let window = self.freezing.watchdog;
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let Some(workload) = workload.upgrade() else { return };
            let _hold = workload.freezing.lock.lock().await;
            if workload.freezing.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            let outcome = workload.thaw_locked();
            tracing::warn!(
                window_secs = window.as_secs(),
                ok = outcome.is_ok(),
                "no thaw followed the workload freeze: the watchdog thawed it"
            );
        });
    }

    /// The audit of the frozen set after a hierarchy freeze of ours (none
    /// otherwise: a legacy freeze leaves the rest running by design).
    pub fn audit(&self) -> Option<FreezeAudit> {
        let record = self.freezing.record().clone();
        if !record.active || record.mode != Some(FreezeMode::Hierarchy) {
            return None;
        }
        let own = own_cgroup(self.root());
        let (dirs, truncated) = walk(self.root(), MAX_CGROUPS_CEILING);
        let mut audit = FreezeAudit { truncated, ..Default::default() };
        for dir in dirs {
            audit.visited += 1;
            let relative = dir.strip_prefix(self.root()).unwrap_or(&dir);
            let protected = allowlisted(relative)
                || ALLOWLIST.iter().any(|entry| Path::new(entry).starts_with(relative))
                || own.as_ref().is_some_and(|own| own.starts_with(&dir));
            match (is_frozen(&dir), protected) {
                (true, true) => audit.violations += 1,
                (true, false) => audit.frozen += 1,
                (false, false) => audit.escaped += 1,
                (false, true) => {}
            }
        }
        Some(audit)
    }

    /// What an upgraded envd needs to thaw this freeze correctly.
    pub fn freeze_record(&self) -> FreezeRecord {
        self.freezing.record().clone()
    }

    /// The workload's part of the upgrade handover.
    pub fn export(&self) -> WorkloadPart {
        WorkloadPart { freeze: self.freeze_record(), next_command_cgroup: self.next_command_cgroup() }
    }

    /// Takes over the freeze in effect and the command-cgroup numbering of
    /// the envd image before an upgrade.
    pub fn resume(self: &Arc<Self>, part: WorkloadPart) {
        let WorkloadPart { freeze, next_command_cgroup } = part;
        self.continue_command_cgroups_from(next_command_cgroup);
        let active = freeze.active;
        *self.freezing.record() = freeze;
        if active {
            self.arm_watchdog();
        }
    }

    /// Cgroups the guest froze itself, relative to the root.
    fn scan_guest_frozen(&self) -> (BTreeSet<PathBuf>, bool) {
        let own_groups = self.own_groups();
        let (dirs, truncated) = walk(self.root(), MAX_CGROUPS_CEILING);
        let frozen = dirs
            .into_iter()
            .filter(|dir| !own_groups.contains(dir) && reads_frozen(dir))
            .filter_map(|dir| dir.strip_prefix(self.root()).ok().map(Path::to_path_buf))
            .collect();
        (frozen, truncated)
    }

    /// Cgroups not on envd's own ancestry nor the allowlist's (descending
    /// into those instead), minus the allowlist and the guest's freezes.
    fn hierarchy_targets(&self, max_cgroups: i64, report: &mut FreezeReport) -> Vec<PathBuf> {
        let limit = usize::try_from(max_cgroups)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_CGROUPS)
            .min(MAX_CGROUPS_CEILING);
        let own = own_cgroup(self.root());
        let own_groups = self.own_groups();
        let guest_frozen = self.freezing.record().guest_frozen.clone();
        let mut targets = Vec::new();
        let mut queue = vec![self.root().to_path_buf()];
        while let Some(dir) = queue.pop() {
            for child in children(&dir) {
                if report.visited >= limit {
                    report.truncated = true;
                    return targets;
                }
                report.visited += 1;
                let relative = child.strip_prefix(self.root()).unwrap_or(&child).to_path_buf();
                if own_groups.contains(&child) || guest_frozen.contains(&relative) {
                    continue;
                }
                if ALLOWLIST.iter().any(|entry| Path::new(entry) == relative) {
                    report.allowlisted += 1;
                } else if own.as_ref().is_some_and(|own| own.starts_with(&child))
                    || ALLOWLIST.iter().any(|entry| Path::new(entry).starts_with(&relative))
                {
                    queue.push(child);
                } else {
                    targets.push(child);
                }
            }
        }
        targets
    }
}

async fn await_frozen(written: Vec<PathBuf>, budget: Duration, report: &mut FreezeReport) {
    let waiting = Instant::now();
    let mut pending = written;
    while !pending.is_empty() && waiting.elapsed() < budget {
        pending.retain(|dir| !is_frozen(dir));
        if !pending.is_empty() {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    report.not_frozen = pending.len();
    report.frozen = report.requested - report.not_frozen;
    report.wait_ms = waiting.elapsed().as_millis() as u64;
}

#[cfg(test)]
mod handover_tests {
    use super::*;

    #[tokio::test]
    async fn the_freeze_and_the_cgroup_numbering_survive_export_serialise_and_resume() {
        let workload = Arc::new(Workload::default());
        let populated = WorkloadPart {
            freeze: FreezeRecord {
                active: true,
                mode: Some(FreezeMode::Hierarchy),
                guest_frozen: [PathBuf::from("user.slice/app")].into(),
            },
            next_command_cgroup: 7,
        };
        workload.resume(populated.clone());
        let part = workload.export();
        assert_eq!(part, populated);
        let read_back: WorkloadPart = serde_json::from_str(&serde_json::to_string(&part).unwrap()).unwrap();
        assert_eq!(read_back, part, "serialising loses nothing");
        let next = Arc::new(Workload::default());
        next.resume(read_back);
        assert_eq!(next.export(), part, "resuming loses nothing");
    }
}
