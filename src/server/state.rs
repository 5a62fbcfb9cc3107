//! What every handler shares.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::AccessGuard;
use crate::config::Config;
use crate::context::state::{SavedContext, StateFile};
use crate::context::{ContextStore, ExecContext, User, UserError};
use crate::fs::InotifyBudget;
use crate::fs::watchers::PollingWatchers;
use crate::host::cgroups::Workload;
use crate::host::fsfreeze::FsFreezer;
use crate::host::identity::{self, Identity};
use crate::host::init::Initializer;
use crate::host::metrics::MetricsSampler;
use crate::host::mmds::MmdsClient;
use crate::host::persist::Persister;
use crate::host::provision::Provisioner;
use crate::host::volumes::Volumes;
use crate::process::ProcessTable;
use crate::restore::TemplateProcesses;
use crate::telemetry::ship::LogShipper;

/// Shared state of the daemon.
#[derive(Debug)]
pub struct AppState {
    /// The flags envd started with.
    pub config: Config,
    /// The access token.
    pub guard: AccessGuard,
    /// Default user, workdir and env.
    pub context: ContextStore,
    /// Running processes.
    pub processes: Arc<ProcessTable>,
    /// Template processes: recorded, and restored after a cold boot.
    pub templates: Arc<TemplateProcesses>,
    /// `/init`.
    pub initializer: Initializer,
    /// `/metrics`.
    pub metrics: MetricsSampler,
    /// The workload cgroups (`/freeze`, placement).
    pub workload: Arc<Workload>,
    /// The filesystem pause hook (`/fsfreeze`).
    pub freezer: Arc<FsFreezer>,
    /// Bytes of request bodies buffered whole, across all requests.
    pub body_budget: super::limits::BodyBudget,
    /// NFS volumes that commands wait for while they are being mounted.
    pub volumes: Arc<Volumes>,
    /// The inotify instances `WatchDir` streams and polling watchers share.
    pub inotify: crate::fs::InotifyBudget,
    /// Polling watchers (CreateWatcher and friends).
    pub watchers: Arc<PollingWatchers>,
    /// envd is the child subreaper of what it starts.
    subreaper: bool,
    /// envd's lines on their way to the host's collector, if shipped.
    logs: Option<LogShipper>,
    /// Forwarded ports, shared with `/upgrade`.
    pub forwards: Arc<crate::forward::Forwards>,
    /// Held by `/upgrade` while it hands the listening sockets over.
    pub intake: Arc<crate::intake::Intake>,
    /// The listening socket, handed over by `/upgrade`.
    pub listener_fd: std::sync::OnceLock<std::os::fd::RawFd>,
    /// What this image took over from the one before, for `/init`.
    pub handover: std::sync::OnceLock<crate::upgrade::HandoverReport>,
}

impl AppState {
    /// Reaps adopted orphans from now on. Called once the processes an
    /// earlier image handed over are registered, so the orphan reaper never
    /// takes their exit status.
    pub fn start_reaping(&self) {
        if self.subreaper {
            tokio::spawn(self.processes.children().clone().reap_forever());
        }
    }

    /// What `/upgrade` hands over, and where.
    pub fn upgrade_daemon(&self) -> crate::upgrade::Daemon {
        crate::upgrade::Daemon {
            processes: self.processes.clone(),
            guard: self.guard.clone(),
            context: self.context.clone(),
            workload: self.workload.clone(),
            watchers: self.watchers.clone(),
            templates: self.templates.clone(),
            forwards: self.forwards.clone(),
            logs: self.logs.clone(),
            intake: self.intake.clone(),
            listener: self.listener_fd.get().copied().unwrap_or(-1),
            run_dir: self.config.run_dir.clone(),
            upgrade_path: self.config.upgrade_path.clone(),
            thaw_fallback: Duration::from_secs(self.config.upgrade_thaw_fallback),
        }
    }
}

/// The user a request named in `Authorization: Basic`, resolved by the
/// auth layer; absent when it named none.
#[derive(Debug, Clone)]
pub struct NamedUser(pub User);

impl AppState {
    /// The user an RPC runs as: the Basic-header user, else the default.
    pub fn caller(&self, ctx: &connectrpc::RequestContext) -> Result<User, UserError> {
        match ctx.extensions().get::<NamedUser>() {
            Some(NamedUser(user)) => Ok(user.clone()),
            None => self.context.user(None),
        }
    }
}

/// The exec context at start-up, by precedence: built-in defaults <
/// flags < the state file (MMDS values and `/init` come later).
fn initial_context(config: &Config, saved: Option<&SavedContext>) -> ExecContext {
    let mut internal_env = std::collections::BTreeMap::new();
    internal_env.insert("E2B_SANDBOX".to_owned(), (!config.dev).to_string());
    let mut context = ExecContext {
        default_user: config.default_user.clone().unwrap_or_else(|| "root".to_owned()),
        default_workdir: config.default_workdir.clone(),
        init_env: Default::default(),
        internal_env,
    };
    if let Some(saved) = saved {
        context.default_user = saved.default_user.clone();
        context.default_workdir = saved.default_workdir.clone().or(context.default_workdir);
        context.init_env = saved.env_vars.clone();
        if let Some(address) = saved.host.events_address {
            context.internal_env.insert("E2B_EVENTS_ADDRESS".to_owned(), crate::host::init::events_url(address));
        }
    }
    context
}

