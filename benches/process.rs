//! Process benchmark: envd against doing the same thing directly, on
//! loopback with one persistent connection. Prints a table; asserts
//! nothing about time.
//!
//! Run: `cargo bench --bench process` (as root). Uses the envd cargo
//! built for the bench (optimised, in the active target directory).
//! `ENVD_BENCH_ARGS` adds flags to envd's.

#[path = "../tests/common/mod.rs"]
mod common;

use std::ffi::CString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pb::{self, process_event::Event, process_event::data_event::Output};
use common::{Envd, rpc};
use prost::Message;

const ROUND_TRIPS: usize = 1000;
const WARMUP: usize = 50;
const READY_SAMPLES: usize = 20;
const GIB: u64 = 1 << 30;

fn main() {
    common::require_root();
    let (binary, which) = common::binary_and_profile();
    println!("envd binary: {} ({which})", binary.display());

    let ready = ready_times(&binary);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let envd = Envd::options().binary(&binary).args(extra_args()).start();
    let client = envd.client();
    runtime.block_on(async { assert_eq!(client.get("/health").await.status, 204) });
    std::thread::sleep(Duration::from_millis(200));
    let idle_rss = envd.status_kib("VmRSS");
    let idle_hwm = envd.status_kib("VmHWM");

    let mut envd_rtt = runtime.block_on(round_trips(&client, ROUND_TRIPS));
    let mut raw_rtt = raw_spawns(ROUND_TRIPS);
    let after_rss = envd.status_kib("VmRSS");
    let after_hwm = envd.status_kib("VmHWM");

    let envd_throughput = runtime.block_on(envd_stream(&client, GIB));
    let raw_throughput = raw_pipe(GIB);

    envd_rtt.sort();
    raw_rtt.sort();
    let (e50, e99) = (percentile(&envd_rtt, 50.0), percentile(&envd_rtt, 99.0));
    let (r50, r99) = (percentile(&raw_rtt, 50.0), percentile(&raw_rtt, 99.0));

    println!();
    println!("| measurement | envd | direct | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| Start→end of `true`, p50 ({ROUND_TRIPS} runs) | {} | {} (posix_spawn+waitpid) | {:.2}× | ≤ 2× |",
        fmt_duration(e50),
        fmt_duration(r50),
        e50.as_secs_f64() / r50.as_secs_f64()
    );
    println!(
        "| Start→end of `true`, p99 | {} | {} | {:.2}× | |",
        fmt_duration(e99),
        fmt_duration(r99),
        e99.as_secs_f64() / r99.as_secs_f64()
    );
    println!(
        "| stdout of `head -c 1G /dev/zero` | {:.0} MiB/s (binary proto) | {:.0} MiB/s (pipe read) | {:.0}% | ≥ 50% |",
        envd_throughput,
        raw_throughput,
        100.0 * envd_throughput / raw_throughput
    );
    println!("| RSS idle (VmRSS / VmHWM) | {} / {} | | | ≤ 4 MiB |", fmt_kib(idle_rss), fmt_kib(idle_hwm));
    println!(
        "| RSS after {ROUND_TRIPS} runs (VmRSS / VmHWM) | {} / {} | | | |",
        fmt_kib(after_rss),
        fmt_kib(after_hwm)
    );
    println!(
        "| exec → /health 204, median of {READY_SAMPLES} (min–max) | {} ({}–{}) | | | ≤ 20 ms |",
        fmt_duration(ready[ready.len() / 2]),
        fmt_duration(ready[0]),
        fmt_duration(ready[ready.len() - 1])
    );
}

fn percentile(sorted: &[Duration], pct: f64) -> Duration {
    let index = ((pct / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[index]
}

fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Flags added to envd's (`ENVD_BENCH_ARGS`, split on whitespace), e.g.
/// to measure with port forwarding and log shipping on.
fn extra_args() -> Vec<String> {
    std::env::var("ENVD_BENCH_ARGS").map(|a| a.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
}

/// Time from spawning envd to its first 204 on `/health`, sorted.
fn ready_times(binary: &PathBuf) -> Vec<Duration> {
    let mut times: Vec<Duration> =
        (0..READY_SAMPLES).map(|_| Envd::options().binary(binary).args(extra_args()).start().ready_after()).collect();
    times.sort();
    times
}

/// Start→end of `/bin/true` over one persistent HTTP/1.1 connection.
async fn round_trips(client: &common::Client, runs: usize) -> Vec<Duration> {
    let request = pb::start_request("/bin/true", &[]).encode_to_vec();
    let mut times = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let began = Instant::now();
        let mut stream = client.stream_proto(rpc::START, &request, &[]).await;
        let mut ended = false;
        while let Some(frame) = stream.next_frame().await {
            if frame.is_end() {
                assert!(frame.end_error().is_none(), "Start failed: {:?}", frame.json());
            } else if let Some(Event::End(end)) = decode(&frame.payload) {
                assert_eq!(end.status, "exit status 0");
                ended = true;
            }
        }
        assert!(ended, "no end event");
        if i >= WARMUP {
            times.push(began.elapsed());
        }
    }
    times
}

fn decode(payload: &[u8]) -> Option<Event> {
    pb::StartResponse::decode(payload).expect("a StartResponse").event.and_then(|e| e.event)
}

/// posix_spawn + waitpid of `/bin/true`, as directly as it gets.
fn raw_spawns(runs: usize) -> Vec<Duration> {
    let path = CString::new("/bin/true").unwrap();
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let mut times = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let began = Instant::now();
        let mut pid: libc::pid_t = 0;
        // SAFETY: valid NUL-terminated path, argv and envp arrays that
        // outlive the call; default attributes and file actions.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr() as *const *mut libc::c_char,
                envp.as_ptr() as *const *mut libc::c_char,
            )
        };
        assert_eq!(rc, 0, "posix_spawn");
        let mut status = 0;
        // SAFETY: waits for the child just spawned.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if i >= WARMUP {
            times.push(began.elapsed());
        }
    }
    times
}

/// MiB/s of stdout through envd (binary protobuf stream).
async fn envd_stream(client: &common::Client, bytes: u64) -> f64 {
    let request = pb::start_request("/usr/bin/head", &["-c", &bytes.to_string(), "/dev/zero"]).encode_to_vec();
    let began = Instant::now();
    let mut stream = client.stream_proto(rpc::START, &request, &[]).await;
    let mut received = 0u64;
    while let Some(frame) = stream.next_frame().await {
        if frame.is_end() {
            assert!(frame.end_error().is_none(), "Start failed: {:?}", frame.json());
            continue;
        }
        if let Some(Event::Data(pb::process_event::DataEvent { output: Some(Output::Stdout(data)) })) =
            decode(&frame.payload)
        {
            received += data.len() as u64;
        }
    }
    let elapsed = began.elapsed();
    assert_eq!(received, bytes, "bytes received through envd");
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// MiB/s of the same command's stdout read straight from a pipe.
fn raw_pipe(bytes: u64) -> f64 {
    let began = Instant::now();
    let mut child = Command::new("/usr/bin/head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("head");
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 32 * 1024];
    let mut received = 0u64;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    child.wait().unwrap();
    let elapsed = began.elapsed();
    assert_eq!(received, bytes);
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}
