//! Whether a restarted template process is back: it listens again on
//! every port it listened on when it was recorded, or, when it listened on
//! none, it has run for a settle time without exiting. Its stderr (or
//! terminal output) is kept meanwhile, so that a process that did not come
//! back can be reported with its last lines.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;

use super::ports;
use crate::process::{EndStatus, Event, Output};

/// How often the listening sockets are looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long a process without ports must run to count as back.
const SETTLE_TIME: Duration = Duration::from_secs(1);
/// Bytes of output kept for the report.
const TAIL_BYTES: usize = 4096;
/// Lines of output the report shows.
const TAIL_LINES: usize = 5;

/// How the wait for one process ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Listening again, or running past the settle time.
    Back,
    /// It ended before it was back.
    Ended {
        /// Its exit status.
        end: EndStatus,
        /// Its last lines of stderr.
        stderr: String,
    },
    /// Still running at the limit but not listening on these ports.
    NotListening {
        /// The recorded ports nothing of it listens on.
        missing: Vec<u16>,
        /// Its last lines of stderr.
        stderr: String,
    },
}

/// Waits until the process `pid` is back, has ended, or `deadline` passed.
/// The subscription is dropped on return, so a process nobody follows
/// never waits for its output to be read.
pub(super) async fn wait_until_back(
    pid: u32,
    recorded_ports: &[u16],
    mut events: Receiver<Event>,
    deadline: Instant,
) -> Outcome {
    let settled_at = (Instant::now() + SETTLE_TIME).min(deadline);
    let mut tail = Tail::default();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Data(Output::Stderr | Output::Pty, data)) => tail.push(&data),
                Some(Event::Data(Output::Stdout, _)) => {}
                Some(Event::End(end)) => return Outcome::Ended { end, stderr: tail.lines() },
                None => {
                    let end = EndStatus::from_wait_error(&std::io::Error::other("output closed without an end"));
                    return Outcome::Ended { end, stderr: tail.lines() };
                }
            },
            _ = poll.tick() => {
                let missing = missing_ports(pid, recorded_ports);
                if recorded_ports.is_empty() && Instant::now() >= settled_at {
                    return Outcome::Back;
                }
                if !recorded_ports.is_empty() && missing.is_empty() {
                    return Outcome::Back;
                }
                if Instant::now() >= deadline {
                    return Outcome::NotListening { missing, stderr: tail.lines() };
                }
            }
        }
    }
}

fn missing_ports(pid: u32, recorded_ports: &[u16]) -> Vec<u16> {
    if recorded_ports.is_empty() {
        return Vec::new();
    }
    let listening = ports::listening_ports(Path::new(super::PROC_ROOT), pid);
    recorded_ports.iter().filter(|port| !listening.contains(port)).copied().collect()
}

/// The last bytes of a process's output.
#[derive(Debug, Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.0.extend(data);
        let excess = self.0.len().saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
    }

    /// The last few lines, joined with " | " for one log line.
    fn lines(&self) -> String {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let mut tail = Tail::default();
        for i in 0..2000 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(tail.lines(), "line 1995 | line 1996 | line 1997 | line 1998 | line 1999");
    }
}
