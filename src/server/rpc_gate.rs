//! Checks the reference makes before any RPC handler runs, which the
//! Connect library answers differently: unknown paths are a plain 404,
//! other methods than POST a 405 with `Allow: POST`, and a malformed
//! `Connect-Timeout-Ms` an `invalid_argument`.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use connectrpc::ConnectRpcService;
use http::{HeaderValue, Method, StatusCode, header};
use tower::ServiceExt;

use super::errors::answer_early;

/// Wraps the Connect service with the reference's routing checks.
pub fn gate(
    rpc: ConnectRpcService,
    methods: Vec<String>,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send> + Clone + Send + 'static {
    let methods = std::sync::Arc::new(methods);
    tower::service_fn(move |request: Request| {
        let rpc = rpc.clone();
        let methods = methods.clone();
        async move {
            if let Some(response) = refusal(&request, &methods) {
                return Ok(answer_early(request, response).await);
            }
            let response = match rpc.oneshot(request).await {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            };
            Ok(response)
        }
    })
}

/// The reference's answer to a request no handler may see, if any.
fn refusal(request: &Request, methods: &[String]) -> Option<Response> {
    if !methods.iter().any(|m| Some(m.as_str()) == request.uri().path().strip_prefix('/')) {
        return Some((StatusCode::NOT_FOUND, "404 page not found\n").into_response());
    }
    if request.method() != Method::POST {
        let mut response = (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").into_response();
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Some(response);
    }
    if let Some(timeout) = request.headers().get("connect-timeout-ms")
        && !valid_timeout(timeout.as_bytes())
    {
        let err = connectrpc::ConnectError::invalid_argument("invalid Connect-Timeout-Ms: must be 1 to 10 digits");
        return Some(super::errors::connect_error_response(request.headers(), err));
    }
    None
}

fn valid_timeout(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 10 && value.iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timeout_header_rule() {
        assert!(super::valid_timeout(b"60000"));
        assert!(super::valid_timeout(b"0"));
        assert!(!super::valid_timeout(b""));
        assert!(!super::valid_timeout(b"-1"));
        assert!(!super::valid_timeout(b"12345678901"));
        assert!(!super::valid_timeout(b"1.5"));
    }
}
