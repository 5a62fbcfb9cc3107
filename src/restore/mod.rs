//! Restored processes: after a cold boot, the template's running processes
//! (a Jupyter server, a language server, a database started by the
//! template's start command) are started again, as a memory resume would
//! have kept them running.
//!
//! *Template processes* are the processes started through envd that were
//! still running in the snapshot the sandbox was created from. envd sees
//! that moment as a change of the sandbox identity (`instanceID` in the
//! metadata service) on an authorised `/init`. Order of effects, and why:
//!
//! While a sandbox runs ([`TemplateProcesses::track`],
//! [`TemplateProcesses::identity_settled`]):
//! 1. every process started through envd (not the orchestrator's
//!    `_system` ones) is tracked with the identity it started under (its
//!    `E2B_SANDBOX_ID`) and what restarting it needs;
//! 2. on an authorised `/init` under a new identity, every tracked process
//!    started under an earlier one and still running becomes a template
//!    process: its recipe, the ports its tree listens on now, and the boot
//!    id are saved with the exec context before `/init` is acknowledged,
//!    so a pause right after it already finds them on disk;
//! 3. a template process that ends leaves the record (saved again): a cold
//!    boot restores exactly what a memory resume would still have running.
//!
//! At start-up ([`TemplateProcesses::restore_at_start`], in `startup`):
//! 1. the record comes with the exec context; the same boot id as recorded
//!    means envd restarted without a reboot: nothing is started (what runs
//!    still runs), entries whose process is gone are dropped;
//! 2. after a reboot, wait (bounded) for the sandbox identity, so the
//!    restarted processes get the current sandbox's `E2B_*` variables;
//! 3. start every recorded process exactly as recorded and track it as a
//!    template process again;
//! 4. save the record with the new boot id and pids before waiting, so an
//!    envd crash during the wait never starts them twice in one boot;
//! 5. wait until each listens on its recorded ports (or, with none, has
//!    run for a settle time), bounded by the limit; log what did not come
//!    back, with its exit status and last stderr lines;
//! 6. open the gate that the first `/init` waits on.

mod ports;
mod readiness;
mod startup;

pub use startup::RestoreError;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::context::{ContextStore, INTERNAL_ENV_VARS};
use crate::host::cgroups::SYSTEM_TAG;
use crate::host::persist::Persister;
use crate::process::spawn::StdioMode;
use crate::process::{ProcessHandle, ProcessTable, StartSpec};
use crate::record::{RecordedStdio, TemplateProcess, TemplateRecord};

/// Where the kernel shows processes and sockets.
const PROC_ROOT: &str = "/proc";

/// How restoring behaves (from the flags).
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Start the recorded processes again after a reboot.
    pub enabled: bool,
    /// Longest the first `/init` waits for the restored processes.
    pub limit: Duration,
    /// The file holding the current boot id.
    pub boot_id_path: PathBuf,
}

/// What restarting a process needs, taken from its start.
#[derive(Debug, Clone)]
pub struct Recipe {
    process: Option<TemplateProcess>,
    identity: Option<String>,
}

impl Recipe {
    /// The recipe of a process about to be started; `_system` processes
    /// have none, they are the orchestrator's.
    pub fn of(spec: &StartSpec) -> Recipe {
        let identity = env_value(&spec.env, "E2B_SANDBOX_ID");
        if spec.tag.as_deref() == Some(SYSTEM_TAG) {
            return Recipe { process: None, identity };
        }
        let stdio = match spec.stdio {
            StdioMode::Pipes { stdin } => RecordedStdio::Pipes { stdin },
            StdioMode::Pty { cols, rows } => RecordedStdio::Pty { cols, rows },
        };
        let process = TemplateProcess {
            cmd: spec.config.cmd.clone(),
            args: spec.config.args.clone(),
            request_envs: spec.config.envs.clone(),
            requested_cwd: spec.config.cwd.clone(),
            env: spec.env.iter().filter(|(k, _)| !INTERNAL_ENV_VARS.contains(&k.as_str())).cloned().collect(),
            user: spec.user.name.clone(),
            cwd: spec.cwd.to_string_lossy().into_owned(),
            tag: spec.tag.clone(),
            stdio,
            ports: Vec::new(),
            pid: 0,
            start_time: None,
        };
        Recipe { process: Some(process), identity }
    }
}

fn env_value(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).filter(|v| !v.is_empty())
}

/// A tracked process as data (see [`TemplateProcesses::export`]); its
/// environment makes it a secret of the handover.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackedState {
    /// Its pid.
    pub pid: u32,
    /// The sandbox identity it started under.
    pub identity: Option<String>,
    /// How to start it again.
    pub process: TemplateProcess,
    /// Recorded as a template process.
    pub template: bool,
}

