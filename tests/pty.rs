//! Terminals through the raw RPCs: a real pseudo-terminal, typed input,
//! resize with SIGWINCH, Ctrl-C, exit codes, and no leaked fds or zombies.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{Envd, ProcEvent, rpc, test_user};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn pty_start(cols: u32, rows: u32) -> Value {
    json!({
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}},
        "pty": {"size": {"cols": cols, "rows": rows}}
    })
}

/// A terminal session: its pid and its output so far.
struct Session {
    pid: u32,
    stream: common::ConnectStream,
    screen: Vec<u8>,
    end: Option<Value>,
}

impl Session {
    async fn open(client: &common::Client, cols: u32, rows: u32, headers: &[(&str, &str)]) -> Session {
        let mut stream = client.stream(rpc::START, &pty_start(cols, rows), headers).await;
        let pid = match stream.next_event().await {
            ProcEvent::Start(pid) => pid,
            other => panic!("expected the start event, got {other:?}"),
        };
        Session { pid, stream, screen: Vec::new(), end: None }
    }

    /// Waits until the shell reads input: a marker it echoes back.
    async fn wait_ready(&mut self, client: &common::Client) {
        self.type_text(client, b"echo rea''dy\n").await;
        self.wait_for("ready", 0).await;
    }

    async fn type_text(&self, client: &common::Client, text: &[u8]) {
        client.call(rpc::SEND_INPUT, &json!({"process": {"pid": self.pid}, "input": {"pty": b64(text)}})).await;
    }

