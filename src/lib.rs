//! envd: the agent inside every sandbox microVM.
//!
//! It serves the Process and Filesystem Connect services and a small HTTP
//! API on one port, wire-compatible with the published E2B SDKs, and
//! prepares the VM for pause and resume. Module map:

/// Who may call: access token, signed file URLs, the Basic-header user.
pub mod auth;
/// Command-line flags and their defaults.
pub mod config;
/// The exec context: default user, workdir, env vars; users and paths.
pub mod context;
/// Port forwarding of listeners bound only to loopback, in-process.
pub mod forward;
/// Filesystem operations: entries, listing, moves, watchers, transfers.
pub mod fs;
/// What comes from or goes to the host: /init, metrics, pause hooks.
pub mod host;
/// Holding the listening sockets still while an upgrade hands them over.
pub mod intake;
/// glibc's heap set up to give memory back after a burst.
pub mod memory;
/// Spawning processes as users, the process table, output fan-out.
pub mod process;
/// Generated protobuf messages and Connect service traits.
pub mod proto;
/// Persisted records (the leaf every module that saves or reads state
/// shares): template processes, volumes.
pub mod record;
/// Restored processes: the template's running processes, back after a cold boot.
pub mod restore;
/// One listener, one router: Connect services, HTTP routes, auth, CORS.
pub mod server;
/// envd's own log lines: stderr through a queue that never blocks the
/// daemon, and shipping to the host's collector.
pub mod telemetry;
/// Live upgrade: the same process execs a new envd, which takes over.
pub mod upgrade;

/// The version reported by `--version` and `X-Envd-Version`.
///
/// Kept at or above 0.6.6 so that the SDKs enable every feature and the
/// orchestrator uses `/fsfreeze`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
