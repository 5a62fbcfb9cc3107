//! How errors are written: the plain JSON error of the HTTP API, a Connect
//! error answered outside the Connect library, and an early answer that
//! keeps the connection usable (`server::errors` decides which status and
//! message; this is only how they go out).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use connectrpc::ConnectError;
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// The plain JSON error of the HTTP API: `{"code":<status>,"message":..}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        let mut response = (self.status, format!("{body}\n")).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        response
    }
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
