//! The Process service from outside, over Connect JSON on HTTP/1.1:
//! events and their order, exit statuses, input, selectors, timeouts,
//! users, environment, working directory and the child's privileges
//! (CONTRACT.md 3.1–3.9, 5.2, 5.3).

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use http::StatusCode;
use serde_json::{Value, json};
use sha2::Digest;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `Start` with stdin left open (the field absent).
fn with_stdin(cmd: &str, args: &[&str]) -> Value {
    json!({"process": {"cmd": cmd, "args": args}})
}

async fn expect_start(stream: &mut ConnectStream) -> u32 {
    match stream.next_event().await {
        ProcEvent::Start(pid) => pid,
        other => panic!("expected the start event, got {other:?}"),
    }
}

/// Reads events until `want` bytes of stdout arrived; returns them.
async fn read_stdout(stream: &mut ConnectStream, want: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < want {
        match stream.next_event().await {
            ProcEvent::Stdout(data) => out.extend_from_slice(&data),
            ProcEvent::Keepalive => {}
            other => panic!("expected stdout, got {other:?} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
    out
}

/// Reads the rest of a process stream: the end event, then a clean finish.
async fn expect_end(stream: &mut ConnectStream) -> Value {
    let end = loop {
        match stream.next_event().await {
            ProcEvent::End(end) => break end,
            ProcEvent::Keepalive | ProcEvent::Stdout(_) | ProcEvent::Stderr(_) => {}
            other => panic!("expected the end event, got {other:?}"),
        }
    };
    assert_eq!(stream.next_event().await, ProcEvent::Finished(None));
    end
}

async fn expect_error(stream: &mut ConnectStream) -> RpcError {
    assert_eq!(stream.status, StatusCode::OK, "stream errors are HTTP 200");
    loop {
        match stream.next_event().await {
            ProcEvent::Finished(Some(error)) => return error,
            ProcEvent::Finished(None) => panic!("the stream succeeded"),
            _ => {}
        }
    }
}

// --- events, exit statuses --------------------------------------------------

#[tokio::test]
async fn start_data_end_in_order() {
    let envd = Envd::start();
    let run = envd.client().run(&bash("echo out; echo err >&2; exit 0"), &[]).await;
    assert_eq!(run.stdout_str(), "out\n");
    assert_eq!(run.stderr_str(), "err\n");
    assert_eq!(run.events.first(), Some(&"start"));
    assert_eq!(run.events.last(), Some(&"end"));
    // Success: exit code 0 and no error are omitted in JSON.
    assert_eq!(run.end(), &json!({"exited": true, "status": "exit status 0"}));
}

#[tokio::test]
async fn exit_status_strings() {
    let envd = Envd::start();
    let client = envd.client();
    let run = client.run(&bash("exit 3"), &[]).await;
    assert_eq!(run.end(), &json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"}));

    // A signal death the process inflicts on itself.
    let run = client.run(&bash("kill -SEGV $$"), &[]).await;
    let status = run.end()["status"].as_str().unwrap().to_owned();
    assert!(status.starts_with("signal: segmentation fault"), "{status}");
    assert_eq!(run.exit_code(), -1);
}

#[tokio::test]
async fn sigkill_and_sigterm_end_with_signal_status() {
    let envd = Envd::start();
    let client = envd.client();
    let signals = [
        (json!("SIGNAL_SIGKILL"), "signal: killed"),
        (json!("SIGNAL_SIGTERM"), "signal: terminated"),
        (json!(9), "signal: killed"),
        (json!(15), "signal: terminated"),
    ];
    for (signal, text) in signals {
        let mut stream =
            client.stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}), &[]).await;
        let pid = expect_start(&mut stream).await;
        let sent = Instant::now();
        let reply = client.call(rpc::SEND_SIGNAL, &json!({"process": {"pid": pid}, "signal": signal})).await;
        assert_eq!(reply, json!({}));
        let end = expect_end(&mut stream).await;
        assert_eq!(end, json!({"exitCode": -1, "status": text, "error": text}), "{signal}");
        assert!(sent.elapsed() < Duration::from_secs(3), "{signal} took {:?}", sent.elapsed());
        assert!(!client.list().await.contains_key(&pid), "an ended process is not listed");
    }
}

#[tokio::test]
async fn missing_command_exits_127() {
    let envd = Envd::start();
    let client = envd.client();
    for cmd in ["/definitely/not/here", "envd-no-such-command"] {
        let run = client.run(&json!({"process": {"cmd": cmd}, "stdin": false}), &[]).await;
        assert_eq!(run.exit_code(), 127, "{cmd}: {:?}", run.end());
        assert_eq!(run.end()["status"], "exit status 127");
        assert!(!run.stderr.is_empty(), "{cmd}: a message on stderr");
    }
    let run = client.run(&bash("envd-no-such-command"), &[]).await;
    assert_eq!(run.exit_code(), 127);
}

// --- stdin -------------------------------------------------------------------

#[tokio::test]
async fn stdin_absent_is_a_pipe_and_false_is_dev_null() {
    let envd = Envd::start();
    let client = envd.client();
    let run = client.run(&with_stdin("/usr/bin/readlink", &["/proc/self/fd/0"]), &[]).await;
    assert!(run.stdout_str().starts_with("pipe:["), "stdin absent: {}", run.stdout_str());
    let run = client
        .run(&json!({"process": {"cmd": "/usr/bin/readlink", "args": ["/proc/self/fd/0"]}, "stdin": true}), &[])
        .await;
    assert!(run.stdout_str().starts_with("pipe:["), "stdin true: {}", run.stdout_str());
    let run = client
        .run(&json!({"process": {"cmd": "/usr/bin/readlink", "args": ["/proc/self/fd/0"]}, "stdin": false}), &[])
        .await;
    assert_eq!(run.stdout_str(), "/dev/null\n");

    // Input for a process without stdin is refused.
    let mut stream = client
        .stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "stdin": false}), &[])
        .await;
    let pid = expect_start(&mut stream).await;
    let (status, error) =
        client.call_err(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}})).await;
    assert_eq!((status, error.code.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "internal"), "{error:?}");
    // CloseStdin on it is a no-op success.
    client.call(rpc::CLOSE_STDIN, &json!({"process": {"pid": pid}})).await;
    client.kill(pid).await;
    expect_end(&mut stream).await;

    // Input after CloseStdin is refused the same way; closing twice is fine.
    let mut stream = client.stream(rpc::START, &with_stdin("/bin/sleep", &["30"]), &[]).await;
    let pid = expect_start(&mut stream).await;
    client.call(rpc::CLOSE_STDIN, &json!({"process": {"pid": pid}})).await;
    client.call(rpc::CLOSE_STDIN, &json!({"process": {"pid": pid}})).await;
    let (_, error) =
        client.call_err(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"x")}})).await;
    assert_eq!(error.code, "internal", "{error:?}");
    client.kill(pid).await;
    expect_end(&mut stream).await;
}

