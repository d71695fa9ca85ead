//! Warnings that a peer's doing can cause (a refused connection, a dropped one-way
//! message), at most one a second from each source: the node's serving and accepting
//! share one [`Rarely`], its TLS verifier has its own.
//!
//! A stranger that opens streams or connections as fast as it can would otherwise make
//! the node write a WARN line for each one: its log, and the disk under it, are a resource
//! too. Past the first in a second, the same lines go out at DEBUG; the metrics still
//! count every refusal.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How often a peer-caused warning may be logged at WARN.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// Lets one warning through per [`INTERVAL`].
#[derive(Debug)]
pub(crate) struct Rarely {
    epoch: Instant,
    /// When the next warning may go out, in milliseconds since `epoch`.
    next: AtomicU64,
}

impl Default for Rarely {
    fn default() -> Self {
        Rarely {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
        }
    }
}

impl Rarely {
    /// Whether a warning may go out now (and so none may for [`INTERVAL`]).
    pub fn allow(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.allow_at(now)
    }

    /// [`allow`](Self::allow) at `now` milliseconds since the epoch.
    fn allow_at(&self, now: u64) -> bool {
        let next = self.next.load(Relaxed);
        let interval = INTERVAL.as_millis() as u64;
        now >= next
            && self
                .next
                .compare_exchange(next, now.saturating_add(interval), Relaxed, Relaxed)
                .is_ok()
    }
}

/// `warn!` when `$rarely` allows it, else `debug!`, with the same fields and message.
macro_rules! peer_warn {
    ($rarely:expr, $($arg:tt)+) => {
        if $rarely.allow() {
            ::tracing::warn!($($arg)+)
        } else {
            ::tracing::debug!($($arg)+)
        }
    };
}
pub(crate) use peer_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_a_second() {
        let rarely = Rarely::default();
        assert!(rarely.allow_at(0));
        assert!(!rarely.allow_at(0));
        assert!(!rarely.allow_at(999));
        assert!(rarely.allow_at(1000));
        assert!(!rarely.allow_at(1500));
        assert!(rarely.allow_at(5000), "after a quiet spell, at once");
        assert!(!rarely.allow_at(5999));
    }
}
