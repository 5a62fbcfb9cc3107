//! The exec context on disk, so that a cold boot (the VM rebooted from its
//! disk) runs commands exactly as before the pause. Written atomically:
//! temporary file, fsync, rename, fsync of the directory; mode 0600. It
//! never holds the access token, only whether the sandbox had one.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::TemplateRecord;

/// The file name under the state directory.
const FILE_NAME: &str = "exec-context.json";
/// Bumped when the layout changes incompatibly.
const FORMAT: u32 = 1;

/// What survives a cold boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedContext {
    /// Layout version.
    pub format: u32,
    /// The default user.
    pub default_user: String,
    /// The default workdir, if one was set.
    pub default_workdir: Option<String>,
    /// The env vars of the last `/init`.
    pub env_vars: BTreeMap<String, String>,
    /// Whether an access token was in force: after a cold boot envd then
    /// refuses token-protected requests until it knows the token or its hash.
    pub secured: bool,
    /// The template processes a cold boot starts again (absent in files
    /// written before they were recorded).
    #[serde(default)]
    pub template_processes: TemplateRecord,
    /// What `/init` set up in the system besides; absent in older files.
    #[serde(default)]
    pub host: HostSetup,
}

/// What the host set up through `/init` beyond the exec context, brought
/// back at start-up. None of it is secret: an address, a public CA
/// certificate, NFS targets and paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSetup {
    /// The events address (`hyperloopIP`).
    #[serde(default)]
    pub events_address: Option<std::net::IpAddr>,
    /// The CA of the egress proxy (PEM).
    #[serde(default)]
    pub ca_bundle: Option<String>,
    /// The volumes of the last `/init` that mounted them all.
    #[serde(default)]
    pub volumes: Vec<crate::record::VolumeMount>,
    /// The lifecycle those volumes were mounted for.
    #[serde(default)]
    pub lifecycle_id: String,
}

/// Why the bytes of a state file are not a saved context.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    /// Not the JSON of a saved context.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Written by a layout this envd does not know.
    #[error("unknown format {0}")]
    UnknownFormat(u32),
    /// A saved context always names its default user.
    #[error("empty default user")]
    NoDefaultUser,
}

impl SavedContext {
    /// Parses a state file's bytes; the error says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<SavedContext, StateFormatError> {
        let saved: SavedContext = serde_json::from_slice(bytes)?;
        if saved.format != FORMAT {
            return Err(StateFormatError::UnknownFormat(saved.format));
        }
        if saved.default_user.is_empty() {
            return Err(StateFormatError::NoDefaultUser);
        }
        Ok(saved)
    }

    /// A record in the current layout.
    pub fn new(
        default_user: String,
        default_workdir: Option<String>,
        env_vars: BTreeMap<String, String>,
        secured: bool,
    ) -> Self {
        Self {
            format: FORMAT,
            default_user,
            default_workdir,
            env_vars,
            secured,
            template_processes: TemplateRecord::default(),
            host: HostSetup::default(),
        }
    }

    /// The same record with `host` as the host's set-up.
    pub fn with_host(mut self, host: HostSetup) -> Self {
        self.host = host;
        self
    }
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is empty, truncated or not ours.
    #[error("{path}: not a valid state file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: StateFormatError,
    },
}

/// The state file under a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
    path: PathBuf,
}

impl StateFile {
    /// The state file in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), path: dir.join(FILE_NAME) }
    }

    /// The saved context; `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<SavedContext>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path: self.path.clone(), source }),
        };
        SavedContext::parse(&bytes).map(Some).map_err(|reason| StateError::Corrupt { path: self.path.clone(), reason })
    }

    /// Replaces the saved context atomically and durably.
    pub fn save(&self, context: &SavedContext) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let temporary = self.dir.join(format!(".{FILE_NAME}.tmp"));
        let json = serde_json::to_vec_pretty(context).map_err(|e| io(&temporary)(std::io::Error::other(e)))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io(&temporary))?;
        file.write_all(&json).map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        drop(file);
        std::fs::rename(&temporary, &self.path).map_err(io(&self.path))?;
        std::fs::File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("envd-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trip_is_private_and_atomic() {
        let dir = scratch("roundtrip");
        let file = StateFile::new(&dir);
        assert!(file.load().unwrap().is_none());
        let saved = SavedContext::new(
            "user".into(),
            Some("/home/user".into()),
            [("A".to_owned(), "1".to_owned())].into(),
            true,
        );
        file.save(&saved).unwrap();
        assert_eq!(file.load().unwrap(), Some(saved));
        let mode = std::fs::metadata(dir.join(FILE_NAME)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_without_the_host_setup_still_load() {
        let old = br#"{"format":1,"default_user":"u","default_workdir":null,"env_vars":{},"secured":false}"#;
        assert_eq!(SavedContext::parse(old).unwrap().host, HostSetup::default());
    }

    #[test]
    fn damaged_files_are_reported() {
        let dir = scratch("damaged");
        std::fs::create_dir_all(&dir).unwrap();
        let file = StateFile::new(&dir);
        for content in [
            &b""[..],
            b"{\"format\":1,\"default_us",
            b"\x00\x01garbage",
            b"{\"format\":9,\"default_user\":\"u\",\"default_workdir\":null,\"env_vars\":{},\"secured\":false}",
        ] {
            std::fs::write(dir.join(FILE_NAME), content).unwrap();
            assert!(matches!(file.load(), Err(StateError::Corrupt { .. })), "{content:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
