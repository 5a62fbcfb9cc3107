//! envd facing faults, the real binary: clients that vanish mid-stream,
//! mid-upload and mid-input; output faster than anyone reads; a low
//! descriptor limit; a full disk; envd itself SIGKILLed and restarted; a
//! metadata service answering garbage, errors or slowly. Each test checks
//! that the processes, files and auth state are what they must be, that
//! envd holds no descriptor and no zombie afterwards, and prints envd's
//! footprint (run with `--nocapture` to see it).

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::footprint::{Footprint, Row, Sampler, Slack, fd_count, print_table, settle, zombie_children};
use common::mmds::{Fault, Mmds, sha512_hex};
use common::tmpfs::SmallFs;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// After a fault, envd keeps no descriptor and little memory.
const SLACK: Slack = Slack { rss_kib: 16 * 1024, fds: 0 };
/// After unread floods: each stalled stream held up to its output queue
/// (64 reads of 32 KiB), which the allocator may keep.
const FLOOD_SLACK: Slack = Slack { rss_kib: 32 * 1024, fds: 0 };
const SETTLE: Duration = Duration::from_secs(15);

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A shell loop started through envd, its pid read from the start event;
/// the stream is returned open.
async fn start(client: &Client, script: &str, stdin: bool) -> (u32, ConnectStream) {
    let request = json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": stdin});
    let mut stream = client.stream(rpc::START, &request, &[]).await;
    match stream.next_event().await {
        ProcEvent::Start(pid) => (pid, stream),
        other => panic!("expected the start event, got {other:?}"),
    }
}

/// Lines in a file the process appends to (0 while it does not exist).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Whether the file keeps growing: its effect continues.
async fn keeps_growing(path: &Path) -> bool {
    let before = lines(path);
    eventually(Duration::from_secs(10), || lines(path) > before + 2).await
}

/// Kills a process through envd and waits until it is reaped (gone from
/// `List` and not a zombie of envd).
async fn kill_and_reap(envd: &Envd, pid: u32) {
    let client = envd.client();
    client.kill(pid).await;
    let deadline = Instant::now() + PATIENCE;
    while client.list().await.contains_key(&pid) {
        assert!(Instant::now() < deadline, "{pid} still listed after SIGKILL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_zombies(envd).await;
}

async fn assert_no_zombies(envd: &Envd) {
    let pid = envd.pid();
    assert!(
        eventually(Duration::from_secs(10), || zombie_children(pid).is_empty()).await,
        "zombie children of envd: {:?}",
        zombie_children(pid)
    );
}

/// A raw HTTP/1.1 connection with a request head (and any body) sent.
fn raw_request(envd: &Envd, head: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(envd.addr()).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    stream
}

/// Reads at least `want` bytes of a response (or panics).
fn read_some(stream: &mut TcpStream, want: usize) -> Vec<u8> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    while got.len() < want {
        let n = stream.read(&mut buf).expect("reading the response");
        assert!(n > 0, "connection closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[tokio::test]
async fn clients_that_vanish_mid_stream_leave_processes_running() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("vanish-stream");
    let before = Footprint::of(envd.pid());
    let sampler = Sampler::start(envd.pid());
    // A slow talker and a flood: the flood advances only while envd keeps
    // draining its output after the client is gone.
    let ticks = dir.path("ticks");
    let floods = dir.path("floods");
    let scripts = [
        format!("while :; do echo tick; echo . >> {}; sleep 0.02; done", ticks.display()),
        format!("while :; do head -c 65536 /dev/zero; echo . >> {}; done", floods.display()),
    ];
    let mut pids = Vec::new();
    for script in &scripts {
        let body = envelope(
            0,
            json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false}).to_string().as_bytes(),
        );
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\nContent-Length: {}\r\n\r\n",
            rpc::START,
            body.len()
        );
        let mut stream = raw_request(&envd, &head, &body);
        // The head, the start event and some output, then the client is gone.
        let response = read_some(&mut stream, 4096);
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let pid: u32 = text
            .split("\"pid\":")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no start event in {text}"));
        drop(stream);
        pids.push(pid);
    }
    for path in [&ticks, &floods] {
        assert!(keeps_growing(path).await, "{} stopped growing after the client vanished", path.display());
    }
    let listed = client.list().await;
    assert!(pids.iter().all(|pid| listed.contains_key(pid)), "List still shows them: {listed:?}");
    // A new client attaches and still gets output.
    let mut again = client.stream(rpc::CONNECT, &json!({"process": {"pid": pids[0]}}), &[]).await;
    assert_eq!(again.next_event().await, ProcEvent::Start(pids[0]));
    assert!(matches!(again.next_event().await, ProcEvent::Stdout(_) | ProcEvent::Keepalive));
    drop(again);
    for pid in pids {
        kill_and_reap(&envd, pid).await;
    }
    let peak = sampler.finish();
    drop(client);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    print_table(
        "clients vanishing mid-stream",
        &[Row { phase: "vanished Start streams".into(), before, peak, after, note: "2 processes kept running".into() }],
    );
    assert!(after.within(before, SLACK), "{before:?} -> {after:?}");
}

