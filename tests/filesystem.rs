//! The Filesystem service over Connect JSON against the real binary: entry
//! info, listing, mkdir, move, remove, stream and polling watchers, with
//! real files, a real user and real extended attributes.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::fs_rpc::{
    CREATE_WATCHER, GET_WATCHER_EVENTS as GET_EVENTS, LIST_DIR as LIST, MAKE_DIR as MKDIR, MOVE, REMOVE,
    REMOVE_WATCHER, STAT, WATCH_DIR as WATCH,
};
use common::*;
use http::StatusCode;
use serde_json::{Value, json};

fn set_xattr(path: &Path, name: &str, value: &str) {
    let status = std::process::Command::new("setfattr").args(["-n", name, "-v", value]).arg(path).status();
    if status.as_ref().is_ok_and(|s| s.success()) {
        return;
    }
    // No attr tools: use python's os.setxattr, also real.
    let script = format!("import os; os.setxattr({:?}, {name:?}, {value:?}.encode())", path.display().to_string());
    let ok = std::process::Command::new("python3").args(["-c", &script]).status().unwrap();
    assert!(ok.success(), "setting xattr {name} on {}", path.display());
}

async fn entry(client: &Client, path: &str) -> Value {
    client.call(STAT, &json!({ "path": path })).await["entry"].clone()
}

#[tokio::test]
async fn stat_builds_entry_info_like_the_reference() {
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("stat");
    let file = dir.path("data.txt");
    std::fs::write(&file, b"hello").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&file, Some(user.uid), Some(user.extra_gid)).unwrap();
    set_xattr(&file, "user.e2b.owner", "alice");
    set_xattr(&file, "user.other", "ignored");

    let info = entry(&client, &dir.s("data.txt")).await;
    assert_eq!(info["name"], "data.txt");
    assert_eq!(info["type"], "FILE_TYPE_FILE");
    assert_eq!(info["path"], dir.s("data.txt"));
    assert_eq!(info["size"], "5", "int64 is a JSON string");
    assert_eq!(info["mode"], 0o640);
    assert_eq!(info["permissions"], "-rw-r-----");
    assert_eq!(info["owner"], user.name.as_str());
    assert_eq!(info["group"], user.extra_group.as_str());
    assert_eq!(info["metadata"], json!({"owner": "alice"}));
    assert!(info.get("isSymlink").is_none() && info.get("symlinkTarget").is_none());
    let mtime = info["modifiedTime"].as_str().unwrap();
    assert!(mtime.ends_with('Z') && mtime.contains('T'), "{mtime}");

    std::os::unix::fs::symlink(&file, dir.path("link")).unwrap();
    let link = entry(&client, &dir.s("link")).await;
    assert_eq!(link["type"], "FILE_TYPE_FILE", "a symlink reports its target's type");
    assert_eq!(link["isSymlink"], true);
    assert_eq!(link["symlinkTarget"], dir.s("data.txt"));
    assert_eq!(link["mode"], 0o640, "the target's permission bits");
    assert!(link["permissions"].as_str().unwrap().starts_with('L'));
    assert_eq!(link["metadata"], json!({"owner": "alice"}), "metadata is read through the link");

    std::os::unix::fs::symlink("nowhere", dir.path("broken")).unwrap();
    let broken = entry(&client, &dir.s("broken")).await;
    assert!(broken.get("type").is_none(), "broken links are FILE_TYPE_UNSPECIFIED (omitted)");
    assert_eq!(broken["symlinkTarget"], dir.s("broken"));

    let null = entry(&client, "/dev/null").await;
    assert_eq!(null["permissions"], "Dcrw-rw-rw-");
    let sticky = entry(&client, "/tmp").await;
    assert_eq!(
        (sticky["type"].as_str(), sticky["permissions"].as_str()),
        (Some("FILE_TYPE_DIRECTORY"), Some("dtrwxrwxrwx"))
    );
    assert_eq!(entry(&client, "/").await["name"], "/");
}

