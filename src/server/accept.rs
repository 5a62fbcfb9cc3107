//! Accepting connections, including when envd has run out of file
//! descriptors.
//!
//! Out of descriptors, accept(2) fails with EMFILE while the connection
//! waits in the kernel's backlog: retrying alone leaves that client
//! hanging until something else frees a descriptor. So one descriptor is
//! held in reserve (`/dev/null`), and on EMFILE or ENFILE, in this order:
//! 1. the reserve is closed, which frees exactly one descriptor;
//! 2. the waiting connection is accepted with it;
//! 3. it is answered 503 (`errors::out_of_descriptors`) by a one-request
//!    HTTP/1.1 server with a short header timeout, then closed;
//! 4. the reserve is taken back at the next accept, as soon as any
//!    descriptor is free again (until then, refusals wait their turn).
//!
//! The warning is rate-limited: under exhaustion every connection fails.

use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use super::errors;

/// Pause after an accept error other than running out of descriptors,
/// and while the reserve is spent.
const BACKOFF: Duration = Duration::from_millis(50);
/// How long a refused client gets to send its request head.
const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on serving one refusal, whatever the client does.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);
/// At most one accept warning per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The listener with its reserve descriptor.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    reserve: Option<std::fs::File>,
    failures: u64,
    warned_at: Option<Instant>,
}

impl Acceptor {
    /// Wraps a bound listener and takes the reserve descriptor.
    pub fn new(listener: TcpListener) -> Self {
        let mut acceptor = Self { listener, reserve: None, failures: 0, warned_at: None };
        acceptor.restock();
        acceptor
    }

    /// The next connection to serve; connections refused for lack of
    /// descriptors are answered here and never returned.
    pub async fn accept(&mut self) -> TcpStream {
        loop {
            self.restock();
            match self.listener.accept().await {
                Ok((socket, _peer)) => return socket,
                Err(err) if is_out_of_descriptors(&err) => {
                    self.note_failure(&err);
                    if !self.refuse_one().await {
                        tokio::time::sleep(BACKOFF).await;
                    }
                }
                Err(err) => {
                    self.note_failure(&err);
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }

    /// Spends the reserve on one waiting connection; false when there was
    /// no reserve or no connection could be taken.
    async fn refuse_one(&mut self) -> bool {
        if self.reserve.take().is_none() {
            return false;
        }
        let Ok(Ok((socket, _peer))) = tokio::time::timeout(BACKOFF, self.listener.accept()).await else {
            return false;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(errors::out_of_descriptors())
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(REFUSAL_HEADER_TIMEOUT).keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(socket), service);
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, connection).await;
        });
        true
    }

    fn restock(&mut self) {
        if self.reserve.is_none() {
            self.reserve = std::fs::File::open("/dev/null").ok();
        }
    }

    fn note_failure(&mut self, err: &std::io::Error) {
        self.failures += 1;
        if self.warned_at.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
            let failures = std::mem::take(&mut self.failures);
            tracing::warn!(failures, "accepting connections: {err}");
            self.warned_at = Some(Instant::now());
        }
    }
}

fn is_out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
