//! Live upgrade: `POST /upgrade` replaces envd's program with a new one in
//! the same process (same pid, same children, same listening socket), and
//! the new image takes over everything a client can observe.
//!
//! Outgoing side ([`perform`]), in order, and why:
//! 1. refuse before the first authorised `/init` (409) and any target other
//!    than the one fixed path (400): the route is the only way to make root
//!    exec a file;
//! 2. take the workload freeze lock (503 if a freeze holds it): no pause
//!    freeze or thaw may interleave with the swap;
//! 3. receive the binary to the fixed path (unlinked first: the running
//!    image may be that very file) or, for an empty body, take envd's own
//!    image (`/proc/self/exe`); check it is an ELF executable of this
//!    architecture that answers `--version` with status 0 and, given this
//!    envd's flags, `--handover-version` with the handover format this
//!    image writes: past the exec there is no way back, so a binary that
//!    would not start on this argv or not read the handover is refused
//!    here. Nothing has changed yet, so a failure simply answers an error;
//! 4. freeze the workload and require the kernel to confirm it: processes
//!    that run on would write output and exit while nobody reads or reaps;
//! 5. pause the process tasks ([`crate::process::Paused`]): pumps stop
//!    between two reads, so undelivered output stays in the pipes and
//!    terminals; reapers stop between two waits, so an exit not yet reaped
//!    stays a zombie for the new image to reap; starts, stdin closes and
//!    retirements wait; then the streams attached now get (bounded) time
//!    to take the output already read, which would die with this image;
//! 6. stop accepting on the listening sockets ([`crate::intake::Intake`]): new connections
//!    wait in the backlog for the next image;
//! 7. write the handover ([`handover`]): a sealed memfd with the secrets
//!    (token, env values) and a 0600 file in the run directory (a tmpfs)
//!    with the rest, naming the fds by number;
//! 8. `execve` with the carried fds' close-on-exec flag cleared just for
//!    the exec ([`exec`]). From step 4 on, any failure undoes what was done
//!    in reverse (fds closed, file removed, tasks resumed, workload thawed)
//!    and the old image keeps serving.
//!
//! What survives `execve`: the pid, the children (still ours to reap), the
//! cgroup placement, and every fd without close-on-exec. The carried fds are
//! duplicates (made close-on-exec) of the listener, the secrets memfd, each
//! process's stdout/stderr read ends, stdin write end and terminal master,
//! each forwarded port's listening socket, and each relayed connection's
//! sockets and pipes; their numbers are listed in the argv (`--listen-fd`,
//! `--handover-fds`), which is how the new image knows which fds are its to
//! take or close.
//!
//! Incoming side ([`resume`]), before the listener is served and before the
//! orphan reaper starts (so it never takes an adopted child's exit status):
//! every listed fd is made close-on-exec at once (a user process must never
//! inherit one); the file is read and removed; a file that is unreadable, of
//! an unknown format or version, that requires a section this image does
//! not know, or that names an fd not carried, is reported and every carried
//! fd but the listener is closed: envd starts clean, never half-adopted.
//! Otherwise the auth state and the exec context are restored from the
//! memfd and each module resumes its part: the workload (freeze record,
//! command-cgroup numbering), the processes (new pumps on the carried fds,
//! a pidfd reaper, their own cgroups again for kills, output kept for the
//! first subscriber, so what was written during the swap reaches the
//! client that reconnects; retained exits), template tracking, forward
//! sockets and relays (served and resumed before the forwarder's first
//! scan), log lines not yet shipped (ahead of the new image's own), and
//! polling watchers (re-armed with their ids and queued events; streamed
//! `WatchDir`s end with the old image and clients subscribe again).
//! Volumes, the CA bundle and the events entry need no section: the new
//! image restores them from the saved record as after any restart,
//! recognising live mounts. The workload stays frozen until the next
//! `/init`, or until `--upgrade-thaw-fallback` passes without one. The next
//! `/init` reports the outcome in `X-Envd-Handover`.
//!
//! Adding state: the module that owns it adds it to its part (exported in
//! step 7, resumed in [`resume`]) and to that part's round-trip test; a
//! new section of [`handover::Handover`] is for a new module's part, and a
//! section an older image must not ignore is named in `required`, so that
//! image refuses the file instead of half-adopting it.

mod binary;
mod exec;
pub mod handover;
mod incoming;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use incoming::{HandoverReport, close_carried_on_exec, parse_fd_list, resume};

use crate::auth::AccessGuard;
use crate::context::ContextStore;
use crate::forward::Forwards;
use crate::fs::watchers::PollingWatchers;
use crate::host::cgroups::Workload;
use crate::host::workload_freeze::FreezeMode;
use crate::process::ProcessTable;
use crate::restore::TemplateProcesses;
use crate::telemetry::ship::LogShipper;

/// The one path a delivered binary is written to.
pub const DEFAULT_UPGRADE_PATH: &str = "/usr/bin/envd.next";
/// How long the upgrade waits for the freeze lock, the freeze and the pause.
const STEP_BUDGET: Duration = Duration::from_secs(2);
/// How long the accept loops get to stop before the handover is written.
const INTAKE_SETTLE: Duration = Duration::from_millis(10);
/// How long attached streams get to take the output already read.
const DELIVERY_BUDGET: Duration = Duration::from_millis(300);

