//! One running process: its output fanned out to every attached stream
//! (`fanout`), its stdin or terminal, and signals to it and everything it
//! started.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;

use super::fanout::{Fanout, Output, Subscription};
use super::gate::Gate;
use super::pty::PtyMaster;
use super::record::ProcessRecord;
use super::status::EndStatus;
use super::tree::{Member, ProcessTree};
use super::{CommandConfig, ProcessError};

/// Where input goes.
#[derive(Debug)]
pub(super) enum Input {
    /// A stdin pipe; `None` once closed or when stdin was not requested.
    Pipe(tokio::sync::Mutex<Option<pipe::Sender>>),
    /// A terminal.
    Pty(PtyMaster),
}

impl Input {
    /// A stdin pipe, or none.
    pub(super) fn pipe(stdin: Option<pipe::Sender>) -> Self {
        Input::Pipe(tokio::sync::Mutex::new(stdin))
    }
}

/// The fds of a process and how it ends, for [`ProcessHandle::new`].
#[derive(Debug)]
pub(super) struct Parts {
    pub(super) input: Input,
    pub(super) outputs: [Option<RawFd>; 2],
    pub(super) deadline: Option<Instant>,
    pub(super) gate: Arc<Gate>,
    pub(super) tree: ProcessTree,
    /// Keep this many bytes of output for the first subscriber.
    pub(super) backlog: Option<usize>,
    /// Already reaped (adopted so): no pidfd, its pid may be another's.
    pub(super) reaped: Option<EndStatus>,
}

/// A process envd started.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: u32,
    tag: Option<String>,
    config: CommandConfig,
    fanout: Fanout,
    input: Input,
    /// Refers to this process even after its pid is reused.
    pidfd: Option<OwnedFd>,
    /// Set by a signal or the deadline: stop waiting for output EOF.
    stop_waiting: watch::Sender<bool>,
    /// What a signal reaches besides the process itself.
    tree: ProcessTree,
    /// The end, once the process was reaped and its output drained.
    ended: watch::Sender<Option<EndStatus>>,
    /// The stdin pipe's fd while it is open, else -1.
    stdin_fd: AtomicI32,
    /// stdout and stderr fds while their pumps hold them open.
    outputs: Mutex<[Option<RawFd>; 2]>,
    deadline: Option<Instant>,
    /// Set once the process itself is reaped (its pid is free again),
    /// before the output has drained.
    reaped: Mutex<Option<EndStatus>>,
    /// Woken when `reaped` is set.
    reaped_now: tokio::sync::Notify,
    /// Pauses the pumps and the reaper of this process.
    pub(super) gate: Arc<Gate>,
}

impl ProcessHandle {
    pub(super) fn new(pid: u32, tag: Option<String>, config: CommandConfig, parts: Parts) -> Self {
        let stdin_fd = match &parts.input {
            Input::Pipe(stdin) => stdin.try_lock().ok().and_then(|s| s.as_ref().map(|s| s.as_raw_fd())),
            Input::Pty(_) => None,
        };
        Self {
            pid,
            tag,
            config,
            fanout: Fanout::new(parts.backlog),
            input: parts.input,
            pidfd: if parts.reaped.is_none() { open_pidfd(pid) } else { None },
            stop_waiting: watch::channel(false).0,
            tree: parts.tree,
            ended: watch::channel(None).0,
            stdin_fd: AtomicI32::new(stdin_fd.unwrap_or(-1)),
            outputs: Mutex::new(parts.outputs),
            deadline: parts.deadline,
            reaped: Mutex::new(parts.reaped),
            reaped_now: tokio::sync::Notify::new(),
            gate: parts.gate,
        }
    }

    /// This process as the next image takes it over, its fds by their
    /// numbers here; consistent while the table is paused.
    pub fn record(&self, now: Instant) -> ProcessRecord {
        // Every field is named, so one added to the handle is carried
        // across an upgrade or said here why not.
        let ProcessHandle {
            pid,
            tag,
            config,
            // Streams attached now end with the image; what they had not
            // taken was given time to go before the exec. Output kept for
            // an adopted process's first subscriber is not carried again.
            fanout: _,
            input,
            // The next image opens its own.
            pidfd: _,
            stop_waiting: _,
            tree,
            ended: _,
            stdin_fd,
            outputs,
            deadline,
            reaped,
            reaped_now: _,
            gate: _,
        } = self;
        let outputs = *outputs.lock().unwrap_or_else(|e| e.into_inner());
        let stdin = stdin_fd.load(Ordering::SeqCst);
        ProcessRecord {
            pid: *pid,
            tag: tag.clone(),
            command: config.clone(),
            stdout_fd: outputs[0],
            stderr_fd: outputs[1],
            stdin_fd: (stdin >= 0).then_some(stdin),
            pty_fd: match input {
                Input::Pty(pty) => Some(pty.raw_fd()),
                Input::Pipe(_) => None,
            },
            deadline_ms: deadline.map(|d| d.saturating_duration_since(now).as_millis() as u64),
            reaped: reaped.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            cgroup: tree.cgroup().map(|c| c.dir().to_owned()),
        }
    }

    /// The pump of `output` is about to close its fd.
    pub(super) fn output_closed(&self, output: Output) {
        let index = if output == Output::Stderr { 1 } else { 0 };
        self.outputs.lock().unwrap_or_else(|e| e.into_inner())[index] = None;
    }

    pub(super) fn tree(&self) -> &ProcessTree {
        &self.tree
    }

    /// Output sent to a subscriber that has not taken it yet.
    pub(super) fn has_undelivered(&self) -> bool {
        self.fanout.has_undelivered()
    }

