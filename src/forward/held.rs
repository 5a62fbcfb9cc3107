//! The forward sockets held now, shared with a live upgrade: the outgoing
//! image duplicates them for the new one, which serves them on at once, so
//! a forwarded port keeps its listening socket (and its backlog) across the
//! swap instead of refusing connections until the first scan binds it
//! again. Connections being relayed end with the old image, as in-flight
//! requests to envd do.

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

/// Forward sockets: those the forwarder holds, and those handed over by an
/// earlier image, waiting for the forwarder to take them.
#[derive(Debug, Default)]
pub struct Forwards {
    held: Mutex<BTreeMap<u16, HeldForward>>,
    handed_over: Mutex<Vec<(HeldForward, OwnedFd)>>,
}

impl Forwards {
    fn held(&self) -> MutexGuard<'_, BTreeMap<u16, HeldForward>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each held socket passed through `carry` (which duplicates it), under
    /// the lock the forwarder takes before it closes one: no fd closes or
    /// changes meaning between being listed and being duplicated.
    pub fn carry_all(
        &self,
        mut carry: impl FnMut(RawFd) -> std::io::Result<RawFd>,
    ) -> std::io::Result<Vec<HeldForward>> {
        let held = self.held();
        held.values().map(|forward| Ok(HeldForward { fd: carry(forward.fd)?, ..*forward })).collect()
    }

    /// A socket from an earlier image, for the forwarder to serve.
    pub fn hand_over(&self, forward: HeldForward, socket: OwnedFd) {
        self.handed_over.lock().unwrap_or_else(|e| e.into_inner()).push((forward, socket));
    }

    /// What was handed over, once.
    pub(super) fn take_handed_over(&self) -> Vec<(HeldForward, OwnedFd)> {
        std::mem::take(&mut *self.handed_over.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The forwarder now serves `forward`.
    pub(super) fn insert(&self, forward: HeldForward) {
        self.held().insert(forward.port, forward);
    }

    /// Called before the forward's socket is closed.
    pub(super) fn remove(&self, port: u16) {
        self.held().remove(&port);
    }
}
