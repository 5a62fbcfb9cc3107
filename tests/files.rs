//! The `/files` HTTP API against the real binary: uploads (multipart,
//! octet-stream, gzip, metadata), downloads (gzip negotiation, ranges),
//! signed URLs with the contract's vectors, compose, and the failure
//! paths that must leave the destination untouched: a full disk (a real
//! size-limited tmpfs), a client killed mid-upload, a stalled body.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::tmpfs::SmallFs;
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const BOUNDARY: &str = "envd-test-boundary-7MA4YWxkTrZu0gW";

fn q(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn multipart(parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

const MULTIPART: &str = "multipart/form-data; boundary=envd-test-boundary-7MA4YWxkTrZu0gW";

async fn post(client: &Client, query: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> common::Reply {
    client.send(Method::POST, &format!("/files?{query}"), headers, body).await
}

async fn get(client: &Client, query: &str, headers: &[(&str, &str)]) -> common::Reply {
    client.send(Method::GET, &format!("/files?{query}"), headers, Bytes::new()).await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out).unwrap();
    out
}

fn sign(path: &str, op: &str, user: &str, expiration: Option<i64>) -> String {
    let mut raw = format!("{path}:{op}:{user}:{TOKEN}");
    if let Some(expiration) = expiration {
        raw.push_str(&format!(":{expiration}"));
    }
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes())))
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let script = format!(
        "import os,sys\ntry: sys.stdout.write(os.getxattr({:?}, {name:?}).decode())\nexcept OSError: sys.exit(3)",
        path.display().to_string()
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    out.status.success().then(|| String::from_utf8(out.stdout).unwrap())
}

