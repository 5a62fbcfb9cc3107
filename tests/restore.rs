//! Template processes restored after a cold boot, tested on the real
//! binary: a metadata service whose identity changes as a snapshot is
//! resumed into a new sandbox, envd and its processes SIGKILLed (what a
//! cold boot leaves), a new boot id (the reboot), and envd started again on
//! the same state directory.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mmds::Mmds;
use common::{Client, Envd, Scratch, rpc, test_user};
use serde_json::{Value, json};

fn metadata(sandbox: &str) -> Value {
    json!({"instanceID": sandbox, "envID": "tpl-restore", "address": "http://127.0.0.1/logs"})
}

/// A sandbox's daemon as the host runs it: its state, identity files,
/// metadata service and boot id.
struct Sandbox {
    state: Scratch,
    run_dir: Scratch,
    boot: Scratch,
    mmds: Mmds,
}

impl Sandbox {
    fn new(name: &str, identity: &str) -> Sandbox {
        let sandbox = Sandbox {
            state: Scratch::new(&format!("{name}-state")),
            run_dir: Scratch::new(&format!("{name}-run")),
            boot: Scratch::new(&format!("{name}-boot")),
            mmds: Mmds::start(metadata(identity)),
        };
        sandbox.reboot();
        sandbox
    }

    /// A new boot id: the next start of envd is a cold boot.
    fn reboot(&self) {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let id = format!("boot-{}-{}", std::process::id(), since_epoch.as_nanos());
        std::fs::write(self.boot.path("boot_id"), format!("{id}\n")).unwrap();
    }

