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

use crate::record::{CarriedFds, Carry, NamesFds};

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

/// The forwards' part of the upgrade handover (its `forwards` and
/// `relays` sections).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardsPart {
    /// Forwarded ports' listening sockets.
    #[serde(default)]
    pub forwards: Vec<HeldForward>,
    /// Forwarded connections being relayed.
    #[serde(default)]
    pub relays: Vec<HeldRelay>,
}

impl NamesFds for ForwardsPart {
    fn fds_mut(&mut self) -> Vec<&mut RawFd> {
        let listeners = self.forwards.iter_mut().map(|f| &mut f.fd);
        let relays = self.relays.iter_mut().flat_map(|r| {
            let [up_read, up_write] = &mut r.upstream;
            let [down_read, down_write] = &mut r.downstream;
            [&mut r.client, &mut r.server, up_read, up_write, down_read, down_write]
        });
        listeners.chain(relays).collect()
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
    pub fn export(&self, carry: &mut Carry) -> std::io::Result<ForwardsPart> {
        let held = self.held();
        let forwards = held
            .listeners
            .values()
            .map(|forward| Ok(HeldForward { fd: carry(forward.fd)?, ..*forward }))
            .collect::<std::io::Result<_>>()?;
        let relays = held.relays.values().map(|relay| relay.map_fds(&mut *carry)).collect::<std::io::Result<_>>()?;
        Ok(ForwardsPart { forwards, relays })
    }

    /// Takes over the listening sockets and relays of an earlier image,
    /// for the forwarder to serve and resume before its first scan;
    /// returns how many of each.
    pub fn resume(&self, part: ForwardsPart, fds: &mut CarriedFds) -> (usize, usize) {
        let mut handed = self.handed();
        for forward in part.forwards {
            if let Some(socket) = fds.take(forward.fd) {
                handed.listeners.push((forward, socket));
            }
        }
        for relay in part.relays {
            let owned: Vec<OwnedFd> = relay.fds().into_iter().filter_map(|fd| fds.take(fd)).collect();
            if let Ok(fds) = <[OwnedFd; 6]>::try_from(owned) {
                handed.relays.push(RelayFds { target: relay.target, fds });
            }
        }
        (handed.listeners.len(), handed.relays.len())
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::record::carry_into;
    use crate::record::fds::testing::{claimed, inode};

    #[test]
    fn every_held_socket_survives_export_serialise_and_resume() {
        let forwards = Forwards::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        forwards.insert(HeldForward { port: 8080, target, fd: listener.as_raw_fd() });
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| nix::unistd::pipe().unwrap()).collect();
        let raw = |i: usize| (pipes[i].0.as_raw_fd(), pipes[i].1.as_raw_fd());
        let relay = HeldRelay {
            target,
            client: raw(0).0,
            server: raw(0).1,
            upstream: [raw(1).0, raw(1).1],
            downstream: [raw(2).0, raw(2).1],
        };
        let _listed = forwards.list_relay(relay);

        let mut carried = Vec::new();
        let part = forwards.export(&mut |fd| carry_into(fd, &mut carried)).unwrap();
        let read_back: ForwardsPart = serde_json::from_str(&serde_json::to_string(&part).unwrap()).unwrap();
        assert_eq!(read_back, part, "serialising loses nothing");

        let next = Forwards::default();
        assert_eq!(next.resume(read_back, &mut claimed(carried)), (1, 1));
        let (listeners, relays) = next.take_handed_over();
        assert_eq!(listeners[0].0, part.forwards[0]);
        assert_eq!(inode(listeners[0].1.as_raw_fd()), inode(listener.as_raw_fd()), "the same listening socket");
        assert_eq!(relays[0].target, target);
        let resumed: Vec<u64> = relays[0].fds.iter().map(|fd| inode(fd.as_raw_fd())).collect();
        let original: Vec<u64> = relay.fds().iter().map(|fd| inode(*fd)).collect();
        assert_eq!(resumed, original, "each relay fd in its own place");
    }
}
