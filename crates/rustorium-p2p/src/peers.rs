//! The connection pool: one connection per peer, used in both directions, and the
//! events it emits as connections come and go.
//!
//! Rules:
//! * Concurrent dials to one peer share one dial (a per-peer lock), so a burst of
//!   requests makes one connection.
//! * When two connections to the same peer exist because both sides dialed at once (the
//!   older one is younger than [`SIMULTANEOUS_DIAL_WINDOW`](crate::policy::SIMULTANEOUS_DIAL_WINDOW)), both sides keep the one
//!   dialed by the lower PeerId. Otherwise the newer one wins: the peer dialed again
//!   because it lost the old one (for example it restarted). The loser is *retired*: no
//!   new streams go on it, and once it has been quiet for a while it is closed with code
//!   `DUPLICATE`.
//! * A connection that closes leaves the pool at once; the next request redials.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::event::{Direction, DisconnectReason};
use crate::identity::PeerId;
use crate::metrics::{Metrics, Watched};
use crate::policy::old_connection_survives;
use crate::stream_budget::{Shrink, StreamBudget, StreamType};
use crate::tally::Tally;
use crate::wire::code;

/// What one peer may hold of this node at once, shared by all its connections: handler
/// slots (its share of `max_concurrent_requests`) and answers waiting for it to read them.
pub(crate) struct PeerShare {
    /// One permit per handler running for the peer.
    pub slots: Arc<Tally>,
    /// One place per answer being written to the peer.
    pub answers: Arc<Tally>,
    /// One permit per byte of the peer's requests held in memory.
    pub bytes: Arc<Semaphore>,
    /// One permit per streaming request or message of the peer being served.
    pub transfers: Arc<Tally>,
    /// Answers in a row the peer let time out without reading.
    stalls: AtomicU32,
}

impl PeerShare {
    fn new(limits: &ShareLimits) -> Arc<Self> {
        Arc::new(PeerShare {
            slots: Tally::new(limits.slots as usize),
            answers: Tally::new(limits.answers as usize),
            bytes: Arc::new(Semaphore::new(limits.bytes)),
            transfers: Tally::new(limits.transfers as usize),
            stalls: AtomicU32::new(0),
        })
    }

    /// Records an answer the peer did not read in time; returns how many in a row.
    pub fn stalled(&self) -> u32 {
        self.stalls.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records an answer the peer read.
    pub fn read(&self) {
        self.stalls.store(0, Ordering::Relaxed);
    }
}

/// One connection and what the pool knows about it.
pub(crate) struct PeerConnection {
    pub conn: quinn::Connection,
    pub peer: PeerId,
    pub direction: Direction,
    /// Who dialed it (decides which connection survives a simultaneous dial).
    pub dialer: PeerId,
    /// Streams in progress on it: requests we sent, requests and messages we serve.
    active: AtomicUsize,
    /// Streams started or ended so far: a quiet connection is one where this stands still
    /// (a counter, not a clock: no clock read on the path of every stream).
    stream_events: AtomicU64,
    epoch: tokio::time::Instant,
    retired: AtomicBool,
    /// Why this node closed it, when it did.
    closed_by_us: Mutex<Option<DisconnectReason>>,
    /// `true` once the handshake is complete (at once, unless dialed with 0-RTT).
    confirmed: watch::Receiver<bool>,
    /// The streams the peer may open at once, raised as it uses them.
    budget: StreamBudget,
    /// Per direction: a task is waiting to shrink the limit.
    settling: [AtomicBool; 2],
    /// What the peer may hold of this node (shared with its other connections).
    pub share: Arc<PeerShare>,
    /// The metrics sampler's last reading, from its announcement until it closes.
    watched: Mutex<Option<Watched>>,
}

impl PeerConnection {
    pub fn new(
        conn: quinn::Connection,
        peer: PeerId,
        direction: Direction,
        dialer: PeerId,
        confirmed: watch::Receiver<bool>,
        budget: StreamBudget,
        share: Arc<PeerShare>,
    ) -> Arc<Self> {
        Arc::new(PeerConnection {
            conn,
            peer,
            direction,
            dialer,
            active: AtomicUsize::new(0),
            stream_events: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            retired: AtomicBool::new(false),
            closed_by_us: Mutex::new(None),
            confirmed,
            budget,
            settling: [AtomicBool::new(false), AtomicBool::new(false)],
            share,
            watched: Mutex::new(None),
        })
    }

