//! Resolving a request's path on directory file descriptors: the one way
//! the filesystem module turns a path into something to act on.
//!
//! envd acts as root on paths that other users can change while it works,
//! so two things hold for every resolution:
//!
//! 1. No path is looked up twice. The walk opens each component with
//!    `openat(O_PATH|O_NOFOLLOW)` in the directory opened before it, and
//!    operations then act on the final directory's descriptor (`*at`
//!    calls). A component swapped for a symlink after it was looked at is
//!    never used. Missing directories are created in place (see `dirs`).
//! 2. Symlinks are followed by reading them (`readlinkat`) and walking
//!    their text the same way, under the rule of `access`: a link owned by
//!    a user other than root constrains the rest of the walk and the final
//!    operation to what that user could do.
//!
//! Order of effects in [`locate`]: open `/`; for each component but the
//! last, check that the followed users may search the current directory,
//! open the component without following it, then enter it (a directory),
//! walk its text (a symlink, whose owner joins the followed users), or
//! create it (missing, when asked to); the last component is looked up the
//! same way and followed only when asked. Nothing is created past a
//! refused check. What the caller then does with the entry it checks first
//! with [`Located::require`].

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};

use super::access::{Followed, Need, Perms};
use super::{FsError, Owner, dirs};

/// Symlinks one resolution follows at most, the kernel's own limit.
const MAX_LINKS: u32 = 40;
/// Attempts at a missing directory that others keep creating or swapping.
const CREATE_ATTEMPTS: u32 = 3;

/// How [`locate`] treats the path.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Walk {
    /// Create missing directories on the way, owned by this user.
    pub create: Option<Owner>,
    /// Follow the last component too when it is a symlink.
    pub follow_final: bool,
}

/// An entry found by [`locate`]: its directory, held open, and its name in
/// it (`.` when the path names a directory by itself, as `/` does). The
/// entry itself may be missing.
#[derive(Debug)]
pub(crate) struct Located {
    dir: OwnedFd,
    name: OsString,
    requested: PathBuf,
    followed: Followed,
}

/// Resolves `path` (see the module docs).
pub(crate) fn locate(path: &Path, walk: Walk) -> Result<Located, FsError> {
    let mut walker = Walker::start(path, walk.create)?;
    let name = walker.enter_parents(path)?;
    walker.create = None;
    if walk.follow_final { walker.follow(name) } else { walker.finish(name) }
}

/// Resolves `path` following every symlink, and opens it as a directory
/// the followed users may read. Returns the open directory and where it is.
pub(crate) fn open_dir(path: &Path) -> Result<(OwnedFd, Located), FsError> {
    let located = locate(path, Walk { create: None, follow_final: true })?;
    let dir = located.open(OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(|e| match e {
        FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR) => {
            FsError::NotADirectory(path.to_owned())
        }
        other => other,
    })?;
    let stat = fstat(&dir).map_err(|e| errno_error("stat", path, e))?;
    located.require(Need::Read, Some(&stat))?;
    Ok((dir, located))
}

/// A path naming an open descriptor, for the few calls that have no `*at`
/// form; the kernel resolves it to the descriptor's own inode.
pub(crate) fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Located {
    /// The directory holding the entry.
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The entry's name in [`Located::dir`].
    pub(crate) fn name(&self) -> &OsStr {
        &self.name
    }

    /// The path as requested, for messages and answers.
    pub(crate) fn path(&self) -> &Path {
        &self.requested
    }

    /// The users whose symlinks led here.
    pub(crate) fn followed(&self) -> &Followed {
        &self.followed
    }

    /// The entry's path through the open directory (see [`fd_path`]).
    pub(crate) fn fd_path(&self) -> PathBuf {
        fd_path(self.dir.as_fd()).join(&self.name)
    }

    /// The entry itself (not what a symlink names); `None` when missing.
    pub(crate) fn lstat(&self) -> Result<Option<FileStat>, FsError> {
        match fstatat(&self.dir, self.name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(errno_error("lstat", &self.requested, e)),
        }
    }

    /// Refuses `need` on the entry (`stat` of it, `None` when missing)
    /// unless every user whose symlink led here could do it.
    pub(crate) fn require(&self, need: Need, entry: Option<&FileStat>) -> Result<(), FsError> {
        if self.followed.is_empty() {
            return Ok(());
        }
        let dir = fstat(&self.dir).map_err(|e| errno_error("stat", &self.requested, e))?;
        self.followed.check(need, Perms::of(&dir), entry.map(Perms::of), &self.requested)
    }

    /// Opens the entry with `flags`, never following a symlink there.
    pub(crate) fn open(&self, flags: OFlag) -> Result<OwnedFd, FsError> {
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        openat(&self.dir, self.name.as_os_str(), flags, Mode::empty())
            .map_err(|e| errno_error("open", &self.requested, e))
    }

    /// The entry's final target when it is a symlink (else itself), under
    /// the same rule as the walk that found it.
    pub(crate) fn follow_final(&self) -> Result<Located, FsError> {
        let dir = self.dir.try_clone().map_err(|e| FsError::io_strict("dup", &self.requested, e))?;
        let walker = Walker {
            stack: vec![dir],
            followed: self.followed.clone(),
            links: 0,
            create: None,
            requested: &self.requested,
            at_start_root: false,
        };
        walker.follow(Some(self.name.clone()))
    }

    /// A second handle on the directory (temporary files outlive a walk).
    pub(crate) fn dup_dir(&self) -> Result<OwnedFd, FsError> {
        self.dir.try_clone().map_err(|e| FsError::io_strict("dup", &self.requested, e))
    }

    /// Makes changes to the directory's entries durable.
    pub(crate) fn sync_dir(&self) -> Result<(), FsError> {
        let dir = openat(&self.dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty());
        dir.and_then(nix::unistd::fsync).map_err(|e| errno_error("fsync", &self.requested, e))
    }
}

