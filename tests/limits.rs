//! What a hostile process in the VM can make envd hold is bounded: half-sent
//! `/init` bodies, half-sent request heads, multipart bodies that are all
//! preamble or part headers, RPC messages that inflate when decompressed,
//! and a log sink that stops reading. Memory is read from envd's
//! `VmHWM` (its peak resident size), so a short spike counts too.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{Envd, PATIENCE, Scratch};
use flate2::Compression;
use flate2::write::GzEncoder;
use http::Method;
use serde_json::json;

/// Peak RSS growth allowed while an attack runs.
const GROWTH_LIMIT_KIB: u64 = 64 * 1024;

fn gzip_of_repeated(prefix: &[u8], byte: u8, len: usize, suffix: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(prefix).unwrap();
    let block = vec![byte; 1 << 20];
    for _ in 0..len / block.len() {
        encoder.write_all(&block).unwrap();
    }
    encoder.write_all(suffix).unwrap();
    encoder.finish().unwrap()
}

/// Opens `count` connections that each send `head` and then stall.
fn stalled_connections(port: u16, count: usize, head: &[u8]) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|_| {
            let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
            stream.write_all(head).ok()?;
            Some(stream)
        })
        .collect()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

#[tokio::test]
async fn half_sent_init_bodies_hold_little_memory() {
    let envd = Envd::start();
    let before = envd.status_kib("VmHWM");
    // Chunked, so no declared length gives the attack away; each body stops
    // just short of the /init limit.
    let mut head = b"POST /init HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    let chunk = vec![b' '; 60 * 1024];
    head.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    head.extend_from_slice(&chunk);
    head.extend_from_slice(b"\r\n");
    let held = stalled_connections(envd.port(), 300, &head);
    assert!(held.len() >= 250, "only {} connections opened", held.len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let growth = envd.status_kib("VmHWM").saturating_sub(before);
    println!("300 half-sent /init bodies: peak RSS grew {growth} KiB");
    assert!(growth < GROWTH_LIMIT_KIB, "peak RSS grew {growth} KiB");
    // A body over the limit is refused outright, with a reason.
    let big = vec![b' '; 512 * 1024];
    let reply = envd.client().send(Method::POST, "/init", &[("content-type", "application/json")], big).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(reply.text().contains("larger than"), "{}", reply.text());
    // Meanwhile a real /init still works.
    let reply = envd.client().post_json("/init", &json!({"envVars": {"A": "1"}})).await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    drop(held);
}

#[tokio::test]
async fn half_sent_request_heads_are_capped_and_closed() {
    let envd = Envd::start();
    let heads = stalled_connections(envd.port(), 3000, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds = open_fds(envd.pid());
    println!("{} half-sent heads: envd holds {fds} fds", heads.len());
    assert!(fds < 2048 + 64, "envd holds {fds} fds for {} stalled heads", heads.len());
    // Stalled heads are closed soon, and a real client gets through.
    let port = envd.port();
    let answered = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + PATIENCE + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if common::health_ok(port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    })
    .await
    .unwrap();
    assert!(answered, "/health never answered while stalled heads were held");
    let mut closed = 0;
    for mut stream in heads {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        if matches!(stream.read(&mut byte), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    println!("{closed} stalled connections were closed by envd");
    assert!(closed > 2900, "only {closed} stalled connections were closed");
}

async fn upload_multipart(envd: &Envd, body: Vec<u8>, path: &str) -> common::Reply {
    let headers = [("content-type", "multipart/form-data; boundary=XyZ"), ("content-encoding", "gzip")];
    envd.client().send(Method::POST, &format!("/files?path={path}"), &headers, body).await
}

#[tokio::test]
async fn multipart_bodies_cannot_inflate_outside_file_contents() {
    let scratch = Scratch::new("multipart-limits");
    let envd = Envd::start();
    let before = envd.status_kib("VmHWM");
    let target = scratch.s("f.txt");
    let cases = [
        ("a preamble that never ends", gzip_of_repeated(b"", b'p', 256 << 20, b"")),
        ("part headers that never end", gzip_of_repeated(b"--XyZ\r\nX-Long: ", b'h', 256 << 20, b"")),
        (
            "a huge non-file field",
            gzip_of_repeated(b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\n", b'n', 256 << 20, b""),
        ),
    ];
    for (what, body) in cases {
        let reply = upload_multipart(&envd, body, &target).await;
        assert_eq!(reply.status, 413, "{what}: {}", reply.text());
        assert!(reply.text().contains("outside file contents"), "{what}: {}", reply.text());
        let growth = envd.status_kib("VmHWM").saturating_sub(before);
        println!("{what}: peak RSS grew {growth} KiB");
        assert!(growth < GROWTH_LIMIT_KIB, "{what}: peak RSS grew {growth} KiB");
    }
    // File content itself is not limited: 64 MiB in one part goes through.
    let prefix = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.txt\"\r\n\r\n";
    let body = gzip_of_repeated(prefix, b'f', 64 << 20, b"\r\n--XyZ--\r\n");
    let reply = upload_multipart(&envd, body, &target).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 64 << 20);
}

#[tokio::test]
async fn rpc_messages_are_bounded_after_decompression() {
    let envd = Envd::start();
    let before = envd.status_kib("VmHWM");
    let body = gzip_of_repeated(b"{\"path\":\"", b'a', 64 << 20, b"\"}");
    let headers = [("content-type", "application/json"), ("content-encoding", "gzip")];
    let reply = envd.client().send(Method::POST, "/filesystem.Filesystem/Stat", &headers, body).await;
    assert_eq!(reply.json()["code"], "resource_exhausted", "{}", reply.text());
    let growth = envd.status_kib("VmHWM").saturating_sub(before);
    println!("a Stat inflating to 64 MiB: peak RSS grew {growth} KiB");
    assert!(growth < GROWTH_LIMIT_KIB / 2, "peak RSS grew {growth} KiB");
    // Process input and Start keep room for real payloads.
    // 1 MiB of arguments (one argument may be at most 128 KiB).
    let args = vec!["x".repeat(64 << 10); 16];
    let run = envd.client().run(&json!({"process": {"cmd": "/bin/true", "args": args}, "stdin": false}), &[]).await;
    assert_eq!(run.exit_code(), 0);
}

#[tokio::test]
async fn a_stalled_log_sink_never_stalls_requests() {
    let release = Arc::new(Barrier::new(2));
    let envd = Envd::options().args(["--verbose"]).stalled_stderr(release.clone()).start();
    let client = envd.client();
    // Each refused /init logs a line; thousands overflow any pipe buffer.
    for _ in 0..100 {
        let batch = (0..50).map(|_| {
            let client = client.clone();
            async move { client.send(Method::POST, "/init", &[("content-type", "application/json")], "{").await }
        });
        for reply in futures_util::future::join_all(batch).await {
            assert_eq!(reply.status, 400);
        }
    }
    tokio::task::spawn_blocking(move || release.wait()).await.unwrap();
    assert!(
        common::eventually(PATIENCE, || envd.stderr().contains("log lines dropped")).await,
        "no report of dropped lines"
    );
}
