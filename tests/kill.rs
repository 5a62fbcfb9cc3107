//! `SendSignal` ends a command's whole process tree: a background child, a
//! grandchild in a session of its own and a double-forked daemon holding a
//! TCP port are all gone when the answer comes, with cgroups (exact) and
//! without (best effort); nothing outside the command is touched, and no
//! per-command cgroup is left behind.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::TcpListener;

use base64::Engine;
use common::cgroup::TestCgroup;
use common::{Client, Envd, PATIENCE, ProcEvent, pid_alive, rpc, test_user};
use serde_json::{Value, json};

/// Starts a background child, a `setsid` grandchild and a finished double
/// fork, and, given a port, a double-forked daemon listening on it; prints
/// `name=pid=` for each, then waits.
fn tree_script(port: Option<u16>) -> String {
    let mut script = String::from(
        "sleep 1000 & echo \"child=$!=\"\n\
         setsid sleep 1000 & echo \"setsid=$!=\"\n\
         ( setsid sleep 1000 & echo \"double=$!=\" )\n",
    );
    if let Some(port) = port {
        script.push_str(&format!(
            "perl -MIO::Socket::INET -MPOSIX -e '$|=1; exit if fork; POSIX::setsid(); exit if fork; \
             my $s = IO::Socket::INET->new(LocalAddr => \"127.0.0.1\", LocalPort => {port}, Listen => 5, ReuseAddr => 1) \
             or die \"listen: $!\"; print \"daemon=$$=\\n\"; sleep 1000'\n"
        ));
    }
    script.push_str("echo \"leader=$$=\"\nsleep 1000\n");
    script
}

/// The command as the SDKs start it.
fn sdk_command(script: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", script]}, "stdin": false})
}

/// `name=pid=` pairs in `text`; an echoed `name=$!=` has no digits and is skipped.
fn parse_pids(text: &str) -> HashMap<String, u32> {
    let mut pids = HashMap::new();
    for piece in text.split(|c: char| c.is_whitespace() || c == '"') {
        let mut parts = piece.split('=');
        if let (Some(name), Some(pid), Some("")) = (parts.next(), parts.next(), parts.next())
            && let Ok(pid) = pid.parse::<u32>()
        {
            pids.insert(name.to_owned(), pid);
        }
    }
    pids
}

/// Starts `start` and reads its output until every name in `names` has a pid.
async fn start_tree(client: &Client, start: &Value, names: &[&str]) -> (u32, HashMap<String, u32>) {
    let mut stream = client.stream(rpc::START, start, &[]).await;
    let leader = match stream.next_event().await {
        ProcEvent::Start(pid) => pid,
        other => panic!("expected the start event, got {other:?}"),
    };
    let mut output = Vec::new();
    loop {
        let pids = parse_pids(&String::from_utf8_lossy(&output));
        if names.iter().all(|n| pids.contains_key(*n)) {
            // The stream is dropped: the tree does not depend on a reader.
            return (leader, pids);
        }
        match stream.next_event().await {
            ProcEvent::Stdout(data) | ProcEvent::Stderr(data) | ProcEvent::Pty(data) => output.extend(data),
            ProcEvent::Keepalive => {}
            other => panic!("the tree ended early: {other:?}; output: {}", String::from_utf8_lossy(&output)),
        }
    }
}

/// `kill -0 pid` fails: no process, not even a zombie.
fn gone(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn send_signal(client: &Client, pid: u32, signal: &str) -> common::Reply {
    let message = json!({"process": {"pid": pid}, "signal": signal});
    let reply = tokio::time::timeout(PATIENCE, client.unary(rpc::SEND_SIGNAL, &message, &[]))
        .await
        .expect("SendSignal answered");
    assert_eq!(reply.status, 200, "SendSignal: {}", reply.text());
    reply
}

async fn kill_tree_with_daemon(client: &Client) {
    let port = free_port();
    let names = ["child", "setsid", "double", "daemon", "leader"];
    let (leader, pids) = start_tree(client, &sdk_command(&tree_script(Some(port))), &names).await;
    assert!(TcpListener::bind(("127.0.0.1", port)).is_err(), "the daemon holds port {port}");
    let reply = send_signal(client, leader, "SIGNAL_SIGKILL").await;
    assert_eq!(reply.header("envd-kill-survivors"), "", "nothing survives SIGKILL");
    for (name, pid) in &pids {
        assert!(gone(*pid), "{name} (pid {pid}) is still there after the kill");
    }
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} is free again");
}

