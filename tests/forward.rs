//! Port forwarding of loopback listeners, with real servers: envd forwards
//! to a loopback alias (all of 127.0.0.0/8 is local on Linux), as it
//! forwards to the VM's address in a sandbox. Each test uses an address of
//! its own, so the daemons of tests running side by side never compete for
//! a port.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// envd forwarding to `address`, with debug logs.
fn envd_forwarding_to(address: &str, extra: &[&str]) -> Envd {
    Envd::options().args(["--verbose", "--forward-address", address]).args(extra.iter().copied()).start()
}

/// Polls `check` every 20 ms until it holds, for at most [`PATIENCE`].
fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < PATIENCE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

fn free_port_on(addr: &str) -> u16 {
    TcpListener::bind((addr, 0)).and_then(|l| l.local_addr()).expect("a free port").port()
}

/// `python3 -m http.server` serving `dir`, killed on drop.
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(bind: &str, port: u16, dir: &str) -> HttpServer {
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", bind, &port.to_string(), "--directory", dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let target = SocketAddr::new(bind.parse().unwrap(), port);
        let mut server = HttpServer { child, port };
        wait_until("the http server listens", || {
            assert!(matches!(server.child.try_wait(), Ok(None)), "http.server on {target} exited");
            TcpStream::connect(target).is_ok()
        });
        server
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /<file>` over a fresh connection: the body, or why not.
fn http_get(addr: SocketAddr, file: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET /{file} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_owned()),
        _ => Err(format!("unexpected reply: {reply:?}")),
    }
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn at(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(address.parse::<IpAddr>().unwrap(), port)
}

fn served_dir(name: &str, content: &str) -> Scratch {
    let dir = Scratch::new(name);
    std::fs::write(dir.path("hello.txt"), content).unwrap();
    dir
}

#[test]
fn servers_on_127_0_0_1_and_on_ipv6_loopback_are_reachable_on_the_forward_address() {
    const FORWARD: &str = "127.0.31.1";
    let envd = envd_forwarding_to(FORWARD, &[]);
    let v4_dir = served_dir("fwd-v4", "over ipv4\n");
    let v4 = HttpServer::start("127.0.0.1", free_port_on("127.0.0.1"), &v4_dir.s(""));
    let waited = wait_until("the IPv4 server is forwarded", || http_get(at(FORWARD, v4.port), "hello.txt").is_ok());
    eprintln!("127.0.0.1 listener reachable through the forward address after {waited:?}");
    assert_eq!(http_get(at(FORWARD, v4.port), "hello.txt").unwrap(), "over ipv4\n");

    let v6_dir = served_dir("fwd-v6", "over ipv6\n");
    let v6 = HttpServer::start("::1", free_port_on("::1"), &v6_dir.s(""));
    let waited = wait_until("the IPv6 server is forwarded", || http_get(at(FORWARD, v6.port), "hello.txt").is_ok());
    eprintln!("::1 listener reachable through the forward address after {waited:?}");
    assert_eq!(http_get(at(FORWARD, v6.port), "hello.txt").unwrap(), "over ipv6\n");
    assert!(envd.stderr().contains(&format!("forwarding port port={}", v6.port)), "{}", envd.stderr());
}

#[test]
fn a_listener_that_goes_away_stops_being_forwarded_and_one_that_comes_back_is_forwarded_again() {
    const FORWARD: &str = "127.0.31.2";
    let _envd = envd_forwarding_to(FORWARD, &[]);
    let dir = served_dir("fwd-reopen", "first\n");
    let port = free_port_on("127.0.0.1");
    let server = HttpServer::start("127.0.0.1", port, &dir.s(""));
    wait_until("the server is forwarded", || http_get(at(FORWARD, port), "hello.txt").is_ok());
    drop(server);
    let waited = wait_until("the forward socket is closed", || refused(at(FORWARD, port)));
    eprintln!("forward socket closed {waited:?} after its listener");

    std::fs::write(dir.path("hello.txt"), "second\n").unwrap();
    let _again = HttpServer::start("127.0.0.1", port, &dir.s(""));
    wait_until("the reopened server is forwarded", || http_get(at(FORWARD, port), "hello.txt").is_ok());
    assert_eq!(http_get(at(FORWARD, port), "hello.txt").unwrap(), "second\n");
}

#[test]
fn wildcard_servers_ports_taken_on_the_forward_address_and_envds_own_port_are_left_alone() {
    const FORWARD: &str = "127.0.31.3";
    let envd = envd_forwarding_to(FORWARD, &[]);
    let wildcard_dir = served_dir("fwd-wild", "wildcard\n");
    let wildcard = HttpServer::start("0.0.0.0", free_port_on("0.0.0.0"), &wildcard_dir.s(""));
    // The forward address taken first by another server, then the same
    // port on 127.0.0.1: the other server must keep its address.
    let taken_port = free_port_on(FORWARD);
    let owner_dir = served_dir("fwd-owner", "owner\n");
    let _owner = HttpServer::start(FORWARD, taken_port, &owner_dir.s(""));
    let local_dir = served_dir("fwd-local", "local\n");
    let _local = HttpServer::start("127.0.0.1", taken_port, &local_dir.s(""));
    // A server forwarded after all of them shows that scans have seen them.
    let sentinel = HttpServer::start("127.0.0.1", free_port_on("127.0.0.1"), &local_dir.s(""));
    wait_until("the sentinel is forwarded", || http_get(at(FORWARD, sentinel.port), "hello.txt").is_ok());

    assert_eq!(http_get(at(FORWARD, taken_port), "hello.txt").unwrap(), "owner\n");
    assert!(refused(at(FORWARD, envd.port())), "envd's own port was forwarded");
    // The wildcard server answers on every address by itself; envd holds no
    // socket of its own for that port.
    assert_eq!(http_get(at(FORWARD, wildcard.port), "hello.txt").unwrap(), "wildcard\n");
    let log = envd.stderr();
    for port in [wildcard.port, taken_port, envd.port()] {
        let field = format!("port={port}");
        assert!(!log.split_whitespace().any(|word| word == field), "envd touched port {port}:\n{log}");
    }
}

/// A server on 127.0.0.1 that reads until EOF, then answers with the byte
/// count and the SHA-256 of what it read, and closes.
fn digest_server() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let (count, digest) = hash_until_eof(&mut stream);
        let _ = writeln!(stream, "{count} {digest}");
    });
    (port, handle)
}

fn hash_until_eof(stream: &mut impl Read) -> (u64, String) {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).expect("reading");
        if n == 0 {
            return (count, format!("{:x}", hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        count += n as u64;
    }
}

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn a_client_that_shuts_down_its_write_side_still_gets_the_reply() {
    const FORWARD: &str = "127.0.31.4";
    let _envd = envd_forwarding_to(FORWARD, &[]);
    let (port, server) = digest_server();
    let mut stream = None;
    wait_until("the digest server is forwarded", || {
        stream = TcpStream::connect(at(FORWARD, port)).ok();
        stream.is_some()
    });
    let mut stream = stream.unwrap();
    let request = pattern(100_000, 7);
    stream.write_all(&request).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim_end(), format!("100000 {:x}", Sha256::digest(&request)));
    server.join().unwrap();
}

/// An echo server on 127.0.0.1: every byte read is written back; at EOF
/// the write side is shut down.
fn echo_server() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        std::io::copy(&mut stream, &mut writer).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    (port, handle)
}

#[test]
fn a_large_transfer_through_the_forward_arrives_intact_both_ways() {
    const FORWARD: &str = "127.0.31.5";
    const SIZE: usize = 256 << 20;
    let _envd = envd_forwarding_to(FORWARD, &[]);
    let (port, server) = echo_server();
    let mut connected = None;
    wait_until("the echo server is forwarded", || {
        connected = TcpStream::connect(at(FORWARD, port)).ok();
        connected.is_some()
    });
    let stream = connected.unwrap();
    let data = pattern(SIZE, 42);
    let expected = format!("{:x}", Sha256::digest(&data));
    let mut writer = stream.try_clone().unwrap();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        for chunk in data.chunks(1 << 20) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let (count, digest) = hash_until_eof(&mut &stream);
    let elapsed = started.elapsed();
    sender.join().unwrap();
    server.join().unwrap();
    assert_eq!((count, digest), (SIZE as u64, expected));
    eprintln!(
        "256 MiB each way through the forward in {elapsed:?} ({:.0} MiB/s each way)",
        256.0 / elapsed.as_secs_f64()
    );
}

/// `accept`, failing the test instead of hanging when nothing comes.
fn accept_within_patience(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && started.elapsed() < PATIENCE => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection arrived: {e}"),
        }
    }
}

#[test]
fn at_the_connection_cap_new_connections_wait_and_proceed_once_one_closes() {
    const FORWARD: &str = "127.0.31.6";
    let envd = envd_forwarding_to(FORWARD, &["--forward-max-connections", "2"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut probe = None;
    wait_until("the server is forwarded", || {
        probe = TcpStream::connect(at(FORWARD, port)).ok();
        probe.is_some()
    });
    let mut first = probe.unwrap();
    first.write_all(b"1").unwrap();
    let (mut first_server, _) = accept_within_patience(&listener);
    first_server.set_read_timeout(Some(PATIENCE)).unwrap();
    first_server.read_exact(&mut [0u8; 1]).unwrap();
    let _second = TcpStream::connect(at(FORWARD, port)).unwrap();
    let (_second_server, _) = accept_within_patience(&listener);
    // The third is accepted but not relayed until a slot is free.
    let mut third = TcpStream::connect(at(FORWARD, port)).unwrap();
    third.write_all(b"ping").unwrap();
    wait_until("the cap is logged", || envd.stderr().contains("forwarded connection limit reached"));
    // Both ends of the first connection close: its slot is free.
    drop(first);
    drop(first_server);
    let (mut relayed, _) = accept_within_patience(&listener);
    let mut buf = [0u8; 4];
    relayed.set_read_timeout(Some(PATIENCE)).unwrap();
    relayed.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}
