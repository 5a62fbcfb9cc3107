//! What `/init` sets up in the system, on scratch files: a hosts file and a
//! CA bundle envd is pointed at by flags (the machine's own are never
//! touched), test CAs and a TLS server made with the `openssl` CLI, and a
//! stand-in for `mount -t nfs`.
//!
//! The stand-in exists because the kernel the integration tests run on has
//! no NFS client: it is a `mount` found first on envd's PATH that records
//! its arguments, optionally waits (a slow server), and bind-mounts the
//! export directory named by the target. Everything around it is real:
//! envd's unmounts, the mount table, the files written through the volume.
//! The VM end-to-end test mounts from a real NFS server instead.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Scratch;

/// A hosts file, a CA bundle and the CA's own file, all scratch.
pub struct HostFiles {
    pub scratch: Scratch,
}

/// The lines a fresh hosts file and bundle start with.
pub const HOSTS_START: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n";

impl HostFiles {
    pub fn new(name: &str) -> HostFiles {
        let scratch = Scratch::new(name);
        let files = HostFiles { scratch };
        files.reset();
        files
    }

    /// Back to the files a freshly built system has (as after a cold boot
    /// whose `/etc` was rebuilt).
    pub fn reset(&self) {
        std::fs::write(self.hosts(), HOSTS_START).unwrap();
        let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        std::fs::write(self.bundle(), system).unwrap();
        let _ = std::fs::remove_file(self.ca_file());
    }

    pub fn hosts(&self) -> PathBuf {
        self.scratch.path("hosts")
    }

    pub fn bundle(&self) -> PathBuf {
        self.scratch.path("ca-certificates.crt")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.scratch.path("local-ca/e2b-ca.crt")
    }

    /// envd's flags for these files.
    pub fn args(&self) -> Vec<String> {
        let [hosts, bundle, ca] = [self.hosts(), self.bundle(), self.ca_file()].map(|p| p.display().to_string());
        ["--hosts-file", &hosts, "--ca-bundle", &bundle, "--ca-file", &ca].map(str::to_owned).to_vec()
    }

    pub fn read(&self, path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA and a server certificate for `localhost` signed by it.
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    pub fn new(parent: &Path, name: &str) -> TestCa {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let subject = format!("/CN=envd test CA {name}");
        let mut ca = vec!["req", "-x509", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", &subject];
        ca.extend(ec);
        openssl(&dir, &ca);
        let mut csr = vec!["req", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"];
        csr.extend(ec);
        openssl(&dir, &csr);
        std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "server.pem",
                "-extfile",
                "san.ext",
            ],
        );
        TestCa { dir }
    }

    /// The CA certificate, as the host sends it.
    pub fn pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.pem")).unwrap()
    }
}

/// `openssl s_server` on loopback with a certificate of `ca`.
pub struct TlsServer {
    child: Child,
    pub port: u16,
}

impl TlsServer {
    pub fn start(ca: &TestCa) -> TlsServer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-cert", "server.pem", "-key", "server.key", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(&ca.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s_server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsServer { child, port }
    }

    /// A script that fetches from the server trusting only `bundle`;
    /// prints the HTTP status, or 000 when the TLS handshake fails.
    pub fn curl(&self, bundle: &Path) -> String {
        format!(
            "CURL_CA_BUNDLE={} curl --noproxy '*' -s -o /dev/null -w '%{{http_code}}' --max-time 10 https://localhost:{}/",
            bundle.display(),
            self.port
        )
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `mount` stand-in (see the module doc) and its exports.
pub struct NfsStandIn {
    pub scratch: Scratch,
}

impl NfsStandIn {
    pub fn new(name: &str) -> NfsStandIn {
        let scratch = Scratch::new(name);
        std::fs::create_dir_all(scratch.path("bin")).unwrap();
        std::fs::create_dir_all(scratch.path("exports")).unwrap();
        let script = format!(
            "#!/bin/sh\n\
             # mount -v -t nfs -o OPTIONS host:/export PATH, done as a bind mount of {exports}/export\n\
             echo \"$*\" >> {log}\n\
             eval target=\\${{$(($# - 1))}}; eval path=\\${{$#}}\n\
             sleep \"$(cat {delay} 2>/dev/null || echo 0)\"\n\
             exec /usr/bin/mount --bind \"{exports}${{target#*:}}\" \"$path\"\n",
            exports = scratch.s("exports"),
            log = scratch.s("mount.log"),
            delay = scratch.s("delay"),
        );
        let mount = scratch.path("bin/mount");
        std::fs::write(&mount, script).unwrap();
        std::fs::set_permissions(&mount, std::fs::Permissions::from_mode(0o755)).unwrap();
        NfsStandIn { scratch }
    }

    /// PATH for envd with the stand-in first.
    pub fn path_env(&self) -> String {
        format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", self.scratch.s("bin"))
    }

    /// A new export directory.
    pub fn export(&self, name: &str) -> PathBuf {
        let dir = self.scratch.path(&format!("exports/{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// How long the next mounts take.
    pub fn set_delay(&self, seconds: u32) {
        std::fs::write(self.scratch.path("delay"), seconds.to_string()).unwrap();
    }

    /// The argument lists `mount` was called with so far.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.scratch.path("mount.log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

/// How many mounts sit at exactly `path` (from the mount table).
pub fn mounts_at(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.display().to_string();
    table.lines().filter(|line| line.split(' ').nth(4) == Some(wanted.as_str())).count()
}

/// Unmounts everything at `path` (tests clean up after themselves).
pub fn unmount_all(path: &Path) {
    while mounts_at(path) > 0 {
        let status = Command::new("umount").arg("--lazy").arg(path).status().unwrap();
        assert!(status.success(), "unmounting {}", path.display());
    }
}

/// A script printing what a command sees of the host's set-up: the mount
/// table at each volume path, the hash of the CA bundle, the events entry
/// and address.
pub fn fingerprint_script(files: &HostFiles, volumes: &[&Path]) -> String {
    let mut script = String::new();
    for volume in volumes {
        script.push_str(&format!(
            "findmnt -n -o FSTYPE,SOURCE --mountpoint {0} || echo 'nothing mounted at {0}'; ",
            volume.display()
        ));
    }
    script.push_str(&format!(
        "sha256sum < {}; grep events.e2b.local {}; echo \"events=$E2B_EVENTS_ADDRESS\"",
        files.bundle().display(),
        files.hosts().display()
    ));
    script
}

/// Unmounts everything at its path when dropped, even when a test fails,
/// before the scratch directory under it is removed.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        while mounts_at(&self.0) > 0 {
            if !Command::new("umount").arg("--lazy").arg(&self.0).status().is_ok_and(|s| s.success()) {
                break;
            }
        }
    }
}
