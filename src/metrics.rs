//! Counters a node keeps about itself, read with [`Node::stats`](crate::Node::stats).

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters (shared by the node's tasks).
#[derive(Default)]
pub(crate) struct Counters {
    pub connections_refused: AtomicU64,
    pub zero_rtt_attempted: AtomicU64,
    pub zero_rtt_accepted: AtomicU64,
    pub zero_rtt_rejected: AtomicU64,
    pub duplicates_closed: AtomicU64,
    pub reconnects: AtomicU64,
    pub rebinds: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, connections: usize) -> NodeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NodeStats {
            connections,
            connections_refused: get(&self.connections_refused),
            zero_rtt_attempted: get(&self.zero_rtt_attempted),
            zero_rtt_accepted: get(&self.zero_rtt_accepted),
            zero_rtt_rejected: get(&self.zero_rtt_rejected),
            duplicates_closed: get(&self.duplicates_closed),
            reconnects: get(&self.reconnects),
            rebinds: get(&self.rebinds),
        }
    }
}

/// A snapshot of a node's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Open connections now.
    pub connections: usize,
    /// Connections refused: over a connection limit, denied, not allowed, shutting down.
    pub connections_refused: u64,
    /// Dials that sent 0-RTT data (a session ticket for the peer was at hand).
    pub zero_rtt_attempted: u64,
    /// ... of which the peer accepted the 0-RTT data.
    pub zero_rtt_accepted: u64,
    /// ... of which the peer rejected it (the requests sent in it were re-sent).
    pub zero_rtt_rejected: u64,
    /// Duplicate connections (from simultaneous dials) this node retired.
    pub duplicates_closed: u64,
    /// Successful redials of known peers after their connection dropped.
    pub reconnects: u64,
    /// Times the node moved to a new UDP socket ([`Node::rebind`](crate::Node::rebind)).
    pub rebinds: u64,
}
