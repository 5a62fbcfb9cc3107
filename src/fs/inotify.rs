//! A thin async inotify: one non-blocking instance per watcher, read
//! through tokio's reactor. The only unsafe calls of the watchers live here.
//!
//! Instances are counted against `fs.inotify.max_user_instances`, which the
//! kernel applies per uid: envd runs as root, so every instance it holds is
//! one fewer for every other root process of the VM (systemd, editors,
//! language servers). An [`InotifyBudget`] takes a slot before the instance
//! is created and the slot is returned after its descriptor is closed, so
//! envd never holds more than half of the kernel's limit.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The events the contract watches: no open/close/access.
pub const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_MOVE_SELF;

/// Size of the fixed `struct inotify_event` header.
const HEADER: usize = 16;
/// One read takes whatever fits; the kernel queue holds the rest.
const READ_BUFFER: usize = 64 * 1024;

/// Where the kernel states its per-uid limit of inotify instances.
pub const MAX_USER_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";
/// The kernel's default, assumed when the limit cannot be read.
const DEFAULT_MAX_USER_INSTANCES: usize = 128;

/// How many inotify instances envd may hold at once: half of the kernel's
/// per-uid limit, the other half left to the rest of the system. Clones
/// share one count.
#[derive(Debug, Clone)]
pub struct InotifyBudget {
    limit: usize,
    kernel_limit: usize,
    used: Arc<AtomicUsize>,
}

/// One taken slot of an [`InotifyBudget`], given back on drop.
#[derive(Debug)]
pub struct InotifySlot {
    used: Arc<AtomicUsize>,
}

impl Drop for InotifySlot {
    fn drop(&mut self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InotifyBudget {
    /// Half of the limit stated in `limit_file` (the kernel default when
    /// it cannot be read).
    pub fn from_kernel(limit_file: &Path) -> Self {
        let kernel_limit = std::fs::read_to_string(limit_file)
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_MAX_USER_INSTANCES);
        Self { limit: kernel_limit / 2, kernel_limit, used: Arc::default() }
    }

    /// A budget of exactly `limit` instances (for tests).
    pub fn new(limit: usize) -> Self {
        Self { limit, kernel_limit: limit.saturating_mul(2), used: Arc::default() }
    }

    /// The most instances envd may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The kernel's per-uid limit the budget was derived from.
    pub fn kernel_limit(&self) -> usize {
        self.kernel_limit
    }

    /// A slot, unless all are taken.
    pub fn take(&self) -> Option<InotifySlot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used < self.limit).then_some(used + 1))
            .ok()
            .map(|_| InotifySlot { used: self.used.clone() })
    }
}

/// One inotify record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// The watch it came from.
    pub wd: i32,
    /// `IN_*` bits.
    pub mask: u32,
    /// Pairs the two halves of a rename.
    pub cookie: u32,
    /// The entry's name inside the watched directory, if any.
    pub name: Option<OsString>,
}

/// An inotify instance.
#[derive(Debug)]
pub struct Inotify {
    fd: AsyncFd<OwnedFd>,
    buffer: Vec<u8>,
    /// Declared after `fd`: given back only once the descriptor is closed.
    _slot: InotifySlot,
}

impl Inotify {
    /// A new instance, counted in `slot`'s budget; needs a tokio runtime.
    pub fn new(slot: InotifySlot) -> io::Result<Self> {
        // SAFETY: plain syscall with flags; the result is checked below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved into the AsyncFd and stays open, the
        // same descriptor, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { fd, buffer: vec![0; READ_BUFFER], _slot: slot })
    }

