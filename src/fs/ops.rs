//! Stat, ListDir, MakeDir, Move and Remove (CONTRACT 3.12), on paths the
//! caller has already resolved for its user. Blocking: run them off the
//! async workers.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, renameat};
use nix::sys::stat::Mode;
use nix::sys::stat::fstatat;
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::access::{Followed, Need, Perms};
use super::entry::{Entry, Owners, Place, Stat, entry_from};
use super::resolve::{Located, Walk, fd_path, locate, open_dir};
use super::{FsError, Owner, display};
use crate::context::paths::clean;

/// The entry at `path` (the link itself for a symlink).
pub fn stat(path: &Path) -> Result<Entry, FsError> {
    entry_at(&locate(path, Walk::default())?)
}

/// The entry `located` found, reported under the path as requested.
fn entry_at(located: &Located) -> Result<Entry, FsError> {
    let fs_path = located.fd_path();
    let stat = fstatat(located.dir(), located.name(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| FsError::io("lstat", located.path(), e.into()))?;
    let place = Place { fs_path: &fs_path, in_dir: Some((located.dir(), located.name())) };
    Ok(entry_from(place, &display(located.path()), &Stat::from(&stat), &mut Owners::default()))
}

/// The entries below `path` down to `depth` levels (0 counts as 1), in
/// pre-order, sorted by name within each directory, not following
/// symlinks below the root. Paths are reported under `path` as given.
pub fn list_dir(path: &Path, depth: u32) -> Result<Vec<Entry>, FsError> {
    let depth = depth.max(1);
    let (dir, located) = open_dir(path)?;
    let mut walk = Listing { depth, owners: Owners::default(), out: Vec::new(), followed: located.followed() };
    walk.dir(&fd_path(dir.as_fd()), &display(path), 1)?;
    Ok(walk.out)
}

struct Listing<'a> {
    depth: u32,
    owners: Owners,
    out: Vec<Entry>,
    /// Users whose symlinks led to the listed directory: each directory
    /// listed below it must be one they could list.
    followed: &'a Followed,
}

impl Listing<'_> {
    fn dir(&mut self, fs_dir: &Path, reported_dir: &str, level: u32) -> Result<(), FsError> {
        // One open of the directory serves its names and each entry's
        // stat: `fstatat` on its fd looks up one name, not the whole
        // /proc/self/fd path.
        let (dir, names) = match open_sorted(fs_dir) {
            Ok(listed) => listed,
            // Removed while we walked: skip it, like any vanished entry.
            Err(e) if e.kind() == ErrorKind::NotFound && level > 1 => return Ok(()),
            Err(e) => return Err(FsError::io_strict("read directory", Path::new(reported_dir), e)),
        };
        for name in names {
            let fs_child = fs_dir.join(&name);
            let stat = match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(FsError::io_strict("lstat", &fs_child, e.into())),
            };
            let reported = display(&clean(&Path::new(reported_dir).join(&name)));
            let place = Place { fs_path: &fs_child, in_dir: Some((dir.as_fd(), &name)) };
            self.out.push(entry_from(place, &reported, &Stat::from(&stat), &mut self.owners));
            let child = Perms::of(&stat);
            if child.is_dir() && level < self.depth {
                self.followed.check(Need::Read, child, Some(child), Path::new(&reported))?;
                self.dir(&fs_child, &reported, level + 1)?;
            }
        }
        Ok(())
    }
}

/// The directory, open, and its entry names in byte order, as Go's
/// directory walk.
fn open_sorted(path: &Path) -> std::io::Result<(Dir, Vec<OsString>)> {
    let mut dir = Dir::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    names.sort();
    Ok((dir, names))
}

/// Creates `path` and its missing parents for `owner`; an existing
/// directory is [`FsError::AlreadyExists`].
pub fn make_dir(path: &Path, owner: Owner) -> Result<Entry, FsError> {
    let located = locate(path, Walk { create: Some(owner), follow_final: false })?;
    // An existing name counts as what it leads to, as `mkdir -p` sees it.
    match fstatat(located.dir(), located.name(), AtFlags::empty()) {
        Ok(stat) if Perms::of(&stat).is_dir() => return Err(FsError::AlreadyExists(path.to_owned())),
        Ok(_) => return Err(FsError::NotADirectory(path.to_owned())),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(FsError::io_strict("stat", path, e.into())),
    }
    located.require(Need::ChangeEntry, None)?;
    match super::dirs::create_at(located.dir(), located.name(), owner) {
        Ok(_) => entry_at(&located),
        Err(Errno::EEXIST) => Err(FsError::AlreadyExists(path.to_owned())),
        Err(e) => Err(FsError::io_strict("mkdir", path, e.into())),
    }
}

