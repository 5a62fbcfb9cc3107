//! The `/files` HTTP API (CONTRACT 4.6–4.8, 5.5): streamed downloads and
//! uploads, and compose. `/files` is exempt from the token layer and checks
//! a signed URL or the header token itself; compose is token-protected.

mod body;
mod download;
mod encoding;
mod multipart;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;

use super::http_error::HttpError;
use super::state::AppState;
use crate::auth::signature::{Operation, sign};
use crate::auth::token::Access;
use crate::auth::{AccessGuard, constant_time_eq};
use crate::context::{PathError, User, UserError};
use crate::fs::metadata::MetadataError;
use crate::fs::transfer::Written;
use crate::fs::{FsError, Owner};

pub use download::download;
pub use multipart::{PartSummary, read_all as read_multipart};
pub use upload::upload;

/// What went wrong with a `/files` request. Mapped to statuses in
/// `server::errors`.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The filesystem operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A `~user` path.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The user named by `username` (or the default user) is unknown.
    #[error("error looking up user '{name}': {source}")]
    User {
        /// The name looked up.
        name: String,
        /// Why it failed.
        source: UserError,
    },
    /// The signature or header token check failed.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Invalid `X-Metadata-*` headers.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// Anything else the client got wrong.
    #[error("{0}")]
    BadRequest(String),
    /// No acceptable download encoding.
    #[error("no acceptable encoding found, supported: [gzip]")]
    NotAcceptable,
    /// The upload body stalled.
    #[error("upload aborted: no data received for {} s", .0.as_secs())]
    Idle(Duration),
    /// The upload body could not be read (the client went away).
    #[error("reading the request body: {0}")]
    Body(String),
    /// A part of the body that is not file content is over its limit.
    #[error("{0}")]
    TooLarge(String),
}

impl IntoResponse for FilesError {
    fn into_response(self) -> Response {
        HttpError::from(self).into_response()
    }
}

/// The query parameters of `/files`.
#[derive(Debug, Default, Deserialize)]
pub struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

/// A malformed query parameter, answered like Go's query binding: 400
/// with a plain-text body (`server::errors`).
#[derive(Debug)]
pub struct QueryError(pub(super) String);

/// A download answered without its body, as Go's `http.ServeContent`
/// answers it (`server::errors` writes it).
#[derive(Debug, PartialEq, Eq)]
pub enum Unsent {
    /// `If-None-Match: *` or `If-Modified-Since` not older than the file.
    NotModified,
    /// `If-Match` other than `*`, or the file changed since `If-Unmodified-Since`.
    PreconditionFailed,
    /// A `Range` that overlaps none of the file's `len` bytes.
    RangeNotSatisfiable {
        /// The file's length.
        len: u64,
    },
}

impl FilesQuery {
    /// `signature_expiration` as an integer.
    fn expiration(&self) -> Result<Option<i64>, QueryError> {
        match &self.signature_expiration {
            None => Ok(None),
            Some(text) => text.trim().parse().map(Some).map_err(|_| {
                QueryError(format!("invalid format for parameter signature_expiration: {text:?} is not an integer"))
            }),
        }
    }
}

/// CONTRACT 5.5: open sandboxes need nothing; otherwise the header token,
/// or a valid, unexpired signature of exactly these parameters.
async fn authorize(
    guard: &AccessGuard,
    headers: &HeaderMap,
    query: &FilesQuery,
    op: Operation,
    expiration: Option<i64>,
) -> Result<(), FilesError> {
    if !guard.is_secured() {
        return Ok(());
    }
    if let Some(token) = headers.get("x-access-token") {
        return match guard.check_patiently(Some(token.as_bytes()), super::limits::HASH_PATIENCE).await {
            Access::Denied => Err(FilesError::Unauthorized("access token present in header but does not match")),
            Access::Open | Access::Granted => Ok(()),
        };
    }
    let Some(signature) = &query.signature else {
        return Err(FilesError::Unauthorized("missing signature query parameter"));
    };
    // Only the raw token can verify a signature; with just its hash
    // (after a cold boot, before /init) no signature is valid.
    let token = guard.token().ok_or(FilesError::Unauthorized("invalid signature"))?;
    let path = query.path.as_deref().unwrap_or("");
    let username = query.username.as_deref().unwrap_or("");
    let expected = sign(path, op, username, token.expose(), expiration);
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(FilesError::Unauthorized("invalid signature"));
    }
    if expiration.is_some_and(|at| at < unix_now()) {
        return Err(FilesError::Unauthorized("signature is already expired"));
    }
    Ok(())
}

fn unix_now() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

/// The user a `/files` request acts for: `username` if given (even
/// empty), else the default user.
fn file_user(state: &AppState, username: Option<&str>) -> Result<User, FilesError> {
    state.context.user(username).map_err(|source| {
        let name = username.map_or_else(|| state.context.snapshot().default_user, str::to_owned);
        FilesError::User { name, source }
    })
}

