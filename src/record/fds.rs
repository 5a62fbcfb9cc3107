//! Fds that go to the next image of envd by number. Each module's part of
//! the upgrade handover names the fds it holds, duplicated for the exec
//! as the part is exported ([`Carry`]); in the new image the upgrade
//! checks that every
//! named fd was carried before any module takes one, so a handover that
//! names a wrong fd is refused as a whole.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Duplicates an fd for the next image, returning the duplicate's number
/// (the number the handover names it by).
pub type Carry<'a> = dyn FnMut(RawFd) -> std::io::Result<RawFd> + 'a;

/// Duplicates `fd` close-on-exec into `carried` (which owns it from then
/// on) and returns the duplicate's number: what each part's fds go
/// through on their way to the next image.
pub fn carry_into(fd: RawFd, carried: &mut Vec<OwnedFd>) -> std::io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd the caller holds open.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    carried.push(unsafe { OwnedFd::from_raw_fd(dup) });
    Ok(dup)
}

/// A handover part that names fds.
pub trait NamesFds {
    /// Every fd the part names, for the incoming image to check that each
    /// was carried before any is taken.
    fn fds_mut(&mut self) -> Vec<&mut RawFd>;
}

impl<T: NamesFds> NamesFds for Vec<T> {
    fn fds_mut(&mut self) -> Vec<&mut RawFd> {
        self.iter_mut().flat_map(NamesFds::fds_mut).collect()
    }
}

/// The fds carried across the exec that the handover's parts name, each
/// taken at most once by the module whose part names it.
#[derive(Debug, Default)]
pub struct CarriedFds {
    fds: BTreeMap<RawFd, OwnedFd>,
}

impl CarriedFds {
    /// Carried fds by the number the handover names them with.
    pub fn new(fds: BTreeMap<RawFd, OwnedFd>) -> Self {
        Self { fds }
    }

    /// The fd named `fd`, unless it was taken already or never carried.
    pub fn take(&mut self, fd: RawFd) -> Option<OwnedFd> {
        self.fds.remove(&fd)
    }

    /// [`CarriedFds::take`] of an fd a part may or may not name.
    pub fn take_named(&mut self, fd: Option<RawFd>) -> Option<OwnedFd> {
        fd.and_then(|fd| self.take(fd))
    }
}

/// Carrying as the upgrade does it, for the modules' round-trip tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};

    use super::CarriedFds;

    /// The duplicates, by their numbers, as the next image claims them.
    pub(crate) fn claimed(carried: Vec<OwnedFd>) -> CarriedFds {
        CarriedFds::new(carried.into_iter().map(|fd| (fd.as_raw_fd(), fd)).collect())
    }

    /// The inode of an open fd: the same socket or pipe whatever its number.
    pub(crate) fn inode(fd: RawFd) -> u64 {
        // SAFETY: the caller holds `fd` open for the duration of the call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        nix::sys::stat::fstat(fd).map(|st| st.st_ino).unwrap_or(0)
    }
}