    /// Starts the metrics sampler's readings of this connection.
    pub fn watch(&self, metrics: &Metrics) {
        let watched = metrics.watch(&self.conn);
        *self.watched.lock().unwrap_or_else(|e| e.into_inner()) = Some(watched);
    }

    /// One reading for the metrics sampler (the last, once `closed`; none after it).
    pub fn sample(&self, metrics: &Metrics, closed: bool) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = watched.as_mut() {
            metrics.sample(&self.conn, w, closed);
        }
        if closed {
            *watched = None;
        }
    }

    /// Counts a stream as in progress until the guard is dropped.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.touch();
        StreamGuard(self.clone(), None)
    }

    /// Counts a stream the peer opened as in progress until the guard is dropped, and lets
    /// the peer open more at once if it is using most of what it may.
    pub fn peer_stream_guard(self: &Arc<Self>, dir: StreamType) -> StreamGuard {
        if let Some(limit) = self.budget.opened(dir) {
            self.advertise(dir, limit);
        }
        let mut guard = self.stream_guard();
        guard.1 = Some(dir);
        guard
    }

    /// Sets how many streams of `dir` the peer may open at once.
    fn advertise(&self, dir: StreamType, limit: u32) {
        let limit = quinn::VarInt::from_u32(limit);
        match dir {
            StreamType::Bi => self.conn.set_max_concurrent_bi_streams(limit),
            StreamType::Uni => self.conn.set_max_concurrent_uni_streams(limit),
        }
    }

    /// Lets the limit of `dir` shrink once it has held long enough (`wait` from now), if
    /// the peer is still using little of it then: at most one such task per direction.
    fn settle_later(self: &Arc<Self>, dir: StreamType, wait: Duration) {
        let d = dir as usize;
        if self.settling[d].swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.settling[d].store(false, Ordering::Relaxed);
            return;
        };
        let entry = self.clone();
        runtime.spawn(async move {
            let mut wait = wait;
            // Bounded: each round waits out what is left of a hold that started before it,
            // and a hold restarts only when the limit changes.
            for _ in 0..1000 {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = entry.conn.closed() => return,
                }
                match entry.budget.settle(dir) {
                    Shrink::After(more) => wait = more,
                    Shrink::Now(limit) => {
                        entry.advertise(dir, limit);
                        break;
                    }
                    Shrink::No => break,
                }
            }
            entry.settling[d].store(false, Ordering::Relaxed);
            // A close that came while this task was finishing saw it still running and
            // left the shrink to it: one more look.
            if let Shrink::Now(limit) = entry.budget.settle(dir) {
                entry.advertise(dir, limit);
            }
        });
    }

    /// Gives the connection's stream growth back to the node-wide pool: it has closed.
    pub fn release_streams(&self) {
        self.budget.release();
    }

    /// Records stream activity.
    fn touch(&self) {
        self.stream_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until the handshake is complete. `false` if the connection failed first.
    pub async fn confirmed(&self) -> bool {
        let mut confirmed = self.confirmed.clone();
        let done = confirmed.wait_for(|c| *c).await.is_ok();
        done
    }

    /// The watch that turns `true` when the handshake is complete.
    pub fn confirmed_watch(&self) -> &watch::Receiver<bool> {
        &self.confirmed
    }

    pub fn is_confirmed(&self) -> bool {
        *self.confirmed.borrow()
    }

    fn is_live(&self) -> bool {
        self.conn.close_reason().is_none() && !self.retired.load(Ordering::SeqCst)
    }

    /// Closes this retired connection once no stream has been in progress on it for
    /// `quiet`. Never while a stream is in progress: the peer relies on that to re-send a
    /// request that failed because of this close. (Both sides stop opening streams on a
    /// retired connection, so it goes quiet unless the peer does not see it as retired,
    /// in which case it simply stays open.)
    pub async fn close_when_quiet(&self, quiet: Duration) {
        let mut seen = self.stream_events.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(quiet) => {}
                _ = self.conn.closed() => return,
            }
            if !self.retired.load(Ordering::SeqCst) {
                return; // it became the peer's connection again
            }
            // Quiet: no stream in progress, and none started or ended for `quiet`.
            let now = self.stream_events.load(Ordering::Relaxed);
            if self.active.load(Ordering::SeqCst) == 0 && now == seen {
                break;
            }
            seen = now;
        }
        self.close(
            DisconnectReason::Duplicate,
            code::CLOSE_DUPLICATE,
            b"duplicate connection",
        );
    }

    /// Closes the connection, remembering why for the `Disconnected` event.
    pub fn close(&self, why: DisconnectReason, code: u32, reason: &[u8]) {
        *self.closed_by_us.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.conn.close(code.into(), reason);
    }

    /// Whether this node closed the connection (with [`PeerConnection::close`]).
    pub fn closed_by_us(&self) -> bool {
        self.closed_by_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Why the connection ended, given the error it ended with.
    pub fn disconnect_reason(&self, err: &quinn::ConnectionError) -> DisconnectReason {
        let ours = self.closed_by_us.lock().unwrap_or_else(|e| e.into_inner());
        match (err, ours.as_ref()) {
            (quinn::ConnectionError::LocallyClosed, Some(why)) => why.clone(),
            _ => DisconnectReason::from_error(err),
        }
    }
}

