//! The restored-processes phase of the VM test: the running VM plays a
//! template build (a server started through envd under the build's
//! identity, then a memory snapshot), the restore plays sandbox creation
//! (a new identity, `/init`), then the pause hook, a hard stop and a cold
//! boot. When the cold boot's `/init` is acknowledged the host must reach
//! the server through the guest's address on the first try, and the
//! exec-context fingerprint must still match.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::envd::As;
use super::http;

/// The guest port of the template's server (forwarded from the host).
pub const SERVER_PORT: u16 = 8080;
const SERVER_TAG: &str = "template-server";
const PAGE: &str = "restored-e2e";
const P: &str = "restore";

/// One `GET /` through the host's forward of the server port: the status
/// and body, or why it failed.
fn fetch(host_port: u16) -> Result<(u16, String), String> {
    let response = http::request(host_port, "GET", "/", &[], b"", Duration::from_secs(5)).map_err(|e| e.to_string())?;
    Ok((response.status, response.text()))
}

fn server_port(run: &crate::Run) -> Result<u16, String> {
    run.vm.as_ref().and_then(|vm| vm.host_port(SERVER_PORT)).ok_or_else(|| "the server port is not forwarded".into())
}

/// Runs the phase on the running VM (after /init); leaves it cold-booted.
pub fn phase(run: &mut crate::Run) -> Result<(), String> {
    // The template build: the start command, then wait for it to be ready.
    let envd = run.envd()?;
    envd.sh(As::Default, &format!("echo {PAGE} > index.html"))?;
    let script = format!("exec busybox httpd -f -p {SERVER_PORT} -h \"$PWD\"");
    envd.spawn_detached(As::Default, SERVER_TAG, &script)?;
    let ready_by = Instant::now() + Duration::from_secs(30);
    while fetch(server_port(run)?).map(|(status, _)| status) != Ok(200) {
        if Instant::now() > ready_by {
            return Err("the template's server never answered".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let snapshot = run.spec.work.join("template.snap");
    let took = run.vm.as_mut().ok_or("no VM")?.snapshot(&snapshot)?;
    run.report.time("template snapshot (memory)", crate::secs(took));

    // Sandbox creation from the template: a new identity, then /init.
    let sandbox_id = format!("e2e-sbx-{}", crate::random_hex(4));
    run.metadata["instanceID"] = json!(sandbox_id);
    run.mmds.forget_tokens();
    run.mmds.set(run.metadata.clone());
    run.boot("sandbox", Some(&snapshot))?;
    let _ = std::fs::remove_file(&snapshot);
    run.init(false)?;
    let record = recorded(run)?;
    run.report.check(P, "the template's server is recorded, with its port, at the new identity's /init", {
        let servers: Vec<&Value> = record["processes"].as_array().map(|p| p.iter().collect()).unwrap_or_default();
        match servers.as_slice() {
            [server] if server["tag"] == SERVER_TAG && server["ports"] == json!([SERVER_PORT]) => Ok(()),
            _ => Err(format!("record: {record}")),
        }
    })?;
    let fingerprint = run.fingerprint()?;

    // Filesystem-only pause, hard stop, cold boot.
    run.freeze()?;
    run.vm.as_mut().ok_or("no VM")?.kill_hard();
    run.mmds.forget_tokens();
    run.mmds.set(run.metadata.clone());
    run.boot("restored", None)?;
    run.init(true)?;
    let answered = fetch(server_port(run)?);
    let since_boot = run.vm.as_ref().ok_or("no VM")?.started.elapsed();
    run.report.check(
        P,
        "when /init is acknowledged the restored server answers on the first try",
        match &answered {
            Ok((200, body)) if body.trim() == PAGE => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    run.report.time("cold boot -> restored server answering (after /init)", crate::secs(since_boot));
    let listed = run.envd()?.list()?;
    run.report.check(
        P,
        "Process.List shows the restored server with its tag",
        if listed.iter().any(|(_, tag)| tag.as_deref() == Some(SERVER_TAG)) {
            Ok(())
        } else {
            Err(format!("{listed:?}"))
        },
    )?;
    let after = run.fingerprint()?;
    run.report.check(
        P,
        "exec-context fingerprint unchanged by the cold boot",
        crate::same_fingerprint("fingerprint", &after, &fingerprint),
    )?;
    Ok(())
}

/// The template-process section of envd's state file, read as root.
fn recorded(run: &crate::Run) -> Result<Value, String> {
    let text = run.root("cat /var/lib/envd/exec-context.json")?;
    let state: Value = serde_json::from_str(&text).map_err(|e| format!("state file: {e}"))?;
    Ok(state["template_processes"].clone())
}
