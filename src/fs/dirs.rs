//! Creating one directory for a user, in a directory already open, so that
//! its ownership can never land elsewhere (CONTRACT 3.1, "ensure parents";
//! `resolve` walks the path and calls this for each missing component).
//!
//! Order of effects: `mkdirat` in the open parent; open the new name with
//! `O_NOFOLLOW|O_DIRECTORY`, so that a directory swapped for a symlink in
//! between fails here (`ELOOP`/`ENOTDIR`) instead of being followed;
//! `fchown` the opened descriptor, which names the directory itself. A
//! `chown` by path would follow whatever the name has become meanwhile.

use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fstat, mkdirat};
use nix::unistd::{Gid, Uid, fchown, geteuid};

use super::Owner;

/// Mode of created directories, before the umask.
const DIR_MODE: u32 = 0o755;

/// Creates `name` in `parent` for `owner` and returns it open. `EEXIST`,
/// `ELOOP` or `ENOTDIR` mean someone else created or replaced the name
/// meanwhile: the caller looks it up again.
pub(crate) fn create_at(parent: BorrowedFd<'_>, name: &OsStr, owner: Owner) -> Result<OwnedFd, Errno> {
    mkdirat(parent, name, Mode::from_bits_truncate(DIR_MODE))?;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = openat(parent, name, flags, Mode::empty())?;
    // A directory someone renamed into place meanwhile is theirs to keep:
    // only the one envd created (owned by envd) changes hands.
    if fstat(&dir)?.st_uid == geteuid().as_raw() {
        fchown(&dir, Some(Uid::from_raw(owner.uid)), Some(Gid::from_raw(owner.gid)))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn creates_a_directory_owned_by_the_user() {
        let root = std::env::temp_dir().join(format!("envd-dirs-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let parent = std::fs::File::open(&root).unwrap();
        let owner = Owner { uid: 1234, gid: 4321 };
        create_at(parent.as_fd(), OsStr::new("a"), owner).unwrap();
        let meta = std::fs::metadata(root.join("a")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 4321), "tests run as root");
        assert_eq!(create_at(parent.as_fd(), OsStr::new("a"), owner).unwrap_err(), Errno::EEXIST);
        std::fs::remove_dir_all(root).unwrap();
    }
}
