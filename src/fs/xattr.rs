//! Extended attributes: the `user.e2b.*` metadata of uploads. Best effort
//! on read; on write, filesystems without xattr support are ignored.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Prefix of the attributes that carry upload metadata.
pub const E2B_PREFIX: &str = "user.e2b.";
/// Every user attribute (copied when an upload replaces a file).
const USER_PREFIX: &str = "user.";

/// What the calls act on: a path (following symlinks) or an open file.
#[derive(Clone, Copy)]
enum Target<'a> {
    Path(&'a CStr),
    Fd(BorrowedFd<'a>),
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Attribute names, NUL-separated as the kernel returns them.
fn list(target: Target<'_>) -> io::Result<Vec<u8>> {
    read_sized(|buf, len| match target {
        // SAFETY: `buf` is null with `len` 0 (a size query) or valid for
        // writes of `len` bytes; the path is NUL-terminated, the fd open.
        Target::Path(p) => unsafe { libc::listxattr(p.as_ptr(), buf.cast(), len) },
        // SAFETY: as above.
        Target::Fd(fd) => unsafe { libc::flistxattr(fd.as_raw_fd(), buf.cast(), len) },
    })
}

fn get(target: Target<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    read_sized(|buf, len| match target {
        // SAFETY: as in `list`; `name` is NUL-terminated.
        Target::Path(p) => unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf.cast(), len) },
        // SAFETY: as above.
        Target::Fd(fd) => unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf.cast(), len) },
    })
}