#[tokio::test]
async fn a_client_that_vanishes_mid_stream_input_leaves_the_process_running() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("vanish-input");
    let (got, ticks) = (dir.path("got"), dir.path("ticks"));
    let before = Footprint::of(envd.pid());
    let script = format!(
        "while :; do if read -r -t 0.05 line; then echo \"$line\" >> {}; fi; echo . >> {}; done",
        got.display(),
        ticks.display()
    );
    let (pid, output) = start(&client, &script, true).await;
    // A client stream whose body is cut off after two messages.
    let mut body = Vec::new();
    for message in
        [json!({"start": {"process": {"pid": pid}}}), json!({"data": {"input": {"stdin": b64(b"before the cut\n")}}})]
    {
        let frame = envelope(0, message.to_string().as_bytes());
        body.extend_from_slice(format!("{:x}\r\n", frame.len()).as_bytes());
        body.extend_from_slice(&frame);
        body.extend_from_slice(b"\r\n");
    }
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        rpc::STREAM_INPUT
    );
    let stream = raw_request(&envd, &head, &body);
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&got).unwrap_or_default() == "before the cut\n")
            .await,
        "the input before the cut arrives"
    );
    drop(stream);
    drop(output);
    assert!(keeps_growing(&ticks).await, "the process stopped after the input client vanished");
    assert!(client.list().await.contains_key(&pid));
    // Its stdin is still open to the next client.
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"after\n")}})).await;
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&got).unwrap_or_default().ends_with("after\n"))
            .await
    );
    kill_and_reap(&envd, pid).await;
    drop(client);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    assert!(after.within(before, SLACK), "{before:?} -> {after:?}");
}

fn upload_head(path: &Path, content_length: usize) -> String {
    format!(
        "POST /files?path={} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {content_length}\r\n\r\n",
        path.display()
    )
}

