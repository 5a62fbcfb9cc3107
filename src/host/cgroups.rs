//! The workload's cgroups (v2): user processes go to `user`, terminals to
//! `ptys`, so the pause hook can freeze the workload without freezing envd.
//! Processes tagged `_system` stay in envd's own cgroup. Freezing and
//! thawing live in `workload_freeze.rs`.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::workload_freeze::Freezing;

/// Which cgroup a process joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Commands.
    User,
    /// Terminals.
    Ptys,
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
                workload.user = Some(user);
                workload.ptys = Some(ptys);
            }
            (Err(err), _) | (_, Err(err)) => tracing::warn!("workload cgroups unavailable: {err}"),
        }
        workload
    }

    /// The `cgroup.procs` fd a child writes itself into, if placement is on.
    pub fn procs_fd(&self, slot: Slot) -> Option<RawFd> {
        let group = match slot {
            Slot::User => self.user.as_ref(),
            Slot::Ptys => self.ptys.as_ref(),
        };
        group.map(|g| g.procs.as_raw_fd())
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
