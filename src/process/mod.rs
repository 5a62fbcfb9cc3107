//! Processes and terminals: spawning as a user, the process table, output
//! fan-out to any number of watchers, input, signals and deadlines.

mod handle;
mod kill;
mod pty;
pub mod reaper;
pub mod spawn;
pub mod status;
mod table;
mod tree;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

pub use handle::{Event, Output, ProcessHandle, Subscription};
pub use kill::{KillReport, kill};
pub use status::EndStatus;
pub use table::{Found, ProcessTable, Selector};

use crate::context::User;
use crate::host::cgroups::Placement;
use spawn::{SpawnSpec, StdioMode};
use tree::ProcessTree;

/// Bytes per read from a stdout/stderr pipe.
const PIPE_CHUNK: usize = 32 * 1024;
/// Bytes per read from a terminal.
const PTY_CHUNK: usize = 16 * 1024;

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandConfig {
    /// The program.
    pub cmd: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The request's own env vars.
    pub envs: BTreeMap<String, String>,
    /// The unresolved cwd, if one was sent.
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
/// output is read, so the starter sees every byte.
pub fn start(table: &Arc<ProcessTable>, spec: StartSpec) -> Result<Started, ProcessError> {
    if let StdioMode::Pty { cols, rows } = spec.stdio
        && (cols == 0 || rows == 0)
    {
        return Err(ProcessError::BadTerminalSize { cols: cols.into(), rows: rows.into() });
    }
    if !spec.cwd.is_dir() {
        return Err(ProcessError::CwdMissing(spec.cwd.display().to_string()));
    }
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
    let mut child = spawned.child;
    let pid = child.id().ok_or_else(|| spawn_error(std::io::Error::other("child exited before its pid was read")))?;
    spawning.register(pid);
    let tree = match spec.placement {
        Placement::Own(cgroup) => ProcessTree::Cgroup(cgroup),
        Placement::Outside | Placement::Shared(_) => ProcessTree::Walk,
    };
    let input = match spawned.pty_master {
        Some(master) => handle::Input::Pty(pty::PtyMaster::new(master).map_err(ProcessError::Io)?),
        None => handle::Input::Pipe(tokio::sync::Mutex::new(child.stdin.take())),
    };
    let handle = Arc::new(ProcessHandle::new(pid, spec.tag, spec.config, input, tree));
    let Subscription::Live(events) = handle.subscribe() else {
        unreachable!("a process that was just created has not ended");
    };
    table.insert(handle.clone());

    let mut readers = Vec::new();
    if handle.is_pty() {
        readers.push(tokio::spawn(pump_pty(handle.clone())));
    }
    if let Some(stdout) = child.stdout.take() {
        readers.push(tokio::spawn(pump(handle.clone(), stdout, Output::Stdout)));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(tokio::spawn(pump(handle.clone(), stderr, Output::Stderr)));
    }
    tokio::spawn(supervise(table.clone(), handle.clone(), child, readers, spec.deadline));
    Ok(Started { pid, handle, events })
}

/// Each chunk is read into its own buffer and handed on without a copy:
/// with one subscriber (the usual case) the same allocation ends up in the
/// encoded message.
async fn pump<R: AsyncRead + Unpin>(handle: Arc<ProcessHandle>, mut reader: R, output: Output) {
    loop {
        let mut chunk = Vec::with_capacity(PIPE_CHUNK);
        match reader.read_buf(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(_) => handle.broadcast(output, Bytes::from(chunk)).await,
        }
    }
}

async fn pump_pty(handle: Arc<ProcessHandle>) {
    let Some(pty) = handle.pty() else { return };
    loop {
        let mut chunk = vec![0u8; PTY_CHUNK];
        match pty.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                chunk.truncate(n);
                handle.broadcast(Output::Pty, Bytes::from(chunk)).await;
            }
        }
    }
}

/// Waits for the process, then for its output to drain (unless a signal or
/// the deadline said not to), then publishes the end; its cgroup goes once
/// the last process in it is gone.
async fn supervise(
    table: Arc<ProcessTable>,
    handle: Arc<ProcessHandle>,
    mut child: tokio::process::Child,
    readers: Vec<tokio::task::JoinHandle<()>>,
    deadline: Option<Instant>,
) {
    let deadline_passed = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        () = deadline_passed => {
            let _ = handle.signal(nix::sys::signal::Signal::SIGKILL).await;
            child.wait().await
        }
    };
    table.children().forget(handle.pid());
    handle.mark_reaped();
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    if !handle.stop_was_requested() {
        let drained = futures_util::future::join_all(readers);
        tokio::select! {
            _ = drained => {}
            () = handle.stop_requested() => {}
        }
    }
    aborts.iter().for_each(|a| a.abort());
    let end = match status {
        Ok(status) => EndStatus::from_exit(status),
        Err(err) => EndStatus::from_wait_error(&err),
    };
    table.retire(handle.pid(), handle.tag().map(str::to_owned), end.clone());
    handle.finish(end);
    if let Some(cgroup) = handle.tree().cgroup().cloned() {
        drop(handle);
        cgroup.release_when_empty().await;
    }
}
