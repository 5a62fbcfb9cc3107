//! `EntryInfo` as the contract builds it (CONTRACT 3.10–3.11): from `lstat`
//! of the path, plus target lookups for symlinks, owner names from the
//! user database, and `user.e2b.*` metadata.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{FsError, base_name, display, xattr};
use crate::context::users;

/// What the wire calls `FileType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FileKind {
    /// Sockets, fifos, devices, broken symlinks.
    Unspecified,
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// One filesystem entry, ready to be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Last path element (`/` for the root).
    pub name: String,
    /// The type; a symlink reports its final target's type.
    pub kind: FileKind,
    /// The path the caller asked about.
    pub path: String,
    /// `lstat` size (a symlink's is the length of its text).
    pub size: i64,
    /// Permission bits only; a symlink's target's (0 when broken).
    pub mode: u32,
    /// Go's `FileMode` string of the `lstat` mode.
    pub permissions: String,
    /// Owner name, or the uid in decimal.
    pub owner: String,
    /// Group name, or the gid in decimal.
    pub group: String,
    /// `lstat` mtime as (seconds, nanoseconds); `None` when zero.
    pub modified: Option<(i64, i32)>,
    /// For symlinks: the fully resolved target, or the entry's own path.
    pub symlink_target: Option<String>,
    /// `user.e2b.<key>` attributes with the prefix removed.
    pub metadata: BTreeMap<String, String>,
    /// True for symlinks.
    pub is_symlink: bool,
}

/// What an entry reports of an `lstat`, from std's metadata or a raw
/// `fstatat` on a directory fd (listings: no path walk per entry).
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// `st_size`.
    pub size: u64,
    /// `st_mtime`, seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// `st_uid`.
    pub uid: u32,
    /// `st_gid`.
    pub gid: u32,
}