/// Renames `source` to `destination`, creating the destination's missing
/// parents for `owner`. The moved entry keeps its owner.
pub fn rename(source: &Path, destination: &Path, owner: Owner) -> Result<Entry, FsError> {
    let from = locate(source, Walk::default())?;
    let moved = from.lstat()?.ok_or_else(|| FsError::NotFound(source.to_owned()))?;
    from.require(Need::Remove, Some(&moved))?;
    let to = locate(destination, Walk { create: Some(owner), follow_final: false })?;
    to.require(Need::ChangeEntry, to.lstat()?.as_ref())?;
    renameat(from.dir(), from.name(), to.dir(), to.name())
        .map_err(|e| FsError::io_strict("rename", source, e.into()))?;
    entry_at(&to)
}

/// Removes `path`, recursively for a directory; a missing path is success.
pub fn remove(path: &Path) -> Result<(), FsError> {
    let located = match locate(path, Walk::default()) {
        Ok(located) => located,
        Err(FsError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(entry) = located.lstat()? else { return Ok(()) };
    located.require(Need::Remove, Some(&entry))?;
    let result = if Perms::of(&entry).is_dir() {
        // Through the open parent: std's removal opens the last component
        // without following it and walks below it by descriptor.
        std::fs::remove_dir_all(located.fd_path())
    } else {
        unlinkat(located.dir(), located.name(), UnlinkatFlags::NoRemoveDir).map_err(std::io::Error::from)
    };
    match result {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| FsError::io_strict("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FileKind;

    fn tree() -> std::path::PathBuf {
        let root =
            std::env::temp_dir().join(format!("envd-ops-{}-{}", std::process::id(), crate::fs::random::lower_alnum(6)));
        for dir in ["b/c/d", "a"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("b/c/file"), b"x").unwrap();
        std::fs::write(root.join("z.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink(root.join("b"), root.join("link")).unwrap();
        root
    }

    fn names(entries: &[Entry], root: &Path) -> Vec<String> {
        entries.iter().map(|e| e.path.strip_prefix(&display(root)).unwrap_or(&e.path).to_owned()).collect()
    }

    #[test]
    fn listing_follows_depth_and_order() {
        let root = tree();
        assert_eq!(names(&list_dir(&root, 0).unwrap(), &root), ["/a", "/b", "/link", "/z.txt"]);
        assert_eq!(names(&list_dir(&root, 2).unwrap(), &root), ["/a", "/b", "/b/c", "/link", "/z.txt"]);
        assert_eq!(
            names(&list_dir(&root, 9).unwrap(), &root),
            ["/a", "/b", "/b/c", "/b/c/d", "/b/c/file", "/link", "/z.txt"]
        );
        // Through a symlinked directory, paths stay under the link.
        let via_link = list_dir(&root.join("link"), 1).unwrap();
        assert_eq!(via_link[0].path, display(&root.join("link/c")));
        assert!(matches!(list_dir(&root.join("z.txt"), 1), Err(FsError::NotADirectory(_))));
        assert!(matches!(list_dir(&root.join("nope"), 1), Err(FsError::NotFound(_))));
        remove(&root).unwrap();
        assert!(!root.exists());
        remove(&root).unwrap();
    }

    #[test]
    fn make_dir_and_rename() {
        let root = tree();
        let owner = Owner { uid: 0, gid: 0 };
        assert!(matches!(make_dir(&root.join("a"), owner), Err(FsError::AlreadyExists(_))));
        assert!(matches!(make_dir(&root.join("z.txt"), owner), Err(FsError::NotADirectory(_))));
        assert!(matches!(make_dir(&root.join("z.txt/sub"), owner), Err(FsError::ParentIsFile(_))));
        assert_eq!(make_dir(&root.join("n/m"), owner).unwrap().kind, FileKind::Directory);
        let moved = rename(&root.join("z.txt"), &root.join("new/dir/z.txt"), owner).unwrap();
        assert_eq!((moved.kind, moved.size), (FileKind::File, 5));
        assert!(matches!(rename(&root.join("z.txt"), &root.join("y"), owner), Err(FsError::NotFound(_))));
        remove(&root).unwrap();
    }
}