#[tokio::test]
async fn multipart_and_octet_stream_uploads() {
    let envd = Envd::start();
    let user = test_user();
    let client = envd.client();
    let dir = Scratch::new("upload");

    let target = dir.s("new/dirs/one.txt");
    let body = multipart(&[("file", "ignored-name", b"first")]);
    let reply =
        post(&client, &format!("path={}&username={}", q(&target), user.name), &[("content-type", MULTIPART)], body)
            .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.json(), json!([{"path": target, "name": "one.txt", "type": "file"}]));
    for path in [dir.path("new"), dir.path("new/dirs"), dir.path("new/dirs/one.txt")] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid), "{} belongs to the user", path.display());
    }
    assert_eq!(std::fs::metadata(dir.path("new/dirs/one.txt")).unwrap().mode() & 0o777, 0o644);

    // Several files: each part's filename is a full path; no path query.
    let body =
        multipart(&[("file", &dir.s("a/x.bin"), b"xx"), ("other", "skip", b"zz"), ("file", &dir.s("b/y.bin"), b"yyy")]);
    let reply = post(&client, "", &[("content-type", MULTIPART)], body).await;
    let json = reply.json();
    let names: Vec<&str> = json.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["x.bin", "y.bin"]);
    assert_eq!(std::fs::read(dir.path("b/y.bin")).unwrap(), b"yyy");

    // Relative paths resolve against the user's home.
    let reply = post(
        &client,
        &format!("path=envd-files-probe.txt&username={}", user.name),
        &[("content-type", "application/octet-stream")],
        "raw",
    )
    .await;
    assert_eq!(reply.json()[0]["path"], user.home.join("envd-files-probe.txt").display().to_string());
    std::fs::remove_file(user.home.join("envd-files-probe.txt")).unwrap();

    // gzip bodies are decoded; a replaced file keeps its mode.
    std::fs::set_permissions(dir.path("a/x.bin"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let headers = [("content-type", "application/octet-stream"), ("content-encoding", "gzip")];
    let reply = post(&client, &format!("path={}", q(&dir.s("a/x.bin"))), &headers, gzip(b"zipped content")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(std::fs::read(dir.path("a/x.bin")).unwrap(), b"zipped content");
    assert_eq!(std::fs::metadata(dir.path("a/x.bin")).unwrap().mode() & 0o777, 0o755);
    assert_eq!(dir.names("a"), ["x.bin"], "no temporary files left");
}

/// Query, headers, body, expected status.
type RefusalCase<'a> = (String, Vec<(&'a str, &'a str)>, Vec<u8>, StatusCode);

#[tokio::test]
async fn upload_refusals_write_nothing() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("refuse");
    let octet = [("content-type", "application/octet-stream")];
    let cases: Vec<RefusalCase> = vec![
        (String::new(), octet.to_vec(), b"no path".to_vec(), StatusCode::BAD_REQUEST),
        (
            format!("path={}", q(&dir.s("t/gz"))),
            vec![octet[0], ("content-encoding", "gzip")],
            b"not gzip at all".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("path={}", q(&dir.s("t/br"))),
            vec![octet[0], ("content-encoding", "br")],
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("path={}", q(&dir.s("t/ct"))),
            vec![("content-type", "text/plain")],
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (format!("path={}", q(&dir.s(""))), octet.to_vec(), b"x".to_vec(), StatusCode::BAD_REQUEST),
        ("path=~other/x".to_owned(), octet.to_vec(), b"x".to_vec(), StatusCode::BAD_REQUEST),
        (
            format!("path={}&username=no-such-user-xyz", q(&dir.s("t/u"))),
            octet.to_vec(),
            b"x".to_vec(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            format!("path={}&signature_expiration=soon", q(&dir.s("t/e"))),
            octet.to_vec(),
            b"x".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (query, headers, body, status) in cases {
        let reply = post(&client, &query, &headers, body).await;
        assert_eq!(reply.status, status, "{query} {headers:?}: {}", reply.text());
    }
    assert!(!dir.path("t").exists(), "nothing was created for refused uploads");

    let long_key = format!("x-metadata-{}", "k".repeat(247));
    for header in [("x-metadata-bad", "caf\u{e9}"), (long_key.as_str(), "v")] {
        let reply = post(&client, &format!("path={}", q(&dir.s("m"))), &[octet[0], header], "x").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{header:?}");
        assert_eq!(reply.json()["code"], 400);
    }
    let twice = multipart(&[("file", "a", b"1"), ("file", "b", b"2")]);
    let reply = post(&client, &format!("path={}", q(&dir.s("dup"))), &[("content-type", MULTIPART)], twice).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "two parts for one target");
    assert_eq!(std::fs::read(dir.path("dup")).unwrap(), b"1", "the earlier part stays written");
}

#[tokio::test]
async fn metadata_headers_become_xattrs() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("meta");
    let target = dir.s("m.txt");
    let headers =
        [("content-type", "application/octet-stream"), ("x-metadata-Owner", "Alice Smith"), ("x-metadata-k2", "v2")];
    let reply = post(&client, &format!("path={}", q(&target)), &headers, "x").await;
    assert_eq!(reply.json()[0]["metadata"], json!({"owner": "Alice Smith", "k2": "v2"}));
    assert_eq!(xattr(&dir.path("m.txt"), "user.e2b.owner").as_deref(), Some("Alice Smith"));
    let stat = client.call("/filesystem.Filesystem/Stat", &json!({"path": target})).await;
    assert_eq!(stat["entry"]["metadata"], json!({"owner": "Alice Smith", "k2": "v2"}));

    let reply =
        post(&client, &format!("path={}", q(&target)), &[("content-type", "application/octet-stream")], "y").await;
    assert!(reply.json()[0].get("metadata").is_none(), "an upload without metadata clears it");
    assert_eq!(xattr(&dir.path("m.txt"), "user.e2b.owner"), None);
}

#[tokio::test]
async fn downloads_negotiate_and_serve_ranges() {
    let envd = Envd::start();
    let user = test_user();
    let client = envd.client();
    let dir = Scratch::new("download");
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path("data.bin"), &content).unwrap();
    let path = q(&dir.s("data.bin"));

    let plain = get(&client, &format!("path={path}"), &[]).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.body.as_ref(), content.as_slice());
    assert_eq!(plain.header("content-length"), "200000");
    assert_eq!(plain.header("accept-ranges"), "bytes");
    assert_eq!(plain.header("content-disposition"), "inline; filename=data.bin");
    assert!(plain.header("vary").contains("Accept-Encoding"));
    assert!(!plain.header("last-modified").is_empty());

    let zipped = get(&client, &format!("path={path}"), &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(zipped.header("content-encoding"), "gzip");
    assert_eq!(zipped.header("content-length"), "", "gzip is streamed chunked");
    assert_eq!(gunzip(&zipped.body), content);
    let refused = get(&client, &format!("path={path}"), &[("accept-encoding", "br, identity;q=0")]).await;
    assert_eq!(refused.status, StatusCode::NOT_ACCEPTABLE);

    let part = get(&client, &format!("path={path}"), &[("range", "bytes=10-19"), ("accept-encoding", "gzip")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT, "a range forces identity");
    assert_eq!(part.body.as_ref(), &content[10..20]);
    assert_eq!(part.header("content-range"), "bytes 10-19/200000");
    let beyond = get(&client, &format!("path={path}"), &[("range", "bytes=300000-")]).await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let since = plain.header("last-modified").to_owned();
    let cached = get(&client, &format!("path={path}"), &[("if-modified-since", &since)]).await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);

    std::fs::write(dir.path("note.txt"), "hello").unwrap();
    let text = get(&client, &format!("path={}", q(&dir.s("note.txt"))), &[]).await;
    assert_eq!(text.header("content-type"), "text/plain; charset=utf-8");

    for (query, status) in [
        (format!("path={}", q(&dir.s(""))), StatusCode::BAD_REQUEST),
        (format!("path={}", q(&dir.s("missing"))), StatusCode::NOT_FOUND),
        (format!("path={path}&username=no-such-user-xyz"), StatusCode::UNAUTHORIZED),
        ("path=~other/x".to_owned(), StatusCode::BAD_REQUEST),
    ] {
        let reply = get(&client, &query, &[]).await;
        assert_eq!(reply.status, status, "{query}");
        assert_eq!(reply.json()["code"], status.as_u16(), "{query}");
    }
    let missing = get(&client, &format!("path={}", q(&dir.s("missing"))), &[]).await;
    assert_eq!(missing.json()["message"], format!("path '{}' does not exist", dir.s("missing")));

    std::fs::write(user.home.join("envd-dl-probe"), b"home").unwrap();
    let relative = get(&client, &format!("path=envd-dl-probe&username={}", user.name), &[]).await;
    assert_eq!(relative.body.as_ref(), b"home");
    std::fs::remove_file(user.home.join("envd-dl-probe")).unwrap();
}

#[tokio::test]
async fn signed_urls_and_header_token() {
    // The test's own signer must reproduce the contract's vectors first.
    assert_eq!(sign("/home/user/hello.txt", "read", "", None), "v1_Q1oODJQwZxJOp+Cv9RJhuccjbZgB7bld8m4C4Z73S4w");
    assert_eq!(
        sign("hello.txt", "write", "user", Some(1_767_225_600)),
        "v1_kH/H0n8zpp/wjL23NrRZ9+YGgmMA6V1wp+dDgd8riZw"
    );

    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("signed");
    std::fs::write(dir.path("f.txt"), b"secret").unwrap();
    assert_eq!(client.post_json("/init", &json!({"accessToken": TOKEN})).await.status, StatusCode::NO_CONTENT);
    let path = dir.s("f.txt");

    let unsigned = get(&client, &format!("path={}", q(&path)), &[]).await;
    assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unsigned.json()["message"], "missing signature query parameter");
    let signed = get(&client, &format!("path={}&signature={}", q(&path), q(&sign(&path, "read", "", None))), &[]).await;
    assert_eq!(signed.body.as_ref(), b"secret");
    // The contract's first vector is accepted (404: past the check, no such file here).
    let vector = get(
        &client,
        &format!("path=/home/user/hello.txt&signature={}", q("v1_Q1oODJQwZxJOp+Cv9RJhuccjbZgB7bld8m4C4Z73S4w")),
        &[],
    )
    .await;
    assert_ne!(vector.status, StatusCode::UNAUTHORIZED, "{}", vector.text());
    // The second has expired (2026-01-01).
    let expired_query = format!(
        "path=hello.txt&username=user&signature_expiration=1767225600&signature={}",
        q("v1_kH/H0n8zpp/wjL23NrRZ9+YGgmMA6V1wp+dDgd8riZw")
    );
    let expired = post(&client, &expired_query, &[("content-type", "application/octet-stream")], "x").await;
    assert_eq!(expired.json()["message"], "signature is already expired");
    let future = 4_102_444_800i64;
    let good = format!(
        "path={}&signature_expiration={future}&signature={}",
        q(&path),
        q(&sign(&path, "read", "", Some(future)))
    );
    assert_eq!(get(&client, &good, &[]).await.status, StatusCode::OK);
    let wrong = format!("path={}&signature={}", q(&path), q(&sign(&path, "write", "", None)));
    assert_eq!(get(&client, &wrong, &[]).await.json()["message"], "invalid signature");

    let upload = format!("path={}&signature={}", q(&dir.s("up.txt")), q(&sign(&dir.s("up.txt"), "write", "", None)));
    let reply = post(&client, &upload, &[("content-type", "application/octet-stream")], "via signature").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let header_ok = get(&client, &format!("path={}", q(&path)), &[("x-access-token", TOKEN)]).await;
    assert_eq!(header_ok.status, StatusCode::OK);
    let header_bad = get(&client, &format!("path={}", q(&path)), &[("x-access-token", "nope")]).await;
    assert_eq!(header_bad.json()["message"], "access token present in header but does not match");

    let compose = json!({"source_paths": [path], "destination": dir.s("c.txt")});
    let refused =
        client.send(Method::POST, "/files/compose", &[("content-type", "application/json")], compose.to_string()).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "compose needs the token");
}