/// Marks a stream as in progress on its connection while alive (and, for a stream the
/// peer opened, as using the peer's stream budget).
pub(crate) struct StreamGuard(Arc<PeerConnection>, Option<StreamType>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        if let Some(dir) = self.1 {
            match self.0.budget.closed(dir) {
                Shrink::Now(limit) => self.0.advertise(dir, limit),
                Shrink::After(wait) => self.0.settle_later(dir, wait),
                Shrink::No => {}
            }
        }
    }
}

#[derive(Default)]
struct PeerEntry {
    /// The connection handed out for this peer.
    current: Option<Arc<PeerConnection>>,
    /// The last known address to dial.
    addr: Option<SocketAddr>,
    /// The address was only learned from the peer dialing us (not given by the
    /// application), so the entry goes when the peer's last connection does.
    learned: bool,
    /// Held while dialing this peer.
    dial_lock: Arc<tokio::sync::Mutex<()>>,
    /// What the peer may hold of this node (made with its first connection).
    share: Option<Arc<PeerShare>>,
}

#[derive(Default)]
struct Inner {
    peers: HashMap<PeerId, PeerEntry>,
    /// Every open connection by `stable_id`, including retired ones.
    all: HashMap<usize, Arc<PeerConnection>>,
}

/// What each peer may hold of the node.
pub(crate) struct ShareLimits {
    /// Handler slots.
    pub slots: u32,
    /// Answers waiting to be read.
    pub answers: u32,
    /// Request bytes held in memory.
    pub bytes: usize,
    /// Streaming requests and messages served at once.
    pub transfers: u32,
}

/// The connection pool.
pub(crate) struct Peers {
    local: PeerId,
    share_limits: ShareLimits,
    inner: Mutex<Inner>,
}

impl Peers {
    /// A pool for node `local`, giving each peer the share `share_limits`.
    pub fn new(local: PeerId, share_limits: ShareLimits) -> Self {
        Peers {
            local,
            share_limits,
            inner: Mutex::default(),
        }
    }

