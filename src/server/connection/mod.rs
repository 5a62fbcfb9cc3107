//! Serving one connection, and how long a client that stops sending or
//! stops reading keeps what it holds (its socket, buffers, the file it
//! downloads or the stream it watches). A watchdog beside each connection
//! closes it when:
//!
//! - it has sent no whole request head [`Bounds::header`] after it opened
//!   (and when more than [`Bounds::max_silent`] connections have sent
//!   nothing yet, or every connection slot is taken, the oldest silent one
//!   past a short grace is closed for each new one, so a flood of silent
//!   sockets keeps a real client waiting a few seconds at most);
//! - kept alive, a new request head has begun and is not whole
//!   [`Bounds::header`] after its first byte (HTTP/1: a head sent a byte at
//!   a time);
//! - nothing has been in flight for [`Bounds::idle`] (hyper times HTTP/1's
//!   idle wait itself; HTTP/2 has no such timer);
//! - a response has been handed to hyper and not taken further, and the
//!   client's TCP has acknowledged no byte, for [`Bounds::response_idle`]:
//!   the client stopped reading (a download never read, a stream whose
//!   reader went away without closing). A client that reads slowly keeps
//!   acknowledging, so only one that takes nothing at all is cut.
//!
//! The watchdog looks at its connection every quarter of the shorter of
//! the header and response bounds (and at each deadline it knows of), so
//! each bound holds within 1.25 times its value, and no request wakes it:
//! a request costs a few atomic stores, one uncontended lock and one small
//! allocation.
//!
//! An upload whose client stops sending is bounded by the upload itself
//! (`--upload-idle-timeout`, answered 408), bodies read whole by
//! `limits::BODY_READ_DEADLINE`.

mod activity;
#[cfg(test)]
mod tests;
mod watched;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tower::ServiceExt;

use super::limits;
use activity::{Activity, Verdict};
pub use activity::{Bounds, SilentConnections};
use watched::{Tracked, WatchedIo};

/// Serves one connection until it ends or its watchdog closes it.
pub async fn serve(
    socket: TcpStream,
    app: axum::Router,
    bounds: Bounds,
    silent: Arc<SilentConnections>,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Activity::new(silent.clone());
    silent.admit(&activity);
    let on_request = activity.clone();
    let on_response = activity.clone();
    let app = app
        .map_request(move |request: http::Request<hyper::body::Incoming>| {
            on_request.request_started(request.version());
            request
        })
        .map_response(move |response: axum::response::Response| {
            let (clock, activity) = (on_response.track_response(), on_response.clone());
            response.map(|inner| Body::new(Tracked { inner, clock, activity }))
        });
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.idle)
        .keep_alive(true)
        .max_buf_size(limits::MAX_READ_BUFFER);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(limits::MAX_HEADER_LIST);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let io = TokioIo::new(WatchedIo { inner: socket, activity: activity.clone() });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    loop {
        if activity.busy()
            && let Some(acked) = bytes_acked(fd)
        {
            activity.note_acked(acked);
        }
        let look_at = match activity.verdict(&bounds) {
            Verdict::Keep(at) => tokio::time::Instant::from_std(activity.opened + Duration::from_millis(at - 1)),
            Verdict::Close(why) => {
                tracing::debug!("closing a connection: {why}");
                break;
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!("connection ended: {err}");
                }
                break;
            }
            () = tokio::time::sleep_until(look_at) => {}
            () = activity.wake.notified() => {}
        }
    }
    activity.leave_silence();
}

/// Bytes of this connection the peer's TCP has acknowledged (`TCP_INFO`).
fn bytes_acked(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `fd` is the connection's socket, open while `serve` runs;
    // the kernel writes at most `len` bytes into `info`.
    let done = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len) };
    // SAFETY: zero-initialised, and filled as far as the kernel knows it.
    (done == 0).then(|| unsafe { info.assume_init() }.tcpi_bytes_acked)
}