    /// Reads until the screen contains `needle` (counting from `from`).
    async fn wait_for(&mut self, needle: &str, from: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = String::from_utf8_lossy(&self.screen[from.min(self.screen.len())..]).into_owned();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "'{needle}' never appeared; screen:\n{text}");
            let Ok(event) = tokio::time::timeout(Duration::from_secs(20), self.stream.next_event()).await else {
                panic!(
                    "no terminal output for 20 s waiting for '{needle}'; {}\nscreen:\n{text}",
                    session_report(self.pid)
                );
            };
            match event {
                ProcEvent::Pty(data) => self.screen.extend_from_slice(&data),
                ProcEvent::Keepalive => {}
                ProcEvent::End(end) => {
                    self.end = Some(end);
                    panic!(
                        "the terminal ended while waiting for '{needle}': {}",
                        String::from_utf8_lossy(&self.screen)
                    );
                }
                other => panic!("unexpected event on a terminal: {other:?}"),
            }
        }
    }

    /// Waits until `command` runs in the terminal's foreground process
    /// group: a Ctrl-C typed earlier would reach the shell instead.
    async fn wait_foreground(&self, command: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !session_processes(self.pid).iter().any(|p| p.cmd == command && p.pgrp == p.foreground) {
            assert!(Instant::now() < deadline, "'{command}' never ran in the foreground; {}", session_report(self.pid));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn until_end(&mut self) -> Value {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.stream.next_event()).await.expect("end event") {
                ProcEvent::Pty(data) => self.screen.extend_from_slice(&data),
                ProcEvent::Keepalive => {}
                ProcEvent::End(end) => return end,
                other => panic!("unexpected event: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_terminal_session_end_to_end() {
    let user = test_user();
    let envd = Envd::start();
    let client = envd.client();
    let mut session = Session::open(&client, 80, 24, &[("Authorization", &common::basic(&user.name))]).await;
    session.wait_ready(&client).await;

    let mark = session.screen.len();
    session.type_text(&client, b"tty; stty size; echo $TERM $LANG $LC_ALL; echo who=$(whoami)\n").await;
    // The typed line shows `who=$(whoami)`; only the output has the name.
    let shown = session.wait_for(&format!("who={}", user.name), mark).await;
    assert!(shown.contains("/dev/pts/"), "tty is a pseudo-terminal: {shown}");
    assert!(shown.contains("24 80"), "stty size is the requested size: {shown}");
    assert!(shown.contains("xterm-256color C.UTF-8 C.UTF-8"), "{shown}");

    client
        .call(rpc::UPDATE, &json!({"process": {"pid": session.pid}, "pty": {"size": {"cols": 120, "rows": 40}}}))
        .await;
    let mark = session.screen.len();
    session.type_text(&client, b"stty size\n").await;
    session.wait_for("40 120", mark).await;

    // Ctrl-C stops the foreground job within a second. The quotes keep
    // the terminal's echo of a typed line from matching its output.
    let mark = session.screen.len();
    session.type_text(&client, b"sleep 100; echo after-sleep\n").await;
    session.wait_foreground("sleep 100").await;
    let interrupted = Instant::now();
    session.type_text(&client, b"\x03").await;
    session.type_text(&client, b"echo interrupted-''ok\n").await;
    let shown = session.wait_for("interrupted-ok", mark).await;
    assert!(interrupted.elapsed() < Duration::from_secs(2), "Ctrl-C took {:?}", interrupted.elapsed());
    assert!(!shown.contains("\nafter-sleep"), "the job was interrupted, not finished: {shown}");

    // Job control: a background job comes back with fg.
    let mark = session.screen.len();
    session.type_text(&client, b"sleep 30 &\njobs\n").await;
    session.wait_for("Running", mark).await;
    session.type_text(&client, b"fg\n").await;
    session.wait_foreground("sleep 30").await;
    session.type_text(&client, b"\x03echo fg-''ok\n").await;
    session.wait_for("fg-ok", mark).await;

    let listed = client.list().await;
    assert!(listed.contains_key(&session.pid), "List shows the terminal");

    session.type_text(&client, b"exit 3\n").await;
    let end = session.until_end().await;
    assert_eq!(end["exitCode"], 3, "{end}");
    assert_eq!(end["status"], "exit status 3");
}

#[tokio::test]
async fn a_second_client_attaches_and_ctrl_d_ends_the_shell() {
    let envd = Envd::start();
    let client = envd.client();
    let mut first = Session::open(&client, 80, 24, &[]).await;
    first.wait_ready(&client).await;
    let mut second = client.stream(rpc::CONNECT, &json!({"process": {"pid": first.pid}}), &[]).await;
    assert_eq!(second.next_event().await, ProcEvent::Start(first.pid));
    first.type_text(&client, b"echo from-first\n").await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("from-first\r\n") {
        match second.next_event().await {
            ProcEvent::Pty(data) => seen.extend_from_slice(&data),
            ProcEvent::Keepalive => {}
            other => panic!("unexpected event on the second stream: {other:?}"),
        }
    }
    // Ctrl-D at an empty prompt ends the shell (once readline is back).
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.type_text(&client, b"\x04").await;
    let end = first.until_end().await;
    assert_eq!(end["exited"], true, "{end}");
}

#[tokio::test]
async fn terminal_misuse_is_refused_clearly() {
    let envd = Envd::start();
    let client = envd.client();
    let (status, err) = client
        .call_err(rpc::UPDATE, &json!({"process": {"pid": 999_999}, "pty": {"size": {"cols": 10, "rows": 10}}}))
        .await;
    assert_eq!((status.as_u16(), err.code.as_str()), (404, "not_found"));

    let mut session = Session::open(&client, 80, 24, &[]).await;
    let (_, err) = client
        .call_err(rpc::UPDATE, &json!({"process": {"pid": session.pid}, "pty": {"size": {"cols": 0, "rows": 10}}}))
        .await;
    assert_eq!(err.code, "invalid_argument");
    assert!(err.message.contains("rows and cols"), "{}", err.message);
    let (_, err) = client
        .call_err(rpc::SEND_INPUT, &json!({"process": {"pid": session.pid}, "input": {"stdin": b64(b"x")}}))
        .await;
    assert_eq!(err.code, "internal");
    let (_, err) = client.call_err(rpc::CLOSE_STDIN, &json!({"process": {"pid": session.pid}})).await;
    assert_eq!(err.code, "unknown");

    let started = client.stream(rpc::START, &json!({"process": {"cmd": "true"}}), &[]).await.collect().await;
    let (_, err) = client
        .call_err(rpc::UPDATE, &json!({"process": {"pid": started.pid()}, "pty": {"size": {"cols": 10, "rows": 10}}}))
        .await;
    assert_eq!(err.code, "not_found", "an ended process");

    client.kill(session.pid).await;
    let end = session.until_end().await;
    assert_eq!(end["status"], "signal: killed");
    let (_, err) =
        client.call_err(rpc::SEND_INPUT, &json!({"process": {"pid": session.pid}, "input": {"pty": b64(b"x")}})).await;
    assert_eq!(err.code, "not_found", "input to an ended process");
}

/// A process of a terminal's session, as `/proc/<pid>/stat` shows it.
struct SessionProcess {
    pid: u32,
    state: String,
    pgrp: String,
    /// The terminal's foreground process group.
    foreground: String,
    cmd: String,
}

fn session_processes(sid: u32) -> Vec<SessionProcess> {
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    pids.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = common::proc_stat(pid)?;
            (stat[3] == sid.to_string()).then_some(())?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).trim_end_matches('\0').replace('\0', " ");
            Some(SessionProcess {
                pid,
                state: stat[0].clone(),
                pgrp: stat[2].clone(),
                foreground: stat[5].clone(),
                cmd,
            })
        })
        .collect()
}

