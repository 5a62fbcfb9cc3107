//! `SendSignal`: the signal reaches every process a command started, and
//! the answer comes once they are gone, or once the wait is over.
//!
//! Order, and why:
//! 1. signal the tree (its cgroup, or the `/proc` walk) and the process
//!    itself, remembering which processes were there;
//! 2. wait, polling, until the process itself is reaped (its pid is free),
//!    every remembered process is gone, zombies included (orphans are
//!    reaped by envd as their subreaper), and the cgroup is empty;
//! 3. answer with whatever is still there when the wait ends: a tree that
//!    ignores SIGTERM is reported, never waited on past the bound.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::table::{ProcessTable, Selector};
use super::{ProcessError, ProcessHandle};

/// How often the wait looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// What a kill left behind.
#[derive(Debug, Default)]
pub struct KillReport {
    /// Pids still there when the wait ended (empty: all gone).
    pub survivors: Vec<u32>,
    /// The cgroup still had members the snapshot did not show.
    pub cgroup_populated: bool,
}

impl KillReport {
    /// Whether everything the command started is gone.
    pub fn all_gone(&self) -> bool {
        self.survivors.is_empty() && !self.cgroup_populated
    }
}

/// Sends `signal` to the selected command's processes and waits up to
/// `within` for them to be gone.
pub async fn kill(
    table: &ProcessTable,
    selector: &Selector,
    signal: Signal,
    within: Duration,
) -> Result<KillReport, ProcessError> {
    let handle = table.get(selector)?;
    let deadline = Instant::now() + within;
    let members = handle.signal(signal).await?;
    loop {
        table.children().reap_orphans();
        let report = survivors(&handle, &members);
        if report.all_gone() || Instant::now() >= deadline {
            return Ok(report);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn survivors(handle: &ProcessHandle, members: &[super::tree::Member]) -> KillReport {
    let mut survivors: Vec<u32> = members.iter().filter(|m| m.exists()).map(|m| m.pid()).collect();
    if !handle.is_reaped() && !survivors.contains(&handle.pid()) {
        survivors.push(handle.pid());
    }
    KillReport { survivors, cgroup_populated: handle.tree().is_populated() }
}
