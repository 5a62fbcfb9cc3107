//! Directory watchers on inotify (CONTRACT 3.12 `WatchDir`): optional
//! recursion that follows directories created later, events named
//! relative to the watched directory, and optional entry info.
//!
//! A watcher never buffers without bound: it reads from the kernel only
//! when its consumer asks, and a kernel queue overflow is an error to that
//! watcher rather than silently lost events.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::entry::{Entry, Owners, entry_info};
pub use super::event_kind::EventKind;
use super::event_kind::kinds;
use super::inotify::{Inotify, InotifyBudget, MAX_USER_INSTANCES, RawEvent};
use super::temp_events::{Seen, TempEvents};
use super::transfer::is_temp_name;
use super::{FsError, display};

/// Filesystem magics refused unless the caller allows network mounts:
/// NFS, CIFS, SMB, SMB2, FUSE.
const NETWORK_MAGICS: [u64; 5] = [0x6969, 0xFF53_4D42, 0x517B, 0xFE53_4D42, 0x6573_5546];
/// Bound on remembered synthesized creates (see [`Watcher::handle`]).
const MAX_SYNTHESIZED: usize = 4096;

/// How to watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchOptions {
    /// The whole tree, including directories created later.
    pub recursive: bool,
    /// Attach entry info to create, write and chmod events.
    pub include_entry: bool,
    /// Allow NFS, SMB and FUSE mounts.
    pub allow_network_mounts: bool,
}

/// One event, as the wire wants it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsEvent {
    /// Path relative to the watched directory (`.` for itself).
    pub name: String,
    /// What happened.
    pub kind: EventKind,
    /// Entry info, when asked for and still stat-able.
    pub entry: Option<Entry>,
}

/// A live watch on a directory.
#[derive(Debug)]
pub struct Watcher {
    inotify: Inotify,
    /// The directory as requested (event entries are reported under it).
    root: PathBuf,
    root_wd: i32,
    /// Watch descriptor → directory relative to the root.
    dirs: HashMap<i32, PathBuf>,
    options: WatchOptions,
    pending: VecDeque<FsEvent>,
    owners: Owners,
    /// Creates reported from a directory scan; inotify may report the
    /// same creation again, which is then dropped.
    synthesized: HashSet<PathBuf>,
    /// envd's own transfers in progress (see `temp_events`).
    transfers: TempEvents,
}

impl Watcher {
    /// Validates `root` and starts watching it with an inotify instance
    /// from `budget`. Needs a tokio runtime; blocking for large recursive
    /// trees.
    pub fn start(root: &Path, options: WatchOptions, budget: &InotifyBudget) -> Result<Self, FsError> {
        // The root may itself be a symlink to a directory: it is followed
        // under the rule for users' symlinks, and watched where it leads.
        let (dir, _) = super::resolve::open_dir(root)?;
        let real_root = std::fs::read_link(super::resolve::fd_path(dir.as_fd()))
            .map_err(|e| FsError::io_strict("resolve", root, e))?;
        if !options.allow_network_mounts && is_network_mount(&real_root)? {
            return Err(FsError::NetworkMount(root.to_owned()));
        }
        let slot = budget.take().ok_or_else(|| {
            FsError::WatchLimit(format!(
                "too many watchers: envd holds at most {} inotify instances (half of {MAX_USER_INSTANCES} = {}); \
                 remove a watcher or close a WatchDir stream",
                budget.limit(),
                budget.kernel_limit()
            ))
        })?;
        let inotify = Inotify::new(slot).map_err(|e| watch_error(root, e))?;
        let root_wd = inotify.add_watch(&real_root, true).map_err(|e| watch_error(root, e))?;
        let mut watcher = Self {
            inotify,
            root: root.to_owned(),
            root_wd,
            dirs: HashMap::from([(root_wd, PathBuf::new())]),
            options,
            pending: VecDeque::new(),
            owners: Owners::default(),
            synthesized: HashSet::new(),
            transfers: TempEvents::default(),
        };
        if options.recursive {
            watcher.watch_children(Path::new(""), false)?;
        }
        Ok(watcher)
    }

