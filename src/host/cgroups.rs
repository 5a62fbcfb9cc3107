//! The workload's cgroups (v2): each command gets its own cgroup below
//! `user`, each terminal one below `ptys` (see [`super::command_cgroup`]),
//! so the pause hook can freeze the workload without freezing envd and a
//! kill reaches everything one command started. Processes tagged `_system`
//! stay in envd's own cgroup. Freezing and thawing live in
//! `workload_freeze.rs`.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::command_cgroup::{self, CommandCgroup};
use super::freeze_state::Freezing;

/// The tag of processes the orchestrator starts for maintenance: they
/// stay in envd's cgroup, so a freeze never stops them.
pub const SYSTEM_TAG: &str = "_system";

/// Which cgroup a process joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Commands.
    User,
    /// Terminals.
    Ptys,
}

impl Slot {
    /// Where a process with this tag and kind of stdio goes, if anywhere.
    pub fn for_process(tag: Option<&str>, pty: bool) -> Option<Slot> {
        match (tag, pty) {
            (Some(SYSTEM_TAG), _) => None,
            (_, true) => Some(Slot::Ptys),
            (_, false) => Some(Slot::User),
        }
    }
}

/// Where a new process goes.
#[derive(Debug)]
pub enum Placement {
    /// Stays in envd's cgroup: `_system` processes, or no cgroups.
    Outside,
    /// Into the slot cgroup itself (its own cgroup could not be made).
    Shared(RawFd),
    /// Into a cgroup of its own.
    Own(Arc<CommandCgroup>),
}

impl Placement {
    /// The open `cgroup.procs` the child writes itself into, if any.
    pub fn procs_fd(&self) -> Option<RawFd> {
        match self {
            Placement::Outside => None,
            Placement::Shared(fd) => Some(*fd),
            Placement::Own(cgroup) => Some(cgroup.procs_fd()),
        }
    }
}

struct Group {
    dir: PathBuf,
    procs: OwnedFd,
}

/// envd's workload cgroups, or none when cgroups are off or unavailable.
#[derive(Default)]
pub struct Workload {
    root: PathBuf,
    user: Option<Group>,
    ptys: Option<Group>,
    /// Freezing and thawing (`workload_freeze.rs`).
    pub(super) freezing: Freezing,
    /// The number in the next command cgroup's name.
    next_command: AtomicU64,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload").field("root", &self.root).field("enabled", &self.user.is_some()).finish()
    }
}

impl Workload {
    /// Creates `user` and `ptys` under `root` with their weights and limits.
    /// Any failure disables placement (logged), never start-up.
    pub fn setup(root: &Path) -> Self {
        let mut workload = Workload { root: root.to_owned(), ..Default::default() };
        if !root.join("cgroup.controllers").exists() {
            tracing::warn!(root = %root.display(), "no cgroup v2 hierarchy: processes are not placed, freezing is a no-op");
            return workload;
        }
        let memory_limit = memory_limit();
        let settings = |cpu: &'static str, io: &'static str| {
            let mut s = vec![("cpu.weight", cpu.to_owned()), ("io.weight", io.to_owned())];
            if let Some(limit) = memory_limit {
                s.push(("memory.high", limit.to_string()));
                s.push(("memory.max", limit.to_string()));
            }
            s
        };
        match (
            create(root, "user", &settings("50", "default 10")),
            create(root, "ptys", &settings("200", "default 50")),
        ) {
            (Ok(user), Ok(ptys)) => {
                command_cgroup::remove_leftovers(&user.dir);
                command_cgroup::remove_leftovers(&ptys.dir);
                workload.user = Some(user);
                workload.ptys = Some(ptys);
            }
            (Err(err), _) | (_, Err(err)) => tracing::warn!("workload cgroups unavailable: {err}"),
        }
        workload
    }

    /// A new process's cgroup: its own below the slot, or the slot itself
    /// when that cannot be made (logged), or none when placement is off.
    pub fn place(&self, slot: Slot) -> Placement {
        let group = match slot {
            Slot::User => self.user.as_ref(),
            Slot::Ptys => self.ptys.as_ref(),
        };
        let Some(group) = group else { return Placement::Outside };
        match CommandCgroup::create(&group.dir, self.next_command.fetch_add(1, Ordering::Relaxed)) {
            Ok(cgroup) => Placement::Own(Arc::new(cgroup)),
            Err(err) => {
                tracing::warn!(cgroup = %group.dir.display(), "no cgroup of its own for a command: {err}");
                Placement::Shared(group.procs.as_raw_fd())
            }
        }
    }

    /// The number the next command cgroup's name starts from.
    pub fn next_command_cgroup(&self) -> u64 {
        self.next_command.load(Ordering::Relaxed)
    }

    /// Goes on numbering command cgroups where an earlier image stopped.
    pub fn continue_command_cgroups_from(&self, next: u64) {
        self.next_command.fetch_max(next, Ordering::Relaxed);
    }

    /// Whether placement and freezing are in effect.
    pub fn enabled(&self) -> bool {
        self.user.is_some()
    }

    /// The watchdog of a forgotten freeze fires after `window`.
    pub fn with_freeze_watchdog(mut self, window: std::time::Duration) -> Self {
        self.freezing = Freezing::with_watchdog(window);
        self
    }

    /// The root of the hierarchy.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// `user` and `ptys`, where they exist.
    pub(super) fn own_groups(&self) -> Vec<PathBuf> {
        [&self.user, &self.ptys].iter().filter_map(|g| g.as_ref().map(|g| g.dir.clone())).collect()
    }
}

fn create(root: &Path, name: &str, settings: &[(&str, String)]) -> std::io::Result<Group> {
    let dir = root.join(name);
    match std::fs::create_dir(&dir) {
        Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => return Err(err),
        _ => {}
    }
    for (file, value) in settings {
        // Controllers may not be enabled for this subtree: weights are a
        // nicety, placement and freezing are what matter.
        if let Err(err) = std::fs::write(dir.join(file), value) {
            tracing::debug!(cgroup = name, file, "not set: {err}");
        }
    }
    let procs = OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
    Ok(Group { dir, procs: procs.into() })
}

pub(super) fn is_frozen(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l.trim() == "frozen 1"))
}

/// envd's own cgroup as a path under `root`, from /proc/self/cgroup.
pub(super) fn own_cgroup(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(relative.trim_start_matches('/')))
}

/// RAM − min(RAM/8, 128 MiB), leaving envd room under memory pressure.
fn memory_limit() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
    let total = kib * 1024;
    Some(total - (total / 8).min(128 << 20))
}
