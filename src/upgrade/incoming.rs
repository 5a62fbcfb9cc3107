//! The incoming image: takes over what the handover names, or nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Daemon;
use super::handover::{self, Handover, HandoverError, Secrets};
use crate::auth::{AuthState, Secret};
use crate::context::ExecContext;
use crate::forward::RelayFds;
use crate::process::{Adopted, CommandConfig, Ended, Fds};
use crate::restore::TrackedState;

/// The outcome, reported by `/init` in `X-Envd-Handover`, with the
/// reference's field names (the orchestrator decodes them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HandoverReport {
    /// Nothing was taken over.
    pub failed: bool,
    /// Why.
    pub error: Option<String>,
    /// The version of the image before.
    pub from_version: Option<String>,
    /// Processes adopted.
    pub procs: usize,
    /// Processes that could not be adopted.
    pub procs_failed: usize,
    /// Retained end events taken over.
    pub retained: usize,
    /// Retained end events that could not be (always 0: they are data).
    pub retained_failed: usize,
    /// Polling watchers re-armed.
    pub watchers: usize,
    /// Polling watchers that could not be re-armed.
    pub watchers_failed: usize,
    /// Forwarded ports whose listening socket was taken over.
    pub forwards: usize,
    /// Forwarded connections whose relay goes on.
    pub relays: usize,
}

