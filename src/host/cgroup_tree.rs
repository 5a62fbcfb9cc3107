//! The cgroup tree as the workload freeze sees it: bounded walks, a
//! cgroup's own freeze request, and the cgroups a hierarchy freeze never
//! touches.

use std::path::{Path, PathBuf};

/// Bound of the walks over the whole tree (guest scan, thaw, audit).
pub(super) const MAX_CGROUPS_CEILING: usize = 8192;
/// Cgroups a hierarchy freeze never touches: what a resume depends on.
pub(super) const ALLOWLIST: &[&str] = &[
    "init.scope",
    "system.slice/systemd-journald.service",
    "system.slice/rpcbind.service",
    "system.slice/rpcbind.socket",
    "system.slice/rpc-statd.service",
    "socats",
];

/// An allowlist entry or anything beneath one.
pub(super) fn allowlisted(relative: &Path) -> bool {
    ALLOWLIST.iter().any(|entry| relative.starts_with(entry))
}

/// The cgroup's own freeze request (not an ancestor's).
pub(super) fn reads_frozen(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1")
}

pub(super) fn children(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut children: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.join("cgroup.procs").exists()).collect();
    children.sort();
    children
}

/// Every cgroup below `root`, breadth first, at most `limit` (truncated?).
pub(super) fn walk(root: &Path, limit: usize) -> (Vec<PathBuf>, bool) {
    let mut found = Vec::new();
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        for child in children(&dir) {
            if found.len() >= limit {
                return (found, true);
            }
            queue.push_back(child.clone());
            found.push(child);
        }
    }
    (found, false)
}