/// One resolution in progress.
struct Walker<'a> {
    /// Directories entered, the current one last; `..` pops.
    stack: Vec<OwnedFd>,
    followed: Followed,
    links: u32,
    create: Option<Owner>,
    requested: &'a Path,
    /// `start` opened `/` for an absolute path, whose first component
    /// (the root) then needs no second open.
    at_start_root: bool,
}

impl<'a> Walker<'a> {
    fn start(requested: &'a Path, create: Option<Owner>) -> Result<Self, FsError> {
        let start = if requested.is_absolute() { "/" } else { "." };
        let dir = open_path(AT_FDCWD, OsStr::new(start)).map_err(|e| errno_error("open", requested, e))?;
        let at_start_root = requested.is_absolute();
        Ok(Self { stack: vec![dir], followed: Followed::default(), links: 0, create, requested, at_start_root })
    }

    fn current(&self) -> BorrowedFd<'_> {
        // The stack is never empty: it starts with one entry and `..` at
        // its bottom replaces rather than pops.
        self.stack.last().map_or(AT_FDCWD, AsFd::as_fd)
    }

    /// Enters every component of `path` but a final name, which it returns.
    fn enter_parents(&mut self, path: &Path) -> Result<Option<OsString>, FsError> {
        let mut components: Vec<Component<'_>> = path.components().collect();
        let last = match components.last() {
            Some(Component::Normal(name)) => Some(name.to_os_string()),
            _ => None,
        };
        if last.is_some() {
            components.pop();
        }
        for component in components {
            self.enter(component)?;
        }
        Ok(last)
    }

    fn enter(&mut self, component: Component<'_>) -> Result<(), FsError> {
        if std::mem::take(&mut self.at_start_root) && component == Component::RootDir {
            return Ok(());
        }
        match component {
            Component::RootDir => {
                let root = open_path(AT_FDCWD, OsStr::new("/")).map_err(|e| self.error("open", e))?;
                self.stack = vec![root];
            }
            Component::ParentDir => {
                self.check_search()?;
                if self.stack.len() > 1 {
                    self.stack.pop();
                } else {
                    let up = open_path(self.current(), OsStr::new("..")).map_err(|e| self.error("open", e))?;
                    self.stack = vec![up];
                }
            }
            Component::Normal(name) => self.enter_name(name)?,
            Component::CurDir | Component::Prefix(_) => {}
        }
        Ok(())
    }

    /// Enters the directory `name` of the current one: directly, through a
    /// symlink, or by creating it.
    fn enter_name(&mut self, name: &OsStr) -> Result<(), FsError> {
        self.check_search()?;
        for _ in 0..CREATE_ATTEMPTS {
            match open_path(self.current(), name) {
                Ok(fd) => {
                    let stat = fstat(&fd).map_err(|e| self.error("stat", e))?;
                    return match stat.st_mode & libc::S_IFMT {
                        libc::S_IFDIR => {
                            self.stack.push(fd);
                            Ok(())
                        }
                        libc::S_IFLNK => self.through_link(&fd, &stat),
                        _ => Err(FsError::ParentIsFile(self.requested.to_owned())),
                    };
                }
                Err(Errno::ENOENT) if self.create.is_some() => {
                    let owner = self.create.unwrap_or(Owner { uid: 0, gid: 0 });
                    let dir = fstat(self.current()).map_err(|e| self.error("stat", e))?;
                    self.followed.check_create(Perms::of(&dir), self.requested)?;
                    match dirs::create_at(self.current(), name, owner) {
                        Ok(created) => {
                            self.stack.push(created);
                            return Ok(());
                        }
                        // Someone made or swapped it meanwhile: look again.
                        Err(Errno::EEXIST | Errno::ELOOP | Errno::ENOTDIR) => continue,
                        Err(e) => return Err(self.error_strict("mkdir", e)),
                    }
                }
                Err(e) => return Err(self.error("open", e)),
            }
        }
        Err(FsError::Io {
            op: "create directory",
            path: self.requested.to_owned(),
            source: std::io::Error::other("it kept changing while it was being created"),
        })
    }

    /// Walks the text of the symlink open as `link`, leaving its final
    /// directory current. Nothing is created inside a link's text.
    fn through_link(&mut self, link: &OwnedFd, stat: &FileStat) -> Result<(), FsError> {
        let text = self.read_link(link, stat)?;
        let create = self.create.take();
        let result = match self.enter_parents(Path::new(&text)) {
            Ok(Some(last)) => self.enter_name(&last),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.create = create;
        result
    }

    /// Counts a followed link, notes its owner and reads its text.
    fn read_link(&mut self, link: &OwnedFd, stat: &FileStat) -> Result<OsString, FsError> {
        self.links += 1;
        if self.links > MAX_LINKS {
            return Err(FsError::SymlinkLoop(self.requested.to_owned()));
        }
        self.followed.link_owned_by(stat.st_uid);
        readlinkat(link, "").map_err(|e| self.error("readlink", e))
    }

    /// Follows `name` in the current directory while it is a symlink.
    fn follow(mut self, mut name: Option<OsString>) -> Result<Located, FsError> {
        while let Some(current) = &name {
            self.check_search()?;
            let fd = match open_path(self.current(), current) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => break,
                Err(e) => return Err(self.error("open", e)),
            };
            let stat = fstat(&fd).map_err(|e| self.error("stat", e))?;
            if stat.st_mode & libc::S_IFMT != libc::S_IFLNK {
                break;
            }
            let text = self.read_link(&fd, &stat)?;
            name = self.enter_parents(Path::new(&text))?;
        }
        self.finish(name)
    }

    fn finish(mut self, name: Option<OsString>) -> Result<Located, FsError> {
        self.check_search()?;
        let dir = self.stack.pop().ok_or_else(|| self.error("open", Errno::EBADF))?;
        let name = name.unwrap_or_else(|| OsString::from("."));
        Ok(Located { dir, name, requested: self.requested.to_owned(), followed: self.followed })
    }

    fn check_search(&self) -> Result<(), FsError> {
        if self.followed.is_empty() {
            return Ok(());
        }
        let dir = fstat(self.current()).map_err(|e| self.error("stat", e))?;
        self.followed.check_search(Perms::of(&dir), self.requested)
    }

    fn error(&self, op: &'static str, errno: Errno) -> FsError {
        errno_error(op, self.requested, errno)
    }

    fn error_strict(&self, op: &'static str, errno: Errno) -> FsError {
        FsError::io_strict(op, self.requested, errno.into())
    }
}

