//! How many streams a peer may open at once on a connection, per direction.
//!
//! quinn keeps state for every stream the peer may open (about 70 bytes each, per
//! direction), allocated up front: a connection advertising 1,000 bidirectional and 1,000
//! unidirectional streams costs about 130 KiB before it carries a byte. So a connection
//! starts by advertising at most [`INITIAL_STREAM_LIMIT`] of each, and:
//!
//! * the limit doubles, up to the configured `max_concurrent_*_streams`, whenever the peer
//!   has three quarters of it in use, as long as the node-wide pool of extra streams
//!   (`limits.max_extra_streams`, shared by every connection) has room for the growth;
//! * it halves again (never below where it started) when the peer has an eighth of it or
//!   less in use and the limit has held for [`SHRINK_HOLD`], giving the growth back to the
//!   pool (quinn allocates state only up to the new limit as the peer's streams close).
//!   The hold matters: a peer that sends requests in bursts drains to almost nothing
//!   between them, and a limit that shrank on every dip would throttle each next burst
//!   (measured: thousands of shrink-and-grow rounds per second, and a third more
//!   datagrams per request, at 64 requests in flight);
//! * a connection that closes gives all its growth back.
//!
//! So no peer can ratchet the limits up and leave them there, and all connections
//! together hold at most the pool's extra streams beyond their first ones.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most streams of each direction a new connection lets the peer open at once.
pub const INITIAL_STREAM_LIMIT: u32 = 16;

/// How long a limit holds before it may shrink.
pub const SHRINK_HOLD: Duration = Duration::from_secs(1);

/// Which kind of stream the peer opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamType {
    Bi = 0,
    Uni = 1,
}

/// Streams, beyond every connection's first ones, that the node still lets connections
/// grow into.
#[derive(Debug)]
pub(crate) struct StreamPool(AtomicU64);

impl StreamPool {
    pub fn new(extra: u64) -> Arc<Self> {
        Arc::new(StreamPool(AtomicU64::new(extra)))
    }

    /// Takes up to `want` extra streams; returns how many were taken.
    fn take(&self, want: u32) -> u32 {
        let mut left = self.0.load(Ordering::Relaxed);
        loop {
            let taken = u64::from(want).min(left);
            match self.0.compare_exchange_weak(
                left,
                left - taken,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                // `taken <= want`, a u32.
                Ok(_) => return taken as u32,
                Err(now) => left = now,
            }
        }
    }

