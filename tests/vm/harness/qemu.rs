//! qemu under software emulation (TCG), set up as in VM-TESTING.md: q35,
//! virtio-blk root (migratable, unlike NVMe in qemu 7.2), user-mode
//! network on 169.254.169.0/24 with envd's port forwarded to the host and
//! 169.254.169.254:80 forwarded (guestfwd + socat) to the test's metadata
//! service, QMP on a unix socket for the memory snapshot.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The guest port envd listens on.
pub const ENVD_PORT: u16 = 49983;
/// A guest port forwarded from the host like envd's, for a guest server
/// that listens on localhost only (envd forwards it on the guest address).
pub const FORWARD_GUEST_PORT: u16 = 18080;
/// The guest clock starts here (the RTC), far from the host's, so that the
/// first `/init` must step it.
pub const RTC_BASE: &str = "2035-01-01T00:00:00";

/// Everything that defines the VM; a restore must use the same values.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// vmlinuz, initrd.cpio.
    pub image_dir: PathBuf,
    /// The disk (a private copy of root.img).
    pub disk: PathBuf,
    /// Where consoles, QMP sockets and snapshots go.
    pub work: PathBuf,
    /// `-smp`.
    pub cpus: u32,
    /// `-m`, in MiB.
    pub memory_mib: u32,
    /// The host port of the metadata service.
    pub mmds_port: u16,
    /// Drop `quiet` from the kernel command line.
    pub verbose_console: bool,
    /// Guest TCP ports forwarded from host loopback too (servers in the guest).
    pub guest_ports: Vec<u16>,
    /// More `-netdev user` rules (`,hostfwd=...,guestfwd=...`) of features under test.
    pub extra_netdev: String,
}

/// A running qemu. Killed (SIGKILL) when dropped; the child also gets
/// SIGKILL if the test thread that spawned it dies.
#[derive(Debug)]
pub struct Vm {
    /// What it was started with.
    pub spec: VmSpec,
    /// A name for its files (console, QMP socket).
    pub name: String,
    /// The host port forwarded to envd.
    pub port: u16,
    /// The host port forwarded to [`FORWARD_GUEST_PORT`] on the guest address.
    pub forward_port: u16,
    /// When qemu was spawned.
    pub started: Instant,
    /// (guest port, host port) of `spec.guest_ports`.
    pub forwards: Vec<(u16, u16)>,
    child: Option<Child>,
    qmp: Option<Qmp>,
}

/// A free port on 127.0.0.1 (bound and released; qemu may still lose the
/// race, which `Vm::start` retries).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