#[tokio::test]
async fn send_input_and_close_stdin_on_cat() {
    let envd = Envd::start();
    let client = envd.client();
    let mut stream = client.stream(rpc::START, &with_stdin("/bin/cat", &[]), &[]).await;
    let pid = expect_start(&mut stream).await;
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}})).await;
    assert_eq!(read_stdout(&mut stream, 6).await, b"hello\n");
    // Arbitrary bytes pass unchanged.
    let binary: Vec<u8> = (0..=255u8).collect();
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(&binary)}})).await;
    assert_eq!(read_stdout(&mut stream, 256).await, binary);
    // Input as protojson allows it: URL-safe or unpadded base64, the
    // proto field name.
    let reply = client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": "-_8"}})).await;
    assert_eq!(reply, json!({}));
    assert_eq!(read_stdout(&mut stream, 2).await, [0xfb, 0xff]);
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": "aGk"}})).await;
    assert_eq!(read_stdout(&mut stream, 2).await, b"hi");
    assert_eq!(client.call(rpc::CLOSE_STDIN, &json!({"process": {"pid": pid}})).await, json!({}));
    let end = expect_end(&mut stream).await;
    assert_eq!(end, json!({"exited": true, "status": "exit status 0"}));
}

#[tokio::test]
async fn large_input_is_written_in_full() {
    let envd = Envd::start();
    let client = envd.client();
    let mut stream = client.stream(rpc::START, &with_stdin("/usr/bin/wc", &["-c"]), &[]).await;
    let pid = expect_start(&mut stream).await;
    let chunk = vec![b'x'; 4 << 20];
    for _ in 0..2 {
        client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(&chunk)}})).await;
    }
    client.call(rpc::CLOSE_STDIN, &json!({"process": {"pid": pid}})).await;
    assert_eq!(read_stdout(&mut stream, 8).await, b"8388608\n");
    assert_eq!(expect_end(&mut stream).await["status"], "exit status 0");
}

#[tokio::test]
async fn stream_input_is_handled_as_it_arrives() {
    let envd = Envd::start();
    let client = envd.client();
    let mut output = client.stream(rpc::START, &with_stdin("/bin/cat", &[]), &[]).await;
    let pid = expect_start(&mut output).await;

    let input = client.client_stream(rpc::STREAM_INPUT, &[]);
    input.send(&json!({"start": {"process": {"pid": pid}}})).await;
    input.send(&json!({"data": {"input": {"stdin": b64(b"ping\n")}}})).await;
    // The output arrives while the request body is still open.
    assert_eq!(read_stdout(&mut output, 5).await, b"ping\n");
    assert!(!input.answered(), "envd answered before the input stream ended");
    input.send(&json!({"keepalive": {}})).await;
    input.send(&json!({"data": {"input": {"stdin": b64(b"pong\n")}}})).await;
    assert_eq!(read_stdout(&mut output, 5).await, b"pong\n");
    assert!(!input.answered());

    let mut response = input.finish().await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-type"), "application/connect+json");
    let message = response.next_frame().await.expect("the response message");
    assert!(!message.is_end());
    assert_eq!(message.json(), json!({}));
    let end = response.next_frame().await.expect("the end-of-stream frame");
    assert!(end.is_end() && end.end_error().is_none(), "{:?}", end.json());
    assert!(response.next_frame().await.is_none());

    client.call(rpc::CLOSE_STDIN, &json!({"process": {"pid": pid}})).await;
    assert_eq!(expect_end(&mut output).await["status"], "exit status 0");
}

