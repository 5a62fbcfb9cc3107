//! The one place where module errors become Connect codes and HTTP
//! statuses. Clients get a chosen code and a one-line message; the
//! details go to the log.

use axum::response::{IntoResponse, Response};
use connectrpc::{ConnectError, ErrorCode};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::context::{PathError, UserError};
use crate::host::fsfreeze::FreezeError;
use crate::host::init::InitError;
use crate::process::ProcessError;

pub use super::http_error::{HttpError, answer_early, connect_error_response};

impl From<ProcessError> for ConnectError {
    fn from(err: ProcessError) -> Self {
        let code = match &err {
            ProcessError::NotFound(_) => ErrorCode::NotFound,
            ProcessError::CwdMissing(_) | ProcessError::Spawn { .. } | ProcessError::BadTerminalSize { .. } => {
                ErrorCode::InvalidArgument
            }
            ProcessError::CloseStdinOfPty => ErrorCode::Unknown,
            ProcessError::StdinClosed
            | ProcessError::NotPipe
            | ProcessError::NotPty
            | ProcessError::Input(_)
            | ProcessError::Signal(_)
            | ProcessError::Io(_) => ErrorCode::Internal,
        };
        ConnectError::new(code, err.to_string())
    }
}

/// What the Connect handlers refuse or fail on themselves, before or
/// beside any module: a request of the wrong shape, a deadline, a task.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// A process selector with neither a pid nor a tag.
    #[error("process selector must name a pid or a tag")]
    NoSelector,
    /// `StreamInput` data before its start event.
    #[error("input data arrived before the start event")]
    InputBeforeStart,
    /// A `StreamInput` event of no known kind.
    #[error("stream input event must be start, data or keepalive")]
    UnknownInputEvent,
    /// A signal other than SIGTERM and SIGKILL.
    #[error("only SIGNAL_SIGTERM and SIGNAL_SIGKILL are supported")]
    UnsupportedSignal,
    /// Input with neither stdin nor pty bytes.
    #[error("input must be stdin or pty bytes")]
    NoInput,
    /// A `Connect-Timeout-Ms` header that is not 1 to 10 digits.
    #[error("invalid Connect-Timeout-Ms: must be 1 to 10 digits")]
    BadTimeout,
    /// The stream's `Connect-Timeout-Ms` passed.
    #[error("context deadline exceeded")]
    DeadlineExceeded,
    /// Blocking filesystem work panicked or was cancelled.
    #[error("filesystem task failed: {0}")]
    FsTask(tokio::task::JoinError),
}

impl From<RpcError> for ConnectError {
    fn from(err: RpcError) -> Self {
        let code = match &err {
            RpcError::NoSelector | RpcError::UnknownInputEvent | RpcError::UnsupportedSignal | RpcError::NoInput => {
                ErrorCode::Unimplemented
            }
            RpcError::InputBeforeStart => ErrorCode::FailedPrecondition,
            RpcError::BadTimeout => ErrorCode::InvalidArgument,
            RpcError::DeadlineExceeded => ErrorCode::DeadlineExceeded,
            RpcError::FsTask(_) => ErrorCode::Internal,
        };
        ConnectError::new(code, err.to_string())
    }
}

/// A request no Connect handler may see, answered as the reference's
/// router answers it (plain text, not a Connect error).
#[derive(Debug)]
pub enum RouteRefusal {
    /// No such method.
    NotFound,
    /// A method of the service asked for with another verb than POST.
    MethodNotAllowed,
    /// A body type the method's kind does not take; names the types it does.
    UnsupportedMediaType {
        /// The `Accept-Post` value.
        accepted: &'static str,
    },
}

impl IntoResponse for RouteRefusal {
    fn into_response(self) -> Response {
        match self {
            RouteRefusal::NotFound => (StatusCode::NOT_FOUND, "404 page not found\n").into_response(),
            RouteRefusal::MethodNotAllowed => {
                let mut response = (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").into_response();
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
                response
            }
            RouteRefusal::UnsupportedMediaType { accepted } => {
                let mut response = StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
                response.headers_mut().insert("accept-post", HeaderValue::from_static(accepted));
                response
            }
        }
    }
}

impl From<PathError> for ConnectError {
    fn from(err: PathError) -> Self {
        ConnectError::invalid_argument(err.to_string())
    }
}

/// A caller's user that cannot be found, for RPC handlers.
impl From<UserError> for ConnectError {
    fn from(err: UserError) -> Self {
        match err {
            UserError::Unknown(name) => {
                ConnectError::new(ErrorCode::Unauthenticated, format!("invalid username: '{name}'"))
            }
            other => {
                tracing::error!("user database: {other}");
                ConnectError::new(ErrorCode::Internal, other.to_string())
            }
        }
    }
}

/// The token check's refusal, on every route it guards (Connect ones too,
/// as the reference answers).
pub fn unauthorized_access() -> HttpError {
    HttpError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized access, please provide a valid access token or method signing if supported",
    )
}

