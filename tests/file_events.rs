//! What watchers see of envd's own file operations, against the real
//! binary and real inotify: the reference's sequences for uploads (new
//! file, existing file, file owned by another user, with metadata, empty),
//! MakeDir, Move and Remove, identical for WatchDir streams and polling
//! watchers, recursive or not. And uploads to targets that are more than
//! a name, written in place: hard links, a bind-mounted file, a FIFO with
//! a reader process, kernel files under `/proc` and `/sys`.
//!
//! Each operation is followed by a marker file created directly in the
//! watched directory: inotify keeps order, so the events before the
//! marker's are exactly the operation's, with no waiting on time.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fs_rpc::{
    CREATE_WATCHER, GET_WATCHER_EVENTS as GET_EVENTS, MAKE_DIR as MKDIR, MOVE, REMOVE, REMOVE_WATCHER,
    WATCH_DIR as WATCH,
};
use common::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

const BOUNDARY: &str = "envd-events-boundary";

const CREATE: &str = "EVENT_TYPE_CREATE";
const WRITE: &str = "EVENT_TYPE_WRITE";
const CHMOD: &str = "EVENT_TYPE_CHMOD";
const REMOVE_EV: &str = "EVENT_TYPE_REMOVE";
const RENAME: &str = "EVENT_TYPE_RENAME";

/// One watcher of the watched directory, in one of the four ways.
enum Watch {
    Stream { recursive: bool, stream: ConnectStream },
    Polling { recursive: bool, id: String },
}

impl Watch {
    async fn all(client: &Client, dir: &str) -> Vec<Watch> {
        let mut out = Vec::new();
        for recursive in [false, true] {
            let request = json!({"path": dir, "recursive": recursive});
            let mut stream = client.stream(WATCH, &request, &[]).await;
            assert_eq!(stream.next_frame().await.unwrap().json(), json!({"start": {}}));
            out.push(Watch::Stream { recursive, stream });
            let created = client.call(CREATE_WATCHER, &request).await;
            out.push(Watch::Polling { recursive, id: created["watcherId"].as_str().unwrap().to_owned() });
        }
        out
    }

    fn recursive(&self) -> bool {
        match self {
            Watch::Stream { recursive, .. } | Watch::Polling { recursive, .. } => *recursive,
        }
    }

    fn label(&self) -> String {
        let kind = if matches!(self, Watch::Stream { .. }) { "WatchDir" } else { "polling" };
        format!("{kind}, recursive: {}", self.recursive())
    }

    /// The events up to the creation of `marker`, as (name, type).
    async fn until(&mut self, client: &Client, marker: &str) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = Vec::new();
        loop {
            let batch = match self {
                Watch::Stream { stream, .. } => {
                    let next = tokio::time::timeout(Duration::from_secs(10), next_fs_event(stream)).await;
                    vec![next.unwrap_or_else(|_| panic!("no marker {marker}; got {events:?}"))]
                }
                Watch::Polling { id, .. } => {
                    let reply = client.call(GET_EVENTS, &json!({"watcherId": id})).await;
                    reply["events"].as_array().cloned().unwrap_or_default()
                }
            };
            for event in batch {
                let pair = (event["name"].as_str().unwrap().to_owned(), event["type"].as_str().unwrap().to_owned());
                if pair == (marker.to_owned(), CREATE.to_owned()) {
                    return events;
                }
                events.push(pair);
            }
            assert!(Instant::now() < deadline, "{}: no marker {marker}; got {events:?}", self.label());
            if matches!(self, Watch::Polling { .. }) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn events(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(name, kind)| ((*name).to_owned(), (*kind).to_owned())).collect()
}

/// Uploads `data` to `path` for `user` as the SDK's `files.write` does
/// (multipart, one part, `path` query), plus `headers`.
async fn upload(client: &Client, path: &str, user: &str, data: &[u8], headers: &[(&str, &str)]) -> Value {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let mut all = vec![("content-type", content_type.as_str())];
    all.extend_from_slice(headers);
    let reply = client.send(Method::POST, &format!("/files?path={path}&username={user}"), &all, body).await;
    assert_eq!(reply.status, StatusCode::OK, "upload to {path}: {}", reply.text());
    reply.json()
}

/// Runs `step`, then checks every watcher saw exactly `flat` (non-recursive)
/// and `deep` (recursive) before the marker.
struct Scenario<'a> {
    client: &'a Client,
    dir: &'a Scratch,
    watches: &'a mut Vec<Watch>,
    count: usize,
}

