//! End-to-end test in a real VM (qemu, software emulation): the test plays
//! the orchestrator around envd baked into a Debian image by the .deb, and
//! drives both resume paths (DESIGN.md, CONTRACT.md 7):
//!
//! 1. cold boot: systemd starts envd; `/init` with token, env vars, default
//!    user and workdir, and a timestamp far from the guest clock;
//! 2. memory resume: a background process and a file, QMP stop + migrate to
//!    a file, a new qemu restores it, `/init` again, the process still runs;
//! 3. filesystem-only resume: a file, the pause hook freezes `/`, qemu is
//!    killed, a new qemu boots the same disk; no `/init` first;
//! 4. restored processes: a server started as in a template build, a
//!    memory snapshot resumed under a new identity, then a cold boot: the
//!    server answers when `/init` is acknowledged.
//!
//! Run it with `tests/vm/run.sh` (installs qemu etc., builds or reuses the
//! cached image). It is `#[ignore]`d so that a plain `cargo test` does not
//! need root, qemu and a minute of CPU.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

#[path = "vm/harness/mod.rs"]
mod harness;
#[path = "common/time.rs"]
mod time;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::disk;
use harness::envd::{As, Envd};
use harness::forward;
use harness::host_setup::{self, HostSetup};
use harness::mmds::Mmds;
use harness::qemu::{Vm, VmSpec};
use harness::reattach;
use serde_json::{Value, json};
use sha2::{Digest, Sha256, Sha512};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_USER: &str = "user";
const DEFAULT_WORKDIR: &str = "/home/user";
const BACKGROUND_TAG: &str = "e2e-background";
const SYSTEM_TAG: &str = "_system";

// ---------------------------------------------------------------------
// Results

#[derive(Debug)]
struct Check {
    phase: &'static str,
    name: String,
    /// "pass" or "FAIL: why".
    outcome: String,
}

#[derive(Debug, Default)]
struct Report {
    checks: Vec<Check>,
    timings: Vec<(String, String)>,
}

impl Report {
    /// Records a check; a failing one ends the run.
    fn check(&mut self, phase: &'static str, name: &str, result: Result<(), String>) -> Result<(), String> {
        let outcome = match &result {
            Ok(()) => "pass".to_owned(),
            Err(e) => format!("FAIL: {e}"),
        };
        eprintln!("[vm-e2e] {phase}: {name}: {outcome}");
        self.checks.push(Check { phase, name: name.to_owned(), outcome });
        result.map_err(|e| format!("{phase}: {name}: {e}"))
    }

    fn time(&mut self, what: &str, value: String) {
        eprintln!("[vm-e2e] time: {what}: {value}");
        self.timings.push((what.to_owned(), value));
    }

