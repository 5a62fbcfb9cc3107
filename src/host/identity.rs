//! The sandbox's identity from the metadata service: env vars for every
//! process and the files under /run/e2b, as the reference provides them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use super::mmds::{Metadata, MmdsClient, MmdsError};
use crate::auth::AccessGuard;
use crate::context::ContextStore;
use crate::telemetry::ship::{LogShipper, ShipTarget};

/// First retry delay of the start-up poll, and its ceiling.
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Failed start-up reads between two warnings (about a minute apart once
/// the retry delay has reached its ceiling).
const WARN_EVERY: u32 = 60;
/// Failed start-up reads of an unreachable service before the first
/// warning (about 5 s): a cold boot may briefly run before its network.
const UNREACHABLE_GRACE: u32 = 10;
/// How long the re-read after an `/init` keeps trying.
const REFRESH_WINDOW: Duration = Duration::from_secs(60);

/// Applies metadata to the running daemon.
#[derive(Debug, Clone)]
pub struct Identity {
    client: MmdsClient,
    guard: AccessGuard,
    context: ContextStore,
    run_dir: std::path::PathBuf,
    logs: Option<LogShipper>,
}

impl Identity {
    /// Identity from the metadata service at `client`.
    pub fn new(client: MmdsClient, guard: AccessGuard, context: ContextStore, run_dir: &Path) -> Self {
        Self { client, guard, context, run_dir: run_dir.to_owned(), logs: None }
    }

    /// Also points `logs` at the collector the metadata names.
    pub fn with_log_shipper(mut self, logs: LogShipper) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Start-up: poll until the service answers (a cold boot may come up
    /// before the host's network path), then apply everything including
    /// the template's default user and workdir. Failures are logged as
    /// [`worth_a_warning`] decides.
    pub async fn poll_at_start(self) {
        let mut delay = FIRST_RETRY;
        let mut failures: u32 = 0;
        loop {
            match self.client.read().await {
                Ok(metadata) => {
                    self.apply(&metadata, true);
                    tracing::info!(failures, "sandbox identity read from the metadata service");
                    return;
                }
                Err(err) if worth_a_warning(failures, &err) => {
                    tracing::warn!(failures, "metadata service not usable, still trying: {err}");
                }
                Err(err) => tracing::debug!("metadata not available yet: {err}"),
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY);
        }
    }

    /// After an `/init`: a resumed or forked sandbox learns its new id.
    pub async fn refresh(self) {
        let until = tokio::time::Instant::now() + REFRESH_WINDOW;
        let mut delay = FIRST_RETRY;
        while tokio::time::Instant::now() < until {
            if let Ok(metadata) = self.client.read().await {
                self.apply(&metadata, false);
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY);
        }
        tracing::warn!("metadata service did not answer after /init");
    }

    /// One read now, bounded by `limit`, applied as after an `/init`:
    /// the sandbox id it holds, or `None` when the service did not answer.
    pub async fn read_now(&self, limit: Duration) -> Option<String> {
        let metadata = tokio::time::timeout(limit, self.client.read()).await.ok()?.ok()?;
        self.apply(&metadata, false);
        metadata.instance_id.filter(|id| !id.is_empty())
    }

    /// The token hash the service holds now (one read), for `/init`.
    pub async fn token_hash(&self) -> Option<String> {
        let hash = self.client.read().await.ok()?.access_token_hash?;
        (!hash.trim().is_empty()).then_some(hash)
    }

    fn apply(&self, metadata: &Metadata, with_defaults: bool) {
        if let (Some(logs), Some(url)) = (&self.logs, metadata.address.as_ref().filter(|a| !a.trim().is_empty())) {
            logs.set_target(ShipTarget {
                url: url.clone(),
                instance_id: metadata.instance_id.clone().unwrap_or_default(),
                env_id: metadata.env_id.clone().unwrap_or_default(),
            });
        }
        if let Some(hash) = &metadata.access_token_hash {
            self.guard.set_token_hash(hash);
        }
        self.context.update(|context| {
            for (name, value) in [("E2B_SANDBOX_ID", &metadata.instance_id), ("E2B_TEMPLATE_ID", &metadata.env_id)] {
                if let Some(value) = value {
                    context.internal_env.insert(name.to_owned(), value.clone());
                }
            }
            if with_defaults {
                if let Some(user) = metadata.default_user.clone().filter(|u| !u.is_empty()) {
                    context.default_user = user;
                }
                if let Some(workdir) = metadata.default_workdir.clone().filter(|w| !w.is_empty()) {
                    context.default_workdir = Some(workdir);
                }
            }
        });
        for (file, value) in [(".E2B_SANDBOX_ID", &metadata.instance_id), (".E2B_TEMPLATE_ID", &metadata.env_id)] {
            if let Some(value) = value {
                write_identity_file(&self.run_dir, file, value, 0o666);
            }
        }
    }
}

/// Whether the `failures`-th failed start-up read (from 0) is logged as a
/// warning: at once when the service answered but wrongly (garbage, an
/// error status), after a grace when it cannot be reached, then again
/// every [`WARN_EVERY`] failures so the log shows it is still going on.
fn worth_a_warning(failures: u32, err: &MmdsError) -> bool {
    let first = if matches!(err, MmdsError::Unreachable { .. }) { UNREACHABLE_GRACE } else { 0 };
    failures >= first && (failures - first).is_multiple_of(WARN_EVERY)
}

/// Writes one identity file (best effort: /run is a tmpfs that is never
/// frozen, but a broken one must not stop envd).
pub fn write_identity_file(dir: &Path, name: &str, value: &str, mode: u32) {
    let result = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| {
            let path = dir.join(name);
            // Replace a read-only file from a previous start.
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, value)?;
            let umask = current_umask();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !umask))
        });
    if let Err(err) = result {
        tracing::warn!(file = name, "writing identity file: {err}");
    }
}

/// The process umask, read without changing it (umask(2) would race with
/// other threads).
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_come_at_once_for_a_wrong_answer_and_after_a_grace_for_silence() {
        let wrong = MmdsError::Status(http::StatusCode::INTERNAL_SERVER_ERROR);
        let silent = MmdsError::Unreachable { address: "127.0.0.1:1".into(), message: "refused".into() };
        let warned = |err: &MmdsError| (0..200).filter(|n| worth_a_warning(*n, err)).collect::<Vec<_>>();
        assert_eq!(warned(&wrong), [0, 60, 120, 180]);
        assert_eq!(warned(&silent), [10, 70, 130, 190]);
    }
}
