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
//! the hot path pays a few atomic stores per request and nothing more.
//!
//! An upload whose client stops sending is bounded by the upload itself
//! (`--upload-idle-timeout`, answered 408), bodies read whole by
//! `limits::BODY_READ_DEADLINE`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tower::ServiceExt;

use super::limits;
use crate::config::Config;

/// How long a client may leave a connection without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// A request head must be whole this long after the connection opened
    /// or after the head's first byte.
    pub header: Duration,
    /// A connection with nothing in flight is closed after this long.
    pub idle: Duration,
    /// A response the client takes nothing of for this long closes its
    /// connection.
    pub response_idle: Duration,
    /// Connections that have sent no request yet, at most.
    pub max_silent: usize,
}

impl Bounds {
    /// The bounds `config`'s flags set.
    pub fn from_config(config: &Config) -> Self {
        Self {
            header: Duration::from_secs(config.header_timeout),
            idle: Duration::from_secs(config.idle_timeout),
            response_idle: Duration::from_secs(config.response_idle_timeout),
            max_silent: usize::try_from(config.max_silent_connections).unwrap_or(usize::MAX),
        }
    }
}

/// The connections that have sent nothing yet, oldest first. Only one
/// silent for at least the grace (a fifth of the header timeout, at least
/// a second) is ever closed to make room: a burst of real clients, each
/// connected and about to send, is never cut.
#[derive(Debug)]
pub struct SilentConnections {
    cap: usize,
    grace: Duration,
    queue: Mutex<VecDeque<Weak<Activity>>>,
    count: AtomicUsize,
}

impl SilentConnections {
    /// An empty set for `bounds`.
    pub fn new(bounds: &Bounds) -> Arc<Self> {
        Arc::new(Self {
            cap: bounds.max_silent.max(1),
            grace: (bounds.header / 5).max(Duration::from_secs(1)),
            queue: Mutex::new(VecDeque::new()),
            count: AtomicUsize::new(0),
        })
    }

    /// Adds a new connection; beyond the cap, closes the oldest silent ones
    /// past their grace.
    fn admit(&self, activity: &Arc<Activity>) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.push_back(Arc::downgrade(activity));
        self.count.fetch_add(1, Ordering::Relaxed);
        while self.count.load(Ordering::Relaxed) > self.cap && self.close_oldest(&mut queue) {}
        // Entries of connections that spoke or closed stay until popped;
        // drop them once they outnumber the silent ones.
        if queue.len() > 2 * self.cap + 64 {
            queue.retain(|entry| entry.upgrade().is_some_and(|activity| activity.silent.load(Ordering::Relaxed)));
        }
    }

    /// Every connection slot is taken: closes the oldest silent connection
    /// past its grace, if there is one, to make room for the next.
    pub fn make_room(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.close_oldest(&mut queue);
    }

    /// Closes the oldest silent connection; false when none is past its grace.
    fn close_oldest(&self, queue: &mut VecDeque<Weak<Activity>>) -> bool {
        while let Some(oldest) = queue.front() {
            let Some(oldest) = oldest.upgrade().filter(|a| a.silent.load(Ordering::Relaxed)) else {
                queue.pop_front();
                continue;
            };
            if oldest.opened.elapsed() < self.grace {
                return false;
            }
            queue.pop_front();
            if oldest.leave_silence() {
                oldest.evicted.store(true, Ordering::Relaxed);
                oldest.wake.notify_one();
                return true;
            }
        }
        false
    }
}

/// What one connection has done, shared by its socket, its requests and
/// its watchdog. Times are milliseconds since `opened`, plus one (0: never).
#[derive(Debug)]
struct Activity {
    opened: Instant,
    silent: AtomicBool,
    evicted: AtomicBool,
    http2: AtomicBool,
    in_flight: AtomicUsize,
    idle_since: AtomicU64,
    head_begun: AtomicU64,
    acked: AtomicU64,
    acked_grew_at: AtomicU64,
    responses: Mutex<Vec<Weak<AtomicU64>>>,
    wake: Notify,
    registry: Arc<SilentConnections>,
}