    fn print(&self) {
        let mut out = String::new();
        let _ = writeln!(out, "\n== VM end-to-end: checks ==");
        let _ = writeln!(out, "{:<12} {:<66} result", "phase", "check");
        for check in &self.checks {
            let _ = writeln!(out, "{:<12} {:<66} {}", check.phase, check.name, check.outcome);
        }
        let _ = writeln!(out, "\n== VM end-to-end: timings (this run; qemu TCG) ==");
        for (what, value) in &self.timings {
            let _ = writeln!(out, "{what:<52} {value}");
        }
        eprintln!("{out}");
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn expect_eq(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want { Ok(()) } else { Err(format!("{what}: got {got:?}, want {want:?}")) }
}

// ---------------------------------------------------------------------
// Time and identity helpers

fn host_now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

fn random_hex(bytes: usize) -> String {
    let mut seed = std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default();
    seed.extend_from_slice(&SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_nanos().to_le_bytes());
    let digest = Sha256::digest(&seed);
    let mut hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    while hex.len() < bytes * 2 {
        let more = Sha256::digest(hex.as_bytes());
        hex.extend(more.iter().map(|b| format!("{b:02x}")));
    }
    hex.truncate(bytes * 2);
    hex
}

fn sha512_hex(text: &str) -> String {
    Sha512::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The exec-context fingerprint DESIGN.md defines, one `key=value` a line.
const FINGERPRINT: &str = r#"printf 'uid=%s\ngroups=%s\nwhoami=%s\npwd=%s\n' "$(id -u)" "$(id -G)" "$(whoami)" "$(pwd)"
printf 'HOME=%s\nUSER=%s\nPATH=%s\numask=%s\n' "$HOME" "$USER" "$PATH" "$(umask)"
printf 'E2E_VAR=%s\nE2E_SPACES=%s\n' "$E2E_VAR" "$E2E_SPACES"
printf 'E2B_SANDBOX=%s\nE2B_SANDBOX_ID=%s\nE2B_TEMPLATE_ID=%s\n' "$E2B_SANDBOX" "$E2B_SANDBOX_ID" "$E2B_TEMPLATE_ID""#;

fn same_fingerprint(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let diff: Vec<String> =
        want.lines().zip(got.lines()).filter(|(w, g)| w != g).map(|(w, g)| format!("{w:?} -> {g:?}")).collect();
    Err(format!("{what} differs: {}", diff.join("; ")))
}

// ---------------------------------------------------------------------
// The test run: the orchestrator's side

struct Run {
    spec: VmSpec,
    image: PathBuf,
    mmds: Mmds,
    metadata: Value,
    token: String,
    env_vars: Value,
    vm: Option<Vm>,
    /// Consoles of VMs already gone, for the failure report.
    old_consoles: Vec<(String, String)>,
    report: Report,
    /// The NFS relay and the CA of `/init`'s system set-up.
    host: HostSetup,
}

impl Run {
    fn setup() -> Result<Run, String> {
        let image = image_dir()?;
        let work = std::env::temp_dir().join(format!("envd-vm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let token = random_hex(32);
        let metadata = json!({
            "instanceID": format!("e2e{}", &random_hex(4)),
            "envID": "e2e-template",
            "address": "http://169.254.169.2/logs",
            "accessTokenHash": sha512_hex(&token),
        });
        let mmds = Mmds::start(metadata.clone()).map_err(|e| format!("metadata service: {e}"))?;
        let host = HostSetup::start(&work)?;
        let env_or =
            |name: &str, default: u32| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let spec = VmSpec {
            image_dir: image.clone(),
            disk: work.join("disk.img"),
            work,
            cpus: env_or("ENVD_VM_SMP", 2),
            memory_mib: env_or("ENVD_VM_MEMORY_MIB", 512),
            mmds_port: mmds.port,
            verbose_console: std::env::var_os("ENVD_VM_VERBOSE_CONSOLE").is_some(),
            guest_ports: vec![harness::restored_processes::SERVER_PORT],
            extra_netdev: host.netdev_rules(),
        };
        Ok(Run {
            spec,
            image,
            mmds,
            metadata,
            token,
            env_vars: json!({ "E2E_VAR": "from-init", "E2E_SPACES": "a b  c" }),
            vm: None,
            old_consoles: Vec::new(),
            report: Report::default(),
            host,
        })
    }

    /// The disk copy, with the envd under test.
    fn prepare_disk(&self) -> Result<(), String> {
        let t = Instant::now();
        disk::copy_image(&self.image.join("root.img"), &self.spec.disk)?;
        let binary = envd_binary();
        disk::put_file(&self.spec.disk, &binary, "/usr/bin/envd", 0o755)?;
        eprintln!("[vm-e2e] disk ready in {} with envd {}", secs(t.elapsed()), binary.display());
        Ok(())
    }

    fn envd(&self) -> Result<Envd, String> {
        let vm = self.vm.as_ref().ok_or("no VM is running")?;
        Ok(Envd { port: vm.port, token: Some(self.token.clone()) })
    }

    fn anonymous(&self) -> Result<Envd, String> {
        Ok(Envd { token: None, ..self.envd()? })
    }

    fn boot(&mut self, name: &str, incoming: Option<&Path>) -> Result<Duration, String> {
        self.retire_vm();
        let mut vm = Vm::start(&self.spec, name, incoming)?;
        if incoming.is_some() {
            vm.resume_incoming()?;
        }
        let envd = Envd { port: vm.port, token: Some(self.token.clone()) };
        let timeout = if incoming.is_some() { RESTORE_TIMEOUT } else { BOOT_TIMEOUT };
        let started = vm.started;
        self.vm = Some(vm);
        let vm = self.vm.as_mut().expect("just set");
        envd.wait_ready(timeout, || vm.check_alive())?;
        Ok(started.elapsed())
    }

    fn retire_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.kill_hard();
            self.old_consoles.push((vm.name.clone(), vm.console()));
        }
    }

    fn init_body(&self, with_user: bool) -> Value {
        let mut body = json!({
            "accessToken": self.token,
            "envVars": self.env_vars,
            "timestamp": time::rfc3339(SystemTime::now()),
        });
        if with_user {
            body["defaultUser"] = json!(DEFAULT_USER);
            body["defaultWorkdir"] = json!(DEFAULT_WORKDIR);
        }
        self.host.add_to_init(&mut body);
        body
    }

    /// `/init` as the orchestrator sends it: retried until envd answers.
    fn init(&mut self, with_user: bool) -> Result<(), String> {
        let envd = self.envd()?;
        let start = Instant::now();
        loop {
            match envd.init(&self.init_body(with_user)) {
                Ok(r) if r.status == 204 && r.header("x-envd-version").is_some() => return Ok(()),
                Ok(r) if r.status == 204 => return Err("/init answered 204 without X-Envd-Version".into()),
                Ok(r) => return Err(format!("/init answered {}: {}", r.status, r.text())),
                Err(e) if start.elapsed() > Duration::from_secs(30) => return Err(format!("/init: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn root(&self, script: &str) -> Result<String, String> {
        Ok(self.envd()?.sh_tagged(As::User("root"), Some(SYSTEM_TAG), script, Duration::from_secs(60))?.stdout)
    }

    fn fingerprint(&self) -> Result<String, String> {
        let script = format!("{FINGERPRINT}\n{}", host_setup::FINGERPRINT);
        Ok(self.envd()?.sh(As::Default, &script)?.stdout.trim_end().to_owned())
    }

    fn guest_clock_offset(&self) -> Result<i64, String> {
        let guest: i64 = self.root("date +%s")?.trim().parse().map_err(|e| format!("guest date: {e}"))?;
        Ok(guest - host_now_secs())
    }

    /// Polls until a command as the default user runs as `user`; returns
    /// the time since qemu started.
    fn first_command_as_user(&self, deadline: Duration) -> Result<Duration, String> {
        let started = self.vm.as_ref().ok_or("no VM")?.started;
        let envd = self.envd()?;
        let mut last = String::new();
        while started.elapsed() < deadline {
            match envd.sh(As::Default, "whoami") {
                Ok(f) if f.stdout.trim() == DEFAULT_USER => return Ok(started.elapsed()),
                Ok(f) => last = format!("runs as {:?}", f.stdout.trim()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("no command as {DEFAULT_USER} within {deadline:?}: {last}"))
    }

    /// The pause hook before a filesystem-only pause: `POST /fsfreeze`
    /// (CONTRACT.md 4.10).
    fn freeze(&self) -> Result<Duration, String> {
        let t = Instant::now();
        let response =
            self.envd()?.post("/fsfreeze", Duration::from_secs(60)).map_err(|e| format!("/fsfreeze: {e}"))?;
        if response.status != 204 {
            return Err(format!("/fsfreeze answered {}: {}", response.status, response.text()));
        }
        Ok(t.elapsed())
    }

    /// `POST /freeze` before a memory pause; fails unless every writable
    /// disk was flushed.
    fn freeze_workload(&self) -> Result<(), String> {
        let reply = self
            .envd()?
            .post("/freeze?maxWaitMs=5000", Duration::from_secs(10))
            .map_err(|e| format!("/freeze: {e}"))?;
        let report: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        if reply.status == 200 && report["flushed"] == true && report["filesystems"].as_u64() >= Some(1) {
            Ok(())
        } else {
            Err(format!("/freeze answered {}: {}", reply.status, reply.text()))
        }
    }

    /// Prints what a red run needs: the serial consoles and envd's journal.
    fn diagnose(&mut self) {
        for (name, console) in &self.old_consoles {
            eprintln!("\n===== serial console of the earlier VM '{name}' (last 60 lines) =====");
            let lines: Vec<&str> = console.lines().collect();
            eprintln!("{}", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
        let Some(vm) = self.vm.as_mut() else { return };
        eprintln!("\n===== serial console of the current VM '{}' =====\n{}", vm.name, vm.console());
        if let Err(e) = vm.check_alive() {
            eprintln!("({e})");
            return;
        }
        let envd = Envd { port: vm.port, token: Some(self.token.clone()) };
        match envd.health(Duration::from_secs(2)) {
            Ok(_) => match envd.sh_tagged(
                As::User("root"),
                Some(SYSTEM_TAG),
                "systemctl status envd --no-pager 2>&1; journalctl -b -u envd --no-pager -o short-monotonic 2>&1 | tail -n 300",
                Duration::from_secs(30),
            ) {
                Ok(f) => eprintln!("\n===== journalctl -u envd (through envd) =====\n{}{}", f.stdout, f.stderr),
                Err(e) => eprintln!("\n(could not read the journal through envd: {e})"),
            },
            Err(e) => eprintln!("\n(envd does not answer, no journal: {e})"),
        }
    }
}

/// The image directory: `$ENVD_VM_IMAGE`, else what tests/vm/build-image.sh
/// builds or finds in its cache.
fn image_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("ENVD_VM_IMAGE") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/build-image.sh");
    let output = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed (run tests/vm/setup.sh first)", script.display()));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or("").trim();
    Ok(PathBuf::from(dir))
}

/// The envd under test: `$ENVD_VM_BINARY`, else the one cargo built for
/// this test (bookworm's glibc, like the guest's).
fn envd_binary() -> PathBuf {
    std::env::var_os("ENVD_VM_BINARY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_envd")))
}

// ---------------------------------------------------------------------
// The flow

fn cold_boot_phase(run: &mut Run) -> Result<Facts, String> {
    const P: &str = "boot";
    run.prepare_disk()?;
    let ready = run.boot("boot", None)?;
    run.report.time("boot -> envd ready (/health 204)", secs(ready));

    let unit = run.root("systemctl show envd -p Type -p ActiveState -p SubState -p NRestarts")?;
    run.report.check(
        P,
        "envd.service is Type=notify and active (READY=1 arrived)",
        if unit.contains("Type=notify") && unit.contains("ActiveState=active") {
            Ok(())
        } else {
            Err(format!("unit state: {}", unit.split_whitespace().collect::<Vec<_>>().join(" ")))
        },
    )?;

    let before = run.guest_clock_offset()?;
    run.report.check(
        P,
        "guest clock starts far from the host's (qemu -rtc base)",
        if before.abs() > 86_400 { Ok(()) } else { Err(format!("offset only {before} s")) },
    )?;

    let mmds_read = run.mmds.wait_reads(1, Duration::from_secs(15));
    run.report.check(
        P,
        "envd reads MMDS v2 at start (token PUT, then GET /)",
        if mmds_read { Ok(()) } else { Err(format!("metadata service saw {:?}", run.mmds.counters())) },
    )?;
    let sandbox_id = run.metadata["instanceID"].as_str().unwrap_or_default().to_owned();
    let files = run.root("cat /run/e2b/.E2B_SANDBOX_ID 2>&1; echo; cat /run/e2b/.E2B_TEMPLATE_ID 2>&1")?;
    run.report.check(
        P,
        "/run/e2b/.E2B_SANDBOX_ID and .E2B_TEMPLATE_ID from MMDS",
        expect_eq("/run/e2b", files.trim_end(), &format!("{sandbox_id}\ne2e-template")),
    )?;

    let server = run.root(host_setup::START_NFS_SERVER)?;
    run.report.check(P, "the guest's NFS server starts", expect_eq("nfs-server", server.trim(), "started"))?;
    run.init(true)?;
    let first = run.first_command_as_user(BOOT_TIMEOUT)?;
    run.report.time("boot -> first command as 'user' (after /init)", secs(first));
    host_setup_checks(run)?;
    let after = run.guest_clock_offset()?;
    run.report.check(
        P,
        "/init with a far-off timestamp steps the guest clock",
        if after.abs() <= 5 { Ok(()) } else { Err(format!("guest still {after} s off (was {before} s)")) },
    )?;

    let anonymous = run.anonymous()?.get("/envs").map_err(|e| e.to_string())?;
    let with_token = run.envd()?.get("/envs").map_err(|e| e.to_string())?;
    run.report.check(
        P,
        "after /init: without the token 401, with it 200",
        if anonymous.status == 401 && with_token.status == 200 {
            Ok(())
        } else {
            Err(format!("without: {}, with: {}", anonymous.status, with_token.status))
        },
    )?;

    let fingerprint = run.fingerprint()?;
    eprintln!("[vm-e2e] exec-context fingerprint after /init:\n{fingerprint}");
    let mut want = vec![
        "uid=1000".to_owned(),
        "whoami=user".into(),
        "pwd=/home/user".into(),
        "HOME=/home/user".into(),
        "USER=user".into(),
        "umask=0022".into(),
        "E2E_VAR=from-init".into(),
        "E2E_SPACES=a b  c".into(),
        "E2B_SANDBOX=true".into(),
    ];
    let missing: Vec<String> = want.drain(..).filter(|w| !fingerprint.lines().any(|l| l == w)).collect();
    run.report.check(
        P,
        "commands run as the /init user, workdir and env vars",
        if missing.is_empty() { Ok(()) } else { Err(format!("missing {missing:?}")) },
    )?;
    run.report.check(
        P,
        "E2B_SANDBOX_ID / E2B_TEMPLATE_ID in processes from MMDS",
        if fingerprint.lines().any(|l| l == format!("E2B_SANDBOX_ID={sandbox_id}"))
            && fingerprint.contains("E2B_TEMPLATE_ID=e2e-template")
        {
            Ok(())
        } else {
            Err("not set".into())
        },
    )?;

    let forward_server = forward_checks_after_boot(run)?;
    let envd = run.envd()?;
    let pid = envd.spawn_detached(
        As::Default,
        BACKGROUND_TAG,
        "n=0; while :; do n=$((n+1)); echo $n > /tmp/e2e-counter; sleep 0.5; done",
    )?;
    let mem_sum = envd.sh(As::Default, "head -c 1048576 /dev/urandom > mem-file && sha256sum mem-file")?.stdout;
    std::thread::sleep(Duration::from_secs(2));
    let counter: u64 = run.root("cat /tmp/e2e-counter")?.trim().parse().map_err(|e| format!("counter: {e}"))?;
    let boot_id = run.root("cat /proc/sys/kernel/random/boot_id")?;
    Ok(Facts { fingerprint, pid, mem_sum, counter, boot_id, forward_server })
}

/// After the first `/init`: the volume is the NFS export, the CA is in the
/// bundle once, the events address is in the hosts file.
fn host_setup_checks(run: &mut Run) -> Result<(), String> {
    const P: &str = "boot";
    let envd = run.envd()?;
    envd.sh(As::Default, &format!("echo through-the-volume > {}/e2e-file", host_setup::VOLUME))?;
    let on_server = run.root(&format!("cat {}/e2e-file", host_setup::EXPORT))?;
    run.report.check(
        P,
        "a file written in the NFS volume is on the server's export",
        expect_eq("export", on_server.trim(), "through-the-volume"),
    )?;
    let ca = run.host.ca_pem().trim_end().to_owned();
    let bundle = run.root("cat /etc/ssl/certs/ca-certificates.crt")?;
    run.report.check(
        P,
        "the /init CA is in the system bundle once",
        expect_eq("copies", &bundle.matches(&ca).count().to_string(), "1"),
    )?;
    let fingerprint = run.fingerprint()?;
    let missing: Vec<String> =
        host_setup::expected_lines().into_iter().filter(|w| !fingerprint.lines().any(|l| l == w)).collect();
    run.report.check(
        P,
        "the volume, events entry and address are in the fingerprint",
        if missing.is_empty() { Ok(()) } else { Err(format!("missing {missing:?} in {fingerprint}")) },
    )
}

/// What the first boot left behind, to compare after each resume.
struct Facts {
    fingerprint: String,
    pid: u32,
    mem_sum: String,
    counter: u64,
    boot_id: String,
    /// Pid of the guest server on localhost that envd forwards.
    forward_server: u32,
}

fn memory_phase(run: &mut Run, facts: &Facts) -> Result<(), String> {
    const P: &str = "memory";
    let envd = run.envd()?;
    let (echo, mut held) = envd.spawn_with_stdin(reattach::TAG, reattach::LINE_ECHO)?;
    let answered = reattach::round(&envd, echo, &mut held, "before", 8192);
    run.report.check(P, "a stdio server answers through the stream held over the snapshot", answered)?;
    let snapshot = run.spec.work.join("mem.snap");
    let took = run.vm.as_mut().ok_or("no VM")?.snapshot(&snapshot)?;
    let size = std::fs::metadata(&snapshot).map(|m| m.len()).unwrap_or(0);
    run.report.time("memory snapshot (stop + migrate to file)", format!("{} ({} MB)", secs(took), size >> 20));

    // As the orchestrator does: MMDS rewritten, then /init (no user fields).
    run.mmds.forget_tokens();
    run.mmds.set(run.metadata.clone());
    let ready = run.boot("restore", Some(&snapshot))?;
    let _ = std::fs::remove_file(&snapshot);
    run.report.time("memory restore -> envd ready", secs(ready));
    run.init(false)?;
    let first = run.first_command_as_user(RESTORE_TIMEOUT)?;
    run.report.time("memory restore -> first command as 'user' (with /init)", secs(first));

    let boot_id = run.root("cat /proc/sys/kernel/random/boot_id")?;
    run.report.check(P, "same kernel (boot_id) after restore", expect_eq("boot_id", &boot_id, &facts.boot_id))?;
    let listed = run.envd()?.list()?;
    run.report.check(
        P,
        "background process still in Process.List (same pid, tag)",
        if listed.iter().any(|(p, t)| *p == facts.pid && t.as_deref() == Some(BACKGROUND_TAG)) {
            Ok(())
        } else {
            Err(format!("pid {} not in {listed:?}", facts.pid))
        },
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let counter: u64 = run.root("cat /tmp/e2e-counter")?.trim().parse().map_err(|e| format!("counter: {e}"))?;
    run.report.check(
        P,
        "background process keeps running (counter advances)",
        if counter > facts.counter { Ok(()) } else { Err(format!("counter {counter}, was {}", facts.counter)) },
    )?;
    let sum = run.envd()?.sh(As::Default, "sha256sum mem-file")?.stdout;
    run.report.check(P, "file written before the snapshot is intact", expect_eq("sha256", &sum, &facts.mem_sum))?;
    let offset = run.guest_clock_offset()?;
    run.report.check(
        P,
        "guest clock within 5 s of the host after /init",
        if offset.abs() <= 5 { Ok(()) } else { Err(format!("{offset} s off")) },
    )?;
    let fingerprint = run.fingerprint()?;
    run.report.check(
        P,
        "exec-context fingerprint unchanged",
        same_fingerprint("fingerprint", &fingerprint, &facts.fingerprint),
    )?;
    drop(held);
    run.report.check(
        P,
        "a new connect to that server after the restore gets every byte of 8 KB and 64 KB answers, 3 rounds",
        reattach::reconnect_rounds(&run.envd()?, echo),
    )?;
    // After the upgrade, so the forwards the new image took over are what is checked.
    upgrade_after_resume(run, facts)?;
    forward_checks_after_restore(run, facts.forward_server)
}

/// A live upgrade right after the memory restore, as the orchestrator does.
fn upgrade_after_resume(run: &mut Run, facts: &Facts) -> Result<(), String> {
    const P: &str = "upgrade";
    let report = harness::upgrade::upgrade_in_place(&run.envd()?, &run.init_body(false));
    run.report.check(
        P,
        "POST /upgrade re-execs envd; /init reports the handover",
        report.as_ref().map(drop).map_err(Clone::clone),
    )?;
    let listed = run.envd()?.list()?;
    run.report.check(
        P,
        "background process adopted (same pid, tag)",
        if listed.iter().any(|(p, t)| *p == facts.pid && t.as_deref() == Some(BACKGROUND_TAG)) {
            Ok(())
        } else {
            Err(format!("pid {} not in {listed:?}", facts.pid))
        },
    )?;
    let before: u64 = run.root("cat /tmp/e2e-counter")?.trim().parse().map_err(|e| format!("counter: {e}"))?;
    std::thread::sleep(Duration::from_secs(1));
    let after: u64 = run.root("cat /tmp/e2e-counter")?.trim().parse().map_err(|e| format!("counter: {e}"))?;
    run.report.check(
        P,
        "background process runs after the upgrade (counter advances)",
        if after > before { Ok(()) } else { Err(format!("counter {after}, was {before}")) },
    )?;
    let fingerprint = run.fingerprint()?;
    run.report.check(
        P,
        "exec-context fingerprint unchanged",
        same_fingerprint("fingerprint", &fingerprint, &facts.fingerprint),
    )
}

fn filesystem_phase(run: &mut Run, facts: &Facts) -> Result<(), String> {
    const P: &str = "fs-only";
    let fs_sum = run.envd()?.sh(As::Default, "head -c 1048576 /dev/urandom > fs-file && sha256sum fs-file")?.stdout;
    let froze = run.freeze()?;
    run.report.time("POST /fsfreeze", secs(froze));
    run.vm.as_mut().ok_or("no VM")?.kill_hard();
    let state = disk::inspect(&run.spec.disk)?;
    run.report.check(
        P,
        "frozen disk after SIGKILL: clean, no journal to replay",
        if state.clean && !state.needs_recovery { Ok(()) } else { Err(format!("{state:?}")) },
    )?;
    run.report.check(
        P,
        "e2fsck -fn of the disk passes",
        if state.fsck_ok { Ok(()) } else { Err(state.fsck_output.clone()) },
    )?;

    run.mmds.forget_tokens();
    run.mmds.set(run.metadata.clone());
    let reads_before = run.mmds.counters().reads;
    let ready = run.boot("coldboot", None)?;
    run.report.time("cold boot (fs-only resume) -> envd ready", secs(ready));
    // The client still holds the token: it must work from the first moment.
    let at_ready = run.envd()?.get("/envs").map_err(|e| e.to_string())?;
    run.report.check(
        P,
        "the token is accepted as soon as /health answers",
        if at_ready.status == 200 { Ok(()) } else { Err(format!("{}: {}", at_ready.status, at_ready.text())) },
    )?;
    let mmds_read = run.mmds.wait_reads(reads_before + 1, Duration::from_secs(15));
    run.report.check(
        P,
        "envd reads MMDS after the cold boot",
        if mmds_read { Ok(()) } else { Err(format!("metadata service saw {:?}", run.mmds.counters())) },
    )?;

    let boot_id = run.root("cat /proc/sys/kernel/random/boot_id")?;
    run.report.check(
        P,
        "a new boot: envd started by systemd",
        if boot_id != facts.boot_id { Ok(()) } else { Err("same boot_id as before the pause".into()) },
    )?;

    // No /init yet: the orchestrator's first /init may come late.
    let first =
        run.first_command_as_user(run.vm.as_ref().ok_or("no VM")?.started.elapsed() + Duration::from_secs(3))?;
    run.report.time("cold boot -> first command as 'user' (no /init)", secs(first));
    let anonymous = run.anonymous()?.get("/envs").map_err(|e| e.to_string())?;
    let with_token = run.envd()?.get("/envs").map_err(|e| e.to_string())?;
    run.report.check(
        P,
        "before /init: without the token 401, with it 200",
        if anonymous.status == 401 && with_token.status == 200 {
            Ok(())
        } else {
            Err(format!("without: {}, with: {}", anonymous.status, with_token.status))
        },
    )?;
    let anonymous_rpc = run.anonymous()?.list();
    run.report.check(
        P,
        "before /init: Process.List without the token refused",
        match anonymous_rpc {
            Err(e) if e.contains("401") => Ok(()),
            Err(e) => Err(e),
            Ok(l) => Err(format!("answered {l:?}")),
        },
    )?;
    let cold_fingerprint = run.fingerprint()?;
    run.report.check(
        P,
        "before /init: exec-context fingerprint identical to memory resume",
        same_fingerprint("fingerprint", &cold_fingerprint, &facts.fingerprint),
    )?;

    let sums = run.envd()?.sh(As::Default, "sha256sum mem-file fs-file")?.stdout;
    run.report.check(
        P,
        "files written before the pause are intact (sha256)",
        expect_eq("sha256", &sums, &format!("{}{}", facts.mem_sum, fs_sum)),
    )?;
    let listed = run.envd()?.list()?;
    run.report.check(
        P,
        "background process is gone",
        if listed.iter().any(|(_, t)| t.as_deref() == Some(BACKGROUND_TAG)) {
            Err(format!("still listed: {listed:?}"))
        } else {
            Ok(())
        },
    )?;

    run.init(true)?;
    let fingerprint = run.fingerprint()?;
    run.report.check(
        P,
        "after /init: fingerprint unchanged from before /init",
        same_fingerprint("fingerprint", &fingerprint, &cold_fingerprint),
    )?;
    let offset = run.guest_clock_offset()?;
    run.report.check(
        P,
        "guest clock within 5 s of the host after /init",
        if offset.abs() <= 5 { Ok(()) } else { Err(format!("{offset} s off")) },
    )?;
    let restarts = run.root("systemctl show envd -p NRestarts --value")?;
    run.report.check(P, "envd never restarted (NRestarts=0)", expect_eq("NRestarts", restarts.trim(), "0"))?;
    Ok(())
}

// ---------------------------------------------------------------------
// Port forwarding: the host reaches a guest server on localhost through
// the guest's address (envd runs with --forward-address = that address).

const FORWARD_CONTENT: &str = "served on localhost only";

/// Starts the localhost-only server and checks it is reachable from the
/// host through the guest address; returns the server's pid.
fn forward_checks_after_boot(run: &mut Run) -> Result<u32, String> {
    const P: &str = "boot";
    let envd = run.envd()?;
    let forward_port = run.vm.as_ref().ok_or("no VM")?.forward_port;
    let pid = forward::start_localhost_server(&envd, FORWARD_CONTENT)?;
    let waited = forward::wait_reachable(forward_port, FORWARD_CONTENT, Duration::from_secs(20));
    if let Ok(waited) = &waited {
        run.report.time("guest server on 127.0.0.1 started -> reachable on the guest address", secs(*waited));
    }
    run.report.check(P, "host reaches a guest server on 127.0.0.1 through the guest address", waited.map(|_| ()))?;
    let sockets = forward::guest_listeners(&envd)?;
    run.report.check(
        P,
        "envd holds the forward socket; the server listens on 127.0.0.1 only",
        if sockets.contains("169.254.169.15:") && sockets.contains("\"envd\"") && sockets.contains("127.0.0.1:") {
            Ok(())
        } else {
            Err(format!("listeners: {sockets}"))
        },
    )?;
    Ok(pid)
}

/// After a memory restore the forward still works; once the server is
/// gone the guest address stops answering.
fn forward_checks_after_restore(run: &mut Run, server: u32) -> Result<(), String> {
    const P: &str = "memory";
    let envd = run.envd()?;
    let forward_port = run.vm.as_ref().ok_or("no VM")?.forward_port;
    let reachable = forward::wait_reachable(forward_port, FORWARD_CONTENT, Duration::from_secs(20));
    run.report.check(
        P,
        "the localhost server is still forwarded after the restore and the upgrade",
        reachable.map(|_| ()),
    )?;
    let gone = forward::stop_and_wait_unreachable(&envd, forward_port, server, Duration::from_secs(20));
    if let Ok(gone) = &gone {
        run.report.time("guest server killed -> guest address stops answering", secs(*gone));
    }
    run.report.check(P, "a server that went away is no longer forwarded", gone.map(|_| ()))
}

fn finish(mut run: Run, result: Result<(), String>, started: Instant) {
    run.report.time("whole run (image ready to done)", secs(started.elapsed()));
    if let Err(err) = result {
        run.diagnose();
        run.report.print();
        panic!("VM end-to-end failed: {err}\n(work dir kept: {})", run.spec.work.display());
    }
    run.report.print();
    if let Some(mut vm) = run.vm.take() {
        let _ = vm.quit();
    }
    if std::env::var_os("ENVD_VM_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&run.spec.work);
    }
}

#[test]
#[ignore = "needs root, qemu and an image: run tests/vm/run.sh"]
fn vm_e2e_both_resume_paths() {
    let run = Run::setup();
    let mut run = match run {
        Ok(run) => run,
        Err(e) => panic!("VM end-to-end setup failed: {e}"),
    };
    let started = Instant::now();
    let result = cold_boot_phase(&mut run).and_then(|facts| {
        memory_phase(&mut run, &facts)?;
        filesystem_phase(&mut run, &facts)?;
        harness::restored_processes::phase(&mut run)?;
        harness::pause_flush::phase(&mut run)
    });
    finish(run, result, started);
}

// ---------------------------------------------------------------------
// Stress: pause cycles of every kind in turn, N times

/// `ENVD_VM_STRESS_CYCLES=N tests/vm/run.sh --stress N`: write a file
/// through envd, pause (in turn: `/fsfreeze` + kill + cold boot; `/freeze` +
/// memory snapshot + restore; `/freeze` + kill + the disk booted alone),
/// check every file written so far. Reports how many cycles lost an
/// acknowledged write (goal: 0).
#[test]
#[ignore = "stress mode: tests/vm/run.sh --stress N"]
fn vm_stress_filesystem_cycles() {
    let cycles: u32 = match std::env::var("ENVD_VM_STRESS_CYCLES").ok().and_then(|v| v.parse().ok()) {
        Some(n) => n,
        None => panic!("set ENVD_VM_STRESS_CYCLES=N (tests/vm/run.sh --stress N)"),
    };
    let mut run = match Run::setup() {
        Ok(run) => run,
        Err(e) => panic!("VM stress setup failed: {e}"),
    };
    let started = Instant::now();
    let result = stress(&mut run, cycles);
    finish(run, result, started);
}

/// How a stress cycle pauses the sandbox, in turn.
enum Pause {
    /// `/fsfreeze`, qemu killed, cold boot.
    DiskOnly,
    /// `/freeze`, memory snapshot, restore from it.
    Memory,
    /// `/freeze`, qemu killed, the disk booted alone (a filesystem-only
    /// resume of a memory snapshot).
    MemorysDiskAlone,
}

impl Pause {
    fn of_cycle(cycle: u32) -> Pause {
        match cycle % 3 {
            1 => Pause::DiskOnly,
            2 => Pause::Memory,
            _ => Pause::MemorysDiskAlone,
        }
    }
}

fn stress(run: &mut Run, cycles: u32) -> Result<(), String> {
    run.prepare_disk()?;
    run.boot("stress-0", None)?;
    // The volume /init mounts is served from the guest.
    run.root(host_setup::START_NFS_SERVER)?;
    run.init(true)?;
    let mut written: Vec<(String, String)> = Vec::new();
    let (mut lost_cycles, mut unclean, mut boots) = (0u32, 0u32, Vec::new());
    for cycle in 1..=cycles {
        let name = format!("stress-{cycle:03}");
        // Acknowledged = the end event with exit status 0 reached us.
        let sum =
            run.envd()?.sh(As::Default, &format!("head -c 262144 /dev/urandom > {name} && sha256sum {name}"))?.stdout;
        written.push((name.clone(), sum));
        match Pause::of_cycle(cycle) {
            Pause::DiskOnly => {
                run.freeze()?;
                run.vm.as_mut().ok_or("no VM")?.kill_hard();
                let state = disk::inspect(&run.spec.disk)?;
                if !(state.clean && !state.needs_recovery && state.fsck_ok) {
                    unclean += 1;
                    eprintln!("[vm-stress] cycle {cycle}: disk not clean after freeze + kill: {state:?}");
                }
                boots.push(run.boot(&name, None)?);
                run.init(true)?;
            }
            Pause::Memory => {
                run.freeze_workload()?;
                let snapshot = run.spec.work.join("stress-mem.snap");
                run.vm.as_mut().ok_or("no VM")?.snapshot(&snapshot)?;
                boots.push(run.boot(&name, Some(&snapshot))?);
                let _ = std::fs::remove_file(&snapshot);
                run.init(false)?;
            }
            Pause::MemorysDiskAlone => {
                run.freeze_workload()?;
                run.vm.as_mut().ok_or("no VM")?.kill_hard();
                boots.push(run.boot(&name, None)?);
                run.init(true)?;
            }
        }
        let names: Vec<&str> = written.iter().map(|(n, _)| n.as_str()).collect();
        let got = run.envd()?.sh(As::Default, &format!("sha256sum {} 2>&1 || true", names.join(" ")))?.stdout;
        let lost: Vec<String> =
            written.iter().filter(|(_, sum)| !got.contains(sum.as_str())).map(|(n, _)| n.clone()).collect();
        if !lost.is_empty() {
            lost_cycles += 1;
            eprintln!("[vm-stress] cycle {cycle}: LOST acknowledged writes {lost:?}\n{got}");
            written.retain(|(n, _)| !lost.contains(n));
        }
        eprintln!(
            "[vm-stress] cycle {cycle}/{cycles}: resume {} , lost so far {lost_cycles}",
            secs(*boots.last().expect("pushed"))
        );
    }
    let mut sorted = boots.clone();
    sorted.sort();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    run.report.time("stress: cycles", cycles.to_string());
    run.report.time("stress: median resume -> envd ready", secs(median));
    run.report.time("stress: slowest resume -> envd ready", secs(sorted.last().copied().unwrap_or_default()));
    run.report.check(
        "stress",
        &format!(
            "{cycles} cycles of disk-only, memory and memory-disk-alone pauses in turn lose no acknowledged write"
        ),
        if lost_cycles == 0 {
            Ok(())
        } else {
            Err(format!("{lost_cycles} of {cycles} cycles lost an acknowledged write"))
        },
    )?;
    run.report.check(
        "stress",
        "disk clean after every freeze + kill",
        if unclean == 0 { Ok(()) } else { Err(format!("{unclean} of {cycles} cycles left an unclean disk")) },
    )?;
    Ok(())
}