    fn start(&self, extra: &[&str]) -> Envd {
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            self.state.s(""),
            "--run-dir".into(),
            self.run_dir.s(""),
            "--mmds-address".into(),
            self.mmds.address(),
            "--boot-id-path".into(),
            self.boot.s("boot_id"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Envd::options().args(args).start()
    }

    /// The template-process section of the state file.
    fn record(&self) -> Value {
        let text = std::fs::read_to_string(self.state.path("exec-context.json")).unwrap_or_default();
        serde_json::from_str::<Value>(&text).map(|v| v["template_processes"].clone()).unwrap_or(Value::Null)
    }

    fn recorded_commands(&self) -> Vec<String> {
        let record = self.record();
        let processes = record["processes"].as_array().cloned().unwrap_or_default();
        processes.iter().map(|p| format!("{} {}", p["cmd"].as_str().unwrap_or(""), p["args"])).collect()
    }
}

/// What a cold boot leaves: envd stops first, so it cannot see its
/// processes die (in a VM everything stops at once), then every process it
/// started is killed (the harness finds them by session).
fn power_off(envd: Envd) {
    // SAFETY: kill(2) of the envd this test started.
    unsafe { libc::kill(envd.pid() as libc::pid_t, libc::SIGKILL) };
    drop(envd);
}

async fn wait_for_identity(client: &Client, sandbox: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get("/envs").await.json()["E2B_SANDBOX_ID"] != sandbox {
        assert!(Instant::now() < deadline, "sandbox id {sandbox} never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn init(envd: &Envd) {
    let reply = envd.client().post_json("/init", &json!({})).await;
    assert_eq!(reply.status, 204, "{}", reply.text());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_server(port: u16) -> Vec<String> {
    ["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"].map(str::to_owned).to_vec()
}

/// Starts a process in the background (its stream is dropped once the
/// start event is read) and returns its pid.
async fn start_background(client: &Client, start: Value) -> u32 {
    let mut stream = client.stream(rpc::START, &start, &[]).await;
    assert_eq!(stream.status, 200, "Start {start}");
    match stream.next_event().await {
        common::ProcEvent::Start(pid) => pid,
        other => panic!("Start {start}: expected a start event, got {other:?}"),
    }
}

/// One `GET /` on `port`: whether an HTTP server answered.
fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.0 200")
}

fn listens(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    assert!(common::eventually(Duration::from_secs(15), &mut check).await, "never: {what}");
}

fn proc_owner(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    uid.split_whitespace().next().unwrap().parse().unwrap()
}

fn proc_env(pid: u32) -> Vec<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
}

/// The template's server: run as the caller's user (Basic header).
fn template_server(workdir: &Path, port: u16) -> Value {
    json!({
        "process": {"cmd": "/usr/bin/python3", "args": http_server(port), "cwd": workdir, "envs": {"TEMPLATE_VAR": "kept"}},
        "stdin": false,
        "tag": "template-server",
    })
}

#[tokio::test]
async fn a_cold_boot_brings_back_the_template_server_and_nothing_else() {
    let user = test_user();
    let sandbox = Sandbox::new("restore-main", "tpl-build-a");
    let workdir = Scratch::new("restore-main-workdir");
    let oneshot_log = workdir.path("oneshot.log");
    let (template_port, killed_port, user_port) = (free_port(), free_port(), free_port());

    // The template build: identity A, a server and a one-shot command.
    {
        let envd = sandbox.start(&[]);
        let client = envd.client();
        wait_for_identity(&client, "tpl-build-a").await;
        init(&envd).await;
        let as_user = client.clone().with_user(&user.name);
        let server = start_background(&as_user, template_server(&workdir.0, template_port)).await;
        let doomed = json!({"process": {"cmd": "/usr/bin/python3", "args": http_server(killed_port)}, "stdin": false});
        let doomed = start_background(&client, doomed).await;
        let oneshot = format!("echo ran >> {}", oneshot_log.display());
        assert_eq!(client.run(&common::bash(&oneshot), &[]).await.exit_code(), 0);
        until("the template servers listen", || listens(template_port) && listens(killed_port)).await;

        // Resumed into sandbox B: the servers become template processes.
        sandbox.mmds.set(metadata("sbx-b"));
        init(&envd).await;
        let recorded = sandbox.recorded_commands();
        assert_eq!(recorded.len(), 2, "{recorded:?}");
        assert!(recorded.iter().all(|c| c.contains("http.server")), "{recorded:?}");
        let record = sandbox.record();
        assert_eq!(record["sandbox"], "sbx-b");
        let server_entry = record["processes"].as_array().unwrap().iter().find(|p| p["pid"] == server).cloned();
        let server_entry = server_entry.expect("the template server is recorded");
        assert_eq!(server_entry["ports"], json!([template_port]));
        assert_eq!(server_entry["user"], user.name);
        assert_eq!(server_entry["cwd"], workdir.0.display().to_string());

        // The user's own server, and a template server killed during the sandbox's life.
        let mine = json!({"process": {"cmd": "/usr/bin/python3", "args": http_server(user_port)}, "stdin": false});
        start_background(&client, mine).await;
        client.kill(doomed).await;
        until("the killed server leaves the record", || sandbox.recorded_commands().len() == 1).await;
        until("the user's server listens", || listens(user_port)).await;
        power_off(envd);
    }
    until("the old servers are gone", || !listens(template_port) && !listens(user_port)).await;

    // The cold boot.
    sandbox.reboot();
    let envd = sandbox.start(&[]);
    init(&envd).await;
    assert!(answers(template_port), "the template server must answer once /init is acknowledged");
    let listed = envd.client().list().await;
    let (pid, info) = listed.iter().next().map(|(p, i)| (*p, i.clone())).expect("the restored server is listed");
    assert_eq!(listed.len(), 1, "only the template server comes back: {listed:?}");
    assert_eq!(info["tag"], "template-server");
    assert_eq!(proc_owner(pid), user.uid);
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(), PathBuf::from(&workdir.0));
    let env = proc_env(pid);
    for expected in ["TEMPLATE_VAR=kept", "E2B_SANDBOX_ID=sbx-b", &format!("USER={}", user.name)] {
        assert!(env.iter().any(|e| e == expected), "{expected} missing from {env:?}");
    }
    assert!(!listens(user_port) && !listens(killed_port), "the user's and the killed server stay down");
    assert_eq!(std::fs::read_to_string(&oneshot_log).unwrap(), "ran\n", "the one-shot command is not run again");
    let stderr = envd.stderr();
    assert!(stderr.contains("template process restored"), "{stderr}");
    // envd restarted without a reboot (its processes keep running): nothing
    // is started twice.
    // SAFETY: kill(2) of the envd this test started.
    unsafe { libc::kill(envd.pid() as libc::pid_t, libc::SIGKILL) };
    drop(envd);
    let envd = sandbox.start(&[]);
    init(&envd).await;
    assert!(envd.client().list().await.is_empty(), "a restart without a reboot restores nothing");
    // (Still listening; its output pipes went with the old envd.)
    assert!(common::pid_alive(pid) && listens(template_port), "the server from before the restart still runs");
    assert!(envd.stderr().contains("without a reboot"), "{}", envd.stderr());
    assert_eq!(sandbox.recorded_commands().len(), 1, "it is still a template process");
    // SAFETY: kill(2) of the restored server's process group (it leads its session).
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    until("the restored server is gone", || !listens(template_port)).await;
}

#[tokio::test]
async fn a_template_process_that_cannot_come_back_does_not_hold_init() {
    let sandbox = Sandbox::new("restore-fail", "tpl-build-f");
    let bin = Scratch::new("restore-fail-bin");
    let copied_sleep = bin.path("template-sleeper");
    std::fs::copy("/bin/sleep", &copied_sleep).unwrap();
    let marker = bin.path("after-reboot");
    let port = free_port();
    {
        let envd = sandbox.start(&[]);
        let client = envd.client();
        wait_for_identity(&client, "tpl-build-f").await;
        let sleeper = json!({"process": {"cmd": copied_sleep, "args": ["1000"]}, "stdin": false, "tag": "sleeper"});
        start_background(&client, sleeper).await;
        // Listens in the template, only sleeps after the reboot.
        let script = format!(
            "if [ -e {} ]; then exec sleep 1000; else exec /usr/bin/python3 -m http.server {port} --bind 127.0.0.1; fi",
            marker.display()
        );
        start_background(&client, json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false}))
            .await;
        until("the server listens", || listens(port)).await;
        sandbox.mmds.set(metadata("sbx-f"));
        init(&envd).await;
        assert_eq!(sandbox.recorded_commands().len(), 2, "{:?}", sandbox.recorded_commands());
        power_off(envd);
    }
    std::fs::remove_file(&copied_sleep).unwrap();
    std::fs::write(&marker, "").unwrap();
    sandbox.reboot();

    let envd = sandbox.start(&["--restore-limit", "2"]);
    init(&envd).await;
    let stderr = envd.stderr();
    let ended = stderr.lines().find(|l| l.contains("template-sleeper") && l.contains("did not come back"));
    let ended = ended.unwrap_or_else(|| panic!("the missing binary is reported:\n{stderr}"));
    assert!(ended.contains("exit status 127") && ended.contains("not found"), "{ended}");
    let silent = stderr.lines().find(|l| l.contains("/bin/bash") && l.contains("not listening"));
    let silent = silent.unwrap_or_else(|| panic!("the silent server is reported:\n{stderr}"));
    assert!(silent.contains(&port.to_string()), "{silent}");
    // It still runs, as it would have after a memory resume.
    let listed = envd.client().list().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
}

