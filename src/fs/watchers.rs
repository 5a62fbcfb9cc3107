//! Polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher), for
//! clients that cannot hold a stream open.
//!
//! Unlike the reference, memory is bounded: each watcher queues at most
//! `max_events` events between two polls. Past that, or when its inotify
//! queue overflows, the watcher fails: its queue is dropped, its inotify
//! instance closed, and every later poll returns the failure, so the client
//! knows events were lost. A watcher that nobody polls for `idle_ttl`
//! expires and is forgotten (later polls: not found).
//!
//! Each live watcher holds one inotify instance from the budget it shares
//! with `WatchDir` streams; a failed, removed or expired watcher gives its
//! instance back at once.
//!
//! A poll first has the watcher's pump read everything the kernel has
//! queued (a drain), so an answer holds every event of a change that
//! completed before the poll: a client that writes a file and then polls
//! sees all of that write's events, however busy the machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::watch::{FsEvent, WatchOptions, Watcher};
use super::{FsError, InotifyBudget, random};

/// Events a polling watcher holds between two polls.
pub const DEFAULT_MAX_EVENTS: usize = 10_000;
/// How long a polling watcher lives without being polled.
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(15 * 60);
/// Drain requests waiting for one pump; a poll beyond that waits its turn.
const DRAIN_REQUESTS: usize = 16;

/// Asks a pump to drain; the pump drops the sender once the queue holds
/// everything read.
type DrainRequest = oneshot::Sender<()>;

/// Why a poll failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatcherError {
    /// No such watcher (never created, removed, or expired).
    #[error("watcher with id '{0}' not found")]
    Unknown(String),
    /// The watcher failed; it reports this until removed.
    #[error("watcher failed: {0}")]
    Failed(String),
}

#[derive(Debug)]
struct Queue {
    events: Vec<FsEvent>,
    failure: Option<String>,
    last_poll: Instant,
}

#[derive(Debug)]
struct Polled {
    root: PathBuf,
    options: WatchOptions,
    queue: Mutex<Queue>,
    task: Mutex<Option<JoinHandle<()>>>,
    drains: mpsc::Sender<DrainRequest>,
}

/// A polling watcher as data: what another image of envd needs to go on
/// with the same id and the events queued so far.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatcherState {
    /// Its id.
    pub id: String,
    /// The watched directory.
    pub root: PathBuf,
    /// How it watches.
    pub options: WatchOptions,
    /// Events not yet polled.
    pub events: Vec<FsEvent>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

impl Polled {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has the pump move every event the kernel holds into the queue. A
    /// pump that no longer reads (failed or stopped) answers at once.
    async fn drain(&self) {
        let (done, answered) = oneshot::channel();
        if self.drains.send(done).await.is_ok() {
            let _ = answered.await;
        }
    }

    /// Aborts the pump; its watcher is dropped once the returned task ends.
    fn stop(&self) -> Option<JoinHandle<()>> {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = &task {
            task.abort();
        }
        task
    }
}

type Table = Mutex<HashMap<String, Arc<Polled>>>;

/// The polling watchers of this envd.
#[derive(Debug)]
pub struct PollingWatchers {
    table: Arc<Table>,
    max_events: usize,
    idle_ttl: Duration,
    inotify: InotifyBudget,
}

impl PollingWatchers {
    /// A registry with the default bounds, taking instances from `inotify`.
    pub fn with_budget(inotify: InotifyBudget) -> Self {
        Self::new(DEFAULT_MAX_EVENTS, DEFAULT_IDLE_TTL, inotify)
    }

