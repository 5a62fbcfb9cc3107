//! Readiness notification to systemd (`sd_notify(3)`), without libsystemd.
//!
//! The unit is `Type=notify`: systemd treats envd as started only once it
//! sends `READY=1` to the datagram socket named by `$NOTIFY_SOCKET`, so
//! nothing ordered after envd (and no boot-time measurement) sees it "up"
//! before the listener is bound. The variable holds either a filesystem
//! path or, when it starts with `@`, a name in the abstract namespace
//! (`@` stands for the leading NUL byte).
//!
//! The variable is read, never removed: removing it would need
//! `std::env::remove_var`, which races with other threads. Children do not
//! inherit it because envd gives them an explicit environment.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Tells systemd that envd is ready (`READY=1`).
///
/// Returns `Ok(false)` when envd does not run under systemd (no
/// `$NOTIFY_SOCKET`), `Ok(true)` when the message was sent.
pub fn notify_ready() -> io::Result<bool> {
    notify(std::env::var_os(NOTIFY_SOCKET_ENV), "READY=1")
}

/// Sends `state` (newline-separated `KEY=VALUE` pairs) to the socket named
/// by `socket`, the value of `$NOTIFY_SOCKET`; `None` sends nothing.
pub fn notify(socket: Option<OsString>, state: &str) -> io::Result<bool> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else { return Ok(false) };
    let sender = UnixDatagram::unbound()?;
    let sent = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(state.as_bytes(), &addr)?
        }
        None if socket.as_bytes().starts_with(b"/") => sender.send_to(state.as_bytes(), OsStr::new(&socket))?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{NOTIFY_SOCKET_ENV} is neither an absolute path nor an abstract name: {socket:?}"),
            ));
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write to the notify socket"));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("set timeout");
        let mut buf = [0u8; 256];
        let len = socket.recv(&mut buf).expect("a notification arrives");
        String::from_utf8(buf[..len].to_vec()).expect("utf-8")
    }

    #[test]
    fn sends_ready_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("envd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        assert!(notify(Some(path.clone().into_os_string()), "READY=1").expect("sent"));
        assert_eq!(receive(&listener), "READY=1");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn sends_ready_to_an_abstract_socket() {
        let name = format!("envd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract addr");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        assert!(notify(Some(format!("@{name}").into()), "READY=1\nSTATUS=listening").expect("sent"));
        assert_eq!(receive(&listener), "READY=1\nSTATUS=listening");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        assert!(!notify(None, "READY=1").expect("no error"));
        assert!(!notify(Some(OsString::new()), "READY=1").expect("no error"));
    }

    #[test]
    fn a_relative_or_missing_socket_is_an_error() {
        assert!(notify(Some("relative.sock".into()), "READY=1").is_err());
        let missing = std::env::temp_dir().join("envd-notify-no-such-dir/notify.sock");
        assert!(notify(Some(missing.into_os_string()), "READY=1").is_err());
    }
}
