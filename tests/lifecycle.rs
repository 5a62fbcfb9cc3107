//! Pause and resume, tested for real as root: a metadata service that
//! enforces the MMDS v2 token exchange, a cold boot (envd SIGKILLed and
//! started afresh on the same state directory), FIFREEZE on a loop-mounted
//! ext4 image, and workload freezing through cgroup v2.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::cgroup::TestCgroup;
use common::host_setup::{HostFiles, NfsStandIn, UnmountOnDrop, fingerprint_script};
use common::mmds::{Mmds, sha512_hex};
use common::{Envd, Scratch, rpc, test_user};
use serde_json::{Value, json};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn sandbox_metadata() -> Value {
    json!({"instanceID": "sbx-cold-1", "envID": "tpl-1", "address": "http://127.0.0.1/logs", "accessTokenHash": sha512_hex(TOKEN)})
}

/// The exec-context fingerprint of DESIGN.md: what a command sees.
const FINGERPRINT: &str = "id -u; id -G; whoami; pwd; echo $HOME $USER $PATH; umask; echo $GREETING $E2B_SANDBOX_ID";

async fn fingerprint(client: &common::Client) -> String {
    let start = json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", FINGERPRINT]}, "stdin": false});
    let run = client.run(&start, &[]).await;
    assert_eq!(run.end.as_ref().unwrap()["exitCode"], Value::Null, "fingerprint failed: {}", run.stderr_str());
    run.stdout_str()
}

/// Waits until the daemon has read the sandbox id from the metadata service.
async fn wait_for_identity(client: &common::Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let envs = client.get("/envs").await;
        if envs.status == 200 && envs.json()["E2B_SANDBOX_ID"] == "sbx-cold-1" {
            return;
        }
        assert!(Instant::now() < deadline, "sandbox id never arrived: {} {}", envs.status, envs.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lifecycle_args(state: &Path, run: &Path, mmds: &str) -> Vec<String> {
    ["--state-dir", &state.display().to_string(), "--run-dir", &run.display().to_string(), "--mmds-address", mmds]
        .map(str::to_owned)
        .to_vec()
}

#[tokio::test]
async fn cold_boot_restores_the_exec_context_and_the_token() {
    let user = test_user();
    let state_scratch = Scratch::new("cold-state");
    let state = &state_scratch.0;
    let run_dir_scratch = Scratch::new("cold-run");
    let run_dir = &run_dir_scratch.0;
    let mmds = Mmds::start(sandbox_metadata());
    let mut args = lifecycle_args(state, run_dir, &mmds.address());
    // The host's set-up is part of the fingerprint: volume, CA, events entry.
    let (files, nfs, volumes) = (HostFiles::new("cold-files"), NfsStandIn::new("cold-nfs"), Scratch::new("cold-vol"));
    let (export, volume) = (nfs.export("data"), volumes.path("data"));
    let _unmount = UnmountOnDrop(volume.clone());
    // The default user writes to the volume.
    Command::new("chmod").arg("777").arg(&export).status().unwrap();
    args.extend(files.args());
    let start = || Envd::options().args(args.clone()).env("PATH", &nfs.path_env()).start();
    let ca = common::host_setup::TestCa::new(&files.scratch.0, "cold-ca");
    let host_fingerprint = fingerprint_script(&files, &[&volume]);

    let (before, host_before) = {
        let envd = start();
        let init = json!({"accessToken": TOKEN, "defaultUser": user.name, "defaultWorkdir": user.home, "envVars": {"GREETING": "hello"},
            "hyperloopIP": "10.0.0.2", "caBundle": ca.pem(), "lifecycleID": "life-1",
            "volumeMounts": [{"nfs_target": "10.0.0.1:/data", "path": volume}]});
        let reply = envd.client().post_json("/init", &init).await;
        assert_eq!(reply.status, 204, "{}", reply.text());
        let client = envd.client().with_header("X-Access-Token", TOKEN);
        wait_for_identity(&client).await;
        assert_eq!(std::fs::read_to_string(run_dir.join(".E2B_SANDBOX_ID")).unwrap(), "sbx-cold-1");
        (fingerprint(&client).await, host_state(&client, &host_fingerprint).await)
        // envd is SIGKILLed here: no chance to save anything on the way out.
    };
    assert!(
        host_before.contains("events=http://10.0.0.2") && !host_before.contains("nothing mounted"),
        "{host_before}"
    );
    assert!(
        before.contains(&format!("{}\n", user.uid))
            && before.contains(&user.name)
            && before.contains("hello sbx-cold-1"),
        "{before}"
    );
    for entry in std::fs::read_dir(state).unwrap() {
        let content = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&content).contains(TOKEN), "the raw token must never reach the disk");
    }

    // The cold boot loses the mounts and the rebuilt /etc loses the CA and the events entry.
    drop(UnmountOnDrop(volume.clone()));
    files.reset();
    let envd = start();
    let client = envd.client().with_header("X-Access-Token", TOKEN);
    wait_for_identity(&client).await;
    assert_eq!(fingerprint(&client).await, before, "a cold boot must run commands exactly as before");
    assert_eq!(host_state(&client, &host_fingerprint).await, host_before, "and with the host's set-up back");
    let write = common::bash(&format!("echo kept > {}/f", volume.display()));
    assert_eq!(client.run(&write, &[]).await.exit_code(), 0);
    assert_eq!(std::fs::read_to_string(export.join("f")).unwrap(), "kept\n", "written to the volume");
    for refused in [envd.client(), envd.client().with_header("X-Access-Token", "wrong")] {
        let reply = refused.unary(rpc::LIST, &json!({}), &[]).await;
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert_eq!(reply.json()["code"], 401);
    }
    // Signed URLs need the raw token, which only /init brings back.
    let signature_only = envd.client().get("/files?path=/etc/hostname&signature=v1_x").await;
    assert_eq!(signature_only.status, 401, "{}", signature_only.text());
    let init = json!({"accessToken": TOKEN, "timestamp": "2030-01-01T00:00:00Z"});
    assert_eq!(envd.client().post_json("/init", &init).await.status, 204);
    assert_eq!(fingerprint(&client).await, before, "the orchestrator's /init changes nothing");
    assert_eq!(host_state(&client, &host_fingerprint).await, host_before);
}

