//! Command-line flags. Both the GNU spellings (`--port`) and the Go
//! reference's single-dash spellings (`-port`, `-isnotfc`) are accepted,
//! because systemd units and tooling written for the reference pass those.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Firecracker's metadata service, reachable from every guest.
pub const DEFAULT_MMDS_ADDRESS: &str = crate::host::mmds::MMDS_ADDRESS;

/// The port the SDKs and the orchestrator expect.
pub const DEFAULT_PORT: u16 = 49983;

/// The guest address the sandbox proxy connects to, as in the reference.
pub const DEFAULT_FORWARD_ADDRESS: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 0, 21));

/// envd's flags.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "envd",
    about = "The sandbox agent: processes, terminals and files over Connect",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Config {
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Print the commit the binary was built from and exit.
    #[arg(long)]
    pub commit: bool,
    /// TCP port to listen on (all interfaces).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: std::net::IpAddr,
    /// Run outside a Firecracker VM: no metadata service, no clock steps.
    #[arg(long, visible_alias = "isnotfc")]
    pub dev: bool,
    /// Default user before any /init.
    #[arg(long, value_name = "NAME")]
    pub default_user: Option<String>,
    /// Default working directory before any /init.
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub default_workdir: Option<String>,
    /// Where the exec context survives a cold boot (on the root filesystem).
    #[arg(long, default_value = "/var/lib/envd")]
    pub state_dir: PathBuf,
    /// The metadata service (Firecracker MMDS v2), host:port. In --dev it
    /// is used only when given explicitly.
    #[arg(long, value_name = "HOST:PORT")]
    pub mmds_address: Option<String>,
    /// Where the sandbox identity files are written (a tmpfs).
    #[arg(long, value_name = "DIR", default_value = "/run/e2b")]
    pub run_dir: PathBuf,
    /// Root of the cgroup v2 hierarchy that holds the workload cgroups.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Do not place processes into cgroups; freezing becomes a no-op.
    #[arg(long)]
    pub no_cgroups: bool,
    /// Mount point that /fsfreeze freezes (refused in --dev unless given).
    #[arg(long, value_name = "PATH")]
    pub freeze_path: Option<PathBuf>,
    /// Running time after which a forgotten filesystem freeze is thawed.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub freeze_deadline: u64,
    /// Running time after which a workload freeze that nobody thawed is thawed.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub freeze_watchdog: u64,
    /// The one path `/upgrade` writes a delivered binary to.
    #[arg(long, value_name = "PATH", default_value = crate::upgrade::DEFAULT_UPGRADE_PATH)]
    pub upgrade_path: PathBuf,
    /// Running time after an upgrade at which the workload is thawed if no
    /// `/init` came.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub upgrade_thaw_fallback: u64,
    /// Internal (live upgrade): check these flags, print the handover format
    /// this binary reads, and exit; an upgrade execs only a binary that
    /// answers with the format the running one writes.
    #[arg(long, hide = true)]
    pub handover_version: bool,
    /// Internal (live upgrade): the listening socket to serve instead of binding.
    #[arg(long, value_name = "FD", hide = true)]
    pub listen_fd: Option<i32>,
    /// Internal (live upgrade): the handover file to take over.
    #[arg(long, value_name = "PATH", hide = true)]
    pub handover: Option<PathBuf>,
    /// Internal (live upgrade): the fds carried across the exec.
    #[arg(long, value_name = "FD,FD,...", hide = true, default_value = "")]
    pub handover_fds: String,
    /// Close a connection whose request head is not whole this long after
    /// it opened or, kept alive, after the head's first byte.
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,
    /// Close a connection with no request in flight after this long (above
    /// the sandbox proxy's own idle timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 640, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
    /// Close a connection whose client takes nothing of a response for
    /// this long (a download never read).
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub response_idle_timeout: u64,
    /// Connections that have sent no request yet, at most; each one more
    /// closes the oldest of them silent for over a fifth of the header
    /// timeout.
    #[arg(long, value_name = "COUNT", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_silent_connections: u64,
    /// Abort an upload whose body sends nothing for this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub upload_idle_timeout: u64,
    /// Do not start the template's processes again after a cold boot.
    #[arg(long)]
    pub no_restore: bool,
    /// Longest the first /init after a cold boot waits for the restored
    /// processes to listen again.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub restore_limit: u64,
    /// The file holding the current boot id (tells a cold boot from an
    /// envd restart).
    #[arg(long, value_name = "PATH", default_value = crate::record::template::BOOT_ID_PATH)]
    pub boot_id_path: PathBuf,
    /// The hosts file that maps events.e2b.local to the /init events address.
    #[arg(long, value_name = "PATH", default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,
    /// The system CA bundle that the /init CA is added to.
    #[arg(long, value_name = "PATH", default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub ca_bundle: PathBuf,
    /// Where the /init CA is also kept as its own certificate file.
    #[arg(long, value_name = "PATH", default_value = "/usr/local/share/ca-certificates/e2b-ca.crt")]
    pub ca_file: PathBuf,
    /// How long a command waits for NFS volumes still being mounted, and
    /// how long they are retried after a cold boot.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub volume_wait: u64,
    /// Address on which listeners bound only to loopback are made
    /// reachable, port for port (default 169.254.0.21; in --dev only when given).
    #[arg(long, value_name = "IP")]
    pub forward_address: Option<std::net::IpAddr>,
    /// Do not forward loopback listeners at all.
    #[arg(long)]
    pub no_forward: bool,
    /// Forwarded connections open at once; further ones wait in the backlog.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub forward_max_connections: usize,
    /// Log debug details.
    #[arg(long)]
    pub verbose: bool,
}

