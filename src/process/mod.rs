//! Processes and terminals: spawning as a user, the process table, output
//! fan-out to any number of watchers, input, signals and deadlines; and
//! adopting a running child (its pid and fds) that an earlier image of
//! envd started. Every pump, reaper and start runs through the table's
//! [`gate`], so all of them can be held still at once.

mod fanout;
mod gate;
mod handle;
mod handover;
mod kill;
mod pty;
pub mod reaper;
mod record;
pub mod spawn;
pub mod status;
mod table;
mod tree;
mod vfork;
mod waiter;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

pub use fanout::{Event, Output, Subscription};
pub use gate::{PauseTimeout, Paused};
pub use handle::ProcessHandle;
#[cfg(test)]
pub(crate) use handover::testing;
pub use handover::{ProcessesPart, Resumed};
pub use kill::{KillReport, kill};
pub use record::ProcessRecord;
pub use status::EndStatus;
pub use table::{Ended, Found, ProcessTable, Selector};
use waiter::Waiter;

use crate::context::User;
use crate::host::cgroups::Placement;
use spawn::{SpawnSpec, StdioMode};
use tree::ProcessTree;

/// Bytes per read from a stdout/stderr pipe.
const PIPE_CHUNK: usize = 32 * 1024;
/// Bytes per read from a terminal.
const PTY_CHUNK: usize = 16 * 1024;
/// First wait before the terminal is read again after it reported every
/// slave closed while the process runs; doubled up to 64 times that.
const PTY_REREAD_FIRST: std::time::Duration = std::time::Duration::from_millis(10);

/// What went wrong with a process request.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// No live process matches.
    #[error("process with {0} not found")]
    NotFound(Selector),
    /// The requested working directory does not exist.
    #[error("cwd '{0}' does not exist")]
    CwdMissing(String),
    /// fork/exec failed.
    #[error("error starting process '{command}': {source}")]
    Spawn {
        /// The command that failed.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A terminal size of zero rows or columns.
    #[error("invalid terminal size {cols}x{rows}: rows and cols must be at least 1")]
    BadTerminalSize {
        /// Columns asked for.
        cols: u32,
        /// Rows asked for.
        rows: u32,
    },
    /// Stdin was not requested or is closed.
    #[error("stdin not enabled or closed")]
    StdinClosed,
    /// Stdin input sent to a terminal process.
    #[error("process has a terminal: send pty input instead of stdin")]
    NotPipe,
    /// Terminal input or resize for a process without one.
    #[error("tty not assigned to process")]
    NotPty,
    /// CloseStdin on a terminal process.
    #[error("cannot close stdin for PTY: send 0x04 (Ctrl-D) instead")]
    CloseStdinOfPty,
    /// Writing input failed.
    #[error("error writing input: {0}")]
    Input(std::io::Error),
    /// Sending a signal failed.
    #[error("error sending signal: {0}")]
    Signal(std::io::Error),
    /// Any other system error.
    #[error("{0}")]
    Io(std::io::Error),
}

/// A command as requested; `List` reports it back unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandConfig {
    /// The program.
    pub cmd: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The request's own env vars. Never serialised: env values are
    /// secrets, which whoever writes a command down carries apart (the
    /// upgrade: in its sealed memfd, see [`ProcessesPart::envs`]).
    #[serde(skip)]
    pub envs: BTreeMap<String, String>,
    /// The unresolved cwd, if one was sent.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Everything resolved for one start.
#[derive(Debug)]
pub struct StartSpec {
    /// The command as requested.
    pub config: CommandConfig,
    /// Optional label for selectors.
    pub tag: Option<String>,
    /// The user to run as.
    pub user: User,
    /// Resolved working directory.
    pub cwd: PathBuf,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Pipes (with or without stdin) or a terminal.
    pub stdio: StdioMode,
    /// The process is killed when this passes.
    pub deadline: Option<Instant>,
    /// The cgroup to join.
    pub placement: Placement,
}

/// A started process and the starter's subscription to it.
#[derive(Debug)]
pub struct Started {
    /// Its pid, for the start event.
    pub pid: u32,
    /// The process, for whoever keeps track of it.
    pub handle: Arc<ProcessHandle>,
    /// Events from the first byte of output on.
    pub events: tokio::sync::mpsc::Receiver<Event>,
}