async fn host_state(client: &common::Client, script: &str) -> String {
    let run = client.run(&common::bash(script), &[]).await;
    assert_eq!(run.exit_code(), 0, "host fingerprint failed: {}", run.stderr_str());
    run.stdout_str()
}

#[tokio::test]
async fn a_secured_sandbox_stays_closed_until_the_metadata_service_answers() {
    let state_scratch = Scratch::new("closed-state");
    let state = &state_scratch.0;
    let run_dir_scratch = Scratch::new("closed-run");
    let run_dir = &run_dir_scratch.0;
    let mmds = Mmds::start(sandbox_metadata());
    {
        let envd = Envd::options().args(lifecycle_args(state, run_dir, &mmds.address())).start();
        assert_eq!(envd.client().post_json("/init", &json!({"accessToken": TOKEN})).await.status, 204);
    }
    drop(mmds);

    let port = Mmds::reserve_port();
    let envd = Envd::options().args(lifecycle_args(state, run_dir, &format!("127.0.0.1:{port}"))).start();
    let with_token = envd.client().with_header("X-Access-Token", TOKEN);
    assert_eq!(envd.client().get("/health").await.status, 204);
    for client in [&with_token, &envd.client()] {
        assert_eq!(client.unary(rpc::LIST, &json!({}), &[]).await.status, 401, "fail closed while the hash is unknown");
    }
    let mmds = Mmds::serve_on(port, sandbox_metadata());
    let deadline = Instant::now() + Duration::from_secs(10);
    while with_token.unary(rpc::LIST, &json!({}), &[]).await.status != 200 {
        assert!(Instant::now() < deadline, "the token was never accepted after the metadata service came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mmds.reads.load(Ordering::SeqCst) >= 1);
    assert_eq!(envd.client().unary(rpc::LIST, &json!({}), &[]).await.status, 401);
}

#[tokio::test]
async fn a_damaged_state_file_is_reported_and_ignored() {
    for (name, content) in
        [("empty", &b""[..]), ("truncated", b"{\"format\":1,\"default_user\":\"envd"), ("garbage", b"\xff\xfe\x00junk")]
    {
        let state_scratch = Scratch::new(&format!("damaged-{name}"));
        let state = &state_scratch.0;
        std::fs::write(state.join("exec-context.json"), content).unwrap();
        let envd = Envd::options().args(["--state-dir", &state.display().to_string()]).start();
        let run = envd.client().run(&json!({"process": {"cmd": "whoami"}}), &[]).await;
        assert_eq!(run.stdout_str(), "root\n", "{name}: defaults apply");
        assert!(envd.stderr().contains("ignoring the saved exec context"), "{name}: logged: {}", envd.stderr());
    }
}

#[tokio::test]
async fn metadata_defaults_apply_on_a_fresh_boot() {
    let user = test_user();
    let state_scratch = Scratch::new("mmds-defaults");
    let state = &state_scratch.0;
    let run_dir_scratch = Scratch::new("mmds-defaults-run");
    let run_dir = &run_dir_scratch.0;
    let mut metadata = sandbox_metadata();
    metadata["accessTokenHash"] = json!(sha512_hex(""));
    metadata["defaultUser"] = json!(user.name);
    let mmds = Mmds::start(metadata);
    let envd = Envd::options().args(lifecycle_args(state, run_dir, &mmds.address())).start();
    wait_for_identity(&envd.client()).await;
    let run = envd.client().run(&json!({"process": {"cmd": "whoami"}}), &[]).await;
    assert_eq!(run.stdout_str(), format!("{}\n", user.name));
}

/// A small ext4 filesystem, loop-mounted for the test and always thawed
/// and unmounted afterwards.
struct TestMount {
    mountpoint: PathBuf,
    /// Removed after the unmount (fields drop after `Drop::drop`).
    _dir: Scratch,
}

impl TestMount {
    fn new(name: &str) -> TestMount {
        let dir = Scratch::new(name);
        let image = dir.path("fs.img");
        let mountpoint = dir.path("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        run("truncate", &["-s", "32M", image.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        run("mount", &["-o", "loop", image.to_str().unwrap(), mountpoint.to_str().unwrap()]);
        TestMount { mountpoint, _dir: dir }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let mountpoint = self.mountpoint.to_str().unwrap();
        let _ = Command::new("fsfreeze").args(["-u", mountpoint]).stderr(std::process::Stdio::null()).status();
        let _ = Command::new("umount").args(["-l", mountpoint]).status();
    }
}

fn run(tool: &str, args: &[&str]) {
    let status = Command::new(tool).args(args).status().unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(status.success(), "{tool} {args:?}: {status}");
}

/// A writer outside envd that creates a file and syncs it.
fn spawn_writer(path: &Path) -> std::process::Child {
    Command::new("sh")
        .args(["-c", &format!("echo data > '{}' && sync -f '{}'", path.display(), path.display())])
        .spawn()
        .unwrap()
}

fn finished_within(child: &mut std::process::Child, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Sectors written so far to the loop device that backs `mountpoint`.
fn sectors_written(mountpoint: &Path) -> u64 {
    let source = Command::new("findmnt").args(["-no", "SOURCE"]).arg(mountpoint).output().unwrap();
    let device = String::from_utf8_lossy(&source.stdout).trim().trim_start_matches("/dev/").to_owned();
    let stat = std::fs::read_to_string(format!("/sys/block/{device}/stat")).unwrap();
    stat.split_whitespace().nth(6).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_workload_freeze_flushes_every_writable_disk_before_it_answers() {
    let mount = TestMount::new("freeze-flush");
    let envd = Envd::start();
    let client = envd.client();
    for (round, query) in ["/freeze?maxWaitMs=5000", "/freeze"].into_iter().enumerate() {
        // Written without a sync: in the page cache only, as a memory pause
        // would find it (writeback comes seconds later).
        std::fs::write(mount.mountpoint.join(format!("unsynced-{round}")), vec![7u8; 4 << 20]).unwrap();
        let before = sectors_written(&mount.mountpoint);
        let reply = client.send(http::Method::POST, query, &[], "").await;
        let written = sectors_written(&mount.mountpoint) - before;
        assert!(written >= (4 << 20) / 512, "{query}: only {written} sectors reached the disk before the answer");
        if round == 0 {
            assert_eq!(reply.status, 200, "{}", reply.text());
            let report = reply.json();
            assert!(report["flushed"] == true && report["filesystems"].as_u64() >= Some(1), "{report}");
        } else {
            assert_eq!(reply.status, 204);
            assert_eq!(reply.headers.get("x-envd-flushed").map(|v| v.as_bytes()), Some(&b"true"[..]));
        }
        assert_eq!(client.send(http::Method::POST, "/unfreeze", &[], "").await.status, 204);
    }
}

#[tokio::test]
async fn fsfreeze_blocks_writers_until_thaw_and_envd_keeps_answering() {
    let mount = TestMount::new("fsfreeze");
    let envd =
        Envd::options().args(["--freeze-path", mount.mountpoint.to_str().unwrap(), "--freeze-deadline", "3"]).start();
    let client = envd.client();

    assert_eq!(client.send(http::Method::POST, "/fsfreeze", &[], "").await.status, 204);
    assert_eq!(client.send(http::Method::POST, "/fsfreeze", &[], "").await.status, 204, "freezing twice is fine");
    let mut writer = spawn_writer(&mount.mountpoint.join("blocked"));
    assert!(!finished_within(&mut writer, Duration::from_millis(700)), "a write went through a frozen filesystem");
    assert_eq!(client.get("/health").await.status, 204);
    let run = client.run(&json!({"process": {"cmd": "true"}}), &[]).await;
    assert!(run.end.is_some(), "RPCs that do not write keep working while frozen");
    assert_eq!(
        client.post_json("/init", &json!({"envVars": {"A": "1"}})).await.status,
        204,
        "/init does not block on the frozen disk"
    );

    assert_eq!(client.send(http::Method::POST, "/fsthaw", &[], "").await.status, 204);
    assert!(finished_within(&mut writer, Duration::from_secs(10)), "the writer stayed blocked after /fsthaw");
    assert_eq!(client.send(http::Method::POST, "/fsthaw", &[], "").await.status, 204, "thawing twice is fine");

    // Nobody thaws: the deadline does.
    assert_eq!(client.send(http::Method::POST, "/fsfreeze", &[], "").await.status, 204);
    let mut writer = spawn_writer(&mount.mountpoint.join("after-deadline"));
    assert!(!finished_within(&mut writer, Duration::from_millis(500)));
    assert!(finished_within(&mut writer, Duration::from_secs(10)), "the deadline thaw never came");
    assert!(envd.stderr().contains("thawing it"), "the deadline thaw is logged: {}", envd.stderr());
}

#[tokio::test]
async fn fsfreeze_refuses_in_dev_mode_without_an_explicit_path() {
    let envd = Envd::start();
    let reply = envd.client().send(http::Method::POST, "/fsfreeze", &[], "").await;
    assert_eq!(reply.status, 409);
    assert!(reply.json()["message"].as_str().unwrap().contains("--freeze-path"), "{}", reply.text());
}

fn cpu_ticks(pid: u32) -> u64 {
    // Fields after the command name: [11] utime, [12] stime.
    let stat = common::proc_stat(pid).expect("process is alive");
    stat[11].parse::<u64>().unwrap() + stat[12].parse::<u64>().unwrap()
}

async fn start_busy_loop(client: &common::Client, tag: Option<&str>) -> u32 {
    let mut start = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "while :; do :; done"]}, "stdin": false});
    if let Some(tag) = tag {
        start["tag"] = json!(tag);
    }
    let mut stream = client.stream(rpc::START, &start, &[]).await;
    match stream.next_event().await {
        common::ProcEvent::Start(pid) => pid,
        other => panic!("expected the start event, got {other:?}"),
    }
}

async fn progresses(pid: u32) -> bool {
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_millis(600)).await;
    cpu_ticks(pid) > before
}

