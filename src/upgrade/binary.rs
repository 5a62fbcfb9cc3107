//! The new binary: received to the one fixed path, then checked before
//! anything is stopped.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;

use super::UpgradeError;

/// A delivered binary larger than this is refused.
const MAX_BINARY: u64 = 512 << 20;
/// How long the body may stay silent.
const BODY_IDLE: Duration = Duration::from_secs(60);
/// How long `--version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The program to exec: the body written to `path`, or, for an empty body,
/// envd's own image (which stays reachable after its file is replaced).
pub(super) async fn receive(path: &Path, mut body: axum::body::Body, empty: bool) -> Result<PathBuf, UpgradeError> {
    if empty {
        return Ok(PathBuf::from("/proc/self/exe"));
    }
    // The running image may be this very file (a second upgrade): a new
    // inode, not a truncation, which the kernel refuses (ETXTBSY).
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(UpgradeError::Receive(err)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(UpgradeError::Receive)?;
    let mut written = 0u64;
    loop {
        let frame = match tokio::time::timeout(BODY_IDLE, body.frame()).await {
            Err(_) => return Err(fail(path, std::io::Error::other("the body stalled"))),
            Ok(None) => break,
            Ok(Some(Err(err))) => return Err(fail(path, std::io::Error::other(err.to_string()))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        written += data.len() as u64;
        if written > MAX_BINARY {
            return Err(fail(path, std::io::Error::other("the binary is too large")));
        }
        file.write_all(&data).map_err(|e| fail(path, e))?;
    }
    // Durable before it is run: a crash after the swap must find it whole.
    file.sync_all().map_err(|e| fail(path, e))?;
    if written == 0 {
        return Ok(PathBuf::from("/proc/self/exe"));
    }
    Ok(path.to_owned())
}

fn fail(path: &Path, err: std::io::Error) -> UpgradeError {
    let _ = std::fs::remove_file(path);
    UpgradeError::Receive(err)
}

/// An ELF executable of this machine's architecture that prints a version
/// and exits 0, and that, given the flags this envd runs with, answers
/// `--handover-version` with the handover format this envd writes (so it
/// will understand its argv and take the handover over instead of exiting
/// after the point of no return); returns the version.
pub(super) async fn check(program: &Path) -> Result<String, UpgradeError> {
    let refused = |why: String| UpgradeError::BadBinary(why);
    let mut header = [0u8; 20];
    let mut file = std::fs::File::open(program).map_err(|e| refused(format!("opening it: {e}")))?;
    std::io::Read::read_exact(&mut file, &mut header).map_err(|_| refused("shorter than an ELF header".into()))?;
    if &header[..4] != b"\x7fELF" {
        return Err(refused("not an ELF file".into()));
    }
    let machine = u16::from_le_bytes([header[18], header[19]]);
    if header[4] != ELF_CLASS || machine != ELF_MACHINE {
        return Err(refused(format!("built for another architecture (class {}, machine {machine})", header[4])));
    }
    let version = answer(program, &["--version".into()]).await?;
    if version.is_empty() {
        return Err(refused("--version printed nothing".into()));
    }
    let mut args = super::exec::without_handover_flags(std::env::args_os().skip(1));
    args.push("--handover-version".into());
    let format = answer(program, &args).await?;
    if format != super::handover::format_line() {
        return Err(refused(format!(
            "it does not take over this envd's handover ({:?} to --handover-version, {:?} needed)",
            format,
            super::handover::format_line()
        )));
    }
    Ok(version)
}

/// What `program args` prints, trimmed, if it exits 0 in time.
async fn answer(program: &Path, args: &[std::ffi::OsString]) -> Result<String, UpgradeError> {
    let refused = |why: String| UpgradeError::BadBinary(why);
    let shown = args.last().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(VERSION_TIMEOUT, command.output())
        .await
        .map_err(|_| refused(format!("{shown} did not answer in time")))?
        .map_err(|e| refused(format!("running {shown}: {e}")))?;
    if !output.status.success() {
        return Err(refused(format!("{shown} ended with {}", output.status)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[cfg(target_pointer_width = "64")]
const ELF_CLASS: u8 = 2;
#[cfg(target_pointer_width = "32")]
const ELF_CLASS: u8 = 1;
#[cfg(target_arch = "x86_64")]
const ELF_MACHINE: u16 = 62;
#[cfg(target_arch = "aarch64")]
const ELF_MACHINE: u16 = 183;
