//! The layers every request passes, in the contract's order: the path
//! made canonical (one spelling per route, before anything matches on
//! it), CORS (so preflights never need a token), the token check, then
//! the Basic-header user check.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};

use super::canonical_path::{RoutePathError, canonical};
use super::errors::{HttpError, answer_early, caller_refused, unauthorized_access};
use super::limits::HASH_PATIENCE;
use super::state::{AppState, NamedUser};
use crate::auth::basic_user;
use crate::auth::token::Access;
use crate::context::users;

const EXPOSED_HEADERS: &str =
    "Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Location, Cache-Control, X-Content-Type-Options";
const ALLOWED_METHODS: &str = "HEAD, GET, POST, PUT, PATCH, DELETE";
const PREFLIGHT_VARY: &str = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers";

/// Rewrites the request path to its canonical spelling
/// ([`super::canonical_path`]); the query stays as sent.
pub async fn canonical_route(mut request: Request, next: Next) -> Response {
    let cleaned = match canonical(request.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return next.run(request).await,
        Ok(std::borrow::Cow::Owned(cleaned)) => cleaned,
        Err(err) => return HttpError::from(err).into_response(),
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{cleaned}?{query}"),
        None => cleaned,
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
    match Uri::from_parts(parts) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return HttpError::from(RoutePathError::Unusable(request.uri().path().to_owned())).into_response(),
    }
    next.run(request).await
}

/// CORS for browsers using the JS SDK: any origin, no credentials.
pub async fn cors(request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    if request.method() == Method::OPTIONS
        && origin.is_some()
        && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return preflight(request.headers());
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if origin.is_some() {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED_HEADERS));
    }
    response
}

fn preflight(request: &HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("7200"));
    headers.insert(header::VARY, HeaderValue::from_static(PREFLIGHT_VARY));
    response
}

/// Routes that protect themselves (signatures, the `/init` hash check).
fn exempt_from_token(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/health") | (&Method::GET | &Method::POST, "/files") | (&Method::POST, "/init")
    )
}

/// The access token, then the user named by `Authorization: Basic`.
pub async fn authenticate(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    if !exempt_from_token(request.method(), request.uri().path()) {
        let token = request.headers().get("x-access-token").map(HeaderValue::as_bytes);
        if state.guard.check_patiently(token, HASH_PATIENCE).await == Access::Denied {
            return answer_early(request, unauthorized_access().into_response()).await;
        }
    }
    if let Some(name) = basic_user(request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
        match users::lookup(&name) {
            Ok(user) => {
                request.extensions_mut().insert(NamedUser(user));
            }
            Err(err) => {
                let response = caller_refused(request.headers(), err);
                return answer_early(request, response).await;
            }
        }
    }
    next.run(request).await
}
