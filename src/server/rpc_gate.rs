//! Checks the reference makes before any RPC handler runs, which the
//! Connect library answers differently: unknown paths are a plain 404,
//! other methods than POST a 405 with `Allow: POST`, a Connect content
//! type of the wrong kind (unary vs stream) a 415, and a malformed
//! `Connect-Timeout-Ms` an `invalid_argument`. Content types are compared
//! case-insensitively, as the reference does. It also holds the bodies
//! that the Connect library buffers whole (every method but the client
//! stream) to the limits of `super::limits`.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use connectrpc::{ConnectRpcService, Dispatcher, MethodKind};
use http::{HeaderValue, Method, header};
use tower::ServiceExt;

use super::errors::{RouteRefusal, RpcError, answer_early, connect_error_response};
use super::limits::{BodyBudget, DeadlineBody, budget_for, rpc_body_max};

/// Types accepted by unary methods (Connect unary, gRPC, gRPC-Web).
const UNARY_TYPES: &str = "application/grpc, application/grpc+json, application/grpc+proto, application/grpc-web, \
     application/grpc-web+json, application/grpc-web+proto, application/json, application/proto";
/// Types accepted by streaming methods.
const STREAM_TYPES: &str = "application/connect+json, application/connect+proto, application/grpc, \
     application/grpc+json, application/grpc+proto, application/grpc-web, application/grpc-web+json, \
     application/grpc-web+proto";

/// Every method path (without the leading slash) and its kind.
pub fn method_kinds(router: &connectrpc::Router) -> Vec<(String, MethodKind)> {
    router.methods().filter_map(|path| Some((path.to_owned(), router.lookup(path)?.kind))).collect()
}

/// Wraps the Connect service with the reference's routing checks.
pub fn gate(
    rpc: ConnectRpcService,
    methods: Vec<(String, MethodKind)>,
    budget: BodyBudget,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send> + Clone + Send + 'static
{
    let methods = std::sync::Arc::new(methods);
    tower::service_fn(move |mut request: Request| {
        let rpc = rpc.clone();
        let methods = methods.clone();
        let budget = budget.clone();
        async move {
            lowercase_media_type(&mut request);
            let kind = match checked_kind(&request, &methods) {
                Ok(kind) => kind,
                Err(response) => return Ok(answer_early(request, *response).await),
            };
            drop_zero_timeout(&mut request);
            if kind != MethodKind::ClientStreaming {
                request = match bound_buffered_body(request, &budget).await {
                    Ok(request) => request,
                    Err(response) => return Ok(response),
                };
            }
            let response = match rpc.oneshot(request).await {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            };
            Ok(response)
        }
    })
}

/// A body the Connect library will buffer whole: its share of the budget
/// is reserved, and reading it gets a deadline.
async fn bound_buffered_body(request: Request, budget: &BodyBudget) -> Result<Request, Response> {
    let max = rpc_body_max(request.uri().path().trim_start_matches('/'));
    match budget.reserve(budget_for(request.headers(), max)).await {
        Ok(reserved) => Ok(request.map(|body| Body::new(DeadlineBody::new(body, reserved)))),
        Err(err) => Err(connect_error_response(request.headers(), err.into())),
    }
}

/// The method's kind, or the reference's answer to a request no handler
/// may see.
fn checked_kind(request: &Request, methods: &[(String, MethodKind)]) -> Result<MethodKind, Box<Response>> {
    let path = request.uri().path().strip_prefix('/');
    let Some(kind) = methods.iter().find(|(m, _)| Some(m.as_str()) == path).map(|(_, kind)| *kind) else {
        return Err(Box::new(RouteRefusal::NotFound.into_response()));
    };
    if request.method() != Method::POST {
        return Err(Box::new(RouteRefusal::MethodNotAllowed.into_response()));
    }
    if let Some(accepted) = wrong_kind_of_type(request, kind) {
        return Err(Box::new(RouteRefusal::UnsupportedMediaType { accepted }.into_response()));
    }
    if let Some(timeout) = request.headers().get("connect-timeout-ms")
        && !valid_timeout(timeout.as_bytes())
    {
        return Err(Box::new(connect_error_response(request.headers(), RpcError::BadTimeout.into())));
    }
    Ok(kind)
}

/// The Connect library compares content types literally, so the media
/// type is lowercased first (parameters are left as they are).
fn lowercase_media_type(request: &mut Request) {
    let Some(value) = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return };
    let (media, params) = value.split_once(';').map_or((value, None), |(media, params)| (media, Some(params)));
    if !media.bytes().any(|b| b.is_ascii_uppercase()) {
        return;
    }
    let mut lowered = media.trim().to_ascii_lowercase();
    if let Some(params) = params {
        lowered.push(';');
        lowered.push_str(params);
    }
    if let Ok(value) = HeaderValue::from_str(&lowered) {
        request.headers_mut().insert(header::CONTENT_TYPE, value);
    }
}

/// A Connect unary type on a streaming method or a Connect stream type on
/// a unary one: the types that method accepts instead. Other types are
/// left to the Connect library.
fn wrong_kind_of_type(request: &Request, kind: MethodKind) -> Option<&'static str> {
    let content_type = request.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    let media = content_type.split(';').next().unwrap_or("").trim();
    let unary_type = matches!(media, "application/json" | "application/proto");
    let stream_type = matches!(media, "application/connect+json" | "application/connect+proto");
    match kind {
        MethodKind::Unary if stream_type => Some(UNARY_TYPES),
        MethodKind::Unary => None,
        _ if unary_type => Some(STREAM_TYPES),
        _ => None,
    }
}

/// `Connect-Timeout-Ms: 0` means no deadline (for `Start`: a process
/// without a time limit), not one that has already passed.
fn drop_zero_timeout(request: &mut Request) {
    if request.headers().get("connect-timeout-ms").is_some_and(|v| v.as_bytes().iter().all(|b| *b == b'0')) {
        request.headers_mut().remove("connect-timeout-ms");
    }
}

/// Whether a `Connect-Timeout-Ms` value is well formed (1 to 10 digits).
pub fn valid_timeout(value: &[u8]) -> bool {
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
