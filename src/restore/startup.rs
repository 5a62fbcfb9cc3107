//! The start-up half of restoring (steps 1 to 6 of the module doc): decide
//! from the boot id whether this is a cold boot, start the recorded
//! processes again, save the record, wait until they are back, report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::readiness::{self, Outcome};
use super::{PROC_ROOT, TemplateProcesses, Tracked, ports};
use crate::context::{INTERNAL_ENV_VARS, UserError, users};
use crate::host::cgroups::{Placement, Slot, Workload};
use crate::process::spawn::StdioMode;
use crate::process::{self, CommandConfig, Event, ProcessError, StartSpec};
use crate::record::{RecordedStdio, TemplateProcess};

/// Longest wait for the sandbox identity before restarting without it.
const IDENTITY_WAIT: Duration = Duration::from_secs(5);

/// Why a recorded process could not be started again.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Its user is gone.
    #[error("{0}")]
    User(#[from] UserError),
    /// Starting it failed.
    #[error("{0}")]
    Start(#[from] ProcessError),
}

/// A restarted process, waited on until it is back.
struct Restarted {
    process: TemplateProcess,
    events: tokio::sync::mpsc::Receiver<Event>,
}

impl TemplateProcesses {
    /// Starts the recorded processes again after a reboot, in the
    /// background; `/init` waits for [`TemplateProcesses::restored`].
    /// `identity_known` is the start-up read of the metadata service.
    pub fn restore_at_start(self: &Arc<Self>, workload: Arc<Workload>, identity_known: Option<JoinHandle<()>>) {
        let (pending, changed) = self.take_pending();
        let this = self.clone();
        if pending.is_empty() {
            self.restored.send_replace(true);
            if changed {
                tokio::spawn(async move { this.save().await });
            }
            return;
        }
        let deadline = Instant::now() + self.options.limit;
        tokio::spawn(async move {
            if let Some(identity_known) = identity_known
                && tokio::time::timeout(IDENTITY_WAIT, identity_known).await.is_err()
            {
                tracing::warn!("sandbox identity still unknown: template processes start without it");
            }
            this.restore(pending, &workload, deadline).await;
            this.restored.send_replace(true);
        });
    }

    /// What to start again, and whether the record changed. In the boot
    /// the record was made in, nothing: its processes never stopped.
    fn take_pending(&self) -> (Vec<TemplateProcess>, bool) {
        let mut inner = self.inner();
        let record = &mut inner.record;
        if record.processes.is_empty() {
            return (Vec::new(), false);
        }
        let Some(boot_id) = &self.boot_id else {
            // A restart cannot be told from a reboot: never start twice.
            return (Vec::new(), false);
        };
        if record.boot_id.as_ref() == Some(boot_id) {
            let before = record.processes.len();
            let proc_root = Path::new(PROC_ROOT);
            record.processes.retain(|p| p.start_time.is_some() && ports::start_time(proc_root, p.pid) == p.start_time);
            tracing::info!(running = record.processes.len(), "envd restarted without a reboot: nothing restored");
            return (Vec::new(), record.processes.len() != before);
        }
        let pending = std::mem::take(&mut record.processes);
        record.boot_id = Some(boot_id.clone());
        if !self.options.enabled {
            tracing::info!(count = pending.len(), "restoring is off: template processes are not started again");
            return (Vec::new(), true);
        }
        tracing::info!(count = pending.len(), "cold boot: starting the template processes again");
        (pending, true)
    }

    async fn restore(self: &Arc<Self>, pending: Vec<TemplateProcess>, workload: &Workload, deadline: Instant) {
        let mut restarted = Vec::new();
        for process in pending {
            match self.restart(&process, workload).await {
                Ok(started) => restarted.push(started),
                Err(err) => tracing::warn!(cmd = %process.cmd, "template process not restored: {err}"),
            }
        }
        self.save().await;
        let waits = restarted.into_iter().map(|Restarted { process, events }| async move {
            let outcome = readiness::wait_until_back(process.pid, &process.ports, events, deadline).await;
            report(&process, outcome);
        });
        futures_util::future::join_all(waits).await;
    }

    /// Starts one recorded process exactly as recorded, with the current
    /// sandbox's `E2B_*` variables, and tracks it as a template process.
    async fn restart(
        self: &Arc<Self>,
        recorded: &TemplateProcess,
        workload: &Workload,
    ) -> Result<Restarted, RestoreError> {
        let user = users::lookup(&recorded.user)?;
        let context = self.context.snapshot();
        let mut env: BTreeMap<String, String> = recorded.env.iter().cloned().collect();
        env.extend(context.internal_env.clone());
        // The request's own values won over envd's at the first start too.
        env.extend(recorded.request_envs.iter().filter(|(k, _)| INTERNAL_ENV_VARS.contains(&k.as_str())).map(clone2));
        let identity = env.get("E2B_SANDBOX_ID").cloned();
        let stdio = match recorded.stdio {
            RecordedStdio::Pipes { stdin } => StdioMode::Pipes { stdin },
            RecordedStdio::Pty { cols, rows } => StdioMode::Pty { cols, rows },
        };
        let pty = matches!(stdio, StdioMode::Pty { .. });
        let spec = StartSpec {
            config: CommandConfig {
                cmd: recorded.cmd.clone(),
                args: recorded.args.clone(),
                envs: recorded.request_envs.clone(),
                cwd: recorded.requested_cwd.clone(),
            },
            tag: recorded.tag.clone(),
            user,
            cwd: PathBuf::from(&recorded.cwd),
            env: env.into_iter().collect(),
            stdio,
            deadline: None,
            placement: Slot::for_process(recorded.tag.as_deref(), pty)
                .map_or(Placement::Outside, |slot| workload.place(slot)),
        };
        let started = process::start(&self.table, spec).await?;
        let mut process = recorded.clone();
        process.pid = started.pid;
        process.start_time = ports::start_time(Path::new(PROC_ROOT), started.pid);
        {
            let mut inner = self.inner();
            inner.record.processes.push(process.clone());
            let serial = self.next_serial();
            let tracked = Tracked { serial, identity, process: process.clone(), template: true };
            inner.tracked.insert(started.pid, tracked);
            self.watch_end(&started.handle, serial);
        }
        Ok(Restarted { process, events: started.events })
    }
}

fn clone2((k, v): (&String, &String)) -> (String, String) {
    (k.clone(), v.clone())
}

/// Logs whether a restarted process is back; one that is not is named with
/// why (its exit status and last stderr lines, or the ports it lacks).
fn report(process: &TemplateProcess, outcome: Outcome) {
    let (cmd, tag, pid) = (&process.cmd, process.tag.as_deref().unwrap_or(""), process.pid);
    match outcome {
        Outcome::Back => tracing::info!(%cmd, tag, pid, ports = ?process.ports, "template process restored"),
        Outcome::Ended { end, stderr } => tracing::warn!(
            %cmd, tag, pid, status = %end.status, %stderr,
            "template process did not come back: it ended"
        ),
        Outcome::NotListening { missing, stderr } => tracing::warn!(
            %cmd, tag, pid, ?missing, %stderr,
            "template process did not come back within the restore limit: not listening; /init acknowledged anyway"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ExecContext;
    use crate::context::state::StateFile;
    use crate::host::fsfreeze::FsFreezer;
    use crate::host::persist::Persister;
    use crate::process::ProcessTable;
    use crate::record::TemplateRecord;
    use crate::restore::RestoreOptions;

    fn entry(pid: u32, start_time: Option<u64>) -> TemplateProcess {
        TemplateProcess {
            cmd: "server".into(),
            args: Vec::new(),
            request_envs: Default::default(),
            requested_cwd: None,
            env: Vec::new(),
            user: "root".into(),
            cwd: "/".into(),
            tag: None,
            stdio: RecordedStdio::Pipes { stdin: false },
            ports: vec![8080],
            pid,
            start_time,
        }
    }

    /// A tracker booted in `boot` over a record made in `recorded_boot`
    /// holding this test process (alive) and a pid that is not.
    fn tracker(name: &str, boot: &str, recorded_boot: &str, enabled: bool) -> Arc<TemplateProcesses> {
        let dir = std::env::temp_dir().join(format!("envd-restore-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("boot_id"), boot).unwrap();
        let me = std::process::id();
        let alive = entry(me, ports::start_time(Path::new(PROC_ROOT), me));
        let record = TemplateRecord {
            boot_id: Some(recorded_boot.into()),
            sandbox: Some("sbx".into()),
            processes: vec![alive, entry(u32::MAX - 1, Some(1))],
        };
        let context = crate::context::ContextStore::new(ExecContext {
            default_user: "root".into(),
            default_workdir: None,
            init_env: Default::default(),
            internal_env: Default::default(),
        });
        let persister = Persister::new(StateFile::new(&dir), FsFreezer::new(None, Duration::from_secs(1)), None);
        let options = RestoreOptions { enabled, limit: Duration::from_secs(1), boot_id_path: dir.join("boot_id") };
        TemplateProcesses::new(Arc::new(ProcessTable::default()), context, persister, record, options)
    }

    #[tokio::test]
    async fn the_boot_id_decides_what_is_started_again() {
        let restart = tracker("restart", "boot-1", "boot-1", true);
        let (pending, changed) = restart.take_pending();
        assert!(pending.is_empty(), "an envd restart in the same boot starts nothing");
        assert!(changed, "the entry whose process is gone was dropped");
        assert_eq!(restart.inner().record.processes.len(), 1);

        let cold_boot = tracker("reboot", "boot-2", "boot-1", true);
        let (pending, changed) = cold_boot.take_pending();
        assert_eq!((pending.len(), changed), (2, true));
        assert_eq!(cold_boot.inner().record.boot_id.as_deref(), Some("boot-2"));

        let off = tracker("off", "boot-2", "boot-1", false);
        let (pending, changed) = off.take_pending();
        assert_eq!((pending.len(), changed), (0, true));
        assert!(off.inner().record.processes.is_empty(), "nothing runs, so nothing stays recorded");
        for name in ["restart", "reboot", "off"] {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("envd-restore-{name}-{}", std::process::id())),
            );
        }
    }
}