    /// Output kept for a first subscriber that has not come yet.
    pub(super) fn has_unread_output(&self) -> bool {
        self.fanout.has_unread_output()
    }

    /// Records the status of a reaped process.
    pub(super) fn set_reaped(&self, end: &EndStatus) {
        *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) = Some(end.clone());
        self.reaped_now.notify_waiters();
    }

    /// Resolves once the process is reaped, or after `at_most`.
    pub(super) async fn reaped_within(&self, at_most: std::time::Duration) {
        let notified = self.reaped_now.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_reaped() {
            let _ = tokio::time::timeout(at_most, notified).await;
        }
    }

    pub(super) fn is_reaped(&self) -> bool {
        self.reaped.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The tag given at start.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The configuration exactly as requested.
    pub fn config(&self) -> &CommandConfig {
        &self.config
    }

    /// Whether the process has a terminal.
    pub fn is_pty(&self) -> bool {
        matches!(self.input, Input::Pty(_))
    }

    pub(super) fn pty(&self) -> Option<&PtyMaster> {
        match &self.input {
            Input::Pty(pty) => Some(pty),
            Input::Pipe(_) => None,
        }
    }

    /// Attaches a new subscriber, which gets every event from now on (the
    /// first subscriber of an adopted process also what it wrote before,
    /// even if it has ended since).
    pub fn subscribe(&self) -> Subscription {
        self.fanout.subscribe(self.pid)
    }

    /// Sends a chunk of output to every subscriber, waiting for room.
    pub(super) async fn broadcast(&self, output: Output, data: Bytes) {
        self.fanout.broadcast(&self.gate, output, data).await;
    }

    /// Records the end and tells every subscriber and every waiter.
    pub(super) fn finish(&self, end: EndStatus) {
        self.fanout.finish(&end);
        self.ended.send_replace(Some(end));
    }

    /// Resolves with the end once the process has ended, without
    /// subscribing to its output.
    pub async fn ended(&self) -> EndStatus {
        let mut ended = self.ended.subscribe();
        match ended.wait_for(Option::is_some).await {
            Ok(end) => end.clone().unwrap_or_else(|| EndStatus::from_wait_error(&std::io::Error::other("no end"))),
            Err(_) => EndStatus::from_wait_error(&std::io::Error::other("no end")),
        }
    }

    /// Writes to stdin (pipe processes only), one write at a time.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ProcessError> {
        let Input::Pipe(stdin) = &self.input else {
            return Err(ProcessError::NotPipe);
        };
        let mut stdin = stdin.lock().await;
        let pipe = stdin.as_mut().ok_or(ProcessError::StdinClosed)?;
        pipe.write_all(data).await.map_err(ProcessError::Input)
    }

    /// Writes keystrokes to the terminal (PTY processes only).
    pub async fn write_pty(&self, data: &[u8]) -> Result<(), ProcessError> {
        let pty = self.pty().ok_or(ProcessError::NotPty)?;
        pty.write_all(data).await.map_err(ProcessError::Input)
    }

    /// Closes stdin so the process reads EOF; closing twice is fine. A step
    /// of the gate: an upgrade never lists an fd that is being closed.
    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        let _step = self.gate.step().await;
        match &self.input {
            Input::Pipe(stdin) => {
                let mut stdin = stdin.lock().await;
                self.stdin_fd.store(-1, Ordering::SeqCst);
                stdin.take();
                Ok(())
            }
            Input::Pty(_) => Err(ProcessError::CloseStdinOfPty),
        }
    }

    /// Resizes the terminal.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ProcessError> {
        let pty = self.pty().ok_or(ProcessError::NotPty)?;
        pty.resize(cols, rows).map_err(ProcessError::Io)
    }

    /// Sends a signal to every process the command started, the process
    /// itself included (also if it left its cgroup), and stops waiting for
    /// its output to reach EOF. Returns the processes that were signalled.
    pub(super) async fn signal(&self, signal: nix::sys::signal::Signal) -> Result<Vec<Member>, ProcessError> {
        // Once reaped, its pid may be anyone's: nothing is signalled by it.
        let alive = !self.is_reaped();
        let tree_result = self.tree.signal(self.pid, alive, signal).await;
        self.stop_waiting.send_replace(true);
        let mut members = tree_result.map_err(ProcessError::Signal)?;
        // Once only: a second SIGTERM may mean "force quit" to a handler.
        if alive && !members.iter().any(|m| m.pid() == self.pid) {
            self.signal_itself(signal)?;
            members.extend(Member::of(self.pid));
        }
        Ok(members)
    }

    fn signal_itself(&self, signal: nix::sys::signal::Signal) -> Result<(), ProcessError> {
        let result = match &self.pidfd {
            // SAFETY: pidfd_send_signal with a valid pidfd, a valid signal
            // number and no siginfo.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal as libc::c_int,
                    std::ptr::null::<()>(),
                    0,
                )
            },
            // SAFETY: plain kill(2); the pid is not reused before this
            // handle's process is reaped.
            None => unsafe { libc::kill(self.pid as libc::pid_t, signal as libc::c_int) as libc::c_long },
        };
        if result < 0 {
            let err = std::io::Error::last_os_error();
            // Already gone: the end event is on its way.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(ProcessError::Signal(err));
            }
        }
        Ok(())
    }

    /// Resolves once a signal or the deadline asked to stop waiting.
    pub(super) async fn stop_requested(&self) {
        let mut rx = self.stop_waiting.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    pub(super) fn stop_was_requested(&self) -> bool {
        *self.stop_waiting.borrow()
    }
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the returned fd is owned.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a new fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}