#[tokio::test]
async fn compose_concatenates_and_removes_sources() {
    let envd = Envd::start();
    let user = test_user();
    let client = envd.client();
    let dir = Scratch::new("compose");
    std::fs::write(dir.path("p1"), b"part one,").unwrap();
    std::fs::write(dir.path("p2"), b"part two").unwrap();
    let compose = |body: Value| {
        let client = client.clone();
        async move {
            client.send(Method::POST, "/files/compose", &[("content-type", "application/json")], body.to_string()).await
        }
    };
    let dest = dir.s("out/all.txt");
    let reply =
        compose(json!({"source_paths": [dir.s("p1"), dir.s("p2")], "destination": dest, "username": user.name})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"path": dest, "name": "all.txt", "type": "file"}));
    assert_eq!(std::fs::read(dir.path("out/all.txt")).unwrap(), b"part one,part two");
    assert_eq!(std::fs::metadata(dir.path("out/all.txt")).unwrap().uid(), user.uid);
    assert!(!dir.path("p1").exists() && !dir.path("p2").exists());

    for (body, status) in [
        (json!({"source_paths": [], "destination": dest}), StatusCode::BAD_REQUEST),
        (json!({"source_paths": [dir.s("nope")], "destination": dest}), StatusCode::NOT_FOUND),
        (json!({"source_paths": [dest], "destination": dest}), StatusCode::BAD_REQUEST),
        (json!({"source_paths": [dir.s("out")], "destination": dir.s("x")}), StatusCode::BAD_REQUEST),
        (
            json!({"source_paths": [dest], "destination": dir.s("y"), "username": "no-such-user-xyz"}),
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        assert_eq!(compose(body.clone()).await.status, status, "{body}");
    }
    let garbage = client.send(Method::POST, "/files/compose", &[], "not json").await;
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn disk_full_is_507_and_keeps_the_old_file() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("full");
    let _fs = SmallFs::mount(&dir.path("mnt"), "1m");
    std::fs::write(dir.path("mnt/keep.txt"), b"previous content").unwrap();
    let big = vec![b'x'; 3 << 20];
    let target = q(&dir.s("mnt/keep.txt"));
    let reply =
        post(&client, &format!("path={target}"), &[("content-type", "application/octet-stream")], big.clone()).await;
    assert_eq!(reply.status, StatusCode::INSUFFICIENT_STORAGE, "{}", reply.text());
    assert_eq!(reply.json(), json!({"code": 507, "message": "not enough disk space available"}));
    assert_eq!(std::fs::read(dir.path("mnt/keep.txt")).unwrap(), b"previous content");
    assert_eq!(dir.names("mnt"), ["keep.txt"], "no temporary file left behind");

    let body = multipart(&[("file", &dir.s("mnt/new.bin"), &big)]);
    let reply = post(&client, "", &[("content-type", MULTIPART)], body).await;
    assert_eq!(reply.status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(dir.names("mnt"), ["keep.txt"]);
}

/// Sends a request head and part of a body over a raw connection.
fn raw_upload(envd: &Envd, path: &str, content_length: usize, sent: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(envd.addr()).unwrap();
    let head = format!(
        "POST /files?path={} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {content_length}\r\n\r\n",
        q(path)
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(sent).unwrap();
    stream
}

#[tokio::test]
async fn a_client_killed_mid_upload_changes_nothing() {
    let envd = Envd::start();
    let dir = Scratch::new("killed");
    std::fs::write(dir.path("target"), b"old").unwrap();
    let stream = raw_upload(&envd, &dir.s("target"), 50 << 20, &vec![b'n'; 4 << 20]);
    // The temporary file appears beside the target while the body flows.
    assert!(eventually(Duration::from_secs(5), || dir.names("").len() == 2).await, "{:?}", dir.names(""));
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || dir.names("") == ["target"]).await,
        "temp file not removed: {:?}",
        dir.names("")
    );
    assert_eq!(std::fs::read(dir.path("target")).unwrap(), b"old");
}

