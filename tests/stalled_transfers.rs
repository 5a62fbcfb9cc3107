//! Clients that stop halfway, against the real binary over real sockets:
//! connections that send nothing, a request head sent a byte at a time, a
//! download never read, an upload that stops midway, an HTTP/2 connection
//! left idle. Each holds its connection, descriptors and buffers only for
//! its configured idle time; afterwards envd's descriptors and resident
//! memory are back at their baseline and nothing is left on disk.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::footprint::{Footprint, Slack, settle};
use common::*;

/// Where envd's footprint must settle after the stalled clients are gone.
const SLACK: Slack = Slack { rss_kib: 1536, fds: 2 };
/// How long the footprint gets to settle (the idle times here are 1–2 s).
const SETTLE: Duration = Duration::from_secs(20);

/// envd with short bounds, warmed up so that its baseline holds what
/// serving requests allocates once.
async fn envd_with(args: &[&str]) -> (Envd, Footprint) {
    let envd = Envd::options().args(args.iter().copied()).start();
    for _ in 0..20 {
        assert_eq!(envd.client().get("/health").await.status, 204);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = Footprint::of(envd.pid());
    (envd, baseline)
}

/// Whether the peer has closed `stream` (EOF or reset), reading and
/// discarding whatever is still buffered, for at most `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 1 << 16];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_reset) => return true,
        }
    }
    false
}

async fn assert_settled(envd: &Envd, baseline: Footprint, what: &str) {
    let after = settle(envd.pid(), baseline, SLACK, SETTLE).await;
    println!("{what}: before {baseline:?}, after {after:?}");
    assert!(after.within(baseline, SLACK), "{what}: envd holds {after:?}, baseline {baseline:?}");
}

#[tokio::test]
async fn a_thousand_silent_connections_are_capped_then_closed_and_leave_nothing() {
    let (envd, baseline) = envd_with(&["--header-timeout", "10", "--max-silent-connections", "200"]).await;
    let addr = envd.addr();
    let mut silent: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Past their grace (2 s, a fifth of the header timeout), the oldest
    // beyond the cap are closed as the next connection comes: a real
    // client is answered at once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(envd.client().get("/health").await.status, 204);
    let capped = || Footprint::of(envd.pid()).fds <= baseline.fds + 200 + 16;
    assert!(
        eventually(Duration::from_secs(2), capped).await,
        "{:?} held for 1000 silent connections",
        Footprint::of(envd.pid())
    );
    println!("1000 silent connections, capped: envd holds {:?}", Footprint::of(envd.pid()));
    let closed = tokio::task::spawn_blocking(move || {
        silent.iter_mut().map(|stream| closed_within(stream, Duration::from_secs(15))).filter(|closed| *closed).count()
    })
    .await
    .unwrap();
    assert_eq!(closed, 1000, "every silent connection is closed");
    assert_settled(&envd, baseline, "1000 silent connections").await;
}

#[tokio::test]
async fn a_burst_of_clients_that_connect_before_they_send_is_served_whole() {
    // Far more connections at once than may stay silent, each sending its
    // request only once all are open: none is closed, all are answered.
    let (envd, _baseline) = envd_with(&["--max-silent-connections", "16"]).await;
    let addr = envd.addr();
    let answered = tokio::task::spawn_blocking(move || {
        let mut streams: Vec<TcpStream> = (0..500).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for stream in &mut streams {
            stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }
        streams
            .iter_mut()
            .map(|stream| {
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut answer = [0u8; 64];
                stream.read(&mut answer).is_ok_and(|n| answer[..n].starts_with(b"HTTP/1.1 204"))
            })
            .filter(|answered| *answered)
            .count()
    })
    .await
    .unwrap();
    assert_eq!(answered, 500, "connections of a burst were closed before they sent");
}

