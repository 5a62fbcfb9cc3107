//! The plain JSON error of the HTTP API, the one shape every route answers
//! with (`server::errors` decides which status and message; this is only
//! how they are written).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

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

    /// The token check's refusal.
    pub fn unauthorized_access() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized access, please provide a valid access token or method signing if supported",
        )
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
