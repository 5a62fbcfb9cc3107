//! Live upgrade with the real binary: the same envd process execs a new
//! image, which takes over processes (pipes and terminals, root and a
//! non-root user), their output and exit codes, the listener, the token
//! and the workload freeze; failed upgrades leave the old envd serving; a
//! handover that cannot be read makes envd start clean and say so.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::cgroup::TestCgroup;
use common::{Client, Envd, ProcEvent, Scratch, bash, full, rpc, test_user};
use http::Method;
use http_body_util::BodyExt;
use serde_json::{Value, json};

const TOKEN: &str = "upgrade-token-0123456789abcdef";
const UPGRADES: usize = 20;

/// An envd whose upgrades go to a scratch path, with real workload cgroups.
struct Upgradable {
    envd: Envd,
    scratch: Scratch,
    _cgroup: TestCgroup,
}

impl Upgradable {
    async fn start(name: &str) -> Upgradable {
        Upgradable::start_with(name, &[]).await
    }

    async fn start_with(name: &str, args: &[&str]) -> Upgradable {
        let scratch = Scratch::new(name);
        let cgroup = TestCgroup::new(name);
        let envd = Envd::options()
            .args(["--upgrade-path", &scratch.s("envd.next"), "--run-dir", &scratch.s("run")])
            .args(["--cgroup-root", cgroup.0.to_str().unwrap()])
            .args(args.iter().copied())
            .start();
        let reply = envd.client().post_json("/init", &json!({"accessToken": TOKEN})).await;
        assert_eq!(reply.status, 204, "{}", reply.text());
        Upgradable { envd, scratch, _cgroup: cgroup }
    }

    /// A fresh client (no pooled connection from before an exec).
    fn client(&self) -> Client {
        self.envd.client().with_header("x-access-token", TOKEN)
    }

    fn target(&self) -> String {
        self.scratch.s("envd.next")
    }

    /// Asks for an upgrade; `Ok` with the reply if envd answered (refused),
    /// `Err` if the connection dropped (it exec'd).
    async fn upgrade(&self, binary: Bytes) -> Result<common::Reply, String> {
        let target = self.target();
        self.client().try_send(Method::POST, "/upgrade", &[("x-envd-upgrade-bin", &target)], full(binary)).await
    }

    /// Upgrades, then `/init`s; returns the `X-Envd-Handover` report.
    async fn upgrade_and_init(&self, binary: Bytes) -> Value {
        let pid = self.envd.pid();
        if let Ok(reply) = self.upgrade(binary).await {
            panic!("the upgrade was refused: {} {}\n{}", reply.status, reply.text(), self.envd.stderr());
        }
        assert!(common::pid_alive(pid), "envd is still the same process");
        let frozen = std::fs::read_to_string(self._cgroup.0.join("user/cgroup.freeze")).unwrap();
        assert_eq!(frozen.trim(), "1", "the workload stays frozen until /init");
        let init = self.client().post_json("/init", &json!({"accessToken": TOKEN})).await;
        assert_eq!(init.status, 204, "{}", init.text());
        let report: Value = serde_json::from_str(init.header("x-envd-handover"))
            .unwrap_or_else(|_| panic!("no handover report: {:?}\n{}", init.headers, self.envd.stderr()));
        assert_eq!(report["failed"], false, "{report}\n{}", self.envd.stderr());
        let frozen = std::fs::read_to_string(self._cgroup.0.join("user/cgroup.freeze")).unwrap();
        assert_eq!(frozen.trim(), "0", "/init thaws the workload");
        assert!(self.scratch.names("run").is_empty(), "the handover file is removed once read");
        report
    }
}

fn script(text: &str) -> Value {
    json!({"cmd": "/bin/bash", "args": ["-c", text]})
}

fn own_binary() -> Bytes {
    Bytes::from(std::fs::read(Envd::binary()).unwrap())
}

async fn start(client: &Client, request: Value) -> u32 {
    let mut stream = client.stream(rpc::START, &request, &[]).await;
    match stream.next_event().await {
        ProcEvent::Start(pid) => pid,
        other => panic!("expected the start event, got {other:?}"),
    }
}

