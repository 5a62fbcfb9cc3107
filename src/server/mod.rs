//! One listener, one router: the Connect services (Connect, gRPC and
//! gRPC-Web, JSON and binary, over HTTP/1.1 and h2c) and the plain HTTP
//! routes, behind the CORS and auth layers.

mod accept;
mod canonical_path;
mod connection;
mod errors;
mod files_http;
mod filesystem_rpc;
mod host_api;
mod http_api;
mod http_error;
mod limits;
mod middleware;
mod process_rpc;
mod rpc_gate;
mod state;
mod stream;

use std::convert::Infallible;
use std::sync::Arc;

use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::forward::{ForwardConfig, Forwarder};
use crate::telemetry::ship::LogShipper;
pub use errors::HttpError;
use process_rpc::ProcessService;
use state::AppState;

/// While every connection slot is taken, how often a silent connection is
/// looked for to close.
const MAKE_ROOM_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    /// The port could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs envd until it is killed; `logs` ships envd's log lines to the host.
pub fn run(config: Config, logs: Option<LogShipper>) -> Result<(), ServerError> {
    crate::memory::configure_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    runtime.block_on(serve(config, logs))
}

async fn serve(config: Config, logs: Option<LogShipper>) -> Result<(), ServerError> {
    let addr = config.listen_addr();
    let listener = match config.listen_fd {
        Some(fd) => inherited_listener(fd).map_err(|source| ServerError::Bind { addr, source })?,
        None => TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?,
    };
    let state = AppState::build(config, logs);
    let _ = state.listener_fd.set(std::os::fd::AsRawFd::as_raw_fd(&listener));
    if let Some(path) = state.config.handover.clone() {
        let carried = crate::upgrade::parse_fd_list(&state.config.handover_fds);
        let initializer_state = state.clone();
        let initialized = move || initializer_state.initializer.is_initialized();
        let report = crate::upgrade::resume(&state.upgrade_daemon(), &path, &carried, initialized).await;
        let _ = state.handover.set(report);
    }
    state.start_reaping();
    tokio::spawn(crate::memory::return_freed_memory());
    if let Err(err) = crate::host::systemd::notify_ready() {
        tracing::warn!("telling systemd we are ready: {err}");
    }
    if let Some(address) = state.config.forward_target() {
        let max_connections = state.config.forward_max_connections;
        let forwarder = ForwardConfig { address, own_port: addr.port(), max_connections };
        tokio::spawn(Forwarder::new(forwarder, state.forwards.clone(), state.intake.watch()).run());
    }
    let mut intake = state.intake.watch();
    let bounds = connection::Bounds::from_config(&state.config);
    let silent = connection::SilentConnections::new(&bounds);
    let app = router(state);
    tracing::info!(version = crate::VERSION, %addr, "envd listening");
    let mut acceptor = accept::Acceptor::new(listener);
    let slots = Arc::new(Semaphore::new(limits::MAX_CONNECTIONS));
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        let Some(slot) = next_slot(&slots, &silent, &mut warned_at).await else { return Ok(()) };
        // While an upgrade hands the listener over, connections wait in the
        // backlog for the next image (or for this one, if it fails).
        let Some(socket) = intake.unless_held(acceptor.accept()).await else { continue };
        let _ = socket.set_nodelay(true);
        tokio::spawn(connection::serve(socket, app.clone(), bounds, silent.clone(), slot));
    }
}

/// A connection slot; `None` once the slots are closed. While every slot is
/// taken, further connections wait in the kernel's backlog and silent
/// connections past their grace make room, looked for again while the
/// wait lasts.
async fn next_slot(
    slots: &Arc<Semaphore>,
    silent: &connection::SilentConnections,
    warned_at: &mut Option<tokio::time::Instant>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    if warned_at.is_none_or(|at| at.elapsed() > limits::LIMIT_WARNING_INTERVAL) {
        *warned_at = Some(tokio::time::Instant::now());
        tracing::warn!(limit = limits::MAX_CONNECTIONS, "connection limit reached: new connections wait");
    }
    loop {
        silent.make_room();
        match tokio::time::timeout(MAKE_ROOM_EVERY, slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => return Some(slot),
            Ok(Err(_closed)) => return None,
            Err(_elapsed) => {}
        }
    }
}

/// The listening socket an earlier image of envd handed over.
fn inherited_listener(fd: i32) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: the fd was named by the exec'ing image as its listening
    // socket; nothing else in this image owns it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // SAFETY: F_SETFD on the fd just taken over.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The Connect services of `rpc` as envd serves them: behind the routing
/// checks, with envd's message limits.
#[doc(hidden)]
pub fn rpc_service(
    rpc: connectrpc::Router,
) -> impl tower::Service<axum::extract::Request, Response = axum::response::Response, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    rpc_service_with(rpc, limits::BodyBudget::default())
}

/// The Connect services with envd's limits: small messages but for the
/// named routes, and buffered bodies within `budget`.
fn rpc_service_with(
    rpc: connectrpc::Router,
    budget: limits::BodyBudget,
) -> impl tower::Service<axum::extract::Request, Response = axum::response::Response, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    let rpc = limits::rpc_limits(rpc);
    let methods = rpc_gate::method_kinds(&rpc);
    let rpc = connectrpc::ConnectRpcService::new(rpc).with_limits(limits::default_rpc_limits());
    rpc_gate::gate(rpc, methods, budget)
}

/// Parsers of outside input that live inside the server, for the fuzz
/// targets (see `fuzz/`).
#[doc(hidden)]
pub mod parsers {
    pub use super::files_http::{PartSummary, check_signed_query, read_multipart};
    pub use super::rpc_gate::valid_timeout;
    pub use super::rpc_service;
    pub use super::stream::keepalive_interval;
}

fn router(state: Arc<AppState>) -> axum::Router {
    let rpc = connectrpc::Router::new()
        .add_service(Arc::new(ProcessService::new(state.clone())))
        .add_service(Arc::new(filesystem_rpc::FilesystemService::new(state.clone())));
    let rpc = rpc_service_with(rpc, state.body_budget.clone());
    let routes = axum::Router::new()
        .route("/health", get(http_api::health))
        .route("/init", post(http_api::init))
        .route("/envs", get(http_api::envs))
        .route("/metrics", get(http_api::metrics))
        .route("/files", get(files_http::download).post(files_http::upload))
        .route("/files/compose", post(files_http::compose))
        .route("/freeze", post(host_api::freeze))
        .route("/unfreeze", post(host_api::unfreeze))
        .route("/fsfreeze", post(host_api::fsfreeze))
        .route("/fsthaw", post(host_api::fsthaw))
        .route("/upgrade", post(host_api::upgrade))
        .route("/collapse", post(host_api::collapse))
        .fallback_service(rpc)
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::authenticate))
        .layer(axum::middleware::from_fn(middleware::cors))
        .with_state(state);
    // Layers of a router run once its route is chosen; this outer one,
    // with no route of its own, rewrites the path before the inner one
    // chooses.
    axum::Router::new().fallback_service(routes).layer(axum::middleware::from_fn(middleware::canonical_route))
}