/// Why an upgrade was refused or failed; the old image keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Before the first authorised `/init`.
    #[error("envd not initialized")]
    NotInitialized,
    /// `X-Envd-Upgrade-Bin` named another path.
    #[error("unsupported upgrade target")]
    BadTarget,
    /// A freeze or thaw is in progress.
    #[error("a freeze is in progress")]
    Busy,
    /// The body could not be received or written.
    #[error("receiving the binary: {0}")]
    Receive(std::io::Error),
    /// The binary is not one this machine can run as envd.
    #[error("the new binary was refused: {0}")]
    BadBinary(String),
    /// The workload did not stop.
    #[error("the workload did not freeze: {0}")]
    Freeze(String),
    /// Process tasks did not pause.
    #[error(transparent)]
    Pause(#[from] crate::process::PauseTimeout),
    /// Writing the handover failed.
    #[error("writing the handover: {0}")]
    Handover(std::io::Error),
    /// `execve` failed.
    #[error("exec of the new binary: {0}")]
    Exec(std::io::Error),
}

/// What the upgrade reads and hands over.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Running processes.
    pub processes: Arc<ProcessTable>,
    /// The access token.
    pub guard: AccessGuard,
    /// The exec context.
    pub context: ContextStore,
    /// The workload cgroups.
    pub workload: Arc<Workload>,
    /// Polling watchers.
    pub watchers: Arc<PollingWatchers>,
    /// Processes tracked for the template record.
    pub templates: Arc<TemplateProcesses>,
    /// Forwarded ports.
    pub forwards: Arc<Forwards>,
    /// Log lines on their way to the host's collector.
    pub logs: Option<LogShipper>,
    /// Held while the listening sockets are handed over.
    pub intake: Arc<crate::intake::Intake>,
    /// The listening socket.
    pub listener: RawFd,
    /// Where the handover file goes (a tmpfs in a VM).
    pub run_dir: PathBuf,
    /// Where a delivered binary goes.
    pub upgrade_path: PathBuf,
    /// Without an `/init` after the swap, the workload is thawed after this.
    pub thaw_fallback: Duration,
}

/// The request: the `X-Envd-Upgrade-Bin` header and the body.
pub struct Request {
    /// `X-Envd-Upgrade-Bin`, if sent.
    pub target: Option<String>,
    /// The new binary, empty for a re-exec of the current one.
    pub body: axum::body::Body,
    /// Whether the body is known to be empty.
    pub empty: bool,
}

/// Performs the upgrade; returns only if it did not happen.
pub async fn perform(daemon: &Daemon, initialized: bool, request: Request) -> UpgradeError {
    if !initialized {
        return UpgradeError::NotInitialized;
    }
    if request.target.as_deref().is_some_and(|t| Path::new(t) != daemon.upgrade_path) {
        return UpgradeError::BadTarget;
    }
    let Ok(hold) = daemon.workload.lock_freezing(Some(STEP_BUDGET)).await else {
        return UpgradeError::Busy;
    };
    let program = match binary::receive(&daemon.upgrade_path, request.body, request.empty).await {
        Ok(program) => program,
        Err(err) => return err,
    };
    let version = match binary::check(&program).await {
        Ok(version) => version,
        Err(err) => return err,
    };
    tracing::info!(program = %program.display(), %version, "upgrading");
    // A freeze someone else made (a pause in progress) is theirs to undo.
    let ours = !daemon.workload.freeze_record().active;
    let report = daemon.workload.freeze_held(&hold, FreezeMode::Legacy, 0, Some(STEP_BUDGET)).await;
    if report.not_frozen > 0 || report.failed > 0 {
        thaw(daemon, &hold, ours);
        return UpgradeError::Freeze(format!("{} not frozen, {} failed", report.not_frozen, report.failed));
    }
    let paused = match daemon.processes.gate().pause(STEP_BUDGET).await {
        Ok(paused) => paused,
        Err(err) => {
            thaw(daemon, &hold, ours);
            return err.into();
        }
    };
    // Output already read goes to the streams attached now rather than die
    // with this image's memory (bounded: a client may have stopped reading).
    daemon.processes.wait_delivered(DELIVERY_BUDGET).await;
    // Events still in the kernel's queues would die with this image's
    // inotify instances: the handover carries them.
    let _ = tokio::time::timeout(DELIVERY_BUDGET, daemon.watchers.drain_all()).await;
    let intake = daemon.intake.hold();
    // Time for the accept loops to see it and park.
    tokio::time::sleep(INTAKE_SETTLE).await;
    let err = exec::hand_over_and_exec(daemon, &program);
    drop(intake);
    drop(paused);
    thaw(daemon, &hold, ours);
    err
}

fn thaw(daemon: &Daemon, hold: &crate::host::workload_freeze::FreezeHold, ours: bool) {
    if ours && let Err(err) = daemon.workload.thaw_held(hold) {
        tracing::warn!("thawing after a failed upgrade: {err}");
    }
}