/// A `Connect` stream, from its start event on.
async fn connect(client: &Client, pid: u32) -> common::ConnectStream {
    client.stream(rpc::CONNECT, &json!({"process": {"pid": pid}}), &[]).await
}

/// Reads numbered lines (`<prefix> N`) until `count` complete ones arrived;
/// returns their numbers. A first line cut in two is skipped.
async fn numbered_lines(stream: &mut common::ConnectStream, prefix: &str, count: usize) -> Vec<u64> {
    let mut text = String::new();
    loop {
        match stream.next_event().await {
            ProcEvent::Stdout(data) | ProcEvent::Pty(data) => text.push_str(&String::from_utf8_lossy(&data)),
            ProcEvent::Keepalive | ProcEvent::Start(_) => continue,
            other => panic!("the counter stopped: {other:?}"),
        }
        let complete: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).collect();
        let numbers: Vec<u64> = complete
            .iter()
            .filter_map(|l| l.trim_end_matches(['\r', '\n']).strip_prefix(prefix))
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        if numbers.len() > count {
            return numbers;
        }
    }
}

fn assert_no_gap(numbers: &[u64], what: &str) {
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: a gap in the numbered lines: {numbers:?}");
    }
}

#[tokio::test]
async fn processes_survive_twenty_upgrades_with_their_output_and_exit_codes() {
    let user = test_user();
    let daemon = Upgradable::start("upgrade-many").await;
    let client = daemon.client();
    let counter = start(
        &client,
        json!({"process": {"cmd": "/bin/bash", "args": ["-c", "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.005; done"],
            "envs": {"COUNTER_MODE": "fast"}}, "tag": "counter", "stdin": false}),
    )
    .await;
    let as_user = client.clone().with_user(&user.name);
    let reader = start(&as_user, json!({"process": script("read x; echo got:$x; exit 7"), "stdin": true})).await;
    let terminal = start(
        &as_user,
        json!({"process": {"cmd": "/bin/bash", "args": ["--norc", "-i"]}, "pty": {"size": {"cols": 80, "rows": 24}}}),
    )
    .await;
    let ticker = start(
        &client,
        json!({"process": script("i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.02; done"),
            "pty": {"size": {"cols": 100, "rows": 30}}}),
    )
    .await;
    let before = client.list().await;
    let binary = own_binary();
    let watched = daemon.scratch.path("watched");
    std::fs::create_dir_all(&watched).unwrap();
    let watcher = client.call(common::fs_rpc::CREATE_WATCHER, &json!({"path": watched.to_str().unwrap()})).await;
    let watcher_id = watcher["watcherId"].as_str().unwrap().to_owned();
    std::fs::write(watched.join("before-upgrade"), "x").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    for round in 0..UPGRADES {
        // A process that ends around the swap: its exit code must not be lost.
        let code = 10 + round as i64;
        let short = start(&client, bash(&format!("sleep 0.05; exit {code}"))).await;
        let body = if round % 5 == 0 { binary.clone() } else { Bytes::new() };
        let report = daemon.upgrade_and_init(body).await;
        assert!(report["procs"].as_u64().unwrap() >= 4, "round {round}: {report}");
        assert_eq!(report["procs_failed"], 0, "round {round}: {report}");

        let client = daemon.client();
        let ended = connect(&client, short).await.collect().await;
        assert_eq!(ended.exit_code(), code, "round {round}: the short process's exit code");

        let mut stream = connect(&client, counter).await;
        let numbers = numbered_lines(&mut stream, "line ", 20).await;
        assert_no_gap(&numbers, &format!("round {round}, counter"));
        let mut stream = connect(&client, ticker).await;
        let numbers = numbered_lines(&mut stream, "tick ", 5).await;
        assert_no_gap(&numbers, &format!("round {round}, terminal ticker"));
    }

    std::fs::write(watched.join("after-upgrades"), "x").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let polled = daemon.client().call(common::fs_rpc::GET_WATCHER_EVENTS, &json!({"watcherId": watcher_id})).await;
    let names: Vec<&str> = polled["events"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(names.contains(&"before-upgrade"), "the queued event survived: {polled}");
    assert!(names.contains(&"after-upgrades"), "the watcher is armed again: {polled}");

    // No fd of the handover reaches a process started afterwards.
    for client in [daemon.client(), daemon.client().with_user(&user.name)] {
        let run = client.run(&bash("ls /proc/self/fd | sort -n | tr '\n' ' '"), &[]).await;
        assert_eq!(run.stdout_str(), "0 1 2 3 ", "fds of a new process");
    }
    let log = daemon.envd.stderr();
    assert!(!log.contains(TOKEN), "the token is never logged");
    let took_over = || daemon.envd.stderr().matches("took over the running workload").count() == UPGRADES;
    assert!(common::eventually(Duration::from_secs(10), took_over).await, "{log}");
    let client = daemon.client();
    let after = client.list().await;
    for pid in [counter, reader, terminal, ticker] {
        assert_eq!(after[&pid]["config"], before[&pid]["config"], "process {pid} is listed the same");
        assert_eq!(after[&pid]["tag"], before[&pid]["tag"]);
    }
    assert_eq!(after[&counter]["config"]["envs"]["COUNTER_MODE"], "fast");

    // The reader was blocked on stdin all along; its pipe still works.
    let stream = connect(&client, reader).await;
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": reader}, "input": {"stdin": "aGVsbG8K"}})).await;
    let run = stream.collect().await;
    assert_eq!(run.stdout_str(), "got:hello\n");
    assert_eq!(run.exit_code(), 7);

    // The terminal keeps its master: resize, type, exit.
    client.call(rpc::UPDATE, &json!({"process": {"pid": terminal}, "pty": {"size": {"cols": 120, "rows": 40}}})).await;
    let stream = connect(&client, terminal).await;
    let keys = base64_of("stty size; echo marker-$((6*7)); exit 9\n");
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": terminal}, "input": {"pty": keys}})).await;
    let run = stream.collect().await;
    let typed = String::from_utf8_lossy(&run.pty).into_owned();
    let ending = format!("end {:?}, error {:?}, events {:?}", run.end, run.error, run.events);
    assert!(typed.contains("40 120"), "the terminal size: {typed}; {ending}");
    assert!(typed.contains("marker-42"), "{typed}; {ending}");
    assert_eq!(run.exit_code(), 9);

    for pid in [counter, ticker] {
        let stream = connect(&client, pid).await;
        client.kill(pid).await;
        let end = stream.collect().await;
        assert_eq!(end.end()["status"], "signal: killed");
    }
}

#[tokio::test]
async fn without_an_init_after_the_upgrade_the_workload_is_thawed_after_the_fallback_time() {
    let daemon = Upgradable::start_with("upgrade-fallback", &["--upgrade-thaw-fallback", "5"]).await;
    let client = daemon.client();
    let sleeper = start(&client, json!({"process": {"cmd": "/bin/sleep", "args": ["600"]}, "stdin": false})).await;
    assert!(daemon.upgrade(Bytes::new()).await.is_err(), "envd exec'd");
    let freeze = daemon._cgroup.0.join("user/cgroup.freeze");
    let reads = |value: &str| std::fs::read_to_string(&freeze).is_ok_and(|v| v.trim() == value);
    assert!(reads("1"), "frozen across the swap");
    assert!(common::eventually(Duration::from_secs(30), || reads("0")).await, "thawed by the fallback");
    let logged =
        common::eventually(Duration::from_secs(10), || daemon.envd.stderr().contains("no /init since the upgrade"));
    assert!(logged.await, "{}", daemon.envd.stderr());
    let client = daemon.client();
    assert!(client.list().await.contains_key(&sleeper));
    let reply = client.try_send(Method::POST, "/upgrade", &[], full("")).await.unwrap();
    assert_eq!(reply.status, 409, "no second upgrade before an /init reached the new image");
    client.kill(sleeper).await;
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn a_refused_binary_leaves_the_old_envd_serving_and_the_workload_running() {
    let daemon = Upgradable::start("upgrade-refused").await;
    let client = daemon.client();
    let sleeper = start(&client, json!({"process": {"cmd": "/bin/sleep", "args": ["600"]}, "stdin": false})).await;
    let false_binary = Bytes::from(std::fs::read("/bin/false").unwrap());
    let true_binary = Bytes::from(std::fs::read("/bin/true").unwrap());
    let cases = [
        ("not an executable", Bytes::from_static(b"#!/bin/sh\necho 1.0\n")),
        ("exits non-zero on --version", false_binary),
        ("answers --version but takes no handover over", true_binary),
    ];
    for (what, body) in cases {
        let reply = daemon.upgrade(body).await.unwrap_or_else(|e| panic!("{what}: envd exec'd: {e}"));
        assert_eq!(reply.status, 400, "{what}: {}", reply.text());
        assert!(reply.text().contains("refused"), "{what}: {}", reply.text());
        let client = daemon.client();
        assert_eq!(client.get("/health").await.status, 204);
        assert!(client.list().await.contains_key(&sleeper), "{what}: the process is still there");
        let frozen = std::fs::read_to_string(daemon._cgroup.0.join("user/cgroup.freeze")).unwrap();
        assert_eq!(frozen.trim(), "0", "{what}: the workload is not left frozen");
    }
    let other_target = [("x-envd-upgrade-bin", "/usr/bin/something-else")];
    let reply = client.try_send(Method::POST, "/upgrade", &other_target, full("")).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    client.kill(sleeper).await;
}

#[tokio::test]
async fn upgrade_is_refused_before_the_first_init_and_without_the_token() {
    let scratch = Scratch::new("upgrade-early");
    let envd = Envd::options().args(["--upgrade-path", &scratch.s("envd.next"), "--no-cgroups"]).start();
    let reply = envd.client().try_send(Method::POST, "/upgrade", &[], full("")).await.unwrap();
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert_eq!(envd.client().post_json("/init", &json!({"accessToken": TOKEN})).await.status, 204);
    let reply = envd.client().try_send(Method::POST, "/upgrade", &[], full("")).await.unwrap();
    assert_eq!(reply.status, 401, "{}", reply.text());
}

#[tokio::test]
async fn a_freeze_during_an_upgrade_gets_503() {
    let daemon = Upgradable::start("upgrade-freeze").await;
    // The upgrade holds the freeze lock while the binary arrives: send half
    // of it, freeze, then finish with something that is refused.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Box<dyn std::error::Error + Send + Sync>>(http_body::Frame::data(b)), rx))
    });
    let body = http_body_util::StreamBody::new(stream).boxed();
    let client = daemon.client();
    let target = daemon.target();
    let upgrade = tokio::spawn(async move {
        client.try_send(Method::POST, "/upgrade", &[("x-envd-upgrade-bin", &target)], body).await
    });
    tx.send(Bytes::from_static(b"not an elf, ")).await.unwrap();
    let arrived = PathBuf::from(daemon.target());
    assert!(common::eventually(Duration::from_secs(10), || arrived.exists()).await, "the upgrade began");
    let freeze = daemon.client().send(Method::POST, "/freeze?maxWaitMs=200", &[], "").await;
    assert_eq!(freeze.status, 503, "{}", freeze.text());
    assert!(freeze.body.is_empty());
    tx.send(Bytes::from_static(b"the rest")).await.unwrap();
    drop(tx);
    let reply = upgrade.await.unwrap().expect("refused, not exec'd");
    assert_eq!(reply.status, 400, "{}", reply.text());
    let freeze = daemon.client().send(Method::POST, "/freeze?maxWaitMs=200", &[], "").await;
    assert_eq!(freeze.status, 200, "{}", freeze.text());
    assert_eq!(daemon.client().send(Method::POST, "/unfreeze", &[], "").await.status, 204);
}