/// Opens `name` in `dir` without following it: the directory, or the
/// symlink itself, or whatever else is there.
fn open_path(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
}

fn errno_error(op: &'static str, path: &Path, errno: Errno) -> FsError {
    match errno {
        Errno::ENOTDIR => FsError::NotADirectory(path.to_owned()),
        other => FsError::io(op, path, other.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "envd-resolve-{}-{}",
            std::process::id(),
            super::super::random::lower_alnum(6)
        ));
        std::fs::create_dir_all(dir.join("real/sub")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("rel")).unwrap();
        std::os::unix::fs::symlink(dir.join("real/sub"), dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        dir
    }

    fn name_of(located: &Located) -> String {
        located.name().to_string_lossy().into_owned()
    }

    #[test]
    fn walks_links_dots_and_creates() {
        let dir = scratch();
        let follow = Walk { create: None, follow_final: true };
        assert_eq!(name_of(&locate(&dir.join("rel/sub/x"), Walk::default()).unwrap()), "x");
        assert_eq!(name_of(&locate(&dir.join("rel"), Walk::default()).unwrap()), "rel");
        assert_eq!(name_of(&locate(&dir.join("rel"), follow).unwrap()), "real");
        assert_eq!(name_of(&locate(&dir.join("abs"), follow).unwrap()), "sub");
        assert_eq!(name_of(&locate(&dir.join("rel/sub/../sub/.."), follow).unwrap()), ".");
        assert!(matches!(locate(&dir.join("loop"), follow), Err(FsError::SymlinkLoop(_))));
        assert!(matches!(locate(&dir.join("missing/x"), Walk::default()), Err(FsError::NotFound(_))));
        let owner = Owner { uid: 1234, gid: 4321 };
        let made = locate(&dir.join("rel/a/b/c"), Walk { create: Some(owner), follow_final: false }).unwrap();
        assert!(made.lstat().unwrap().is_none());
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join("real/a/b")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
        assert!(open_dir(&dir.join("rel")).is_ok());
        std::fs::write(dir.join("file"), b"x").unwrap();
        assert!(matches!(open_dir(&dir.join("file")), Err(FsError::NotADirectory(_))));
        assert!(matches!(
            locate(&dir.join("file/x"), Walk { create: Some(owner), follow_final: false }),
            Err(FsError::ParentIsFile(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