#[tokio::test]
async fn stream_input_deadline_bounds_the_input_stream() {
    let envd = Envd::start();
    let client = envd.client();
    let mut output = client.stream(rpc::START, &with_stdin("/bin/cat", &[]), &[]).await;
    let pid = expect_start(&mut output).await;
    let started = Instant::now();
    let mut input = client.client_stream(rpc::STREAM_INPUT, &[("connect-timeout-ms", "700")]);
    input.send(&json!({"start": {"process": {"pid": pid}}})).await;
    input.send(&json!({"data": {"input": {"stdin": b64(b"in time\n")}}})).await;
    assert_eq!(read_stdout(&mut output, 8).await, b"in time\n");
    // The body stays open past the deadline: envd ends the call itself.
    let mut response = input.response().await;
    assert_eq!(expect_error(&mut response).await.code, "deadline_exceeded");
    assert!(started.elapsed() < Duration::from_secs(5), "ended after {:?}", started.elapsed());
    drop(input);
    assert!(pid_alive(pid), "the input deadline does not touch the process");
    client.kill(pid).await;
    expect_end(&mut output).await;
}

#[tokio::test]
async fn stream_input_errors_end_the_call_at_once() {
    let envd = Envd::start();
    let client = envd.client();

    // Unknown pid: not_found while the request body is still open.
    let mut input = client.client_stream(rpc::STREAM_INPUT, &[]);
    input.send(&json!({"start": {"process": {"pid": 999_999_999u32}}})).await;
    let mut response = input.response().await;
    let error = expect_error(&mut response).await;
    assert_eq!(error, RpcError { code: "not_found".into(), message: "process with pid 999999999 not found".into() });
    drop(input);

    // Data before start is refused, and envd survives it.
    let input = client.client_stream(rpc::STREAM_INPUT, &[]);
    input.send(&json!({"data": {"input": {"stdin": b64(b"x")}}})).await;
    let mut response = input.finish().await;
    let error = expect_error(&mut response).await;
    assert_ne!(error.code, "unknown", "{error:?}");
    assert!(health_ok(envd.port()));
}

// --- keep-alives -------------------------------------------------------------

#[tokio::test]
async fn keepalives_fill_silence() {
    let envd = Envd::start();
    let client = envd.client();
    let run = client.run(&bash("sleep 2.6; echo done"), &[("keepalive-ping-interval", "1")]).await;
    assert!(run.keepalives >= 2, "expected keep-alives every second: {:?}", run.events);
    assert_eq!(run.stdout_str(), "done\n");

    // Output restarts the timer: no keep-alive while data flows.
    let run =
        client.run(&bash("for i in 1 2 3 4 5; do echo $i; sleep 0.4; done"), &[("keepalive-ping-interval", "1")]).await;
    assert_eq!(run.keepalives, 0, "{:?}", run.events);

    // 0, negative and garbage mean the default (90 s): nothing crashes.
    for value in ["0", "-1", "abc"] {
        let run = client.run(&bash("sleep 1.2; echo ok"), &[("keepalive-ping-interval", value)]).await;
        assert_eq!(run.keepalives, 0, "{value}: {:?}", run.events);
        assert_eq!(run.stdout_str(), "ok\n");
    }
    assert!(health_ok(envd.port()));
}

// --- Connect, List, selectors -----------------------------------------------