/// Starts a process, registers it, and subscribes the caller before any
/// output is read, so the starter sees every byte. Waits while the table
/// is paused.
pub async fn start(table: &Arc<ProcessTable>, spec: StartSpec) -> Result<Started, ProcessError> {
    if let StdioMode::Pty { cols, rows } = spec.stdio
        && (cols == 0 || rows == 0)
    {
        return Err(ProcessError::BadTerminalSize { cols: cols.into(), rows: rows.into() });
    }
    if !spec.cwd.is_dir() {
        return Err(ProcessError::CwdMissing(spec.cwd.display().to_string()));
    }
    let _step = table.gate().step().await;
    let spawn_error = |source| ProcessError::Spawn { command: spec.config.cmd.clone(), source };
    let spawning = table.children().spawning();
    let spawned = spawn::spawn(&SpawnSpec {
        program: &spec.config.cmd,
        args: &spec.config.args,
        env: &spec.env,
        cwd: &spec.cwd,
        user: &spec.user,
        stdio: spec.stdio,
        cgroup_procs: spec.placement.procs_fd(),
    })
    .map_err(spawn_error)?;
    let pid = spawned.pid;
    spawning.register(pid);
    let tree = match spec.placement {
        Placement::Own(cgroup) => ProcessTree::Cgroup(cgroup),
        Placement::Outside | Placement::Shared(_) => ProcessTree::Walk,
    };
    let waiter = Waiter::from_pidfd(spawned.pidfd).map_err(ProcessError::Io)?;
    let fds = Fds { stdout: spawned.stdout, stderr: spawned.stderr, stdin: spawned.stdin, pty: spawned.pty_master };
    let entry = Entry { pid, tag: spec.tag, config: spec.config, fds, tree, deadline: spec.deadline, reaped: None };
    let (handle, readers, subscription) = register(table, entry, None)?;
    let Some(Subscription::Live(events)) = subscription else {
        unreachable!("a process that was just created has not ended");
    };
    tokio::spawn(supervise(table.clone(), handle.clone(), waiter, readers, spec.deadline));
    Ok(Started { pid, handle, events })
}

/// A process's own fds, owned.
#[derive(Debug, Default)]
pub struct Fds {
    /// Read end of its stdout pipe.
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr pipe.
    pub stderr: Option<OwnedFd>,
    /// Write end of its stdin pipe, while open.
    pub stdin: Option<OwnedFd>,
    /// Its terminal's master side.
    pub pty: Option<OwnedFd>,
}

/// A process to enter in the table, started here or adopted.
struct Entry {
    pid: u32,
    tag: Option<String>,
    config: CommandConfig,
    fds: Fds,
    tree: ProcessTree,
    deadline: Option<Instant>,
    reaped: Option<EndStatus>,
}

/// The handle, its pump tasks, and the starter's subscription.
type Registered = (Arc<ProcessHandle>, Vec<tokio::task::JoinHandle<()>>, Option<Subscription>);

/// Builds the handle, enters it in the table, subscribes (so the first
/// subscriber sees every byte) and starts its pumps.
/// `backlog`: an adopted process, whose output is kept (this many bytes)
/// for its first subscriber.
fn register(table: &Arc<ProcessTable>, entry: Entry, backlog: Option<usize>) -> Result<Registered, ProcessError> {
    let Entry { pid, tag, config, fds, tree, deadline, reaped } = entry;
    let receiver = |fd: Option<OwnedFd>| fd.map(pipe::Receiver::from_owned_fd).transpose().map_err(ProcessError::Io);
    let stdout = receiver(fds.stdout)?;
    let stderr = receiver(fds.stderr)?;
    let stdin = fds.stdin.map(pipe::Sender::from_owned_fd).transpose().map_err(ProcessError::Io)?;
    let input = match fds.pty {
        Some(master) => handle::Input::Pty(pty::PtyMaster::new(master).map_err(ProcessError::Io)?),
        None => handle::Input::pipe(stdin),
    };
    let outputs = [stdout.as_ref().map(AsRawFd::as_raw_fd), stderr.as_ref().map(AsRawFd::as_raw_fd)];
    let parts = handle::Parts { input, outputs, deadline, gate: table.gate().clone(), tree, backlog, reaped };
    let handle = Arc::new(ProcessHandle::new(pid, tag, config, parts));
    table.insert(handle.clone());
    // An adopted process keeps its output for whoever subscribes first.
    let subscription = backlog.is_none().then(|| handle.subscribe());
    let mut readers = Vec::new();
    if handle.is_pty() {
        readers.push(tokio::spawn(pump_pty(handle.clone())));
    }
    if let Some(stdout) = stdout {
        readers.push(tokio::spawn(pump(handle.clone(), stdout, Output::Stdout)));
    }
    if let Some(stderr) = stderr {
        readers.push(tokio::spawn(pump(handle.clone(), stderr, Output::Stderr)));
    }
    Ok((handle, readers, subscription))
}

