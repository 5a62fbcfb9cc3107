//! The live upgrade as the orchestrator drives it: `POST /upgrade` (empty
//! body: envd re-execs its own binary), a dropped connection as success,
//! then `/init`, whose `X-Envd-Handover` says what the new image took over.

use std::time::Duration;

use serde_json::Value;

use super::envd::Envd;

/// Upgrades envd in place; returns the handover report of the next `/init`.
pub fn upgrade_in_place(envd: &Envd, init_body: &Value) -> Result<Value, String> {
    match envd.post("/upgrade", Duration::from_secs(30)) {
        Ok(response) => return Err(format!("/upgrade refused: {} {}", response.status, response.text())),
        Err(dropped) => eprintln!("[vm-e2e] /upgrade: connection dropped as expected ({dropped})"),
    }
    envd.wait_ready(Duration::from_secs(30), || Ok(()))?;
    let init = envd.init(init_body).map_err(|e| format!("/init after the upgrade: {e}"))?;
    if init.status != 204 {
        return Err(format!("/init after the upgrade answered {}: {}", init.status, init.text()));
    }
    let header = init.header("x-envd-handover").ok_or("no X-Envd-Handover on /init")?;
    let report: Value = serde_json::from_str(header).map_err(|e| format!("X-Envd-Handover {header:?}: {e}"))?;
    if report["failed"] != false {
        return Err(format!("the handover failed: {report}"));
    }
    Ok(report)
}