#[tokio::test]
async fn connect_sees_every_event_from_its_attach_point() {
    let envd = Envd::start();
    let client = envd.client();
    let mut starter = client.stream(rpc::START, &json!({"process": {"cmd": "/bin/cat"}, "tag": "watched"}), &[]).await;
    let pid = expect_start(&mut starter).await;
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"a\n")}})).await;
    assert_eq!(read_stdout(&mut starter, 2).await, b"a\n");

    let mut by_pid = client.stream(rpc::CONNECT, &json!({"process": {"pid": pid}}), &[]).await;
    assert_eq!(expect_start(&mut by_pid).await, pid);
    let mut by_tag = client.stream(rpc::CONNECT, &json!({"process": {"tag": "watched"}}), &[]).await;
    assert_eq!(expect_start(&mut by_tag).await, pid);

    client.call(rpc::SEND_INPUT, &json!({"process": {"tag": "watched"}, "input": {"stdin": b64(b"b\n")}})).await;
    for stream in [&mut starter, &mut by_pid, &mut by_tag] {
        assert_eq!(read_stdout(stream, 2).await, b"b\n", "no replay of earlier output");
    }
    client.call(rpc::CLOSE_STDIN, &json!({"process": {"tag": "watched"}})).await;
    for stream in [&mut starter, &mut by_pid, &mut by_tag] {
        assert_eq!(expect_end(stream).await, json!({"exited": true, "status": "exit status 0"}));
    }

    // Keep-alives on a Connect stream too.
    let mut sleeper = client.stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}), &[]).await;
    let sleeper_pid = expect_start(&mut sleeper).await;
    let mut watcher = client
        .stream(rpc::CONNECT, &json!({"process": {"pid": sleeper_pid}}), &[("keepalive-ping-interval", "1")])
        .await;
    assert_eq!(expect_start(&mut watcher).await, sleeper_pid);
    assert_eq!(watcher.next_event().await, ProcEvent::Keepalive);
    client.kill(sleeper_pid).await;
    assert_eq!(expect_end(&mut watcher).await["status"], "signal: killed");
    expect_end(&mut sleeper).await;

    // Shortly after the end, Connect still learns how it ended.
    let run = client.stream(rpc::CONNECT, &json!({"process": {"pid": pid}}), &[]).await.collect().await;
    assert_eq!(run.pid, Some(pid));
    assert_eq!(run.end, Some(json!({"exited": true, "status": "exit status 0"})));
    assert_eq!(run.error, None);
}

#[tokio::test]
async fn list_reports_the_config_as_sent() {
    let envd = Envd::start();
    let client = envd.client();
    assert_eq!(client.call(rpc::LIST, &json!({})).await, json!({}), "no processes: the empty message");
    let full = json!({
        "process": {"cmd": "/bin/sleep", "args": ["30"], "envs": {"A": "1", "B": "two"}, "cwd": "~"},
        "tag": "listed",
        "stdin": false,
    });
    let bare = json!({"process": {"cmd": "/bin/sleep", "args": ["31"]}});
    let mut first = client.stream(rpc::START, &full, &[]).await;
    let first_pid = expect_start(&mut first).await;
    let mut second = client.stream(rpc::START, &bare, &[]).await;
    let second_pid = expect_start(&mut second).await;

    let listed = client.list().await;
    assert_eq!(
        listed[&first_pid],
        json!({
            "config": {"cmd": "/bin/sleep", "args": ["30"], "envs": {"A": "1", "B": "two"}, "cwd": "~"},
            "pid": first_pid,
            "tag": "listed",
        }),
        "cwd unresolved, only the request's envs, the tag"
    );
    assert_eq!(listed[&second_pid], json!({"config": {"cmd": "/bin/sleep", "args": ["31"]}, "pid": second_pid}));

    client.call(rpc::SEND_SIGNAL, &json!({"process": {"tag": "listed"}, "signal": "SIGNAL_SIGKILL"})).await;
    assert_eq!(expect_end(&mut first).await["status"], "signal: killed");
    client.kill(second_pid).await;
    expect_end(&mut second).await;
    let listed = client.list().await;
    assert!(!listed.contains_key(&first_pid) && !listed.contains_key(&second_pid), "{listed:?}");
}

#[tokio::test]
async fn tag_selector_finds_the_right_process_among_several() {
    let envd = Envd::start();
    let client = envd.client();
    let mut streams = Vec::new();
    for tag in ["t1", "t2", "t3", "t4"] {
        let mut stream = client
            .stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "tag": tag}), &[])
            .await;
        let pid = expect_start(&mut stream).await;
        streams.push((tag, pid, stream));
    }
    for (tag, pid, stream) in &mut streams {
        let mut connected = client.stream(rpc::CONNECT, &json!({"process": {"tag": *tag}}), &[]).await;
        assert_eq!(expect_start(&mut connected).await, *pid, "tag {tag}");
        drop(connected);
        client.call(rpc::SEND_SIGNAL, &json!({"process": {"tag": *tag}, "signal": "SIGNAL_SIGKILL"})).await;
        assert_eq!(expect_end(stream).await["status"], "signal: killed", "tag {tag}");
    }
}

#[tokio::test]
async fn unknown_pid_or_tag_is_not_found() {
    let envd = Envd::start();
    let client = envd.client();
    let by_pid = json!({"pid": 999_999_999u32});
    let by_tag = json!({"tag": "nope"});
    for (selector, message) in
        [(&by_pid, "process with pid 999999999 not found"), (&by_tag, "process with tag nope not found")]
    {
        for (rpc, body) in [
            (rpc::SEND_INPUT, json!({"process": selector, "input": {"stdin": "eA=="}})),
            (rpc::SEND_SIGNAL, json!({"process": selector, "signal": "SIGNAL_SIGKILL"})),
            (rpc::CLOSE_STDIN, json!({"process": selector})),
            (rpc::UPDATE, json!({"process": selector})),
        ] {
            let (status, error) = client.call_err(rpc, &body).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{rpc}");
            assert_eq!(error, RpcError { code: "not_found".into(), message: message.into() }, "{rpc}");
        }
        let mut stream = client.stream(rpc::CONNECT, &json!({"process": selector}), &[]).await;
        assert_eq!(stream.header("content-type"), "application/connect+json");
        assert_eq!(expect_error(&mut stream).await, RpcError { code: "not_found".into(), message: message.into() });
    }
}

