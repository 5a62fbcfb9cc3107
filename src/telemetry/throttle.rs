//! At most one log line per interval for conditions that requests or
//! connections can trigger over and over (a cap reached, a collector
//! down): the first occurrence is told, then the count of the rest.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one occurrence through per interval and counts the others.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// One occurrence per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, state: Mutex::new(ThrottleState::default()) }
    }

    /// `Some(occurrences suppressed since the last one told)` when this one
    /// is to be told, `None` when it is to be kept quiet.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if state.last.is_some_and(|last| now.duration_since(last) < self.every) {
            state.suppressed += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_the_first_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!((throttle.admit(), throttle.admit()), (None, None));
        let quick = Throttle::new(Duration::ZERO);
        assert_eq!((quick.admit(), quick.admit()), (Some(0), Some(0)));
    }
}