#[tokio::test]
async fn stat_errors_and_path_resolution() {
    let envd = Envd::start();
    let user = test_user();
    let client = envd.client();
    let (status, err) = client.call_err(STAT, &json!({"path": "/definitely/not/here"})).await;
    assert_eq!((status, err.code.as_str()), (StatusCode::NOT_FOUND, "not_found"));
    assert!(err.message.contains("/definitely/not/here"));
    let (status, err) = client.call_err(STAT, &json!({"path": "~root/x"})).await;
    assert_eq!((status, err.code.as_str()), (StatusCode::BAD_REQUEST, "invalid_argument"));

    let as_user = envd.client().with_user(&user.name);
    assert_eq!(entry(&as_user, "").await["path"], user.home.display().to_string(), "empty path is the home");
    assert_eq!(entry(&as_user, "~").await["path"], user.home.display().to_string());
    std::fs::write(user.home.join(".envd-fs-probe"), b"x").unwrap();
    let relative = entry(&as_user, ".envd-fs-probe").await;
    assert_eq!(relative["path"], user.home.join(".envd-fs-probe").display().to_string());
    assert_eq!(entry(&as_user, "~/.envd-fs-probe").await["path"], relative["path"]);
    std::fs::remove_file(user.home.join(".envd-fs-probe")).unwrap();
    assert_eq!(entry(&client, "").await["path"], "/root", "no Basic header: the default user, root");

    let ghost = envd.client().with_user("no-such-user-xyz").unary(STAT, &json!({"path": "/"}), &[]).await;
    assert_eq!(ghost.status, StatusCode::UNAUTHORIZED);
    assert_eq!(ghost.json()["code"], "unauthenticated");
}

#[tokio::test]
async fn list_dir_walks_in_order_to_depth() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("list");
    for sub in ["b/c/d", "a"] {
        std::fs::create_dir_all(dir.path(sub)).unwrap();
    }
    std::fs::write(dir.path("b/c/file"), b"x").unwrap();
    std::fs::write(dir.path("z.txt"), b"z").unwrap();
    std::os::unix::fs::symlink(dir.path("b"), dir.path("link")).unwrap();
    set_xattr(&dir.path("z.txt"), "user.e2b.stage", "raw");
    set_xattr(&dir.path("b/c/file"), "user.e2b.owner", "alice");
    set_xattr(&dir.path("b"), "user.e2b.kind", "dir");
    let list = |path: String, depth: u32| {
        let client = client.clone();
        async move {
            let reply = client.call(LIST, &json!({"path": path, "depth": depth})).await;
            reply["entries"].as_array().cloned().unwrap_or_default()
        }
    };
    let names = |entries: &[Value]| -> Vec<String> {
        entries.iter().map(|e| e["path"].as_str().unwrap().strip_prefix(&dir.s("")).unwrap().to_owned()).collect()
    };
    assert_eq!(names(&list(dir.s(""), 0).await), ["a", "b", "link", "z.txt"], "depth 0 counts as 1");
    assert_eq!(names(&list(dir.s(""), 2).await), ["a", "b", "b/c", "link", "z.txt"]);
    let deep = list(dir.s(""), 5).await;
    assert_eq!(names(&deep), ["a", "b", "b/c", "b/c/d", "b/c/file", "link", "z.txt"]);
    let metadata: Vec<&Value> = deep.iter().map(|e| &e["metadata"]).collect();
    let none = Value::Null;
    assert_eq!(
        metadata,
        [
            &none,
            &json!({"kind": "dir"}),
            &none,
            &none,
            &json!({"owner": "alice"}),
            &json!({"kind": "dir"}),
            &json!({"stage": "raw"})
        ],
        "user.e2b.* of each entry, at every depth, read through a symlink"
    );
    let link = list(dir.s(""), 1).await.into_iter().find(|e| e["name"] == "link").unwrap();
    assert_eq!((link["type"].as_str(), link["isSymlink"].as_bool()), (Some("FILE_TYPE_DIRECTORY"), Some(true)));
    let through_link = list(dir.s("link"), 1).await;
    assert_eq!(through_link[0]["path"], dir.s("link/c"), "paths stay under the requested link");

    let (status, err) = client.call_err(LIST, &json!({"path": dir.s("z.txt")})).await;
    assert_eq!((status, err.code.as_str()), (StatusCode::BAD_REQUEST, "invalid_argument"));
    let (_, err) = client.call_err(LIST, &json!({"path": dir.s("missing")})).await;
    assert_eq!(err.code, "not_found");
    std::os::unix::fs::symlink(dir.path("loop2"), dir.path("loop1")).unwrap();
    std::os::unix::fs::symlink(dir.path("loop1"), dir.path("loop2")).unwrap();
    let (_, err) = client.call_err(LIST, &json!({"path": dir.s("loop1")})).await;
    assert_eq!(err.code, "failed_precondition");
}