    fn give_back(&self, n: u32) {
        self.0.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Extra streams not in use by any connection.
    #[cfg(test)]
    pub fn left(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What closing a stream does to its direction's limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Shrink {
    /// Nothing.
    No,
    /// It shrank to this: advertise it.
    Now(u32),
    /// It may shrink once it has held this much longer: [`StreamBudget::settle`] then.
    After(Duration),
}

/// The peer's streams in use and its current limits, for one connection.
#[derive(Debug)]
pub(crate) struct StreamBudget {
    active: [AtomicU32; 2],
    /// The limit advertised now, per direction (changed under the lock, read without).
    limit: [AtomicU32; 2],
    initial: [u32; 2],
    max: [u32; 2],
    pool: Arc<StreamPool>,
    /// Serialises changes of the limits.
    changing: Mutex<()>,
    /// When each limit last changed, in microseconds since `epoch`.
    changed: [AtomicU64; 2],
    epoch: Instant,
    hold: Duration,
    /// The connection has closed: its growth went back to the pool.
    released: AtomicBool,
}

impl StreamBudget {
    /// A budget growing up to `max_bi` / `max_uni` (the configured limits), with growth
    /// taken from `pool`.
    pub fn new(max_bi: u32, max_uni: u32, pool: Arc<StreamPool>) -> Self {
        let initial = [initial_limit(max_bi), initial_limit(max_uni)];
        StreamBudget {
            active: [AtomicU32::new(0), AtomicU32::new(0)],
            limit: [AtomicU32::new(initial[0]), AtomicU32::new(initial[1])],
            initial,
            max: [max_bi, max_uni],
            pool,
            changing: Mutex::new(()),
            changed: [AtomicU64::new(0), AtomicU64::new(0)],
            epoch: Instant::now(),
            hold: SHRINK_HOLD,
            released: AtomicBool::new(false),
        }
    }

    /// Microseconds since this budget was made (a clock read: only when a limit changes
    /// or may shrink, never on the common path of a stream).
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Counts one more stream of `dir` in use. Returns the new limit to advertise when the
    /// limit grows.
    pub fn opened(&self, dir: StreamType) -> Option<u32> {
        let d = dir as usize;
        let active = self.active[d].fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.limit[d].load(Ordering::Relaxed);
        grown_limit(limit, active, self.max[d])?;
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        if self.released.load(Ordering::Relaxed) {
            return None;
        }
        let limit = self.limit[d].load(Ordering::Relaxed);
        let grown = grown_limit(limit, active, self.max[d])?;
        let taken = self.pool.take(grown - limit);
        if taken == 0 {
            return None;
        }
        self.limit[d].store(limit + taken, Ordering::Relaxed);
        self.changed[d].store(self.now(), Ordering::Relaxed);
        Some(limit + taken)
    }

    /// Counts a stream of `dir` as no longer in use. Returns the new limit to advertise
    /// when the limit shrinks.
    pub fn closed(&self, dir: StreamType) -> Shrink {
        self.closed_at(dir, || self.now())
    }

    /// [`closed`](Self::closed), with `now` giving the time (read only if the limit may
    /// shrink).
    fn closed_at(&self, dir: StreamType, now: impl FnOnce() -> u64) -> Shrink {
        let d = dir as usize;
        let active = self.active[d].fetch_sub(1, Ordering::Relaxed) - 1;
        let limit = self.limit[d].load(Ordering::Relaxed);
        if shrunk_limit(limit, active, self.initial[d]).is_none() {
            return Shrink::No;
        }
        let now = now();
        let held =
            Duration::from_micros(now.saturating_sub(self.changed[d].load(Ordering::Relaxed)));
        if held < self.hold {
            return Shrink::After(self.hold - held);
        }
        self.settle_at(dir, now)
    }

    /// Shrinks the limit of `dir` as far as the streams in use now allow, if it has held
    /// long enough; else says how much longer it must hold.
    pub fn settle(&self, dir: StreamType) -> Shrink {
        self.settle_at(dir, self.now())
    }

    fn settle_at(&self, dir: StreamType, now: u64) -> Shrink {
        let d = dir as usize;
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.limit[d].load(Ordering::Relaxed);
        let active = self.active[d].load(Ordering::Relaxed);
        if shrunk_limit(before, active, self.initial[d]).is_none() {
            return Shrink::No;
        }
        let changed = self.changed[d].load(Ordering::Relaxed);
        let held = Duration::from_micros(now.saturating_sub(changed));
        if held < self.hold {
            return Shrink::After(self.hold - held);
        }
        let mut limit = before;
        while let Some(shrunk) = shrunk_limit(limit, active, self.initial[d]) {
            limit = shrunk;
        }
        self.limit[d].store(limit, Ordering::Relaxed);
        self.changed[d].store(now, Ordering::Relaxed);
        self.pool.give_back(before - limit);
        Shrink::Now(limit)
    }

    /// The limit currently advertised for `dir`.
    #[cfg(test)]
    pub fn limit(&self, dir: StreamType) -> u32 {
        self.limit[dir as usize].load(Ordering::Relaxed)
    }
}

impl StreamBudget {
    /// Gives all growth back to the pool now, for a connection that has closed (something
    /// may still hold its entry, a handler its request's context for one); it grows no
    /// more.
    pub fn release(&self) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.released.store(true, Ordering::Relaxed);
        for d in 0..2 {
            let limit = self.limit[d].swap(self.initial[d], Ordering::Relaxed);
            self.pool.give_back(limit - self.initial[d]);
        }
    }
}

impl Drop for StreamBudget {
    fn drop(&mut self) {
        for d in 0..2 {
            let grown = self.limit[d].load(Ordering::Relaxed) - self.initial[d];
            self.pool.give_back(grown);
        }
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

/// The next limit once only `active` streams are in use under `limit`, if it should
/// shrink (an eighth or less in use; never below `initial`).
fn shrunk_limit(limit: u32, active: u32, initial: u32) -> Option<u32> {
    let quiet = u64::from(active) * 8 <= u64::from(limit);
    (quiet && limit > initial).then(|| (limit / 2).max(initial))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_bi: u32, max_uni: u32, pool: u64) -> (StreamBudget, Arc<StreamPool>) {
        let pool = StreamPool::new(pool);
        (StreamBudget::new(max_bi, max_uni, pool.clone()), pool)
    }

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
        assert_eq!(shrunk_limit(1000, 125, 32), Some(500));
        assert_eq!(shrunk_limit(1000, 126, 32), None);
        assert_eq!(shrunk_limit(40, 0, 32), Some(32));
        assert_eq!(shrunk_limit(32, 0, 32), None);
    }