/// Starts envd on a handover file the test wrote.
async fn start_on_handover(name: &str, content: &[u8]) -> (Envd, Value, PathBuf, Scratch) {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new(name);
    let file = scratch.path("handover.json");
    std::fs::write(&file, content).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let envd = Envd::options().args(["--no-cgroups", "--handover", file.to_str().unwrap()]).start();
    let init = envd.client().post_json("/init", &json!({})).await;
    assert_eq!(init.status, 204);
    let report: Value = serde_json::from_str(init.header("x-envd-handover")).expect("a handover report");
    (envd, report, file, scratch)
}

#[tokio::test]
async fn an_unreadable_handover_makes_envd_start_clean_and_report_it() {
    let newer = json!({"format": "envd-handover", "version": 99, "fromVersion": "9.9.9"}).to_string();
    let unknown_section = json!({"format": "envd-handover", "version": 1, "fromVersion": "0.7.0",
        "required": ["volumes-v7"], "secrets": {"fd": 3, "len": 0, "sha256": ""}})
    .to_string();
    let missing_fd = json!({"format": "envd-handover", "version": 1, "fromVersion": "0.7.0",
        "secrets": {"fd": 250, "len": 0, "sha256": ""}, "processes": []})
    .to_string();
    let cases: [(&str, &[u8], &str); 4] = [
        ("corrupt", b"{\"format\": \"envd-hand", "corrupt"),
        ("newer", newer.as_bytes(), "version 99"),
        ("unknown-section", unknown_section.as_bytes(), "volumes-v7"),
        ("missing-fd", missing_fd.as_bytes(), "not a carried fd"),
    ];
    for (name, content, reason) in cases {
        let (envd, report, file, _scratch) = start_on_handover(&format!("handover-{name}"), content).await;
        assert_eq!(report["failed"], true, "{name}: {report}");
        assert!(report["error"].as_str().unwrap().contains(reason), "{name}: {report}");
        assert_eq!(report["procs"], 0);
        assert!(!file.exists(), "{name}: the handover file is removed once read");
        let logged = common::eventually(Duration::from_secs(10), || envd.stderr().contains("starting clean")).await;
        assert!(logged, "{name}: reported in the log");
        let client = envd.client();
        assert!(client.list().await.is_empty());
        let run = client.run(&bash("echo fresh"), &[]).await;
        assert_eq!(run.stdout_str(), "fresh\n", "{name}: envd serves normally");
    }
}