    /// A registry with these bounds.
    pub fn new(max_events: usize, idle_ttl: Duration, inotify: InotifyBudget) -> Self {
        Self { table: Arc::default(), max_events, idle_ttl, inotify }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<Polled>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching `root`; returns the new watcher's id (`w` + 20
    /// characters from `[a-z0-9]`).
    pub async fn create(&self, root: PathBuf, options: WatchOptions) -> Result<String, FsError> {
        let id = format!("w{}", random::lower_alnum(20));
        let state = WatcherState { id, root, options, events: Vec::new(), failure: None };
        self.restore(state).await
    }

    /// Every watcher as data, events included.
    pub fn export(&self) -> Vec<WatcherState> {
        let table = self.table();
        table
            .iter()
            .map(|(id, polled)| {
                let queue = polled.queue();
                WatcherState {
                    id: id.clone(),
                    root: polled.root.clone(),
                    options: polled.options,
                    events: queue.events.clone(),
                    failure: queue.failure.clone(),
                }
            })
            .collect()
    }

    /// Re-arms the watchers of an earlier image with their ids and queued
    /// events; returns how many were re-armed and how many failed.
    pub async fn resume(&self, states: Vec<WatcherState>) -> (usize, usize) {
        let (mut armed, mut failed) = (0, 0);
        for state in states {
            let id = state.id.clone();
            match self.restore(state).await {
                Ok(_) => armed += 1,
                Err(err) => {
                    tracing::warn!(watcher = %id, "polling watcher not re-armed: {err}");
                    failed += 1;
                }
            }
        }
        (armed, failed)
    }

    /// Watches again as `state` describes (a failed watcher stays failed);
    /// returns its id.
    async fn restore(&self, state: WatcherState) -> Result<String, FsError> {
        let watcher = match state.failure {
            Some(_) => None,
            None => {
                let (root, options, inotify) = (state.root.clone(), state.options, self.inotify.clone());
                let started = tokio::task::spawn_blocking(move || Watcher::start(&root, options, &inotify)).await;
                Some(started.map_err(|e| FsError::Io {
                    op: "start watcher",
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })??)
            }
        };
        let id = state.id;
        let queue = Queue { events: state.events, failure: state.failure, last_poll: Instant::now() };
        let (drains, drain_requests) = mpsc::channel(DRAIN_REQUESTS);
        let polled = Arc::new(Polled {
            root: state.root,
            options: state.options,
            queue: Mutex::new(queue),
            task: Mutex::new(None),
            drains,
        });
        let pump = Pump {
            id: id.clone(),
            polled: polled.clone(),
            table: Arc::downgrade(&self.table),
            limits: (self.max_events, self.idle_ttl),
            drain_requests,
        };
        let task = tokio::spawn(pump.run(watcher));
        *polled.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        self.table().insert(id.clone(), polled);
        Ok(id)
    }

    /// Takes every event since the last poll, those of changes the kernel
    /// has queued but the pump has not read yet included.
    pub async fn poll(&self, id: &str) -> Result<Vec<FsEvent>, WatcherError> {
        let polled = self.table().get(id).cloned().ok_or_else(|| WatcherError::Unknown(id.to_owned()))?;
        polled.drain().await;
        let mut queue = polled.queue();
        queue.last_poll = Instant::now();
        if let Some(failure) = &queue.failure {
            return Err(WatcherError::Failed(failure.clone()));
        }
        Ok(std::mem::take(&mut queue.events))
    }

    /// Drains every watcher (see [`Self::poll`]), so that [`Self::export`]
    /// then holds every event of a change made before this call.
    pub async fn drain_all(&self) {
        let all: Vec<Arc<Polled>> = self.table().values().cloned().collect();
        for polled in all {
            polled.drain().await;
        }
    }

    /// Stops and forgets a watcher; its inotify instance is closed when
    /// this returns, so the slot is free for the next watcher.
    pub async fn remove(&self, id: &str) -> Result<(), WatcherError> {
        let polled = self.table().remove(id).ok_or_else(|| WatcherError::Unknown(id.to_owned()))?;
        if let Some(task) = polled.stop() {
            // Cancelled, as asked: the pump and its watcher are dropped.
            let _ = task.await;
        }
        Ok(())
    }

    /// How many watchers exist.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for PollingWatchers {
    fn drop(&mut self) {
        for polled in self.table().values() {
            drop(polled.stop());
        }
    }
}

/// Moves events from one watcher into its queue until it fails or expires.
struct Pump {
    id: String,
    polled: Arc<Polled>,
    table: Weak<Table>,
    /// (max queued events, idle time to live)
    limits: (usize, Duration),
    drain_requests: mpsc::Receiver<DrainRequest>,
}

impl Pump {
    async fn run(mut self, watcher: Option<Watcher>) {
        let (max_events, idle_ttl) = self.limits;
        let mut check = tokio::time::interval(idle_ttl.min(Duration::from_secs(30)));
        let Some(mut watcher) = watcher else { return self.linger(check, idle_ttl).await };
        loop {
            // `next` is cancel-safe: an event it read is kept in the watcher.
            let (events, answered) = tokio::select! {
                event = watcher.next() => (event.map(|e| vec![e]), None),
                Some(request) = self.drain_requests.recv() => (watcher.drain(), Some(request)),
                _ = check.tick() => {
                    if self.expired(idle_ttl) { return self.forget() }
                    continue;
                }
            };
            let failure = match events {
                Ok(events) => self.enqueue(events, max_events),
                Err(err) => Some(err.to_string()),
            };
            if let Some(failure) = failure {
                let mut queue = self.polled.queue();
                queue.events = Vec::new();
                queue.failure = Some(failure);
                break;
            }
            // The queue holds the drained events before the poll goes on.
            drop(answered);
        }
        // Failed: close inotify now, keep reporting the failure until
        // the client removes the watcher or it expires.
        drop(watcher);
        self.linger(check, idle_ttl).await
    }

    /// Answers drain requests at once (nothing is read any more) until the
    /// watcher is removed or expires.
    async fn linger(mut self, mut check: tokio::time::Interval, idle_ttl: Duration) {
        loop {
            tokio::select! {
                Some(request) = self.drain_requests.recv() => drop(request),
                _ = check.tick() => if self.expired(idle_ttl) { return self.forget() },
            }
        }
    }

    fn enqueue(&self, events: Vec<FsEvent>, max_events: usize) -> Option<String> {
        let mut queue = self.polled.queue();
        if queue.events.len().saturating_add(events.len()) > max_events {
            return Some(format!("more than {max_events} events queued since the last poll: events were lost"));
        }
        queue.events.extend(events);
        None
    }

    fn expired(&self, idle_ttl: Duration) -> bool {
        self.polled.queue().last_poll.elapsed() >= idle_ttl
    }

    fn forget(&self) {
        if let Some(table) = self.table.upgrade() {
            let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
            // Only if still ours: the id might have been removed already.
            if table.get(&self.id).is_some_and(|p| Arc::ptr_eq(p, &self.polled)) {
                table.remove(&self.id);
                tracing::debug!(watcher = %self.id, "polling watcher expired");
            }
        }
    }
}

#[cfg(test)]
mod tests;