#[tokio::test]
async fn unsupported_signal_and_empty_selector_are_unimplemented() {
    let envd = Envd::start();
    let client = envd.client();
    let mut stream = client.stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}), &[]).await;
    let pid = expect_start(&mut stream).await;
    for signal in [json!("SIGNAL_UNSPECIFIED"), json!(2), Value::Null] {
        let (status, error) =
            client.call_err(rpc::SEND_SIGNAL, &json!({"process": {"pid": pid}, "signal": signal})).await;
        assert_eq!((status, error.code.as_str()), (StatusCode::NOT_IMPLEMENTED, "unimplemented"), "signal {signal}");
    }
    let (_, error) = client.call_err(rpc::SEND_SIGNAL, &json!({"process": {}, "signal": "SIGNAL_SIGKILL"})).await;
    assert_eq!(error.code, "unimplemented");
    let (_, error) = client.call_err(rpc::SEND_INPUT, &json!({"process": {"pid": pid}, "input": {}})).await;
    assert_eq!(error.code, "unimplemented", "input with neither stdin nor pty");
    assert!(pid_alive(pid), "the process survived the refused signals");
    client.kill(pid).await;
    expect_end(&mut stream).await;
}

// --- lifetime ------------------------------------------------------------------

#[tokio::test]
async fn client_disconnect_does_not_kill_the_process() {
    let envd = Envd::start();
    let client = envd.client();
    let mut stream = client.stream(rpc::START, &bash("while :; do echo tick; sleep 0.1; done"), &[]).await;
    let pid = expect_start(&mut stream).await;
    read_stdout(&mut stream, 5).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pid_alive(pid), "the process died with its Start stream");
    assert!(client.list().await.contains_key(&pid));
    // Output goes on, and a new watcher sees it.
    let mut connected = client.stream(rpc::CONNECT, &json!({"process": {"pid": pid}}), &[]).await;
    assert_eq!(expect_start(&mut connected).await, pid);
    assert!(read_stdout(&mut connected, 5).await.starts_with(b"tick"));
    client.kill(pid).await;
    assert_eq!(expect_end(&mut connected).await["status"], "signal: killed");
}

#[tokio::test]
async fn a_gone_watcher_does_not_stall_a_busy_process() {
    let envd = Envd::start();
    let client = envd.client();
    let mut stream = client.stream(rpc::START, &json!({"process": {"cmd": "/usr/bin/yes", "args": ["y"]}}), &[]).await;
    let pid = expect_start(&mut stream).await;
    read_stdout(&mut stream, 1 << 20).await;
    drop(stream);
    // With no watcher the output is read and dropped: `yes` keeps running
    // and a new watcher gets fresh output at once.
    let cpu_ticks = || {
        let stat = proc_stat(pid).expect("yes still runs");
        stat[11].parse::<u64>().unwrap() + stat[12].parse::<u64>().unwrap()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cpu_ticks();
    assert!(after > before, "yes is blocked on a full pipe (utime+stime {before} -> {after})");
    let mut connected = client.stream(rpc::CONNECT, &json!({"process": {"pid": pid}}), &[]).await;
    assert_eq!(expect_start(&mut connected).await, pid);
    assert!(read_stdout(&mut connected, 1 << 16).await.starts_with(b"y\n"));
    client.kill(pid).await;
    assert_eq!(expect_end(&mut connected).await["status"], "signal: killed");
}

#[tokio::test]
async fn many_concurrent_starts() {
    let envd = Envd::start();
    let client = envd.client();
    let runs = (0..40).map(|i| {
        let client = client.clone();
        async move { (i, client.run(&bash(&format!("echo {i}; echo {i} >&2; exit $(({i} % 5))")), &[]).await) }
    });
    let pids: HashSet<u32> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(|(i, run)| {
            assert_eq!(run.stdout_str(), format!("{i}\n"));
            assert_eq!(run.stderr_str(), format!("{i}\n"));
            assert_eq!(run.exit_code(), i % 5);
            run.pid()
        })
        .collect();
    assert_eq!(pids.len(), 40);
}

#[tokio::test]
async fn connect_timeout_is_the_process_lifetime() {
    let envd = Envd::start();
    let client = envd.client();
    let started = Instant::now();
    let mut stream = client
        .stream(
            rpc::START,
            &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}),
            &[("connect-timeout-ms", "1500")],
        )
        .await;
    let pid = expect_start(&mut stream).await;
    let error = expect_error(&mut stream).await;
    let elapsed = started.elapsed();
    assert_eq!(error.code, "deadline_exceeded", "{error:?}");
    assert!(elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(5), "ended after {elapsed:?}");
    assert!(eventually(Duration::from_secs(2), || !pid_alive(pid)).await, "the process outlived its deadline");
    // Not alive includes a zombie that envd has yet to reap and unlist.
    let mut listed = true;
    for _ in 0..100 {
        listed = client.list().await.contains_key(&pid);
        if !listed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!listed, "the killed process is still listed");

    // A grandchild holding stdout does not hold the end past the deadline.
    let started = Instant::now();
    let mut stream = client.stream(rpc::START, &bash("sleep 10 & sleep 30"), &[("connect-timeout-ms", "1000")]).await;
    expect_start(&mut stream).await;
    assert_eq!(expect_error(&mut stream).await.code, "deadline_exceeded");
    assert!(started.elapsed() < Duration::from_secs(4), "ended after {:?}", started.elapsed());

    // 0 means no deadline.
    let run = client.run(&bash("sleep 0.3; echo alive"), &[("connect-timeout-ms", "0")]).await;
    assert_eq!(run.stdout_str(), "alive\n");
    assert_eq!(run.end()["status"], "exit status 0");

    // Connect's deadline bounds only the stream.
    let mut stream = client.stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}), &[]).await;
    let pid = expect_start(&mut stream).await;
    let mut connected =
        client.stream(rpc::CONNECT, &json!({"process": {"pid": pid}}), &[("connect-timeout-ms", "500")]).await;
    assert_eq!(expect_start(&mut connected).await, pid);
    assert_eq!(expect_error(&mut connected).await.code, "deadline_exceeded");
    assert!(pid_alive(pid), "Connect's deadline killed the process");
    client.kill(pid).await;
    expect_end(&mut stream).await;
}

