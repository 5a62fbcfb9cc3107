//! The child side of a spawn, run the way `posix_spawn` runs it:
//! `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` onto a small stack of its
//! own. The child shares envd's memory (no page tables are copied, whatever
//! envd's size) and envd's calling thread waits until the child has exec'd
//! or exited, so the cost does not grow with the daemon.
//!
//! Sharing memory is what makes the rules strict. The child:
//! - makes raw syscalls only: no allocation, no lock, no glibc wrapper with
//!   process-wide bookkeeping (glibc's `setuid` would broadcast the change
//!   to every thread of envd, so ids are set with `setresuid` and friends
//!   as system calls);
//! - runs with every signal blocked until it has set each signal back to
//!   its default (envd's handlers must never run in it), then unblocks
//!   them all; ignored signals go back to their default too: SIGPIPE,
//!   which Rust ignores in envd, and whatever envd inherited ignored (a
//!   background job of a shell ignores SIGINT and SIGQUIT; kept, a
//!   terminal's Ctrl-C would not stop a command);
//! - reports a failure before `execve` through [`ChildPlan::failure`], which
//!   envd reads once the child has exited.
//!
//! Order in the child, and why:
//! 1. stdio onto 0, 1, 2 (`dup2` clears close-on-exec there);
//! 2. `setsid` (and, for a terminal, `TIOCSCTTY` on the new stdin);
//! 3. join the workload cgroup, raise `oom_score_adj` to 100, nice 0,
//!    best-effort I/O priority 4: undo envd's own raised priorities
//!    (done as root, before the switch);
//! 4. `setgroups` → `setresgid` → `setresuid`: groups and gid need
//!    privilege, so they go before the uid;
//! 5. drop every capability left (non-root users only);
//! 6. `chdir` as the user, so an unreadable cwd fails as it would for them;
//! 7. every fd above 2 close-on-exec (the cgroup file is written by then);
//! 8. signal dispositions and mask back to defaults;
//! 9. `execve`; when it fails, a shell's message on stderr and its exit
//!    status (126 or 127).

use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The child's stack. It runs a handful of syscall wrappers and nothing
/// that recurses; glibc's `posix_spawn` uses 32 KiB plus the arguments.
const CHILD_STACK: usize = 64 * 1024;
/// `oom_score_adj` of user processes: killed before envd under pressure.
const OOM_SCORE_ADJ: &[u8] = b"100";
/// Best-effort I/O class, priority 4 (`ionice -c 2 -n 4`).
const IOPRIO_BE_4: c_int = (2 << 13) | 4;
const IOPRIO_WHO_PROCESS: c_int = 1;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// Signals are numbered 1 to 64 on Linux.
const LAST_SIGNAL: c_int = 64;

/// Everything the child does, built before the clone.
pub(super) struct ChildPlan {
    pub(super) path: CString,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) cwd: CString,
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
    pub(super) groups: Vec<libc::gid_t>,
    /// fds for 0, 1 and 2, each above 2 (see [`above_stdio`]).
    pub(super) stdio: [RawFd; 3],
    pub(super) controlling_tty: bool,
    pub(super) cgroup_procs: Option<RawFd>,
    pub(super) not_found_message: Vec<u8>,
    pub(super) denied_message: Vec<u8>,
}

/// What the child reads: the plan plus pointers into it, and the slot it
/// reports a failure in.
struct Shared<'a> {
    plan: &'a ChildPlan,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// errno of the step that failed before `execve`, 0 if none did.
    failure: AtomicI32,
}

/// A started child: its pid and a pidfd that turns readable when it ends.
pub(super) struct Started {
    pub(super) pid: u32,
    pub(super) pidfd: OwnedFd,
}

/// Runs `plan` in a new process; returns once it has exec'd. A failure
/// before the exec is returned as its errno, the child reaped.
pub(super) fn spawn(plan: &ChildPlan) -> io::Result<Started> {
    let nul = std::iter::once(std::ptr::null());
    let shared = Shared {
        plan,
        argv: plan.argv.iter().map(|s| s.as_ptr()).chain(nul.clone()).collect(),
        envp: plan.envp.iter().map(|s| s.as_ptr()).chain(nul).collect(),
        failure: AtomicI32::new(0),
    };
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down from its end, 16-byte aligned as the ABI wants.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    let mut pidfd: c_int = -1;
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD;
    let all_blocked = BlockedSignals::block_all()?;
    // SAFETY: `child_main` follows the rules of the module doc; `shared`
    // and the stack outlive the child's use of them, since CLONE_VFORK
    // returns only after the child has exec'd or exited. The pidfd is
    // written to `pidfd` (CLONE_PIDFD uses the parent-tid argument).
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut c_void,
            flags,
            std::ptr::from_ref(&shared).cast_mut().cast(),
            &mut pidfd as *mut c_int,
        )
    };
    let clone_error = io::Error::last_os_error();
    drop(all_blocked);
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    // SAFETY: CLONE_PIDFD gave this fresh, close-on-exec descriptor to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let failure = shared.failure.load(Ordering::Acquire);
    if failure != 0 {
        // The child exited at once; reap it so no zombie is left.
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(failure));
    }
    Ok(Started { pid: pid.unsigned_abs(), pidfd })
}

