//! `GET /files`: a file streamed through a fixed-size buffer, gzipped when
//! the client prefers it, else served as is with ranges and conditionals.

use std::io::SeekFrom;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_compression::Level;
use async_compression::tokio::bufread::GzipEncoder;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncSeekExt, BufReader};
use tokio_util::io::ReaderStream;

use super::encoding::{Coding, content_disposition, negotiate, sniff, type_by_extension};
use super::{FilesError, FilesQuery, Unsent, authorize, file_user, parse_query};
use crate::auth::signature::Operation;
use crate::fs::transfer::{Download, open_download};
use crate::server::state::AppState;

/// Bytes per read from the file; RSS stays flat whatever its size.
const CHUNK: usize = 256 * 1024;
/// Bytes looked at to guess a content type.
const SNIFF_LEN: usize = 512;

/// `GET /files`.
pub async fn download(
    State(state): State<Arc<AppState>>,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let (query, expiration) = match parse_query(query) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    match serve(&state, &query, expiration, &headers).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn serve(
    state: &AppState,
    query: &FilesQuery,
    expiration: Option<i64>,
    headers: &HeaderMap,
) -> Result<Response, FilesError> {
    authorize(&state.guard, headers, query, Operation::Read, expiration).await?;
    let user = file_user(state, query.username.as_deref())?;
    let path = state.context.snapshot().resolve_path(query.path.as_deref().unwrap_or(""), &user)?;
    state.volumes.wait_ready(Some(&path)).await;
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || open_download(&path))
            .await
            .map_err(|e| FilesError::Body(e.to_string()))??
    };
    let conditional =
        ["range", "if-modified-since", "if-none-match", "if-range"].iter().any(|h| headers.contains_key(*h));
    let accept = headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok());
    let coding = negotiate(accept, conditional).map_err(|_| FilesError::NotAcceptable)?;
    let mut response = match coding {
        Coding::Gzip => gzipped(&path, opened),
        Coding::Identity => identity(&path, opened, headers).await?,
    };
    let out = response.headers_mut();
    out.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Ok(value) = HeaderValue::from_str(&content_disposition(&crate::fs::base_name(&path))) {
        out.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

fn gzipped(path: &Path, opened: Download) -> Response {
    // At most the stat'ed size: a device such as /dev/zero never ends.
    let file = tokio::fs::File::from_std(opened.file).take(opened.len);
    // Fastest level: SDK downloads ask for gzip by default, and envd must
    // not become the bottleneck of a copy.
    let encoder = GzipEncoder::with_quality(BufReader::with_capacity(CHUNK, file), Level::Fastest);
    let mut response = Response::new(Body::from_stream(ReaderStream::with_capacity(encoder, CHUNK)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let content_type = type_by_extension(path).unwrap_or("application/octet-stream");
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The part of the file to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Span {
    Full,
    /// Inclusive byte range.
    Part(u64, u64),
    Unsatisfiable,
}

async fn identity(path: &Path, opened: Download, headers: &HeaderMap) -> Result<Response, FilesError> {
    let Download { file, len, modified } = opened;
    if let Some(unsent) = precondition(headers, modified) {
        return Ok(unsent.into_response());
    }
    let span = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(range) if range_applies(headers, modified) => parse_range(range, len),
        _ => Span::Full,
    };
    if span == Span::Unsatisfiable {
        return Ok(Unsent::RangeNotSatisfiable { len }.into_response());
    }
    let content_type = match type_by_extension(path) {
        Some(known) => known,
        // Nothing to look at (and devices or fifos cannot be read at 0).
        None if len == 0 => sniff(&[]),
        None => sniff_type(&file, path.to_owned()).await?,
    };
    let (start, count) = match span {
        Span::Part(start, end) => (start, end - start + 1),
        _ => (0, len),
    };
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await.map_err(|e| read_error(path, e))?;
    }
    let mut response = Response::new(Body::from_stream(ReaderStream::with_capacity(file.take(count), CHUNK)));
    let out = response.headers_mut();
    insert(out, header::CONTENT_TYPE, content_type);
    insert(out, header::CONTENT_LENGTH, &count.to_string());
    insert(out, header::ACCEPT_RANGES, "bytes");
    if let Some(modified) = modified {
        insert(out, header::LAST_MODIFIED, &httpdate::fmt_http_date(modified));
    }
    if let Span::Part(start, end) = span {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        insert(response.headers_mut(), header::CONTENT_RANGE, &format!("bytes {start}-{end}/{len}"));
    }
    Ok(response)
}

fn read_error(path: &Path, err: std::io::Error) -> FilesError {
    FilesError::Fs(crate::fs::FsError::io_strict("read", path, err))
}

async fn sniff_type(file: &std::fs::File, path: PathBuf) -> Result<&'static str, FilesError> {
    let file = file.try_clone().map_err(|e| read_error(&path, e))?;
    tokio::task::spawn_blocking(move || {
        let mut head = vec![0u8; SNIFF_LEN];
        let n = file.read_at(&mut head, 0).map_err(|e| read_error(&path, e))?;
        Ok(sniff(&head[..n]))
    })
    .await
    .map_err(|e| FilesError::Body(e.to_string()))?
}

fn insert(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn date_header(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| httpdate::parse_http_date(v).ok())
}

/// HTTP dates have whole seconds.
fn whole_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Go's `checkPreconditions` without ETags (envd sets none): 412 or 304.
fn precondition(headers: &HeaderMap, modified: Option<SystemTime>) -> Option<Unsent> {
    let mtime = modified.map(whole_seconds);
    if let Some(if_match) = headers.get(header::IF_MATCH) {
        if if_match.as_bytes().trim_ascii() != b"*" {
            return Some(Unsent::PreconditionFailed);
        }
    } else if let (Some(since), Some(mtime)) = (date_header(headers, header::IF_UNMODIFIED_SINCE), mtime)
        && mtime > whole_seconds(since)
    {
        return Some(Unsent::PreconditionFailed);
    }
    if let Some(none_match) = headers.get(header::IF_NONE_MATCH) {
        return (none_match.as_bytes().trim_ascii() == b"*").then_some(Unsent::NotModified);
    }
    match (date_header(headers, header::IF_MODIFIED_SINCE), mtime) {
        (Some(since), Some(mtime)) if mtime <= whole_seconds(since) => Some(Unsent::NotModified),
        _ => None,
    }
}

/// `If-Range` with a date equal to the file's: honour `Range`; with an
/// ETag or another date: send the whole file.
fn range_applies(headers: &HeaderMap, modified: Option<SystemTime>) -> bool {
    match headers.get(header::IF_RANGE) {
        None => true,
        Some(_) => match (date_header(headers, header::IF_RANGE), modified) {
            (Some(date), Some(modified)) => whole_seconds(date) == whole_seconds(modified),
            _ => false,
        },
    }
}

/// One `bytes=` range; several ranges are answered with the whole file,
/// which HTTP allows.
fn parse_range(header: &str, len: u64) -> Span {
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return Span::Unsatisfiable };
    if spec.contains(',') {
        return Span::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Span::Unsatisfiable };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix: the last N bytes.
        return match last.parse::<u64>() {
            Ok(n) if n > 0 && len > 0 => Span::Part(len.saturating_sub(n), len - 1),
            _ => Span::Unsatisfiable,
        };
    }
    let Ok(start) = first.parse::<u64>() else { return Span::Unsatisfiable };
    if start >= len {
        return Span::Unsatisfiable;
    }
    let end = if last.is_empty() {
        len - 1
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => end.min(len - 1),
            _ => return Span::Unsatisfiable,
        }
    };
    Span::Part(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-4", 10), Span::Part(0, 4));
        assert_eq!(parse_range("bytes=5-", 10), Span::Part(5, 9));
        assert_eq!(parse_range("bytes=-3", 10), Span::Part(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Span::Part(0, 9));
        assert_eq!(parse_range("bytes=8-100", 10), Span::Part(8, 9));
        assert_eq!(parse_range("bytes=10-", 10), Span::Unsatisfiable);
        assert_eq!(parse_range("bytes=4-2", 10), Span::Unsatisfiable);
        assert_eq!(parse_range("items=0-1", 10), Span::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Span::Full);
        assert_eq!(parse_range("bytes=0-0", 0), Span::Unsatisfiable);
    }

    #[test]
    fn conditionals() {
        let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(precondition(&headers, Some(modified)), None);
        headers.insert(header::IF_MODIFIED_SINCE, HeaderValue::from_str(&httpdate::fmt_http_date(modified)).unwrap());
        assert_eq!(precondition(&headers, Some(modified)), Some(Unsent::NotModified));
        let earlier = modified - std::time::Duration::from_secs(10);
        headers.insert(header::IF_MODIFIED_SINCE, HeaderValue::from_str(&httpdate::fmt_http_date(earlier)).unwrap());
        assert_eq!(precondition(&headers, Some(modified)), None);
        headers.insert(header::IF_UNMODIFIED_SINCE, HeaderValue::from_str(&httpdate::fmt_http_date(earlier)).unwrap());
        assert_eq!(precondition(&headers, Some(modified)), Some(Unsent::PreconditionFailed));
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_RANGE, HeaderValue::from_static("\"etag\""));
        assert!(!range_applies(&headers, Some(modified)));
    }
}