/// The pid a script wrote to `file`, once it is there.
async fn pid_written_to(file: &std::path::Path) -> u32 {
    let mut pid = None;
    let written = common::eventually(Duration::from_secs(10), || {
        pid = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse().ok());
        pid.is_some()
    })
    .await;
    assert!(written, "no pid in {}", file.display());
    pid.unwrap_or_default()
}

#[tokio::test]
async fn an_adopted_command_is_killed_with_everything_it_started() {
    let daemon = Upgradable::start("upgrade-kill-tree").await;
    let client = daemon.client();
    let pid_file = daemon.scratch.path("escaped.pid");
    // The sleeper leaves the command's session and loses its parent: only
    // the command's own cgroup still knows it belongs to the command.
    let script = format!("(setsid sleep 600 & echo $! > {}); sleep 600", pid_file.display());
    let leader = start(&client, bash(&script)).await;
    let escaped = pid_written_to(&pid_file).await;
    let escaped_cgroup = std::fs::read_to_string(format!("/proc/{escaped}/cgroup")).unwrap();

    let report = daemon.upgrade_and_init(Bytes::new()).await;
    assert_eq!(report["procs"], 1, "{report}");
    let client = daemon.client();
    let later = client.run(&bash("cat /proc/self/cgroup"), &[]).await;
    assert_ne!(later.stdout_str(), escaped_cgroup, "a later command gets a cgroup of its own");

    client.kill(leader).await;
    let gone = common::eventually(Duration::from_secs(5), || !common::pid_alive(escaped)).await;
    if !gone {
        // SAFETY: kill(2) of the sleeper this test made, before failing.
        unsafe { libc::kill(escaped as libc::pid_t, libc::SIGKILL) };
    }
    assert!(gone, "the escaped sleeper of the killed command survived the kill\n{}", daemon.envd.stderr());
    assert!(!common::pid_alive(leader), "the command itself is gone");
}

