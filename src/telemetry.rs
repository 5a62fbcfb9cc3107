//! envd's own log lines, written so that logging can never block the
//! daemon.
//!
//! stderr goes to journald. While the root filesystem is frozen journald
//! cannot write and stops reading; once the stream's buffer is full, a
//! plain `write(2)` to stderr blocks, and a few blocked writers would stall
//! every request, `/fsthaw` included. So a formatted line only enters a
//! bounded queue (never waiting); one thread of its own writes the queue to
//! stderr and may block there as long as the sink likes. When the queue is
//! full the line is dropped and counted, and the count is reported in a
//! line of its own as soon as the sink takes lines again. Never a log file:
//! one on the root filesystem would block while it is frozen.
//!
//! In a VM the same lines also go to the host's log collector as JSON,
//! through a bounded buffer of their own that never blocks either
//! ([`ship`]).

pub mod json;
pub mod ship;
pub mod throttle;

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

/// Lines queued for the sink: bursts pass, and at a few hundred bytes a
/// line a stalled sink costs well under a MiB.
const QUEUE_LINES: usize = 2048;
/// How long the daemon's exit waits for queued lines to be written.
const DRAIN_ON_EXIT: Duration = Duration::from_secs(1);

/// The installed writer's counts, for [`wait_written`].
static INSTALLED: std::sync::OnceLock<Arc<Counts>> = std::sync::OnceLock::new();

/// Starts the log writer and installs it as the `tracing` subscriber;
/// with `ship`, lines are also queued for the host's collector (the
/// returned shipper, see [`ship`]). Keep the guard until exit: dropping it
/// waits briefly for the queue.
pub fn init(verbose: bool, ship: bool) -> (LogGuard, Option<ship::LogShipper>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = if verbose { tracing::Level::DEBUG } else { tracing::Level::INFO };
    let (sink, guard) = QueuedSink::start(io::stderr());
    let _ = INSTALLED.set(guard.counts.clone());
    let (shipper, ship_layer) = if ship { Some(ship::LogShipper::new()).unzip() } else { (None, None) };
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::from_level(level))
        .with(tracing_subscriber::fmt::layer().with_writer(sink).with_ansi(false))
        .with(ship_layer)
        .init();
    (guard, shipper)
}

/// The writing end: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct QueuedSink {
    queue: SyncSender<Vec<u8>>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
}

/// Waits (briefly) on drop for the queued lines to reach the sink.
#[derive(Debug)]
pub struct LogGuard {
    counts: Arc<Counts>,
}

impl QueuedSink {
    /// A sink whose lines a thread of its own writes to `out`.
    pub fn start<W: Write + Send + 'static>(out: W) -> (Self, LogGuard) {
        let (queue, lines) = sync_channel(QUEUE_LINES);
        let counts = Arc::new(Counts::default());
        let writer_counts = counts.clone();
        let spawned =
            std::thread::Builder::new().name("envd-log".into()).spawn(move || write_lines(lines, out, &writer_counts));
        if let Err(err) = spawned {
            // No writer thread: lines are dropped and counted, never blocking.
            eprintln!("envd: starting the log writer: {err}");
        }
        (Self { queue, counts: counts.clone() }, LogGuard { counts })
    }

    /// Lines dropped so far because the sink was too slow.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }
}

fn write_lines<W: Write>(lines: Receiver<Vec<u8>>, mut out: W, counts: &Counts) {
    let mut reported = 0;
    while let Ok(line) = lines.recv() {
        let dropped = counts.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            let _ = writeln!(out, "envd: {} log lines dropped: the log sink was too slow", dropped - reported);
            reported = dropped;
        }
        // A failing sink is ignored: there is nowhere else to say so.
        let _ = out.write_all(&line);
        let _ = out.flush();
        counts.written.fetch_add(1, Ordering::Relaxed);
    }
}

impl Write for QueuedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.queue.try_send(buf.to_vec()) {
            Ok(()) => self.counts.queued.fetch_add(1, Ordering::Relaxed),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedSink {
    type Writer = QueuedSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // The subscriber keeps a sender for the life of the process, so the
        // writer never sees the queue close: wait until it has caught up.
        self.counts.wait_written(DRAIN_ON_EXIT);
    }
}

impl Counts {
    fn wait_written(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        while self.written.load(Ordering::Relaxed) < self.queued.load(Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Waits, at most `within`, until every line logged so far reached stderr
/// (before envd's image is replaced, which ends the writer thread).
pub fn wait_written(within: Duration) {
    if let Some(counts) = INSTALLED.get() {
        counts.wait_written(within);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that blocks every write until released.
    struct Stalled(Arc<(Mutex<bool>, std::sync::Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, changed) = &*self.0;
            let mut open = open.lock().unwrap();
            while !*open {
                open = changed.wait(open).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_instead_of_blocking() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let (mut sink, _guard) = QueuedSink::start(Stalled(gate.clone(), written.clone()));
        let lines = QUEUE_LINES * 2;
        for i in 0..lines {
            // Returns at once although nothing is being written.
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(sink.dropped() >= (lines - QUEUE_LINES - 1) as u64, "dropped {}", sink.dropped());
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.counts.written.load(Ordering::Relaxed) < sink.counts.queued.load(Ordering::Relaxed) {
            assert!(std::time::Instant::now() < deadline, "the writer never drained the queue");
            std::thread::sleep(Duration::from_millis(5));
        }
        sink.write_all(b"after\n").unwrap();
        while !String::from_utf8_lossy(&written.lock().unwrap()).contains("after") {
            assert!(std::time::Instant::now() < deadline, "the writer never caught up");
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
        assert!(text.contains("log lines dropped: the log sink was too slow"), "{text}");
        let kept: Vec<usize> = text.lines().filter_map(|l| l.strip_prefix("line ")?.parse().ok()).collect();
        assert_eq!(kept.first(), Some(&0), "the first line is kept");
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "kept lines stay in order");
    }
}
