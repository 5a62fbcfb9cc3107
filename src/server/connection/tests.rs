//! The watchdog's deadlines and the silent connections' cap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::activity::{Activity, Bounds, SilentConnections, Verdict};

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
    assert!(matches!(activity.verdict(&Bounds { response_idle: Duration::from_secs(1), ..BOUNDS }), Verdict::Keep(_)));
    drop(clock);
    assert_eq!(activity.oldest_untaken_response(), None);
}

#[test]
fn entries_of_connections_that_spoke_are_dropped_once_none_is_silent() {
    let registry = SilentConnections::new(&BOUNDS);
    let all: Vec<_> = (0..100).map(|_| Activity::new(registry.clone())).collect();
    for activity in &all {
        registry.admit(activity);
    }
    for activity in &all[..99] {
        activity.request_started(http::Version::HTTP_11);
    }
    assert_eq!(registry.queue.lock().unwrap().len(), 100, "one is still silent: the queue is left as it is");
    all[99].request_started(http::Version::HTTP_11);
    assert_eq!(registry.queue.lock().unwrap().capacity(), 0, "nothing of the burst is kept");
}
