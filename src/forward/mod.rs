//! Port forwarding of listeners bound only to loopback.
//!
//! Users' servers often listen on `127.0.0.1`, `localhost` or `::1`, while
//! the sandbox proxy connects to the VM's external address. envd makes such
//! a server reachable on the forward address (`--forward-address`) and the
//! same port, in-process: no helper processes, one tokio task per listener
//! and per connection, bytes moved by `splice(2)` ([`relay`]).
//!
//! Order of effects, every [`SCAN_INTERVAL`]:
//! 1. read every TCP listener of the namespace ([`listeners`]: netlink
//!    socket diagnostics, or `/proc/net/tcp*` on a kernel without them;
//!    the kernel has no notification of new listeners, so this is a cheap
//!    poll, five times as often as the reference's);
//! 2. decide the ports to forward from that one snapshot ([`plan`]);
//! 3. stop the forwards no longer wanted: their accept task is aborted,
//!    which closes the forward socket, so new connections are refused at
//!    once. Connections already relayed go on until an end closes them:
//!    they are users' sessions. Stopping comes before starting so that a
//!    port whose target moved (IPv4 listener gone, IPv6 one left) is bound
//!    again in the same scan;
//! 4. start the new ones: bind the forward address and port with
//!    `SO_REUSEADDR` (a restarted server's port must not wait for the
//!    TIME_WAIT of earlier forwarded connections), listen, spawn the accept
//!    task. A bind that fails (address taken meanwhile, forward address
//!    absent) is retried on the next scan and told once per port.
//!
//! Per connection: once accepted it takes a slot of the connection cap
//! (at the cap it waits for one, the port's further connections wait in
//! the kernel's backlog, and a throttled line says so), then the target is
//! connected and the two sockets are relayed until both directions end.

mod held;
pub mod listeners;
pub mod plan;
pub mod relay;

pub use held::{Forwards, ForwardsPart, HeldForward, HeldRelay, RelayFds};

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use crate::telemetry::throttle::Throttle;

/// How often the listeners are read: a new server is reachable within this.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(200);
/// After a failed scan (no netlink socket diagnostics), read less often.
const SCAN_RETRY: Duration = Duration::from_secs(5);
/// A target that does not accept within this is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backlog of each forward socket.
const BACKLOG: i32 = 1024;
/// The cap line and the scan failure line at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The forwarder's settings.
#[derive(Debug, Clone, Copy)]
pub struct ForwardConfig {
    /// Where forwarded ports are bound.
    pub address: IpAddr,
    /// envd's own port, never forwarded.
    pub own_port: u16,
    /// Forwarded connections open at once.
    pub max_connections: usize,
}

/// The forwards envd holds, reconciled with the listeners every scan.
#[derive(Debug)]
pub struct Forwarder {
    config: ForwardConfig,
    forwards: BTreeMap<u16, Forward>,
    /// Ports whose failed bind was already told.
    told: BTreeSet<u16>,
    capacity: Arc<Capacity>,
    /// Shared with a live upgrade.
    shared: Arc<Forwards>,
    /// Held while an upgrade hands the forward sockets over.
    intake: crate::intake::IntakeWatch,
}

/// The cap on forwarded connections, shared by every forwarded port.
#[derive(Debug)]
struct Capacity {
    slots: Arc<Semaphore>,
    limit: usize,
    at_cap: Throttle,
}

