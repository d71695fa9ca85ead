//! Pure decisions of the connection pool and the requester, apart from any I/O so they
//! can be tested (and read) alone.

use std::time::Duration;

use crate::identity::PeerId;

/// Two connections to one peer whose older one is younger than this (or than 8 round
/// trips, if longer) come from a simultaneous dial.
pub const SIMULTANEOUS_DIAL_WINDOW: Duration = Duration::from_secs(2);

/// The simultaneous-dial rule: whether the `old` connection to `peer` survives against a
/// `new` one. In a simultaneous dial (the old one is younger than the window) the
/// connection dialed by the lower PeerId wins; otherwise, and between two connections from
/// the same dialer, the newer one wins (the peer dialed again because it lost the old one,
/// for example after a restart). Both ends reach the same answer.
pub(crate) fn old_connection_survives(
    local: PeerId,
    peer: PeerId,
    old_dialer: PeerId,
    new_dialer: PeerId,
    old_age: Duration,
    rtt: Duration,
) -> bool {
    let window = SIMULTANEOUS_DIAL_WINDOW.max(rtt * 8);
    let lower = local.min(peer);
    old_age < window && old_dialer == lower && new_dialer != lower
}

/// Why a request or message failed without the peer having processed it, as far as the
/// requester can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interruption {
    /// The peer rejected the 0-RTT data it travelled in: it never reached a handler.
    ZeroRttRejected,
    /// The peer closed the connection as the loser of a simultaneous dial. It closes a
    /// duplicate only once no stream is in progress on it, so a request it never
    /// answered never ran; a one-way message may have run (it has no answer to wait for).
    DuplicateClosed,
}

/// How many times one request or message is tried at most.
pub(crate) const MAX_TRIES: u32 = 3;

/// Whether a request (or, with `one_way`, a message) interrupted by `why` is sent again.
pub(crate) fn may_resend(one_way: bool, why: Interruption, tries: u32) -> bool {
    tries < MAX_TRIES
        && match why {
            Interruption::ZeroRttRejected => true,
            Interruption::DuplicateClosed => !one_way,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (PeerId, PeerId) {
        let (a, b) = (PeerId::from_bytes([1; 32]), PeerId::from_bytes([2; 32]));
        (a, b) // a < b
    }

    #[test]
    fn in_a_simultaneous_dial_both_ends_keep_the_lower_peers_connection() {
        let (low, high) = ids();
        let young = Duration::from_millis(10);
        let rtt = Duration::from_millis(1);
        // On the lower node: old dialed by itself, new dialed by the peer -> keep old.
        assert!(old_connection_survives(low, high, low, high, young, rtt));
        // On the higher node: old dialed by the lower peer, new by itself -> keep old.
        assert!(old_connection_survives(high, low, low, high, young, rtt));
        // The other order of arrival: old dialed by the higher -> the new (lower) wins.
        assert!(!old_connection_survives(low, high, high, low, young, rtt));
        assert!(!old_connection_survives(high, low, high, low, young, rtt));
    }

    #[test]
    fn outside_the_window_or_from_one_dialer_the_newer_wins() {
        let (low, high) = ids();
        let rtt = Duration::from_millis(1);
        let old = SIMULTANEOUS_DIAL_WINDOW + Duration::from_millis(1);
        assert!(!old_connection_survives(low, high, low, high, old, rtt));
        let young = Duration::from_millis(10);
        assert!(!old_connection_survives(low, high, low, low, young, rtt));
        // A long round trip widens the window to 8 RTTs.
        let slow = Duration::from_millis(500);
        assert!(old_connection_survives(low, high, low, high, old, slow));
    }

    #[test]
    fn only_what_never_ran_is_resent() {
        assert!(may_resend(false, Interruption::ZeroRttRejected, 1));
        assert!(may_resend(true, Interruption::ZeroRttRejected, 1));
        assert!(may_resend(false, Interruption::DuplicateClosed, 2));
        assert!(!may_resend(true, Interruption::DuplicateClosed, 1));
        assert!(!may_resend(false, Interruption::ZeroRttRejected, MAX_TRIES));
    }
}
