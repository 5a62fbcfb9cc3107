//! The outgoing image's last steps: duplicate the carried fds, write the
//! handover, clear close-on-exec on exactly those fds, `execve`.
//!
//! The duplicates are made close-on-exec, so a fork before the exec could
//! not inherit them (starts are paused anyway, and every spawned child
//! marks its fds above 2 close-on-exec before its own exec); the flag is
//! cleared only in the last moment before `execve`, on this thread.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::handover::{self, Handover, Secrets};
use super::{Daemon, UpgradeError};
use crate::process::ProcessesPart;
use crate::record::carry_into;
use crate::telemetry::ship::LogShipper;

/// Longest wait for envd's queued lines to reach stderr before the exec.
const STDERR_DRAIN: std::time::Duration = std::time::Duration::from_millis(300);

/// Flags of one handover, dropped from the argv of the next.
pub(super) const HANDOVER_FLAGS: &[&str] = &["--listen-fd", "--handover", "--handover-fds"];

/// Never returns on success.
pub(super) fn hand_over_and_exec(daemon: &Daemon, program: &Path) -> UpgradeError {
    let mut carried = Vec::new();
    let handover_path = daemon.run_dir.join(format!("envd-handover.{}.json", std::process::id()));
    let prepared = prepare(daemon, &mut carried).and_then(|(mut handover, listener)| {
        tracing::info!(fds = carried.len(), "handing over and executing the new image");
        // Taken last, so the line above is shipped by the next image too.
        handover.logs = unshipped_lines(daemon);
        handover::write(&handover_path, &handover)?;
        Ok(listener)
    });
    let listener = match prepared {
        Ok(listener) => listener,
        Err(err) => return UpgradeError::Handover(err),
    };
    let fds: Vec<RawFd> = carried.iter().map(AsRawFd::as_raw_fd).collect();
    // The writer thread ends with this image: let it catch up (bounded: a
    // frozen journal must not hold the upgrade).
    crate::telemetry::wait_written(STDERR_DRAIN);
    let err = exec(program, listener, &handover_path, &fds);
    let _ = std::fs::remove_file(&handover_path);
    drop(carried);
    UpgradeError::Exec(err)
}

/// The handover and the carried fds (the listener's duplicate returned):
/// each module exports its part, passing its fds through `carry_into`.
fn prepare(daemon: &Daemon, carried: &mut Vec<OwnedFd>) -> std::io::Result<(Handover, RawFd)> {
    let listener = carry_into(daemon.listener, carried)?;
    let mut carry_fd = |fd| carry_into(fd, carried);
    let processes = daemon.processes.export(&mut carry_fd)?;
    let forwards = daemon.forwards.export(&mut carry_fd)?;
    let secrets = secrets(daemon, &processes);
    let (memfd, secrets_ref) = handover::seal_secrets(&secrets)?;
    drop(secrets);
    carried.push(memfd);
    let handover = Handover {
        format: handover::FORMAT.to_owned(),
        version: handover::VERSION,
        from_version: crate::VERSION.to_owned(),
        required: vec!["processes".into(), "secrets".into()],
        secrets: secrets_ref,
        processes,
        workload: daemon.workload.export(),
        watchers: daemon.watchers.export(),
        forwards,
        logs: Vec::new(),
    };
    Ok((handover, listener))
}

/// What goes into the sealed memfd: the access token and its hash, the
/// exec context, each process's env vars, the tracked template processes.
fn secrets(daemon: &Daemon, processes: &ProcessesPart) -> Secrets {
    let auth = daemon.guard.export();
    let context = daemon.context.snapshot();
    Secrets {
        token: auth.token.map(|t| t.expose().to_owned()),
        token_hash: auth.token_hash,
        fail_closed: auth.fail_closed,
        default_user: context.default_user,
        default_workdir: context.default_workdir,
        init_env: context.init_env,
        internal_env: context.internal_env,
        process_envs: processes.envs(),
        tracked: daemon.templates.export(),
    }
}

/// envd's log lines not yet shipped to the collector.
fn unshipped_lines(daemon: &Daemon) -> Vec<String> {
    daemon.logs.as_ref().map(LogShipper::export).unwrap_or_default()
}

/// Clears close-on-exec on `fds` and execs; returns why it failed.
fn exec(program: &Path, listener: RawFd, handover: &Path, fds: &[RawFd]) -> std::io::Error {
    let list = fds.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![OsString::from(program)];
    args.extend(without_handover_flags(std::env::args_os().skip(1)));
    args.extend(["--listen-fd".into(), listener.to_string().into()]);
    args.extend(["--handover".into(), handover.as_os_str().to_owned()]);
    args.extend(["--handover-fds".into(), list.into()]);
    let Some(argv) = cstrings(args.iter().map(|a| a.as_bytes().to_vec())) else {
        return std::io::Error::other("an argument contains a NUL byte");
    };
    let envp = cstrings(std::env::vars_os().map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat()));
    let Some(envp) = envp else { return std::io::Error::other("the environment contains a NUL byte") };
    let Some(path) = cstrings([PathBuf::from(program).as_os_str().as_bytes().to_vec()]) else {
        return std::io::Error::other("the program path contains a NUL byte");
    };
    let argv_ptrs: Vec<*const libc::c_char> =
        argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp_ptrs: Vec<*const libc::c_char> =
        envp.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    for fd in fds {
        // SAFETY: F_SETFD on fds held open by the caller.
        unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) };
    }
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that live
    // until the call returns (it returns only on failure).
    unsafe { libc::execve(path[0].as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    let err = std::io::Error::last_os_error();
    for fd in fds {
        // SAFETY: as above; back to close-on-exec before anything can fork.
        unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    err
}

/// The argv without an earlier handover's flags and their values.
pub(super) fn without_handover_flags(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        if HANDOVER_FLAGS.contains(&text.as_ref()) {
            skip_value = true;
        } else if !HANDOVER_FLAGS.iter().any(|f| text.starts_with(&format!("{f}="))) {
            kept.push(arg);
        }
    }
    kept
}

fn cstrings(items: impl IntoIterator<Item = Vec<u8>>) -> Option<Vec<CString>> {
    items.into_iter().map(|b| CString::new(b).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_handovers_flags_are_not_passed_on() {
        let args = ["--dev", "--listen-fd", "7", "--handover=/run/x", "--port", "1", "--handover-fds", "7,8"];
        let kept = without_handover_flags(args.iter().map(OsString::from));
        assert_eq!(kept, ["--dev", "--port", "1"].map(OsString::from));
    }
}
