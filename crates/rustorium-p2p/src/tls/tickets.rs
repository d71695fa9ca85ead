//! The acceptor's session cache, bounded in bytes: each resumption ticket is an id into
//! it, holding the session's secrets and the peer's certificate, and is taken out when
//! used (so one 0-RTT flight is accepted once). When full, the oldest sessions go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

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
}
