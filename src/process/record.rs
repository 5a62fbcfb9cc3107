//! One running process as envd writes it down for the next image in a
//! live upgrade: the one description of a process that the outgoing image
//! exports and the incoming one adopts (`handover`). Its JSON is that of
//! the handover's `processes` section.

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::CommandConfig;
use super::status::EndStatus;
use crate::record::NamesFds;

/// A running process: who it is, what was asked, its fds by number, and
/// how far along it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// Its pid (still a child of envd's process).
    pub pid: u32,
    /// The tag given at start.
    pub tag: Option<String>,
    /// The command as requested (its env values travel apart).
    #[serde(flatten)]
    pub command: CommandConfig,
    /// stdout read end, while its pump holds it.
    pub stdout_fd: Option<RawFd>,
    /// stderr read end, while its pump holds it.
    pub stderr_fd: Option<RawFd>,
    /// stdin write end, while open.
    pub stdin_fd: Option<RawFd>,
    /// Its terminal's master side.
    pub pty_fd: Option<RawFd>,
    /// Milliseconds left until it is killed.
    pub deadline_ms: Option<u64>,
    /// Already reaped, with this status, its output not yet drained.
    pub reaped: Option<EndStatus>,
    /// Its own cgroup's directory, if it has one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

impl NamesFds for ProcessRecord {
    fn fds_mut(&mut self) -> Vec<&mut RawFd> {
        [&mut self.stdout_fd, &mut self.stderr_fd, &mut self.stdin_fd, &mut self.pty_fd]
            .into_iter()
            .filter_map(Option::as_mut)
            .collect()
    }
}