impl Scenario<'_> {
    async fn expect(&mut self, what: &str, flat: &[(&str, &str)], deep: &[(&str, &str)]) {
        self.count += 1;
        let marker = format!("zz-marker-{}", self.count);
        std::fs::write(self.dir.path(&marker), b"").unwrap();
        for watch in self.watches.iter_mut() {
            let want = if watch.recursive() { events(deep) } else { events(flat) };
            let got = watch.until(self.client, &marker).await;
            assert_eq!(got, want, "{what} ({})", watch.label());
        }
    }
}

#[tokio::test]
async fn uploads_mkdir_move_and_remove_show_the_reference_sequences() {
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("events");
    std::fs::create_dir(dir.path("sub")).unwrap();
    std::fs::create_dir_all(dir.path("tree/inner")).unwrap();
    std::fs::write(dir.path("tree/leaf"), b"x").unwrap();
    for name in ["mine.txt", "roots.txt", "a", "gone"] {
        std::fs::write(dir.path(name), b"old content").unwrap();
    }
    std::os::unix::fs::chown(dir.path("mine.txt"), Some(user.uid), Some(user.gid)).unwrap();
    let mut watches = Watch::all(&client, &dir.s("")).await;
    let mut scenario = Scenario { client: &client, dir: &dir, watches: &mut watches, count: 0 };
    let name = user.name.as_str();

    // The SDK suite's count: a new file is created, chowned, written.
    upload(&client, &dir.s("new.txt"), name, b"hello", &[]).await;
    let new_file = [("new.txt", CREATE), ("new.txt", CHMOD), ("new.txt", WRITE)];
    scenario.expect("upload of a new file", &new_file, &new_file).await;

    // Many chunks are one write, as an unread repeat merges in the kernel.
    upload(&client, &dir.s("big.bin"), name, &vec![7u8; 4 << 20], &[]).await;
    let big = [("big.bin", CREATE), ("big.bin", CHMOD), ("big.bin", WRITE)];
    scenario.expect("upload of a large new file", &big, &big).await;

    upload(&client, &dir.s("empty"), name, b"", &[]).await;
    let empty = [("empty", CREATE), ("empty", CHMOD)];
    scenario.expect("upload of an empty new file", &empty, &empty).await;

    upload(&client, &dir.s("meta.txt"), name, b"m", &[("x-metadata-owner", "alice")]).await;
    let meta = [("meta.txt", CREATE), ("meta.txt", CHMOD), ("meta.txt", WRITE), ("meta.txt", CHMOD)];
    scenario.expect("upload with metadata", &meta, &meta).await;

    // An existing file is chowned, then truncated and written: no create.
    upload(&client, &dir.s("mine.txt"), name, b"new", &[]).await;
    let mine = [("mine.txt", CHMOD), ("mine.txt", WRITE)];
    scenario.expect("upload over the user's file", &mine, &mine).await;

    upload(&client, &dir.s("roots.txt"), name, b"new", &[]).await;
    let roots = [("roots.txt", CHMOD), ("roots.txt", WRITE)];
    scenario.expect("upload over root's file", &roots, &roots).await;
    let meta_of = std::fs::metadata(dir.path("roots.txt")).unwrap();
    assert_eq!((meta_of.uid(), meta_of.gid()), (user.uid, user.gid), "the replaced file is the user's");

    // Rewriting metadata away is a chmod after the write, as the reference's removexattr.
    upload(&client, &dir.s("meta.txt"), name, b"m2", &[]).await;
    let rewritten = [("meta.txt", CHMOD), ("meta.txt", WRITE), ("meta.txt", CHMOD)];
    scenario.expect("upload dropping metadata", &rewritten, &rewritten).await;

    upload(&client, &dir.s("sub/deep.txt"), name, b"d", &[]).await;
    let deep = [("sub/deep.txt", CREATE), ("sub/deep.txt", CHMOD), ("sub/deep.txt", WRITE)];
    scenario.expect("upload into a subdirectory", &[], &deep).await;

    client.call(MKDIR, &json!({"path": dir.s("made")})).await;
    let made = [("made", CREATE), ("made", CHMOD)];
    scenario.expect("MakeDir", &made, &made).await;

    client.call(MOVE, &json!({"source": dir.s("a"), "destination": dir.s("b")})).await;
    let moved = [("a", RENAME), ("b", CREATE)];
    scenario.expect("Move", &moved, &moved).await;

    client.call(REMOVE, &json!({"path": dir.s("gone")})).await;
    scenario.expect("Remove of a file", &[("gone", REMOVE_EV)], &[("gone", REMOVE_EV)]).await;

    client.call(REMOVE, &json!({"path": dir.s("tree")})).await;
    let mut deep_removal = vec![("tree/inner", REMOVE_EV), ("tree/leaf", REMOVE_EV)];
    // Children go in directory order, which the filesystem decides.
    let got: Vec<_> = {
        let marker = "zz-marker-tree";
        std::fs::write(dir.path(marker), b"").unwrap();
        let mut all = Vec::new();
        for watch in scenario.watches.iter_mut() {
            all.push((watch.recursive(), watch.label(), watch.until(&client, marker).await));
        }
        all
    };
    for (recursive, label, mut seen) in got {
        if recursive {
            let last = seen.pop();
            seen.sort();
            deep_removal.sort();
            assert_eq!(seen, events(&deep_removal), "Remove of a tree ({label})");
            assert_eq!(last, Some(("tree".to_owned(), REMOVE_EV.to_owned())), "the directory goes last ({label})");
        } else {
            assert_eq!(seen, events(&[("tree", REMOVE_EV)]), "Remove of a tree ({label})");
        }
    }
    assert!(dir.names("").iter().all(|n| !n.contains("envd-")), "no temporaries left: {:?}", dir.names(""));
}