#[tokio::test]
async fn uploads_cut_off_mid_body_leave_nothing_behind() {
    let envd = Envd::start();
    let dir = Scratch::new("vanish-upload");
    let uploads = 20;
    for i in (0..uploads).step_by(2) {
        std::fs::write(dir.path(&format!("t{i}")), format!("old {i}")).unwrap();
    }
    let before = Footprint::of(envd.pid());
    let sampler = Sampler::start(envd.pid());
    let mut connections = Vec::new();
    for i in 0..uploads {
        let head = upload_head(&dir.path(&format!("t{i}")), 64 << 20);
        connections.push(raw_request(&envd, &head, &vec![b'n'; 1 << 20]));
    }
    // Every upload's temporary file appears while the bodies flow.
    let temps = || dir.names("").iter().filter(|n| n.contains(".envd-upload.") || n.contains(".envd-replace.")).count();
    assert!(eventually(Duration::from_secs(20), || temps() == uploads).await, "{:?}", dir.names(""));
    let peak = sampler.peak();
    drop(connections);
    let mut wanted: Vec<String> = (0..uploads).step_by(2).map(|i| format!("t{i}")).collect();
    wanted.sort();
    assert!(eventually(Duration::from_secs(10), || dir.names("") == wanted).await, "left: {:?}", dir.names(""));
    for i in (0..uploads).step_by(2) {
        assert_eq!(std::fs::read_to_string(dir.path(&format!("t{i}"))).unwrap(), format!("old {i}"));
    }
    drop(sampler);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    print_table(
        "uploads cut off mid-body",
        &[Row {
            phase: "cut-off uploads".into(),
            before,
            peak,
            after,
            note: format!("{uploads} x 1 MiB of 64 MiB sent"),
        }],
    );
    assert!(after.within(before, SLACK), "{before:?} -> {after:?}");
    // And envd still takes a whole upload.
    let reply = envd
        .client()
        .send(
            Method::POST,
            &format!("/files?path={}", dir.s("t0")),
            &[("content-type", "application/octet-stream")],
            "new",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(std::fs::read_to_string(dir.path("t0")).unwrap(), "new");
}

#[tokio::test]
async fn output_faster_than_any_client_reads_keeps_memory_bounded() {
    let envd = Envd::start();
    let client = envd.client();
    let floods = 8;
    let before = Footprint::of(envd.pid());
    let sampler = Sampler::start(envd.pid());
    let mut streams = Vec::new();
    for _ in 0..floods {
        // `yes` writes as fast as the pipe takes it; nobody reads for a while.
        let (pid, stream) = start(&client, "exec yes envd-flood-line", false).await;
        streams.push((pid, stream));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled_peak = sampler.peak();
    // Then every client reads again: the output is still flowing.
    for (_, stream) in &mut streams {
        let mut bytes = 0;
        while bytes < 1 << 20 {
            if let ProcEvent::Stdout(data) = stream.next_event().await {
                assert!(data.starts_with(b"envd-flood-line\n") || data.contains(&b'\n'));
                bytes += data.len();
            }
        }
    }
    for (pid, stream) in streams {
        drop(stream);
        kill_and_reap(&envd, pid).await;
    }
    let peak = sampler.finish();
    drop(client);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    print_table(
        "output faster than any client reads",
        &[Row {
            phase: "unread floods".into(),
            before,
            peak,
            after,
            note: format!(
                "{floods} x `yes` unread for 5 s: peak {:.1} MiB while stalled",
                stalled_peak.rss_kib as f64 / 1024.0
            ),
        }],
    );
    assert!(peak.rss_kib < before.rss_kib + 64 * 1024, "RSS unbounded: {before:?} -> peak {peak:?}");
    // The allocator keeps some of the buffers it held at the peak.
    assert!(after.within(before, FLOOD_SLACK), "{before:?} -> {after:?}");
}

/// A `GET /health` over a new connection: the status line, or why none came.
fn health_over_new_connection(envd: &Envd, wait: Duration) -> Result<String, String> {
    let mut stream = TcpStream::connect(envd.addr()).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(wait)).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let result = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    match result {
        Ok(_) if !text.is_empty() => Ok(text.lines().next().unwrap_or("").to_owned()),
        Ok(_) => Err("closed without an answer".into()),
        Err(e) if text.is_empty() => Err(format!("no answer: {e}")),
        Err(_) => Ok(text.lines().next().unwrap_or("").to_owned()),
    }
}

#[tokio::test]
async fn a_low_descriptor_limit_gives_clear_errors_and_envd_recovers() {
    let limit = 64;
    let envd = Envd::options().wrapper(["prlimit", &format!("--nofile={limit}:{limit}")]).start();
    // One h2c connection carries every stream: the descriptors go to the
    // processes, not to sockets.
    let client = envd.h2c_client();
    assert!(client.list().await.is_empty(), "the connection is up before the baseline");
    let before = Footprint::of(envd.pid());
    let mut running = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..40 {
        let request = json!({"process": {"cmd": "/bin/sleep", "args": ["600"]}, "stdin": false});
        let mut stream = client.stream(rpc::START, &request, &[]).await;
        match stream.next_event().await {
            ProcEvent::Start(pid) => running.push((pid, stream)),
            ProcEvent::Finished(Some(error)) => refused.push(error),
            other => panic!("neither a start nor an error: {other:?}"),
        }
    }
    let at_limit = fd_count(envd.pid());
    assert!(!refused.is_empty(), "{limit} descriptors cannot hold 40 processes; {} ran", running.len());
    for error in &refused {
        assert!(error.message.contains("Too many open files"), "a clear error: {error:?}");
    }
    // Other calls on the same connection answer too, successfully or clearly.
    let stat = client.unary("/filesystem.Filesystem/Stat", &json!({"path": "/etc/hostname"}), &[]).await;
    assert!(stat.status == StatusCode::OK || stat.text().contains("Too many open files"), "{}", stat.text());
    // Idle connections take the last descriptors, until one is no longer
    // accepted; a further connection is then answered or refused, never
    // left hanging.
    let mut idle = Vec::new();
    loop {
        let held = fd_count(envd.pid());
        idle.push(TcpStream::connect(envd.addr()).unwrap());
        if !eventually(Duration::from_millis(500), || fd_count(envd.pid()) > held).await || idle.len() > 2 * limit {
            break;
        }
    }
    let at_limit = at_limit.max(fd_count(envd.pid()));
    let asked = Instant::now();
    let health = health_over_new_connection(&envd, Duration::from_secs(5));
    let while_exhausted = format!("{health:?} after {:?}", asked.elapsed());
    drop(idle);

    for (pid, stream) in running.drain(..) {
        drop(stream);
        client.kill(pid).await;
    }
    assert_no_zombies(&envd).await;
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    assert!(envd.stderr().lines().all(|l| !l.contains("panicked")), "{}", envd.stderr());
    // Served normally again (a refusal already under way may still
    // reach one late connection: count them).
    let mut late_refusals = 0;
    loop {
        match health_over_new_connection(&envd, PATIENCE).as_deref() {
            Ok("HTTP/1.1 204 No Content") => break,
            Ok("HTTP/1.1 503 Service Unavailable") if late_refusals < 3 => late_refusals += 1,
            other => panic!("envd does not serve again after the load: {other:?}"),
        }
    }
    let run = envd.client().run(&bash("echo served"), &[]).await;
    assert_eq!(run.stdout_str(), "served\n");
    print_table(
        "a descriptor limit of 64",
        &[Row {
            phase: "40 Start at once".into(),
            before,
            peak: Footprint { rss_kib: after.rss_kib.max(before.rss_kib), fds: at_limit },
            after,
            note: format!(
                "{} of 40 Start refused; new connection while exhausted: {while_exhausted}; late refusals: {late_refusals}",
                refused.len()
            ),
        }],
    );
    let refusal = health.expect("a new connection while at the limit is answered, not left hanging");
    assert_eq!(refusal, "HTTP/1.1 503 Service Unavailable", "{while_exhausted}");
    assert!(after.within(before, SLACK), "{before:?} -> {after:?}");
}

#[tokio::test]
async fn a_disk_that_fills_mid_upload_is_507_and_keeps_the_old_file() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("fault-full");
    let _fs = SmallFs::mount(&dir.path("mnt"), "1m");
    std::fs::write(dir.path("mnt/keep.txt"), b"previous content").unwrap();
    let before = Footprint::of(envd.pid());
    let target = dir.s("mnt/keep.txt");
    for attempt in 0..5 {
        let reply = client
            .send(
                Method::POST,
                &format!("/files?path={target}"),
                &[("content-type", "application/octet-stream")],
                vec![b'x'; 3 << 20],
            )
            .await;
        assert_eq!(reply.status, StatusCode::INSUFFICIENT_STORAGE, "attempt {attempt}: {}", reply.text());
        assert_eq!(reply.json(), json!({"code": 507, "message": "not enough disk space available"}));
        assert_eq!(std::fs::read(dir.path("mnt/keep.txt")).unwrap(), b"previous content");
        assert_eq!(dir.names("mnt"), ["keep.txt"], "no temporary file left behind");
    }
    // The space the failed uploads took is free again: a fitting one works.
    let fitting = vec![b'y'; 512 << 10];
    let reply = client
        .send(
            Method::POST,
            &format!("/files?path={target}"),
            &[("content-type", "application/octet-stream")],
            fitting.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(std::fs::read(dir.path("mnt/keep.txt")).unwrap(), fitting);
    drop(client);
    let after = settle(envd.pid(), before, SLACK, SETTLE).await;
    assert!(after.within(before, SLACK), "{before:?} -> {after:?}");
}

#[tokio::test]
async fn envd_killed_while_processes_run_restarts_on_its_state_dir() {
    let state = Scratch::new("killed-state");
    let work = Scratch::new("killed-work");
    let state_args = ["--state-dir".to_owned(), state.s("")];
    let mut first = Envd::options().args(state_args.clone()).start();
    let client = first.client();
    let init = json!({"envVars": {"GREETING": "from before the kill"}});
    assert_eq!(client.post_json("/init", &init).await.status, StatusCode::NO_CONTENT);
    let ticks = work.path("ticks");
    let (sleeper, _s1) = start(&client, "exec sleep 600", false).await;
    let script =
        format!("trap '' PIPE; while :; do echo . >> {}; echo out 2>/dev/null; sleep 0.02; done", ticks.display());
    let (ticker, _s2) = start(&client, &script, false).await;
    let (talker, _s3) = start(&client, "exec yes", false).await;

    // SAFETY: kill(2) on the envd this test started.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(10), || !first.is_running()).await, "envd survived SIGKILL");
    drop(client);

    let second = Envd::options().args(state_args).start();
    let client = second.client();
    assert!(pid_alive(sleeper) && pid_alive(ticker), "the orphans live on without envd");
    assert!(keeps_growing(&ticks).await, "an orphan keeps working");
    let run = client.run(&bash("echo $GREETING"), &[]).await;
    assert_eq!(run.stdout_str(), "from before the kill\n", "the saved exec context is back");
    let listed = client.list().await;
    for pid in [sleeper, ticker, talker] {
        assert!(!listed.contains_key(&pid), "a process of the killed envd is not the new one's: {listed:?}");
        let (_, error) =
            client.call_err(rpc::SEND_SIGNAL, &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})).await;
        assert_eq!(error.code, "not_found");
    }
    let stat = client.call("/filesystem.Filesystem/Stat", &json!({"path": ticks.display().to_string()})).await;
    assert_eq!(stat["entry"]["name"], "ticks");
    assert_no_zombies(&second).await;
    let mut second = second;
    assert!(second.is_running(), "{}", second.stderr());
    assert!(!second.stderr().contains("panicked"), "{}", second.stderr());
    drop(client);
    drop(second);
    // Dropping the first Envd kills the orphans by their sessions.
    drop(first);
    assert!(eventually(Duration::from_secs(10), || !pid_alive(sleeper) && !pid_alive(ticker)).await);
}

