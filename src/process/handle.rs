//! One running process: its output fanned out to every attached stream,
//! its stdin or terminal, and signals to it and everything it started.
//!
//! Output is read in chunks and sent to each subscriber through a small
//! bounded channel: a slow subscriber slows the reader (back-pressure into
//! the pipe), and with no subscriber the output is read and dropped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::{mpsc, watch};

use super::pty::PtyMaster;
use super::status::EndStatus;
use super::tree::{Member, ProcessTree};
use super::{CommandConfig, ProcessError};

/// Events buffered per subscriber before the reader waits.
const SUBSCRIBER_BUFFER: usize = 64;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The stdout pipe.
    Stdout,
    /// The stderr pipe.
    Stderr,
    /// The terminal.
    Pty,
}

/// What a subscriber receives after the start event.
#[derive(Debug, Clone)]
pub enum Event {
    /// Exactly the bytes of one read.
    Data(Output, Bytes),
    /// The process ended; nothing follows.
    End(EndStatus),
}

/// The result of attaching to a process.
#[derive(Debug)]
pub enum Subscription {
    /// Live events from now on.
    Live(mpsc::Receiver<Event>),
    /// The process had already ended.
    Ended(EndStatus),
}

#[derive(Debug, Default)]
struct Fanout {
    subscribers: Vec<mpsc::Sender<Event>>,
    end: Option<EndStatus>,
}

/// Where input goes.
#[derive(Debug)]
pub(super) enum Input {
    /// A stdin pipe; `None` once closed or when stdin was not requested.
    Pipe(tokio::sync::Mutex<Option<ChildStdin>>),
    /// A terminal.
    Pty(PtyMaster),
}

/// A process envd started.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: u32,
    tag: Option<String>,
    config: CommandConfig,
    fanout: Mutex<Fanout>,
    input: Input,
    /// Refers to this process even after its pid is reused.
    pidfd: Option<OwnedFd>,
    /// Set by a signal or the deadline: stop waiting for output EOF.
    stop_waiting: watch::Sender<bool>,
    /// What a signal reaches besides the process itself.
    tree: ProcessTree,
    /// Set once the process itself is reaped: its pid is free again.
    reaped: watch::Sender<bool>,
    /// The end, once the process was reaped and its output drained.
    ended: watch::Sender<Option<EndStatus>>,
}

impl ProcessHandle {
    pub(super) fn new(pid: u32, tag: Option<String>, config: CommandConfig, input: Input, tree: ProcessTree) -> Self {
        Self {
            pid,
            tag,
            config,
            fanout: Mutex::default(),
            input,
            pidfd: open_pidfd(pid),
            stop_waiting: watch::channel(false).0,
            tree,
            reaped: watch::channel(false).0,
            ended: watch::channel(None).0,
        }
    }

    pub(super) fn tree(&self) -> &ProcessTree {
        &self.tree
    }

    pub(super) fn mark_reaped(&self) {
        self.reaped.send_replace(true);
    }

    pub(super) fn is_reaped(&self) -> bool {
        *self.reaped.borrow()
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

    fn fanout(&self) -> std::sync::MutexGuard<'_, Fanout> {
        self.fanout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a new subscriber, which gets every event from now on.
    pub fn subscribe(&self) -> Subscription {
        let mut fanout = self.fanout();
        if let Some(end) = &fanout.end {
            return Subscription::Ended(end.clone());
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        fanout.subscribers.push(tx);
        Subscription::Live(rx)
    }

    /// Sends a chunk of output to every subscriber, waiting for room.
    pub(super) async fn broadcast(&self, output: Output, data: Bytes) {
        let subscribers = self.fanout().subscribers.clone();
        let mut lost = false;
        if let Some((last, others)) = subscribers.split_last() {
            for subscriber in others {
                lost |= subscriber.send(Event::Data(output, data.clone())).await.is_err();
            }
            // The last one gets the original, so a lone subscriber owns it.
            lost |= last.send(Event::Data(output, data)).await.is_err();
        }
        if lost {
            self.fanout().subscribers.retain(|s| !s.is_closed());
        }
    }

    /// Records the end and tells every subscriber; a subscriber that is
    /// not reading does not hold up the others.
    pub(super) fn finish(&self, end: EndStatus) {
        let subscribers = {
            let mut fanout = self.fanout();
            fanout.end = Some(end.clone());
            std::mem::take(&mut fanout.subscribers)
        };
        self.ended.send_replace(Some(end.clone()));
        for subscriber in subscribers {
            let end = end.clone();
            tokio::spawn(async move {
                let _ = subscriber.send(Event::End(end)).await;
            });
        }
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
        pipe.write_all(data).await.map_err(ProcessError::Input)?;
        pipe.flush().await.map_err(ProcessError::Input)
    }

    /// Writes keystrokes to the terminal (PTY processes only).
    pub async fn write_pty(&self, data: &[u8]) -> Result<(), ProcessError> {
        let pty = self.pty().ok_or(ProcessError::NotPty)?;
        pty.write_all(data).await.map_err(ProcessError::Input)
    }

    /// Closes stdin so the process reads EOF; closing twice is fine.
    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        match &self.input {
            Input::Pipe(stdin) => {
                stdin.lock().await.take();
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
        let tree_result = self.tree.signal(self.pid, signal).await;
        self.stop_waiting.send_replace(true);
        let mut members = tree_result.map_err(ProcessError::Signal)?;
        // Once only: a second SIGTERM may mean "force quit" to a handler.
        if !members.iter().any(|m| m.pid() == self.pid) {
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
