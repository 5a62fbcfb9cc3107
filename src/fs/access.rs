//! The rule for symlinks planted by users: a symlink owned by a user other
//! than root is followed only where that user could go themselves (the
//! reasoning of Linux's `fs.protected_symlinks`). envd acts as root, so
//! without this a user's `~/data.txt -> /etc/shadow` would turn a request
//! made for them into a root read or write of the target.
//!
//! Once a resolution has followed such a link, its owner is "followed":
//! every further directory looked up in must be searchable by them, and the
//! final operation ([`Need`]) one they could do with their own permissions
//! (mode bits against their uid, primary group and supplementary groups).
//! Root's symlinks add nobody.

use std::path::{Path, PathBuf};

use nix::sys::stat::FileStat;

use super::FsError;
use crate::context::users;

const READ: u32 = 0o4;
const WRITE: u32 = 0o2;
const SEARCH: u32 = 0o1;

/// What an operation is about to do with the entry it resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Read it: a file's content, a directory's listing.
    Read,
    /// Replace an existing file's content, or create it when missing.
    Write,
    /// Create, replace or rename the entry in its directory.
    ChangeEntry,
    /// Remove or move it away; for a directory, also change what is in it.
    Remove,
}

impl Need {
    fn verb(self) -> &'static str {
        match self {
            Need::Read => "read",
            Need::Write => "write",
            Need::ChangeEntry => "create or replace entries in its directory",
            Need::Remove => "remove or move",
        }
    }
}