impl Capacity {
    /// A connection slot; at the cap, waits for one (and says so, throttled).
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => return Some(slot),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        if let Some(quiet) = self.at_cap.admit() {
            tracing::warn!(
                limit = self.limit,
                "forwarded connection limit reached: new connections wait in the backlog \
                 (reached {quiet} more times since last told)"
            );
        }
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// One forwarded port: its target and the task accepting on it.
#[derive(Debug)]
struct Forward {
    target: SocketAddr,
    accepting: JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Forwarder {
    /// A forwarder holding no forwards yet; it serves the sockets an
    /// earlier image handed over in `shared` from its first scan on.
    pub fn new(config: ForwardConfig, shared: Arc<Forwards>, intake: crate::intake::IntakeWatch) -> Self {
        Self {
            config,
            shared,
            intake,
            forwards: BTreeMap::new(),
            told: BTreeSet::new(),
            capacity: Arc::new(Capacity {
                slots: Arc::new(Semaphore::new(config.max_connections.max(1))),
                limit: config.max_connections.max(1),
                at_cap: Throttle::new(WARN_EVERY),
            }),
        }
    }

    /// Scans and reconciles forever (spawned at start).
    pub async fn run(mut self) {
        tracing::info!(address = %self.config.address, "forwarding loopback listeners");
        let (listeners, relays) = self.shared.take_handed_over();
        for (forward, socket) in listeners {
            self.serve_handed_over(forward, socket);
        }
        for relay in relays {
            tokio::spawn(resume_connection(relay, self.capacity.clone(), self.shared.clone()));
        }
        let scan_failed = Throttle::new(WARN_EVERY);
        let mut source = listeners::Source::SockDiag;
        loop {
            // A dump of the LISTEN sockets takes microseconds and never
            // waits on anything but the kernel: done in place.
            let pause = match listeners::tcp_listeners(source) {
                Ok(listeners) => {
                    self.reconcile(&listeners);
                    SCAN_INTERVAL
                }
                Err(err) if source == listeners::Source::SockDiag => {
                    tracing::info!("reading listeners from /proc/net/tcp*: {err}");
                    source = listeners::Source::ProcNet;
                    Duration::ZERO
                }
                Err(err) => {
                    if scan_failed.admit().is_some() {
                        tracing::warn!("port forwarding cannot read the listeners: {err}");
                    }
                    SCAN_RETRY
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Steps 2 to 4 of the module doc for one scan.
    pub fn reconcile(&mut self, listeners: &[listeners::Listener]) {
        let held: BTreeSet<u16> = self.forwards.keys().copied().collect();
        let wanted = plan::plan(listeners, self.config.address, self.config.own_port, &held);
        let shared = &self.shared;
        self.forwards.retain(|port, forward| {
            let keep = wanted.get(port) == Some(&forward.target);
            if !keep {
                // Unlisted before the socket closes (see `held`).
                shared.remove(*port);
                tracing::info!(port, "port no longer forwarded");
            }
            keep
        });
        self.told.retain(|port| wanted.contains_key(port));
        for (port, target) in wanted {
            if !self.forwards.contains_key(&port) {
                self.start(port, target);
            }
        }
    }

    fn start(&mut self, port: u16, target: SocketAddr) {
        let bound = SocketAddr::new(self.config.address, port);
        match forward_socket(bound) {
            Ok(listener) => {
                tracing::info!(port, %target, "forwarding port");
                self.serve(port, target, listener);
                self.told.remove(&port);
            }
            Err(err) => {
                if self.told.insert(port) {
                    tracing::warn!(port, address = %self.config.address, "cannot forward port: {err}");
                }
            }
        }
    }
}

impl Forwarder {
    fn serve(&mut self, port: u16, target: SocketAddr, listener: TcpListener) {
        self.shared.insert(HeldForward { port, target, fd: listener.as_raw_fd() });
        let forwarding = Forwarding { target, capacity: self.capacity.clone(), forwards: self.shared.clone() };
        let accepting = tokio::spawn(accept_loop(listener, forwarding, self.intake.clone()));
        self.forwards.insert(port, Forward { target, accepting });
    }

    /// Serves a socket an earlier image of envd handed over; the first
    /// scan keeps it if its target still listens, else closes it.
    fn serve_handed_over(&mut self, forward: HeldForward, socket: OwnedFd) {
        let listener = std::net::TcpListener::from(socket);
        let listener = listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener));
        match listener {
            Ok(listener) => {
                tracing::info!(port = forward.port, target = %forward.target, "forwarding port (handed over)");
                self.serve(forward.port, forward.target, listener);
            }
            Err(err) => tracing::warn!(port = forward.port, "a handed-over forward socket is unusable: {err}"),
        }
    }
}

/// The listening socket on the forward address.
fn forward_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// What an accept loop hands each connection.
struct Forwarding {
    target: SocketAddr,
    capacity: Arc<Capacity>,
    forwards: Arc<Forwards>,
}

async fn accept_loop(listener: TcpListener, forwarding: Forwarding, mut intake: crate::intake::IntakeWatch) {
    let Forwarding { target, capacity, forwards } = forwarding;
    loop {
        // Handed over with its backlog during an upgrade (see `crate::intake::Intake`).
        let Some(accepted) = intake.unless_held(listener.accept()).await else { continue };
        let client = match accepted {
            Ok((client, _peer)) => client,
            Err(err) => {
                // Out of fds and the like: back off instead of spinning.
                tracing::debug!(%target, "accept on a forwarded port: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The slot is taken after accept: idle ports hold none. At the cap
        // this one connection waits here and the next ones in the backlog.
        let Some(slot) = capacity.slot().await else { return };
        tokio::spawn(forward_connection(client, target, slot, forwards.clone()));
    }
}

async fn forward_connection(
    client: TcpStream,
    target: SocketAddr,
    _slot: OwnedSemaphorePermit,
    forwards: Arc<Forwards>,
) {
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(server)) => server,
        Ok(Err(err)) => return tracing::debug!(%target, "connecting a forwarded connection: {err}"),
        Err(_elapsed) => return tracing::debug!(%target, "connecting a forwarded connection timed out"),
    };
    // Bytes are passed on as they come: Nagle would only add latency.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Err(err) = relay::relay(client, server, target, &forwards).await {
        tracing::debug!(%target, "forwarded connection ended: {err}");
    }
}

/// A connection an earlier image of envd was relaying; it takes a slot of
/// the cap if one is free (it was counted before the upgrade already).
async fn resume_connection(relay: RelayFds, capacity: Arc<Capacity>, forwards: Arc<Forwards>) {
    let _slot = capacity.slots.clone().try_acquire_owned().ok();
    let target = relay.target;
    if let Err(err) = relay::resume(relay, &forwards).await {
        tracing::debug!(%target, "handed-over forwarded connection ended: {err}");
    }
}
