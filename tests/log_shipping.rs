//! Log shipping to the host's collector (the metadata's `address`), with a
//! real HTTP collector on loopback that is up, down, slow or failing.
//! "Never blocking" is shown without timing: requests complete while the
//! collector is known to be holding, or refusing, envd's lines.

// A test stops at the first thing that is not as expected: unwrap is how it says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::collector::{Answer, Collector};
use common::mmds::Mmds;
use common::*;
use serde_json::{Value, json};

const SANDBOX: &str = "sbx-ship-1";
const TEMPLATE: &str = "tpl-ship-1";

/// envd reading `metadata` from a metadata service, with debug logs.
fn envd_with_collector_url(url: &str) -> (Envd, Mmds) {
    let mmds = Mmds::start(json!({ "instanceID": SANDBOX, "envID": TEMPLATE, "address": url }));
    let envd = Envd::options().args(["--verbose", "--mmds-address", &mmds.address()]).start();
    (envd, mmds)
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < PATIENCE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn messages(lines: &[Value]) -> Vec<String> {
    lines.iter().map(|l| l["message"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Pids of the "process started" lines shipped so far.
fn shipped_pids(collector: &Collector) -> Vec<u64> {
    collector.lines().iter().filter(|l| l["message"] == "process started").filter_map(|l| l["pid"].as_u64()).collect()
}

/// Runs `count` short processes; returns their pids and how long it took.
async fn run_processes(envd: &Envd, count: usize) -> (Vec<u64>, Duration) {
    let client = envd.client();
    let started = Instant::now();
    let mut pids = Vec::new();
    for _ in 0..count {
        pids.push(u64::from(client.run(&bash("true"), &[]).await.pid()));
    }
    (pids, started.elapsed())
}

fn loss_report(collector: &Collector) -> Option<Value> {
    collector.lines().into_iter().find(|l| l["message"] == "log lines were not shipped")
}

#[tokio::test]
async fn lines_arrive_as_json_tagged_with_the_sandbox_and_template_ids() {
    let collector = Collector::start(Answer::Ok);
    let (envd, _mmds) = envd_with_collector_url(&collector.url());
    wait_for("the start-up lines arrive", || messages(&collector.lines()).iter().any(|m| m == "envd listening"));
    let (pids, _) = run_processes(&envd, 3).await;
    wait_for("the process lines arrive", || pids.iter().all(|pid| shipped_pids(&collector).contains(pid)));

    let received = collector.received();
    assert!(received.iter().all(|r| r.path == "/logs" && r.content_type == "application/json"));
    for line in collector.lines() {
        assert_eq!((line["instanceID"].as_str(), line["envID"].as_str()), (Some(SANDBOX), Some(TEMPLATE)), "{line}");
        let timestamp = line["timestamp"].as_str().expect("timestamp");
        assert!(timestamp.len() == 30 && timestamp.ends_with('Z'), "{timestamp}");
        assert!(["info", "debug", "warn", "error"].contains(&line["level"].as_str().unwrap_or_default()), "{line}");
        assert!(line["logger"].as_str().is_some_and(|l| l.starts_with("envd")), "{line}");
    }
    let listening = collector.lines().into_iter().find(|l| l["message"] == "envd listening").unwrap();
    assert_eq!(listening["addr"], format!("127.0.0.1:{}", envd.port()));
}

#[tokio::test]
async fn a_collector_that_is_down_holds_nothing_up_and_the_losses_are_reported_once_it_is_back() {
    let port = Mmds::reserve_port();
    let (envd, _mmds) = envd_with_collector_url(&format!("http://127.0.0.1:{port}/logs"));
    // Nothing listens: every line envd ships is refused meanwhile.
    let (pids, took) = run_processes(&envd, 30).await;
    eprintln!("30 processes with the collector down: {took:?}");
    assert!(health_ok(envd.port()));
    wait_for("envd has found the collector down", || envd.stderr().contains("shipping logs to the collector:"));

    let collector = Collector::start_on(port, Answer::Ok);
    wait_for("the loss report arrives", || loss_report(&collector).is_some());
    let report = loss_report(&collector).unwrap();
    let unreachable = report["collector_unreachable"].as_u64().unwrap_or(0);
    assert!(unreachable > 0, "{report}");
    assert_eq!(report["not_shipped"], report["collector_unreachable"], "{report}");
    // Lines still buffered when the collector came back are shipped; the
    // rest are counted.
    let shipped = || pids.iter().filter(|pid| shipped_pids(&collector).contains(pid)).count() as u64;
    wait_for("every line is shipped or counted", || shipped() + unreachable >= pids.len() as u64);
    assert_eq!((report["instanceID"].as_str(), report["level"].as_str()), (Some(SANDBOX), Some("warn")));
    let (later, _) = run_processes(&envd, 2).await;
    wait_for("new lines arrive", || later.iter().all(|pid| shipped_pids(&collector).contains(pid)));
    wait_for("the losses are told on stderr", || envd.stderr().contains("log lines were not shipped"));
}

#[tokio::test]
async fn a_slow_collector_holds_nothing_up_and_loses_nothing() {
    let collector = Collector::start(Answer::After(Duration::from_secs(3)));
    let (envd, _mmds) = envd_with_collector_url(&collector.url());
    wait_for("the collector is being sent to", || collector.requests() > 0);
    // Each answer takes 3 s; 20 processes finish while at most a few lines
    // have been answered.
    let answered_before = collector.received().len();
    let (pids, took) = run_processes(&envd, 20).await;
    let answered_after = collector.received().len();
    eprintln!(
        "20 processes while the collector answers every 3 s: {took:?} ({answered_before}..{answered_after} lines answered meanwhile)"
    );
    assert!(
        answered_after < pids.len(),
        "the collector answered {answered_after} lines: not slow enough to prove anything"
    );

    collector.answer(Answer::Ok);
    wait_for("every line logged meanwhile arrives", || pids.iter().all(|pid| shipped_pids(&collector).contains(pid)));
    assert!(loss_report(&collector).is_none(), "lines were lost: {:?}", loss_report(&collector));
}

#[tokio::test]
async fn lines_a_failing_collector_refused_are_counted_and_reported() {
    let collector = Collector::start(Answer::Error);
    let (envd, _mmds) = envd_with_collector_url(&collector.url());
    let (pids, _) = run_processes(&envd, 5).await;
    let refused_pid = |pid: &u64| collector.refused().iter().any(|r| r.body.contains(&format!("\"pid\":{pid},")));
    wait_for("the collector has refused every process line", || pids.iter().all(refused_pid));
    collector.answer(Answer::Ok);
    let (later, _) = run_processes(&envd, 1).await;
    wait_for("the loss report arrives", || loss_report(&collector).is_some());
    let report = loss_report(&collector).unwrap();
    assert!(report["collector_rejected"].as_u64().unwrap_or(0) >= pids.len() as u64, "{report}");
    wait_for("new lines arrive", || later.iter().all(|pid| shipped_pids(&collector).contains(pid)));
    assert!(pids.iter().all(|pid| !shipped_pids(&collector).contains(pid)), "refused lines were kept");
}

#[tokio::test]
async fn no_secret_is_ever_shipped() {
    let collector = Collector::start(Answer::Ok);
    let (envd, _mmds) = envd_with_collector_url(&collector.url());
    let token = "ship-secret-token-5f1c9a";
    let env_value = "ship-secret-env-value-77ab";
    let init = json!({ "accessToken": token, "envVars": { "SHIP_SECRET": env_value } });
    let reply = envd
        .client()
        .send(http::Method::POST, "/init", &[("content-type", "application/json")], init.to_string())
        .await;
    assert_eq!(reply.status, http::StatusCode::NO_CONTENT, "{}", reply.text());
    let client = envd.client().with_header("x-access-token", token);
    let run = client.run(&bash("echo $SHIP_SECRET"), &[]).await;
    assert_eq!(run.stdout_str(), format!("{env_value}\n"));
    let refused =
        envd.client().with_header("x-access-token", "wrong-ship-token").send(http::Method::GET, "/envs", &[], "").await;
    assert_eq!(refused.status, http::StatusCode::UNAUTHORIZED);
    let pid = u64::from(run.pid());
    wait_for("the process line arrives", || shipped_pids(&collector).contains(&pid));

    let shipped: Vec<String> = collector.received().into_iter().map(|r| r.body).collect();
    assert!(shipped.len() > 3, "too few lines to prove anything: {shipped:?}");
    assert!(shipped.iter().any(|l| l.contains("\"debug\"")), "no debug line shipped");
    for (what, secret) in [("access token", token), ("env value", env_value), ("wrong token", "wrong-ship-token")] {
        let hits: Vec<&String> = shipped.iter().filter(|l| l.contains(secret)).collect();
        assert!(hits.is_empty(), "{what} shipped: {hits:?}");
    }
}

#[tokio::test]
async fn lines_not_yet_shipped_when_envd_upgrades_itself_are_shipped_by_the_new_image() {
    // One line every 20 ms: a backlog builds up that is still there at the exec.
    let collector = Collector::start(Answer::After(Duration::from_millis(20)));
    let mmds = Mmds::start(json!({ "instanceID": SANDBOX, "envID": TEMPLATE, "address": collector.url() }));
    let upgrade = Scratch::new("ship-upgrade");
    let envd = Envd::options()
        .args(["--verbose", "--mmds-address", &mmds.address(), "--upgrade-path", &upgrade.s("envd.next")])
        .start();
    wait_for("the start-up lines arrive", || messages(&collector.lines()).iter().any(|m| m == "envd listening"));
    let init = envd.client().post_json("/init", &json!({})).await;
    assert_eq!(init.status, 204, "{}", init.text());
    let (pids, _) = run_processes(&envd, 40).await;
    let upgraded = envd.client().try_send(http::Method::POST, "/upgrade", &[], full("")).await;
    assert!(upgraded.is_err(), "envd answered instead of upgrading: {:?}", upgraded.map(|r| r.text()));
    let backlog = pids.iter().filter(|pid| !shipped_pids(&collector).contains(pid)).count();

    wait_for("the new image ships what the old one had not", || {
        let shipped = messages(&collector.lines());
        shipped.iter().any(|m| m == "took over the running workload after an upgrade")
            && shipped.iter().any(|m| m == "handing over and executing the new image")
            && pids.iter().all(|pid| shipped_pids(&collector).contains(pid))
    });
    assert!(backlog > 0, "the test needs lines still unshipped at the exec");
    assert!(loss_report(&collector).is_none(), "nothing was lost: {:?}", loss_report(&collector));
}