#[tokio::test]
async fn sigkill_ends_every_process_the_command_started_as_root_and_as_a_user() {
    let cgroup = TestCgroup::new("kill-tree");
    let envd = Envd::options().args(cgroup.args()).start();
    kill_tree_with_daemon(&envd.client()).await;
    let user = test_user();
    kill_tree_with_daemon(&envd.client().with_user(&user.name)).await;
    let client = envd.client();
    assert!(
        common::eventually(PATIENCE, || cgroup.command_cgroups("user").is_empty()).await,
        "command cgroups left: {:?}",
        cgroup.command_cgroups("user")
    );
    assert!(client.list().await.is_empty());
}

#[tokio::test]
async fn no_process_of_a_killed_tree_answers_kill_0_in_200_tries() {
    let cgroup = TestCgroup::new("kill-loop");
    let envd = Envd::options().args(cgroup.args()).start();
    let client = envd.client();
    let script = tree_script(None);
    for round in 0..200 {
        let names = ["child", "setsid", "double", "leader"];
        let (leader, pids) = start_tree(&client, &sdk_command(&script), &names).await;
        send_signal(&client, leader, "SIGNAL_SIGKILL").await;
        for (name, pid) in &pids {
            assert!(gone(*pid), "round {round}: {name} (pid {pid}) answers kill -0");
        }
    }
    assert!(
        common::eventually(PATIENCE, || cgroup.command_cgroups("user").is_empty()).await,
        "command cgroups left after 200 commands: {}",
        cgroup.command_cgroups("user").len()
    );
}

#[tokio::test]
async fn a_terminal_session_ends_with_its_background_jobs() {
    let cgroup = TestCgroup::new("kill-pty");
    let envd = Envd::options().args(cgroup.args()).start();
    let client = envd.client();
    let start = json!({
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm-256color"}},
        "pty": {"size": {"cols": 200, "rows": 40}}
    });
    let mut stream = client.stream(rpc::START, &start, &[]).await;
    let leader = match stream.next_event().await {
        ProcEvent::Start(pid) => pid,
        other => panic!("expected the start event, got {other:?}"),
    };
    let line = "sleep 1000 & echo \"job=$!=\"; ( setsid sleep 1000 & echo \"double=$!=\" ); \
                setsid sleep 1000 & echo \"setsid=$!=\"\n";
    let input = base64::engine::general_purpose::STANDARD.encode(line);
    client.call(rpc::SEND_INPUT, &json!({"process": {"pid": leader}, "input": {"pty": input}})).await;
    let mut screen = Vec::new();
    let pids = loop {
        let pids = parse_pids(&String::from_utf8_lossy(&screen));
        if ["job", "double", "setsid"].iter().all(|n| pids.contains_key(*n)) {
            break pids;
        }
        match stream.next_event().await {
            ProcEvent::Pty(data) => screen.extend(data),
            ProcEvent::Keepalive => {}
            other => panic!("the terminal ended early: {other:?}"),
        }
    };
    send_signal(&client, leader, "SIGNAL_SIGKILL").await;
    assert!(gone(leader), "the shell answers kill -0");
    for (name, pid) in &pids {
        assert!(gone(*pid), "{name} (pid {pid}) survived the terminal's kill");
    }
    assert!(
        common::eventually(PATIENCE, || cgroup.command_cgroups("ptys").is_empty()).await,
        "terminal cgroups left: {:?}",
        cgroup.command_cgroups("ptys")
    );
}

