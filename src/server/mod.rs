//! One listener, one router: the Connect services (Connect, gRPC and
//! gRPC-Web, JSON and binary, over HTTP/1.1 and h2c) and the plain HTTP
//! routes, behind the CORS and auth layers.

mod errors;
mod files_http;
mod filesystem_rpc;
mod host_api;
mod http_api;
mod middleware;
mod process_rpc;
mod rpc_gate;
mod state;
mod stream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use connectrpc::Limits;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::config::Config;
pub use errors::HttpError;
use process_rpc::ProcessService;
use state::AppState;

/// Idle keep-alive connections are closed after this long; it must stay
/// above the sandbox proxy's own idle timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(640);
/// Largest single RPC message (e.g. one stdin write).
const MAX_MESSAGE_BYTES: usize = 512 << 20;

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

/// Runs envd until it is killed.
pub fn run(config: Config) -> Result<(), ServerError> {
    // One malloc arena per thread costs resident memory for nothing here.
    // SAFETY: mallopt only tunes glibc's allocator; called before threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), ServerError> {
    let addr = config.listen_addr();
    let state = AppState::build(config);
    let listener = TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
    if let Err(err) = crate::host::systemd::notify_ready() {
        tracing::warn!("telling systemd we are ready: {err}");
    }
    let app = router(state);
    tracing::info!(version = crate::VERSION, %addr, "envd listening");
    loop {
        let (socket, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of fds and the like: back off instead of spinning.
                tracing::warn!("accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(IDLE_TIMEOUT).keep_alive(true);
            builder.http2().timer(TokioTimer::new());
            if let Err(err) = builder.serve_connection(TokioIo::new(socket), service).await {
                tracing::debug!("connection ended: {err}");
            }
        });
    }
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
    let methods = rpc_gate::method_kinds(&rpc);
    let rpc = connectrpc::ConnectRpcService::new(rpc)
        .with_limits(Limits::unlimited().with_max_message_size(MAX_MESSAGE_BYTES));
    rpc_gate::gate(rpc, methods)
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
    let rpc = rpc_service(rpc);
    axum::Router::new()
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
        .route("/upgrade", post(host_api::not_supported))
        .route("/collapse", post(host_api::not_supported))
        .fallback_service(rpc)
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::authenticate))
        .layer(axum::middleware::from_fn(middleware::cors))
        .with_state(state)
}