/// Reads the state file; a damaged one is reported and ignored.
fn load_saved_context(file: &StateFile) -> Option<SavedContext> {
    match file.load() {
        Ok(saved) => saved,
        Err(err) => {
            tracing::warn!("ignoring the saved exec context: {err}");
            None
        }
    }
}

impl AppState {
    /// Builds the daemon's state: the saved exec context is loaded before
    /// the listener answers, the metadata service is polled in the
    /// background, and log lines are shipped once it names the collector.
    pub fn build(config: Config, logs: Option<LogShipper>) -> Arc<AppState> {
        let state_file = StateFile::new(&config.state_dir);
        let saved = load_saved_context(&state_file);
        let guard = guard_for(saved.as_ref());
        let context = ContextStore::new(initial_context(&config, saved.as_ref()));
        let freezer =
            FsFreezer::new(config.freeze_target().map(Into::into), Duration::from_secs(config.freeze_deadline));
        let processes = Arc::new(ProcessTable::default());
        let subreaper = become_subreaper();
        let workload = workload(&config);
        let template_record = saved.as_ref().map(|s| s.template_processes.clone()).unwrap_or_default();
        let provisioner = Provisioner::new(config.system_paths());
        if let Some(saved) = &saved {
            provisioner.restore(saved.host.clone());
        }
        let volumes = provisioner.volumes().clone();
        let inotify = inotify_budget();
        let persister = Persister::new(state_file, freezer.clone(), saved);
        let options = config.restore_options();
        let templates =
            TemplateProcesses::new(processes.clone(), context.clone(), persister.clone(), template_record, options);
        let initializer = Initializer::new(!config.dev, guard.clone(), context.clone())
            .with_persister(persister)
            .with_workload(workload.clone())
            .with_templates(templates.clone())
            .with_provisioner(provisioner);
        if !config.dev {
            identity::write_identity_file(&config.run_dir, ".E2B_SANDBOX", "true", 0o444);
        }
        let (initializer, identity_known) = with_identity(initializer, &config, &guard, &context, logs.as_ref());
        templates.restore_at_start(workload.clone(), identity_known);
        Arc::new(AppState {
            initializer,
            config,
            guard,
            context,
            processes,
            templates,
            metrics: MetricsSampler::default(),
            workload,
            freezer,
            body_budget: Default::default(),
            volumes,
            watchers: Arc::new(PollingWatchers::with_budget(inotify.clone())),
            inotify,
            subreaper,
            logs,
            forwards: Default::default(),
            intake: Default::default(),
            listener_fd: Default::default(),
            handover: Default::default(),
        })
    }
}

/// Secured before a cold boot: closed until the token or its hash is known.
fn guard_for(saved: Option<&SavedContext>) -> AccessGuard {
    let guard = AccessGuard::default();
    if saved.is_some_and(|s| s.secured) {
        guard.close_until_known();
    }
    guard
}

/// Orphans of killed commands come to envd (from before anything is
/// started), which reaps them once `start_reaping` runs.
fn become_subreaper() -> bool {
    match crate::process::reaper::become_subreaper() {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!("not a child subreaper: {err}");
            false
        }
    }
}

fn workload(config: &Config) -> Arc<Workload> {
    let workload = if config.no_cgroups { Workload::default() } else { Workload::setup(&config.cgroup_root) };
    Arc::new(workload.with_freeze_watchdog(Duration::from_secs(config.freeze_watchdog)))
}

fn inotify_budget() -> InotifyBudget {
    let inotify = InotifyBudget::from_kernel(std::path::Path::new(crate::fs::MAX_USER_INSTANCES));
    tracing::info!(
        max_instances = inotify.limit(),
        kernel_limit = inotify.kernel_limit(),
        "watchers share a bounded number of inotify instances"
    );
    inotify
}

/// With a metadata service: the sandbox identity polled from start-up on
/// (its task returned), and log lines shipped once it names the collector.
fn with_identity(
    initializer: Initializer,
    config: &Config,
    guard: &AccessGuard,
    context: &ContextStore,
    logs: Option<&LogShipper>,
) -> (Initializer, Option<tokio::task::JoinHandle<()>>) {
    let Some(address) = config.metadata_address() else { return (initializer, None) };
    let mut identity = Identity::new(MmdsClient::new(address), guard.clone(), context.clone(), &config.run_dir);
    if let Some(logs) = logs {
        tokio::spawn(logs.clone().run());
        identity = identity.with_log_shipper(logs.clone());
    }
    let known = tokio::spawn(identity.clone().poll_at_start());
    (initializer.with_identity(identity), Some(known))
}