/// Sends `head` a byte every 100 ms; returns how many bytes went out
/// before envd closed the connection.
fn trickle(stream: &mut TcpStream, head: &[u8]) -> usize {
    stream.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 4096];
    for (sent, byte) in head.iter().enumerate() {
        match stream.read(&mut probe) {
            Ok(0) => return sent,
            Err(err) if err.kind() != ErrorKind::WouldBlock => return sent,
            _ => {}
        }
        if stream.write_all(std::slice::from_ref(byte)).is_err() {
            return sent;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    head.len()
}

#[tokio::test]
async fn a_request_head_sent_a_byte_at_a_time_is_closed_on_a_new_or_kept_alive_connection() {
    let (envd, baseline) = envd_with(&["--header-timeout", "2"]).await;
    let addr = envd.addr();
    // 400 bytes at 10 a second: 40 s, far past the 2 s header timeout.
    let head = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n", "a".repeat(360)).into_bytes();
    let sent = tokio::task::spawn_blocking({
        let head = head.clone();
        move || {
            let mut fresh = TcpStream::connect(addr).unwrap();
            let fresh_sent = trickle(&mut fresh, &head);
            // Kept alive: one request answered, a pause longer than the
            // header timeout (an idle connection stays), then the trickle.
            let mut kept = TcpStream::connect(addr).unwrap();
            kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut answer = [0u8; 1024];
            let n = kept.read(&mut answer).unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 204"), "{}", String::from_utf8_lossy(&answer[..n]));
            std::thread::sleep(Duration::from_secs(3));
            let kept_sent = trickle(&mut kept, &head);
            (fresh_sent, kept_sent)
        }
    })
    .await
    .unwrap();
    println!("bytes of a {}-byte head sent before envd closed: new {}, kept alive {}", head.len(), sent.0, sent.1);
    assert!(sent.0 < head.len() / 2, "a new connection trickling its head stayed open for {} bytes", sent.0);
    assert!(sent.1 > 0, "the kept-alive connection was closed while idle");
    assert!(sent.1 < head.len() / 2, "a kept-alive connection trickling its head stayed open for {} bytes", sent.1);
    assert_settled(&envd, baseline, "trickled heads").await;
}

/// Makes `file` (`len` zero bytes, sparse) and asks envd for it on a raw
/// connection, nothing read yet.
fn download_of_zeros(envd: &Envd, file: &std::path::Path, len: u64) -> TcpStream {
    std::fs::File::create(file).unwrap().set_len(len).unwrap();
    let mut stream = TcpStream::connect(envd.addr()).unwrap();
    write!(stream, "GET /files?path={} HTTP/1.1\r\nHost: x\r\n\r\n", file.display()).unwrap();
    stream
}

fn holds_file(pid: u32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

#[tokio::test]
async fn a_download_never_read_is_closed_and_its_file_released() {
    let (envd, baseline) = envd_with(&["--response-idle-timeout", "2"]).await;
    let dir = Scratch::new("unread-download");
    let file = dir.path("big");
    let mut stream = download_of_zeros(&envd, &file, 256 << 20);
    assert!(eventually(Duration::from_secs(5), || holds_file(envd.pid(), &file)).await, "the download never began");
    // Nothing is read: the socket's buffers fill and hyper waits.
    assert!(
        eventually(Duration::from_secs(15), || !holds_file(envd.pid(), &file)).await,
        "envd still holds the file of a download nobody reads"
    );
    let closed =
        tokio::task::spawn_blocking(move || closed_within(&mut stream, Duration::from_secs(10))).await.unwrap();
    assert!(closed, "the connection of the unread download stays open");
    assert_settled(&envd, baseline, "a download never read").await;
}

#[tokio::test]
async fn a_download_read_slowly_but_steadily_is_not_cut() {
    let (envd, _baseline) = envd_with(&["--response-idle-timeout", "3"]).await;
    let dir = Scratch::new("slow-download");
    let file = dir.path("big");
    let mut stream = download_of_zeros(&envd, &file, 32 << 20);
    // The first 4 MiB at 320 KiB/s, 64 KiB every 200 ms (13 s, four times
    // the idle bound), then the rest at once: the response moves, if
    // slowly, so it is delivered whole.
    let received = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            if total < 4 << 20 {
                std::thread::sleep(Duration::from_millis(200));
            }
            if total >= (32 << 20) {
                break;
            }
        }
        total
    })
    .await
    .unwrap();
    assert!(received >= 32 << 20, "only {received} bytes arrived of a download read slowly");
}

#[tokio::test]
async fn an_upload_that_stops_midway_leaves_the_old_file_whole_and_no_temporary() {
    let (envd, baseline) = envd_with(&["--upload-idle-timeout", "1"]).await;
    let dir = Scratch::new("stopped-upload");
    std::fs::write(dir.path("target"), b"old").unwrap();
    let mut stream = TcpStream::connect(envd.addr()).unwrap();
    let target = dir.s("target");
    write!(
        stream,
        "POST /files?path={target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        64 << 20
    )
    .unwrap();
    stream.write_all(&vec![b'n'; 8 << 20]).unwrap();
    assert!(eventually(Duration::from_secs(5), || dir.names("").len() == 2).await, "{:?}", dir.names(""));
    let answer = tokio::task::spawn_blocking(move || {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = vec![0u8; 4096];
        let n = stream.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(eventually(Duration::from_secs(5), || dir.names("") == ["target"]).await, "{:?}", dir.names(""));
    assert_eq!(std::fs::read(dir.path("target")).unwrap(), b"old");
    assert_settled(&envd, baseline, "an upload stopped midway").await;
}

#[tokio::test]
async fn an_http2_connection_with_nothing_in_flight_is_closed_after_the_idle_timeout() {
    let (envd, baseline) = envd_with(&["--idle-timeout", "2"]).await;
    let socket = tokio::net::TcpStream::connect(envd.addr()).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(socket);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get("http://x/health").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 204);
    let ended = tokio::time::timeout(Duration::from_secs(15), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection is still open 15 s after a 2 s idle timeout");
    assert_settled(&envd, baseline, "an idle HTTP/2 connection").await;
}