/// The xattr calls' size query, then the read, asked again when the value
/// grew in between (ERANGE). `call(null, 0)` returns the size needed.
fn read_sized(call: impl Fn(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = check(call(std::ptr::null_mut(), 0))?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match check(call(buf.as_mut_ptr(), buf.len())) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn set(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: name is NUL-terminated; value is valid for value.len() bytes.
    let ret = unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn remove(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: name is NUL-terminated and fd is valid.
    let ret = unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn names_with_prefix<'a>(list: &'a [u8], prefix: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    list.split(|b| *b == 0).filter(move |n| !n.is_empty() && n.starts_with(prefix.as_bytes()))
}

/// The `user.e2b.*` attributes of `path` (following symlinks), prefix
/// removed; names or values that are not UTF-8 are skipped.
pub fn read_e2b(path: &Path) -> BTreeMap<String, String> {
    let Ok(path) = cstring(path.as_os_str().as_bytes()) else { return BTreeMap::new() };
    read_prefixed(Target::Path(&path))
}

/// Like [`read_e2b`], for `name` in the open directory `dir`, which
/// `fs_path` also names. Where the kernel has `listxattrat` (Linux 6.13)
/// the names are listed with one lookup in `dir`, not a walk of
/// `/proc/self/fd/N/name` (a third of a listing's time); the values, which
/// few entries have, are read through `fs_path`.
pub fn read_e2b_at(dir: BorrowedFd<'_>, name: &OsStr, fs_path: &Path) -> BTreeMap<String, String> {
    let Ok(cname) = cstring(name.as_bytes()) else { return BTreeMap::new() };
    match list_at(dir, &cname) {
        Some(Ok(names)) if names_with_prefix(&names, E2B_PREFIX).next().is_none() => BTreeMap::new(),
        Some(Err(_)) => BTreeMap::new(),
        Some(Ok(_)) | None => read_e2b(fs_path),
    }
}

/// Whether `listxattrat` answered ENOSYS once: then it is never tried again.
static NO_LISTXATTRAT: AtomicBool = AtomicBool::new(false);

/// `listxattrat(dir, name, 0, …)` (following a final symlink, as
/// `listxattr`); `None` where the kernel lacks it.
fn list_at(dir: BorrowedFd<'_>, name: &CStr) -> Option<io::Result<Vec<u8>>> {
    // The generic syscall table's number, shared by x86_64 and aarch64.
    const SYS_LISTXATTRAT: libc::c_long = 465;
    if NO_LISTXATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    let listed = read_sized(|buf, len| {
        // SAFETY: `buf` is null with `len` 0 (a size query) or valid for
        // writes of `len` bytes; `name` is NUL-terminated, `dir` open.
        let ret = unsafe { libc::syscall(SYS_LISTXATTRAT, dir.as_raw_fd(), name.as_ptr(), 0, buf, len) };
        isize::try_from(ret).unwrap_or(-1)
    });
    match listed {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            NO_LISTXATTRAT.store(true, Ordering::Relaxed);
            None
        }
        other => Some(other),
    }
}

/// Like [`read_e2b`], on an open file.
pub fn read_e2b_fd(fd: BorrowedFd<'_>) -> BTreeMap<String, String> {
    read_prefixed(Target::Fd(fd))
}

fn read_prefixed(target: Target<'_>) -> BTreeMap<String, String> {
    let Ok(names) = list(target) else { return BTreeMap::new() };
    let mut out = BTreeMap::new();
    for name in names_with_prefix(&names, E2B_PREFIX) {
        let (Ok(cname), Ok(key)) = (cstring(name), std::str::from_utf8(&name[E2B_PREFIX.len()..])) else { continue };
        let Ok(value) = get(target, &cname) else { continue };
        if let Ok(value) = String::from_utf8(value) {
            out.insert(key.to_owned(), value);
        }
    }
    out
}

/// Makes the `user.e2b.*` attributes of `fd` exactly `metadata`. A
/// filesystem without xattr support is not an error.
pub fn write_e2b(fd: BorrowedFd<'_>, metadata: &BTreeMap<String, String>) -> io::Result<()> {
    let result = (|| -> io::Result<()> {
        let existing = list(Target::Fd(fd))?;
        for name in names_with_prefix(&existing, E2B_PREFIX) {
            let key = &name[E2B_PREFIX.len()..];
            if !metadata.keys().any(|k| k.as_bytes() == key) {
                remove(fd, &cstring(name)?)?;
            }
        }
        for (key, value) in metadata {
            set(fd, &cstring(format!("{E2B_PREFIX}{key}").as_bytes())?, value.as_bytes())?;
        }
        Ok(())
    })();
    match result {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(()),
        other => other,
    }
}

/// Copies the `user.*` attributes from `from` to `to`, so that replacing
/// a file keeps what other tools stored on it. Best effort.
pub fn copy_user_attrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
    let Ok(names) = list(Target::Fd(from)) else { return };
    for name in names_with_prefix(&names, USER_PREFIX) {
        let Ok(cname) = cstring(name) else { continue };
        if let Ok(value) = get(Target::Fd(from), &cname) {
            let _ = set(to, &cname, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn metadata_round_trip() {
        let dir = std::env::temp_dir().join(format!("envd-xattr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = std::fs::File::create(&path).unwrap();
        let mut md = BTreeMap::new();
        md.insert("a".to_owned(), "1".to_owned());
        md.insert("b".to_owned(), "two".to_owned());
        write_e2b(file.as_fd(), &md).unwrap();
        assert_eq!(read_e2b(&path), md);
        let opened = std::fs::File::open(&dir).unwrap();
        assert_eq!(read_e2b_at(opened.as_fd(), OsStr::new("f"), &path), md);
        std::fs::write(dir.join("plain"), b"").unwrap();
        assert!(read_e2b_at(opened.as_fd(), OsStr::new("plain"), &dir.join("plain")).is_empty());
        std::os::unix::fs::symlink("f", dir.join("link")).unwrap();
        assert_eq!(read_e2b_at(opened.as_fd(), OsStr::new("link"), &dir.join("link")), md, "through a symlink");
        // Kernels before 6.13: the names come from the path.
        NO_LISTXATTRAT.store(true, Ordering::Relaxed);
        assert_eq!(read_e2b_at(opened.as_fd(), OsStr::new("link"), &dir.join("link")), md);
        assert!(read_e2b_at(opened.as_fd(), OsStr::new("plain"), &dir.join("plain")).is_empty());
        md.remove("a");
        write_e2b(file.as_fd(), &md).unwrap();
        assert_eq!(read_e2b_fd(file.as_fd()), md);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