/// Flags the Go reference spells with one dash.
const LONG_FLAGS: &[&str] = &[
    "version",
    "commit",
    "port",
    "bind",
    "dev",
    "isnotfc",
    "default-user",
    "default-workdir",
    "state-dir",
    "mmds-address",
    "run-dir",
    "cgroup-root",
    "no-cgroups",
    "freeze-path",
    "freeze-deadline",
    "freeze-watchdog",
    "upgrade-path",
    "upgrade-thaw-fallback",
    "upload-idle-timeout",
    "no-restore",
    "restore-limit",
    "boot-id-path",
    "hosts-file",
    "ca-bundle",
    "ca-file",
    "volume-wait",
    "forward-address",
    "no-forward",
    "forward-max-connections",
    "verbose",
    "help",
];

impl Config {
    /// Parses the process arguments, accepting Go-style `-flag` spellings.
    pub fn from_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Self, clap::Error> {
        Config::try_parse_from(args.into_iter().map(widen_single_dash))
    }

    /// The socket address to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// The metadata service to read, if any: none in `--dev` unless an
    /// address was given.
    pub fn metadata_address(&self) -> Option<&str> {
        match (&self.mmds_address, self.dev) {
            (Some(address), _) => Some(address),
            (None, true) => None,
            (None, false) => Some(DEFAULT_MMDS_ADDRESS),
        }
    }

    /// The filesystem `/fsfreeze` freezes: `/` in a VM; in `--dev` only an
    /// explicitly given path, since freezing a workstation's root hangs it.
    pub fn freeze_target(&self) -> Option<&std::path::Path> {
        match (&self.freeze_path, self.dev) {
            (Some(path), _) => Some(path),
            (None, true) => None,
            (None, false) => Some(std::path::Path::new("/")),
        }
    }

    /// How template processes are restored.
    pub fn restore_options(&self) -> crate::restore::RestoreOptions {
        crate::restore::RestoreOptions {
            enabled: !self.no_restore,
            limit: Duration::from_secs(self.restore_limit),
            boot_id_path: self.boot_id_path.clone(),
        }
    }

    /// The system files `/init` writes.
    pub fn system_paths(&self) -> crate::host::provision::SystemPaths {
        crate::host::provision::SystemPaths {
            hosts_file: self.hosts_file.clone(),
            ca_bundle: self.ca_bundle.clone(),
            ca_file: self.ca_file.clone(),
            volume_wait: Duration::from_secs(self.volume_wait),
        }
    }

    /// Where loopback listeners are forwarded to, if anywhere: the
    /// reference's address in a VM; in `--dev` only an explicit one.
    pub fn forward_target(&self) -> Option<std::net::IpAddr> {
        match (self.forward_address, self.dev, self.no_forward) {
            (_, _, true) => None,
            (Some(address), _, false) => Some(address),
            (None, true, false) => None,
            (None, false, false) => Some(DEFAULT_FORWARD_ADDRESS),
        }
    }

    /// How long an upload body may stay silent.
    pub fn upload_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.upload_idle_timeout)
    }
}

/// `-port=1` → `--port=1` for known flag names; anything else unchanged.
fn widen_single_dash(arg: OsString) -> OsString {
    let Some(text) = arg.to_str() else { return arg };
    let Some(rest) = text.strip_prefix('-') else { return arg };
    if rest.starts_with('-') {
        return arg;
    }
    let name = rest.split('=').next().unwrap_or(rest);
    if LONG_FLAGS.contains(&name) { OsString::from(format!("-{text}")) } else { arg }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let argv = std::iter::once("envd").chain(args.iter().copied()).map(OsString::from);
        Config::from_args(argv).expect("valid flags")
    }

    #[test]
    fn go_spellings_are_accepted() {
        let config = parse(&["-port", "5000", "-isnotfc", "-no-cgroups", "-cgroup-root=/tmp/cg", "-verbose"]);
        assert_eq!(config.port, 5000);
        assert!(config.dev && config.no_cgroups && config.verbose);
        assert_eq!(config.cgroup_root, PathBuf::from("/tmp/cg"));
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = parse(&[]);
        assert_eq!(config.port, 49983);
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/envd"));
        assert_eq!(config.metadata_address(), Some("169.254.169.254:80"));
        assert_eq!(config.freeze_target(), Some(std::path::Path::new("/")));
        assert_eq!(config.forward_target(), Some(DEFAULT_FORWARD_ADDRESS));
        assert!(!config.dev);
        assert_eq!(parse(&["--dev"]).forward_target(), None);
        assert_eq!(parse(&["-no-forward"]).forward_target(), None);
        let forwarded = parse(&["--dev", "-forward-address", "127.0.0.2"]).forward_target();
        assert_eq!(forwarded, Some("127.0.0.2".parse().unwrap()));
        let dev = parse(&["--dev"]);
        assert_eq!((dev.metadata_address(), dev.freeze_target()), (None, None));
        let explicit = parse(&["--dev", "--mmds-address", "127.0.0.1:1", "--freeze-path", "/mnt/x"]);
        assert_eq!(explicit.metadata_address(), Some("127.0.0.1:1"));
        assert_eq!(explicit.freeze_target(), Some(std::path::Path::new("/mnt/x")));
    }

    #[test]
    fn unknown_single_dash_words_stay_values() {
        let config = parse(&["--default-workdir", "-weird"]);
        assert_eq!(config.default_workdir.as_deref(), Some("-weird"));
    }
}
