//! Waiting for a child to end, through a pidfd: the one its clone returned
//! for a child started here, a new one for a child adopted from an earlier
//! image of envd (still our child).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

use super::status::EndStatus;

const P_PIDFD: libc::idtype_t = 3;

/// How the end of one child is learned.
#[derive(Debug)]
pub(super) enum Waiter {
    /// A pidfd turns readable when the child ends.
    Pidfd(AsyncFd<OwnedFd>),
    /// Adopted after it had been reaped already.
    Reaped(EndStatus),
}

impl Waiter {
    /// A pidfd waiter for a child of this process.
    pub(super) fn pidfd(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        Self::from_pidfd(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    /// A waiter on `pidfd`, a pidfd of a child of this process.
    pub(super) fn from_pidfd(fd: OwnedFd) -> std::io::Result<Self> {
        // SAFETY: the AsyncFd owns the pidfd for its whole life and nothing
        // closes or replaces it behind its back.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Waiter::Pidfd(fd))
    }

    /// Waits for the end and reaps the child; cancel-safe.
    pub(super) async fn wait(&mut self) -> EndStatus {
        match self {
            Waiter::Reaped(end) => end.clone(),
            Waiter::Pidfd(fd) => loop {
                let mut ready = match fd.readable().await {
                    Ok(ready) => ready,
                    Err(err) => return EndStatus::from_wait_error(&err),
                };
                match reap(fd.get_ref()) {
                    Ok(Some(status)) => return EndStatus::from_exit(status),
                    Ok(None) => ready.clear_ready(),
                    Err(err) => return EndStatus::from_wait_error(&err),
                }
            },
        }
    }
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG)`: the status, or `None` if running.
fn reap(pidfd: &OwnedFd) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes one siginfo_t to a pointer valid for the call.
    let rc =
        unsafe { libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}
