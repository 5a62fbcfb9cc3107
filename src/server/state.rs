//! What every handler shares.

use std::sync::Arc;

use crate::auth::AccessGuard;
use crate::config::Config;
use crate::context::{ContextStore, User};
use crate::host::cgroups::Workload;
use crate::host::fsfreeze::FsFreezer;
use crate::host::init::Initializer;
use crate::host::metrics::MetricsSampler;
use crate::process::ProcessTable;

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
    /// `/init`.
    pub initializer: Initializer,
    /// `/metrics`.
    pub metrics: MetricsSampler,
    /// The workload cgroups (`/freeze`, placement).
    pub workload: Arc<Workload>,
    /// The filesystem pause hook (`/fsfreeze`).
    pub freezer: Arc<FsFreezer>,
}

/// The user a request named in `Authorization: Basic`, resolved by the
/// auth layer; absent when it named none.
#[derive(Debug, Clone)]
pub struct NamedUser(pub User);

impl AppState {
    /// The user an RPC runs as: the Basic-header user, else the default.
    pub fn caller(&self, ctx: &connectrpc::RequestContext) -> Result<User, connectrpc::ConnectError> {
        match ctx.extensions().get::<NamedUser>() {
            Some(NamedUser(user)) => Ok(user.clone()),
            None => self.context.user(None).map_err(super::errors::unknown_user),
        }
    }
}
