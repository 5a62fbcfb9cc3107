//! Debian's OpenSSH server on a loopback port, set up the way one would
//! reach a VM without an agent, and a multiplexed client connection to it.
//!
//! In order: a temp dir gets an ed25519 host key, an ed25519 user key and
//! its `authorized_keys`; `sshd -D -f <dir>/sshd_config -p <port>` starts
//! with `UsePAM no` and `UseDNS no` (no PAM stack, no reverse lookup per
//! connection), `MaxSessions 4096` (the concurrency figures open 1,000
//! channels on one connection), and the stock `sftp-server`; then one
//! `ssh -M` master connects, and every later `ssh`/`sftp` is a channel on
//! it (`ControlPath`), so key exchange and authentication are paid once.
//! The cipher is the client's default. Commands run as [`BENCH_USER`],
//! whose shell is bash and whose `.bashrc` returns at once when not
//! interactive (root's sources pyenv here, which would dominate).

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// The user both daemons run commands as: an unlocked account (`*`, not
/// `!`, in the password field), since sshd refuses locked ones without PAM.
pub const BENCH_USER: &str = "envdbench";

/// A running sshd with an open master connection; both end on drop.
pub struct OpenSsh {
    dir: PathBuf,
    sshd: Child,
}

/// Creates [`BENCH_USER`] when missing; returns its home.
pub fn bench_user() -> PathBuf {
    let home = PathBuf::from(format!("/home/{BENCH_USER}"));
    let exists = Command::new("id").arg(BENCH_USER).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !exists.is_ok_and(|s| s.success()) {
        let status = Command::new("useradd").args(["-m", "-s", "/bin/bash", "-p", "*", BENCH_USER]).status();
        assert!(status.is_ok_and(|s| s.success()), "useradd {BENCH_USER} failed");
    }
    home
}