    /// The next event; errors end the watch.
    pub async fn next(&mut self) -> Result<FsEvent, FsError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let batch = self.inotify.read().await.map_err(|e| watch_error(&self.root, e))?;
            for raw in batch {
                self.handle(raw)?;
            }
        }
    }

    /// Every event not yet returned, after reading all the kernel has
    /// queued without waiting: whatever changed before this call is in it.
    pub fn drain(&mut self) -> Result<Vec<FsEvent>, FsError> {
        while let Some(batch) = self.inotify.try_read().map_err(|e| watch_error(&self.root, e))? {
            for raw in batch {
                self.handle(raw)?;
            }
        }
        Ok(self.pending.drain(..).collect())
    }

    fn handle(&mut self, raw: RawEvent) -> Result<(), FsError> {
        if raw.mask & libc::IN_Q_OVERFLOW != 0 {
            return Err(FsError::WatchOverflow("the kernel event queue overflowed: events were lost".into()));
        }
        if raw.mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&raw.wd);
            return Ok(());
        }
        let arrived = match self.transfers.see(&raw) {
            Seen::Hidden => return Ok(()),
            Seen::Arrived(kinds) => Some(kinds),
            Seen::Other => None,
        };
        let Some(dir) = self.dirs.get(&raw.wd) else { return Ok(()) };
        let relative = match (&raw.name, raw.wd == self.root_wd) {
            (Some(name), _) => dir.join(name),
            (None, true) => PathBuf::new(),
            // A subdirectory's own record: its parent's watch reports it.
            (None, false) => return Ok(()),
        };
        if raw.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 && self.synthesized.remove(&relative) {
            return Ok(());
        }
        if let Some(kinds) = arrived {
            self.push(&relative, kinds.into_iter());
            return Ok(());
        }
        if raw.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
            self.synthesized.remove(&relative);
        }
        let is_dir = raw.mask & libc::IN_ISDIR != 0;
        if self.options.recursive && is_dir && raw.name.is_some() {
            if raw.mask & libc::IN_MOVED_FROM != 0 {
                self.unwatch_tree(&relative);
            }
            if raw.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                self.push(&relative, kinds(raw.mask));
                // Entries made before the new watch existed would go
                // unseen: report them as created.
                return self.watch_new_dir(&relative, raw.mask & libc::IN_CREATE != 0);
            }
        }
        self.push(&relative, kinds(raw.mask));
        Ok(())
    }

    fn push(&mut self, relative: &Path, kinds: impl Iterator<Item = EventKind>) {
        let name = if relative.as_os_str().is_empty() { ".".to_owned() } else { display(relative) };
        for kind in kinds {
            let entry = match kind {
                EventKind::Create | EventKind::Write | EventKind::Chmod if self.options.include_entry => {
                    entry_info(&self.root.join(relative), &mut self.owners).ok()
                }
                _ => None,
            };
            self.pending.push_back(FsEvent { name: name.clone(), kind, entry });
        }
    }

    fn watch_new_dir(&mut self, relative: &Path, report_contents: bool) -> Result<(), FsError> {
        match self.add(relative) {
            Ok(()) => self.watch_children(relative, report_contents),
            Err(FsError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Watches every directory below `relative` (already watched itself),
    /// not following symlinks; `report` pushes a create event per entry.
    fn watch_children(&mut self, relative: &Path, report: bool) -> Result<(), FsError> {
        let mut stack = vec![relative.to_owned()];
        while let Some(dir) = stack.pop() {
            let Ok(read) = std::fs::read_dir(self.root.join(&dir)) else { continue };
            let mut children: Vec<_> = read.filter_map(Result::ok).collect();
            children.sort_by_key(|e| e.file_name());
            for child in children.into_iter().filter(|c| !is_temp_name(&c.file_name())) {
                let child_rel = dir.join(child.file_name());
                if report {
                    self.push(&child_rel, std::iter::once(EventKind::Create));
                    if self.synthesized.len() >= MAX_SYNTHESIZED {
                        self.synthesized.clear();
                    }
                    self.synthesized.insert(child_rel.clone());
                }
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    match self.add(&child_rel) {
                        Ok(()) => stack.push(child_rel),
                        Err(FsError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, relative: &Path) -> Result<(), FsError> {
        let path = self.root.join(relative);
        match self.inotify.add_watch(&path, false) {
            Ok(wd) => {
                self.dirs.insert(wd, relative.to_owned());
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Err(FsError::NotFound(path)),
            Err(e) => Err(watch_error(&path, e)),
        }
    }

    /// Stops watching a directory that moved away, and all below it.
    fn unwatch_tree(&mut self, relative: &Path) {
        let gone: Vec<i32> = self.dirs.iter().filter(|(_, dir)| dir.starts_with(relative)).map(|(wd, _)| *wd).collect();
        for wd in gone {
            self.inotify.remove_watch(wd);
            self.dirs.remove(&wd);
        }
    }
}

fn is_network_mount(path: &Path) -> Result<bool, FsError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| FsError::io("statfs", path, e.into()))?;
    // f_type is a signed word on some ABIs; the magics are 32-bit values.
    #[allow(clippy::cast_sign_loss)]
    let magic = (stat.filesystem_type().0 as u64) & 0xFFFF_FFFF;
    Ok(NETWORK_MAGICS.contains(&magic))
}

/// The kernel's inotify limits are a resource limit to the client; other
/// inotify failures (bad fd, no memory) are internal: never "not found" or
/// "disk full", whatever the errno.
fn watch_error(path: &Path, source: std::io::Error) -> FsError {
    match source.raw_os_error() {
        Some(libc::EMFILE) => FsError::WatchLimit(format!(
            "the system's inotify instances are exhausted ({MAX_USER_INSTANCES}); remove a watcher and retry"
        )),
        Some(libc::ENOSPC) => FsError::WatchLimit(format!(
            "too many watched directories under {}: /proc/sys/fs/inotify/max_user_watches reached",
            path.display()
        )),
        _ => FsError::Io { op: "watch", path: path.to_owned(), source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn collect(watcher: &mut Watcher, want: usize) -> Vec<(String, EventKind)> {
        let mut out = Vec::new();
        while out.len() < want {
            let event = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await.unwrap().unwrap();
            out.push((event.name, event.kind));
        }
        out
    }

    #[test]
    fn record_kinds_follow_the_contract_order() {
        let all = libc::IN_CREATE | libc::IN_MOVED_FROM | libc::IN_ATTRIB | libc::IN_MODIFY | libc::IN_DELETE;
        let got: Vec<_> = kinds(all).collect();
        use EventKind::*;
        assert_eq!(got, [Create, Rename, Chmod, Write, Remove]);
    }

    #[test]
    fn local_filesystems_are_not_network_mounts() {
        for path in ["/", "/tmp", "/proc", "/dev"] {
            assert!(!is_network_mount(Path::new(path)).unwrap(), "{path}");
        }
    }

    #[tokio::test]
    async fn recursive_watch_sees_new_subdirectories() {
        let root = std::env::temp_dir().join(format!("envd-watch-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let options = WatchOptions { recursive: true, include_entry: true, ..Default::default() };
        let budget = InotifyBudget::new(1);
        let mut watcher = Watcher::start(&root, options, &budget).unwrap();
        assert!(matches!(Watcher::start(&root, options, &budget), Err(FsError::WatchLimit(_))));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let events = collect(&mut watcher, 2).await;
        assert_eq!(events, [("a".to_owned(), EventKind::Create), ("a/b".to_owned(), EventKind::Create)]);
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await.unwrap().unwrap();
        assert_eq!((event.name.as_str(), event.kind), ("a/b/f", EventKind::Create));
        assert_eq!(event.entry.map(|e| e.path), Some(display(&root.join("a/b/f"))));
        std::fs::remove_dir_all(&root).unwrap();
        drop(watcher);
        assert!(matches!(Watcher::start(&root, options, &budget), Err(FsError::NotFound(_))));
    }
}