#[tokio::test]
async fn adopted_processes_that_end_after_the_upgrade_keep_their_exit_codes() {
    let daemon = Upgradable::start("upgrade-reaper").await;
    let client = daemon.client();
    let mut ending = Vec::new();
    for code in 40..48 {
        ending.push((start(&client, bash(&format!("sleep 1; exit {code}"))).await, code));
    }
    let report = daemon.upgrade_and_init(Bytes::new()).await;
    assert_eq!(report["procs"], 8, "{report}");
    let client = daemon.client();
    // Orphans come and go meanwhile: each end wakes the orphan reaper, which
    // must leave the adopted processes to their own waiters.
    for _ in 0..20 {
        client.run(&bash("(sleep 0.05 &); true"), &[]).await;
    }
    for (pid, code) in ending {
        let ended = connect(&client, pid).await.collect().await;
        assert_eq!(ended.exit_code(), code, "pid {pid}: {:?}\n{}", ended.end(), daemon.envd.stderr());
    }
}

/// A server on `127.0.0.1` that answers every connection with `hello\n`.
fn hello_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut stream, b"hello\n");
        }
    });
    port
}

/// One connection to `addr`: `Ok` with the greeting, or how it failed.
fn greeting(addr: std::net::SocketAddr) -> Result<(), std::io::Error> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply)?;
    if reply == "hello\n" { Ok(()) } else { Err(std::io::Error::other(format!("got {reply:?}"))) }
}

