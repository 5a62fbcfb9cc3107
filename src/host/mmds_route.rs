//! The metadata route healing itself. A template's own nat rules (a
//! transparent proxy is common) can redirect `169.254.169.254:80`, and then
//! neither the token hash nor the sandbox identity can be read. When a read
//! of the metadata service fails, and only then, envd pins the service's
//! route ahead of every nat rule and the read is tried once more:
//!
//! 1. a private nat chain, `ENVD-MMDS`, holds one rule: TCP to
//!    `169.254.169.254:80` is `ACCEPT`ed, which in the nat table means "no
//!    translation, stop here" (a `RETURN` would go back to the calling
//!    chain and on to the redirect);
//! 2. in `PREROUTING` and `OUTPUT` every jump to it is removed and one is
//!    inserted first, so a rule the template added above it since is below
//!    it again, and a second heal leaves one jump, not two.
//!
//! The happy path costs nothing: no rule is read or written while reads
//! succeed. Heals are one at a time (a caller that finds one running waits
//! for it instead of running `iptables` beside it) and at least
//! [`HEAL_INTERVAL`] apart; a heal after which the read still failed
//! doubles that, up to [`MAX_HEAL_INTERVAL`], so a service that is simply
//! down is not hammered with `iptables` runs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The metadata service's address in a Firecracker VM.
pub const MMDS_ADDRESS: &str = "169.254.169.254:80";
/// The private nat chain.
const CHAIN: &str = "ENVD-MMDS";
/// The chains a redirect of the service's traffic can sit in.
const HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];
/// Earlier jumps removed per hook at most (each removal is one run).
const MAX_STALE_JUMPS: usize = 16;
/// Longest one `iptables` run may take (it waits up to 5 s for the lock).
const RUN_TIMEOUT: Duration = Duration::from_secs(10);
/// Heals are at least this far apart.
pub const HEAL_INTERVAL: Duration = Duration::from_secs(10);
/// ... and at most this far, after heals that did not help.
pub const MAX_HEAL_INTERVAL: Duration = Duration::from_secs(300);

/// Why the route could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// `iptables` could not be run (not installed, say).
    #[error("running iptables {args}: {source}")]
    Run {
        /// Its arguments.
        args: String,
        /// Why.
        source: std::io::Error,
    },
    /// `iptables` refused a rule.
    #[error("iptables {args} failed: {output}")]
    Refused {
        /// Its arguments.
        args: String,
        /// What it said.
        output: String,
    },
    /// `iptables` did not finish in time.
    #[error("iptables {0} did not finish within 10 s")]
    TimedOut(String),
}

/// What a heal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned {
    /// Earlier jumps to the chain that were removed.
    pub stale_jumps: usize,
}

/// Pins the route once, whoever asks.
#[derive(Debug, Default)]
pub struct RouteHealer {
    running: tokio::sync::Mutex<()>,
    pace: Mutex<Pace>,
}

/// When the last heal was, and how long until the next may be.
#[derive(Debug, Default)]
struct Pace {
    last: Option<Instant>,
    /// Zero until a heal did not help.
    backoff: Duration,
}

impl RouteHealer {
    /// Pins the route unless the last heal was too recent (then `Ok(None)`:
    /// it stands); waits for a heal in progress.
    pub async fn heal(&self) -> Result<Option<Pinned>, RouteError> {
        let _one_at_a_time = self.running.lock().await;
        if !self.due() {
            return Ok(None);
        }
        pin().await.map(Some)
    }

    /// Whether the read after a heal succeeded: a heal that did not help
    /// makes the next one wait longer, one that did resets the wait.
    pub fn helped(&self, helped: bool) {
        let mut pace = self.pace();
        pace.backoff =
            if helped { Duration::ZERO } else { (pace.backoff.max(HEAL_INTERVAL / 2) * 2).min(MAX_HEAL_INTERVAL) };
    }

    /// Whether a heal may run now; if so, it counts as the last one.
    fn due(&self) -> bool {
        let mut pace = self.pace();
        let wait = pace.backoff.max(HEAL_INTERVAL);
        if pace.last.is_some_and(|at| at.elapsed() < wait) {
            return false;
        }
        pace.last = Some(Instant::now());
        true
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, Pace> {
        self.pace.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Steps 1 and 2 of the module doc.
async fn pin() -> Result<Pinned, RouteError> {
    // Fails when the chain exists already, which is fine: it is flushed.
    let _ = iptables(&["-N", CHAIN]).await;
    iptables(&["-F", CHAIN]).await?;
    iptables(&["-A", CHAIN, "-d", "169.254.169.254/32", "-p", "tcp", "--dport", "80", "-j", "ACCEPT"]).await?;
    let mut stale_jumps = 0;
    for hook in HOOKS {
        for _ in 0..MAX_STALE_JUMPS {
            if iptables(&["-D", hook, "-j", CHAIN]).await.is_err() {
                break;
            }
            stale_jumps += 1;
        }
        iptables(&["-I", hook, "1", "-j", CHAIN]).await?;
    }
    Ok(Pinned { stale_jumps })
}

/// `iptables -w 5 -t nat <args>`: `-w` waits for the xtables lock a user's
/// own `iptables` may hold.
async fn iptables(args: &[&str]) -> Result<(), RouteError> {
    let shown = args.join(" ");
    let run = tokio::process::Command::new("iptables")
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(RUN_TIMEOUT, run).await {
        Err(_) => return Err(RouteError::TimedOut(shown)),
        Ok(Err(source)) => return Err(RouteError::Run { args: shown, source }),
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(RouteError::Refused { args: shown, output: said })
}
