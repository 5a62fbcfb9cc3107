//! Filesystem operations for the Filesystem service and the `/files` API.
//!
//! envd runs as root and does every operation as root: the requesting user
//! only decides how paths resolve and who owns what gets created
//! (CONTRACT 3.1, 5.4). Every path is walked by `resolve` on directory
//! descriptors, never re-resolved by name, and a symlink owned by another
//! user is followed only where that user could go (`access`). Nothing here
//! knows about HTTP or Connect; callers resolve paths for their user first
//! and map [`FsError`] to their codes.

mod access;
pub mod compose;
mod dirs;
pub mod entry;
mod event_kind;
mod in_place;
pub(crate) mod inotify;
pub mod metadata;
pub mod ops;
mod random;
mod resolve;
mod temp_events;
pub mod transfer;
pub mod watch;
pub mod watchers;
mod xattr;

use std::io;
use std::path::{Path, PathBuf};

pub use entry::{Entry, FileKind, Owners};
pub use inotify::{InotifyBudget, MAX_USER_INSTANCES};

/// Who owns what an operation creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl From<&crate::context::User> for Owner {
    fn from(user: &crate::context::User) -> Self {
        Self { uid: user.uid, gid: user.gid }
    }
}

/// What went wrong with a filesystem operation. Messages name the path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The path does not exist.
    #[error("file not found: {}", .0.display())]
    NotFound(PathBuf),
    /// `MakeDir` on an existing directory.
    #[error("directory already exists: {}", .0.display())]
    AlreadyExists(PathBuf),
    /// A directory was required.
    #[error("path is not a directory: {}", .0.display())]
    NotADirectory(PathBuf),
    /// A file was required (downloads, upload targets).
    #[error("path '{}' is a directory", .0.display())]
    IsADirectory(PathBuf),
    /// A regular file was required (compose sources).
    #[error("path '{}' is not a regular file", .0.display())]
    NotARegularFile(PathBuf),
    /// A component of a path to create exists and is not a directory.
    #[error("path is a file: {}", .0.display())]
    ParentIsFile(PathBuf),
    /// Symlinks loop or nest too deeply.
    #[error("cyclic symlink or too many links: {}", .0.display())]
    SymlinkLoop(PathBuf),
    /// A symlink owned by another user led where that user may not go.
    #[error("permission denied on '{}': {reason}", .path.display())]
    PermissionDenied {
        /// The path as requested or walked.
        path: PathBuf,
        /// Which symlink was refused and why.
        reason: String,
    },
    /// Watching a network filesystem without opting in.
    #[error("cannot watch path on network filesystem: {}", .0.display())]
    NetworkMount(PathBuf),
    /// The filesystem is full (or the user's quota is).
    #[error("not enough disk space available: {}", .0.display())]
    NoSpace(PathBuf),
    /// A request named the same file twice, or a file and itself.
    #[error("{0}")]
    Conflict(String),
    /// A watcher's kernel or envd queue overflowed.
    #[error("{0}")]
    WatchOverflow(String),
    /// envd's share of the kernel's inotify instances or watches is used up.
    #[error("{0}")]
    WatchLimit(String),
    /// Any other system error.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl FsError {
    /// Classifies an I/O error on `path`: missing, full, looping, or other.
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOENT) => FsError::NotFound(path.to_owned()),
            Some(libc::ENOSPC | libc::EDQUOT) => FsError::NoSpace(path.to_owned()),
            Some(libc::ELOOP) => FsError::SymlinkLoop(path.to_owned()),
            _ => FsError::Io { op, path: path.to_owned(), source },
        }
    }

    /// Like [`FsError::io`], but a missing path is an ordinary I/O error
    /// (for paths whose absence the caller has already ruled out).
    pub fn io_strict(op: &'static str, path: &Path, source: io::Error) -> Self {
        match FsError::io(op, path, source) {
            FsError::NotFound(path) => FsError::Io { op, path, source: io::Error::from_raw_os_error(libc::ENOENT) },
            other => other,
        }
    }
}

/// The path as a string for the wire (lossy for non-UTF-8 names).
pub fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The last element of a path as Go's `filepath.Base` gives it (`/` for
/// the root, trailing slashes ignored).
pub fn base_name(path: &Path) -> String {
    let text = path.to_string_lossy();
    let trimmed = text.trim_end_matches('/');
    if trimmed.is_empty() {
        return if text.is_empty() { ".".to_owned() } else { "/".to_owned() };
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_match_go() {
        assert_eq!(base_name(Path::new("/")), "/");
        assert_eq!(base_name(Path::new("/a/b")), "b");
        assert_eq!(base_name(Path::new("/a/b/")), "b");
        assert_eq!(base_name(Path::new("rel")), "rel");
    }

    #[test]
    fn errors_classify() {
        let p = Path::new("/x");
        assert!(matches!(FsError::io("open", p, io::Error::from_raw_os_error(libc::ENOENT)), FsError::NotFound(_)));
        assert!(matches!(FsError::io("write", p, io::Error::from_raw_os_error(libc::EDQUOT)), FsError::NoSpace(_)));
        assert!(matches!(
            FsError::io_strict("open", p, io::Error::from_raw_os_error(libc::ENOENT)),
            FsError::Io { .. }
        ));
    }
}