    /// What `peer` may hold of this node, shared by its connections.
    pub fn share(&self, peer: PeerId) -> Arc<PeerShare> {
        let mut inner = self.lock();
        let entry = inner.peers.entry(peer).or_default();
        let limits = &self.share_limits;
        entry
            .share
            .get_or_insert_with(|| PeerShare::new(limits))
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection to hand out for `peer`, if it is live.
    pub fn live(&self, peer: &PeerId) -> Option<Arc<PeerConnection>> {
        // quinn's connection lock (for `close_reason`) is taken after ours is released.
        let conn = self.lock().peers.get(peer)?.current.clone()?;
        conn.is_live().then_some(conn)
    }

    /// The last known address of `peer`.
    pub fn addr(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.lock().peers.get(peer)?.addr
    }

    /// Remembers where `peer` can be dialed. With `only_if_unknown` (an address learned
    /// from an incoming connection), keeps an address that is already known, and the
    /// entry is forgotten with the peer's last connection.
    pub fn set_addr(&self, peer: PeerId, addr: SocketAddr, only_if_unknown: bool) {
        let mut inner = self.lock();
        let entry = inner.peers.entry(peer).or_default();
        if !(only_if_unknown && entry.addr.is_some()) {
            entry.addr = Some(addr);
            entry.learned = only_if_unknown;
        }
    }

    /// The lock to hold while dialing `peer`.
    pub fn dial_lock(&self, peer: PeerId) -> Arc<tokio::sync::Mutex<()>> {
        self.lock().peers.entry(peer).or_default().dial_lock.clone()
    }

    /// Adds an established connection. If the peer already has a live one, the rule in
    /// the module docs picks which to keep; the loser is returned, already retired.
    pub fn insert(&self, new: Arc<PeerConnection>) -> Option<Arc<PeerConnection>> {
        let mut inner = self.lock();
        inner.all.insert(new.conn.stable_id(), new.clone());
        let entry = inner.peers.entry(new.peer).or_default();
        let (keep, lose) = match entry.current.take() {
            Some(old) if old.is_live() => {
                if self.prefers(&old, &new) {
                    (old, Some(new))
                } else {
                    (new, Some(old))
                }
            }
            _ => (new, None),
        };
        entry.current = Some(keep);
        if let Some(lose) = &lose {
            lose.retired.store(true, Ordering::SeqCst);
        }
        lose
    }

    /// Whether `old` survives against `new` ([`old_connection_survives`]).
    fn prefers(&self, old: &PeerConnection, new: &PeerConnection) -> bool {
        let age = old.epoch.elapsed();
        old_connection_survives(
            self.local,
            old.peer,
            old.dialer,
            new.dialer,
            age,
            old.conn.rtt(),
        )
    }

    /// Forgets a connection that has closed. Another open connection to the same peer,
    /// if any, takes over.
    pub fn remove(&self, conn: &PeerConnection) {
        let mut inner = self.lock();
        let id = conn.conn.stable_id();
        inner.all.remove(&id);
        let replacement = inner
            .all
            .values()
            .find(|c| c.peer == conn.peer && c.conn.close_reason().is_none())
            .cloned();
        if let Some(entry) = inner.peers.get_mut(&conn.peer) {
            if entry
                .current
                .as_ref()
                .is_some_and(|c| c.conn.stable_id() == id)
            {
                if let Some(replacement) = &replacement {
                    replacement.retired.store(false, Ordering::SeqCst);
                }
                entry.current = replacement;
            }
            // Forget peers that only ever dialed us, so that a stream of new PeerIds
            // (keys cost nothing to make) cannot grow this map without bound.
            if entry.current.is_none() && (entry.learned || entry.addr.is_none()) {
                inner.peers.remove(&conn.peer);
            }
        }
    }

    /// Number of peers the pool holds any state for.
    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.lock().peers.len()
    }

    /// Number of open connections (retired ones included until they close).
    pub fn connection_count(&self) -> usize {
        self.lock().all.len()
    }

    /// Every open connection.
    pub fn connections(&self) -> Vec<Arc<PeerConnection>> {
        self.lock().all.values().cloned().collect()
    }

    /// Open connections to `peer`.
    pub fn connections_to(&self, peer: &PeerId) -> Vec<Arc<PeerConnection>> {
        let inner = self.lock();
        let all = inner.all.values();
        all.filter(|c| c.peer == *peer).cloned().collect()
    }

    /// Peers with an open connection.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        let inner = self.lock();
        let mut peers: Vec<PeerId> = inner.all.values().map(|c| c.peer).collect();
        peers.sort();
        peers.dedup();
        peers
    }
}