/// A process started through envd and still running.
#[derive(Debug)]
struct Tracked {
    /// Tells this entry from a later one that reuses the pid.
    serial: u64,
    identity: Option<String>,
    process: TemplateProcess,
    /// Recorded as a template process.
    template: bool,
}

#[derive(Debug, Default)]
struct Inner {
    tracked: HashMap<u32, Tracked>,
    record: TemplateRecord,
}

impl crate::host::init::AfterInit for TemplateProcesses {
    fn restored(&self) -> crate::host::init::Pending<'_> {
        Box::pin(TemplateProcesses::restored(self))
    }

    fn identity_settled(&self, sandbox: Option<String>) -> crate::host::init::Pending<'_> {
        Box::pin(TemplateProcesses::identity_settled(self, sandbox))
    }
}

/// Tracks processes started through envd, records the template ones and
/// restores them after a cold boot.
#[derive(Debug)]
pub struct TemplateProcesses {
    table: Arc<ProcessTable>,
    context: ContextStore,
    persister: Arc<Persister>,
    options: RestoreOptions,
    boot_id: Option<String>,
    inner: Mutex<Inner>,
    serials: AtomicU64,
    /// One save at a time, each of the newest record.
    saving: tokio::sync::Mutex<()>,
    /// True once the start-up restore is over (at once when there is none).
    restored: tokio::sync::watch::Sender<bool>,
}

