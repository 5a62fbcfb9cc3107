//! `POST /files`: multipart (one or many files) or a raw
//! `application/octet-stream` body, optionally gzipped, streamed chunk by
//! chunk into temporary files that replace their destinations only when
//! complete (see `crate::fs::transfer`).

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderMap, header};

use super::body::{BodyEncoding, ByteStream, HandedOut, decode, discard, reader};
use super::multipart;
use super::{FilesError, FilesQuery, authorize, file_user, json_response, parse_query, written_json};
use crate::auth::signature::Operation;
use crate::context::{ExecContext, User};
use crate::fs::Owner;
use crate::fs::metadata::Metadata;
use crate::fs::transfer::{Upload, Written};
use crate::server::state::AppState;

/// Prefix of the headers that carry file metadata.
const METADATA_PREFIX: &str = "x-metadata-";

/// `POST /files`.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let idle = state.config.upload_idle_timeout();
    let (query, expiration) = match parse_query(query) {
        Ok(parsed) => parsed,
        Err(error) => {
            discard(body, idle, REFUSED_BODY_DRAIN);
            return error.into_response();
        }
    };
    if let Err(error) = authorize(&state.guard, &headers, &query, Operation::Write, expiration).await {
        discard(body, idle, REFUSED_BODY_DRAIN);
        return error.into_response();
    }
    // Where a multipart upload writes is known only part by part: wait for
    // any volume still being mounted.
    state.volumes.wait_ready(None).await;
    match receive(&state, &query, &headers, body).await {
        Ok(written) => json_response(&serde_json::Value::Array(written.iter().map(written_json).collect())),
        Err(err) => {
            tracing::debug!("upload refused: {err}");
            err.into_response()
        }
    }
}

/// Everything an upload needs besides the body.
struct Plan {
    user: User,
    context: ExecContext,
    metadata: Metadata,
    path: Option<String>,
    idle: Duration,
}

impl Plan {
    fn target(&self, path: &str) -> Result<PathBuf, FilesError> {
        Ok(self.context.resolve_path(path, &self.user)?)
    }
}

/// The body of an upload refused before it was authorised is read only
/// this far (an authorised one is read to its end, see `body::reader`).
const REFUSED_BODY_DRAIN: usize = 16 << 20;

async fn receive(
    state: &AppState,
    query: &FilesQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<Written>, FilesError> {
    let idle = state.config.upload_idle_timeout();
    // From here on an early error still reads the rest of the body (see
    // `body::reader`), so the client gets to see the answer.
    let raw = reader(body, idle);
    let encoding = body_encoding(headers)?;
    let user = file_user(state, query.username.as_deref())?;
    let metadata = metadata(headers)?;
    let plan = Plan { user, context: state.context.snapshot(), metadata, path: query.path.clone(), idle };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match media.as_str() {
        "application/octet-stream" => {
            let path = plan.path.clone().ok_or_else(|| {
                FilesError::BadRequest("the path query parameter is required for application/octet-stream".into())
            })?;
            let target = plan.target(&path)?;
            Ok(vec![octet_stream(&plan, target, decode(raw, encoding)).await?])
        }
        "multipart/form-data" | "multipart/mixed" => {
            let boundary = multipart::boundary(content_type)?;
            receive_parts(&plan, boundary, decode(raw, encoding)).await
        }
        _ => Err(FilesError::BadRequest(format!("unsupported content type '{content_type}'"))),
    }
}

fn body_encoding(headers: &HeaderMap) -> Result<BodyEncoding, FilesError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(BodyEncoding::Identity) };
    match value.to_str().map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Ok("" | "identity") => Ok(BodyEncoding::Identity),
        Ok("gzip") => Ok(BodyEncoding::Gzip),
        _ => Err(FilesError::BadRequest(format!("unsupported Content-Encoding {value:?}: only gzip is supported"))),
    }
}

/// `X-Metadata-<key>: <value>` headers, validated (first value per key).
fn metadata(headers: &HeaderMap) -> Result<Metadata, FilesError> {
    let pairs = headers.keys().filter_map(|name| {
        let key = name.as_str().strip_prefix(METADATA_PREFIX).filter(|k| !k.is_empty())?;
        let value = headers.get(name)?;
        Some((key, value.as_bytes()))
    });
    Ok(Metadata::from_pairs(pairs)?)
}

/// What a failed body read means for the client.
fn body_error(err: io::Error, idle: Duration) -> FilesError {
    match err.kind() {
        io::ErrorKind::TimedOut => FilesError::Idle(idle),
        io::ErrorKind::FileTooLarge => FilesError::TooLarge(err.to_string()),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            FilesError::BadRequest(format!("invalid gzip body: {err}"))
        }
        _ => FilesError::Body(err.to_string()),
    }
}

async fn octet_stream(plan: &Plan, target: PathBuf, mut stream: ByteStream) -> Result<Written, FilesError> {
    // Read the first chunk before touching the disk: a body that is not
    // gzip after all fails here, with nothing created.
    let first = stream.next().await.transpose().map_err(|e| body_error(e, plan.idle))?;
    let mut upload = Upload::begin(target, Owner::from(&plan.user)).await?;
    if let Some(chunk) = first {
        upload.write(chunk).await?;
    }
    while let Some(chunk) = stream.next().await {
        upload.write(chunk.map_err(|e| body_error(e, plan.idle))?).await?;
    }
    Ok(upload.commit(&plan.metadata).await?)
}

async fn receive_parts(plan: &Plan, boundary: String, stream: ByteStream) -> Result<Vec<Written>, FilesError> {
    let handed_out = HandedOut::default();
    let mut parts = multipart::parts(stream, boundary, &handed_out);
    let mut targets = HashSet::new();
    let mut written = Vec::new();
    while let Some(mut field) = parts.next_field().await.map_err(|e| multipart_error(e, plan.idle))? {
        if field.name() != Some("file") {
            continue;
        }
        let target = match &plan.path {
            Some(path) => plan.target(path)?,
            // The part's file name is a full path, not reduced to its base.
            None => plan.target(field.file_name().unwrap_or(""))?,
        };
        if !targets.insert(target.clone()) {
            return Err(FilesError::BadRequest(format!(
                "file '{}' is uploaded twice in one request",
                target.display()
            )));
        }
        let mut upload = Upload::begin(target, Owner::from(&plan.user)).await?;
        while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, plan.idle))? {
            handed_out.add(chunk.len());
            upload.write(chunk).await?;
        }
        written.push(upload.commit(&plan.metadata).await?);
    }
    Ok(written)
}

fn multipart_error(err: multer::Error, idle: Duration) -> FilesError {
    match err {
        multer::Error::StreamReadFailed(source) => match source.downcast::<io::Error>() {
            Ok(io) => body_error(*io, idle),
            Err(other) => FilesError::Body(other.to_string()),
        },
        other => FilesError::BadRequest(format!("invalid multipart body: {other}")),
    }
}
