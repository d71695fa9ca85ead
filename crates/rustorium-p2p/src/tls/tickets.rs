//! Session caches, both bounded.
//!
//! [`TicketCache`]: the acceptor's, bounded in bytes: each resumption ticket is an id into
//! it, holding the session's secrets and the peer's certificate, and is taken out when
//! used (so one 0-RTT flight is accepted once). When full, the oldest sessions go first.
//!
//! [`DialerTickets`]: the dialer's, the tickets peers it dialed gave it, bounded in peers
//! and tickets per peer.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// Per-entry overhead counted on top of key and value (map and queue bookkeeping).
const ENTRY_OVERHEAD: usize = 64;

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in the order they were stored (some may have been taken already).
    order: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// A session cache holding at most `max_bytes` of sessions.
#[derive(Debug)]
pub(crate) struct TicketCache {
    max_bytes: usize,
    entries: Mutex<Entries>,
}

impl TicketCache {
    pub fn new(max_bytes: usize) -> Self {
        TicketCache {
            max_bytes,
            entries: Mutex::default(),
        }
    }

    fn cost(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

impl rustls::server::StoresServerSessions for TicketCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let cost = Self::cost(&key, &value);
        if cost > self.max_bytes {
            return false;
        }
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = e.map.remove(&key) {
            e.bytes -= Self::cost(&key, &old);
        }
        while e.bytes + cost > self.max_bytes {
            let Some(oldest) = e.order.pop_front() else {
                break;
            };
            if let Some(old) = e.map.remove(&oldest) {
                e.bytes -= Self::cost(&oldest, &old);
            }
        }
        // Keys taken already leave stale places in `order`; keep it from growing past
        // the live entries by much.
        if e.order.len() > 2 * e.map.len() + 16 {
            let Entries { map, order, .. } = &mut *e;
            order.retain(|k| map.contains_key(k));
        }
        e.bytes += cost;
        e.order.push_back(key.clone());
        e.map.insert(key, value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.map.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let value = e.map.remove(key)?;
        e.bytes -= Self::cost(key, &value);
        Some(value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Tickets kept per peer at most. Our nodes send one per handshake, which the next dial
/// takes (0-RTT or not, it is spent once the first flight is built); a peer may send more
/// (rustls's default is two), and four bound what one peer can make this store hold.
const TICKETS_PER_PEER: usize = 4;

/// The dialer's session cache: up to [`TICKETS_PER_PEER`] tickets for each of at most
/// `max_peers` peers, the peer first stored going first when full.
///
/// Why not rustls's `ClientSessionMemoryCache`: it allocates its map for all its servers
/// up front (about 4.5 MB for 16,384 peers before a single dial), and room for eight
/// tickets with each server when the server is first stored. This one grows with the peers
/// dialed and their tickets. (A ticket's size is hidden by rustls, so the bound is in
/// tickets, not bytes: see docs/SECURITY.md.)
#[derive(Debug)]
pub(crate) struct DialerTickets {
    max_peers: usize,
    peers: Mutex<Peers>,
}

#[derive(Debug, Default)]
struct Peers {
    map: HashMap<ServerName<'static>, PeerTickets>,
    /// The map's keys, in the order they were first stored.
    order: VecDeque<ServerName<'static>>,
}

#[derive(Debug, Default)]
struct PeerTickets {
    kx_hint: Option<NamedGroup>,
    /// Oldest first.
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl DialerTickets {
    pub fn new(max_peers: usize) -> Self {
        DialerTickets {
            max_peers,
            peers: Mutex::default(),
        }
    }

    fn edit(&self, peer: ServerName<'static>, edit: impl FnOnce(&mut PeerTickets)) {
        if self.max_peers == 0 {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Peers { map, order } = &mut *peers;
        if !map.contains_key(&peer) {
            while map.len() >= self.max_peers {
                let Some(oldest) = order.pop_front() else {
                    break;
                };
                map.remove(&oldest);
            }
            order.push_back(peer.clone());
        }
        edit(map.entry(peer).or_default());
    }

    /// Peers with an entry now.
    #[cfg(test)]
    fn peers(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }
}

impl ClientSessionStore for DialerTickets {
    fn set_kx_hint(&self, peer: ServerName<'static>, group: NamedGroup) {
        self.edit(peer, |p| p.kx_hint = Some(group));
    }

    fn kx_hint(&self, peer: &ServerName<'_>) -> Option<NamedGroup> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.map.get(peer).and_then(|p| p.kx_hint)
    }

    // TLS 1.2 is never negotiated (the configurations offer TLS 1.3 only).
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, peer: ServerName<'static>, ticket: Tls13ClientSessionValue) {
        self.edit(peer, |p| {
            if p.tls13.len() >= TICKETS_PER_PEER {
                p.tls13.pop_front();
            }
            // Room for one at first: our nodes send one per handshake, and a first push
            // would make room for four (3 x 128 bytes per peer held for nothing).
            if p.tls13.capacity() == 0 {
                p.tls13.reserve_exact(1);
            }
            p.tls13.push_back(ticket);
        });
    }

    fn take_tls13_ticket(&self, peer: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.map.get_mut(peer).and_then(|p| p.tls13.pop_back())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::StoresServerSessions;

    #[test]
    fn holds_at_most_its_bytes_dropping_the_oldest_first() {
        let cache = TicketCache::new(10 * (8 + 100 + ENTRY_OVERHEAD));
        for i in 0..1000u64 {
            assert!(cache.put(i.to_be_bytes().to_vec(), vec![0; 100]));
            assert!(cache.bytes() <= 10 * (8 + 100 + ENTRY_OVERHEAD));
        }
        assert!(cache.get(&999u64.to_be_bytes()).is_some());
        assert!(cache.get(&0u64.to_be_bytes()).is_none(), "oldest dropped");
        // A ticket is used once.
        assert!(cache.take(&999u64.to_be_bytes()).is_some());
        assert!(cache.take(&999u64.to_be_bytes()).is_none());
        // Taken and replaced keys leave the books balanced.
        for i in 0..1000u64 {
            let _ = cache.take(&i.to_be_bytes());
        }
        assert_eq!(cache.bytes(), 0);
        assert!(
            !cache.put(vec![0; 8], vec![0; 10_000]),
            "larger than the whole cache"
        );
    }

    #[test]
    fn the_dialer_keeps_at_most_its_peers_dropping_the_first_stored() {
        let tickets = DialerTickets::new(3);
        let name = |i: u32| ServerName::try_from(format!("p{i}.example")).unwrap();
        for i in 0..10 {
            tickets.set_kx_hint(name(i), NamedGroup::X25519);
            assert!(tickets.peers() <= 3);
        }
        assert_eq!(tickets.peers(), 3);
        assert_eq!(tickets.kx_hint(&name(9)), Some(NamedGroup::X25519));
        assert_eq!(
            tickets.kx_hint(&name(6)),
            None,
            "first stored, first dropped"
        );
        // Touching a peer again does not make room by dropping it.
        tickets.set_kx_hint(name(9), NamedGroup::X25519);
        assert_eq!(tickets.peers(), 3);
        assert_eq!(DialerTickets::new(0).kx_hint(&name(1)), None);
        DialerTickets::new(0).set_kx_hint(name(1), NamedGroup::X25519);
    }
}
