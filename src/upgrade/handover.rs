//! The handover between two images of envd: a JSON file (0600, in the run
//! directory, a tmpfs in a VM) and a sealed memfd for the secrets.
//!
//! The file names fds, pids and commands, never a secret: the token, its
//! hash and every env value go into a memfd that is sealed against writes
//! and reached only through an inherited fd, so they never touch a disk.
//! The file records the memfd's length and SHA-256, which binds the two.
//! The file is not fsynced: it is read by the same process a moment later,
//! and a crash in between ends the handover either way. It is removed as
//! soon as it is read, whatever its content.
//!
//! Compatibility: `format` and `version` must match exactly; fields this
//! image does not know are ignored, unless a writer lists their section in
//! `required`, which makes an image that does not know it refuse the file.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::forward::ForwardsPart;
use crate::fs::watchers::WatcherState;
use crate::host::workload_freeze::WorkloadPart;
use crate::process::ProcessesPart;
use crate::restore::TrackedState;

/// Identifies the file.
pub const FORMAT: &str = "envd-handover";
/// The layout version this image writes and reads.
pub const VERSION: u32 = 1;
/// What `--handover-version` prints: the format this image reads.
pub fn format_line() -> String {
    format!("{FORMAT} {VERSION}")
}

/// Sections this image can take over.
const KNOWN_SECTIONS: &[&str] = &[
    "processes",
    "ended",
    "freeze",
    "secrets",
    "watchers",
    "forwards",
    "relays",
    "commandCgroups",
    "templates",
    "logs",
];

/// Why a handover file was not taken over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Missing or unreadable.
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Not root's, or readable by others.
    #[error("the handover file must be root's and 0600, found uid {uid} mode {mode:o}")]
    Permissions {
        /// Owner.
        uid: u32,
        /// Mode bits.
        mode: u32,
    },
    /// Not JSON of this layout.
    #[error("corrupt handover file: {0}")]
    Corrupt(String),
    /// Another format or version.
    #[error("handover of format {format:?} version {version} is not understood by this envd")]
    Unknown {
        /// Its format.
        format: String,
        /// Its version.
        version: u32,
    },
    /// A section this image cannot take over.
    #[error("the handover requires section {0:?}, unknown to this envd")]
    UnknownSection(String),
    /// The memfd is missing, unsealed or does not match.
    #[error("the handover secrets are unusable: {0}")]
    Secrets(String),
}

/// The file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handover {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The version of the image that wrote it.
    pub from_version: String,
    /// Sections a reader must know to take the handover over.
    #[serde(default)]
    pub required: Vec<String>,
    /// Where the secrets are.
    pub secrets: SecretsRef,
    /// Running and recently ended processes.
    #[serde(flatten)]
    pub processes: ProcessesPart,
    /// The workload freeze in effect and the command-cgroup numbering.
    #[serde(flatten)]
    pub workload: WorkloadPart,
    /// Polling watchers with their queued events.
    #[serde(default)]
    pub watchers: Vec<WatcherState>,
    /// Forwarded ports' listening sockets and the connections being relayed.
    #[serde(flatten)]
    pub forwards: ForwardsPart,
    /// envd's own log lines not yet shipped to the host's collector (log
    /// lines hold no secret).
    #[serde(default)]
    pub logs: Vec<String>,
}

/// The sealed memfd holding [`Secrets`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretsRef {
    /// Its fd.
    pub fd: RawFd,
    /// Its length.
    pub len: usize,
    /// SHA-256 of its content, hex.
    pub sha256: String,
}

/// What never goes into the file. No `Debug`: nothing here may be logged.
#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secrets {
    /// The access token.
    pub token: Option<String>,
    /// Its hash from the metadata service.
    pub token_hash: Option<String>,
    /// Closed until one of them is known.
    pub fail_closed: bool,
    /// The exec context: default user.
    pub default_user: String,
    /// Default workdir.
    pub default_workdir: Option<String>,
    /// Env vars of the last `/init`.
    pub init_env: BTreeMap<String, String>,
    /// envd's own vars.
    pub internal_env: BTreeMap<String, String>,
    /// Each process's requested env vars, by pid.
    pub process_envs: BTreeMap<u32, BTreeMap<String, String>>,
    /// Processes tracked for a later template record (their environments
    /// are why they are here).
    #[serde(default)]
    pub tracked: Vec<TrackedState>,
}

