//! The one place that forks and switches user. Everything the child needs
//! is built before the fork; the child only makes syscalls (no allocation,
//! no locks, no logging), then execs by itself so that a missing command
//! ends as exit status 127 with a message on stderr, as it would in a shell.
//!
//! Order in the child, and why:
//! 1. `setsid` (and, for a terminal, `TIOCSCTTY` on the new stdin);
//! 2. join the workload cgroup, raise `oom_score_adj` to 100, nice 0,
//!    best-effort I/O priority 4: undo envd's own raised priorities
//!    (done as root, before the switch);
//! 3. `setgroups` → `setgid` → `setuid`: groups and gid need privilege,
//!    so they go before the uid;
//! 4. drop every capability left (non-root users only);
//! 5. `chdir` as the user, so an unreadable cwd fails as it would for them;
//! 6. close every fd above 2, including those envd itself inherited without
//!    close-on-exec: the process gets its three streams and nothing else.
//!    Last, because only `execve` can fail after it, and the child reports
//!    that failure itself (the standard library's error pipe closes too);
//! 7. `execve`.

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::context::User;

/// How the child's standard streams are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// Separate stdout/stderr pipes; stdin a pipe or `/dev/null`.
    Pipes {
        /// Whether stdin is a pipe.
        stdin: bool,
    },
    /// A pseudo-terminal of this size as the controlling tty and stdio.
    Pty {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

/// Everything needed to start one process.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The command, as requested (searched on the child's `PATH`).
    pub program: &'a str,
    /// Its arguments.
    pub args: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    /// The working directory (already checked to exist).
    pub cwd: &'a Path,
    /// Who the process runs as.
    pub user: &'a User,
    /// Pipes or a terminal.
    pub stdio: StdioMode,
    /// An open `cgroup.procs` file of the cgroup to join, if any.
    pub cgroup_procs: Option<RawFd>,
}

/// A started child.
#[derive(Debug)]
pub struct Spawned {
    /// The child; stdout/stderr/stdin handles are set for pipes.
    pub child: tokio::process::Child,
    /// The terminal's master side, for a PTY process.
    pub pty_master: Option<OwnedFd>,
}

/// `oom_score_adj` of user processes: killed before envd under pressure.
const OOM_SCORE_ADJ: &[u8] = b"100";
/// Best-effort I/O class, priority 4 (`ionice -c 2 -n 4`).
const IOPRIO_BE_4: libc::c_int = (2 << 13) | 4;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Starts the process described by `spec`.
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let program_path = find_program(spec.program, spec.env);
    let mut prepared = Prepared::new(spec, &program_path)?;
    let mut command = std::process::Command::new(&program_path);
    let mut pty_master = None;
    match spec.stdio {
        StdioMode::Pipes { stdin } => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            command.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        }
        StdioMode::Pty { cols, rows } => {
            let size = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            let pty = nix::pty::openpty(Some(&size), None).map_err(io::Error::from)?;
            set_cloexec(&pty.master)?;
            set_cloexec(&pty.slave)?;
            command.stdin(Stdio::from(pty.slave.try_clone()?));
            command.stdout(Stdio::from(pty.slave.try_clone()?));
            command.stderr(Stdio::from(pty.slave));
            prepared.controlling_tty = true;
            pty_master = Some(pty.master);
        }
    }
    // SAFETY: `enter` only makes async-signal-safe syscalls on buffers
    // built above; it allocates nothing and takes no locks.
    unsafe {
        command.pre_exec(move || prepared.enter());
    }
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(false);
    let child = command.spawn()?;
    // `command` (and with it the parent's copies of the terminal's slave
    // side) is dropped here, so the master reads EIO once the child's
    // side is closed.
    Ok(Spawned { child, pty_master })
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(())
}

/// The path to exec: a name without `/` is looked up on the child's PATH;
/// when nothing matches, the name itself, so exec fails with ENOENT.
fn find_program(program: &str, env: &[(String, String)]) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let path_var = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("");
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if is_executable_file(&candidate) {
            return candidate;
        }
    }
    PathBuf::from(program)
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"))
}

/// The child's half, fully built before the fork.
struct Prepared {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    cwd: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    cgroup_procs: Option<RawFd>,
    controlling_tty: bool,
    not_found_message: Vec<u8>,
    denied_message: Vec<u8>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same
// struct; they are only read, in the forked child.
unsafe impl Send for Prepared {}
// SAFETY: as above; nothing is mutated through them.
unsafe impl Sync for Prepared {}

impl Prepared {
    fn new(spec: &SpawnSpec<'_>, program_path: &Path) -> io::Result<Self> {
        let path = cstring(program_path.as_os_str().as_bytes())?;
        let mut argv = vec![cstring(spec.program.as_bytes())?];
        for arg in spec.args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let envp =
            spec.env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<io::Result<Vec<_>>>()?;
        let argv_ptrs = argv.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envp_ptrs = envp.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        Ok(Prepared {
            path,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            cwd: cstring(spec.cwd.as_os_str().as_bytes())?,
            uid: spec.user.uid,
            gid: spec.user.gid,
            groups: spec.user.groups.clone(),
            cgroup_procs: spec.cgroup_procs,
            controlling_tty: false,
            not_found_message: format!("envd: exec {}: command not found\n", spec.program).into_bytes(),
            denied_message: format!("envd: exec {}: permission denied\n", spec.program).into_bytes(),
        })
    }

    /// Runs in the forked child. Returns only on failure before exec.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: plain syscalls on memory owned by `self`, which outlives
        // this call; every return value is checked.
        unsafe {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if self.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = self.cgroup_procs {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            lower_priorities();
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0
                || libc::setgid(self.gid) < 0
                || libc::setuid(self.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if self.uid != 0 {
                drop_capabilities()?;
            }
            if libc::chdir(self.cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            close_fds_above_stdio();
            libc::execve(self.path.as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr());
            // exec failed: report it as a shell would and exit like one.
            let errno = *libc::__errno_location();
            let (message, code) = if errno == libc::EACCES || errno == libc::ENOEXEC {
                (&self.denied_message, 126)
            } else {
                (&self.not_found_message, 127)
            };
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(code);
        }
    }
}

/// Best effort: a failure leaves the child with envd's own priorities.
///
/// SAFETY (caller): only in the forked child.
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

/// Closes fds 3 and up: `close_range`, or one by one up to the fd limit
/// on kernels older than 5.9.
///
/// SAFETY (caller): only in the forked child, right before `execve`.
unsafe fn close_fds_above_stdio() {
    // SAFETY: close_range(2) and getrlimit(2) take plain integers and a
    // struct owned by this frame; closing fds in the child affects only it.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) == 0 {
            return;
        }
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let highest = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 1024 };
        let highest = libc::c_int::try_from(highest.min(1 << 20)).unwrap_or(1 << 20);
        for fd in 3..highest {
            libc::close(fd);
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
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
/// SAFETY (caller): only in the forked child.
unsafe fn drop_capabilities() -> io::Result<()> {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: header and data are valid for the duration of the calls and
    // sized as the v3 ABI requires (two data words).
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        if libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