/// Takes over the handover at `path`; `carried` are the fds the argv
/// listed, `listener` the one that is not the handover's to close.
pub async fn resume(
    daemon: &Daemon,
    path: &Path,
    carried: &[RawFd],
    initialized: impl Fn() -> bool + Send + 'static,
) -> HandoverReport {
    close_carried_fds_on_exec(carried);
    let mut unclaimed: BTreeSet<RawFd> = carried.iter().copied().filter(|fd| *fd != daemon.listener).collect();
    let taken = match handover::read(path) {
        Ok(handover) => take_over(daemon, handover, &mut unclaimed).await,
        Err(err) => Err(err),
    };
    let report = match taken {
        Ok(report) => report,
        Err(err) => {
            tracing::error!("handover refused, starting clean: {err}");
            HandoverReport { failed: true, error: Some(err.to_string()), ..Default::default() }
        }
    };
    for fd in unclaimed {
        // SAFETY: a carried fd nothing took over; nothing else refers to it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let workload = daemon.workload.clone();
    let fallback = daemon.thaw_fallback;
    tokio::spawn(async move {
        tokio::time::sleep(fallback).await;
        if !initialized() {
            tracing::warn!("no /init since the upgrade: thawing the workload");
            if let Err(err) = workload.thaw().await {
                tracing::warn!("thawing the workload: {err}");
            }
        }
    });
    report
}

async fn take_over(
    daemon: &Daemon,
    handover: Handover,
    unclaimed: &mut BTreeSet<RawFd>,
) -> Result<HandoverReport, HandoverError> {
    let mut claim = |fd: Option<RawFd>| -> Result<Option<OwnedFd>, HandoverError> {
        match fd {
            None => Ok(None),
            // SAFETY: the fd was carried across the exec for exactly this
            // purpose and is claimed once (removed from the set).
            Some(fd) if unclaimed.remove(&fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
            Some(fd) => Err(HandoverError::Corrupt(format!("fd {fd} is not a carried fd"))),
        }
    };
    // Every fd is claimed before anything is adopted: a file naming a wrong
    // fd is refused as a whole.
    let secrets_fd = claim(Some(handover.secrets.fd))?.ok_or_else(|| HandoverError::Secrets("no fd".into()))?;
    let mut claimed = Vec::new();
    for entry in &handover.processes {
        claimed.push(Fds {
            stdout: claim(entry.stdout_fd)?,
            stderr: claim(entry.stderr_fd)?,
            stdin: claim(entry.stdin_fd)?,
            pty: claim(entry.pty_fd)?,
        });
    }
    let mut forwards = Vec::new();
    for forward in &handover.forwards {
        if let Some(socket) = claim(Some(forward.fd))? {
            forwards.push((*forward, socket));
        }
    }
    let mut relays = Vec::new();
    for relay in &handover.relays {
        let mut owned = Vec::with_capacity(6);
        for fd in relay.fds() {
            owned.extend(claim(Some(fd))?);
        }
        if let Ok(fds) = <[OwnedFd; 6]>::try_from(owned) {
            relays.push(RelayFds { target: relay.target, fds });
        }
    }
    let mut secrets = handover::open_secrets(secrets_fd, &handover.secrets)?;
    restore_auth_and_context(daemon, &mut secrets);
    let mut report = HandoverReport { from_version: Some(handover.from_version.clone()), ..Default::default() };
    let now = Instant::now();
    daemon.workload.continue_command_cgroups_from(handover.next_command_cgroup);
    let mut tracked: BTreeMap<u32, TrackedState> = secrets.tracked.drain(..).map(|t| (t.pid, t)).collect();
    let keep_output = crate::process::output_kept_per_process(handover.processes.len());
    for (entry, fds) in handover.processes.into_iter().zip(claimed) {
        let adopted = Adopted {
            pid: entry.pid,
            tag: entry.tag,
            config: CommandConfig {
                cmd: entry.cmd,
                args: entry.args,
                envs: secrets.process_envs.remove(&entry.pid).unwrap_or_default(),
                cwd: entry.cwd,
            },
            fds,
            deadline: entry.deadline_ms.map(|ms| now + Duration::from_millis(ms)),
            reaped: entry.reaped.map(Into::into),
            cgroup: entry.cgroup,
            keep_output,
        };
        match crate::process::adopt(&daemon.processes, adopted) {
            Ok(handle) => {
                report.procs += 1;
                if let Some(state) = tracked.remove(&entry.pid) {
                    daemon.templates.adopt(state, &handle);
                }
            }
            Err(err) => {
                tracing::warn!(pid = entry.pid, "process not adopted: {err}");
                report.procs_failed += 1;
            }
        }
    }
    report.retained = handover.ended.len();
    daemon.processes.restore_ended(
        handover
            .ended
            .into_iter()
            .map(|e| Ended { pid: e.pid, tag: e.tag, end: e.end.into(), age: Duration::from_millis(e.age_ms) })
            .collect(),
    );
    daemon.workload.adopt_freeze_record(handover.freeze);
    report.forwards = forwards.len();
    for (forward, socket) in forwards {
        daemon.forwards.hand_over(forward, socket);
    }
    if let Some(logs) = &daemon.logs {
        logs.resume_pending(handover.logs.into_iter().map(String::into_bytes).collect());
    }
    report.relays = relays.len();
    for relay in relays {
        daemon.forwards.hand_over_relay(relay);
    }
    for watcher in handover.watchers {
        let id = watcher.id.clone();
        match daemon.watchers.restore(watcher).await {
            Ok(_) => report.watchers += 1,
            Err(err) => {
                tracing::warn!(watcher = %id, "polling watcher not re-armed: {err}");
                report.watchers_failed += 1;
            }
        }
    }
    tracing::info!(
        from = %handover.from_version,
        procs = report.procs,
        procs_failed = report.procs_failed,
        retained = report.retained,
        watchers = report.watchers,
        forwards = report.forwards,
        relays = report.relays,
        "took over the running workload after an upgrade"
    );
    Ok(report)
}

fn restore_auth_and_context(daemon: &Daemon, secrets: &mut Secrets) {
    daemon.guard.restore(AuthState {
        token: secrets.token.take().map(Secret::new),
        token_hash: secrets.token_hash.take(),
        fail_closed: secrets.fail_closed,
    });
    let context = ExecContext {
        default_user: std::mem::take(&mut secrets.default_user),
        default_workdir: secrets.default_workdir.take(),
        init_env: std::mem::take(&mut secrets.init_env),
        internal_env: std::mem::take(&mut secrets.internal_env),
    };
    daemon.context.update(|c| *c = context);
}

/// Marks the fds listed in `--handover-fds` close-on-exec (main does so
/// first thing; `resume` again, for callers that did not).
pub fn close_carried_on_exec(list: &str) {
    close_carried_fds_on_exec(&parse_fd_list(list));
}

fn close_carried_fds_on_exec(carried: &[RawFd]) {
    for fd in carried {
        // SAFETY: F_SETFD on an fd number; a closed one fails harmlessly.
        unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// `--handover-fds`: a comma-separated list of fd numbers.
pub fn parse_fd_list(text: &str) -> Vec<RawFd> {
    text.split(',').filter_map(|fd| fd.trim().parse().ok()).filter(|fd| *fd > 2).collect()
}