    /// Watches the directory `path` (following a final symlink only when
    /// `follow`); returns its watch descriptor, the same one again for an
    /// inode already watched.
    pub fn add_watch(&self, path: &Path, follow: bool) -> io::Result<i32> {
        let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mask = WATCH_MASK | libc::IN_ONLYDIR | if follow { 0 } else { libc::IN_DONT_FOLLOW };
        // SAFETY: path is NUL-terminated and the fd is a live inotify fd.
        let wd = unsafe { libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 { Err(io::Error::last_os_error()) } else { Ok(wd) }
    }

    /// Stops a watch; an already-gone watch is fine.
    pub fn remove_watch(&self, wd: i32) {
        // SAFETY: plain syscall on a live inotify fd; EINVAL for a stale wd is harmless.
        unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), wd) };
    }

    /// Whatever the kernel has queued now, without waiting: `None` once the
    /// queue is empty. The kernel queues an event before the syscall that
    /// caused it returns, so reading until `None` sees every change that
    /// completed before the call.
    pub fn try_read(&mut self) -> io::Result<Option<Vec<RawEvent>>> {
        match nix::unistd::read(self.fd.get_ref().as_fd(), &mut self.buffer) {
            Ok(n) => Ok(Some(parse(&self.buffer[..n]))),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for events and returns the next batch.
    pub async fn read(&mut self) -> io::Result<Vec<RawEvent>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buffer = &mut self.buffer;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref().as_fd(), buffer).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(parse(&self.buffer[..n])),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Splits a read buffer into records (`wd`, `mask`, `cookie`, `len`, then
/// `len` bytes of NUL-padded name), ignoring a truncated tail.
fn parse(mut buf: &[u8]) -> Vec<RawEvent> {
    let mut events = Vec::new();
    while buf.len() >= HEADER {
        let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let cookie = u32::from_ne_bytes(word(8));
        let len = usize::try_from(u32::from_ne_bytes(word(12))).unwrap_or(usize::MAX);
        let Some(record) = buf.get(..HEADER.saturating_add(len)) else { break };
        let name = &record[HEADER..];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        let name = (!name.is_empty()).then(|| OsString::from_vec(name.to_vec()));
        events.push(RawEvent { wd, mask, cookie, name });
        buf = &buf[record.len()..];
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, name: &[u8], padded: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&wd.to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&u32::try_from(padded).unwrap().to_ne_bytes());
        let mut name = name.to_vec();
        name.resize(padded, 0);
        out.extend_from_slice(&name);
        out
    }

    #[test]
    fn parses_records_and_ignores_truncation() {
        let mut buf = record(1, libc::IN_CREATE, b"a.txt", 16);
        buf.extend(record(2, libc::IN_DELETE_SELF, b"", 0));
        buf.extend(&record(3, libc::IN_MODIFY, b"cut", 16)[..20]);
        let events = parse(&buf);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], RawEvent { wd: 1, mask: libc::IN_CREATE, cookie: 0, name: Some("a.txt".into()) });
        assert_eq!(events[1].name, None);
    }

    #[test]
    fn budget_counts_slots_until_dropped() {
        let budget = InotifyBudget::new(2);
        let first = budget.take().unwrap();
        let _second = budget.clone().take().unwrap();
        assert!(budget.take().is_none(), "clones share the count");
        drop(first);
        assert!(budget.take().is_some());
    }

    #[test]
    fn budget_is_half_the_kernel_limit() {
        let file = std::env::temp_dir().join(format!("envd-inotify-limit-{}", std::process::id()));
        std::fs::write(&file, "1000\n").unwrap();
        assert_eq!(InotifyBudget::from_kernel(&file).limit(), 500);
        std::fs::remove_file(&file).unwrap();
        let missing = InotifyBudget::from_kernel(&file);
        assert_eq!((missing.limit(), missing.kernel_limit()), (64, 128));
    }

    #[tokio::test]
    async fn try_read_takes_what_is_queued_without_waiting() {
        let dir = std::env::temp_dir().join(format!("envd-inotify-try-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut inotify = Inotify::new(InotifyBudget::new(1).take().unwrap()).unwrap();
        inotify.add_watch(&dir, false).unwrap();
        assert_eq!(inotify.try_read().unwrap(), None, "nothing happened yet");
        std::fs::write(dir.join("y"), b"1").unwrap();
        let events = inotify.try_read().unwrap().expect("queued by the time write returned");
        assert!(events.iter().any(|e| e.mask & libc::IN_CREATE != 0 && e.name.as_deref() == Some("y".as_ref())));
        assert_eq!(inotify.try_read().unwrap(), None, "drained");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn reports_a_created_file() {
        let dir = std::env::temp_dir().join(format!("envd-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut inotify = Inotify::new(InotifyBudget::new(1).take().unwrap()).unwrap();
        let wd = inotify.add_watch(&dir, false).unwrap();
        std::fs::write(dir.join("x"), b"1").unwrap();
        let events = inotify.read().await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.wd == wd && e.mask & libc::IN_CREATE != 0 && e.name.as_deref() == Some("x".as_ref()))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