/// Seals the secrets into a memfd (close-on-exec until the exec).
pub fn seal_secrets(secrets: &Secrets) -> std::io::Result<(OwnedFd, SecretsRef)> {
    let mut bytes = serde_json::to_vec(secrets).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"envd-handover".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    let written = file.write_all(&bytes);
    let digest = hex(&Sha256::digest(&bytes));
    let len = bytes.len();
    bytes.fill(0);
    written?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS on a memfd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = OwnedFd::from(file);
    let reference = SecretsRef { fd: fd.as_raw_fd(), len, sha256: digest };
    Ok((fd, reference))
}

/// Reads the secrets from their memfd, checking seal, length and digest.
pub fn open_secrets(fd: OwnedFd, reference: &SecretsRef) -> Result<Secrets, HandoverError> {
    let bad = |why: &str| HandoverError::Secrets(why.to_owned());
    // SAFETY: F_GET_SEALS on an fd we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_WRITE == 0 {
        return Err(bad("not a sealed memfd"));
    }
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::with_capacity(reference.len);
    file.rewind().and_then(|_| file.read_to_end(&mut bytes)).map_err(|e| bad(&e.to_string()))?;
    let matches = bytes.len() == reference.len && hex(&Sha256::digest(&bytes)) == reference.sha256;
    let secrets =
        if matches { serde_json::from_slice(&bytes).map_err(|_| bad("not JSON")) } else { Err(bad("digest")) };
    bytes.fill(0);
    secrets
}

/// Writes the file; any earlier one at that path is replaced.
pub fn write(path: &Path, handover: &Handover) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(&serde_json::to_vec(handover).map_err(std::io::Error::other)?)
}

