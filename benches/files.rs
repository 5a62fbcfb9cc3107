//! File transfer benchmark: upload and download of 1 GiB over loopback
//! beside a raw local copy of the same file, envd's peak RSS during each
//! transfer, and Stat / ListDir (1,000 entries) operations per second.
//! Prints a table; asserts nothing about time.
//!
//! Run: `cargo bench --bench files` (as root). Uses the envd cargo built
//! for the bench (optimised, in the active target directory). Needs ~3 GiB
//! free under the temp dir (`ENVD_BENCH_DIR` overrides it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Client, Envd};
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;

const SIZE: u64 = 1 << 30;
/// gzip is CPU-bound: a smaller file keeps the run short.
const GZIP_SIZE: u64 = 256 << 20;
const CHUNK: usize = 256 * 1024;
const STAT_CALLS: usize = 2000;
const LIST_CALLS: usize = 100;
const LIST_ENTRIES: usize = 1000;
const MIB: f64 = (1 << 20) as f64;

fn main() {
    common::require_root();
    let (binary, which) = common::binary_and_profile();
    println!("envd binary: {} ({which})", binary.display());
    let base = std::env::var_os("ENVD_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("envd-bench-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("source.bin");
    write_pseudo_random(&source, SIZE);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let envd = Envd::options().binary(&binary).start();
    let client = envd.client();
    std::thread::sleep(Duration::from_millis(200));
    let idle_rss = envd.status_kib("VmRSS");

    let copy = timed(|| assert_eq!(std::fs::copy(&source, dir.join("copy.bin")).unwrap(), SIZE));
    let user_copy = timed(|| userspace_copy(&source, &dir.join("copy2.bin")));
    let _ = std::fs::remove_file(dir.join("copy.bin"));
    let _ = std::fs::remove_file(dir.join("copy2.bin"));

    let (upload, upload_rss) = measured(&envd, || upload_octet(&envd, &source, &dir.join("up.bin")));
    let _ = std::fs::remove_file(dir.join("up.bin"));
    let (multipart, multipart_rss) = measured(&envd, || upload_multipart(&envd, &source, &dir.join("mp.bin")));
    let _ = std::fs::remove_file(dir.join("mp.bin"));
    let (download, download_rss) = measured(&envd, || runtime.block_on(download_all(&client, &source, None, SIZE)));
    let (gzip, gzip_rss) =
        measured(&envd, || runtime.block_on(download_all(&client, &source, Some("gzip"), GZIP_SIZE)));

    let stat_rate = runtime.block_on(stat_rate(&client, &source));
    let list_dir = dir.join("list");
    std::fs::create_dir_all(&list_dir).unwrap();
    for i in 0..LIST_ENTRIES {
        std::fs::write(list_dir.join(format!("entry-{i:04}")), b"x").unwrap();
    }
    let list_rate = runtime.block_on(list_rate(&client, &list_dir));
    let _ = std::fs::remove_dir_all(&dir);

    let rate = |bytes: u64, took: Duration| bytes as f64 / MIB / took.as_secs_f64();
    let raw = rate(SIZE, copy);
    println!();
    println!("| measurement | throughput | vs std::fs::copy | envd peak RSS (VmHWM) |");
    println!("|---|---|---|---|");
    println!("| raw copy, std::fs::copy (copy_file_range), 1 GiB | {raw:.0} MiB/s | 100% | |");
    println!(
        "| raw copy, read/write 256 KiB buffer, 1 GiB | {:.0} MiB/s | {:.0}% | |",
        rate(SIZE, user_copy),
        pct(rate(SIZE, user_copy), raw)
    );
    for (name, bytes, took, rss) in [
        ("upload, application/octet-stream, 1 GiB", SIZE, upload, upload_rss),
        ("upload, multipart/form-data, 1 GiB", SIZE, multipart, multipart_rss),
        ("download, identity, 1 GiB", SIZE, download, download_rss),
        ("download, gzip (fastest level), 256 MiB", GZIP_SIZE, gzip, gzip_rss),
    ] {
        let r = rate(bytes, took);
        println!("| {name} | {r:.0} MiB/s | {:.0}% | {} |", pct(r, raw), fmt_kib(rss));
    }
    println!();
    println!("| operation | rate |");
    println!("|---|---|");
    println!("| Stat (one keep-alive connection, {STAT_CALLS} calls) | {stat_rate:.0} ops/s |");
    println!(
        "| ListDir of {LIST_ENTRIES} entries ({LIST_CALLS} calls) | {list_rate:.1} ops/s ({:.0} entries/s) |",
        list_rate * LIST_ENTRIES as f64
    );
    println!("| envd RSS idle before the transfers | {} |", fmt_kib(idle_rss));
}

fn pct(value: f64, of: f64) -> f64 {
    100.0 * value / of
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// Runs `f` with envd's peak RSS reset first; returns the time and peak.
fn measured(envd: &Envd, f: impl FnOnce()) -> (Duration, u64) {
    // Writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write(format!("/proc/{}/clear_refs", envd.pid()), "5").unwrap();
    let took = timed(f);
    (took, envd.status_kib("VmHWM"))
}

/// Incompressible content (xorshift), so gzip does real work.
fn write_pseudo_random(path: &Path, size: u64) {
    let mut file = std::io::BufWriter::with_capacity(CHUNK, std::fs::File::create(path).unwrap());
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
        file.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
}

fn userspace_copy(from: &Path, to: &Path) {
    let mut input = std::fs::File::open(from).unwrap();
    let mut output = std::fs::File::create(to).unwrap();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n]).unwrap();
    }
}