#[tokio::test]
async fn workload_freeze_stops_user_processes_but_not_system_ones() {
    let cgroup = TestCgroup::new("freeze");
    let envd = Envd::options().args(["--cgroup-root", cgroup.0.to_str().unwrap()]).start();
    let client = envd.client();
    let busy = start_busy_loop(&client, None).await;
    let system = start_busy_loop(&client, Some("_system")).await;
    let in_user = cgroup.members("user");
    assert!(in_user.contains(&busy), "placed in the user cgroup: {in_user:?}");
    assert!(!in_user.contains(&system), "_system stays out");

    let reply = client.send(http::Method::POST, "/freeze?maxWaitMs=2000", &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert!(report["frozen"].as_u64().unwrap() >= 1 && report["notFrozen"] == 0, "{report}");
    assert!(!progresses(busy).await, "a frozen process kept running");
    assert!(progresses(system).await, "the _system process must keep running");

    assert_eq!(client.send(http::Method::POST, "/unfreeze", &[], "").await.status, 204);
    assert!(progresses(busy).await, "thawed by /unfreeze");

    assert_eq!(client.send(http::Method::POST, "/freeze", &[], "").await.status, 204, "no wait budget: 204");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!progresses(busy).await);
    assert_eq!(client.post_json("/init", &json!({})).await.status, 204);
    assert!(progresses(busy).await, "every /init thaws the workload");
    client.kill(busy).await;
    client.kill(system).await;
}

