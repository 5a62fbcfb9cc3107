//! How a process ended, in the reference's (Go's) words: `exit status 3`,
//! `signal: killed`, with `exit_code` −1 for a signal death.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The end of a process as clients see it (and as the upgrade handover
/// writes it down).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndStatus {
    /// The exit status, or −1 when a signal ended the process.
    pub exit_code: i32,
    /// True iff the process exited normally.
    pub exited: bool,
    /// `exit status N` or `signal: NAME[ (core dumped)]`.
    pub status: String,
    /// Absent on a zero exit; otherwise the same text as `status`.
    pub error: Option<String>,
}

impl EndStatus {
    /// Describes a reaped process.
    pub fn from_exit(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            return Self::exited_with(code);
        }
        let signal = status.signal().unwrap_or(0);
        let mut text = format!("signal: {}", signal_name(signal));
        if status.core_dumped() {
            text.push_str(" (core dumped)");
        }
        EndStatus { exit_code: -1, exited: false, error: Some(text.clone()), status: text }
    }

    /// A normal exit with `code`.
    pub fn exited_with(code: i32) -> Self {
        let text = format!("exit status {code}");
        EndStatus { exit_code: code, exited: true, error: (code != 0).then(|| text.clone()), status: text }
    }

    /// A process whose status could not be read (the wait itself failed).
    pub fn from_wait_error(err: &std::io::Error) -> Self {
        let text = format!("wait: {err}");
        EndStatus { exit_code: -1, exited: false, status: text.clone(), error: Some(text) }
    }
}

/// Go's names for Linux signals; above 31 it prints `signal N`.
fn signal_name(signal: i32) -> String {
    const NAMES: [&str; 31] = [
        "hangup",
        "interrupt",
        "quit",
        "illegal instruction",
        "trace/breakpoint trap",
        "aborted",
        "bus error",
        "floating point exception",
        "killed",
        "user defined signal 1",
        "segmentation fault",
        "user defined signal 2",
        "broken pipe",
        "alarm clock",
        "terminated",
        "stack fault",
        "child exited",
        "continued",
        "stopped (signal)",
        "stopped",
        "stopped (tty input)",
        "stopped (tty output)",
        "urgent I/O condition",
        "CPU time limit exceeded",
        "file size limit exceeded",
        "virtual timer expired",
        "profiling timer expired",
        "window changed",
        "I/O possible",
        "power failure",
        "bad system call",
    ];
    match usize::try_from(signal).ok().and_then(|s| s.checked_sub(1)).and_then(|i| NAMES.get(i)) {
        Some(name) => (*name).to_owned(),
        None => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_exits() {
        let ok = EndStatus::from_exit(ExitStatus::from_raw(0));
        assert_eq!(ok, EndStatus { exit_code: 0, exited: true, status: "exit status 0".into(), error: None });
        let three = EndStatus::from_exit(ExitStatus::from_raw(3 << 8));
        assert_eq!(three.exit_code, 3);
        assert_eq!(three.error.as_deref(), Some("exit status 3"));
    }

    #[test]
    fn signal_deaths() {
        let killed = EndStatus::from_exit(ExitStatus::from_raw(9));
        assert_eq!(
            killed,
            EndStatus {
                exit_code: -1,
                exited: false,
                status: "signal: killed".into(),
                error: Some("signal: killed".into())
            }
        );
        let core = EndStatus::from_exit(ExitStatus::from_raw(11 | 0x80));
        assert_eq!(core.status, "signal: segmentation fault (core dumped)");
        assert_eq!(EndStatus::from_exit(ExitStatus::from_raw(40)).status, "signal: signal 40");
        assert_eq!(EndStatus::from_exit(ExitStatus::from_raw(31)).status, "signal: bad system call");
    }
}
