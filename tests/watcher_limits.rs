//! Watchers against the kernel's inotify limits, with the real binary:
//! envd holds at most half of `fs.inotify.max_user_instances` (per uid, and
//! envd is root), answers `resource_exhausted` past that, and leaves the
//! rest to the other root processes of the machine.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;

const WATCH: &str = "/filesystem.Filesystem/WatchDir";
const CREATE_WATCHER: &str = "/filesystem.Filesystem/CreateWatcher";
const REMOVE_WATCHER: &str = "/filesystem.Filesystem/RemoveWatcher";

/// The kernel's per-uid limit, as envd reads it.
fn max_user_instances() -> usize {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances").unwrap().trim().parse().unwrap()
}

/// Inotify descriptors a process holds.
fn inotify_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:inotify"))
        .count()
}

/// Whether this (root) process can still create an inotify instance.
fn can_create_inotify_instance() -> bool {
    // SAFETY: plain syscall; the descriptor is closed right below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a descriptor this function just opened and owns.
    unsafe { libc::close(fd) };
    true
}

#[tokio::test]
async fn watchers_past_the_cap_are_resource_exhausted_and_leave_instances_to_others() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = Scratch::new("watcher-limits");
    let cap = max_user_instances() / 2;

    let mut created = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let reply = client.unary(CREATE_WATCHER, &json!({"path": dir.s("")}), &[]).await;
        if reply.status == StatusCode::OK {
            created.push(reply.json()["watcherId"].as_str().unwrap().to_owned());
            continue;
        }
        let error = reply.json();
        assert_eq!(error["code"], "resource_exhausted", "{} {error}", reply.status);
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("max_user_instances"), "the message names the limit: {message}");
        refused += 1;
    }
    // Other root processes on this machine may hold instances too: envd may
    // stop earlier than its cap, never later.
    assert!(!created.is_empty() && created.len() <= cap, "{} watchers for a cap of {cap}", created.len());
    assert_eq!(created.len() + refused, 300);
    assert!(inotify_fds(envd.pid()) <= cap, "envd holds {} inotify instances", inotify_fds(envd.pid()));
    assert!(can_create_inotify_instance(), "another root process can still use inotify");

    // A WatchDir stream takes from the same budget.
    let mut stream = client.stream(WATCH, &json!({"path": dir.s("")}), &[]).await;
    let end = stream.next_frame().await.expect("an end-of-stream frame");
    assert_eq!(end.end_error().map(|e| e.code).as_deref(), Some("resource_exhausted"));

    // Removing a watcher frees its slot.
    let freed = created.pop().unwrap();
    client.call(REMOVE_WATCHER, &json!({"watcherId": freed})).await;
    let again = client.call(CREATE_WATCHER, &json!({"path": dir.s("")})).await;
    created.push(again["watcherId"].as_str().unwrap().to_owned());

    for id in created {
        client.call(REMOVE_WATCHER, &json!({"watcherId": id})).await;
    }
    assert_eq!(inotify_fds(envd.pid()), 0, "every removed watcher closed its instance");
    let reply = client.unary(CREATE_WATCHER, &json!({"path": dir.s("")}), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