#[tokio::test]
async fn end_waits_for_a_grandchild_holding_stdout_unless_signalled() {
    let envd = Envd::start();
    let client = envd.client();
    let started = Instant::now();
    let run = client.run(&bash("sleep 2 & echo x"), &[]).await;
    assert_eq!(run.stdout_str(), "x\n");
    assert!(started.elapsed() >= Duration::from_millis(1800), "end came after {:?}", started.elapsed());
    assert_eq!(run.end()["status"], "exit status 0");

    let mut stream = client.stream(rpc::START, &bash("sleep 10 & echo x; sleep 30"), &[]).await;
    let pid = expect_start(&mut stream).await;
    assert_eq!(read_stdout(&mut stream, 2).await, b"x\n");
    let sent = Instant::now();
    client.kill(pid).await;
    assert_eq!(expect_end(&mut stream).await["status"], "signal: killed");
    assert!(sent.elapsed() < Duration::from_secs(3), "SIGKILL waited for the grandchild: {:?}", sent.elapsed());
}

#[tokio::test]
async fn hundred_megabytes_arrive_byte_exact() {
    const SIZE: usize = 100 * 1024 * 1024;
    let envd = Envd::start();
    let path = std::env::temp_dir().join(format!("envd-test-100m-{}", envd.port()));
    // Deterministic pseudo-random bytes (xorshift), so compression or
    // line handling anywhere would show.
    let mut data = Vec::with_capacity(SIZE);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&path, &data).unwrap();
    let expected = sha2::Sha256::digest(&data);
    drop(data);

    let start = json!({"process": {"cmd": "/bin/cat", "args": [path.to_str().unwrap()]}, "stdin": false});
    let mut stream = envd.client().stream(rpc::START, &start, &[]).await;
    expect_start(&mut stream).await;
    let mut hasher = sha2::Sha256::new();
    let (mut received, mut largest) = (0, 0);
    let end = loop {
        match stream.next_event().await {
            ProcEvent::Stdout(data) => {
                received += data.len();
                largest = largest.max(data.len());
                hasher.update(&data);
            }
            ProcEvent::End(end) => break end,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(stream.next_event().await, ProcEvent::Finished(None));
    std::fs::remove_file(&path).unwrap();
    assert_eq!(received, SIZE);
    assert_eq!(hasher.finalize(), expected, "checksum");
    assert!(largest <= 32 * 1024, "a data event carries one read of at most 32 KiB, got {largest}");
    assert_eq!(end["status"], "exit status 0");
}

// --- users, environment, cwd ---------------------------------------------------

#[tokio::test]
async fn commands_run_as_the_basic_user_with_its_groups() {
    let user = test_user();
    let envd = Envd::start();
    let run = envd.client().with_user(&user.name).run(&bash("id -u; id -g; id -G; whoami; pwd"), &[]).await;
    let out = run.stdout_str();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[0], user.uid.to_string());
    assert_eq!(lines[1], user.gid.to_string());
    let groups: HashSet<u32> = lines[2].split_whitespace().map(|g| g.parse().unwrap()).collect();
    assert_eq!(groups, HashSet::from([user.gid, user.extra_gid]), "primary + /etc/group supplementary groups");
    assert_eq!(lines[3], user.name);
    assert_eq!(lines[4], user.home.to_str().unwrap(), "cwd defaults to the user's home");

    // No Authorization: the default user (root), until /init changes it.
    let client = envd.client();
    assert_eq!(client.run(&bash("id -u; pwd"), &[]).await.stdout_str(), "0\n/root\n");
    let init = client.post_json("/init", &json!({"defaultUser": user.name})).await;
    assert_eq!(init.status, StatusCode::NO_CONTENT);
    let expected = format!("{}\n{}\n", user.uid, user.home.display());
    assert_eq!(client.run(&bash("id -u; pwd"), &[]).await.stdout_str(), expected);
    // The scheme is case-insensitive; a header without ':' names nobody.
    let lower = envd.client().with_header("authorization", "basic cm9vdDo=");
    assert_eq!(lower.run(&bash("id -u"), &[]).await.stdout_str(), "0\n");
    let no_colon = envd.client().with_header("authorization", "Basic cm9vdA==");
    assert_eq!(no_colon.run(&bash("id -u"), &[]).await.stdout_str(), format!("{}\n", user.uid));

    // A default user that does not exist: RPCs are unauthenticated.
    let init = client.post_json("/init", &json!({"defaultUser": "envd-no-such-user"})).await;
    assert_eq!(init.status, StatusCode::NO_CONTENT);
    let mut stream = client.stream(rpc::START, &bash("true"), &[]).await;
    assert_eq!(expect_error(&mut stream).await.code, "unauthenticated");
}

