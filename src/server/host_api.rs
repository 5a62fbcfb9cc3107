//! The orchestrator's pause hooks: `/freeze`, `/unfreeze` (workload
//! cgroups), `/fsfreeze`, `/fsthaw` (the root filesystem).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::errors::{HttpError, freeze_busy, task_failed};
use super::state::AppState;
use crate::host::collapse;
use crate::host::disk_flush::{self, FlushReport};
use crate::host::workload_freeze::{FreezeMode, FreezeReport};
use crate::upgrade;

/// Query of `POST /freeze`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FreezeQuery {
    mode: Option<String>,
    max_cgroups: Option<i64>,
    max_wait_ms: Option<i64>,
}

/// How long a `/freeze` without `maxWaitMs` waits for the disks' flush.
const FLUSH_WITHOUT_WAIT: Duration = Duration::from_secs(2);

/// `/freeze`'s report with the flush of the disks after it.
#[derive(Debug, Serialize)]
struct FreezeAnswer {
    #[serde(flatten)]
    freeze: FreezeReport,
    #[serde(flatten)]
    flush: FlushReport,
}

/// `POST /freeze`: 204 at once, or 200 with a report after waiting up to
/// `maxWaitMs` for the kernel to confirm. Then every writable disk is
/// flushed within what is left of that budget (2 s without one): the
/// report's `flushed`, or `X-Envd-Flushed` on a 204.
pub async fn freeze(State(state): State<Arc<AppState>>, Query(query): Query<FreezeQuery>) -> Response {
    let started = Instant::now();
    let mode = match query.mode.as_deref() {
        Some("hierarchy") => FreezeMode::Hierarchy,
        _ => FreezeMode::Legacy,
    };
    let wait = query.max_wait_ms.filter(|ms| *ms > 0).map(|ms| Duration::from_millis(ms.unsigned_abs()));
    let report = match state.workload.freeze(mode, query.max_cgroups.unwrap_or(0), wait).await {
        Ok(report) => report,
        Err(busy) => return freeze_busy(busy),
    };
    let flush = disk_flush::flush_disks(wait.map_or(FLUSH_WITHOUT_WAIT, |w| w.saturating_sub(started.elapsed()))).await;
    tracing::info!(
        requested = report.requested,
        frozen = report.frozen,
        failed = report.failed,
        filesystems = flush.filesystems,
        flushed = flush.flushed,
        "workload frozen"
    );
    match wait {
        Some(_) => axum::Json(FreezeAnswer { freeze: report, flush }).into_response(),
        None => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            let flushed = http::HeaderValue::from_static(if flush.flushed { "true" } else { "false" });
            response.headers_mut().insert("x-envd-flushed", flushed);
            response
        }
    }
}

/// `POST /unfreeze`.
pub async fn unfreeze(State(state): State<Arc<AppState>>) -> Response {
    match state.workload.thaw().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => HttpError::from(err).into_response(),
    }
}

/// `POST /fsfreeze`: returns once the freeze has taken effect.
pub async fn fsfreeze(State(state): State<Arc<AppState>>) -> Response {
    match state.freezer.freeze().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => HttpError::from(err).into_response(),
    }
}

/// `POST /fsthaw`.
pub async fn fsthaw(State(state): State<Arc<AppState>>) -> Response {
    match state.freezer.thaw().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => HttpError::from(err).into_response(),
    }
}

/// `POST /collapse`: hugepage collapse of envd's own memory, with its counts.
pub async fn collapse() -> Response {
    let outcome = tokio::task::spawn_blocking(collapse::collapse_own_memory).await;
    match outcome {
        Ok(Ok(report)) => {
            tracing::info!(
                regions = report.regions,
                chunks = report.chunks,
                collapsed = report.collapsed,
                already_huge = report.already_huge,
                skipped = report.skipped,
                elapsed_ms = report.elapsed_ms,
                "collapsed envd's memory"
            );
            let mut response = axum::Json(report).into_response();
            response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
            response
        }
        Ok(Err(err)) => HttpError::from(err).into_response(),
        Err(join) => task_failed("collapse", join).into_response(),
    }
}

/// `POST /upgrade`: on success envd execs the new binary and this request's
/// connection drops (the orchestrator reads that as success); any answer
/// means the running envd stays.
pub async fn upgrade(State(state): State<Arc<AppState>>, headers: http::HeaderMap, body: axum::body::Body) -> Response {
    let target = headers.get("x-envd-upgrade-bin").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let empty =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == "0");
    let request = upgrade::Request { target, body, empty };
    let err = upgrade::perform(&state.upgrade_daemon(), state.initializer.is_initialized(), request).await;
    HttpError::from(err).into_response()
}
