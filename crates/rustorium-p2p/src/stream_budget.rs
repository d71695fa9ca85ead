//! How many streams a peer may open at once on a connection, per direction.
//!
//! quinn keeps state for every stream the peer may open (about 70 bytes each, per
//! direction), allocated up front: a connection advertising 1,000 bidirectional and 1,000
//! unidirectional streams costs about 130 KiB before it carries a byte. So a connection
//! starts by advertising at most [`INITIAL_STREAM_LIMIT`] of each, and the limit doubles,
//! up to the configured `max_concurrent_*_streams`, whenever the peer has three quarters
//! of it in use. It is never lowered: a peer that once needed the room is likely to need
//! it again, and lowering it would not give the memory back.

use std::sync::atomic::{AtomicU32, Ordering};

/// The most streams of each direction a new connection lets the peer open at once.
pub const INITIAL_STREAM_LIMIT: u32 = 32;

/// Which kind of stream the peer opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamType {
    Bi = 0,
    Uni = 1,
}

/// The peer's streams in use and its current limits, for one connection.
#[derive(Debug)]
pub(crate) struct StreamBudget {
    active: [AtomicU32; 2],
    limit: [AtomicU32; 2],
    max: [u32; 2],
}

impl StreamBudget {
    /// A budget growing up to `max_bi` / `max_uni` (the configured limits).
    pub fn new(max_bi: u32, max_uni: u32) -> Self {
        StreamBudget {
            active: [AtomicU32::new(0), AtomicU32::new(0)],
            limit: [
                AtomicU32::new(initial_limit(max_bi)),
                AtomicU32::new(initial_limit(max_uni)),
            ],
            max: [max_bi, max_uni],
        }
    }

    /// Counts one more stream of `dir` in use. Returns the new limit to advertise when the
    /// limit should grow.
    pub fn opened(&self, dir: StreamType) -> Option<u32> {
        let d = dir as usize;
        let active = self.active[d].fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.limit[d].load(Ordering::Relaxed);
        let grown = grown_limit(limit, active, self.max[d])?;
        // Only one caller raises a given limit.
        self.limit[d]
            .compare_exchange(limit, grown, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| grown)
    }

    /// Counts a stream of `dir` as no longer in use.
    pub fn closed(&self, dir: StreamType) {
        self.active[dir as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// The limit currently advertised for `dir`.
    #[cfg(test)]
    pub fn limit(&self, dir: StreamType) -> u32 {
        self.limit[dir as usize].load(Ordering::Relaxed)
    }
}

/// What a connection advertises at first, given the configured maximum.
pub(crate) fn initial_limit(max: u32) -> u32 {
    max.min(INITIAL_STREAM_LIMIT)
}

/// The next limit once `active` streams are in use under `limit`, if it should grow.
fn grown_limit(limit: u32, active: u32, max: u32) -> Option<u32> {
    let busy = u64::from(active) * 4 >= u64::from(limit) * 3;
    (busy && limit < max).then(|| limit.saturating_mul(2).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_small_and_never_above_the_configured_maximum() {
        assert_eq!(initial_limit(1000), INITIAL_STREAM_LIMIT);
        assert_eq!(initial_limit(4), 4);
        assert_eq!(grown_limit(4, 4, 4), None);
        assert_eq!(grown_limit(32, 24, 1000), Some(64));
        assert_eq!(grown_limit(32, 23, 1000), None);
        assert_eq!(grown_limit(512, 400, 1000), Some(1000));
        assert_eq!(grown_limit(1000, 1000, 1000), None);
        assert_eq!(
            grown_limit(u32::MAX - 1, u32::MAX, u32::MAX),
            Some(u32::MAX)
        );
    }

    #[test]
    fn doubles_as_the_peer_fills_it() {
        let budget = StreamBudget::new(1000, 100);
        let mut raised = Vec::new();
        for _ in 0..1000 {
            if let Some(limit) = budget.opened(StreamType::Bi) {
                raised.push(limit);
            }
        }
        assert_eq!(raised, vec![64, 128, 256, 512, 1000]);
        assert_eq!(budget.limit(StreamType::Bi), 1000);
        assert_eq!(
            budget.limit(StreamType::Uni),
            32,
            "the other direction is untouched"
        );
        for _ in 0..1000 {
            budget.closed(StreamType::Bi);
        }
        assert_eq!(
            budget.opened(StreamType::Bi),
            None,
            "never lowered, nothing to raise"
        );
    }
}
