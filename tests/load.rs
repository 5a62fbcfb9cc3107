//! envd under load, the real binary: many concurrent output streams, a
//! burst of filesystem calls, many directory watchers on busy directories.
//! Each test checks every answer, then that envd's resident memory and
//! open descriptors come back to their baseline, and prints a before /
//! peak / after table (run with `--nocapture` to see it).
//!
//! The load is set by env vars (defaults in brackets): `ENVD_LOAD_STREAMS`
//! [200] commands each streaming `ENVD_LOAD_STREAM_MIB` [10] MiB,
//! `ENVD_LOAD_CALLS` [1000] Stat/ListDir calls, `ENVD_LOAD_WATCHERS`
//! [100] WatchDir streams.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::footprint::{Footprint, Row, Sampler, Slack, knob, print_table, settle};
use common::fs_rpc::{LIST_DIR, STAT, WATCH_DIR as WATCH};
use common::pb::process_event::Event as PbEvent;
use common::pb::process_event::data_event::Output as PbOutput;
use common::*;
use prost::Message;
use serde_json::json;
use tokio::task::JoinSet;

/// How far above the baseline envd may settle once a load is gone: freed
/// heap that the allocator keeps, and no descriptor at all.
const SLACK: Slack = Slack { rss_kib: 32 * 1024, fds: 0 };
/// How long envd gets to release what a load held.
const SETTLE: Duration = Duration::from_secs(15);

/// `seq` printing `%08d\n` lines: every line is 9 bytes and numbered.
const LINE: usize = 9;

/// Lines `00000000\n` … for `lines` lines: what every stream must carry.
fn numbered_lines(lines: usize) -> Vec<u8> {
    let mut text = Vec::with_capacity(lines * LINE);
    for n in 0..lines {
        text.extend_from_slice(format!("{n:08}\n").as_bytes());
    }
    text
}

