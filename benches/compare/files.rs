//! Files: upload and download of one large file, `Stat` of one file and
//! listing a directory of 1,000 entries.
//!
//! Every transfer reads from a file and writes to a file, on the same
//! filesystem, with the page cache warm: envd's `/files` (multipart, as
//! the SDKs upload, and a raw octet-stream body), `sftp put`/`get` on
//! the master connection, and `std::fs::copy` (copy_file_range: the
//! kernel copies, nothing passes through user memory) as the limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use prost::Message;
use serde_json::json;

use crate::common::{self, Client, Envd, fs_rpc};
use crate::exec::Wire;
use crate::openssh::OpenSsh;
use crate::sftp::Sftp;

const CHUNK: usize = 256 * 1024;

/// Incompressible content (xorshift), written once.
pub fn write_pseudo_random(path: &Path, size: u64) {
    let mut file = std::io::BufWriter::with_capacity(CHUNK, std::fs::File::create(path).expect("creating the source"));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(CHUNK as u64) as usize;
        file.write_all(&block[..n]).expect("writing the source");
        left -= n as u64;
    }
    file.flush().expect("writing the source");
}

fn timed(f: impl FnOnce()) -> Duration {
    let began = Instant::now();
    f();
    began.elapsed()
}

fn assert_same_size(a: &Path, b: &Path) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(size(a), size(b), "{} and {} differ in size", a.display(), b.display());
}

/// POSTs `head`, the file, then `tail` to `/files?query` over one
/// connection as `user`; expects 200.
fn post_raw(envd: &Envd, user: &str, query: &str, content_type: &str, head: &[u8], source: &Path, tail: &[u8]) {
    let len = std::fs::metadata(source).expect("source").len() + (head.len() + tail.len()) as u64;
    let mut stream = TcpStream::connect(envd.addr()).expect("connecting to envd");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let request = format!(
        "POST /files?{query} HTTP/1.1\r\nHost: bench\r\nAuthorization: {}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n",
        common::basic(user)
    );
    stream.write_all(request.as_bytes()).expect("sending the head");
    stream.write_all(head).expect("sending the body");
    let mut file = std::fs::File::open(source).expect("source");
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf).expect("reading the source") {
            0 => break,
            n => stream.write_all(&buf[..n]).expect("sending the body"),
        }
    }
    stream.write_all(tail).expect("sending the body");
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).expect("reading the status");
    assert!(status.starts_with("HTTP/1.1 200"), "upload failed: {status}");
}

/// Upload as the SDKs send it: `multipart/form-data`, one file part.
pub fn envd_upload_multipart(envd: &Envd, user: &str, source: &Path, target: &Path) -> Duration {
    let boundary = "benchboundary0123456789";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\n",
        target.display()
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let took = timed(|| post_raw(envd, user, "", &content_type, head.as_bytes(), source, tail.as_bytes()));
    assert_same_size(source, target);
    took
}

/// Upload with the file as the whole body (`application/octet-stream`).
pub fn envd_upload_octet(envd: &Envd, user: &str, source: &Path, target: &Path) -> Duration {
    let query = format!("path={}", target.display());
    let took = timed(|| post_raw(envd, user, &query, "application/octet-stream", b"", source, b""));
    assert_same_size(source, target);
    took
}

/// `GET /files` into a local file.
pub async fn envd_download(client: &Client, source: &Path, target: &Path) -> Duration {
    let began = Instant::now();
    let empty = http_body_util::Full::new(bytes::Bytes::new()).map_err(|never| match never {}).boxed();
    let response = client.open(Method::GET, &format!("/files?path={}", source.display()), &[], empty).await;
    assert_eq!(response.status(), 200, "download of {}", source.display());
    let mut file = std::fs::File::create(target).expect("download target");
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("reading the download").into_data() {
            file.write_all(&data).expect("writing the download");
        }
    }
    let took = began.elapsed();
    assert_same_size(source, target);
    took
}

