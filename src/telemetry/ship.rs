//! Ships envd's own log lines to the host's log collector: the URL in the
//! metadata service's `address` field, as the reference's exporter does.
//!
//! Order of effects:
//! 1. on the thread that logs, an event becomes a JSON line
//!    ([`super::json`]) and joins a bounded buffer under a lock held only
//!    for the push: nothing there waits on the network. A line over
//!    [`MAX_LINE_BYTES`] is dropped; when the buffer would pass
//!    [`MAX_BUFFER_BYTES`] the oldest lines go (the newest say most about
//!    the present). Both are counted;
//! 2. the shipper task wakes, takes the whole buffer and, once the metadata
//!    service has named the collector, POSTs each line with the sandbox
//!    and template ids added. The host's endpoint reads one JSON object per
//!    request, so a batch is a run of requests on one kept-alive
//!    connection rather than one body;
//! 3. a connection that fails or a request that times out drops the rest
//!    of the batch (counted) and the shipper pauses, doubling up to
//!    [`MAX_BACKOFF`]; an answer other than 2xx drops that line (counted).
//!    Failures are told on stderr at most once a minute;
//! 4. losses not yet told are shipped first in a line of their own as soon
//!    as the collector takes lines again (probed after each pause even
//!    when nothing new was logged), and told on stderr.
//!
//! A batch being shipped stays in the shared state, each line until the
//! collector answered for it, so a live upgrade hands every line not yet
//! shipped to the next image ([`LogShipper::export`],
//! [`LogShipper::resume`]); at worst the line being sent at the
//! moment of the exec arrives twice.
//!
//! The shipper's own log lines are never shipped: a collector that is down
//! would otherwise cause lines about itself without end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing_subscriber::layer::Context;

use super::throttle::Throttle;

mod http1;

use http1::{Client, Endpoint};

/// Longer lines are dropped (Loki's default line limit is 256 KiB).
pub const MAX_LINE_BYTES: usize = 192 * 1024;
/// Bytes of lines waiting to be shipped at most.
pub const MAX_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// First pause after a failure, and the longest one.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Failures are told on stderr at most this often.
const TELL_FAILURES_EVERY: Duration = Duration::from_secs(60);
/// This module's events are never shipped.
const OWN_TARGET: &str = module_path!();

/// Where lines go and what they are tagged with (from the metadata service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipTarget {
    /// The collector's URL (`http://host[:port]/path`).
    pub url: String,
    /// `instanceID`: the sandbox id.
    pub instance_id: String,
    /// `envID`: the template id.
    pub env_id: String,
}

/// The handle shared by the logging layer, the shipper task and the
/// identity code that learns the target.
#[derive(Debug, Clone)]
pub struct LogShipper {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    buffer: Mutex<Buffer>,
    /// The batch being shipped, each line until it is answered for.
    in_flight: Mutex<VecDeque<Vec<u8>>>,
    wake: Notify,
    target: Mutex<Option<Arc<ShipTarget>>>,
    lost: Lost,
}

#[derive(Debug, Default)]
struct Buffer {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// Lines not shipped, by reason (monotonic counters).
#[derive(Debug, Default)]
struct Lost {
    overflow: AtomicU64,
    oversized: AtomicU64,
    unreachable: AtomicU64,
    rejected: AtomicU64,
}

impl Lost {
    fn snapshot(&self) -> [u64; 4] {
        [&self.overflow, &self.oversized, &self.unreachable, &self.rejected].map(|c| c.load(Ordering::Relaxed))
    }
}

/// The `tracing` layer that feeds the shipper.
#[derive(Debug)]
pub struct ShipLayer {
    shared: Arc<Shared>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ShipLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target().starts_with(OWN_TARGET) {
            return;
        }
        self.shared.push(super::json::event_line(event, SystemTime::now()));
    }
}

impl Shared {
    fn push(&self, line: Vec<u8>) {
        if line.len() > MAX_LINE_BYTES {
            self.lost.oversized.fetch_add(1, Ordering::Relaxed);
            return;
        }
        {
            let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            while buffer.bytes + line.len() > MAX_BUFFER_BYTES {
                let Some(oldest) = buffer.lines.pop_front() else { break };
                buffer.bytes -= oldest.len();
                self.lost.overflow.fetch_add(1, Ordering::Relaxed);
            }
            buffer.bytes += line.len();
            buffer.lines.push_back(line);
        }
        self.wake.notify_one();
    }

