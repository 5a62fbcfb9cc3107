//! `POST /init`: the host hands over the token, env vars, default user and
//! workdir, the time, the events address, its egress proxy's CA and the
//! NFS volumes. Authorisation and ordering follow the reference, with the
//! differences marked in docs/CONTRACT.md 4.5; the values are applied
//! only when the request's timestamp is newer than every one applied
//! before. What was applied is saved even when a later step (CA, volumes)
//! fails.

use std::sync::Mutex;
use std::time::SystemTime;

use super::cgroups::Workload;
use super::clock;
use super::identity::Identity;
use super::persist::Persister;
use super::provision::Provisioner;
use super::workload_freeze::FreezeAudit;
use crate::auth::{AccessGuard, Secret};
use crate::context::state::SavedContext;
use crate::context::{ContextStore, INTERNAL_ENV_VARS};
use crate::record::VolumeMount;

mod access;
mod body;

use access::{TokenHashSource, authorize};
use body::{InitBody, parse_body};

/// Longest wait for the metadata service's sandbox id before `/init` is
/// acknowledged (it answers in microseconds inside a VM).
const IDENTITY_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why `/init` was refused.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The body is not the JSON the contract describes.
    #[error("invalid init body: {0}")]
    BadBody(String),
    /// The request may not set or clear the token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The request went away while waiting for another `/init`.
    #[error("another init is in progress")]
    Busy,
    /// The CA could not be installed.
    #[error("failed to install CA bundle: {0}")]
    Ca(#[from] super::ca_bundle::CaError),
    /// A volume could not be mounted.
    #[error("failed to setup NFS volumes: {0}")]
    Volumes(#[from] super::volumes::VolumeError),
}

/// The parts of `/init` that set up the system, applied after the context.
#[derive(Debug, Default)]
struct SystemSetup {
    events_address: Option<std::net::IpAddr>,
    ca_bundle: Option<String>,
    volume_mounts: Option<Vec<VolumeMount>>,
    lifecycle_id: Option<String>,
}

/// Checks an `/init` body the way `/init` does (for fuzzing).
pub fn check_body(body: &[u8]) -> Result<(), InitError> {
    parse_body(body).map(drop)
}

/// Applies `/init` requests, one at a time.
#[derive(Debug)]
pub struct Initializer {
    /// Step the clock (never in `--dev`).
    step_clock: bool,
    guard: AccessGuard,
    context: ContextStore,
    newest_timestamp: Mutex<Option<SystemTime>>,
    lock: tokio::sync::Mutex<()>,
    /// Where the exec context is saved, if anywhere.
    persister: Option<std::sync::Arc<Persister>>,
    /// Thawed on every authorised `/init`.
    workload: std::sync::Arc<Workload>,
    /// The metadata service, if any.
    identity: Option<Identity>,
    /// Template processes: restored before the first `/init` is
    /// acknowledged, recorded when the sandbox identity changes.
    templates: Option<std::sync::Arc<dyn AfterInit>>,
    /// Hosts entry, CA and volumes; without one they are ignored.
    provisioner: Option<std::sync::Arc<Provisioner>>,
    /// An authorised `/init` has been seen by this image of envd.
    initialized: std::sync::atomic::AtomicBool,
}

/// A future of [`AfterInit`].
pub type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// What `/init` waits for and reports to beyond its own work: the template
/// processes (`restore::TemplateProcesses`). A trait, because `restore`
/// sits above `host` and builds on it.
pub trait AfterInit: Send + Sync + std::fmt::Debug {
    /// Resolves once the start-up restore is over.
    fn restored(&self) -> Pending<'_>;
    /// The sandbox identity as this `/init` left it (`None`: unknown).
    fn identity_settled(&self, sandbox: Option<String>) -> Pending<'_>;
}

impl Initializer {
    /// An initializer over the shared guard and context.
    pub fn new(step_clock: bool, guard: AccessGuard, context: ContextStore) -> Self {
        Self {
            step_clock,
            guard,
            context,
            newest_timestamp: Mutex::new(None),
            lock: Default::default(),
            persister: None,
            workload: Default::default(),
            identity: None,
            templates: None,
            provisioner: None,
            initialized: Default::default(),
        }
    }

    /// Waits for restored processes and records template processes.
    pub fn with_templates(mut self, templates: std::sync::Arc<dyn AfterInit>) -> Self {
        self.templates = Some(templates);
        self
    }

    /// Sets up the events address, CA and volumes through `provisioner`.
    pub fn with_provisioner(mut self, provisioner: std::sync::Arc<Provisioner>) -> Self {
        self.provisioner = Some(provisioner);
        self
    }

    /// Saves the exec context through `persister` after each change.
    pub fn with_persister(mut self, persister: std::sync::Arc<Persister>) -> Self {
        self.persister = Some(persister);
        self
    }

    /// Thaws `workload` on every authorised `/init`.
    pub fn with_workload(mut self, workload: std::sync::Arc<Workload>) -> Self {
        self.workload = workload;
        self
    }

    /// Whether an authorised `/init` reached this image of envd.
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Authorises against, and refreshes identity from, the metadata service.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Handles one `/init` body; returns the audit of the frozen set found
    /// before the thaw, if a hierarchy freeze was in effect.
    pub async fn init(&self, body: &[u8]) -> Result<Option<FreezeAudit>, InitError> {
        let audit = self.init_with(body, &self.identity).await?;
        if let Some(templates) = &self.templates {
            templates.restored().await;
            // Read now, not in the background: a process started right
            // after this `/init` belongs to the new identity.
            let sandbox = match &self.identity {
                Some(identity) => identity.read_now(IDENTITY_READ_LIMIT).await,
                None => None,
            };
            templates.identity_settled(sandbox).await;
        }
        if let Some(identity) = self.identity.clone() {
            tokio::spawn(identity.refresh());
        }
        Ok(audit)
    }

    async fn init_with(&self, body: &[u8], metadata: &impl TokenHashSource) -> Result<Option<FreezeAudit>, InitError> {
        let (body, timestamp) = parse_body(body)?;
        let _one_at_a_time = self.lock.lock().await;
        authorize(&self.guard, body.access_token, metadata).await?;
        self.initialized.store(true, std::sync::atomic::Ordering::SeqCst);
        // The audit must see the frozen set before anything thaws it.
        let audit = self.workload.audit();
        // From here on the workload is thawed, even for a stale request:
        // this is how a resumed sandbox's processes start running again.
        if let Err(err) = self.workload.thaw().await {
            tracing::warn!("thawing the workload: {err}");
        }
        if !self.is_newest(timestamp) {
            tracing::info!("stale /init: nothing applied");
            return Ok(audit);
        }
        if let Some(timestamp) = timestamp {
            self.sync_clock(timestamp);
        }
        let system = self.apply(body);
        let provisioned = self.provision(system).await;
        self.persist().await;
        provisioned.map(|()| audit)
    }

    /// The system half of `/init`, in the contract's order: events
    /// address, CA, volumes; the first failure ends it.
    async fn provision(&self, system: SystemSetup) -> Result<(), InitError> {
        let Some(provisioner) = &self.provisioner else { return Ok(()) };
        if let Some(address) = system.events_address {
            provisioner.set_events_address(address);
        }
        if let Some(pem) = system.ca_bundle.filter(|pem| !pem.is_empty()) {
            provisioner.install_ca(&pem).await?;
        }
        if let Some(volumes) = system.volume_mounts {
            provisioner.mount_volumes(system.lifecycle_id.as_deref(), volumes).await?;
        }
        Ok(())
    }

    async fn persist(&self) {
        let Some(persister) = &self.persister else { return };
        let context = self.context.snapshot();
        let mut saved =
            SavedContext::new(context.default_user, context.default_workdir, context.init_env, self.guard.is_secured());
        if let Some(provisioner) = &self.provisioner {
            saved = saved.with_host(provisioner.record());
        }
        persister.save(saved).await;
    }

    fn is_newest(&self, timestamp: Option<SystemTime>) -> bool {
        let Some(timestamp) = timestamp else { return true };
        let mut newest = self.newest_timestamp.lock().unwrap_or_else(|e| e.into_inner());
        if newest.is_some_and(|n| timestamp <= n) {
            return false;
        }
        *newest = Some(timestamp);
        true
    }

    fn sync_clock(&self, host_time: SystemTime) {
        if !self.step_clock || !clock::needs_step(SystemTime::now(), host_time) {
            return;
        }
        match clock::set_realtime(host_time) {
            Ok(()) => tracing::info!("clock stepped to the host's time"),
            Err(err) => tracing::warn!("stepping the clock failed: {err}"),
        }
    }

    /// Applies the exec-context half; returns the system half.
    fn apply(&self, body: InitBody<'_>) -> SystemSetup {
        let events_address = body.hyperloop_ip.as_deref().and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        self.context.update(|context| {
            if let Some(env) = body.env_vars {
                context.init_env = env.into_iter().filter(|(k, _)| !INTERNAL_ENV_VARS.contains(&k.as_str())).collect();
            }
            if let Some(ip) = events_address {
                context.internal_env.insert("E2B_EVENTS_ADDRESS".into(), events_url(ip));
            }
            if let Some(user) = body.default_user.filter(|u| !u.is_empty()) {
                context.default_user = user;
            }
            if let Some(workdir) = body.default_workdir.filter(|w| !w.is_empty()) {
                context.default_workdir = Some(workdir);
            }
        });
        self.guard.set_token(body.access_token.map(|t| Secret::new(t.to_owned())));
        SystemSetup {
            events_address,
            ca_bundle: body.ca_bundle,
            volume_mounts: body.volume_mounts,
            lifecycle_id: body.lifecycle_id,
        }
    }
}

/// `E2B_EVENTS_ADDRESS` for an events address, as the reference writes it
/// (an IPv6 address unbracketed, as there).
pub fn events_url(address: std::net::IpAddr) -> String {
    format!("http://{address}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sha512_hex;
    use crate::auth::token::Access;
    use crate::context::ExecContext;

    fn initializer() -> Initializer {
        let context = ContextStore::new(ExecContext {
            default_user: "root".into(),
            default_workdir: None,
            init_env: Default::default(),
            internal_env: Default::default(),
        });
        Initializer::new(false, AccessGuard::default(), context)
    }

    struct Hash(&'static str);
    impl TokenHashSource for Hash {
        async fn token_hash(&self) -> Option<String> {
            Some(sha512_hex(self.0))
        }
    }

    #[tokio::test]
    async fn token_rules() {
        let init = initializer();
        init.init_with(br#"{"accessToken":"t1"}"#, &None::<Identity>).await.unwrap();
        assert_eq!(init.guard.check(Some(b"t1")), Access::Granted);
        // Another token without the old one or a hash: refused.
        assert!(matches!(
            init.init_with(br#"{"accessToken":"t2"}"#, &None::<Identity>).await,
            Err(InitError::Unauthorized(_))
        ));
        assert!(matches!(
            init.init_with(b"{}", &None::<Identity>).await,
            Err(InitError::Unauthorized("access token reset not authorized"))
        ));
        // The metadata hash authorises a new token.
        init.init_with(br#"{"accessToken":"t2"}"#, &Hash("t2")).await.unwrap();
        assert_eq!(init.guard.check(Some(b"t2")), Access::Granted);
        // The current token authorises clearing it... only with the hash of "".
        init.init_with(b"{}", &Hash("")).await.unwrap();
        assert_eq!(init.guard.check(None), Access::Open);
    }

    #[tokio::test]
    async fn bad_bodies() {
        let init = initializer();
        for body in
            [&b"{"[..], br#"{"accessToken":""}"#, br#"{"accessToken":"a\u0041"}"#, br#"{"timestamp":"yesterday"}"#]
        {
            assert!(matches!(init.init_with(body, &None::<Identity>).await, Err(InitError::BadBody(_))), "{body:?}");
        }
        init.init_with(b"", &None::<Identity>).await.unwrap();
    }

    #[tokio::test]
    async fn a_rejected_token_is_never_quoted() {
        let err = initializer().init_with(br#"{"accessToken":"sec\u0072et"}"#, &None::<Identity>).await.unwrap_err();
        assert!(!err.to_string().contains("sec"), "{err}");
    }

    #[tokio::test]
    async fn stale_requests_change_nothing() {
        let init = initializer();
        init.init_with(
            br#"{"defaultUser":"a","timestamp":"2026-01-01T00:00:01Z","envVars":{"X":"1","E2B_SANDBOX":"no"}}"#,
            &None::<Identity>,
        )
        .await
        .unwrap();
        init.init_with(br#"{"defaultUser":"b","timestamp":"2026-01-01T00:00:01Z"}"#, &None::<Identity>).await.unwrap();
        let context = init.context.snapshot();
        assert_eq!(context.default_user, "a");
        assert_eq!(context.init_env.get("X").map(String::as_str), Some("1"));
        assert!(!context.init_env.contains_key("E2B_SANDBOX"));
    }
}