#[tokio::test]
async fn without_cgroups_freezing_is_a_no_op() {
    let envd = Envd::options().args(["--no-cgroups"]).start();
    let reply = envd.client().send(http::Method::POST, "/freeze?maxWaitMs=100", &[], "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["unobservable"], 1);
    assert_eq!(envd.client().send(http::Method::POST, "/unfreeze", &[], "").await.status, 204);
}

#[tokio::test]
async fn collapse_reports_what_it_did_to_envds_own_memory() {
    let envd = Envd::start();
    let reply = envd.client().send(http::Method::POST, "/collapse", &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    let count = |field: &str| report[field].as_u64().unwrap_or_else(|| panic!("{field} missing: {report}"));
    assert!(count("regions") >= 1, "envd has anonymous memory: {report}");
    assert_eq!(count("chunks"), count("collapsed") + count("alreadyHuge") + count("skipped"), "{report}");
    assert!(report["elapsedMs"].is_u64(), "{report}");
    // Whatever this kernel allows is printed, not asserted: collapse support
    // depends on the kernel version and its THP settings.
    println!("collapse on this kernel: {report}");
}

#[tokio::test]
async fn a_freeze_nobody_thaws_is_thawed_by_the_watchdog() {
    let cgroup = TestCgroup::new("watchdog");
    let envd = Envd::options().args(["--cgroup-root", cgroup.0.to_str().unwrap(), "--freeze-watchdog", "2"]).start();
    let client = envd.client();
    let busy = start_busy_loop(&client, None).await;
    let reply = client.send(http::Method::POST, "/freeze?maxWaitMs=2000", &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(!progresses(busy).await, "frozen");
    assert!(
        common::eventually(Duration::from_secs(10), || envd.stderr().contains("the watchdog thawed it")).await,
        "the watchdog thaw is logged: {}",
        envd.stderr()
    );
    assert!(progresses(busy).await, "thawed by the watchdog");
    client.kill(busy).await;
}

#[tokio::test]
async fn hierarchy_freeze_stops_every_workload_cgroup_and_spares_the_guests_own_freezes() {
    let cgroup = TestCgroup::new("hierarchy");
    let customer = cgroup.with_busy_process("customer/app");
    let journald = cgroup.with_busy_process("system.slice/systemd-journald.service");
    let other_service = cgroup.with_busy_process("system.slice/other.service");
    let paused_by_guest = cgroup.with_busy_process("paused");
    std::fs::write(cgroup.0.join("paused/cgroup.freeze"), "1").unwrap();
    let envd = Envd::options().args(["--cgroup-root", cgroup.0.to_str().unwrap()]).start();
    let client = envd.client();

    let reply = client.send(http::Method::POST, "/freeze?mode=hierarchy&maxWaitMs=2000", &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert_eq!(report["mode"], "hierarchy", "{report}");
    assert_eq!(report["allowlisted"], 1, "journald is spared: {report}");
    assert_eq!(report["preFrozen"], 1, "the guest's own freeze is remembered: {report}");
    assert_eq!(report["notFrozen"], 0, "{report}");
    assert!(!progresses(customer).await, "a cgroup the customer made is frozen");
    assert!(!progresses(other_service).await, "a service beside journald is frozen");
    assert!(progresses(journald).await, "journald keeps running");

    let init = client.post_json("/init", &json!({})).await;
    assert_eq!(init.status, 204);
    let audit: Value = serde_json::from_str(init.header("x-envd-freeze-audit")).expect("the audit header");
    assert_eq!(audit["violations"], 0, "{audit}");
    assert_eq!(audit["escaped"], 0, "{audit}");
    assert_eq!(audit["truncated"], false, "{audit}");
    assert!(audit["frozen"].as_u64().unwrap() >= 4, "{audit}");
    assert!(progresses(customer).await, "thawed by /init");
    assert!(progresses(other_service).await, "thawed by /init");
    assert!(!progresses(paused_by_guest).await, "the guest's own freeze survives the thaw");
    assert_eq!(std::fs::read_to_string(cgroup.0.join("paused/cgroup.freeze")).unwrap().trim(), "1");

    let again = client.post_json("/init", &json!({})).await;
    assert_eq!(again.header("x-envd-freeze-audit"), "", "no audit without a hierarchy freeze in effect");
}
