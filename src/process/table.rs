//! Live processes by pid, and the end events of recently ended ones, kept
//! for a while so that a late `Connect` still learns the exit status.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ProcessError;
use super::gate::Gate;
use super::handle::ProcessHandle;
use super::reaper::Children;
use super::status::EndStatus;

/// How long an ended process stays reachable by `Connect`.
const RETENTION: Duration = Duration::from_secs(30);
/// Bound on retained end events, so a burst of short commands cannot grow it.
const MAX_RETAINED: usize = 4096;

/// How a request picks a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// By process id.
    Pid(u32),
    /// By the tag given at start.
    Tag(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(pid) => write!(f, "pid {pid}"),
            Selector::Tag(tag) => write!(f, "tag {tag}"),
        }
    }
}

/// What `Connect` finds.
#[derive(Debug)]
pub enum Found {
    /// A live process.
    Live(Arc<ProcessHandle>),
    /// A process that ended recently.
    Ended {
        /// Its pid.
        pid: u32,
        /// How it ended.
        end: EndStatus,
    },
}

#[derive(Debug)]
struct Retained {
    pid: u32,
    tag: Option<String>,
    end: KeptEnd,
    at: Instant,
    /// An adopted process whose kept output nobody has read yet: `Connect`
    /// still gets that output, then the end.
    unread: Option<Arc<ProcessHandle>>,
}

/// An end status as retained: a normal exit as its code alone. A burst of
/// commands retains thousands, allocated while the burst's buffers come
/// and go; each text of their own would keep a page of the heap resident
/// after the burst, where the trim cannot give it back.
#[derive(Debug)]
enum KeptEnd {
    Exited(i32),
    Other(EndStatus),
}

impl KeptEnd {
    fn keep(end: EndStatus) -> Self {
        if end.exited && end == EndStatus::exited_with(end.exit_code) {
            KeptEnd::Exited(end.exit_code)
        } else {
            KeptEnd::Other(end)
        }
    }

    fn status(&self) -> EndStatus {
        match self {
            KeptEnd::Exited(code) => EndStatus::exited_with(*code),
            KeptEnd::Other(end) => end.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<u32, Arc<ProcessHandle>>,
    retained: VecDeque<Retained>,
}

/// A process that ended recently, as kept for a late `Connect` (and as
/// the upgrade handover writes it down).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ended {
    /// Its pid.
    pub pid: u32,
    /// Its tag.
    pub tag: Option<String>,
    /// How it ended.
    pub end: EndStatus,
    /// How long ago.
    #[serde(rename = "ageMs", with = "milliseconds")]
    pub age: Duration,
}

/// A duration as whole milliseconds.
mod milliseconds {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(age: &Duration, to: S) -> Result<S::Ok, S::Error> {
        to.serialize_u64(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(from: D) -> Result<Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(from).map(Duration::from_millis)
    }
}

/// Every process envd started and has not yet reaped.
#[derive(Debug, Default)]
pub struct ProcessTable {
    inner: Mutex<Inner>,
    children: Arc<Children>,
    gate: Arc<Gate>,
}

impl ProcessTable {
    /// envd's children and adopted orphans.
    pub fn children(&self) -> &Arc<Children> {
        &self.children
    }

    /// Pauses and resumes every process task and start.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The retained end events still within the retention time.
    pub fn ended(&self) -> Vec<Ended> {
        let now = Instant::now();
        let inner = self.inner();
        inner
            .retained
            .iter()
            .map(|r| Ended { pid: r.pid, tag: r.tag.clone(), end: r.end.status(), age: now.duration_since(r.at) })
            .filter(|e| e.age <= RETENTION)
            .collect()
    }

    /// Keeps end events of another image of envd, oldest first, as if they
    /// had ended here.
    pub fn restore_ended(&self, ended: Vec<Ended>) {
        let now = Instant::now();
        let mut inner = self.inner();
        for e in ended.into_iter().filter(|e| e.age <= RETENTION) {
            let at = now.checked_sub(e.age).unwrap_or(now);
            inner.retained.push_back(Retained { pid: e.pid, tag: e.tag, end: KeptEnd::keep(e.end), at, unread: None });
        }
    }

    /// Waits, at most `within`, until every subscriber has taken the output
    /// sent to it (with the pumps paused, nothing new arrives meanwhile).
    pub async fn wait_delivered(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.list().iter().any(|h| h.has_undelivered()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a started process; a retained entry with its pid or tag
    /// is forgotten.
    pub(super) fn insert(&self, handle: Arc<ProcessHandle>) {
        let mut inner = self.inner();
        let tag = handle.tag().map(str::to_owned);
        inner.retained.retain(|r| r.pid != handle.pid() && (tag.is_none() || r.tag != tag));
        inner.live.insert(handle.pid(), handle);
    }

    /// Moves an ended process from the live set to the retained ones.
    pub(super) fn retire(&self, handle: &Arc<ProcessHandle>, end: EndStatus) {
        let (pid, tag) = (handle.pid(), handle.tag().map(str::to_owned));
        let unread = handle.has_unread_output().then(|| handle.clone());
        let mut inner = self.inner();
        inner.live.remove(&pid);
        let now = Instant::now();
        while inner.retained.front().is_some_and(|r| now.duration_since(r.at) > RETENTION)
            || inner.retained.len() >= MAX_RETAINED
        {
            inner.retained.pop_front();
        }
        inner.retained.push_back(Retained { pid, tag, end: KeptEnd::keep(end), at: now, unread });
    }

    /// A live process.
    pub fn get(&self, selector: &Selector) -> Result<Arc<ProcessHandle>, ProcessError> {
        let inner = self.inner();
        let found = match selector {
            Selector::Pid(pid) => inner.live.get(pid).cloned(),
            Selector::Tag(tag) => inner.live.values().find(|h| h.tag() == Some(tag.as_str())).cloned(),
        };
        found.ok_or_else(|| ProcessError::NotFound(selector.clone()))
    }

    /// A live process, or one that ended within the retention time.
    pub fn find(&self, selector: &Selector) -> Result<Found, ProcessError> {
        if let Ok(handle) = self.get(selector) {
            return Ok(Found::Live(handle));
        }
        let inner = self.inner();
        let now = Instant::now();
        inner
            .retained
            .iter()
            .rev()
            .filter(|r| now.duration_since(r.at) <= RETENTION)
            .find(|r| match selector {
                Selector::Pid(pid) => r.pid == *pid,
                Selector::Tag(tag) => r.tag.as_deref() == Some(tag.as_str()),
            })
            .map(|r| match &r.unread {
                Some(handle) => Found::Live(handle.clone()),
                None => Found::Ended { pid: r.pid, end: r.end.status() },
            })
            .ok_or_else(|| ProcessError::NotFound(selector.clone()))
    }

    /// Every live process, in no particular order.
    pub fn list(&self) -> Vec<Arc<ProcessHandle>> {
        self.inner().live.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn a_kept_end_reads_back_as_it_was() {
        let ends = [
            EndStatus::from_exit(ExitStatus::from_raw(0)),
            EndStatus::from_exit(ExitStatus::from_raw(3 << 8)),
            EndStatus::from_exit(ExitStatus::from_raw(libc::SIGKILL)),
            EndStatus::from_wait_error(&std::io::Error::from_raw_os_error(libc::ECHILD)),
        ];
        for end in ends {
            let kept = KeptEnd::keep(end.clone());
            assert_eq!(matches!(kept, KeptEnd::Exited(_)), end.exited, "{end:?} is kept as its code alone");
            assert_eq!(kept.status(), end);
        }
    }
}