/// A Basic header's user that cannot be looked up, on any route: an
/// unknown name is a Connect `unauthenticated` (the SDKs read it so), a
/// broken user database a 500.
pub fn caller_refused(request: &HeaderMap, err: UserError) -> Response {
    match err {
        UserError::Unknown(_) => connect_error_response(request, err.into()),
        other => {
            tracing::error!("user database: {other}");
            HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()).into_response()
        }
    }
}

/// A blocking task of a route that panicked or was cancelled.
pub fn task_failed(what: &str, err: tokio::task::JoinError) -> HttpError {
    tracing::error!("{what}: {err}");
    HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {err}"))
}

/// `/metrics` that could not be read: 500 with an empty body, as the
/// reference answers.
impl IntoResponse for crate::host::metrics::MetricsError {
    fn into_response(self) -> Response {
        tracing::error!("metrics: {self}");
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

impl From<crate::host::workload_freeze::ThawError> for HttpError {
    fn from(err: crate::host::workload_freeze::ThawError) -> Self {
        HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("thawing the workload: {err}"))
    }
}

impl From<super::canonical_path::RoutePathError> for HttpError {
    fn from(err: super::canonical_path::RoutePathError) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, err.to_string())
    }
}

impl From<FreezeError> for HttpError {
    fn from(err: FreezeError) -> Self {
        let status = match err {
            FreezeError::Disabled => StatusCode::CONFLICT,
            FreezeError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError::new(status, err.to_string())
    }
}

/// A freeze that could not have the lock within its budget: 503 with an
/// empty body, as the reference answers.
pub fn freeze_busy(err: crate::host::workload_freeze::FreezeBusy) -> Response {
    tracing::info!("/freeze refused: {err}");
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

impl From<crate::upgrade::UpgradeError> for HttpError {
    fn from(err: crate::upgrade::UpgradeError) -> Self {
        use crate::upgrade::UpgradeError;
        let status = match &err {
            UpgradeError::NotInitialized => StatusCode::CONFLICT,
            UpgradeError::BadTarget | UpgradeError::BadBinary(_) => StatusCode::BAD_REQUEST,
            UpgradeError::Busy | UpgradeError::Freeze(_) | UpgradeError::Pause(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpgradeError::Receive(_) | UpgradeError::Handover(_) | UpgradeError::Exec(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        tracing::warn!("/upgrade refused, this envd keeps serving: {err}");
        HttpError::new(status, err.to_string())
    }
}

impl From<crate::host::collapse::CollapseError> for HttpError {
    fn from(err: crate::host::collapse::CollapseError) -> Self {
        tracing::error!("/collapse: {err}");
        HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

/// The answer to a connection accepted only to be refused because envd
/// is out of file descriptors: retryable, and the connection is closed.
pub fn out_of_descriptors() -> Response {
    let mut response =
        HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "envd is out of file descriptors, try again later")
            .into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `/init` answers errors in plain text (the orchestrator only logs them).
pub fn init_error(err: InitError) -> Response {
    let status = match &err {
        InitError::BadBody(_) => return StatusCode::BAD_REQUEST.into_response(),
        InitError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        InitError::Busy => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        InitError::Ca(_) | InitError::Volumes(_) => StatusCode::BAD_REQUEST,
    };
    (status, err.to_string()).into_response()
}

impl From<super::limits::BodyLimitError> for ConnectError {
    fn from(err: super::limits::BodyLimitError) -> Self {
        use super::limits::BodyLimitError;
        let code = match &err {
            BodyLimitError::Busy => ErrorCode::Unavailable,
            BodyLimitError::TooLarge(_) => ErrorCode::ResourceExhausted,
            BodyLimitError::TooSlow(_) => ErrorCode::DeadlineExceeded,
            BodyLimitError::Read(_) => ErrorCode::InvalidArgument,
        };
        ConnectError::new(code, err.to_string())
    }
}

/// A buffered body refused by the limits, for the plain HTTP routes.
pub fn body_limit_error(err: super::limits::BodyLimitError) -> Response {
    use super::limits::BodyLimitError;
    let status = match &err {
        BodyLimitError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        BodyLimitError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        BodyLimitError::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
        BodyLimitError::Read(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = (status, err.to_string()).into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

// === Filesystem ===

impl From<crate::fs::FsError> for ConnectError {
    fn from(err: crate::fs::FsError) -> Self {
        use crate::fs::FsError;
        let code = match &err {
            FsError::NotFound(_) => ErrorCode::NotFound,
            FsError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            FsError::NotADirectory(_)
            | FsError::IsADirectory(_)
            | FsError::NotARegularFile(_)
            | FsError::NetworkMount(_)
            | FsError::Conflict(_) => ErrorCode::InvalidArgument,
            FsError::SymlinkLoop(_) => ErrorCode::FailedPrecondition,
            FsError::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            // A watcher limit is: the client may retry after removing a watcher.
            FsError::WatchLimit(_) => ErrorCode::ResourceExhausted,
            // Disk full is not a rate limit (resource_exhausted reads as one in the SDKs).
            FsError::NoSpace(_) | FsError::ParentIsFile(_) | FsError::WatchOverflow(_) | FsError::Io { .. } => {
                tracing::warn!("filesystem: {err}");
                ErrorCode::Internal
            }
        };
        ConnectError::new(code, err.to_string())
    }
}

impl From<crate::fs::watchers::WatcherError> for ConnectError {
    fn from(err: crate::fs::watchers::WatcherError) -> Self {
        use crate::fs::watchers::WatcherError;
        let code = match &err {
            WatcherError::Unknown(_) => ErrorCode::NotFound,
            WatcherError::Failed(_) => ErrorCode::Internal,
        };
        ConnectError::new(code, err.to_string())
    }
}

impl IntoResponse for super::files_http::QueryError {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, self.0).into_response()
    }
}

impl IntoResponse for super::files_http::Unsent {
    fn into_response(self) -> Response {
        use super::files_http::Unsent;
        match self {
            Unsent::NotModified => StatusCode::NOT_MODIFIED.into_response(),
            Unsent::PreconditionFailed => StatusCode::PRECONDITION_FAILED.into_response(),
            Unsent::RangeNotSatisfiable { len } => {
                let mut response =
                    (StatusCode::RANGE_NOT_SATISFIABLE, "invalid range: failed to overlap").into_response();
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, value);
                }
                response
            }
        }
    }
}

impl From<super::files_http::FilesError> for HttpError {
    fn from(err: super::files_http::FilesError) -> Self {
        use super::files_http::FilesError;
        use crate::fs::FsError;
        let status = match &err {
            FilesError::Fs(FsError::NotFound(path)) => {
                return HttpError::new(StatusCode::NOT_FOUND, format!("path '{}' does not exist", path.display()));
            }
            FilesError::Fs(FsError::NoSpace(_)) => {
                return HttpError::new(StatusCode::INSUFFICIENT_STORAGE, "not enough disk space available");
            }
            FilesError::Fs(
                FsError::IsADirectory(_)
                | FsError::NotADirectory(_)
                | FsError::NotARegularFile(_)
                | FsError::Conflict(_),
            ) => StatusCode::BAD_REQUEST,
            FilesError::Fs(FsError::PermissionDenied { .. }) => StatusCode::FORBIDDEN,
            FilesError::Fs(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FilesError::User { source: UserError::Unknown(_), .. } | FilesError::Unauthorized(_) => {
                StatusCode::UNAUTHORIZED
            }
            FilesError::User { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            FilesError::Path(_) | FilesError::Metadata(_) | FilesError::BadRequest(_) | FilesError::Body(_) => {
                StatusCode::BAD_REQUEST
            }
            FilesError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            FilesError::Idle(_) => StatusCode::REQUEST_TIMEOUT,
            FilesError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        if status.is_server_error() {
            tracing::error!("/files: {err}");
        }
        HttpError::new(status, err.to_string())
    }
}