    #[test]
    fn doubles_as_the_peer_fills_it_and_halves_as_it_empties() {
        let (budget, pool) = budget(1000, 100, 10_000);
        let mut raised = Vec::new();
        for _ in 0..1000 {
            if let Some(limit) = budget.opened(StreamType::Bi) {
                raised.push(limit);
            }
        }
        assert_eq!(raised, vec![32, 64, 128, 256, 512, 1000]);
        assert_eq!(budget.limit(StreamType::Bi), 1000);
        assert_eq!(pool.left(), 10_000 - u64::from(1000 - INITIAL_STREAM_LIMIT));
        assert_eq!(
            budget.limit(StreamType::Uni),
            INITIAL_STREAM_LIMIT,
            "the other direction is untouched"
        );
        // Each close a second after the last: every limit has held long enough.
        let mut lowered = Vec::new();
        let mut clock = budget.now();
        for _ in 0..1000 {
            clock += SHRINK_HOLD.as_micros() as u64;
            if let Shrink::Now(limit) = budget.closed_at(StreamType::Bi, || clock) {
                lowered.push(limit);
            }
        }
        assert_eq!(lowered, vec![500, 250, 125, 62, 31, 16]);
        assert_eq!(pool.left(), 10_000, "all growth given back");
    }

    #[test]
    fn a_limit_holds_through_dips_between_bursts() {
        let (budget, _pool) = budget(1000, 100, 10_000);
        let start = budget.now();
        // A burst of 64 raises the limit to 128; it drains to nothing, and the next burst
        // comes within the hold.
        for _ in 0..64 {
            budget.opened(StreamType::Bi);
        }
        assert_eq!(budget.limit(StreamType::Bi), 128);
        let half = SHRINK_HOLD.as_micros() as u64 / 2;
        let mut later = Vec::new();
        for _ in 0..64 {
            if let Shrink::After(wait) = budget.closed_at(StreamType::Bi, || start + half) {
                later.push(wait);
            }
        }
        assert_eq!(budget.limit(StreamType::Bi), 128, "held through the dip");
        assert!(!later.is_empty(), "a shrink is due later");
        assert!(later
            .iter()
            .all(|&wait| wait <= SHRINK_HOLD / 2 + Duration::from_millis(1)));
        // Past the hold, settling shrinks it as far as the streams in use allow.
        let late = start + 2 * SHRINK_HOLD.as_micros() as u64;
        assert_eq!(
            budget.settle_at(StreamType::Bi, late),
            Shrink::Now(INITIAL_STREAM_LIMIT)
        );
        assert_eq!(budget.settle_at(StreamType::Bi, late), Shrink::No);
    }

    #[test]
    fn a_closed_connection_gives_its_growth_back_even_while_held() {
        let (budget, pool) = budget(1000, 1000, 10_000);
        for _ in 0..100 {
            budget.opened(StreamType::Bi);
        }
        assert!(pool.left() < 10_000);
        budget.release();
        assert_eq!(pool.left(), 10_000, "given back at once, not when dropped");
        assert_eq!(budget.opened(StreamType::Bi), None, "grows no more");
        drop(budget);
        assert_eq!(pool.left(), 10_000, "and not given back twice");
    }

    #[test]
    fn growth_across_connections_is_bounded_by_the_pool() {
        let pool = StreamPool::new(100);
        let a = StreamBudget::new(1000, 1000, pool.clone());
        let b = StreamBudget::new(1000, 1000, pool.clone());
        for _ in 0..1000 {
            a.opened(StreamType::Bi);
            b.opened(StreamType::Uni);
        }
        let extra = (a.limit(StreamType::Bi) - INITIAL_STREAM_LIMIT)
            + (b.limit(StreamType::Uni) - INITIAL_STREAM_LIMIT);
        assert_eq!(extra, 100, "together at most the pool");
        assert_eq!(pool.left(), 0);
        drop(a);
        drop(b);
        assert_eq!(
            pool.left(),
            100,
            "closed connections give their growth back"
        );
    }
}