pub fn sftp_upload(ssh: &OpenSsh, source: &Path, target: &Path) -> Duration {
    let took = timed(|| ssh.sftp_batch(&format!("put {} {}\n", source.display(), target.display())));
    assert_same_size(source, target);
    took
}

pub fn sftp_download(ssh: &OpenSsh, source: &Path, target: &Path) -> Duration {
    let took = timed(|| ssh.sftp_batch(&format!("get {} {}\n", source.display(), target.display())));
    assert_same_size(source, target);
    took
}

pub fn raw_copy(source: &Path, target: &Path) -> Duration {
    let took = timed(|| {
        std::fs::copy(source, target).expect("std::fs::copy");
    });
    assert_same_size(source, target);
    took
}

/// The work a durable upload does, without envd: copy into a temporary
/// beside the target, fsync it, rename it over the target, fsync the
/// directory.
pub fn raw_durable_copy(source: &Path, target: &Path) -> Duration {
    let temporary = target.with_extension("raw-tmp");
    let dir = target.parent().expect("the target's directory");
    let took = timed(|| {
        std::fs::copy(source, &temporary).expect("std::fs::copy");
        std::fs::File::open(&temporary).and_then(|f| f.sync_all()).expect("fsync of the copy");
        std::fs::rename(&temporary, target).expect("rename over the target");
        std::fs::File::open(dir).and_then(|d| d.sync_all()).expect("fsync of the directory");
    });
    assert_same_size(source, target);
    took
}

#[derive(Clone, PartialEq, prost::Message)]
struct PathRequest {
    #[prost(string, tag = "1")]
    path: String,
    /// ListDir's depth; absent from Stat's message.
    #[prost(uint32, optional, tag = "2")]
    depth: Option<u32>,
}

/// One filesystem RPC per sample: `Stat` of `path`, or `ListDir` of it
/// at depth 1 when `list` is set.
pub async fn envd_fs_latency(client: &Client, wire: Wire, path: &Path, list: bool, runs: usize) -> Vec<Duration> {
    let (rpc, depth) = if list { (fs_rpc::LIST_DIR, Some(1)) } else { (fs_rpc::STAT, None) };
    let path = path.display().to_string();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let began = Instant::now();
        let reply = match wire {
            Wire::Json => {
                let mut request = json!({"path": path});
                if let Some(depth) = depth {
                    request["depth"] = json!(depth);
                }
                client.unary(rpc, &request, &[]).await
            }
            Wire::Proto => {
                let request = PathRequest { path: path.clone(), depth };
                client.unary_proto(rpc, request.encode_to_vec(), &[]).await
            }
        };
        times.push(began.elapsed());
        assert_eq!(reply.status, 200, "{rpc} {path}: {}", reply.text());
        assert!(!reply.body.is_empty(), "{rpc} {path}: empty reply");
    }
    times
}

/// The same through SFTP requests on the master connection.
pub fn sftp_fs_latency(ssh: &OpenSsh, path: &Path, list: bool, expected: usize, runs: usize) -> Vec<Duration> {
    let mut sftp = Sftp::open(ssh);
    let path = path.display().to_string();
    (0..runs)
        .map(|_| {
            let began = Instant::now();
            if list {
                // The server lists `.` and `..` too.
                assert_eq!(sftp.list(&path), expected + 2, "SFTP listing of {path}");
            } else {
                sftp.stat(&path);
            }
            began.elapsed()
        })
        .collect()
}

/// statx of `path`, or readdir of it with an lstat of every entry (what
/// a listing with entry attributes needs), as directly as it gets.
pub fn raw_fs_latency(path: &Path, list: bool, expected: usize, runs: usize) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let began = Instant::now();
            if list {
                let mut entries = 0;
                for entry in std::fs::read_dir(path).expect("read_dir") {
                    std::fs::symlink_metadata(entry.expect("entry").path()).expect("lstat");
                    entries += 1;
                }
                assert_eq!(entries, expected);
            } else {
                std::fs::metadata(path).expect("stat");
            }
            began.elapsed()
        })
        .collect()
}