impl Vm {
    /// Starts qemu; with `incoming`, it loads that memory snapshot and waits
    /// paused (see [`Vm::resume_incoming`]).
    pub fn start(spec: &VmSpec, name: &str, incoming: Option<&Path>) -> Result<Vm, String> {
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let forward_port = free_port();
            let console = spec.work.join(format!("{name}.console"));
            let stderr_path = spec.work.join(format!("{name}.stderr"));
            let qmp_path = spec.work.join(format!("{name}.qmp"));
            let _ = fs::remove_file(&qmp_path);
            let stderr = fs::File::create(&stderr_path).map_err(|e| format!("{}: {e}", stderr_path.display()))?;
            let mut append = String::from(
                "console=ttyS0 rw cryptomgr.notests tsc=reliable no_timer_check audit=0 apparmor=0 mitigations=off",
            );
            if !spec.verbose_console {
                append.push_str(" quiet");
            }
            let forwards: Vec<(u16, u16)> = spec.guest_ports.iter().map(|&guest| (guest, free_port())).collect();
            let extra: String =
                forwards.iter().map(|(guest, host)| format!("hostfwd=tcp:127.0.0.1:{host}-:{guest},")).collect();
            let netdev = format!(
                "user,id=n0,restrict=on,net=169.254.169.0/24,host=169.254.169.2,\
                 hostfwd=tcp:127.0.0.1:{port}-:{ENVD_PORT},{extra}\
                 hostfwd=tcp:127.0.0.1:{forward_port}-:{FORWARD_GUEST_PORT},\
                 guestfwd=tcp:169.254.169.254:80-cmd:socat STDIO TCP:127.0.0.1:{}{}",
                spec.mmds_port, spec.extra_netdev
            );
            let mut command = Command::new("qemu-system-x86_64");
            command
                .args(["-accel", "tcg", "-machine", "q35", "-smp", &spec.cpus.to_string()])
                .args(["-m", &format!("{}M", spec.memory_mib)])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-rtc", &format!("base={RTC_BASE}")])
                .arg("-kernel")
                .arg(spec.image_dir.join("vmlinuz"))
                .arg("-initrd")
                .arg(spec.image_dir.join("initrd.cpio"))
                .args(["-append", &append])
                .args(["-drive", &format!("file={},if=none,id=d0,format=raw", spec.disk.display())])
                .args(["-device", "virtio-blk-pci,drive=d0"])
                .args(["-netdev", &netdev])
                .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
                .args(["-chardev", &format!("file,id=con,path={}", console.display())])
                .args(["-serial", "chardev:con"])
                .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            if let Some(snapshot) = incoming {
                command.args(["-incoming", &format!("exec:cat {}", shell_quote(snapshot))]);
            }
            // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the
            // calling (child) process; it allocates nothing and takes no lock.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let started = Instant::now();
            let child =
                command.spawn().map_err(|e| format!("spawning qemu-system-x86_64: {e} (run tests/vm/setup.sh)"))?;
            let mut vm = Vm {
                spec: spec.clone(),
                name: name.to_owned(),
                port,
                forward_port,
                started,
                forwards,
                child: Some(child),
                qmp: None,
            };
            // A taken port makes qemu exit at once; anything else shows up later.
            std::thread::sleep(Duration::from_millis(150));
            match vm.check_alive() {
                Ok(()) => return Ok(vm),
                Err(err) if err.contains("host forwarding") => last_error = err,
                Err(err) => return Err(err),
            }
        }
        Err(format!("qemu could not forward a host port: {last_error}"))
    }

    /// Err when qemu has exited (with its stderr).
    pub fn check_alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else { return Err(format!("qemu {} was stopped", self.name)) };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                let stderr =
                    fs::read_to_string(self.spec.work.join(format!("{}.stderr", self.name))).unwrap_or_default();
                Err(format!("qemu {} exited ({status}): {}", self.name, stderr.trim()))
            }
            Err(err) => Err(format!("qemu {}: {err}", self.name)),
        }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(self.spec.work.join(format!("{}.console", self.name))).unwrap_or_default()
    }

    fn qmp(&mut self) -> Result<&mut Qmp, String> {
        if self.qmp.is_none() {
            let path = self.spec.work.join(format!("{}.qmp", self.name));
            let start = Instant::now();
            let qmp = loop {
                match Qmp::connect(&path) {
                    Ok(qmp) => break qmp,
                    Err(err) if start.elapsed() > Duration::from_secs(30) => {
                        return Err(format!("QMP {}: {err}", path.display()));
                    }
                    Err(_) => {
                        self.check_alive()?;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            self.qmp = Some(qmp);
        }
        Ok(self.qmp.as_mut().expect("just connected"))
    }

    /// Stops the VM and writes its memory and device state to `file`
    /// (QMP `stop` + `migrate` to `exec:cat`), then quits qemu. Returns
    /// how long stop-to-completed took.
    pub fn snapshot(&mut self, file: &Path) -> Result<Duration, String> {
        let start = Instant::now();
        let qmp = self.qmp()?;
        // The default bandwidth cap (128 MiB/s) applies to a stopped VM too.
        qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 10u64 << 30 }))?;
        qmp.execute("stop", json!({}))?;
        qmp.execute("migrate", json!({ "uri": format!("exec:cat > {}", shell_quote(file)) }))?;
        loop {
            let status = qmp.execute("query-migrate", json!({}))?;
            match status["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => return Err(format!("migration to a file failed: {status}")),
                _ if start.elapsed() > Duration::from_secs(60) => {
                    return Err(format!("migration still not done: {status}"));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let took = start.elapsed();
        self.quit()?;
        Ok(took)
    }

    /// The host port forwarded to `guest`, if it is one of `guest_ports`.
    pub fn host_port(&self, guest: u16) -> Option<u16> {
        self.forwards.iter().find(|(g, _)| *g == guest).map(|(_, host)| *host)
    }

    /// After `start(.., Some(snapshot))`: waits for the state to load
    /// (`inmigrate` -> `paused`) and continues the VM.
    pub fn resume_incoming(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let status = self.qmp()?.execute("query-status", json!({}))?;
            match status["status"].as_str() {
                Some("paused") | Some("postmigrate") => break,
                Some("inmigrate") | Some("prelaunch") if start.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return Err(format!("restored VM in state {status}")),
            }
        }
        self.qmp()?.execute("cont", json!({}))?;
        Ok(())
    }

    /// QMP `quit`, then waits for the process.
    pub fn quit(&mut self) -> Result<(), String> {
        if let Ok(qmp) = self.qmp() {
            let _ = qmp.execute("quit", json!({}));
        }
        self.qmp = None;
        if let Some(mut child) = self.child.take() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// SIGKILL to qemu: the VM vanishes with no shutdown at all.
    pub fn kill_hard(&mut self) {
        self.qmp = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// A QMP session: newline-delimited JSON; asynchronous events are skipped.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(|e| format!("QMP read: {e}"))? == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(line.trim()).map_err(|e| format!("QMP JSON {line:?}: {e}"))
    }

    /// Runs one command; its `return` value, or Err with its `error`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP write {command}: {e}"))?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(error) = message.get("error") {
                return Err(format!("QMP {command}: {error}"));
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
        }
    }
}
