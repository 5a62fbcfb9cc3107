//! The forward sockets held now, shared with a live upgrade: the outgoing
//! image duplicates them for the new one, which serves them on at once.
//! A forwarded port keeps its listening socket (and its backlog) across
//! the swap instead of refusing connections until the first scan binds it
//! again, and a connection being relayed keeps going: its two sockets and
//! the two pipes between them are handed over, and the new image resumes
//! the relay with whatever the pipes hold (see [`super::relay`]).
//! Connections still being connected to their target end with the old
//! image, as in-flight requests to envd do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// One forwarded port, as the handover names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldForward {
    /// The forwarded port.
    pub port: u16,
    /// The loopback listener it leads to.
    pub target: SocketAddr,
    /// Its listening socket on the forward address.
    pub fd: RawFd,
}

/// One relayed connection, as the handover names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRelay {
    /// The target it leads to (for the log).
    pub target: SocketAddr,
    /// The accepted socket.
    pub client: RawFd,
    /// The socket connected to the target.
    pub server: RawFd,
    /// The client → server pipe: read end, write end.
    pub upstream: [RawFd; 2],
    /// The server → client pipe: read end, write end.
    pub downstream: [RawFd; 2],
}

impl HeldRelay {
    /// Its fds, in a fixed order.
    pub fn fds(&self) -> [RawFd; 6] {
        let [up_read, up_write] = self.upstream;
        let [down_read, down_write] = self.downstream;
        [self.client, self.server, up_read, up_write, down_read, down_write]
    }

    fn map_fds(&self, mut map: impl FnMut(RawFd) -> std::io::Result<RawFd>) -> std::io::Result<HeldRelay> {
        let [client, server, up_read, up_write, down_read, down_write] = self.fds();
        Ok(HeldRelay {
            target: self.target,
            client: map(client)?,
            server: map(server)?,
            upstream: [map(up_read)?, map(up_write)?],
            downstream: [map(down_read)?, map(down_write)?],
        })
    }
}

/// A handed-over relay's fds, owned, in [`HeldRelay::fds`] order.
#[derive(Debug)]
pub struct RelayFds {
    /// Where it leads.
    pub target: SocketAddr,
    /// Client socket, server socket, upstream read and write ends,
    /// downstream read and write ends.
    pub fds: [OwnedFd; 6],
}

#[derive(Debug, Default)]
struct Held {
    listeners: BTreeMap<u16, HeldForward>,
    relays: BTreeMap<u64, HeldRelay>,
    next_relay: u64,
}

#[derive(Debug, Default)]
struct HandedOver {
    listeners: Vec<(HeldForward, OwnedFd)>,
    relays: Vec<RelayFds>,
}

/// Forward sockets: those the forwarder holds, and those handed over by an
/// earlier image, waiting for the forwarder to take them.
#[derive(Debug, Default)]
pub struct Forwards {
    held: Mutex<Held>,
    handed_over: Mutex<HandedOver>,
}

/// Keeps a relay listed until dropped; dropped before its fds close.
#[derive(Debug)]
pub struct RelayListing<'a> {
    forwards: &'a Forwards,
    id: u64,
}

impl Drop for RelayListing<'_> {
    fn drop(&mut self) {
        self.forwards.held().relays.remove(&self.id);
    }
}

impl Forwards {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handed(&self) -> MutexGuard<'_, HandedOver> {
        self.handed_over.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every held socket passed through `carry` (which duplicates it),
    /// under the lock the forwarder takes before it closes one: no fd
    /// closes or changes meaning between being listed and being duplicated.
    pub fn carry_all(
        &self,
        mut carry: impl FnMut(RawFd) -> std::io::Result<RawFd>,
    ) -> std::io::Result<(Vec<HeldForward>, Vec<HeldRelay>)> {
        let held = self.held();
        let listeners = held
            .listeners
            .values()
            .map(|forward| Ok(HeldForward { fd: carry(forward.fd)?, ..*forward }))
            .collect::<std::io::Result<_>>()?;
        let relays = held.relays.values().map(|relay| relay.map_fds(&mut carry)).collect::<std::io::Result<_>>()?;
        Ok((listeners, relays))
    }

    /// A listening socket from an earlier image, for the forwarder to serve.
    pub fn hand_over(&self, forward: HeldForward, socket: OwnedFd) {
        self.handed().listeners.push((forward, socket));
    }

    /// A relayed connection from an earlier image, for the forwarder to
    /// resume.
    pub fn hand_over_relay(&self, relay: RelayFds) {
        self.handed().relays.push(relay);
    }

    /// What was handed over, once.
    pub(super) fn take_handed_over(&self) -> (Vec<(HeldForward, OwnedFd)>, Vec<RelayFds>) {
        let handed = std::mem::take(&mut *self.handed());
        (handed.listeners, handed.relays)
    }

    /// The forwarder now serves `forward`.
    pub(super) fn insert(&self, forward: HeldForward) {
        self.held().listeners.insert(forward.port, forward);
    }

    /// Called before the forward's socket is closed.
    pub(super) fn remove(&self, port: u16) {
        self.held().listeners.remove(&port);
    }

    /// Lists a relay while the returned guard lives.
    pub(super) fn list_relay(&self, relay: HeldRelay) -> RelayListing<'_> {
        let mut held = self.held();
        let id = held.next_relay;
        held.next_relay += 1;
        held.relays.insert(id, relay);
        RelayListing { forwards: self, id }
    }
}