impl From<&Metadata> for Stat {
    fn from(meta: &Metadata) -> Self {
        Stat {
            mode: meta.mode(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

impl From<&libc::stat> for Stat {
    fn from(stat: &libc::stat) -> Self {
        Stat {
            mode: stat.st_mode,
            size: u64::try_from(stat.st_size).unwrap_or(0),
            mtime: (stat.st_mtime, stat.st_mtime_nsec),
            uid: stat.st_uid,
            gid: stat.st_gid,
        }
    }
}

impl Stat {
    fn format(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// Resolves uids and gids to names, reading the user database once per
/// distinct id (a listing of thousands of entries has a handful of owners).
#[derive(Debug, Default)]
pub struct Owners {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Owners {
    fn user(&mut self, uid: u32) -> String {
        self.users.entry(uid).or_insert_with(|| users::user_name(uid).unwrap_or_else(|| uid.to_string())).clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups.entry(gid).or_insert_with(|| users::group_name(gid).unwrap_or_else(|| gid.to_string())).clone()
    }
}

/// Where an entry is: a path the kernel can walk, and, when the caller has
/// it open, the directory holding it and its name there (looked up with
/// one step, not the walk of a `/proc/self/fd/N/name` path).
#[derive(Clone, Copy)]
pub struct Place<'a> {
    /// The entry's path (a `/proc/self/fd` one for an open directory).
    pub fs_path: &'a Path,
    /// The open directory holding it and its name there.
    pub in_dir: Option<(BorrowedFd<'a>, &'a OsStr)>,
}

impl<'a> Place<'a> {
    /// An entry known by its path only.
    pub fn path(fs_path: &'a Path) -> Self {
        Place { fs_path, in_dir: None }
    }
}

/// The entry at `path`, reported under `path`.
pub fn entry_info(path: &Path, owners: &mut Owners) -> Result<Entry, FsError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| FsError::io("lstat", path, e))?;
    Ok(entry_from(Place::path(path), &display(path), &Stat::from(&meta), owners))
}

/// The entry at `place` (already `lstat`ed as `meta`), reported as
/// `reported` (listings report paths under the requested, unresolved dir).
pub fn entry_from(place: Place<'_>, reported: &str, meta: &Stat, owners: &mut Owners) -> Entry {
    let fs_path = place.fs_path;
    let is_symlink = meta.format() == libc::S_IFLNK;
    let (kind, mode, symlink_target) = if is_symlink {
        let target = std::fs::metadata(fs_path).ok();
        let kind = target.as_ref().map_or(FileKind::Unspecified, |t| kind_of(t.file_type()));
        let mode = target.as_ref().map_or(0, |t| t.mode() & 0o777);
        let resolved = std::fs::canonicalize(fs_path).map_or_else(|_| reported.to_owned(), |p| display(&p));
        (kind, mode, Some(resolved))
    } else {
        let kind = match meta.format() {
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFREG => FileKind::File,
            _ => FileKind::Unspecified,
        };
        (kind, meta.mode & 0o777, None)
    };
    let modified = match meta.mtime {
        (0, 0) => None,
        // mtime_nsec is always in 0..1e9, so it fits an i32.
        (secs, nanos) => Some((secs, i32::try_from(nanos).unwrap_or(0))),
    };
    Entry {
        name: base_name(Path::new(reported)),
        kind,
        path: reported.to_owned(),
        size: i64::try_from(meta.size).unwrap_or(i64::MAX),
        mode,
        permissions: permissions_string(meta.mode),
        owner: owners.user(meta.uid),
        group: owners.group(meta.gid),
        modified,
        symlink_target,
        metadata: match place.in_dir {
            Some((dir, name)) => xattr::read_e2b_at(dir, name, fs_path),
            None => xattr::read_e2b(fs_path),
        },
        is_symlink,
    }
}

fn kind_of(file_type: std::fs::FileType) -> FileKind {
    if file_type.is_dir() {
        FileKind::Directory
    } else if file_type.is_file() {
        FileKind::File
    } else {
        FileKind::Unspecified
    }
}

/// Go's `FileMode.String()` for a Linux `st_mode`: one letter per set
/// type/attribute bit in Go's order `dalTLDpSugct?`, a `-` if none, then
/// `rwxrwxrwx` with `-` for unset bits.
pub fn permissions_string(st_mode: u32) -> String {
    let format = st_mode & libc::S_IFMT;
    // Go's bit order; only the letters Linux lstat can produce are set.
    let letters = [
        ('d', format == libc::S_IFDIR),
        ('L', format == libc::S_IFLNK),
        ('D', format == libc::S_IFBLK || format == libc::S_IFCHR),
        ('p', format == libc::S_IFIFO),
        ('S', format == libc::S_IFSOCK),
        ('u', st_mode & libc::S_ISUID != 0),
        ('g', st_mode & libc::S_ISGID != 0),
        ('c', format == libc::S_IFCHR),
        ('t', st_mode & libc::S_ISVTX != 0),
    ];
    let mut out: String = letters.iter().filter(|(_, set)| *set).map(|(c, _)| *c).collect();
    if out.is_empty() {
        out.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        out.push(if st_mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings_match_go() {
        let cases = [
            (libc::S_IFREG | 0o644, "-rw-r--r--"),
            (libc::S_IFDIR | 0o755, "drwxr-xr-x"),
            (libc::S_IFLNK | 0o777, "Lrwxrwxrwx"),
            (libc::S_IFDIR | libc::S_ISVTX | 0o777, "dtrwxrwxrwx"),
            (libc::S_IFREG | libc::S_ISUID | 0o755, "urwxr-xr-x"),
            (libc::S_IFDIR | libc::S_ISGID | 0o755, "dgrwxr-xr-x"),
            (libc::S_IFCHR | 0o666, "Dcrw-rw-rw-"),
            (libc::S_IFBLK | 0o660, "Drw-rw----"),
            (libc::S_IFIFO | 0o644, "prw-r--r--"),
            (libc::S_IFSOCK | 0o755, "Srwxr-xr-x"),
            (libc::S_IFREG, "----------"),
        ];
        for (mode, expected) in cases {
            assert_eq!(permissions_string(mode), expected, "{mode:o}");
        }
    }

    #[test]
    fn dev_null_is_a_char_device() {
        let meta = std::fs::symlink_metadata("/dev/null").unwrap();
        assert_eq!(permissions_string(meta.mode()), "Dcrw-rw-rw-");
        let entry = entry_info(Path::new("/dev/null"), &mut Owners::default()).unwrap();
        assert_eq!((entry.kind, entry.name.as_str(), entry.owner.as_str()), (FileKind::Unspecified, "null", "root"));
    }

    #[test]
    fn symlinks_report_their_target() {
        let dir = std::env::temp_dir().join(format!("envd-entry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("file"), b"hello").unwrap();
        std::os::unix::fs::symlink(dir.join("file"), dir.join("link")).unwrap();
        std::os::unix::fs::symlink("missing", dir.join("broken")).unwrap();
        let mut owners = Owners::default();
        let link = entry_info(&dir.join("link"), &mut owners).unwrap();
        assert_eq!(link.kind, FileKind::File);
        assert!(link.is_symlink && link.permissions.starts_with('L'));
        assert_eq!(link.symlink_target, Some(display(&std::fs::canonicalize(dir.join("file")).unwrap())));
        let broken = entry_info(&dir.join("broken"), &mut owners).unwrap();
        assert_eq!((broken.kind, broken.mode), (FileKind::Unspecified, 0));
        assert_eq!(broken.symlink_target.as_deref(), Some(broken.path.as_str()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
