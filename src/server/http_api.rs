//! The plain HTTP routes: `/health`, `/init`, `/envs`, `/metrics`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::errors::{body_limit_error, init_error};
use super::limits::{INIT_BODY_MAX, budget_for, read_whole};
use super::state::AppState;

fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /health`: 204, no auth.
pub async fn health() -> Response {
    no_store(StatusCode::NO_CONTENT.into_response())
}

/// `POST /init`. The body is read whole, bounded in size and time: the
/// route needs no token, so any process in the VM can call it.
pub async fn init(State(state): State<Arc<AppState>>, headers: http::HeaderMap, body: Body) -> Response {
    let read = async {
        let _reserved = state.body_budget.reserve(budget_for(&headers, INIT_BODY_MAX)).await?;
        read_whole(body, INIT_BODY_MAX).await
    };
    let body = match read.await {
        Ok(body) => body,
        Err(err) => {
            tracing::debug!("/init body refused: {err}");
            return body_limit_error(err);
        }
    };
    let mut response = match state.initializer.init(&body).await {
        Ok(audit) => {
            let mut response = no_store(StatusCode::NO_CONTENT.into_response());
            if let Some(audit) = audit {
                tracing::info!(?audit, "frozen set at /init");
                if let Ok(value) = HeaderValue::from_str(&serde_json::json!(audit).to_string()) {
                    response.headers_mut().insert("x-envd-freeze-audit", value);
                }
            }
            response
        }
        Err(err) => {
            tracing::warn!("/init refused: {err}");
            init_error(err)
        }
    };
    response.headers_mut().insert("x-envd-version", HeaderValue::from_static(crate::VERSION));
    if let Some(handover) = state.handover.get()
        && let Ok(value) = HeaderValue::from_str(&serde_json::json!(handover).to_string())
    {
        response.headers_mut().insert("x-envd-handover", value);
    }
    response
}

/// `GET /envs`: the default env vars.
pub async fn envs(State(state): State<Arc<AppState>>) -> Response {
    no_store(axum::Json(state.context.snapshot().default_env()).into_response())
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.sample() {
        Ok(metrics) => no_store(axum::Json(metrics).into_response()),
        Err(err) => err.into_response(),
    }
}
