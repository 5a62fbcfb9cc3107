//! envd as the child subreaper of everything it starts: a process whose
//! parent dies is re-parented to envd rather than to init, and envd reaps
//! it at once. So a killed command leaves no zombie behind for init to
//! collect at its own pace, and "gone" after a kill means gone.
//!
//! envd's own children (the commands it spawned) are reaped by tokio, one
//! `waitpid(pid)` each; reaping one of those here would steal its exit
//! status. So every spawn registers its pid while holding the same lock the
//! reaper takes, and the reaper waits only for children not registered:
//! a child that exits before its pid is registered is still safe, because
//! the reaper cannot run in between. Helpers envd runs for itself (`mount`
//! for volumes, say) are waited for by their own callers: they stay in
//! envd's session, while every command starts a session of its own, so the
//! reaper leaves children of envd's own session alone.

use std::collections::HashSet;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// envd's own children, and the orphans it adopted.
#[derive(Debug, Default)]
pub struct Children {
    own: Mutex<HashSet<u32>>,
}

/// Held across a spawn: the reaper waits until the pid is registered.
#[derive(Debug)]
pub(super) struct SpawnGuard<'a>(MutexGuard<'a, HashSet<u32>>);

impl SpawnGuard<'_> {
    /// Marks `pid` as reaped by its own waiter, not by the orphan reaper.
    pub(super) fn register(mut self, pid: u32) {
        self.0.insert(pid);
    }
}

impl Children {
    fn own(&self) -> MutexGuard<'_, HashSet<u32>> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken before forking a child whose pid is then registered.
    pub(super) fn spawning(&self) -> SpawnGuard<'_> {
        SpawnGuard(self.own())
    }

    /// Called once the child's own waiter reaped it: the pid may now be
    /// reused by anyone.
    pub(super) fn forget(&self, pid: u32) {
        self.own().remove(&pid);
    }

    /// Reaps every adopted orphan that has exited.
    pub fn reap_orphans(&self) {
        let own = self.own();
        // SAFETY: getsid(0) has no preconditions.
        let envds_session = u32::try_from(unsafe { libc::getsid(0) }).ok();
        for pid in child_pids() {
            if own.contains(&pid) || super::tree::session_of(pid) == envds_session {
                continue;
            }
            let Ok(pid) = i32::try_from(pid) else { continue };
            let mut status = 0;
            // SAFETY: waitpid on one child of ours with WNOHANG; `status` is
            // a valid out pointer. A child still running returns 0.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }

    /// Reaps orphans whenever a child changes state, for as long as envd runs.
    pub async fn reap_forever(self: std::sync::Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!("orphaned processes are not reaped: {err}");
                return;
            }
        };
        // Orphans that ended before the handler was installed.
        self.reap_orphans();
        while sigchld.recv().await.is_some() {
            self.reap_orphans();
        }
    }
}

/// Makes envd the subreaper of its descendants.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// envd's children: from `/proc/self/task/*/children` (orphans are adopted
/// by whichever thread), or by scanning every process's parent where that
/// file does not exist.
fn child_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                listed = true;
                pids.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    if listed {
        return pids;
    }
    let me = std::process::id();
    super::tree::scan_proc().into_iter().filter(|p| p.ppid == me).map(|p| p.pid).collect()
}