#[tokio::test]
async fn environment_precedence() {
    let user = test_user();
    let path = "/usr/local/bin:/usr/bin:/bin:/opt/envd-test-path";
    let envd = Envd::options().env("PATH", path).env("ENVD_TEST_NOT_PASSED", "1").start();
    let client = envd.client();
    let init =
        client.post_json("/init", &json!({"envVars": {"V_INIT": "init", "V_BOTH": "init", "USER": "from-init"}})).await;
    assert_eq!(init.status, StatusCode::NO_CONTENT, "{}", init.text());

    let start = json!({
        "process": {"cmd": "/usr/bin/env", "envs": {"V_BOTH": "request", "V_REQ": "request", "LOGNAME": "from-request"}},
        "stdin": false,
    });
    let run = client.with_user(&user.name).run(&start, &[]).await;
    let env: BTreeMap<String, String> = run
        .stdout_str()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("PATH", path),
        ("HOME", user.home.to_str().unwrap()),
        ("USER", "from-init"),
        ("LOGNAME", "from-request"),
        ("E2B_SANDBOX", "false"),
        ("V_INIT", "init"),
        ("V_BOTH", "request"),
        ("V_REQ", "request"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(env, expected, "exactly PATH/HOME/USER/LOGNAME < default env vars < request envs");
}

#[tokio::test]
async fn working_directory_rules() {
    let user = test_user();
    let workdir = std::env::temp_dir().join(format!("envd-test-workdir-{}", std::process::id()));
    let other = workdir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let relative = user.home.join("envd-test-relative");
    std::fs::create_dir_all(&relative).unwrap();

    let envd = Envd::options().args(["--default-workdir", workdir.to_str().unwrap()]).start();
    let client = envd.client();
    let as_user = client.clone().with_user(&user.name);
    let pwd = |cwd: Option<&str>| match cwd {
        Some(cwd) => json!({"process": {"cmd": "/bin/pwd", "cwd": cwd}, "stdin": false}),
        None => json!({"process": {"cmd": "/bin/pwd"}, "stdin": false}),
    };
    assert_eq!(as_user.run(&pwd(None), &[]).await.stdout_str().trim_end(), workdir.to_str().unwrap());
    assert_eq!(as_user.run(&pwd(Some("~")), &[]).await.stdout_str().trim_end(), user.home.to_str().unwrap());
    assert_eq!(
        as_user.run(&pwd(Some("envd-test-relative")), &[]).await.stdout_str().trim_end(),
        relative.to_str().unwrap(),
        "a relative cwd joins the user's home"
    );
    assert_eq!(client.run(&pwd(Some("~")), &[]).await.stdout_str(), "/root\n");

    let init = client.post_json("/init", &json!({"defaultWorkdir": other.to_str().unwrap()})).await;
    assert_eq!(init.status, StatusCode::NO_CONTENT);
    assert_eq!(as_user.run(&pwd(None), &[]).await.stdout_str().trim_end(), other.to_str().unwrap());

    let mut stream = as_user.stream(rpc::START, &pwd(Some("/nonexistent/envd-cwd")), &[]).await;
    assert_eq!(
        expect_error(&mut stream).await,
        RpcError { code: "invalid_argument".into(), message: "cwd '/nonexistent/envd-cwd' does not exist".into() }
    );
    let mut stream = as_user.stream(rpc::START, &pwd(Some("~root/x")), &[]).await;
    assert_eq!(expect_error(&mut stream).await.code, "invalid_argument", "~name is refused");
    std::fs::remove_dir_all(&workdir).unwrap();
}

#[tokio::test]
async fn unknown_basic_user_is_unauthenticated() {
    let envd = Envd::start();
    let ghost = envd.client().with_user("envd-no-such-user");
    let expected = RpcError { code: "unauthenticated".into(), message: "invalid username: 'envd-no-such-user'".into() };
    let mut stream = ghost.stream(rpc::START, &bash("echo never"), &[]).await;
    assert_eq!(stream.header("content-type"), "application/connect+json");
    assert_eq!(expect_error(&mut stream).await, expected);
    let (status, error) = ghost.call_err(rpc::LIST, &json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error, expected);
    // Every route, even /health.
    for path in ["/health", "/envs"] {
        let reply = ghost.get(path).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            reply.json(),
            json!({"code": "unauthenticated", "message": "invalid username: 'envd-no-such-user'"})
        );
    }
}