#[tokio::test]
async fn make_dir_move_and_remove_own_what_they_create() {
    let envd = Envd::start();
    let user = test_user();
    let client = envd.client().with_user(&user.name);
    let dir = Scratch::new("mkdir");
    let made = client.call(MKDIR, &json!({"path": dir.s("x/y/z")})).await;
    assert_eq!(made["entry"]["type"], "FILE_TYPE_DIRECTORY");
    for sub in ["x", "x/y", "x/y/z"] {
        let meta = std::fs::metadata(dir.path(sub)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid), "{sub} is owned by the caller");
        assert_eq!(meta.mode() & 0o777, 0o755 & !current_umask(), "{sub}");
    }
    assert_eq!(std::fs::metadata(&dir.0).unwrap().uid(), 0, "existing dirs are untouched");
    let (status, err) = client.call_err(MKDIR, &json!({"path": dir.s("x/y")})).await;
    assert_eq!((status, err.code.as_str()), (StatusCode::CONFLICT, "already_exists"));
    std::fs::write(dir.path("file"), b"1").unwrap();
    let (_, err) = client.call_err(MKDIR, &json!({"path": dir.s("file")})).await;
    assert_eq!(err.code, "invalid_argument");
    let (_, err) = client.call_err(MKDIR, &json!({"path": dir.s("file/sub")})).await;
    assert_eq!(err.code, "internal");

    let moved = client.call(MOVE, &json!({"source": dir.s("file"), "destination": dir.s("new/parent/renamed")})).await;
    assert_eq!((moved["entry"]["name"].as_str(), moved["entry"]["size"].as_str()), (Some("renamed"), Some("1")));
    assert_eq!(
        std::fs::metadata(dir.path("new/parent")).unwrap().uid(),
        user.uid,
        "created parents belong to the user"
    );
    assert_eq!(std::fs::metadata(dir.path("new/parent/renamed")).unwrap().uid(), 0, "the moved file keeps its owner");
    std::fs::write(dir.path("other"), b"2").unwrap();
    client.call(MOVE, &json!({"source": dir.s("other"), "destination": dir.s("new/parent/renamed")})).await;
    assert_eq!(std::fs::read(dir.path("new/parent/renamed")).unwrap(), b"2", "an existing destination is replaced");
    let (_, err) = client.call_err(MOVE, &json!({"source": dir.s("gone"), "destination": dir.s("g2")})).await;
    assert_eq!(err.code, "not_found");

    client.call(REMOVE, &json!({"path": dir.s("x")})).await;
    assert!(!dir.path("x").exists());
    client.call(REMOVE, &json!({"path": dir.s("x")})).await;
    client.call(REMOVE, &json!({"path": dir.s("new/parent/renamed")})).await;
    assert!(!dir.path("new/parent/renamed").exists());
}

fn current_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