/// The SDK suites' `watch_dir`, write, `get_new_events` with no pause
/// between: one poll right after the upload's answer holds all three events
/// of the new file and both of the rewrite, every time. Without the drain
/// at the start of a poll, a busy machine answers before envd has read the
/// last inotify records, and a poll misses some.
#[tokio::test]
async fn a_poll_right_after_an_upload_holds_every_event_of_it() {
    const ROUNDS: usize = 500;
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("poll-after-upload");
    for round in 0..ROUNDS {
        let watched = dir.s(&format!("d{round}"));
        std::fs::create_dir(&watched).unwrap();
        let created = client.call(CREATE_WATCHER, &json!({"path": watched})).await;
        let id = created["watcherId"].as_str().unwrap().to_owned();
        let poll = || async {
            let reply = client.call(GET_EVENTS, &json!({"watcherId": id})).await;
            let list = reply["events"].as_array().cloned().unwrap_or_default();
            list.iter()
                .map(|e| (e["name"].as_str().unwrap().to_owned(), e["type"].as_str().unwrap().to_owned()))
                .collect::<Vec<_>>()
        };
        upload(&client, &format!("{watched}/f.txt"), &user.name, b"first", &[]).await;
        let first = poll().await;
        assert_eq!(first, events(&[("f.txt", CREATE), ("f.txt", CHMOD), ("f.txt", WRITE)]), "round {round}: new file");
        upload(&client, &format!("{watched}/f.txt"), &user.name, b"second", &[]).await;
        let second = poll().await;
        assert_eq!(second, events(&[("f.txt", CHMOD), ("f.txt", WRITE)]), "round {round}: rewrite");
        client.call(REMOVE_WATCHER, &json!({"watcherId": id})).await;
    }
}

#[tokio::test]
async fn an_upload_to_a_hard_linked_file_keeps_the_links_shared() {
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("hardlink");
    std::fs::write(dir.path("a"), b"old content").unwrap();
    std::fs::hard_link(dir.path("a"), dir.path("b")).unwrap();
    let inode = std::fs::metadata(dir.path("a")).unwrap().ino();

    upload(&client, &dir.s("a"), &user.name, b"new", &[("x-metadata-k", "v")]).await;
    assert_eq!(std::fs::read(dir.path("b")).unwrap(), b"new", "the other link sees the upload");
    let meta = std::fs::metadata(dir.path("a")).unwrap();
    assert_eq!((meta.ino(), meta.nlink()), (inode, 2), "still the same file");
    assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid), "given to the user");
    assert_eq!(dir.names(""), ["a", "b"], "no temporary");
}

