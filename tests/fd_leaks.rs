//! No fd of envd's reaches a user's process: not a root terminal's master
//! created at the same moment, not a fd envd inherited from its parent.
//! Each child lists its own `/proc/self/fd` from inside.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Envd, test_user};
use serde_json::{Value, json};

/// Root terminals and user commands started at once, per round.
const PAIRS_PER_ROUND: usize = 25;
/// Rounds: hundreds of racing starts in all.
const ROUNDS: usize = 24;

/// `ls -l /proc/self/fd/` as the child itself sees it.
fn list_own_fds() -> Value {
    json!({"process": {"cmd": "/bin/ls", "args": ["-l", "/proc/self/fd/"]}, "stdin": false})
}

/// The fds above 2 in an `ls -l /proc/self/fd/` listing, except the one
/// `ls` opened itself to read the directory.
fn foreign_fds(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let (left, target) = line.split_once(" -> ")?;
            let fd: u32 = left.rsplit(' ').next()?.parse().ok()?;
            let own_listing = target.starts_with("/proc/") && target.ends_with("/fd");
            (fd > 2 && !own_listing).then(|| format!("{fd} -> {target}"))
        })
        .collect()
}

#[test]
fn the_listing_parser_sees_a_leak() {
    let listing = "lr-x------ 1 u u 64 Jan 1 00:00 0 -> /dev/null\n\
                   lr-x------ 1 u u 64 Jan 1 00:00 3 -> /proc/42/fd\n\
                   lrwx------ 1 u u 64 Jan 1 00:00 7 -> /dev/ptmx\n";
    assert_eq!(foreign_fds(listing), ["7 -> /dev/ptmx"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_commands_never_hold_a_terminal_master_started_beside_them() {
    let user = test_user();
    let envd = Envd::start();
    let root = envd.client();
    let as_user = envd.client().with_user(&user.name);
    let terminal = json!({
        "process": {"cmd": "/bin/sleep", "args": ["0.2"]},
        "pty": {"size": {"cols": 80, "rows": 24}},
    });
    // What leaked, with how many children held it.
    let mut leaks = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..ROUNDS {
        let mut tasks = Vec::new();
        for _ in 0..PAIRS_PER_ROUND {
            let (root, terminal) = (root.clone(), terminal.clone());
            tasks.push(tokio::spawn(async move {
                root.run(&terminal, &[]).await;
                None
            }));
            let as_user = as_user.clone();
            tasks.push(tokio::spawn(async move {
                let run = as_user.run(&list_own_fds(), &[]).await;
                Some(foreign_fds(&run.stdout_str()))
            }));
        }
        for task in tasks {
            for found in task.await.expect("start task").unwrap_or_default() {
                *leaks.entry(found).or_default() += 1;
            }
        }
    }
    assert!(leaks.is_empty(), "user processes held envd's fds: {leaks:?}");
}

#[tokio::test]
async fn fds_envd_inherited_stay_with_envd() {
    let user = test_user();
    // A parent that leaves fds 7 and 8 open (not close-on-exec) for envd.
    let envd =
        Envd::options().wrapper(["/bin/bash", "-c", "exec 7</etc/passwd 8<>/dev/null; exec \"$0\" \"$@\""]).start();
    let inherited = std::fs::read_link(format!("/proc/{}/fd/7", envd.pid()));
    assert!(inherited.is_ok(), "the wrapper must hand envd fd 7");
    for client in [envd.client(), envd.client().with_user(&user.name)] {
        let run = client.run(&list_own_fds(), &[]).await;
        assert_eq!(foreign_fds(&run.stdout_str()), Vec::<String>::new(), "listing:\n{}", run.stdout_str());
    }
    let terminal = json!({
        "process": {"cmd": "/bin/ls", "args": ["-l", "/proc/self/fd/"]},
        "pty": {"size": {"cols": 200, "rows": 24}},
    });
    let run = envd.client().with_user(&user.name).run(&terminal, &[]).await;
    let listing = String::from_utf8_lossy(&run.pty).replace('\r', "");
    assert_eq!(foreign_fds(&listing), Vec::<String>::new(), "listing:\n{listing}");
}
