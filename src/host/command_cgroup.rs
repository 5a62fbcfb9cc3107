//! One cgroup per command, below the workload's `user` or `ptys`: it holds
//! exactly the processes the command started, whatever sessions, process
//! groups or double forks they made for themselves, so it is the set a kill
//! signals. Leaving it takes write access to another cgroup's
//! `cgroup.procs`, which only root has.
//!
//! Order of effects, and why:
//! 1. before the fork: `mkdir <slot>/cmd-<n>` and open its `cgroup.procs`;
//!    the child writes itself into it before exec, so nothing the command
//!    starts is ever born outside;
//! 2. on SIGKILL: `cgroup.kill`, which the kernel applies to every member,
//!    forks racing with the write included (kernels before 5.14: a
//!    freeze-signal-thaw as below);
//! 3. on any other signal: freeze the cgroup, so no member forks between
//!    reading `cgroup.procs` and signalling, signal each member, SIGCONT so
//!    stopped members act on it, thaw;
//! 4. once `cgroup.events` says `populated 0`: `rmdir` (when the last
//!    reference is dropped, so a command that never started leaves nothing).
//!
//! The slot cgroups hold no process of their own: the no-internal-process
//! rule holds even if controllers are enabled below them, and a freeze of a
//! slot freezes every command cgroup in it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// How long a signal other than SIGKILL waits for the cgroup to freeze
/// before signalling anyway (a member in uninterruptible sleep delays it).
const FREEZE_WAIT: Duration = Duration::from_millis(100);
/// How often `cgroup.events` is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How often a lingering cgroup is checked when no inotify event came.
const EMPTY_RECHECK: Duration = Duration::from_secs(1);
/// The prefix of command cgroup names.
pub(super) const PREFIX: &str = "cmd-";

/// A command's own cgroup; removed when dropped, if empty by then.
#[derive(Debug)]
pub struct CommandCgroup {
    dir: PathBuf,
    procs: OwnedFd,
}

impl CommandCgroup {
    /// Creates `<slot_dir>/cmd-<n>` for the first free `n` from `first`.
    pub(super) fn create(slot_dir: &Path, first: u64) -> io::Result<Self> {
        let mut n = first;
        loop {
            let dir = slot_dir.join(format!("{PREFIX}{n}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let procs = match OpenOptions::new().write(true).open(dir.join("cgroup.procs")) {
                        Ok(file) => file.into(),
                        Err(err) => {
                            let _ = std::fs::remove_dir(&dir);
                            return Err(err);
                        }
                    };
                    return Ok(CommandCgroup { dir, procs });
                }
                // Left by an earlier envd whose processes still run.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => n += 1,
                Err(err) => return Err(err),
            }
        }
    }

    /// The cgroup at `dir`, made by an earlier image of envd for a command
    /// this one takes over.
    pub fn reopen(dir: &Path) -> io::Result<Self> {
        let is_command = dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX));
        if !is_command {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a command cgroup"));
        }
        let procs = OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
        Ok(CommandCgroup { dir: dir.to_owned(), procs: procs.into() })
    }

    /// The open `cgroup.procs` a child writes itself into.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids of the member processes now.
    pub fn members(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether any process is left (zombies excepted).
    pub fn is_populated(&self) -> bool {
        events_flag(&self.dir, "populated").unwrap_or(false)
    }

    /// Delivers `signal` to every member (see the module doc).
    pub async fn signal(&self, signal: Signal) -> io::Result<()> {
        if signal == Signal::SIGKILL {
            match std::fs::write(self.dir.join("cgroup.kill"), "1") {
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                other => return other,
            }
        }
        std::fs::write(self.dir.join("cgroup.freeze"), "1")?;
        let started = Instant::now();
        while !events_flag(&self.dir, "frozen").unwrap_or(true) && started.elapsed() < FREEZE_WAIT {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        for pid in self.members() {
            send(pid, signal);
            if signal != Signal::SIGKILL {
                send(pid, Signal::SIGCONT);
            }
        }
        std::fs::write(self.dir.join("cgroup.freeze"), "0")
    }

    /// Holds the cgroup until its last process is gone, then lets it be
    /// removed. Polled, not watched: an inotify instance per lingering
    /// command would let a user's leftover daemons take the instances that
    /// every root process on the machine shares.
    pub async fn release_when_empty(self: std::sync::Arc<Self>) {
        while self.is_populated() {
            tokio::time::sleep(EMPTY_RECHECK).await;
        }
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        // EBUSY while populated: the directory then outlives envd's interest
        // in it, and the next envd removes it at start-up once empty.
        if let Err(err) = std::fs::remove_dir(&self.dir) {
            tracing::debug!(cgroup = %self.dir.display(), "not removed: {err}");
        }
    }
}

/// Removes the empty command cgroups an earlier envd left under `slot_dir`.
pub(super) fn remove_leftovers(slot_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(slot_dir) else { return };
    for dir in entries.flatten().map(|e| e.path()) {
        let is_command = dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX));
        if is_command && events_flag(&dir, "populated") == Some(false) {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// A `0`/`1` key of `cgroup.events`.
fn events_flag(dir: &Path, key: &str) -> Option<bool> {
    let events = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    events.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.trim();
        Some(value == "1")
    })
}

fn send(pid: u32, signal: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // A member that exited meanwhile: ESRCH, nothing to do.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}
