#![allow(clippy::unwrap_used)]
//! The metadata route heals itself: a template's nat rule sends the
//! metadata service's traffic elsewhere, envd's read fails, envd pins the
//! route ahead of the rule and reads again. All of it in a network
//! namespace this test makes for its own thread (and what that thread
//! starts), never in the machine's own tables; the only test of this
//! binary, since the namespace stays with its thread.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mmds::Mmds;
use common::*;
use serde_json::json;

const HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];
/// What a transparent proxy in a template does to the metadata traffic:
/// here it goes to a port nothing listens on.
const REDIRECT: [&str; 10] =
    ["-d", "169.254.169.254", "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", "127.0.0.1:9"];

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{program} {args:?} failed: {said}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn nat(args: &[&str]) -> String {
    run("iptables", &[&["-w", "5", "-t", "nat"], args].concat())
}

/// The rules of a nat hook, in order.
fn rules(hook: &str) -> Vec<String> {
    let prefix = format!("-A {hook} ");
    nat(&["-S", hook]).lines().filter(|l| l.starts_with(&prefix)).map(str::to_owned).collect()
}

async fn wait_for_identity(envd: &Envd, id: &str) {
    let client = envd.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get("/envs").await.json().get("E2B_SANDBOX_ID") != Some(&json!(id)) {
        assert!(Instant::now() < deadline, "the identity never arrived; envd said:\n{}", envd.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_redirected_metadata_route_is_pinned_ahead_of_the_redirect_and_read() {
    assert!(nix::unistd::getuid().is_root(), "this test makes a network namespace: run it as root");
    assert!(
        Command::new("iptables").arg("--version").output().is_ok(),
        "iptables is missing (scripts/test.sh installs it)"
    );
    // SAFETY: unshare(2) of this thread's network namespace; no memory is involved.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(unshared, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    run("ip", &["link", "set", "lo", "up"]);
    run("ip", &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let mmds = Mmds::serve(TcpListener::bind("169.254.169.254:80").unwrap(), json!({"instanceID": "sbx-healed"}));
    for hook in HOOKS {
        nat(&[&["-A", hook], &REDIRECT[..]].concat());
    }
    assert!(TcpStream::connect("169.254.169.254:80").is_err(), "the redirect holds the service's traffic");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for round in 1..=2 {
        let run_dir = Scratch::new("mmds-route-run");
        let envd = Envd::options().args(["--mmds-address", "169.254.169.254:80", "--run-dir", &run_dir.s("")]).start();
        runtime.block_on(wait_for_identity(&envd, "sbx-healed"));
        assert!(mmds.reads.load(std::sync::atomic::Ordering::SeqCst) >= round, "read through the pinned route");
        let log = envd.stderr();
        assert!(
            log.contains("its route is pinned ahead of every nat rule"),
            "round {round}: what was repaired is said: {log}"
        );
        for hook in HOOKS {
            let rules = rules(hook);
            assert_eq!(rules[0], format!("-A {hook} -j ENVD-MMDS"), "round {round}: the jump comes first: {rules:?}");
            let jumps = rules.iter().filter(|r| r.contains("ENVD-MMDS")).count();
            assert_eq!(jumps, 1, "round {round}: one jump however often it healed: {rules:?}");
            assert!(rules.iter().any(|r| r.contains("DNAT")), "the template's own rule stays: {rules:?}");
        }
        // The template puts its redirect first again: the next envd heals again.
        for hook in HOOKS {
            nat(&[&["-I", hook, "1"], &REDIRECT[..]].concat());
        }
    }
}