impl OpenSsh {
    pub fn start() -> OpenSsh {
        assert!(Path::new(SSHD).exists(), "{SSHD} is missing: apt-get install openssh-server");
        let dir = std::env::temp_dir().join(format!("envd-bench-ssh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("ssh temp dir");
        write_keys_and_config(&dir);
        let port = common::free_port();
        let (sshd, _) = spawn_sshd(&dir, port);
        std::fs::write(dir.join("ssh_config"), client_config(&dir, port)).expect("ssh_config");
        let ssh = OpenSsh { dir, sshd };
        let master =
            ssh.ssh_base().args(["-o", "ControlMaster=yes", "-o", "ControlPersist=yes", "-fN", "bench"]).status();
        assert!(master.is_ok_and(|s| s.success()), "the ssh master connection failed");
        ssh
    }

    /// Time from starting sshd to its banner on a connection.
    pub fn ready_time() -> Duration {
        let dir = std::env::temp_dir().join(format!("envd-bench-ssh-ready-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("ssh temp dir");
        write_keys_and_config(&dir);
        let (mut sshd, took) = spawn_sshd(&dir, common::free_port());
        let _ = sshd.kill();
        let _ = sshd.wait();
        let _ = std::fs::remove_dir_all(&dir);
        took
    }

    fn ssh_base(&self) -> Command {
        let mut command = Command::new("ssh");
        command.arg("-F").arg(self.dir.join("ssh_config")).stdin(Stdio::null());
        command
    }

    /// `ssh bench <remote>` as a channel on the master connection.
    pub fn ssh(&self, remote: &[&str]) -> Command {
        let mut command = self.ssh_base();
        command.arg("bench").args(remote);
        command
    }

    /// `ssh bench <remote>` over a connection of its own.
    pub fn ssh_fresh(&self, remote: &[&str]) -> Command {
        let mut command = self.ssh_base();
        command.args(["-o", "ControlPath=none", "bench"]).args(remote);
        command
    }

    /// `sftp -b -` over the master: the batch is written to its stdin.
    pub fn sftp_batch(&self, batch: &str) {
        use std::io::Write;
        let mut child = Command::new("sftp")
            .arg("-F")
            .arg(self.dir.join("ssh_config"))
            .args(["-q", "-b", "-", "bench"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("sftp");
        child.stdin.take().expect("piped").write_all(batch.as_bytes()).expect("sftp batch");
        let status = child.wait().expect("sftp");
        assert!(status.success(), "sftp batch failed: {batch}");
    }

    pub fn sshd_pid(&self) -> u32 {
        self.sshd.id()
    }

    /// RSS of every sshd process: the listener and the master's session.
    pub fn daemon_rss_mib(&self) -> f64 {
        crate::machine::tree_rss_mib(self.sshd_pid(), "sshd")
    }
}

impl Drop for OpenSsh {
    fn drop(&mut self) {
        let _ = self.ssh_base().args(["-O", "exit", "bench"]).stderr(Stdio::null()).status();
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_keys_and_config(dir: &Path) {
    for key in ["host_key", "user_key"] {
        let status =
            Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(dir.join(key)).status();
        assert!(status.is_ok_and(|s| s.success()), "ssh-keygen {key}");
    }
    let public = std::fs::read(dir.join("user_key.pub")).expect("user_key.pub");
    std::fs::write(dir.join("authorized_keys"), public).expect("authorized_keys");
    // sshd reads authorized_keys as the user: the dir and the file must be
    // readable by it; the host key stays root's.
    set_mode(dir, 0o755);
    set_mode(&dir.join("authorized_keys"), 0o644);
    std::fs::write(dir.join("sshd_config"), server_config(dir)).expect("sshd_config");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn server_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "ListenAddress 127.0.0.1\n\
         HostKey {d}/host_key\n\
         AuthorizedKeysFile {d}/authorized_keys\n\
         PidFile {d}/sshd.pid\n\
         UsePAM no\n\
         UseDNS no\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin no\n\
         AllowUsers {BENCH_USER}\n\
         StrictModes no\n\
         PrintMotd no\n\
         MaxSessions 4096\n\
         MaxStartups 200:30:400\n\
         Subsystem sftp {SFTP_SERVER}\n\
         LogLevel ERROR\n"
    )
}

fn client_config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "Host bench\n\
         \x20 HostName 127.0.0.1\n\
         \x20 Port {port}\n\
         \x20 User {BENCH_USER}\n\
         \x20 IdentityFile {d}/user_key\n\
         \x20 IdentitiesOnly yes\n\
         \x20 UserKnownHostsFile /dev/null\n\
         \x20 StrictHostKeyChecking no\n\
         \x20 BatchMode yes\n\
         \x20 LogLevel ERROR\n\
         \x20 ControlPath {d}/master\n"
    )
}

/// sshd's privilege separation directory. It lives on `/run`, which a boot
/// empties (a tmpfs, or cleared by tmpfiles), and Debian creates it only in
/// its service unit, which the bench does not use: without it sshd exits 255
/// ("Missing privilege separation directory").
const PRIVSEP_DIR: &str = "/run/sshd";

/// Starts sshd in the foreground and waits for its banner.
fn spawn_sshd(dir: &Path, port: u16) -> (Child, Duration) {
    // Created before every start, not once: each sshd start needs it, and
    // nothing else in the bench makes it.
    std::fs::create_dir_all(PRIVSEP_DIR).expect("/run/sshd, sshd's privilege separation dir");
    set_mode(Path::new(PRIVSEP_DIR), 0o755);
    let log = std::fs::File::create(dir.join("sshd.log")).expect("sshd.log");
    let began = Instant::now();
    // -e: its errors go to sshd.log (not syslog), quoted if it exits.
    let mut sshd = Command::new(SSHD)
        .args(["-D", "-e"])
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .args(["-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning sshd");
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut banner = [0u8; 8];
            if stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0-" {
                return (sshd, began.elapsed());
            }
        }
        if let Ok(Some(status)) = sshd.try_wait() {
            let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
            panic!("sshd exited with {status} before accepting connections: {}", log.trim());
        }
        assert!(began.elapsed() < common::PATIENCE, "sshd did not accept connections");
        std::thread::sleep(Duration::from_micros(500));
    }
}
