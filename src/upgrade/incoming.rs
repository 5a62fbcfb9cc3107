//! The incoming image: takes over what the handover names, or nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde::Serialize;

use super::Daemon;
use super::handover::{self, Handover, HandoverError, Secrets};
use crate::auth::{AuthState, Secret};
use crate::context::ExecContext;
use crate::record::{CarriedFds, NamesFds};

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

/// Every fd is claimed before any module resumes: a file naming a wrong
/// fd is refused as a whole. Then each module takes its part.
async fn take_over(
    daemon: &Daemon,
    mut handover: Handover,
    unclaimed: &mut BTreeSet<RawFd>,
) -> Result<HandoverReport, HandoverError> {
    let secrets_fd = claim(unclaimed, handover.secrets.fd)?;
    let mut fds = claim_all(unclaimed, [&mut handover.processes as &mut dyn NamesFds, &mut handover.forwards])?;
    let mut secrets = handover::open_secrets(secrets_fd, &handover.secrets)?;
    restore_auth_and_context(daemon, &mut secrets);
    daemon.workload.resume(handover.workload);
    handover.processes.set_envs(std::mem::take(&mut secrets.process_envs));
    let processes = daemon.processes.resume(handover.processes, &mut fds);
    daemon.templates.resume(std::mem::take(&mut secrets.tracked), &processes.adopted);
    let (forwards, relays) = daemon.forwards.resume(handover.forwards, &mut fds);
    if let Some(logs) = &daemon.logs {
        logs.resume(handover.logs);
    }
    let (watchers, watchers_failed) = daemon.watchers.resume(handover.watchers).await;
    let report = HandoverReport {
        from_version: Some(handover.from_version),
        procs: processes.adopted.len(),
        procs_failed: processes.failed,
        retained: processes.retained,
        watchers,
        watchers_failed,
        forwards,
        relays,
        ..Default::default()
    };
    tracing::info!(?report, "took over the running workload after an upgrade");
    Ok(report)
}

/// The carried fd `fd`, once.
fn claim(unclaimed: &mut BTreeSet<RawFd>, fd: RawFd) -> Result<OwnedFd, HandoverError> {
    if !unclaimed.remove(&fd) {
        return Err(HandoverError::Corrupt(format!("fd {fd} is not a carried fd")));
    }
    // SAFETY: the fd was carried across the exec for exactly this purpose
    // and is claimed once (removed from the set).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Every fd the parts name, each a carried fd named once.
fn claim_all<const N: usize>(
    unclaimed: &mut BTreeSet<RawFd>,
    parts: [&mut dyn NamesFds; N],
) -> Result<CarriedFds, HandoverError> {
    let mut claimed = BTreeMap::new();
    for part in parts {
        for fd in part.fds_mut() {
            claimed.insert(*fd, claim(unclaimed, *fd)?);
        }
    }
    Ok(CarriedFds::new(claimed))
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