// --- the child's privileges and scheduling --------------------------------------

fn capabilities(status: &str) -> BTreeMap<String, String> {
    status
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

#[tokio::test]
async fn non_root_children_have_no_capabilities() {
    let user = test_user();
    let envd = Envd::start();
    let start = json!({"process": {"cmd": "/bin/cat", "args": ["/proc/self/status"]}, "stdin": false});
    let caps = capabilities(&envd.client().with_user(&user.name).run(&start, &[]).await.stdout_str());
    for set in ["CapPrm", "CapEff", "CapInh", "CapAmb"] {
        assert_eq!(caps.get(set).map(String::as_str), Some("0000000000000000"), "{set} of a non-root child: {caps:?}");
    }
    // As root they are kept (so the check above can tell the difference).
    let caps = capabilities(&envd.client().run(&start, &[]).await.stdout_str());
    assert_ne!(caps["CapEff"], "0000000000000000");
}

#[tokio::test]
async fn children_get_normal_priorities_in_their_own_session() {
    let user = test_user();
    let envd = Envd::options().wrapper(["nice", "-n", "-5"]).start();
    let envd_stat = proc_stat(envd.pid()).unwrap();
    assert_eq!(envd_stat[16], "-5", "envd itself runs at nice -5");
    for client in [envd.client(), envd.client().with_user(&user.name)] {
        let mut stream =
            client.stream(rpc::START, &json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}}), &[]).await;
        let pid = expect_start(&mut stream).await;
        let stat = proc_stat(pid).unwrap();
        assert_eq!(stat[16], "0", "nice of the child");
        assert_eq!(stat[3], pid.to_string(), "the child leads its own session");
        assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap().trim(), "100");
        // SAFETY: ioprio_get(IOPRIO_WHO_PROCESS, pid) only reads.
        let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, pid as libc::c_int) };
        assert_eq!(ioprio, (2 << 13) | 4, "best-effort I/O class, priority 4");
        client.kill(pid).await;
        expect_end(&mut stream).await;
    }
    assert_eq!(std::fs::read_to_string(format!("/proc/{}/oom_score_adj", envd.pid())).unwrap().trim(), "0");
}

/// Signals envd inherited ignored (`nohup`, a background job of a shell)
/// are not its commands' business: each starts with every signal at its
/// default and none blocked, so a terminal's Ctrl-C stops a job.
#[tokio::test]
async fn commands_start_with_default_signals_whatever_envd_inherited() {
    let ignoring = ["sh", "-c", "trap '' HUP INT QUIT TERM; exec \"$@\"", "sh"];
    let envd = Envd::options().wrapper(ignoring).start();
    let envd_status = std::fs::read_to_string(format!("/proc/{}/status", envd.pid())).unwrap();
    let envd_ignores = envd_status.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap();
    let envd_ignores = u64::from_str_radix(envd_ignores.trim(), 16).unwrap();
    // HUP, INT, QUIT, PIPE (Rust's) and TERM: bits 1, 2, 3, 13 and 15.
    assert_eq!(envd_ignores & 0x5007, 0x5007, "envd runs with them ignored: {envd_ignores:x}");
    let start = json!({"process": {"cmd": "/bin/cat", "args": ["/proc/self/status"]}});
    for pty in [false, true] {
        let mut start = start.clone();
        if pty {
            start["pty"] = json!({"size": {"cols": 80, "rows": 24}});
        }
        let run = envd.client().run(&start, &[]).await;
        let status = if pty { String::from_utf8_lossy(&run.pty).into_owned() } else { run.stdout_str() };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned());
        assert_eq!(field("SigIgn:").as_deref(), Some("0000000000000000"), "pty {pty}: {status}");
        assert_eq!(field("SigBlk:").as_deref(), Some("0000000000000000"), "pty {pty}: {status}");
    }
}