#[tokio::test]
async fn watch_dir_streams_events() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("watch");
    let request = json!({"path": dir.s(""), "recursive": true, "includeEntry": true});
    let mut stream = client.stream(WATCH, &request, &[("keepalive-ping-interval", "1")]).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.next_frame().await.unwrap().json(), json!({"start": {}}), "the start event comes first");

    std::fs::write(dir.path("a.txt"), b"1").unwrap();
    let created = next_fs_event(&mut stream).await;
    assert_eq!((created["name"].as_str(), created["type"].as_str()), (Some("a.txt"), Some("EVENT_TYPE_CREATE")));
    assert_eq!(created["entry"]["path"], dir.s("a.txt"));
    assert_eq!(next_fs_event(&mut stream).await["type"], "EVENT_TYPE_WRITE");

    std::fs::create_dir(dir.path("sub")).unwrap();
    assert_eq!(next_fs_event(&mut stream).await["name"], "sub");
    // Give the new directory's watch a moment, then write inside it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(dir.path("sub/inner"), b"").unwrap();
    let inner = next_fs_event(&mut stream).await;
    assert_eq!((inner["name"].as_str(), inner["type"].as_str()), (Some("sub/inner"), Some("EVENT_TYPE_CREATE")));

    std::fs::set_permissions(dir.path("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let chmod = next_fs_event(&mut stream).await;
    assert_eq!((chmod["type"].as_str(), chmod["entry"]["mode"].as_u64()), (Some("EVENT_TYPE_CHMOD"), Some(0o600)));
    std::fs::rename(dir.path("a.txt"), dir.path("b.txt")).unwrap();
    let renamed = next_fs_event(&mut stream).await;
    assert_eq!((renamed["name"].as_str(), renamed["type"].as_str()), (Some("a.txt"), Some("EVENT_TYPE_RENAME")));
    assert!(renamed.get("entry").is_none(), "no entry for rename");
    assert_eq!(next_fs_event(&mut stream).await["name"], "b.txt");
    std::fs::remove_file(dir.path("b.txt")).unwrap();
    let removed = next_fs_event(&mut stream).await;
    assert_eq!((removed["name"].as_str(), removed["type"].as_str()), (Some("b.txt"), Some("EVENT_TYPE_REMOVE")));

    // Silence: keep-alives at the requested interval.
    let frame = stream.next_frame_within(Duration::from_secs(3)).await.expect("a keep-alive within 3 s").unwrap();
    assert_eq!(frame.json(), json!({"keepalive": {}}));
}

#[tokio::test]
async fn watch_dir_ends_at_its_deadline() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("watchdeadline");
    let mut stream = client.stream(WATCH, &json!({"path": dir.s("")}), &[("connect-timeout-ms", "800")]).await;
    assert_eq!(stream.next_frame().await.unwrap().json(), json!({"start": {}}));
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next_frame())
        .await
        .expect("the watch outlived its deadline");
    assert_eq!(end.unwrap().end_error().map(|e| e.code).as_deref(), Some("deadline_exceeded"));
}

#[tokio::test]
async fn watch_dir_refuses_bad_targets() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("watchbad");
    std::fs::write(dir.path("f"), b"").unwrap();
    for (path, code) in
        [(dir.s("f"), "invalid_argument"), (dir.s("missing"), "not_found"), ("~x/y".to_owned(), "invalid_argument")]
    {
        let mut stream = client.stream(WATCH, &json!({"path": path}), &[]).await;
        assert_eq!(stream.status, StatusCode::OK, "stream errors are HTTP 200");
        let end = stream.next_frame().await.unwrap();
        assert_eq!(end.end_error().map(|e| e.code).as_deref(), Some(code), "{path}");
    }
    let non_recursive = json!({"path": dir.s("")});
    let mut stream = client.stream(WATCH, &non_recursive, &[]).await;
    stream.next_frame().await.unwrap();
    std::fs::create_dir(dir.path("d")).unwrap();
    std::fs::write(dir.path("d/deep"), b"").unwrap();
    std::fs::write(dir.path("top"), b"").unwrap();
    assert_eq!(next_fs_event(&mut stream).await["name"], "d");
    assert_eq!(next_fs_event(&mut stream).await["name"], "top", "nothing from below without recursive");
}

