//! The CA of the host's egress proxy (`/init` `caBundle`), trusted by every
//! program that reads the system bundle.
//!
//! Order of effects, all under one lock so concurrent `/init`s never
//! interleave:
//!
//! 1. The PEM text is normalised to exactly one trailing newline; the same
//!    CA as last time changes nothing (every resume sends it again).
//! 2. The system bundle is rewritten with every copy of the previous CA and
//!    of this one removed and this one appended, then renamed into place
//!    (mode 0644): at no moment does a reader see a half-written bundle,
//!    the old CA is no longer trusted, and the new one is there once.
//! 3. The CA is kept as its own file (`e2b-ca.crt` under the local CA
//!    directory), so `update-ca-certificates` re-includes it whenever the
//!    bundle is rebuilt.
//!
//! The reference appends first and cleans up in the background; here the
//! whole rewrite is synchronous (a bundle is a few hundred KiB), so `/init`
//! returns with the bundle already in its final state.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::system_files;

/// Why the CA could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The bundle or the CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The blocking task died.
    #[error("installing the CA: {0}")]
    Task(String),
}

/// Installs the host's CA into the system bundle.
#[derive(Debug)]
pub struct CaBundle {
    bundle: PathBuf,
    own_file: PathBuf,
    /// The CA installed last (normalised), under the install lock.
    installed: tokio::sync::Mutex<Option<String>>,
}

impl CaBundle {
    /// An installer for the system `bundle`, keeping the CA in `own_file`.
    pub fn new(bundle: PathBuf, own_file: PathBuf) -> Arc<Self> {
        Arc::new(Self { bundle, own_file, installed: Default::default() })
    }

    /// Installs `pem` (order of effects in the module doc). Returns the
    /// normalised text that is now installed.
    pub async fn install(self: &Arc<Self>, pem: &str) -> Result<String, CaError> {
        let normalised = format!("{}\n", pem.trim_end_matches('\n'));
        let mut installed = self.installed.lock().await;
        if installed.as_deref() == Some(normalised.as_str()) {
            return Ok(normalised);
        }
        let previous = installed.clone();
        let this = self.clone();
        let new = normalised.clone();
        tokio::task::spawn_blocking(move || this.rewrite(previous.as_deref(), &new))
            .await
            .map_err(|e| CaError::Task(e.to_string()))??;
        *installed = Some(normalised.clone());
        Ok(normalised)
    }

    /// At start-up: the CA saved before a cold boot is trusted again when
    /// the bundle was rebuilt without it, and becomes the one a new CA
    /// replaces.
    pub fn restore(&self, pem: &str) {
        let normalised = format!("{}\n", pem.trim_end_matches('\n'));
        match std::fs::read_to_string(&self.bundle) {
            Ok(bundle) if bundle.contains(&normalised) => {}
            _ => {
                if let Err(err) = self.rewrite(None, &normalised) {
                    tracing::error!("trusting the saved CA again: {err}");
                    return;
                }
                tracing::info!("saved CA added to the rebuilt bundle");
            }
        }
        if let Ok(mut installed) = self.installed.try_lock() {
            *installed = Some(normalised);
        }
    }

    /// Steps 2 and 3 of the module doc.
    fn rewrite(&self, previous: Option<&str>, new: &str) -> Result<(), CaError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        let mut bundle = std::fs::read_to_string(&self.bundle).map_err(io(&self.bundle))?;
        for old in previous.into_iter().chain([new]) {
            bundle = bundle.replace(old, "");
        }
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(new);
        system_files::replace(&self.bundle, bundle.as_bytes(), 0o644).map_err(io(&self.bundle))?;
        if let Some(dir) = self.own_file.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        system_files::replace(&self.own_file, new.as_bytes(), 0o644).map_err(io(&self.own_file))
    }
}