#[tokio::test]
async fn a_stalled_upload_is_aborted() {
    let envd = Envd::options().args(["--upload-idle-timeout", "1"]).start();
    let dir = Scratch::new("stalled");
    let mut stream = raw_upload(&envd, &dir.s("target"), 1 << 20, b"some bytes then nothing");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("\r\n\r\n") {
        let n = stream.read(&mut buf).expect("envd answers a stalled upload");
        assert!(n > 0, "connection closed without an answer");
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(eventually(Duration::from_secs(5), || dir.names("").is_empty()).await, "{:?}", dir.names(""));
}

#[tokio::test]
async fn special_files_download_without_hanging() {
    let envd = Envd::start();
    let client = envd.client();
    let zero = get(&client, "path=/dev/zero", &[("accept-encoding", "gzip")]).await;
    assert_eq!(zero.status, StatusCode::OK);
    assert!(gunzip(&zero.body).is_empty(), "a device is read up to its stat'ed size (0)");
    let dir = Scratch::new("fifo");
    let fifo = dir.path("pipe");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let reply = get(&client, &format!("path={}", q(&dir.s("pipe"))), &[]).await;
    assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 0), "opening a fifo does not block");
}

#[tokio::test]
async fn a_gzip_bomb_streams_with_flat_memory() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("bomb");
    let target = dir.s("inflated.bin");
    let inflated: u64 = 256 << 20;
    // A multipart body holding 256 MiB of zeros deflates to well under
    // 1 MiB; the whole body is gzipped, as Content-Encoding says.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let head = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{target}\"\r\n\r\n");
    encoder.write_all(head.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated >> 20 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.write_all(format!("\r\n--{BOUNDARY}--\r\n").as_bytes()).unwrap();
    let compressed = encoder.finish().unwrap();
    assert!(compressed.len() < 1 << 20);
    let before = envd.status_kib("VmRSS");
    let headers = [("content-type", MULTIPART), ("content-encoding", "gzip")];
    let reply = post(&client, "", &headers, compressed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(std::fs::metadata(dir.path("inflated.bin")).unwrap().len(), inflated);
    let peak = envd.status_kib("VmHWM");
    eprintln!("envd RSS {before} KiB before, peak {peak} KiB");
    assert!(peak < before + 64 * 1024, "peak RSS {peak} KiB (from {before} KiB) while inflating {inflated} bytes");
}

#[tokio::test]
async fn a_refused_large_upload_still_gets_its_answer() {
    let envd = Envd::start();
    let client = envd.client();
    assert_eq!(client.post_json("/init", &json!({"accessToken": TOKEN})).await.status, StatusCode::NO_CONTENT);
    let dir = Scratch::new("refusedbig");
    let reply = post(
        &client,
        &format!("path={}", q(&dir.s("x"))),
        &[("content-type", "application/octet-stream")],
        vec![b'x'; 8 << 20],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "the client reads the 401, not a reset");
    assert!(!dir.path("x").exists());
}
