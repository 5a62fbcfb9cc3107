//! Bounds on what a client can make envd hold, so that no process in the
//! VM (and `/init` needs no token) can drive the daemon, which lives
//! outside the workload's memory limit, into an out-of-memory:
//!
//! - connections: at most [`MAX_CONNECTIONS`] at once (more wait in the
//!   kernel's backlog), each with a read buffer of at most
//!   [`MAX_READ_BUFFER`]; how long a silent or stalled one lives is the
//!   `connection` module's;
//! - bodies read whole before a handler runs (`/init`, unary RPCs): a size
//!   limit per route, a deadline for reading them ([`BODY_READ_DEADLINE`]),
//!   and one byte budget shared by all of them at once
//!   ([`BUFFERED_BODY_BUDGET`]);
//! - RPC messages: small for everything but process input and `Start`
//!   (see [`rpc_limits`]), after decompression too.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use connectrpc::Limits;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a request waits for the token hash right after a cold boot
/// before it is refused.
pub const HASH_PATIENCE: Duration = Duration::from_secs(3);

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 2048;
/// An HTTP/1 connection's read buffer, which also bounds a request head.
pub const MAX_READ_BUFFER: usize = 64 * 1024;
/// At most one "connection limit reached" warning per this interval.
pub const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Largest HTTP/2 header block.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// A body that is buffered whole must arrive within this long.
pub const BODY_READ_DEADLINE: Duration = Duration::from_secs(30);
/// Bytes of buffered bodies held at once, across all requests.
pub const BUFFERED_BODY_BUDGET: usize = 64 << 20;
/// Largest `/init` body: a few env vars, a token, a CA bundle.
pub const INIT_BODY_MAX: usize = 64 * 1024;

/// Largest message of an RPC without bulk input (paths, pids, sizes).
const SMALL_MESSAGE: usize = 64 * 1024;
/// Largest `Start` message: more arguments and environment than exec
/// accepts anyway (ARG_MAX is 2 MiB).
const START_MESSAGE: usize = 3 << 20;
/// Largest single process-input message.
const INPUT_MESSAGE: usize = 16 << 20;
/// Connect's envelope prefix, counted in a body's size limit.
const ENVELOPE_PREFIX: usize = 5;

/// The RPCs whose messages may be larger than [`SMALL_MESSAGE`].
const LARGE_MESSAGE_RPCS: [(&str, usize); 3] = [
    ("process.Process/Start", START_MESSAGE),
    ("process.Process/SendInput", INPUT_MESSAGE),
    ("process.Process/StreamInput", INPUT_MESSAGE),
];

fn message_limits(max_message: usize) -> Limits {
    // A body is one message (plus the envelope prefix of a stream).
    Limits::default().with_max_message_size(max_message).with_max_request_body_size(max_message + ENVELOPE_PREFIX)
}

/// The router with its size limits: small by default, larger per route.
pub fn rpc_limits(router: connectrpc::Router) -> connectrpc::Router {
    LARGE_MESSAGE_RPCS.iter().fold(router, |router, (path, max)| router.with_route_limits(path, message_limits(*max)))
}

/// The service-wide limits that [`rpc_limits`] refines per route.
pub fn default_rpc_limits() -> Limits {
    message_limits(SMALL_MESSAGE)
}

/// The largest request body of the RPC at `path` (without leading `/`).
pub fn rpc_body_max(path: &str) -> usize {
    let message = LARGE_MESSAGE_RPCS.iter().find(|(p, _)| *p == path).map_or(SMALL_MESSAGE, |(_, max)| *max);
    message + ENVELOPE_PREFIX
}

/// The shared budget of buffered body bytes.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Semaphore>);

/// Why a buffered body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyLimitError {
    /// The budget stayed exhausted for the whole read deadline.
    #[error("too many large requests at once: try again")]
    Busy,
    /// The body was larger than the route accepts.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The body did not arrive within the deadline.
    #[error("request body not received within {} s", .0.as_secs())]
    TooSlow(Duration),
    /// The client's connection failed while sending it.
    #[error("reading the request body: {0}")]
    Read(String),
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(BUFFERED_BODY_BUDGET)))
    }
}

impl BodyBudget {
    /// Reserves `bytes` of the budget, waiting up to the read deadline.
    pub async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, BodyLimitError> {
        let permits = u32::try_from(bytes.min(BUFFERED_BODY_BUDGET)).unwrap_or(u32::MAX);
        match tokio::time::timeout(BODY_READ_DEADLINE, self.0.clone().acquire_many_owned(permits)).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(BodyLimitError::Busy),
        }
    }
}

/// What a body of at most `max` bytes may take of the budget: its declared
/// length when it cannot grow past that (no compression), else `max`.
pub fn budget_for(headers: &http::HeaderMap, max: usize) -> usize {
    let compressed = ["content-encoding", "connect-content-encoding", "grpc-encoding"]
        .iter()
        .any(|name| headers.get(*name).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity")));
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(length) if !compressed => length.min(max),
        _ => max,
    }
}

/// Reads a whole body of at most `max` bytes within the read deadline.
pub async fn read_whole(body: Body, max: usize) -> Result<Bytes, BodyLimitError> {
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(BODY_READ_DEADLINE, http_body_util::BodyExt::collect(limited)).await {
        Err(_elapsed) => Err(BodyLimitError::TooSlow(BODY_READ_DEADLINE)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => Err(BodyLimitError::TooLarge(max)),
        Ok(Err(err)) => Err(BodyLimitError::Read(err.to_string())),
    }
}

/// A request body that fails once the read deadline has passed, for
/// bodies that a library buffers whole. It holds its share of the budget
/// until it is dropped.
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _reserved: OwnedSemaphorePermit,
}

impl DeadlineBody {
    /// Wraps `inner`, holding `reserved` for its life.
    pub fn new(inner: Body, reserved: OwnedSemaphorePermit) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep(BODY_READ_DEADLINE)), _reserved: reserved }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyLimitError::TooSlow(BODY_READ_DEADLINE))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_follow_declared_lengths_unless_compressed() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(budget_for(&headers, 1000), 1000, "unknown length: the maximum");
        headers.insert(http::header::CONTENT_LENGTH, "10".parse().unwrap());
        assert_eq!(budget_for(&headers, 1000), 10);
        headers.insert(http::header::CONTENT_LENGTH, "5000".parse().unwrap());
        assert_eq!(budget_for(&headers, 1000), 1000);
        headers.insert(http::header::CONTENT_LENGTH, "10".parse().unwrap());
        headers.insert("content-encoding", "gzip".parse().unwrap());
        assert_eq!(budget_for(&headers, 1000), 1000, "compressed bodies grow");
    }

    #[test]
    fn large_routes_are_the_named_ones() {
        assert_eq!(rpc_body_max("filesystem.Filesystem/Stat"), SMALL_MESSAGE + ENVELOPE_PREFIX);
        assert_eq!(rpc_body_max("process.Process/SendInput"), INPUT_MESSAGE + ENVELOPE_PREFIX);
    }

    #[tokio::test]
    async fn whole_bodies_are_bounded() {
        assert_eq!(read_whole(Body::from("small"), 10).await.unwrap(), "small");
        assert_eq!(read_whole(Body::from("far too large"), 10).await, Err(BodyLimitError::TooLarge(10)));
    }
}
