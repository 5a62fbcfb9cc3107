//! What each connection has done, and the connections that have sent
//! nothing yet: the state the watchdog of `connection` decides on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

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
    pub fn from_config(config: &crate::config::Config) -> Self {
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
    pub(super) cap: usize,
    pub(super) grace: Duration,
    pub(super) queue: Mutex<VecDeque<Weak<Activity>>>,
    pub(super) count: AtomicUsize,
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
    pub(super) fn admit(&self, activity: &Arc<Activity>) {
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

    /// Drops the entries of connections that spoke or closed, once none is
    /// silent: each entry keeps its connection's allocation, and after a
    /// burst of connections hundreds of them, scattered through the heap,
    /// would keep its pages resident. Skipped while the queue is in use
    /// (the caller may be closing the oldest, holding it).
    fn forget_spoken(&self) {
        let mut queue = match self.queue.try_lock() {
            Ok(queue) => queue,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        queue.retain(|entry| entry.upgrade().is_some_and(|activity| activity.silent.load(Ordering::Relaxed)));
        if queue.is_empty() {
            *queue = VecDeque::new();
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
pub(super) struct Activity {
    pub(super) opened: Instant,
    pub(super) silent: AtomicBool,
    pub(super) evicted: AtomicBool,
    pub(super) http2: AtomicBool,
    pub(super) in_flight: AtomicUsize,
    pub(super) idle_since: AtomicU64,
    pub(super) head_begun: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) acked_grew_at: AtomicU64,
    pub(super) responses: Mutex<Vec<Weak<AtomicU64>>>,
    pub(super) wake: Notify,
    pub(super) registry: Arc<SilentConnections>,
}

/// What the watchdog decides.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Look again at this many milliseconds after the connection opened.
    Keep(u64),
    /// Close the connection, for this reason.
    Close(&'static str),
}

impl Activity {
    pub(super) fn new(registry: Arc<SilentConnections>) -> Arc<Self> {
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

    pub(super) fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Marks the connection as having spoken (or closed); true the first time.
    pub(super) fn leave_silence(&self) -> bool {
        let was_silent = self.silent.swap(false, Ordering::Relaxed);
        if was_silent && self.registry.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.registry.forget_spoken();
        }
        was_silent
    }

    pub(super) fn request_started(&self, version: http::Version) {
        self.leave_silence();
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_begun.store(0, Ordering::Relaxed);
    }

    pub(super) fn response_done(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(self.now(), Ordering::Relaxed);
            self.head_begun.store(0, Ordering::Relaxed);
        }
    }

    /// Bytes arrived: with nothing in flight on a kept-alive HTTP/1
    /// connection, a new request head has begun.
    pub(super) fn bytes_read(&self) {
        if !self.silent.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_begun.load(Ordering::Relaxed) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_begun.store(self.now(), Ordering::Relaxed);
        }
    }

    pub(super) fn track_response(&self) -> Arc<AtomicU64> {
        let clock = Arc::new(AtomicU64::new(0));
        let mut responses = self.responses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        responses.retain(|clock| clock.strong_count() > 0);
        responses.push(Arc::downgrade(&clock));
        clock
    }

    /// When the oldest response still waiting on its client was handed over.
    pub(super) fn oldest_untaken_response(&self) -> Option<u64> {
        let responses = self.responses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        responses
            .iter()
            .filter_map(Weak::upgrade)
            .map(|clock| clock.load(Ordering::Relaxed))
            .filter(|at| *at != 0)
            .min()
    }

    /// Notes how many bytes the client's TCP has acknowledged so far.
    pub(super) fn note_acked(&self, acked: u64) {
        if self.acked.fetch_max(acked, Ordering::Relaxed) < acked {
            self.acked_grew_at.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Whether a request is in flight.
    pub(super) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    pub(super) fn verdict(&self, bounds: &Bounds) -> Verdict {
        let now = self.now();
        let next_look = now + (millis(bounds.header.min(bounds.response_idle)) / 4).max(100);
        let (deadline, why) = self.deadline(bounds);
        if now >= deadline { Verdict::Close(why) } else { Verdict::Keep(deadline.min(next_look)) }
    }

    /// The next deadline of the connection, and why it would be closed then.
    pub(super) fn deadline(&self, bounds: &Bounds) -> (u64, &'static str) {
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
