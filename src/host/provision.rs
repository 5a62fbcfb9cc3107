//! What `/init` sets up in the system beyond the exec context (the events
//! address, the egress proxy's CA, NFS volumes), the record of it that the
//! state file keeps, and bringing it all back at start-up.
//!
//! At start-up, before the listener answers: the hosts entry and the CA are
//! rewritten if the disk lost them (small files, no waiting), and the
//! volumes start mounting in the background; commands wait for those
//! (see `volumes`). The record changes only after a step succeeded, so a
//! cold boot never retries what the host's last `/init` could not do.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::ca_bundle::{CaBundle, CaError};
use super::events_host;
use super::volumes::{VolumeError, Volumes};
use crate::context::state::HostSetup;
use crate::record::VolumeMount;

/// Where the system files live (flags, so tests use scratch files).
#[derive(Debug, Clone)]
pub struct SystemPaths {
    /// The hosts file (`/etc/hosts`).
    pub hosts_file: PathBuf,
    /// The system CA bundle.
    pub ca_bundle: PathBuf,
    /// Where the CA is kept as its own file.
    pub ca_file: PathBuf,
    /// How long commands wait for volumes being mounted (and a start-up
    /// restore retries).
    pub volume_wait: std::time::Duration,
}

/// Applies and restores the host's set-up.
#[derive(Debug)]
pub struct Provisioner {
    paths: SystemPaths,
    record: Mutex<HostSetup>,
    ca: Arc<CaBundle>,
    volumes: Arc<Volumes>,
}

impl Provisioner {
    /// A provisioner over `paths`; nothing is touched yet.
    pub fn new(paths: SystemPaths) -> Arc<Self> {
        let ca = CaBundle::new(paths.ca_bundle.clone(), paths.ca_file.clone());
        let volumes = Arc::new(Volumes::new(paths.volume_wait));
        Arc::new(Self { paths, record: Mutex::default(), ca, volumes })
    }

    /// The volumes, for commands that must wait for them.
    pub fn volumes(&self) -> &Arc<Volumes> {
        &self.volumes
    }

    /// The record for the state file.
    pub fn record(&self) -> HostSetup {
        self.lock_record().clone()
    }

    /// Points `events.e2b.local` at `address`. A hosts file that cannot be
    /// written is logged, not fatal: the env var still carries the address.
    pub fn set_events_address(&self, address: IpAddr) {
        match events_host::set_events_address(&self.paths.hosts_file, address) {
            Ok(()) => self.lock_record().events_address = Some(address),
            Err(err) => tracing::error!("writing the events address to {}: {err}", self.paths.hosts_file.display()),
        }
    }

    /// Trusts the egress proxy's CA instead of the previous one.
    pub async fn install_ca(&self, pem: &str) -> Result<(), CaError> {
        let installed = self.ca.install(pem).await?;
        self.lock_record().ca_bundle = Some(installed);
        Ok(())
    }

    /// Mounts the volumes for the lifecycle (none given: the empty one).
    pub async fn mount_volumes(&self, lifecycle: Option<&str>, volumes: Vec<VolumeMount>) -> Result<(), VolumeError> {
        let lifecycle = lifecycle.unwrap_or("");
        self.volumes.mount_all(lifecycle, &volumes).await?;
        let mut record = self.lock_record();
        record.volumes = volumes;
        record.lifecycle_id = lifecycle.to_owned();
        Ok(())
    }

    /// Brings back what a cold boot may have lost (order in the module doc).
    pub fn restore(&self, saved: HostSetup) {
        if let Some(address) = saved.events_address
            && let Err(err) = events_host::set_events_address(&self.paths.hosts_file, address)
        {
            tracing::error!("restoring the events address: {err}");
        }
        if let Some(pem) = &saved.ca_bundle {
            self.ca.restore(pem);
        }
        self.volumes.restore(saved.lifecycle_id.clone(), saved.volumes.clone());
        *self.lock_record() = saved;
    }

    fn lock_record(&self) -> std::sync::MutexGuard<'_, HostSetup> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}