/// POSTs `head`, the file, then `tail` over one connection; expects 200.
fn post_raw(envd: &Envd, query: &str, content_type: &str, head: &[u8], source: &Path, tail: &[u8]) {
    let len = std::fs::metadata(source).unwrap().len() + (head.len() + tail.len()) as u64;
    let mut stream = TcpStream::connect(envd.addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    let request = format!(
        "POST /files?{query} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(head).unwrap();
    let mut file = std::fs::File::open(source).unwrap();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).unwrap();
    }
    stream.write_all(tail).unwrap();
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "upload failed: {status}");
}

fn upload_octet(envd: &Envd, source: &Path, target: &Path) {
    post_raw(envd, &format!("path={}", target.display()), "application/octet-stream", b"", source, b"");
}

fn upload_multipart(envd: &Envd, source: &Path, target: &Path) {
    let boundary = "benchboundary0123456789";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\n",
        target.display()
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let content_type = format!("multipart/form-data; boundary={boundary}");
    post_raw(envd, "", &content_type, head.as_bytes(), source, tail.as_bytes());
}

/// Downloads the first `limit` bytes' worth (whole file for identity).
async fn download_all(client: &Client, source: &Path, encoding: Option<&str>, limit: u64) {
    let path = if limit < SIZE {
        let small = source.with_file_name("gzip-source.bin");
        if !small.exists() {
            let mut input = std::fs::File::open(source).unwrap().take(limit);
            std::io::copy(&mut input, &mut std::fs::File::create(&small).unwrap()).unwrap();
        }
        small
    } else {
        source.to_owned()
    };
    let headers: Vec<(&str, &str)> = encoding.map(|e| ("accept-encoding", e)).into_iter().collect();
    let empty = http_body_util::Full::new(bytes::Bytes::new()).map_err(|never| match never {}).boxed();
    let response = client.open(Method::GET, &format!("/files?path={}", path.display()), &headers, empty).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert!(received > 0);
}

async fn stat_rate(client: &Client, path: &Path) -> f64 {
    let request = json!({"path": path.display().to_string()});
    let start = Instant::now();
    for _ in 0..STAT_CALLS {
        client.call("/filesystem.Filesystem/Stat", &request).await;
    }
    STAT_CALLS as f64 / start.elapsed().as_secs_f64()
}

async fn list_rate(client: &Client, dir: &Path) -> f64 {
    let request = json!({"path": dir.display().to_string(), "depth": 1});
    let start = Instant::now();
    for _ in 0..LIST_CALLS {
        let reply = client.call("/filesystem.Filesystem/ListDir", &request).await;
        assert_eq!(reply["entries"].as_array().map(Vec::len), Some(LIST_ENTRIES));
    }
    LIST_CALLS as f64 / start.elapsed().as_secs_f64()
}
