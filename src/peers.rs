//! The connections a node holds, keyed by PeerId, and the addresses it knows.
//!
//! One connection serves both directions: whichever side dialed, the pool hands it out
//! for requests to that peer. Concurrent dials to one peer are serialised by a per-peer
//! lock, so a burst of requests makes one connection, not many.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::identity::PeerId;

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionDirection {
    /// We dialed the peer.
    Outbound,
    /// The peer dialed us.
    Inbound,
}

#[derive(Default)]
struct PeerEntry {
    /// The connection handed out for this peer.
    current: Option<quinn::Connection>,
    /// The last known address to dial.
    addr: Option<SocketAddr>,
    /// Held while dialing this peer.
    dial_lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct Inner {
    peers: HashMap<PeerId, PeerEntry>,
    /// Every live connection by `stable_id`, including a second one to the same peer.
    all: HashMap<usize, (PeerId, quinn::Connection)>,
}

/// The connection pool.
#[derive(Default)]
pub(crate) struct Peers {
    inner: Mutex<Inner>,
}

impl Peers {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the maps consistent (single inserts/removes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection to `peer`, if there is one.
    pub fn live(&self, peer: &PeerId) -> Option<quinn::Connection> {
        let inner = self.lock();
        let conn = inner.peers.get(peer)?.current.as_ref()?;
        conn.close_reason().is_none().then(|| conn.clone())
    }

    /// The last known address of `peer`.
    pub fn addr(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.lock().peers.get(peer)?.addr
    }

    /// Remembers where `peer` can be dialed.
    pub fn set_addr(&self, peer: PeerId, addr: SocketAddr) {
        self.lock().peers.entry(peer).or_default().addr = Some(addr);
    }

    /// The lock to hold while dialing `peer`.
    pub fn dial_lock(&self, peer: PeerId) -> Arc<tokio::sync::Mutex<()>> {
        self.lock().peers.entry(peer).or_default().dial_lock.clone()
    }

    /// Adds an established connection; it becomes the one handed out for `peer`.
    pub fn insert(&self, peer: PeerId, conn: quinn::Connection) {
        let mut inner = self.lock();
        inner.all.insert(conn.stable_id(), (peer, conn.clone()));
        inner.peers.entry(peer).or_default().current = Some(conn);
    }

    /// Forgets a connection that has closed. If another connection to the same peer is
    /// still live, it takes over.
    pub fn remove(&self, peer: PeerId, stable_id: usize) {
        let mut inner = self.lock();
        inner.all.remove(&stable_id);
        let replacement = inner
            .all
            .values()
            .find(|(p, c)| *p == peer && c.close_reason().is_none())
            .map(|(_, c)| c.clone());
        if let Some(entry) = inner.peers.get_mut(&peer) {
            if entry
                .current
                .as_ref()
                .is_some_and(|c| c.stable_id() == stable_id)
            {
                entry.current = replacement;
            }
        }
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.lock().all.len()
    }

    /// Peers with a live connection.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        let inner = self.lock();
        let mut peers: Vec<PeerId> = inner.all.values().map(|(p, _)| *p).collect();
        peers.sort();
        peers.dedup();
        peers
    }
}