/// `fd` itself when above 2, else a close-on-exec duplicate above 2: the
/// child moves its stdio onto 0, 1 and 2 one after another, so no source
/// may be one of them (envd may have been started with them closed).
pub(super) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd or -1.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Every signal blocked on this thread until dropped, so none is handled
/// by the child between the clone and its reset of the handlers.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn block_all() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask
        // write to valid pointers.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut before: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(Self(before))
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by block_all.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// The child. Never returns: it execs or exits.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` that `spawn` keeps alive until the
    // child has exec'd or exited.
    let shared = unsafe { &*arg.cast::<Shared<'_>>() };
    // SAFETY: called only here, in the cloned child, as its module requires.
    let errno = unsafe { prepare_and_exec(shared) };
    shared.failure.store(errno.max(1), Ordering::Release);
    // SAFETY: _exit ends the child without running anything of envd's.
    unsafe { libc::_exit(127) }
}

/// Steps 1–9 of the module doc; returns the errno of the step that failed
/// (exec failures end the child here instead).
///
/// SAFETY (caller): only in the child cloned by [`spawn`].
unsafe fn prepare_and_exec(shared: &Shared<'_>) -> c_int {
    let plan = shared.plan;
    // SAFETY: raw syscalls on memory owned by `plan` and `shared`, which
    // outlive the child's use of them; each result is checked.
    unsafe {
        for (target, source) in plan.stdio.iter().enumerate() {
            if libc::dup2(*source, target as c_int) < 0 {
                return errno();
            }
        }
        if libc::setsid() < 0 {
            return errno();
        }
        if plan.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return errno();
        }
        if let Some(fd) = plan.cgroup_procs {
            // "0" moves the writing process itself.
            if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                return errno();
            }
        }
        lower_priorities();
        if libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()) < 0
            || libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) < 0
            || libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) < 0
        {
            return errno();
        }
        if plan.uid != 0 && drop_capabilities() < 0 {
            return errno();
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return errno();
        }
        if cloexec_above_stdio() < 0 {
            return errno();
        }
        default_signals();
        libc::execve(plan.path.as_ptr(), shared.argv.as_ptr(), shared.envp.as_ptr());
        // exec failed: report it as a shell would and exit like one.
        let failed = errno();
        let (message, code) = if failed == libc::EACCES || failed == libc::ENOEXEC {
            (&plan.denied_message, 126)
        } else {
            (&plan.not_found_message, 127)
        };
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(code)
    }
}

/// The calling thread's errno, read without building anything.
fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot (in the
    // child: the slot of envd's waiting thread, whose value it overwrites
    // anyway on its next syscall).
    unsafe { *libc::__errno_location() }
}

/// Marks every fd above 2 close-on-exec, so the exec closes them all.
///
/// SAFETY (caller): only in the cloned child.
unsafe fn cloexec_above_stdio() -> c_int {
    // SAFETY: close_range only changes fd flags of this process (the child
    // has a fd table of its own: no CLONE_FILES).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return 0;
    }
    // Kernels before 5.11: flag each possible fd (no allocation here).
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit to a valid pointer; fcntl on a
    // closed fd fails harmlessly with EBADF.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) < 0 {
            return -1;
        }
        let top = limit.rlim_cur.min(1 << 20) as c_int;
        for fd in 3..top {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    0
}

/// Every signal back to its default, ignored ones too, then nothing
/// blocked: what a login session gets, however envd itself was started
/// (as systemd starts a service). Raw `rt_sigaction`: glibc's wrapper
/// refuses its own two internal signals, which would stay as envd has them.
///
/// SAFETY (caller): only in the cloned child, whose signal handlers are its
/// own copy (no CLONE_SIGHAND).
unsafe fn default_signals() {
    /// The kernel's `struct sigaction`: handler, flags, restorer, mask; all
    /// zero is SIG_DFL with no flags.
    const KERNEL_SIGACTION: [u64; 4] = [0; 4];
    const KERNEL_SIGSET_BYTES: usize = 8;
    // SAFETY: rt_sigaction reads one kernel sigaction from a valid array;
    // SIGKILL and SIGSTOP refuse the change harmlessly.
    unsafe {
        for signal in 1..=LAST_SIGNAL {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                KERNEL_SIGACTION.as_ptr(),
                std::ptr::null_mut::<c_void>(),
                KERNEL_SIGSET_BYTES,
            );
        }
        let none: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<c_void>(),
            KERNEL_SIGSET_BYTES,
        );
    }
}

/// Best effort: a failure leaves the child with envd's own priorities.
///
/// SAFETY (caller): only in the cloned child.
unsafe fn lower_priorities() {
    // SAFETY: plain syscalls with constant arguments; the path is a
    // NUL-terminated literal.
    unsafe {
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, OOM_SCORE_ADJ.as_ptr().cast(), OOM_SCORE_ADJ.len());
            libc::close(fd);
        }
        libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_BE_4);
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears the permitted, effective, inheritable and ambient sets. The
/// bounding set stays, so setuid programs such as sudo keep working.
///
/// SAFETY (caller): only in the cloned child.
unsafe fn drop_capabilities() -> c_int {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: header and data are valid for the duration of the calls and
    // sized as the v3 ABI requires (two data words).
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) as c_int
    }
}