/// One binary `Start` stream of `seq`, checked byte for byte against
/// `expected` as it arrives; returns the exit code.
async fn stream_numbered(client: Client, expected: Arc<Vec<u8>>, index: usize) -> i32 {
    let last = (expected.len() / LINE - 1).to_string();
    let request = pb::start_request("/usr/bin/seq", &["-f", "%08.0f", "0", &last]);
    let mut stream = client.stream_proto(rpc::START, &request.encode_to_vec(), &[]).await;
    assert_eq!(stream.status, 200, "stream {index}");
    let mut offset = 0;
    let mut exit = None;
    loop {
        let frame = stream.next_frame().await.unwrap_or_else(|| panic!("stream {index} ended without end frame"));
        if frame.is_end() {
            assert_eq!(frame.end_error(), None, "stream {index}");
            break;
        }
        let message = pb::StartResponse::decode(frame.payload).expect("a StartResponse");
        match message.event.and_then(|e| e.event).expect("an event") {
            PbEvent::Start(start) => stream.record_session(start.pid),
            PbEvent::Data(data) => match data.output.expect("output") {
                PbOutput::Stdout(bytes) => {
                    let end = offset + bytes.len();
                    if end > expected.len() || bytes[..] != expected[offset..end] {
                        let line = offset / LINE;
                        panic!("stream {index}: bytes from {offset} (line {line}) are not the numbered lines");
                    }
                    offset = end;
                }
                other => panic!("stream {index}: unexpected output {other:?}"),
            },
            PbEvent::End(end) => {
                assert!(end.exited, "stream {index}: {end:?}");
                exit = Some(end.exit_code);
            }
            PbEvent::Keepalive(_) => {}
        }
    }
    assert_eq!(offset, expected.len(), "stream {index}: every byte arrives");
    exit.unwrap_or_else(|| panic!("stream {index}: no end event"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_output_streams_deliver_every_byte_in_order() {
    let streams = knob("ENVD_LOAD_STREAMS", 200);
    let mib = knob("ENVD_LOAD_STREAM_MIB", 10);
    let envd = Envd::start();
    let client = envd.client();
    let expected = Arc::new(numbered_lines((mib << 20) / LINE));
    let before = Footprint::of(envd.pid());
    let sampler = Sampler::start(envd.pid());
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..streams {
        tasks.spawn(stream_numbered(client.clone(), expected.clone(), index));
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.expect("stream task"), 0, "every command exits 0");
    }
    let elapsed = started.elapsed();
    let peak = sampler.finish();
    drop(client);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    let total = (streams * expected.len()) as f64;
    let note = format!(
        "{streams} streams x {:.1} MiB in {:.1} s = {:.0} MiB/s",
        expected.len() as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        total / 1048576.0 / elapsed.as_secs_f64()
    );
    print_table(
        "envd under concurrent output streams",
        &[Row { phase: "Start streams".into(), before, peak, after, note }],
    );
    assert!(after.within(before, SLACK), "envd did not return to its baseline: {before:?} -> {after:?}");
}

/// A directory of `files` files, `f<i>` holding `i` bytes.
fn populated(name: &str, files: usize) -> Scratch {
    let dir = Scratch::new(name);
    for i in 0..files {
        std::fs::write(dir.path(&format!("f{i}")), vec![b'x'; i]).unwrap();
    }
    dir
}

async fn stat_or_list(client: Client, dir: Arc<Scratch>, files: usize, index: usize) {
    if index.is_multiple_of(2) {
        let i = index / 2 % files;
        let reply = client.call(STAT, &json!({"path": dir.s(&format!("f{i}"))})).await;
        let entry = &reply["entry"];
        assert_eq!(entry["name"], format!("f{i}"), "call {index}: {reply}");
        assert_eq!(entry.get("size").map_or(0, |s| s.as_str().map_or(0, |s| s.parse::<usize>().unwrap())), i);
    } else {
        let reply = client.call(LIST_DIR, &json!({"path": dir.s("")})).await;
        let names: BTreeSet<&str> =
            reply["entries"].as_array().expect("entries").iter().map(|e| e["name"].as_str().unwrap()).collect();
        let wanted: BTreeSet<String> = (0..files).map(|i| format!("f{i}")).collect();
        assert_eq!(names, wanted.iter().map(String::as_str).collect(), "call {index}");
    }
}

/// A thousand connections at once leave envd's allocator holding up to
/// their high-water mark: over ten bursts (`ENVD_LOAD_ROUNDS=10`) it
/// plateaus near +36 MiB rather than growing per call. The bound for
/// that test is the high-water mark's order, not a leak's.
const BURST_SLACK: Slack = Slack { rss_kib: 64 * 1024, fds: 0 };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_stat_and_list_dir_calls_is_answered_correctly() {
    let calls = knob("ENVD_LOAD_CALLS", 1000);
    let files = 50;
    let envd = Envd::start();
    let dir = Arc::new(populated("load-stat", files));
    let baseline = Footprint::of(envd.pid());
    let mut rows = Vec::new();
    // Identical bursts: what one leaves behind per call would add up.
    for round in 1..=knob("ENVD_LOAD_ROUNDS", 3) {
        let before = Footprint::of(envd.pid());
        let sampler = Sampler::start(envd.pid());
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        // One client per call: each its own connection, all at once.
        for index in 0..calls {
            tasks.spawn(stat_or_list(envd.client(), dir.clone(), files, index));
        }
        while let Some(result) = tasks.join_next().await {
            result.expect("call task");
        }
        let elapsed = started.elapsed();
        let peak = sampler.finish();
        let after = settle(envd.pid(), baseline, BURST_SLACK, SETTLE).await;
        let note = format!(
            "{calls} calls ({} Stat, {} ListDir of {files}) in {:.2} s = {:.0} calls/s",
            calls.div_ceil(2),
            calls / 2,
            elapsed.as_secs_f64(),
            calls as f64 / elapsed.as_secs_f64()
        );
        rows.push(Row { phase: format!("Stat + ListDir, burst {round}"), before, peak, after, note });
    }
    print_table("envd under bursts of filesystem calls", &rows);
    for row in &rows {
        assert!(
            row.after.within(baseline, BURST_SLACK),
            "envd did not return to its baseline: {baseline:?} -> {row:?}"
        );
    }
}

/// Creates and removes files in `dir` until `stop`; returns the operations.
fn churn(dir: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut operations = 0;
        while !stop.load(Ordering::SeqCst) {
            let path = dir.join(format!("churn{}", operations % 8));
            if path.exists() {
                std::fs::remove_file(&path).unwrap();
            } else {
                std::fs::write(&path, b"x").unwrap();
            }
            operations += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        operations
    })
}

/// What one WatchDir stream saw.
#[derive(Debug, Default)]
struct Seen {
    creates: u64,
    removes: u64,
    other: u64,
}

/// Reads a WatchDir stream until `stop`; any error ends the test.
async fn watch(mut stream: ConnectStream, stop: Arc<AtomicBool>, index: usize) -> Seen {
    let mut seen = Seen::default();
    let first = stream.next_frame().await.expect("start event");
    assert_eq!(first.json(), json!({"start": {}}), "watcher {index}");
    while !stop.load(Ordering::SeqCst) {
        let Some(frame) = stream.next_frame_within(Duration::from_millis(200)).await else { continue };
        let frame = frame.unwrap_or_else(|| panic!("watcher {index}: the stream ended"));
        assert!(!frame.is_end(), "watcher {index} failed: {:?}", frame.json());
        let message = frame.json();
        let Some(event) = message.get("filesystem") else { continue };
        match event["type"].as_str() {
            Some("EVENT_TYPE_CREATE") => seen.creates += 1,
            Some("EVENT_TYPE_REMOVE") => seen.removes += 1,
            _ => seen.other += 1,
        }
    }
    seen
}

/// The kernel's per-user inotify instance limit, raised for one test and
/// put back afterwards: envd keeps half of it for its watchers, and the
/// machine's default (128) leaves room for only 64.
struct InotifyInstances(Option<String>);

const MAX_USER_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";

impl InotifyInstances {
    fn at_least(wanted: usize) -> InotifyInstances {
        let old = std::fs::read_to_string(MAX_USER_INSTANCES).expect("reading max_user_instances");
        if old.trim().parse::<usize>().is_ok_and(|n| n >= wanted) {
            return InotifyInstances(None);
        }
        std::fs::write(MAX_USER_INSTANCES, wanted.to_string()).expect("raising max_user_instances (as root)");
        InotifyInstances(Some(old))
    }
}

impl Drop for InotifyInstances {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(MAX_USER_INSTANCES, old.trim());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_on_busy_directories_keep_up() {
    let watchers = knob("ENVD_LOAD_WATCHERS", 100);
    let directories = 20.min(watchers);
    // envd reads the limit when it starts: raise it first.
    let _instances = InotifyInstances::at_least(2 * watchers + 32);
    let envd = Envd::start();
    let client = envd.client();
    let root = Scratch::new("load-watch");
    let dirs: Vec<_> = (0..directories).map(|d| root.path(&format!("d{d}"))).collect();
    dirs.iter().for_each(|d| std::fs::create_dir(d).unwrap());
    let before = Footprint::of(envd.pid());
    let sampler = Sampler::start(envd.pid());
    let stop_reading = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for index in 0..watchers {
        let request = json!({"path": dirs[index % directories].display().to_string(), "recursive": true});
        let stream = client.stream(WATCH, &request, &[("keepalive-ping-interval", "1")]).await;
        assert_eq!(stream.status, 200);
        tasks.spawn(watch(stream, stop_reading.clone(), index));
    }
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = dirs.iter().map(|d| churn(d.clone(), stop_writing.clone())).collect();
    tokio::time::sleep(Duration::from_secs(knob("ENVD_LOAD_WATCH_SECONDS", 8) as u64)).await;
    stop_writing.store(true, Ordering::SeqCst);
    let operations: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    // Let the last events through before the readers stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_reading.store(true, Ordering::SeqCst);
    let mut events = 0;
    while let Some(result) = tasks.join_next().await {
        let seen = result.expect("watcher task");
        assert!(seen.creates > 0 && seen.removes > 0, "every watcher sees the churn: {seen:?}");
        events += seen.creates + seen.removes + seen.other;
    }
    let peak = sampler.finish();
    drop(client);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    let note = format!("{watchers} WatchDir on {directories} dirs, {operations} file ops, {events} events delivered");
    print_table("envd under many directory watchers", &[Row { phase: "WatchDir".into(), before, peak, after, note }]);
    assert!(after.within(before, SLACK), "envd did not return to its baseline: {before:?} -> {after:?}");
    assert!(!envd.stderr().contains("panicked"), "{}", envd.stderr());
}