/// Ownership and mode of an inode, as the permission check needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Perms {
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Perms {
    /// From `fstat`/`fstatat`.
    pub(crate) fn of(stat: &FileStat) -> Self {
        Self { mode: stat.st_mode, uid: stat.st_uid, gid: stat.st_gid }
    }

    pub(crate) fn is_dir(self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// A user whose symlink a resolution followed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Follower {
    uid: u32,
    name: String,
    groups: Vec<u32>,
}

impl Follower {
    fn lookup(uid: u32) -> Self {
        // A uid without a passwd entry keeps only the "other" bits.
        match users::by_uid(uid) {
            Some(user) => Self { uid, name: user.name, groups: user.groups },
            None => Self { uid, name: uid.to_string(), groups: Vec::new() },
        }
    }

    /// Whether the mode bits grant `want` to this user: the owner class if
    /// they own it, else the group class if they are in its group, else
    /// the other class, exactly one of them, as the kernel checks.
    fn may(&self, perms: Perms, want: u32) -> bool {
        let class = if perms.uid == self.uid {
            perms.mode >> 6
        } else if self.groups.contains(&perms.gid) {
            perms.mode >> 3
        } else {
            perms.mode
        };
        class & want == want
    }

    /// In a sticky directory only the owner of an entry or of the
    /// directory may remove or rename it.
    fn may_unlink(&self, dir: Perms, entry: Perms) -> bool {
        dir.mode & libc::S_ISVTX == 0 || self.uid == dir.uid || self.uid == entry.uid
    }
}

/// The users whose symlinks a resolution has followed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Followed(Vec<Follower>);

impl Followed {
    /// Notes that a symlink owned by `uid` was followed.
    pub(crate) fn link_owned_by(&mut self, uid: u32) {
        if uid != 0 && !self.0.iter().any(|f| f.uid == uid) {
            self.0.push(Follower::lookup(uid));
        }
    }

    /// Whether nobody constrains this resolution.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses looking up a name in `dir` unless every follower may search it.
    pub(crate) fn check_search(&self, dir: Perms, path: &Path) -> Result<(), FsError> {
        match self.0.iter().find(|f| !f.may(dir, SEARCH)) {
            Some(f) => Err(denied(path, f, "search")),
            None => Ok(()),
        }
    }

    /// Refuses creating a directory in `dir` unless every follower could.
    pub(crate) fn check_create(&self, dir: Perms, path: &Path) -> Result<(), FsError> {
        match self.0.iter().find(|f| !f.may(dir, WRITE | SEARCH)) {
            Some(f) => Err(denied(path, f, Need::ChangeEntry.verb())),
            None => Ok(()),
        }
    }

    /// Refuses `need` on an entry (`None`: missing) of `dir` unless every
    /// follower could do it themselves.
    pub(crate) fn check(&self, need: Need, dir: Perms, entry: Option<Perms>, path: &Path) -> Result<(), FsError> {
        let allowed = |f: &Follower| {
            let change_entry = f.may(dir, WRITE | SEARCH) && entry.is_none_or(|e| f.may_unlink(dir, e));
            match need {
                Need::Read => entry.is_some_and(|e| f.may(e, if e.is_dir() { READ | SEARCH } else { READ })),
                Need::Write => match entry {
                    Some(e) => f.may(e, WRITE),
                    None => f.may(dir, WRITE | SEARCH),
                },
                Need::ChangeEntry => change_entry,
                Need::Remove => change_entry && entry.is_none_or(|e| !e.is_dir() || f.may(e, READ | WRITE | SEARCH)),
            }
        };
        match self.0.iter().find(|f| !allowed(f)) {
            Some(f) => Err(denied(path, f, need.verb())),
            None => Ok(()),
        }
    }
}

fn denied(path: &Path, follower: &Follower, action: &str) -> FsError {
    FsError::PermissionDenied {
        path: PathBuf::from(path),
        reason: format!(
            "refused to follow a symlink owned by another user ('{}'): that user may not {action} here",
            follower.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower(uid: u32, groups: &[u32]) -> Follower {
        Follower { uid, name: uid.to_string(), groups: groups.to_vec() }
    }

    fn perms(mode: u32, uid: u32, gid: u32) -> Perms {
        Perms { mode, uid, gid }
    }

    #[test]
    fn exactly_one_class_applies() {
        let user = follower(1000, &[1000, 27]);
        assert!(user.may(perms(0o600, 1000, 0), READ | WRITE));
        // The owner class wins even when "other" would allow more.
        assert!(!user.may(perms(0o077, 1000, 0), READ));
        assert!(user.may(perms(0o070, 0, 27), READ | WRITE | SEARCH));
        assert!(!user.may(perms(0o707, 0, 27), READ));
        assert!(user.may(perms(0o705, 0, 0), READ | SEARCH));
        assert!(!user.may(perms(0o755, 0, 0), WRITE));
    }

    #[test]
    fn needs_map_to_bits() {
        let mut followed = Followed::default();
        followed.0.push(follower(1000, &[1000]));
        let p = Path::new("/x");
        let root_dir = perms(libc::S_IFDIR | 0o755, 0, 0);
        let user_dir = perms(libc::S_IFDIR | 0o755, 1000, 1000);
        let sticky = perms(libc::S_IFDIR | 0o1777, 0, 0);
        let root_file = perms(libc::S_IFREG | 0o600, 0, 0);
        let shared_file = perms(libc::S_IFREG | 0o666, 0, 0);
        assert!(followed.check(Need::Read, root_dir, Some(root_file), p).is_err());
        assert!(followed.check(Need::Write, root_dir, Some(shared_file), p).is_ok());
        assert!(followed.check(Need::Write, root_dir, None, p).is_err());
        assert!(followed.check(Need::Write, user_dir, None, p).is_ok());
        assert!(followed.check(Need::ChangeEntry, sticky, Some(root_file), p).is_err());
        assert!(followed.check(Need::ChangeEntry, sticky, None, p).is_ok());
        assert!(followed.check(Need::Remove, user_dir, Some(root_dir), p).is_err());
        assert!(followed.check_search(perms(libc::S_IFDIR | 0o700, 0, 0), p).is_err());
        assert!(Followed::default().check(Need::Read, root_dir, None, p).is_ok());
        let message = followed.check(Need::Read, root_dir, Some(root_file), p).unwrap_err().to_string();
        assert!(message.contains("/x") && message.contains("symlink owned by another user"), "{message}");
    }
}
