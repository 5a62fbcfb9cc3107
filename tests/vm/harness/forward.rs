//! Port forwarding seen from the host: a guest server listening on
//! localhost only is reached through the guest's address, as the sandbox
//! proxy reaches it (qemu forwards a host port to the guest address, and
//! envd forwards the guest address to localhost).

use std::time::{Duration, Instant};

use super::envd::{As, Envd};
use super::http;
use super::qemu::FORWARD_GUEST_PORT;

/// The tag of the guest's localhost server.
pub const SERVER_TAG: &str = "e2e-forward-server";

/// Starts `busybox httpd` on 127.0.0.1 only, serving `hello.txt` = `content`.
pub fn start_localhost_server(envd: &Envd, content: &str) -> Result<u32, String> {
    envd.sh(As::User("root"), &format!("mkdir -p /tmp/fwd-www && printf %s '{content}' > /tmp/fwd-www/hello.txt"))?;
    let server = format!("exec busybox httpd -f -p 127.0.0.1:{FORWARD_GUEST_PORT} -h /tmp/fwd-www");
    envd.spawn_detached(As::User("root"), SERVER_TAG, &server)
}

/// One `GET /hello.txt` through the host port forwarded to the guest
/// address: the body, or why not.
pub fn get_through_guest_address(forward_port: u16) -> Result<String, String> {
    let response = http::request(forward_port, "GET", "/hello.txt", &[], &[], Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    if response.status == 200 { Ok(response.text()) } else { Err(format!("HTTP {}", response.status)) }
}

/// Polls until the guest server answers `content` through the guest
/// address; returns how long it took.
pub fn wait_reachable(forward_port: u16, content: &str, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let last = match get_through_guest_address(forward_port) {
            Ok(body) if body == content => return Ok(started.elapsed()),
            Ok(body) => format!("answered {body:?}"),
            Err(err) => err,
        };
        if started.elapsed() > timeout {
            return Err(format!("not reachable through the guest address within {timeout:?}: {last}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Which sockets listen on the guest port, and whose (`ss -ltnp`).
pub fn guest_listeners(envd: &Envd) -> Result<String, String> {
    let script = format!("ss -Hltnp 'sport = :{FORWARD_GUEST_PORT}'");
    Ok(envd.sh(As::User("root"), &script)?.stdout)
}

/// Kills the guest server and polls until the host no longer gets an
/// answer through the guest address (envd closed its forward socket).
pub fn stop_and_wait_unreachable(
    envd: &Envd,
    forward_port: u16,
    pid: u32,
    timeout: Duration,
) -> Result<Duration, String> {
    envd.sh(As::User("root"), &format!("kill {pid}"))?;
    let started = Instant::now();
    while get_through_guest_address(forward_port).is_ok() {
        if started.elapsed() > timeout {
            return Err(format!("still answering {timeout:?} after the server was killed"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(started.elapsed())
}
