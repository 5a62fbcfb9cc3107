//! The one place that starts a process and switches user. Everything the
//! child needs is built here, before the clone; the child's side is
//! [`super::vfork`], which only makes syscalls (no allocation, no locks, no
//! logging), then execs by itself so that a missing command ends as exit
//! status 127 with a message on stderr, as it would in a shell. The order of
//! the child's steps, and why, is documented there.
//!
//! No fd of envd's reaches the child: everything envd opens is
//! close-on-exec from the moment it exists (the terminal pair and the
//! stdio pipes too, see [`open_pty`]), and the child marks every fd above 2
//! close-on-exec before it execs, which also covers fds envd inherited from
//! whoever started it. A fd created without the flag and flagged afterwards
//! would leak into any child started in between: a root terminal's master
//! in a user's process.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::vfork::{self, ChildPlan, above_stdio};
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
    /// Its pid (a child of envd).
    pub pid: u32,
    /// Turns readable when the child ends; waited on with `waitid`.
    pub pidfd: OwnedFd,
    /// Write end of its stdin pipe, for pipes with stdin.
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout pipe, for pipes.
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr pipe, for pipes.
    pub stderr: Option<OwnedFd>,
    /// The terminal's master side, for a PTY process.
    pub pty_master: Option<OwnedFd>,
}

/// Starts the process described by `spec`.
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let program_path = find_program(spec.program, spec.env);
    // The child's ends are closed in envd when this returns, so a reader
    // sees EOF, and the terminal's master EIO, once the child's copies are.
    let (child_ends, ours, controlling_tty) = match spec.stdio {
        StdioMode::Pipes { stdin } => {
            let (stdin_child, stdin_ours) = if stdin {
                let (read, write) = pipe()?;
                (read, Some(write))
            } else {
                (dev_null()?, None)
            };
            let (stdout_ours, stdout_child) = pipe()?;
            let (stderr_ours, stderr_child) = pipe()?;
            ([stdin_child, stdout_child, stderr_child], (stdin_ours, Some(stdout_ours), Some(stderr_ours), None), false)
        }
        StdioMode::Pty { cols, rows } => {
            let (master, slave) = open_pty(cols, rows)?;
            ([slave.try_clone()?, slave.try_clone()?, slave], (None, None, None, Some(master)), true)
        }
    };
    let [stdin_end, stdout_end, stderr_end] = child_ends;
    let child_ends = [above_stdio(stdin_end)?, above_stdio(stdout_end)?, above_stdio(stderr_end)?];
    let plan = plan(spec, &program_path, &child_ends, controlling_tty)?;
    let started = vfork::spawn(&plan)?;
    let (stdin, stdout, stderr, pty_master) = ours;
    Ok(Spawned { pid: started.pid, pidfd: started.pidfd, stdin, stdout, stderr, pty_master })
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// `/dev/null` for a child's stdin, close-on-exec.
fn dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?.into())
}

/// A terminal pair of this size, both ends close-on-exec from the start:
/// `posix_openpt(O_CLOEXEC)` for the master, `TIOCGPTPEER` for the slave
/// (which also opens the very slave of this master, never a path).
fn open_pty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from a pointer valid for the
    // call; TIOCGPTPEER takes open flags and returns a new fd or -1.
    let slave = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `slave` is a fresh fd that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // The master as a plain fd: PtyMaster and the handover take OwnedFd.
    // SAFETY: `into_raw_fd` gives up ownership of a valid open fd.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    Ok((master, slave))
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

/// The child's side of `spec`, with `stdio` as its fds 0, 1 and 2.
fn plan(
    spec: &SpawnSpec<'_>,
    program_path: &Path,
    stdio: &[OwnedFd; 3],
    controlling_tty: bool,
) -> io::Result<ChildPlan> {
    let mut argv = vec![cstring(spec.program.as_bytes())?];
    for arg in spec.args {
        argv.push(cstring(arg.as_bytes())?);
    }
    let envp = spec.env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<io::Result<Vec<_>>>()?;
    Ok(ChildPlan {
        path: cstring(program_path.as_os_str().as_bytes())?,
        argv,
        envp,
        cwd: cstring(spec.cwd.as_os_str().as_bytes())?,
        uid: spec.user.uid,
        gid: spec.user.gid,
        groups: spec.user.groups.clone(),
        stdio: stdio.each_ref().map(AsRawFd::as_raw_fd),
        controlling_tty,
        cgroup_procs: spec.cgroup_procs,
        not_found_message: format!("envd: exec {}: command not found\n", spec.program).into_bytes(),
        denied_message: format!("envd: exec {}: permission denied\n", spec.program).into_bytes(),
    })
}