/// What the watchdog decides.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Look again at this many milliseconds after the connection opened.
    Keep(u64),
    /// Close the connection, for this reason.
    Close(&'static str),
}

impl Activity {
    fn new(registry: Arc<SilentConnections>) -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            silent: AtomicBool::new(true),
            evicted: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_begun: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_grew_at: AtomicU64::new(0),
            responses: Mutex::new(Vec::new()),
            wake: Notify::new(),
            registry,
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Marks the connection as having spoken (or closed); true the first time.
    fn leave_silence(&self) -> bool {
        let was_silent = self.silent.swap(false, Ordering::Relaxed);
        if was_silent {
            self.registry.count.fetch_sub(1, Ordering::Relaxed);
        }
        was_silent
    }

    fn request_started(&self, version: http::Version) {
        self.leave_silence();
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_begun.store(0, Ordering::Relaxed);
    }

    fn response_done(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(self.now(), Ordering::Relaxed);
            self.head_begun.store(0, Ordering::Relaxed);
        }
    }

    /// Bytes arrived: with nothing in flight on a kept-alive HTTP/1
    /// connection, a new request head has begun.
    fn bytes_read(&self) {
        if !self.silent.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_begun.load(Ordering::Relaxed) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_begun.store(self.now(), Ordering::Relaxed);
        }
    }

    fn track_response(&self) -> Arc<AtomicU64> {
        let clock = Arc::new(AtomicU64::new(0));
        let mut responses = self.responses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        responses.retain(|clock| clock.strong_count() > 0);
        responses.push(Arc::downgrade(&clock));
        clock
    }

    /// When the oldest response still waiting on its client was handed over.
    fn oldest_untaken_response(&self) -> Option<u64> {
        let responses = self.responses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        responses
            .iter()
            .filter_map(Weak::upgrade)
            .map(|clock| clock.load(Ordering::Relaxed))
            .filter(|at| *at != 0)
            .min()
    }

    /// Notes how many bytes the client's TCP has acknowledged so far.
    fn note_acked(&self, acked: u64) {
        if self.acked.fetch_max(acked, Ordering::Relaxed) < acked {
            self.acked_grew_at.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Whether a request is in flight.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    fn verdict(&self, bounds: &Bounds) -> Verdict {
        let now = self.now();
        let next_look = now + (millis(bounds.header.min(bounds.response_idle)) / 4).max(100);
        let (deadline, why) = self.deadline(bounds);
        if now >= deadline { Verdict::Close(why) } else { Verdict::Keep(deadline.min(next_look)) }
    }

    /// The next deadline of the connection, and why it would be closed then.
    fn deadline(&self, bounds: &Bounds) -> (u64, &'static str) {
        if self.evicted.load(Ordering::Relaxed) {
            return (0, "too many connections without a request: the oldest is closed");
        }
        if self.silent.load(Ordering::Relaxed) {
            return (1 + millis(bounds.header), "no request head within the header timeout");
        }
        if !self.busy() {
            let head_begun = self.head_begun.load(Ordering::Relaxed);
            if head_begun != 0 {
                return (head_begun + millis(bounds.header), "a request head not whole within the header timeout");
            }
            return (self.idle_since.load(Ordering::Relaxed).max(1) + millis(bounds.idle), "idle for the idle timeout");
        }
        let acked_grew_at = self.acked_grew_at.load(Ordering::Relaxed);
        match self.oldest_untaken_response() {
            Some(at) => (
                at.max(acked_grew_at) + millis(bounds.response_idle),
                "the client took nothing of a response for the response idle timeout",
            ),
            None => (u64::MAX, "never"),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 4)
}

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

/// The socket, telling the connection's activity when bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that tells its connection when it is done, and when
/// it handed a frame over: until hyper polls again, it waits on the client.
struct Tracked {
    inner: Body,
    clock: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.activity.response_done();
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.clock.store(0, Ordering::Relaxed);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.clock.store(self.activity.now(), Ordering::Relaxed);
        }
        polled
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

    const BOUNDS: Bounds = Bounds {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(600),
        response_idle: Duration::from_secs(300),
        max_silent: 2,
    };

    #[test]
    fn a_silent_connection_is_kept_until_the_header_timeout() {
        let activity = Activity::new(SilentConnections::new(&BOUNDS));
        assert_eq!(activity.deadline(&BOUNDS).0, 10_001);
        assert_eq!(activity.verdict(&BOUNDS), Verdict::Keep(2_501), "looked at every quarter of the header timeout");
    }

    #[test]
    fn the_oldest_silent_connection_past_its_grace_is_closed_past_the_cap() {
        let registry = SilentConnections::new(&BOUNDS);
        let all: Vec<_> = (0..3).map(|_| Activity::new(registry.clone())).collect();
        for activity in &all {
            registry.admit(activity);
        }
        // Connected a moment ago, all within their grace: nobody is closed.
        assert!(all.iter().all(|a| matches!(a.verdict(&BOUNDS), Verdict::Keep(_))));
        let registry = Arc::new(SilentConnections {
            cap: 2,
            grace: Duration::ZERO,
            queue: Mutex::new(VecDeque::new()),
            count: AtomicUsize::new(0),
        });
        let all: Vec<_> = (0..3).map(|_| Activity::new(registry.clone())).collect();
        for activity in &all {
            registry.admit(activity);
        }
        assert!(matches!(all[0].verdict(&BOUNDS), Verdict::Close(_)));
        assert!(matches!(all[1].verdict(&BOUNDS), Verdict::Keep(_)));
        // One that spoke no longer counts: a new one closes nobody.
        all[1].request_started(http::Version::HTTP_11);
        let fourth = Activity::new(registry.clone());
        registry.admit(&fourth);
        assert!(matches!(all[2].verdict(&BOUNDS), Verdict::Keep(_)));
        assert_eq!(registry.count.load(Ordering::Relaxed), 2);
        // With every slot taken, the oldest silent one makes room.
        registry.make_room();
        assert!(matches!(all[2].verdict(&BOUNDS), Verdict::Close(_)));
    }

    #[test]
    fn a_begun_head_gets_the_header_timeout_and_an_idle_one_the_idle_timeout() {
        let activity = Activity::new(SilentConnections::new(&BOUNDS));
        activity.request_started(http::Version::HTTP_11);
        activity.response_done();
        let idle_since = activity.idle_since.load(Ordering::Relaxed);
        assert_eq!(activity.deadline(&BOUNDS).0, idle_since + 600_000);
        activity.bytes_read();
        let begun = activity.head_begun.load(Ordering::Relaxed);
        assert_eq!(activity.deadline(&BOUNDS).0, begun + 10_000);
        activity.request_started(http::Version::HTTP_11);
        assert_eq!(activity.head_begun.load(Ordering::Relaxed), 0, "the head was whole");
    }

    #[test]
    fn http2_frames_between_requests_are_no_request_head() {
        let activity = Activity::new(SilentConnections::new(&BOUNDS));
        activity.request_started(http::Version::HTTP_2);
        activity.response_done();
        activity.bytes_read();
        assert_eq!(activity.head_begun.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_response_not_taken_is_timed_from_its_handover() {
        let activity = Activity::new(SilentConnections::new(&BOUNDS));
        activity.request_started(http::Version::HTTP_11);
        let clock = activity.track_response();
        assert!(matches!(activity.verdict(&BOUNDS), Verdict::Keep(_)));
        clock.store(1, Ordering::Relaxed);
        assert_eq!(activity.oldest_untaken_response(), Some(1));
        let bounds = Bounds { response_idle: Duration::ZERO, ..BOUNDS };
        assert!(matches!(activity.verdict(&bounds), Verdict::Close(_)));
        // Bytes the client acknowledged count as taken.
        activity.note_acked(10);
        assert!(matches!(
            activity.verdict(&Bounds { response_idle: Duration::from_secs(1), ..BOUNDS }),
            Verdict::Keep(_)
        ));
        drop(clock);
        assert_eq!(activity.oldest_untaken_response(), None);
    }
}