#[tokio::test]
async fn restoring_can_be_turned_off() {
    let sandbox = Sandbox::new("restore-off", "tpl-build-o");
    let port = free_port();
    {
        let envd = sandbox.start(&[]);
        let client = envd.client();
        wait_for_identity(&client, "tpl-build-o").await;
        let server = json!({"process": {"cmd": "/usr/bin/python3", "args": http_server(port)}, "stdin": false});
        start_background(&client, server).await;
        until("the server listens", || listens(port)).await;
        sandbox.mmds.set(metadata("sbx-o"));
        init(&envd).await;
        assert_eq!(sandbox.recorded_commands().len(), 1);
        power_off(envd);
    }
    until("the server is gone", || !listens(port)).await;
    sandbox.reboot();
    let envd = sandbox.start(&["--no-restore"]);
    init(&envd).await;
    assert!(envd.client().list().await.is_empty());
    assert!(!listens(port));
    assert!(sandbox.recorded_commands().is_empty(), "nothing runs, so nothing stays recorded");
}

#[tokio::test]
async fn processes_tracked_before_a_live_upgrade_are_recorded_after_it() {
    let sandbox = Sandbox::new("restore-upgrade", "tpl-build-u");
    let upgrade = Scratch::new("restore-upgrade-bin");
    let envd = sandbox.start(&["--upgrade-path", &upgrade.s("envd.next")]);
    let client = envd.client();
    wait_for_identity(&client, "tpl-build-u").await;
    init(&envd).await;
    let port = free_port();
    let server = json!({"process": {"cmd": "/usr/bin/python3", "args": http_server(port)}, "stdin": false});
    let server = start_background(&client, server).await;
    until("the template server listens", || listens(port)).await;

    // The same process execs a new image of envd (an empty body: itself).
    let upgraded = client.try_send(http::Method::POST, "/upgrade", &[], common::full("")).await;
    assert!(upgraded.is_err(), "envd answered instead of upgrading: {:?}", upgraded.map(|r| r.text()));
    assert!(common::pid_alive(envd.pid()), "envd is still the same process");

    // Resumed into a new sandbox after the upgrade: the server started
    // under the template's identity becomes a template process.
    sandbox.mmds.set(metadata("sbx-after-upgrade"));
    init(&envd).await;
    let record = sandbox.record();
    assert_eq!(record["sandbox"], "sbx-after-upgrade", "{record}\n{}", envd.stderr());
    let recorded = record["processes"].as_array().cloned().unwrap_or_default();
    assert_eq!(recorded.len(), 1, "{record}\n{}", envd.stderr());
    assert_eq!(recorded[0]["pid"], server);
    assert_eq!(recorded[0]["ports"], json!([port]));

    // Adopted, it still leaves the record when it ends.
    envd.client().kill(server).await;
    until("the killed server leaves the record", || sandbox.recorded_commands().is_empty()).await;
}
