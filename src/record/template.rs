//! The template-process record: what restarting each template process
//! needs, kept in the persisted exec context (written atomically and
//! fsync'd with it, mode 0600, see `context::state`). It holds env vars,
//! as the saved `/init` env vars already are, and never the access token.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the kernel publishes the id of the current boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The template processes of the sandbox, as last known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// The boot in which the processes below were running: a start-up in
    /// the same boot is an envd restart, not a cold boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The sandbox identity (`instanceID`) of the last authorised `/init`.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// The template processes still running, in the order they were started.
    #[serde(default)]
    pub processes: Vec<TemplateProcess>,
}

/// One template process: exactly how it was started, and what shows it
/// is back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateProcess {
    /// The program, as requested.
    pub cmd: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The request's own env vars (what `Process.List` reports).
    #[serde(default)]
    pub request_envs: BTreeMap<String, String>,
    /// The cwd as requested, if any (what `Process.List` reports).
    #[serde(default)]
    pub requested_cwd: Option<String>,
    /// The complete environment less envd's own `E2B_*` variables, which
    /// the restarted process gets from the current sandbox.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The user it runs as (groups are looked up again at restart).
    pub user: String,
    /// The resolved working directory.
    pub cwd: String,
    /// The tag given at start.
    #[serde(default)]
    pub tag: Option<String>,
    /// Pipes (with or without stdin) or a terminal of a size.
    pub stdio: RecordedStdio,
    /// TCP ports the process or its children listened on when recorded.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Its pid in the boot named by the record.
    pub pid: u32,
    /// Its start time in clock ticks since that boot (with the pid, one
    /// process even across pid reuse).
    #[serde(default)]
    pub start_time: Option<u64>,
}

/// How the process's standard streams were connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedStdio {
    /// Separate stdout and stderr pipes; stdin a pipe or `/dev/null`.
    Pipes {
        /// Whether stdin was a pipe.
        stdin: bool,
    },
    /// A terminal.
    Pty {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

/// The id of the current boot, or `None` when it cannot be read.
pub fn read_boot_id(path: &Path) -> Option<String> {
    let id = std::fs::read_to_string(path).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_record_round_trips_and_old_files_load() {
        let record: TemplateRecord = serde_json::from_str("{}").unwrap();
        assert_eq!(record, TemplateRecord::default());
        let process = TemplateProcess {
            cmd: "python3".into(),
            args: vec!["-m".into(), "http.server".into()],
            request_envs: [("A".to_owned(), "1".to_owned())].into(),
            requested_cwd: None,
            env: vec![("A".into(), "1".into())],
            user: "user".into(),
            cwd: "/home/user".into(),
            tag: Some("jupyter".into()),
            stdio: RecordedStdio::Pty { cols: 80, rows: 24 },
            ports: vec![8888],
            pid: 42,
            start_time: Some(7),
        };
        let record = TemplateRecord { boot_id: Some("b".into()), sandbox: None, processes: vec![process] };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<TemplateRecord>(&json).unwrap(), record);
    }
}