fn sandbox_metadata() -> Value {
    json!({"instanceID": "sbx-faulty", "envID": "tpl-faulty", "accessTokenHash": sha512_hex(TOKEN)})
}

fn mmds_args(state: &Scratch, run: &Scratch, mmds: &Mmds) -> Vec<String> {
    ["--state-dir", &state.s(""), "--run-dir", &run.s(""), "--mmds-address", &mmds.address()]
        .map(str::to_owned)
        .to_vec()
}

/// Waits for envd to log its warning about the metadata service.
async fn warned_about_metadata(envd: &Envd) -> bool {
    eventually(Duration::from_secs(15), || {
        envd.stderr().lines().any(|l| l.contains("WARN") && l.contains("metadata service not usable"))
    })
    .await
}

#[tokio::test]
async fn a_broken_metadata_service_leaves_an_open_envd_serving() {
    for fault in [Fault::Garbage, Fault::ServerError, Fault::NotHttp, Fault::Slow(Duration::from_secs(3))] {
        let (state, run_dir) = (Scratch::new("mmds-open-state"), Scratch::new("mmds-open-run"));
        let mmds = Mmds::start_faulty(sandbox_metadata(), fault);
        let envd = Envd::options().args(mmds_args(&state, &run_dir, &mmds)).start();
        let client = envd.client();
        assert_eq!(client.get("/health").await.status, StatusCode::NO_CONTENT, "{fault:?}");
        let run = client.run(&bash("echo served"), &[]).await;
        assert_eq!(run.stdout_str(), "served\n", "{fault:?}");
        assert!(client.list().await.is_empty(), "{fault:?}");
        if fault != Fault::Slow(Duration::from_secs(3)) {
            assert!(warned_about_metadata(&envd).await, "{fault:?}: no warning in {}", envd.stderr());
            assert_eq!(client.get("/envs").await.json().get("E2B_SANDBOX_ID"), None, "{fault:?}");
        }
        // Once the service answers, envd takes the identity and the hash.
        mmds.set_fault(Fault::None);
        let secured =
            eventually(Duration::from_secs(20), || mmds.reads.load(std::sync::atomic::Ordering::SeqCst) > 0).await;
        assert!(secured, "{fault:?}: envd never read the metadata once it was served");
        let with_token = client.clone().with_header("X-Access-Token", TOKEN);
        let deadline = Instant::now() + Duration::from_secs(10);
        while with_token.get("/envs").await.json().get("E2B_SANDBOX_ID") != Some(&json!("sbx-faulty")) {
            assert!(Instant::now() < deadline, "{fault:?}: the identity never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(client.unary(rpc::LIST, &json!({}), &[]).await.status, StatusCode::UNAUTHORIZED, "{fault:?}");
        assert!(!envd.stderr().contains("panicked"), "{}", envd.stderr());
        assert!(!envd.stderr().contains(TOKEN), "the token never reaches the log");
    }
}

#[tokio::test]
async fn a_secured_sandbox_stays_closed_while_the_metadata_service_is_broken() {
    for fault in [Fault::Garbage, Fault::ServerError] {
        let (state, run_dir) = (Scratch::new("mmds-closed-state"), Scratch::new("mmds-closed-run"));
        let mmds = Mmds::start(sandbox_metadata());
        {
            let envd = Envd::options().args(mmds_args(&state, &run_dir, &mmds)).start();
            let init = json!({"accessToken": TOKEN});
            assert_eq!(envd.client().post_json("/init", &init).await.status, StatusCode::NO_CONTENT);
        }
        mmds.set_fault(fault);
        let envd = Envd::options().args(mmds_args(&state, &run_dir, &mmds)).start();
        let with_token = envd.client().with_header("X-Access-Token", TOKEN);
        assert_eq!(envd.client().get("/health").await.status, StatusCode::NO_CONTENT, "{fault:?}");
        assert!(warned_about_metadata(&envd).await, "{fault:?}: no warning in {}", envd.stderr());
        for client in [&with_token, &envd.client()] {
            let reply = client.unary(rpc::LIST, &json!({}), &[]).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{fault:?}: fail closed while the hash is unknown");
        }
        // Not first-time setup: the sandbox was secured.
        let init = envd.client().post_json("/init", &json!({"accessToken": "another token"})).await;
        assert_eq!(init.status, StatusCode::UNAUTHORIZED, "{fault:?}: {}", init.text());
        mmds.set_fault(Fault::None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while with_token.unary(rpc::LIST, &json!({}), &[]).await.status != StatusCode::OK {
            assert!(Instant::now() < deadline, "{fault:?}: the token was never accepted once the service answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(envd.client().unary(rpc::LIST, &json!({}), &[]).await.status, StatusCode::UNAUTHORIZED);
        assert!(!envd.stderr().contains(TOKEN), "the token never reaches the log");
    }
}