/// Unmounts a bind mount when dropped, whatever the test did.
struct BindMount(std::path::PathBuf);

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn an_upload_to_a_bind_mounted_file_writes_through_the_mount() {
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("bindfile");
    std::fs::write(dir.path("source"), b"source content").unwrap();
    std::fs::write(dir.path("mountpoint"), b"hidden").unwrap();
    let status = Command::new("mount").arg("--bind").arg(dir.path("source")).arg(dir.path("mountpoint")).status();
    assert!(status.is_ok_and(|s| s.success()), "bind mount");
    let mount = BindMount(dir.path("mountpoint"));

    upload(&client, &dir.s("mountpoint"), &user.name, b"through the mount", &[]).await;
    assert_eq!(std::fs::read(dir.path("source")).unwrap(), b"through the mount");
    assert_eq!(std::fs::read(dir.path("mountpoint")).unwrap(), b"through the mount");
    drop(mount);
    assert_eq!(std::fs::read(dir.path("mountpoint")).unwrap(), b"hidden", "the file under the mount is untouched");
    assert_eq!(dir.names(""), ["mountpoint", "source"], "no temporary");
}

#[tokio::test]
async fn an_upload_to_a_fifo_reaches_its_reader() {
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("fifo");
    let fifo = dir.path("pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()));
    // The reader opens without waiting, says so, then reads until the
    // writer closes (a FIFO never written to does not report a hang-up).
    let script = "import os, select, sys\n\
        fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n\
        print('ready', flush=True)\n\
        data = b''\n\
        while True:\n\
        \x20   select.select([fd], [], [])\n\
        \x20   chunk = os.read(fd, 65536)\n\
        \x20   if not chunk: break\n\
        \x20   data += chunk\n\
        sys.stdout.buffer.write(data)\n";
    let mut reader = Command::new("python3")
        .args(["-c", script])
        .arg(&fifo)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the reader");
    let mut out = reader.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    out.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");

    upload(&client, &fifo.display().to_string(), &user.name, b"through the pipe", &[]).await;
    let mut received = Vec::new();
    out.read_to_end(&mut received).unwrap();
    assert!(reader.wait().unwrap().success());
    assert_eq!(received, b"through the pipe");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");
    assert_eq!(dir.names(""), ["pipe"], "no temporary");
}

/// A child to point kernel files at; killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn uploads_to_proc_and_sys_files_are_kernel_writes() {
    let envd = Envd::start();
    let client = envd.client();
    let child = Child(Command::new("sleep").arg("60").spawn().unwrap());
    let pid = child.0.id();

    let oom = format!("/proc/{pid}/oom_score_adj");
    upload(&client, &oom, "root", b"321", &[]).await;
    assert_eq!(std::fs::read_to_string(&oom).unwrap().trim(), "321");

    // A cgroup of the test's own under the unified hierarchy, when there is one.
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|root| std::path::Path::new(root).join("cgroup.procs").exists() && is_cgroup2(root));
    let Some(root) = root else {
        eprintln!("no cgroup2 hierarchy: the /sys case is skipped");
        return;
    };
    let group = std::path::Path::new(root).join(format!("envd-test-events-{}", std::process::id()));
    std::fs::create_dir(&group).unwrap();
    let procs = group.join("cgroup.procs");
    upload(&client, &procs.display().to_string(), "root", pid.to_string().as_bytes(), &[]).await;
    let moved = std::fs::read_to_string(&procs).unwrap();
    drop(child);
    let _ = std::fs::remove_dir(&group);
    assert_eq!(moved.trim(), pid.to_string(), "the child moved into the cgroup");
}

fn is_cgroup2(path: &str) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

#[tokio::test]
async fn in_place_targets_keep_the_symlink_rule() {
    let envd = Envd::start();
    let client = envd.client();
    let user = test_user();
    let dir = Scratch::new("inplacelink");
    std::fs::write(dir.path("roots"), b"root's content").unwrap();
    std::fs::hard_link(dir.path("roots"), dir.path("roots-too")).unwrap();
    let child = Child(Command::new("sleep").arg("60").spawn().unwrap());
    let oom = format!("/proc/{}/oom_score_adj", child.0.id());
    let before = std::fs::read_to_string(&oom).unwrap();
    for (link, target) in [("to-linked", dir.s("roots")), ("to-proc", oom.clone())] {
        std::os::unix::fs::symlink(&target, dir.path(link)).unwrap();
        std::os::unix::fs::lchown(dir.path(link), Some(user.uid), Some(user.gid)).unwrap();
        let query = format!("/files?path={}&username={}", dir.s(link), user.name);
        let headers = [("content-type", "application/octet-stream")];
        let reply = client.send(Method::POST, &query, &headers, "planted").await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{link}: {}", reply.text());
    }
    assert_eq!(std::fs::read(dir.path("roots-too")).unwrap(), b"root's content");
    assert_eq!(std::fs::read_to_string(&oom).unwrap(), before);
}
