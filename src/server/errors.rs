//! The one place where module errors become Connect codes and HTTP
//! statuses. Clients get a chosen code and a one-line message; the
//! details go to the log.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use connectrpc::{ConnectError, ErrorCode};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::context::{PathError, UserError};
use crate::host::fsfreeze::FreezeError;
use crate::host::init::InitError;
use crate::process::ProcessError;

pub use super::http_error::HttpError;

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

/// Most of an unread request body that is read and dropped before an early
/// answer, so the connection stays usable for the next request (a client
/// that is still sending would otherwise hit a closed socket).
const DRAIN_LIMIT: usize = 256 << 10;
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers `response` after discarding the request's body.
pub async fn answer_early(request: axum::extract::Request, response: Response) -> Response {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(request.into_body(), DRAIN_LIMIT);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, body.collect()).await;
    let mut response = response;
    if !matches!(drained, Ok(Ok(_))) {
        // Too large or too slow: tell the client this connection is done.
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A Connect error answered outside the Connect library (by the auth and
/// routing layers): Connect streams get HTTP 200 with an end-of-stream
/// frame, unary calls the status of the code and a JSON body.
pub fn connect_error_response(request: &HeaderMap, err: ConnectError) -> Response {
    let error = serde_json::json!({ "code": err.code.as_str(), "message": err.message.clone().unwrap_or_default() });
    let content_type = request.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let stream_type = match media.as_str() {
        "application/connect+json" => Some("application/connect+json"),
        "application/connect+proto" => Some("application/connect+proto"),
        _ => None,
    };
    if let Some(stream_type) = stream_type {
        let end = serde_json::json!({ "error": error }).to_string();
        let mut frame = Vec::with_capacity(5 + end.len());
        frame.push(0x02);
        frame.extend_from_slice(&u32::try_from(end.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(end.as_bytes());
        let mut response = Response::new(Body::from(frame));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(stream_type));
        return response;
    }
    let mut response = (err.code.http_status(), error.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
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