#[tokio::test]
async fn sigterm_on_a_tree_that_ignores_it_reports_the_survivors() {
    let cgroup = TestCgroup::new("kill-term");
    let envd = Envd::options().args(cgroup.args()).start();
    let client = envd.client();
    // An ignored signal stays ignored across fork and exec.
    let script = format!("trap '' TERM\n{}", tree_script(None));
    let names = ["child", "setsid", "double", "leader"];
    let (leader, pids) = start_tree(&client, &sdk_command(&script), &names).await;
    let reply = send_signal(&client, leader, "SIGNAL_SIGTERM").await;
    let mut survivors: Vec<u32> =
        reply.header("envd-kill-survivors").split(',').filter_map(|p| p.parse().ok()).collect();
    survivors.sort_unstable();
    let mut expected: Vec<u32> = pids.values().copied().collect();
    expected.sort_unstable();
    assert_eq!(survivors, expected, "the answer names every process still alive");
    assert!(pids.values().all(|pid| pid_alive(*pid)));

    let reply = send_signal(&client, leader, "SIGNAL_SIGKILL").await;
    assert_eq!(reply.header("envd-kill-survivors"), "");
    for (name, pid) in &pids {
        assert!(gone(*pid), "{name} (pid {pid}) survived the SIGKILL after SIGTERM");
    }
}

async fn others_survive(client: &Client) {
    let (system, system_pids) =
        start_tree(client, &json!({"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 1000 & echo \"bg=$!=\"; sleep 1000"]}, "stdin": false, "tag": "_system"}), &["bg"]).await;
    let (other, other_pids) =
        start_tree(client, &sdk_command("sleep 1000 & echo \"bg=$!=\"; sleep 1000"), &["bg"]).await;
    let (leader, pids) = start_tree(client, &sdk_command(&tree_script(None)), &["child", "setsid", "leader"]).await;
    send_signal(client, leader, "SIGNAL_SIGKILL").await;
    for (name, pid) in pids.iter().filter(|(name, _)| *name != "double") {
        assert!(gone(*pid), "{name} (pid {pid}) survived");
    }
    for pid in [system, system_pids["bg"], other, other_pids["bg"]] {
        assert!(pid_alive(pid), "pid {pid}, outside the killed command, was touched");
    }
    send_signal(client, system, "SIGNAL_SIGKILL").await;
    send_signal(client, other, "SIGNAL_SIGKILL").await;
    for pid in [system, system_pids["bg"], other, other_pids["bg"]] {
        assert!(gone(pid), "pid {pid} survived its own command's kill");
    }
}

#[tokio::test]
async fn a_kill_touches_neither_system_processes_nor_other_commands() {
    let cgroup = TestCgroup::new("kill-others");
    let envd = Envd::options().args(cgroup.args()).start();
    others_survive(&envd.client()).await;
}

#[tokio::test]
async fn without_cgroups_a_kill_reaches_the_session_and_the_descendants() {
    let envd = Envd::options().args(["--no-cgroups"]).start();
    let client = envd.client();
    // A finished double fork (parent gone before the kill) is out of reach
    // without cgroups; everything still linked to the command is not.
    let (leader, pids) = start_tree(&client, &sdk_command(&tree_script(None)), &["child", "setsid", "leader"]).await;
    send_signal(&client, leader, "SIGNAL_SIGKILL").await;
    for name in ["child", "setsid", "leader"] {
        assert!(gone(pids[name]), "{name} (pid {}) survived", pids[name]);
    }
    others_survive(&client).await;
}

#[tokio::test]
async fn deadline_kill_ends_the_tree_too() {
    let cgroup = TestCgroup::new("kill-deadline");
    let envd = Envd::options().args(cgroup.args()).start();
    let client = envd.client();
    // No login shell: the deadline must not cut a profile script short.
    let start = common::bash("sleep 1000 & echo \"bg=$!=\"; sleep 1000");
    let mut stream = client.stream(rpc::START, &start, &[("Connect-Timeout-Ms", "1500")]).await;
    let mut output = Vec::new();
    let bg = loop {
        if let Some(pid) = parse_pids(&String::from_utf8_lossy(&output)).get("bg") {
            break *pid;
        }
        match stream.next_event().await {
            ProcEvent::Stdout(data) => output.extend(data),
            ProcEvent::Start(_) | ProcEvent::Keepalive => {}
            other => panic!("ended before the background child was reported: {other:?}"),
        }
    };
    assert!(common::eventually(PATIENCE, || !pid_alive(bg)).await, "the deadline left the background child running");
}