#[tokio::test]
async fn a_forwarded_port_is_never_refused_during_an_upgrade() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let forward_address = "127.0.13.1";
    let daemon = Upgradable::start_with("upgrade-forward", &["--forward-address", forward_address]).await;
    let port = hello_server();
    let forwarded: std::net::SocketAddr = format!("{forward_address}:{port}").parse().unwrap();
    let reachable = common::eventually(Duration::from_secs(10), || greeting(forwarded).is_ok()).await;
    assert!(reachable, "the loopback server is forwarded\n{}", daemon.envd.stderr());

    // Connections keep coming while envd swaps its image: they queue on the
    // handed-over socket instead of being refused.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut answered, mut refused, mut other) = (0, 0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match greeting(forwarded) {
                    Ok(()) => answered += 1,
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(err) => other.push(err.to_string()),
                }
            }
            (answered, refused, other)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = daemon.upgrade_and_init(Bytes::new()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (answered, refused, other) = hammer.join().unwrap();
    assert_eq!(refused, 0, "connections refused during the upgrade ({answered} answered)");
    assert!(report["forwards"].as_u64() >= Some(1), "{report}");
    // One being relayed at the very moment of the exec may end with it.
    assert!(other.len() <= 1, "failed connections: {other:?}");
    assert!(answered > 10, "{answered} answered");
    assert!(greeting(forwarded).is_ok(), "forwarded after the upgrade");
    assert!(daemon.envd.stderr().contains("forwarding port (handed over)"), "{}", daemon.envd.stderr());
}

/// A server on `127.0.0.1` that echoes every connection until its EOF.
fn echo_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