/// Each chunk is read into its own buffer and handed on without a copy:
/// with one subscriber (the usual case) the same allocation ends up in the
/// encoded message. A pause cancels a pending read, which loses nothing.
async fn pump(handle: Arc<ProcessHandle>, reader: pipe::Receiver, output: Output) {
    let mut open = OpenOutput { handle: handle.clone(), output, reader };
    loop {
        let _step = handle.gate.step().await;
        let mut chunk = Vec::with_capacity(PIPE_CHUNK);
        tokio::select! {
            read = open.reader.read_buf(&mut chunk) => match read {
                Ok(0) => return,
                Err(err) => return output_lost(&handle, output, &err),
                Ok(_) => handle.broadcast(output, Bytes::from(chunk)).await,
            },
            () = handle.gate.pause_requested() => {}
        }
    }
}

/// A pump's pipe: unlisted from the handle's fds before it closes, however
/// the pump ends (EOF, error, or aborted by its supervisor).
struct OpenOutput {
    handle: Arc<ProcessHandle>,
    output: Output,
    reader: pipe::Receiver,
}

impl Drop for OpenOutput {
    fn drop(&mut self) {
        // Runs before the fields drop, so before the fd is closed.
        self.handle.output_closed(self.output);
    }
}

/// Reads the terminal until it reports every slave closed (EIO) once the
/// process is reaped. Closed while the process still runs, the terminal is
/// read again (backing off): output that comes later is delivered, never
/// dropped because of an early hangup report.
async fn pump_pty(handle: Arc<ProcessHandle>) {
    let Some(pty) = handle.pty() else { return };
    let mut closed_while_running = 0u32;
    loop {
        let _step = handle.gate.step().await;
        let mut chunk = vec![0u8; PTY_CHUNK];
        tokio::select! {
            read = pty.read(&mut chunk) => match read {
                Ok(0) if handle.is_reaped() => return,
                Ok(0) => {
                    // An exiting process closes its terminal just before
                    // it is reaped: usually this wait ends at the reap.
                    let backoff = PTY_REREAD_FIRST * 2u32.saturating_pow(closed_while_running.min(6));
                    drop(_step);
                    handle.reaped_within(backoff).await;
                    if closed_while_running == 0 && !handle.is_reaped() {
                        tracing::warn!(pid = handle.pid(), "the terminal reports no open slave while its process runs: reading on");
                    }
                    closed_while_running = closed_while_running.saturating_add(1);
                }
                Err(err) => return output_lost(&handle, Output::Pty, &err),
                Ok(n) => {
                    closed_while_running = 0;
                    chunk.truncate(n);
                    handle.broadcast(Output::Pty, Bytes::from(chunk)).await;
                }
            },
            () = handle.gate.pause_requested() => {}
        }
    }
}

/// A read that failed ends that output early; said, since what the
/// process writes there from now on is not delivered.
fn output_lost(handle: &ProcessHandle, output: Output, err: &std::io::Error) {
    tracing::warn!(pid = handle.pid(), ?output, "reading the process's output failed, the rest of it is lost: {err}");
}

/// Waits for the process (pausably), then for its output to drain (unless
/// a signal or the deadline said not to), then publishes the end; its
/// cgroup goes once the last process in it is gone.
async fn supervise(
    table: Arc<ProcessTable>,
    handle: Arc<ProcessHandle>,
    mut waiter: Waiter,
    readers: Vec<tokio::task::JoinHandle<()>>,
    deadline: Option<Instant>,
) {
    let mut killed = false;
    let end = loop {
        let _step = handle.gate.step().await;
        let deadline_passed = async {
            match deadline.filter(|_| !killed) {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            end = waiter.wait() => {
                handle.set_reaped(&end);
                break end;
            }
            () = deadline_passed => {
                let _ = handle.signal(nix::sys::signal::Signal::SIGKILL).await;
                killed = true;
            }
            () = handle.gate.pause_requested() => {}
        }
    };
    table.children().forget(handle.pid());
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    if !handle.stop_was_requested() {
        let drained = futures_util::future::join_all(readers);
        tokio::select! {
            _ = drained => {}
            () = handle.stop_requested() => {}
        }
    }
    // A step: an upgrade never lists fds of a process being retired.
    let step = handle.gate.step().await;
    aborts.iter().for_each(|a| a.abort());
    table.retire(&handle, end.clone());
    handle.finish(end);
    drop(step);
    if let Some(cgroup) = handle.tree().cgroup().cloned() {
        drop(handle);
        cgroup.release_when_empty().await;
    }
}
