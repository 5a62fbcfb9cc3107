//! The workload's cgroups (v2): each command gets its own cgroup below
//! `user`, each terminal one below `ptys` (see [`super::command_cgroup`]),
//! so the pause hook can freeze the workload without freezing envd and a
//! kill reaches everything one command started. Processes tagged `_system`
//! stay in envd's own cgroup.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::command_cgroup::{self, CommandCgroup};

/// How often `cgroup.events` is polled while waiting for a freeze.
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Default and ceiling of cgroups visited by a hierarchy freeze.
const DEFAULT_MAX_CGROUPS: usize = 512;
const MAX_CGROUPS_CEILING: usize = 8192;
/// Cgroups a hierarchy freeze never touches: the guest's own plumbing.
const ALLOWLIST: &[&str] = &[
    "init.scope",
    "system.slice/systemd-journald.service",
    "system.slice/rpcbind.service",
    "system.slice/rpc-statd.service",
    "socats",
];

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

/// How much to freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeMode {
    /// `user` and `ptys` only.
    Legacy,
    /// Also every other cgroup that does not hold envd.
    Hierarchy,
}

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
    /// Extra cgroups a hierarchy freeze froze, to thaw them again.
    frozen_extra: Mutex<Vec<PathBuf>>,
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

    /// Whether placement and freezing are in effect.
    pub fn enabled(&self) -> bool {
        self.user.is_some()
    }

    /// Freezes the workload; with a budget, waits until the kernel reports
    /// every written cgroup frozen.
    pub async fn freeze(&self, mode: FreezeMode, max_cgroups: i64, wait: Option<Duration>) -> FreezeReport {
        let mut report = FreezeReport { mode: Some(mode), ..Default::default() };
        if !self.enabled() {
            report.unobservable = 1;
            return report;
        }
        let sweep = Instant::now();
        let mut targets: Vec<PathBuf> =
            [&self.user, &self.ptys].iter().filter_map(|g| g.as_ref().map(|g| g.dir.clone())).collect();
        if mode == FreezeMode::Hierarchy {
            let extra = self.hierarchy_targets(max_cgroups, &mut report);
            self.frozen_extra.lock().unwrap_or_else(|e| e.into_inner()).extend(extra.iter().cloned());
            targets.extend(extra);
        }
        let mut written = Vec::new();
        for dir in targets {
            match std::fs::write(dir.join("cgroup.freeze"), "1") {
                Ok(()) => written.push(dir),
                Err(_) => report.failed += 1,
            }
        }
        report.requested = written.len();
        report.sweep_ms = sweep.elapsed().as_millis() as u64;
        let Some(budget) = wait else { return report };
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
        report
    }

    /// Thaws `user`, `ptys` and whatever a hierarchy freeze froze.
    pub fn thaw(&self) -> std::io::Result<()> {
        let extra = std::mem::take(&mut *self.frozen_extra.lock().unwrap_or_else(|e| e.into_inner()));
        let mut first_error = None;
        let groups = [&self.user, &self.ptys].into_iter().filter_map(|g| g.as_ref().map(|g| g.dir.clone()));
        for dir in groups.chain(extra) {
            if let Err(err) = std::fs::write(dir.join("cgroup.freeze"), "0") {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Top-level cgroups not on envd's own ancestry (descending into the
    /// ones that are), minus the allowlist and the guest's own freezes.
    fn hierarchy_targets(&self, max_cgroups: i64, report: &mut FreezeReport) -> Vec<PathBuf> {
        let limit = usize::try_from(max_cgroups)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_CGROUPS)
            .min(MAX_CGROUPS_CEILING);
        let own = own_cgroup(&self.root);
        let mut targets = Vec::new();
        let mut queue = vec![self.root.clone()];
        while let Some(dir) = queue.pop() {
            let Ok(children) = std::fs::read_dir(&dir) else { continue };
            for child in children.flatten().map(|e| e.path()).filter(|p| p.join("cgroup.procs").exists()) {
                if report.visited >= limit {
                    report.truncated = true;
                    return targets;
                }
                report.visited += 1;
                let relative = child.strip_prefix(&self.root).unwrap_or(&child).to_string_lossy().into_owned();
                let is_ours = [&self.user, &self.ptys].iter().any(|g| g.as_ref().is_some_and(|g| g.dir == child));
                if is_ours {
                    continue;
                }
                if ALLOWLIST.contains(&relative.as_str()) {
                    report.allowlisted += 1;
                } else if own.as_ref().is_some_and(|own| own.starts_with(&child)) {
                    queue.push(child);
                } else if std::fs::read_to_string(child.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1") {
                    report.pre_frozen += 1;
                } else {
                    targets.push(child);
                }
            }
        }
        targets
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

fn is_frozen(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l.trim() == "frozen 1"))
}

/// envd's own cgroup as a path under `root`, from /proc/self/cgroup.
fn own_cgroup(root: &Path) -> Option<PathBuf> {
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