#[tokio::test]
async fn a_forwarded_connection_carries_on_across_an_upgrade() {
    use sha2::{Digest, Sha256};
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 256;
    let forward_address = "127.0.13.2";
    let daemon = Upgradable::start_with("upgrade-relay", &["--forward-address", forward_address]).await;
    let port = echo_server();
    let forwarded: std::net::SocketAddr = format!("{forward_address}:{port}").parse().unwrap();
    let reachable =
        common::eventually(Duration::from_secs(10), || std::net::TcpStream::connect(forwarded).is_ok()).await;
    assert!(reachable, "the echo server is forwarded\n{}", daemon.envd.stderr());

    // 16 MiB through the forward, echoed back, spread over about a second
    // so that the upgrade happens in the middle of it.
    let connection = std::net::TcpStream::connect(forwarded).unwrap();
    connection.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut sending = connection.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut sent = Sha256::new();
        for i in 0..CHUNKS {
            let chunk: Vec<u8> = (0..CHUNK).map(|j| (i * 31 + j * 7) as u8).collect();
            std::io::Write::write_all(&mut sending, &chunk).expect("sending through the forward");
            sent.update(&chunk);
            std::thread::sleep(Duration::from_millis(4));
        }
        sending.shutdown(std::net::Shutdown::Write).unwrap();
        sent.finalize()
    });
    let mut receiving = connection;
    let reader = std::thread::spawn(move || {
        let (mut received, mut len, mut buf) = (Sha256::new(), 0usize, vec![0u8; CHUNK]);
        loop {
            match std::io::Read::read(&mut receiving, &mut buf) {
                Ok(0) => return Ok((received.finalize(), len)),
                Ok(n) => {
                    received.update(&buf[..n]);
                    len += n;
                }
                Err(err) => return Err(format!("after {len} bytes: {err}")),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    let report = daemon.upgrade_and_init(Bytes::new()).await;
    let sent = writer.join().unwrap();
    let received = reader.join().unwrap();
    let (received, len) = received.unwrap_or_else(|e| panic!("the relayed connection broke {e}\n{report}"));
    assert_eq!(len, CHUNK * CHUNKS, "every byte came back");
    assert_eq!(received, sent, "in order and intact");
    assert!(report["relays"].as_u64() >= Some(1), "{report}");
}

#[tokio::test]
async fn an_adopted_process_that_ends_before_anyone_reconnects_still_delivers_its_output() {
    let daemon = Upgradable::start("upgrade-last-words").await;
    let client = daemon.client();
    // Nobody is attached (the start stream is dropped) when it writes.
    let pid = start(&client, bash("sleep 0.6; echo last words; exit 3")).await;
    daemon.upgrade_and_init(Bytes::new()).await;
    assert!(common::eventually(Duration::from_secs(10), || !common::pid_alive(pid)).await, "it ends");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = daemon.client();
    let run = connect(&client, pid).await.collect().await;
    assert_eq!(run.stdout_str(), "last words\n", "the output kept for the first client");
    assert_eq!(run.exit_code(), 3);
    let again = connect(&client, pid).await.collect().await;
    assert_eq!((again.stdout_str(), again.exit_code()), (String::new(), 3), "a later client gets the end only");
}

/// `sleep 600` with exactly `pid`: the kernel's next pid is set through
/// `ns_last_pid` (root), retried while other processes take it first.
/// A `sleep` with pid `pid`; `own_group`: leading a process group of its
/// own (so its group id is that number too, as a shell's jobs are).
fn sleeper_with_pid(pid: u32, own_group: bool) -> std::process::Child {
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut sleep = std::process::Command::new("sleep");
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut sleep, 0);
        }
        let mut child = sleep.arg("600").spawn().unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("pid {pid} could not be taken");
}

/// A command whose own process has ended and been reaped while a child
/// that left its session keeps its output open (so the command is still
/// listed, and its pid is free for anyone); the command's pid and the
/// child's.
async fn command_outliving_its_leader(client: &Client, scratch: &Scratch) -> (u32, u32) {
    let pid_file = scratch.path("escaped.pid");
    let leader = start(client, bash(&format!("setsid sleep 600 & echo $! > {}; exit 0", pid_file.display()))).await;
    let escaped = pid_written_to(&pid_file).await;
    let reaped =
        common::eventually(Duration::from_secs(10), || !std::path::Path::new(&format!("/proc/{leader}")).exists())
            .await;
    assert!(reaped, "the command's own process is reaped");
    assert!(client.list().await.contains_key(&leader), "the command is still listed");
    (leader, escaped)
}

/// SIGKILL to `leader` through envd must not reach `victim`, which now has
/// the leader's pid.
async fn kill_spares(client: &Client, leader: u32, mut victim: std::process::Child) {
    client.kill(leader).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let survived = matches!(victim.try_wait(), Ok(None));
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(survived, "envd signalled an unrelated process that reused its command's pid");
}

#[tokio::test]
async fn a_reaped_commands_pid_taken_by_another_process_is_never_signalled() {
    // After an upgrade: the adopted command's pid is free when it is adopted.
    let daemon = Upgradable::start("upgrade-pid-reuse").await;
    let (leader, _) = command_outliving_its_leader(&daemon.client(), &daemon.scratch).await;
    daemon.upgrade_and_init(Bytes::new()).await;
    let victim = sleeper_with_pid(leader, false);
    kill_spares(&daemon.client(), leader, victim).await;

    // Without cgroups (the kill walks /proc), no upgrade needed.
    let scratch = Scratch::new("pid-reuse-walk");
    let envd = Envd::options().args(["--no-cgroups"]).start();
    let client = envd.client();
    let (leader, escaped) = command_outliving_its_leader(&client, &scratch).await;
    let victim = sleeper_with_pid(leader, false);
    kill_spares(&client, leader, victim).await;
    // The pid taken by a process that leads a group of its own (a shell's
    // job): the walk must not take that group for the command's.
    let (leader, escaped_too) = command_outliving_its_leader(&client, &scratch).await;
    let victim = sleeper_with_pid(leader, true);
    kill_spares(&client, leader, victim).await;
    // SAFETY: kill(2) of the sleeper this test's second command left behind.
    unsafe { libc::kill(escaped_too as libc::pid_t, libc::SIGKILL) };
    // SAFETY: kill(2) of the sleeper this test's command left behind.
    unsafe { libc::kill(escaped as libc::pid_t, libc::SIGKILL) };
}

#[tokio::test]
async fn a_client_that_stopped_reading_does_not_hold_up_an_upgrade() {
    let daemon = Upgradable::start("upgrade-stalled-reader").await;
    let client = daemon.client();
    let flood = start(&client, bash("while :; do echo 0123456789abcdefghijklmnopqrstuvwxyz; done")).await;
    // Attached, and never read: the pump fills the stream's buffers and waits.
    let stalled = connect(&client, flood).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let report = daemon.upgrade_and_init(Bytes::new()).await;
    assert_eq!(report["procs"], 1, "{report}");
    drop(stalled);
    let mut stream = connect(&daemon.client(), flood).await;
    let output = loop {
        match stream.next_event().await {
            ProcEvent::Stdout(data) => break data,
            ProcEvent::Start(_) | ProcEvent::Keepalive => continue,
            other => panic!("its output stopped after the upgrade: {other:?}"),
        }
    };
    assert!(String::from_utf8_lossy(&output).contains("0123456789abcdefghijklmnopqrstuvwxyz"));
    daemon.client().kill(flood).await;
}

/// `GET /health` over a fresh connection: `Ok` on a 204.
fn health_over_a_new_connection(port: u16) -> Result<(), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut stream, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).map_err(|e| e.to_string())?;
    if reply.starts_with("HTTP/1.1 204") { Ok(()) } else { Err(format!("reply {reply:?}")) }
}

#[tokio::test]
async fn connections_made_during_an_upgrade_are_served_by_the_new_image() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let daemon = Upgradable::start("upgrade-intake").await;
    let port = daemon.envd.port();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut served, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match health_over_a_new_connection(port) {
                    Ok(()) => served += 1,
                    Err(err) => failed.push(err),
                }
            }
            (served, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        daemon.upgrade_and_init(Bytes::new()).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let (served, failed) = hammer.join().unwrap();
    assert!(failed.is_empty(), "{} of {} new connections failed: {failed:?}", failed.len(), served + failed.len());
    assert!(served > 30, "{served} served");
}