/// Reads and removes the file, and checks it can be taken over.
pub fn read(path: &Path) -> Result<Handover, HandoverError> {
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path);
    let _ = std::fs::remove_file(path);
    let mut file = opened.map_err(|e| HandoverError::Read(path.to_owned(), e))?;
    let meta = file.metadata().map_err(|e| HandoverError::Read(path.to_owned(), e))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(HandoverError::Permissions { uid: meta.uid(), mode: meta.mode() & 0o7777 });
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(|e| HandoverError::Read(path.to_owned(), e))?;
    let header: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| HandoverError::Corrupt(format!("{:?} error", e.classify())))?;
    let format = header["format"].as_str().unwrap_or_default().to_owned();
    let version = header["version"].as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    if format != FORMAT || version != VERSION {
        return Err(HandoverError::Unknown { format, version });
    }
    let handover: Handover = serde_json::from_value(header).map_err(|e| HandoverError::Corrupt(e.to_string()))?;
    if let Some(section) = handover.required.iter().find(|s| !KNOWN_SECTIONS.contains(&s.as_str())) {
        return Err(HandoverError::UnknownSection(section.clone()));
    }
    Ok(handover)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(required: Vec<String>) -> Handover {
        Handover {
            format: FORMAT.into(),
            version: VERSION,
            from_version: "0.0.1".into(),
            required,
            secrets: SecretsRef { fd: 3, len: 0, sha256: String::new() },
            processes: ProcessesPart::default(),
            workload: WorkloadPart::default(),
            watchers: Vec::new(),
            forwards: ForwardsPart::default(),
            logs: Vec::new(),
        }
    }

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("envd-handover-unit-{name}-{}", std::process::id()))
    }

    #[test]
    fn written_file_is_private_read_once_and_free_of_secrets() {
        let file = path("roundtrip");
        let secrets = Secrets { token: Some("tok-secret-1".into()), ..Default::default() };
        let (fd, reference) = seal_secrets(&secrets).unwrap();
        let mut handover = sample(vec!["processes".into()]);
        handover.secrets = reference.clone();
        write(&file, &handover).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("tok-secret-1"), "the token stays out of the file");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        let read_back = read(&file).unwrap();
        assert!(!file.exists(), "removed once read");
        assert_eq!(read_back.secrets.sha256, reference.sha256);
        assert_eq!(open_secrets(fd, &reference).unwrap().token.as_deref(), Some("tok-secret-1"));
    }

    /// A handover as envd 0.7.0 wrote it, every section filled: each
    /// module's part reads its values and writes them back under the same
    /// names, so images before and after the parts were split still hand
    /// over to each other.
    const WRITTEN_BY_0_7_0: &str = r#"{
        "format": "envd-handover", "version": 1, "fromVersion": "0.7.0",
        "required": ["processes", "secrets"],
        "secrets": {"fd": 3, "len": 10, "sha256": "ab"},
        "processes": [{"pid": 42, "tag": "server", "cmd": "python3", "args": ["-m", "http.server"],
            "cwd": "/home/user", "stdoutFd": 5, "stderrFd": 6, "stdinFd": 7, "ptyFd": null,
            "deadlineMs": 1000, "reaped": {"exitCode": 1, "exited": true, "status": "exit status 1",
            "error": "exit status 1"}, "cgroup": "/sys/fs/cgroup/envd/commands/c7"}],
        "ended": [{"pid": 41, "tag": null, "end": {"exitCode": -1, "exited": false,
            "status": "signal: killed", "error": "signal: killed"}, "ageMs": 5}],
        "freeze": {"active": true, "mode": "hierarchy", "guest_frozen": ["user.slice"]},
        "watchers": [],
        "forwards": [{"port": 8080, "target": "127.0.0.1:8080", "fd": 8}],
        "relays": [{"target": "127.0.0.1:8080", "client": 9, "server": 10, "upstream": [11, 12],
            "downstream": [13, 14]}],
        "nextCommandCgroup": 7,
        "logs": ["a line not yet shipped"]
    }"#;

    #[test]
    fn a_handover_of_0_7_0_is_read_and_written_back_field_by_field() {
        let written: serde_json::Value = serde_json::from_str(WRITTEN_BY_0_7_0).unwrap();
        let mut handover: Handover = serde_json::from_value(written.clone()).unwrap();
        let process = &handover.processes.processes[0];
        assert_eq!((process.pid, process.stdout_fd, process.deadline_ms), (42, Some(5), Some(1000)));
        assert_eq!(process.reaped.as_ref().map(|r| r.exit_code), Some(1));
        assert_eq!(handover.processes.ended[0].age, std::time::Duration::from_millis(5));
        assert_eq!(handover.workload.next_command_cgroup, 7);
        assert!(handover.workload.freeze.active);
        assert_eq!(handover.forwards.relays[0].downstream, [13, 14]);
        assert_eq!(handover.logs, ["a line not yet shipped"]);
        let fds: Vec<RawFd> = [&mut handover.processes as &mut dyn crate::record::NamesFds, &mut handover.forwards]
            .into_iter()
            .flat_map(|part| part.fds_mut().into_iter().map(|fd| *fd).collect::<Vec<_>>())
            .collect();
        assert_eq!(fds, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "every fd the file names is claimed");
        assert_eq!(serde_json::to_value(&handover).unwrap(), written);
    }

    #[test]
    fn unknown_required_sections_and_versions_are_refused() {
        let file = path("unknown");
        write(&file, &sample(vec!["volumes".into()])).unwrap();
        assert!(matches!(read(&file), Err(HandoverError::UnknownSection(s)) if s == "volumes"));
        let mut newer = sample(Vec::new());
        newer.version = VERSION + 1;
        write(&file, &newer).unwrap();
        assert!(matches!(read(&file), Err(HandoverError::Unknown { .. })));
    }

    #[test]
    fn a_memfd_that_does_not_match_is_refused() {
        let (fd, mut reference) = seal_secrets(&Secrets::default()).unwrap();
        reference.sha256 = "00".into();
        assert!(matches!(open_secrets(fd, &reference), Err(HandoverError::Secrets(_))));
    }
}
