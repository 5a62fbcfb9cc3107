//! Phase 5: a memory pause leaves a crash-consistent disk. The platform
//! may cold-boot a memory snapshot's disk alone; that disk was never
//! frozen, so what the guest had only in its page cache at the pause would
//! be gone. Files are written without a sync, `/freeze` answers (it
//! flushes every writable disk), qemu is killed at once (the disk as the
//! snapshot has it, the guest's memory lost), and the disk boots alone:
//! every file written before the answer is there.

use super::envd::As;

const P: &str = "pause-flush";

pub fn phase(run: &mut crate::Run) -> Result<(), String> {
    let script = "mkdir -p unsynced && for i in $(seq 1 20); do head -c 262144 /dev/urandom > unsynced/f$i; done \
                  && sha256sum unsynced/*";
    let written = run.envd()?.sh(As::Default, script)?.stdout;
    let flushed = run.freeze_workload();
    run.report.check(P, "/freeze reports every writable disk flushed", flushed)?;
    run.vm.as_mut().ok_or("no VM")?.kill_hard();
    run.mmds.forget_tokens();
    run.mmds.set(run.metadata.clone());
    let ready = run.boot("pause-flush", None)?;
    run.report.time("cold boot of the paused disk -> envd ready", crate::secs(ready));
    let found = run.envd()?.sh(As::Default, "sha256sum unsynced/*")?.stdout;
    run.report.check(
        P,
        "every file written before the /freeze answer survives a cold boot of that disk",
        crate::expect_eq("sha256sum", &found, &written),
    )
}