impl TemplateProcesses {
    /// A tracker holding `record`, the one saved with the exec context.
    pub fn new(
        table: Arc<ProcessTable>,
        context: ContextStore,
        persister: Arc<Persister>,
        record: TemplateRecord,
        options: RestoreOptions,
    ) -> Arc<Self> {
        let boot_id = crate::record::template::read_boot_id(&options.boot_id_path);
        if boot_id.is_none() {
            tracing::warn!(path = %options.boot_id_path.display(), "boot id unreadable: template processes are not restored");
        }
        Arc::new(Self {
            table,
            context,
            persister,
            options,
            boot_id,
            inner: Mutex::new(Inner { tracked: HashMap::new(), record }),
            serials: AtomicU64::new(0),
            saving: Default::default(),
            restored: tokio::sync::watch::channel(false).0,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracks a process just started through envd until it ends.
    pub fn track(self: &Arc<Self>, handle: &Arc<ProcessHandle>, recipe: Recipe) {
        let Some(mut process) = recipe.process else { return };
        let pid = handle.pid();
        process.pid = pid;
        let serial = self.next_serial();
        let tracked = Tracked { serial, identity: recipe.identity, process, template: false };
        self.inner().tracked.insert(pid, tracked);
        self.watch_end(handle, serial);
    }

    fn next_serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed)
    }

    /// Every tracked process as data, for an image of envd that takes the
    /// processes over (`/upgrade`).
    pub fn export(&self) -> Vec<TrackedState> {
        let inner = self.inner();
        let tracked = inner.tracked.iter();
        tracked
            .map(|(pid, t)| TrackedState {
                pid: *pid,
                identity: t.identity.clone(),
                process: t.process.clone(),
                template: t.template,
            })
            .collect()
    }

    /// Tracks again the processes an earlier image tracked, those of them
    /// that were adopted (the record itself came with the exec context).
    pub fn resume(self: &Arc<Self>, tracked: Vec<TrackedState>, adopted: &[Arc<ProcessHandle>]) {
        let mut tracked: BTreeMap<u32, TrackedState> = tracked.into_iter().map(|t| (t.pid, t)).collect();
        for handle in adopted {
            if let Some(state) = tracked.remove(&handle.pid()) {
                self.adopt(state, handle);
            }
        }
    }

    /// Tracks a process another image of envd tracked, now adopted as
    /// `handle`.
    fn adopt(self: &Arc<Self>, state: TrackedState, handle: &Arc<ProcessHandle>) {
        let serial = self.next_serial();
        let tracked = Tracked { serial, identity: state.identity, process: state.process, template: state.template };
        self.inner().tracked.insert(handle.pid(), tracked);
        self.watch_end(handle, serial);
    }

    /// Forgets the process when it ends.
    fn watch_end(self: &Arc<Self>, handle: &Arc<ProcessHandle>, serial: u64) {
        let this = self.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            handle.ended().await;
            this.forget(handle.pid(), serial).await;
        });
    }

    /// A tracked process ended: a template one leaves the record.
    async fn forget(&self, pid: u32, serial: u64) {
        let left_record = {
            let mut inner = self.inner();
            match inner.tracked.get(&pid) {
                Some(tracked) if tracked.serial == serial => {}
                _ => return,
            }
            let tracked = inner.tracked.remove(&pid);
            let was_template = tracked.is_some_and(|t| t.template);
            if was_template {
                inner.record.processes.retain(|p| p.pid != pid);
            }
            was_template
        };
        if left_record {
            tracing::info!(pid, "a template process ended: it is no longer restored after a cold boot");
            self.save().await;
        }
    }

    /// After an authorised `/init`: under a new sandbox identity, every
    /// tracked process started under an earlier one becomes a template
    /// process. Returns once the record is saved.
    pub async fn identity_settled(&self, identity: Option<String>) {
        let Some(identity) = identity else { return };
        let recorded = {
            let mut inner = self.inner();
            if inner.record.sandbox.as_deref() == Some(identity.as_str()) {
                return;
            }
            let proc_root = std::path::Path::new(PROC_ROOT);
            let Inner { tracked, record } = &mut *inner;
            let mut recorded = Vec::new();
            for (pid, entry) in tracked.iter_mut() {
                if entry.template || entry.identity.as_deref() == Some(identity.as_str()) {
                    continue;
                }
                let Some(start_time) = ports::start_time(proc_root, *pid) else { continue };
                entry.template = true;
                entry.process.start_time = Some(start_time);
                entry.process.ports = ports::listening_ports(proc_root, *pid).into_iter().collect();
                recorded.push((entry.process.cmd.clone(), entry.process.ports.clone()));
                record.processes.push(entry.process.clone());
            }
            record.processes.sort_by_key(|p| (p.start_time, p.pid));
            record.sandbox = Some(identity);
            record.boot_id = self.boot_id.clone();
            recorded
        };
        for (cmd, ports) in &recorded {
            tracing::info!(%cmd, ?ports, "recorded as a template process: a cold boot starts it again");
        }
        self.save().await;
    }

    /// Saves the newest record with the exec context.
    async fn save(&self) {
        let _one_at_a_time = self.saving.lock().await;
        let record = self.inner().record.clone();
        self.persister.save_template_processes(record).await;
    }

    /// Resolves once the start-up restore is over: `/init` is acknowledged
    /// only then.
    pub async fn restored(&self) {
        let mut restored = self.restored.subscribe();
        let _ = restored.wait_for(|done| *done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ExecContext;
    use crate::host::fsfreeze::FsFreezer;
    use crate::process::testing::started_as_me;
    use crate::record::RecordedStdio;

    fn tracker(table: &Arc<ProcessTable>, dir: &std::path::Path) -> Arc<TemplateProcesses> {
        let context = ContextStore::new(ExecContext {
            default_user: "user".into(),
            default_workdir: None,
            init_env: BTreeMap::new(),
            internal_env: BTreeMap::new(),
        });
        let freezer = FsFreezer::new(None, Duration::from_secs(1));
        let persister = Persister::new(crate::context::state::StateFile::new(dir), freezer, None);
        let options =
            RestoreOptions { enabled: false, limit: Duration::from_secs(1), boot_id_path: dir.join("boot_id") };
        TemplateProcesses::new(table.clone(), context, persister, TemplateRecord::default(), options)
    }

    #[tokio::test]
    async fn a_tracked_process_survives_export_serialise_and_resume() {
        let dir = std::env::temp_dir().join(format!("envd-restore-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = Arc::new(ProcessTable::default());
        let spec = started_as_me("sleep", &["30"], "server", StdioMode::Pty { cols: 80, rows: 24 });
        let handle = crate::process::start(&table, spec).await.unwrap().handle;
        let tracked = TrackedState {
            pid: handle.pid(),
            identity: Some("sbx-1".into()),
            process: TemplateProcess {
                cmd: "sleep".into(),
                args: vec!["30".into()],
                request_envs: [("A".to_owned(), "1".to_owned())].into(),
                requested_cwd: Some("/tmp".into()),
                env: vec![("A".into(), "1".into())],
                user: "user".into(),
                cwd: "/tmp".into(),
                tag: Some("server".into()),
                stdio: RecordedStdio::Pty { cols: 80, rows: 24 },
                ports: vec![8080],
                pid: handle.pid(),
                start_time: Some(7),
            },
            template: true,
        };
        let earlier = tracker(&table, &dir);
        earlier.resume(vec![tracked.clone()], std::slice::from_ref(&handle));
        let part = earlier.export();
        assert_eq!(part, std::slice::from_ref(&tracked));
        let read_back: Vec<TrackedState> = serde_json::from_str(&serde_json::to_string(&part).unwrap()).unwrap();
        assert_eq!(read_back, part, "serialising loses nothing");
        let next = tracker(&table, &dir);
        next.resume(read_back, std::slice::from_ref(&handle));
        assert_eq!(next.export(), part, "resuming loses nothing");
        // SAFETY: kill(2) of a child that is not reaped yet.
        unsafe { libc::kill(handle.pid() as libc::pid_t, libc::SIGKILL) };
        let _ = std::fs::remove_dir_all(dir);
    }
}