#[tokio::test]
async fn polling_watchers_queue_until_polled() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("poll");
    let created = client.call(CREATE_WATCHER, &json!({"path": dir.s(""), "includeEntry": true})).await;
    let id = created["watcherId"].as_str().unwrap().to_owned();
    assert!(
        id.len() == 21 && id.starts_with('w') && id[1..].bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    std::fs::write(dir.path("one"), b"1").unwrap();
    let events = poll_until(&client, &id, "EVENT_TYPE_WRITE").await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE"]);
    assert_eq!(events[0]["entry"]["name"], "one");
    std::fs::remove_file(dir.path("one")).unwrap();
    let events = poll_until(&client, &id, "EVENT_TYPE_REMOVE").await;
    assert_eq!(events.len(), 1);
    assert!(events[0].get("entry").is_none(), "no entry for remove");
    let empty = client.call(GET_EVENTS, &json!({"watcherId": id})).await;
    assert!(empty.get("events").is_none(), "polling clears the queue");

    client.call(REMOVE_WATCHER, &json!({"watcherId": id})).await;
    for rpc in [GET_EVENTS, REMOVE_WATCHER] {
        let (status, err) = client.call_err(rpc, &json!({"watcherId": id})).await;
        assert_eq!((status, err.code.as_str()), (StatusCode::NOT_FOUND, "not_found"), "{rpc}");
    }
    let (_, err) = client.call_err(CREATE_WATCHER, &json!({"path": dir.s("missing")})).await;
    assert_eq!(err.code, "not_found");
}

/// Polls a watcher until an event of `kind` arrived; returns all events.
async fn poll_until(client: &Client, id: &str, kind: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !events.iter().any(|e: &Value| e["type"] == kind) {
        assert!(std::time::Instant::now() < deadline, "no {kind} event; got {events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reply = client.call(GET_EVENTS, &json!({"watcherId": id})).await;
        events.extend(reply["events"].as_array().cloned().unwrap_or_default());
    }
    events
}

#[tokio::test]
async fn legacy_python_sdk_gets_the_old_schema() {
    let envd = Envd::start();
    let legacy = envd.client().with_header("user-agent", "connect-python");
    let reply = legacy.unary(STAT, &json!({"path": "/tmp"}), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-e2b-legacy-sdk"), "true");
    assert_eq!(reply.json()["entry"], json!({"name": "tmp", "type": "FILE_TYPE_DIRECTORY", "path": "/tmp"}));
    let current = envd.client().unary(STAT, &json!({"path": "/tmp"}), &[]).await;
    assert_eq!(current.header("x-e2b-legacy-sdk"), "");
}

#[tokio::test]
async fn uploads_look_like_in_place_writes_to_watchers() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("watchupload");
    let mut stream = client.stream(WATCH, &json!({"path": dir.s("")}), &[]).await;
    stream.next_frame().await.unwrap();
    let query = format!("/files?path={}", dir.s("up.txt"));
    let reply = client.send(http::Method::POST, &query, &[("content-type", "application/octet-stream")], "data").await;
    assert_eq!(reply.status, StatusCode::OK);
    for kind in ["EVENT_TYPE_CREATE", "EVENT_TYPE_CHMOD", "EVENT_TYPE_WRITE"] {
        let event = next_fs_event(&mut stream).await;
        assert_eq!((event["name"].as_str(), event["type"].as_str()), (Some("up.txt"), Some(kind)));
    }
    std::fs::write(dir.path("marker"), b"").unwrap();
    let next = next_fs_event(&mut stream).await;
    assert_eq!(next["name"], "marker", "no events of the upload's temporary file");
}