    fn take(&self) -> VecDeque<Vec<u8>> {
        let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        buffer.bytes = 0;
        std::mem::take(&mut buffer.lines)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn target(&self) -> Option<Arc<ShipTarget>> {
        self.target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl LogShipper {
    /// A shipper and the layer that feeds it. Nothing is sent until
    /// [`LogShipper::run`] runs and a target is set.
    pub fn new() -> (LogShipper, ShipLayer) {
        let shared = Arc::new(Shared::default());
        (LogShipper { shared: shared.clone() }, ShipLayer { shared })
    }

    /// Sets (or, after a resume, replaces) the collector and the ids.
    pub fn set_target(&self, target: ShipTarget) {
        let mut current = self.shared.target.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.as_deref() != Some(&target) {
            *current = Some(Arc::new(target));
            drop(current);
            self.shared.wake.notify_one();
        }
    }

    /// Every line not yet shipped, oldest first: the shipper's part of
    /// the upgrade handover.
    pub fn export(&self) -> Vec<String> {
        let in_flight = self.shared.in_flight().clone();
        let buffer = self.shared.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let lines = in_flight.into_iter().chain(buffer.lines.iter().cloned());
        lines.map(|line| String::from_utf8_lossy(&line).into_owned()).collect()
    }

    /// Ships `lines` (from an earlier image of envd) before everything
    /// logged here, within the same bounds.
    pub fn resume(&self, lines: Vec<String>) {
        let newer = self.shared.take();
        for line in lines.into_iter().map(String::into_bytes).chain(newer) {
            self.shared.push(line);
        }
    }

    /// Ships lines until the daemon exits (steps 2 to 4 of the module doc).
    pub async fn run(self) {
        let mut sender =
            Sender { client: Client::default(), told: [0; 4], failures: Throttle::new(TELL_FAILURES_EVERY) };
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.shared.wake.notified().await;
            let Some(target) = self.shared.target() else { continue };
            let lines = self.shared.take();
            let lost = self.shared.lost.snapshot();
            let report = (lost != sender.told).then(|| lost_line(&lost, &sender.told));
            if report.is_none() && lines.is_empty() {
                continue;
            }
            let reporting = report.is_some();
            self.shared.in_flight().extend(lines);
            let failure = match sender.ship(&target, report, &self.shared).await {
                Ok(reported) => {
                    if reporting && reported {
                        tracing::warn!(lost = ?difference(&lost, &sender.told), "log lines were not shipped");
                        sender.told = lost;
                    }
                    backoff = FIRST_BACKOFF;
                    continue;
                }
                Err(failure) => failure,
            };
            if sender.failures.admit().is_some() {
                tracing::warn!("shipping logs to the collector: {failure}");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // Probe again even if nothing new was logged, to tell the losses.
            self.shared.wake.notify_one();
        }
    }
}

/// [overflow, oversized, unreachable, rejected] since the last report.
fn difference(now: &[u64; 4], told: &[u64; 4]) -> [u64; 4] {
    [0, 1, 2, 3].map(|i| now[i].saturating_sub(told[i]))
}

/// The line that reports losses, in the same shape as the others.
fn lost_line(now: &[u64; 4], told: &[u64; 4]) -> Vec<u8> {
    let [overflow, oversized, unreachable, rejected] = difference(now, told);
    let line = json!({
        "timestamp": super::json::rfc3339_nanos(SystemTime::now()),
        "level": "warn",
        "logger": OWN_TARGET,
        "message": "log lines were not shipped",
        "not_shipped": overflow + oversized + unreachable + rejected,
        "buffer_full": overflow,
        "oversized": oversized,
        "collector_unreachable": unreachable,
        "collector_rejected": rejected,
    });
    serde_json::to_vec(&line).unwrap_or_default()
}

/// The shipper task's connection and what it has told so far.
struct Sender {
    client: Client,
    /// Loss counters as of the last report.
    told: [u64; 4],
    failures: Throttle,
}

/// Why a batch stopped.
#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error("the collector URL {0:?} is not a plain http:// URL")]
    BadUrl(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("sending: {0}")]
    Send(String),
    #[error("the collector did not answer within {0:?}")]
    Timeout(Duration),
}

impl Sender {
    /// Sends the loss report, then `lines` in order; on a broken
    /// connection the rest of the lines are counted as unreachable. Ok
    /// tells whether the collector accepted the report.
    /// Sends the loss report, then the lines in flight in order, each
    /// leaving the batch once answered for; on a broken connection the
    /// rest of the batch is counted as unreachable. Ok tells whether the
    /// collector accepted the report.
    async fn ship(&mut self, target: &ShipTarget, report: Option<Vec<u8>>, shared: &Shared) -> Result<bool, ShipError> {
        let lost = &shared.lost;
        let give_up = |err: ShipError| {
            let unsent = std::mem::take(&mut *shared.in_flight()).len() as u64;
            lost.unreachable.fetch_add(unsent, Ordering::Relaxed);
            Err(err)
        };
        let Some(endpoint) = Endpoint::parse(&target.url) else {
            return give_up(ShipError::BadUrl(target.url.clone()));
        };
        let ids = ids_suffix(target);
        let mut reported = false;
        if let Some(report) = report {
            match self.client.post(&endpoint, with_ids(report, &ids)).await {
                Ok(status) => reported = status.is_success(),
                Err(err) => {
                    self.client.close();
                    return give_up(err);
                }
            }
        }
        loop {
            let Some(line) = shared.in_flight().front().cloned() else { return Ok(reported) };
            match self.client.post(&endpoint, with_ids(line, &ids)).await {
                Ok(status) => {
                    if !status.is_success() {
                        lost.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.in_flight().pop_front();
                }
                Err(err) => {
                    self.client.close();
                    return give_up(err);
                }
            }
        }
    }
}

/// `,"instanceID":"…","envID":"…"}`: what replaces a line's closing brace.
fn ids_suffix(target: &ShipTarget) -> Vec<u8> {
    let quoted = |text: &str| Value::String(text.to_owned()).to_string();
    format!(",\"instanceID\":{},\"envID\":{}}}", quoted(&target.instance_id), quoted(&target.env_id)).into_bytes()
}

fn with_ids(mut line: Vec<u8>, suffix: &[u8]) -> Vec<u8> {
    if line.last() == Some(&b'}') {
        line.pop();
        line.extend_from_slice(suffix);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_get_the_ids_and_stay_json() {
        let target = ShipTarget { url: String::new(), instance_id: "sbx\"1".into(), env_id: "tpl".into() };
        let line = with_ids(br#"{"message":"hi"}"#.to_vec(), &ids_suffix(&target));
        let parsed: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed, json!({"message": "hi", "instanceID": "sbx\"1", "envID": "tpl"}));
    }

    #[test]
    fn the_buffer_is_bounded_and_drops_the_oldest_and_the_oversized() {
        let (shipper, _layer) = LogShipper::new();
        let line = vec![b'x'; 1024];
        for _ in 0..(MAX_BUFFER_BYTES / 1024 + 10) {
            shipper.shared.push(line.clone());
        }
        shipper.shared.push(vec![b'y'; MAX_LINE_BYTES + 1]);
        assert_eq!(shipper.shared.lost.snapshot(), [10, 1, 0, 0]);
        assert_eq!(shipper.shared.take().len(), MAX_BUFFER_BYTES / 1024);
    }

    #[test]
    fn lines_not_yet_shipped_survive_export_serialise_and_resume() {
        let (shipper, _layer) = LogShipper::new();
        for line in [r#"{"message":"one"}"#, r#"{"message":"two"}"#] {
            shipper.shared.push(line.as_bytes().to_vec());
        }
        let part = shipper.export();
        assert_eq!(part.len(), 2);
        let read_back: Vec<String> = serde_json::from_str(&serde_json::to_string(&part).unwrap()).unwrap();
        let (next, _layer) = LogShipper::new();
        next.shared.push(br#"{"message":"logged by the new image"}"#.to_vec());
        next.resume(read_back);
        let mut expected = part.clone();
        expected.push(r#"{"message":"logged by the new image"}"#.to_owned());
        assert_eq!(next.export(), expected, "the earlier image's lines first, none lost");
    }
}
