//! Uploads written into the existing file instead of replacing it.
//!
//! An upload normally replaces its target by renaming a finished temporary
//! file over it (`transfer`): a cut-off upload then never leaves a torn
//! file. That is wrong where the target is more than a name:
//!
//! | target | why a rename is wrong | written |
//! |---|---|---|
//! | a regular file with other hard links | the other names keep the old content | in place, truncated |
//! | a mount point (a bind-mounted file) | `rename` fails with `EBUSY` | in place, truncated |
//! | a file on a kernel filesystem (`/proc`, `/sys`, cgroup, debugfs, ...) | no temporary can be made there, and the write is a command to the kernel | in place, `O_TRUNC` |
//! | a FIFO, a device, a socket | the node is the interface; replacing it cuts off its users | in place, not truncated |
//!
//! Order of effects in [`open`]: the target found by the resolver is
//! opened `O_PATH` without following it and classified from that one
//! descriptor (`fstat`, `fstatfs`, `statx` mount-root bit); a target to
//! write in place is reopened for writing through `/proc/self/fd`, which
//! names exactly that inode, never the path again. `O_NONBLOCK` on that
//! open makes a FIFO without a reader fail (`ENXIO`) instead of hanging a
//! worker; it is cleared right after so that writes wait for the reader.
//! A file on an ordinary filesystem is then `fchown`ed to the user and
//! truncated, in that order, as the reference does (watchers see a chmod,
//! then a write). Files on kernel filesystems, devices and FIFOs keep
//! their owner: handing `/dev/null` or a `/sys` knob to the uploading user
//! would change who may use it.
//!
//! Durability: an in-place write is fsync'd before the upload is
//! acknowledged where the filesystem stores data (hard links, mount
//! points); a cut-off upload leaves the target truncated and partly
//! written, which is what writing to such a target means.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::{FileStat, fstat};

use super::resolve::{Located, fd_path};
use super::{FsError, Owner};

/// `f_type` of filesystems whose files are kernel interfaces, not data:
/// proc, sysfs, cgroup, cgroup2, devpts, debugfs, tracefs, securityfs,
/// bpf, configfs, efivarfs, pstore, binfmt_misc, fusectl, selinuxfs, mqueue.
const KERNEL_FS_MAGICS: [u64; 16] = [
    0x9fa0,
    0x6265_6572,
    0x0027_e0eb,
    0x6367_7270,
    0x1cd1,
    0x6462_6720,
    0x7472_6163,
    0x7363_6673,
    0xcafe_4a11,
    0x6265_6570,
    0xde5e_81e4,
    0x6165_676c,
    0x4249_4e4d,
    0x6573_5543,
    0xf97c_ff8c,
    0x1980_0202,
];

/// Why a target is written in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InPlace {
    /// A regular file with more than one hard link.
    HardLinked,
    /// A regular file that is a mount point.
    MountPoint,
    /// A file on a kernel filesystem.
    KernelFs,
    /// A FIFO, device or socket.
    Node,
}

impl InPlace {
    /// Whether the file stores data: fsync it, give it to the user, keep
    /// metadata on it.
    pub(crate) fn stores_data(self) -> bool {
        matches!(self, InPlace::HardLinked | InPlace::MountPoint)
    }
}

/// The existing target to write in place, opened for writing, or `None`
/// when it is to be replaced by rename (see the module docs).
pub(crate) fn open(target: &Located, owner: Owner) -> Result<Option<(File, InPlace)>, FsError> {
    let node = match target.open(OFlag::O_PATH) {
        Ok(node) => node,
        Err(FsError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let stat = fstat(&node).map_err(|e| FsError::io_strict("stat", target.path(), e.into()))?;
    let Some(kind) = classify(node.as_fd(), &stat) else { return Ok(None) };
    let file = reopen_for_write(&node, kind).map_err(|e| FsError::io("open", target.path(), e))?;
    if kind.stores_data() {
        std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
            .map_err(|e| FsError::io_strict("chown", target.path(), e))?;
        file.set_len(0).map_err(|e| FsError::io_strict("truncate", target.path(), e))?;
    }
    Ok(Some((file, kind)))
}

fn classify(node: BorrowedFd<'_>, stat: &FileStat) -> Option<InPlace> {
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            if is_kernel_fs(node) {
                Some(InPlace::KernelFs)
            } else if stat.st_nlink > 1 {
                Some(InPlace::HardLinked)
            } else if is_mount_root(node) {
                Some(InPlace::MountPoint)
            } else {
                None
            }
        }
        libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK => Some(InPlace::Node),
        _ => None,
    }
}

fn reopen_for_write(node: &OwnedFd, kind: InPlace) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    if kind == InPlace::KernelFs {
        options.truncate(true);
    }
    let file = options.open(fd_path(node.as_fd()))?;
    let flags = fcntl(&file, FcntlArg::F_GETFL)?;
    let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&file, FcntlArg::F_SETFL(blocking))?;
    Ok(file)
}

fn is_kernel_fs(node: BorrowedFd<'_>) -> bool {
    let Ok(stat) = nix::sys::statfs::fstatfs(node) else { return false };
    // f_type is a signed word on some ABIs; the magics are 32-bit values.
    #[allow(clippy::cast_sign_loss)]
    let magic = (stat.filesystem_type().0 as u64) & 0xFFFF_FFFF;
    KERNEL_FS_MAGICS.contains(&magic)
}

/// Whether the file open as `node` is the root of a mount (a file bind
/// mount); kernels without the `statx` bit say no.
fn is_mount_root(node: BorrowedFd<'_>) -> bool {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut out: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC;
    // SAFETY: the path is a NUL-terminated empty string, `node` is a live
    // descriptor and `out` is a valid, writable statx buffer.
    let rc = unsafe { libc::statx(node.as_raw_fd(), c"".as_ptr(), flags, 0, &raw mut out) };
    let bit = u64::try_from(libc::STATX_ATTR_MOUNT_ROOT).unwrap_or(0);
    rc == 0 && out.stx_attributes_mask & bit != 0 && out.stx_attributes & bit != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn kind_of(path: &str) -> Option<InPlace> {
        let file = File::open(path).unwrap();
        classify(file.as_fd(), &fstat(&file).unwrap())
    }

    #[test]
    fn classifies_kernel_files_devices_and_ordinary_files() {
        assert_eq!(kind_of("/proc/self/comm"), Some(InPlace::KernelFs));
        assert_eq!(kind_of("/dev/null"), Some(InPlace::Node));
        let dir = std::env::temp_dir().join(format!("envd-inplace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert_eq!(kind_of(plain.to_str().unwrap()), None);
        std::fs::hard_link(&plain, dir.join("other")).unwrap();
        assert_eq!(kind_of(plain.to_str().unwrap()), Some(InPlace::HardLinked));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