/// `{"path","name","type":"file"[,"metadata"]}` for a written file.
fn written_json(written: &Written) -> serde_json::Value {
    let mut value = serde_json::json!({
        "path": crate::fs::display(&written.path),
        "name": written.name,
        "type": "file",
    });
    if !written.metadata.is_empty() {
        value["metadata"] = serde_json::json!(written.metadata);
    }
    value
}

fn json_response(value: &serde_json::Value) -> Response {
    let mut response = (StatusCode::OK, value.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The body of `POST /files/compose`.
#[derive(Debug, Deserialize)]
struct ComposeRequest {
    source_paths: Vec<String>,
    destination: String,
    username: Option<String>,
}

/// `POST /files/compose`: concatenate files into a destination.
pub async fn compose(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, FilesError> {
    let request: ComposeRequest =
        serde_json::from_slice(&body).map_err(|e| FilesError::BadRequest(format!("invalid request body: {e}")))?;
    if request.source_paths.is_empty() || request.destination.is_empty() {
        return Err(FilesError::BadRequest("source_paths and destination must not be empty".into()));
    }
    let user = file_user(&state, request.username.as_deref())?;
    let context = state.context.snapshot();
    let destination = context.resolve_path(&request.destination, &user)?;
    let sources =
        request.source_paths.iter().map(|p| context.resolve_path(p, &user)).collect::<Result<Vec<_>, PathError>>()?;
    for path in sources.iter().chain([&destination]) {
        state.volumes.wait_ready(Some(path)).await;
    }
    let owner = Owner::from(&user);
    let written = tokio::task::spawn_blocking(move || crate::fs::compose::compose(&sources, &destination, owner))
        .await
        .map_err(|e| FilesError::Body(e.to_string()))??;
    Ok(json_response(&written_json(&written)))
}

/// The query of both `/files` methods, with its expiration parsed.
fn parse_query(query: Result<Query<FilesQuery>, QueryRejection>) -> Result<(FilesQuery, Option<i64>), QueryError> {
    let Query(query) = query.map_err(|rejection| QueryError(rejection.body_text()))?;
    let expiration = query.expiration()?;
    Ok((query, expiration))
}

/// The check both `/files` methods make of a request without a header
/// token, before touching its body: query binding, expiration, signature.
#[doc(hidden)]
pub async fn check_signed_query(guard: &AccessGuard, uri: &http::Uri, op: Operation) -> Result<(), FilesError> {
    let (query, expiration) =
        parse_query(Query::try_from_uri(uri)).map_err(|QueryError(message)| FilesError::BadRequest(message))?;
    authorize(guard, &HeaderMap::new(), &query, op, expiration).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn query(path: &str, username: Option<&str>, signature: Option<&str>) -> FilesQuery {
        FilesQuery {
            path: Some(path.into()),
            username: username.map(Into::into),
            signature: signature.map(Into::into),
            signature_expiration: None,
        }
    }

    #[tokio::test]
    async fn signatures_per_contract() {
        let guard = AccessGuard::default();
        let none = HeaderMap::new();
        assert!(authorize(&guard, &none, &query("x", None, None), Operation::Read, None).await.is_ok());
        guard.set_token(Some(Secret::new(TOKEN.into())));
        let good = query("/home/user/hello.txt", None, Some("v1_Q1oODJQwZxJOp+Cv9RJhuccjbZgB7bld8m4C4Z73S4w"));
        assert!(authorize(&guard, &none, &good, Operation::Read, None).await.is_ok());
        // The same signature does not grant writing.
        assert!(authorize(&guard, &none, &good, Operation::Write, None).await.is_err());
        let vector = query("hello.txt", Some("user"), Some("v1_kH/H0n8zpp/wjL23NrRZ9+YGgmMA6V1wp+dDgd8riZw"));
        let expired = authorize(&guard, &none, &vector, Operation::Write, Some(1_767_225_600)).await;
        assert!(matches!(expired, Err(FilesError::Unauthorized("signature is already expired"))));
        let missing = authorize(&guard, &none, &query("x", None, None), Operation::Read, None).await;
        assert!(matches!(missing, Err(FilesError::Unauthorized("missing signature query parameter"))));
        let mut headers = HeaderMap::new();
        headers.insert("x-access-token", HeaderValue::from_static("wrong"));
        assert!(authorize(&guard, &headers, &query("x", None, None), Operation::Read, None).await.is_err());
        headers.insert("x-access-token", HeaderValue::from_static(TOKEN));
        assert!(authorize(&guard, &headers, &query("x", None, None), Operation::Read, None).await.is_ok());
    }
}
