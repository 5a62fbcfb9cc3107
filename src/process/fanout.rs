//! Output fan-out: each chunk goes to every attached stream through a
//! small bounded channel, so a slow subscriber slows the reader
//! (back-pressure into the pipe); with no subscriber the output is read
//! and dropped, except for an adopted process, whose output waits
//! (bounded) for the first subscriber: nobody could be attached yet when
//! it was adopted.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::gate::Gate;
use super::status::EndStatus;

/// Events buffered per subscriber before the reader waits.
const SUBSCRIBER_BUFFER: usize = 64;
/// Output of one adopted process kept for its first subscriber, at most.
pub(super) const BACKLOG_BYTES: usize = 1 << 20;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The stdout pipe.
    Stdout,
    /// The stderr pipe.
    Stderr,
    /// The terminal.
    Pty,
}

/// What a subscriber receives after the start event.
#[derive(Debug, Clone)]
pub enum Event {
    /// Exactly the bytes of one read.
    Data(Output, Bytes),
    /// The process ended; nothing follows.
    End(EndStatus),
}

/// The result of attaching to a process.
#[derive(Debug)]
pub enum Subscription {
    /// Live events from now on.
    Live(mpsc::Receiver<Event>),
    /// The process had already ended.
    Ended(EndStatus),
}

/// The subscribers of one process's output.
#[derive(Debug, Default)]
pub(super) struct Fanout {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    subscribers: Vec<mpsc::Sender<Event>>,
    end: Option<EndStatus>,
    /// Output kept until the first subscriber (adopted processes only).
    backlog: Option<Backlog>,
}

#[derive(Debug, Default)]
struct Backlog {
    chunks: VecDeque<(Output, Bytes)>,
    bytes: usize,
    limit: usize,
    dropped: usize,
}

impl Fanout {
    /// `backlog`: keep this many bytes of output for the first subscriber.
    pub(super) fn new(backlog: Option<usize>) -> Self {
        let backlog = backlog.map(|limit| Backlog { limit, ..Default::default() });
        Self { state: Mutex::new(State { backlog, ..Default::default() }) }
    }

    /// Output sent to a subscriber that has not taken it yet.
    pub(super) fn has_undelivered(&self) -> bool {
        self.state().subscribers.iter().any(|s| !s.is_closed() && s.capacity() < s.max_capacity())
    }

    /// Output kept for a first subscriber that has not come yet.
    pub(super) fn has_unread_output(&self) -> bool {
        self.state().backlog.as_ref().is_some_and(|b| !b.chunks.is_empty())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a new subscriber, which gets every event from now on (the
    /// first subscriber of an adopted process also what it wrote before,
    /// even if it has ended since).
    pub(super) fn subscribe(&self, pid: u32) -> Subscription {
        let mut fanout = self.state();
        let backlog = fanout.backlog.take().unwrap_or_default();
        let end = fanout.end.clone();
        if let Some(end) = &end
            && backlog.chunks.is_empty()
        {
            return Subscription::Ended(end.clone());
        }
        if backlog.dropped > 0 {
            tracing::warn!(pid, dropped = backlog.dropped, "output kept for the first subscriber overflowed");
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER + backlog.chunks.len() + 1);
        for (output, data) in backlog.chunks {
            let _ = tx.try_send(Event::Data(output, data));
        }
        match end {
            Some(end) => drop(tx.try_send(Event::End(end))),
            None => fanout.subscribers.push(tx),
        }
        Subscription::Live(rx)
    }

    /// Sends a chunk of output to every subscriber, waiting for room.
    pub(super) async fn broadcast(&self, gate: &Gate, output: Output, data: Bytes) {
        let subscribers = {
            let mut fanout = self.state();
            if let Some(backlog) = fanout.backlog.as_mut() {
                backlog.bytes += data.len();
                backlog.chunks.push_back((output, data));
                while backlog.bytes > backlog.limit
                    && let Some((_, oldest)) = backlog.chunks.pop_front()
                {
                    backlog.bytes -= oldest.len();
                    backlog.dropped += oldest.len();
                }
                return;
            }
            fanout.subscribers.clone()
        };
        let mut lost = false;
        let mut stalled = Vec::new();
        if let Some((last, others)) = subscribers.split_last() {
            for subscriber in others {
                match send_unless_paused(gate, subscriber, Event::Data(output, data.clone())).await {
                    Some(sent) => lost |= !sent,
                    None => stalled.push(subscriber.clone()),
                }
            }
            // The last one gets the original, so a lone subscriber owns it.
            match send_unless_paused(gate, last, Event::Data(output, data)).await {
                Some(sent) => lost |= !sent,
                None => stalled.push(last.clone()),
            }
        }
        if lost || !stalled.is_empty() {
            self.state().subscribers.retain(|s| !s.is_closed() && !stalled.iter().any(|x| x.same_channel(s)));
        }
    }

    /// Records the end and tells every subscriber; a subscriber that is
    /// not reading does not hold up the others.
    pub(super) fn finish(&self, end: &EndStatus) {
        let subscribers = {
            let mut fanout = self.state();
            fanout.end = Some(end.clone());
            std::mem::take(&mut fanout.subscribers)
        };
        for subscriber in subscribers {
            let end = end.clone();
            tokio::spawn(async move {
                let _ = subscriber.send(Event::End(end)).await;
            });
        }
    }
}

/// Sends, waiting for room; `Some(false)` if the subscriber is gone,
/// `None` if a pause was asked for while it had no room: a subscriber
/// that stopped reading must not hold up an upgrade, so it is cut off
/// (its stream ends, as it would at the exec).
async fn send_unless_paused(gate: &Gate, subscriber: &mpsc::Sender<Event>, event: Event) -> Option<bool> {
    tokio::select! {
        // A subscriber with room always gets the event.
        biased;
        sent = subscriber.send(event) => Some(sent.is_ok()),
        () = gate.pause_requested() => None,
    }
}