/// What the terminal's session runs, for a failure message.
fn session_report(sid: u32) -> String {
    let mut lines = vec![format!("session {sid}:")];
    for p in session_processes(sid) {
        let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", p.pid)).unwrap_or_default();
        lines
            .push(format!("  {} {} pgrp={} foreground={} in {wchan}: {}", p.pid, p.state, p.pgrp, p.foreground, p.cmd));
    }
    lines.join("\n")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn zombie_children(pid: u32) -> usize {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).filter(|c| !common::pid_alive(*c)).count()
}

#[tokio::test]
async fn two_hundred_terminals_leak_no_fds_or_zombies() {
    let envd = Envd::start();
    let client = envd.client();
    // Warm up the connection pool and the runtime before counting.
    client.run(&json!({"process": {"cmd": "true"}}), &[]).await;
    let before = open_fds(envd.pid());
    for _ in 0..200 {
        let start = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "printf done"]}, "pty": {"size": {"cols": 40, "rows": 10}}});
        let run = client.run(&start, &[]).await;
        assert!(String::from_utf8_lossy(&run.pty).contains("done"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = open_fds(envd.pid());
    assert!(after <= before + 4, "fds grew from {before} to {after} over 200 terminals");
    assert_eq!(zombie_children(envd.pid()), 0, "zombies left behind");
}

/// A command may close every descriptor of its terminal and open it again
/// later (`/dev/tty`): in between, the terminal reports every slave closed,
/// yet what the command writes afterwards is its output too.
#[tokio::test]
async fn output_after_the_terminal_was_closed_and_reopened_is_delivered() {
    let envd = Envd::start();
    let client = envd.client();
    let script = "echo before; exec 0<&- 1>&- 2>&-; sleep 0.5; echo after-reopen > /dev/tty; exit 4";
    for round in 0..5 {
        let start = json!({
            "process": {"cmd": "/bin/bash", "args": ["-c", script]},
            "pty": {"size": {"cols": 80, "rows": 24}}
        });
        let run = client.run(&start, &[]).await;
        let shown = String::from_utf8_lossy(&run.pty).into_owned();
        assert!(shown.contains("before"), "round {round}: {shown:?}");
        assert!(shown.contains("after-reopen"), "round {round}: the output after the reopen was lost: {shown:?}");
        assert_eq!(run.exit_code(), 4, "round {round}");
    }
    assert!(envd.stderr().contains("reading on"), "the early hangup report is logged: {}", envd.stderr());
}
