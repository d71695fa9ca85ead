//! Admission: how many connections and handshakes the node holds, and from where.
//!
//! * Established connections, both directions, count against `max_connections`.
//! * Incoming handshakes in progress count against `max_handshakes`, apart from
//!   established connections: a flood of half-open handshakes can fill only its own
//!   budget, never the room this node's own dials and known-peer reconnects need.
//! * Incoming handshakes and connections count per address prefix (IPv4 /32 and IPv6 /64
//!   by default) against `max_connections_per_ip`.
//!
//! Each admitted handshake or connection is a guard that gives its place back when
//! dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Limits;
use crate::error::Refusal;

/// The address prefix `ip` counts under: its first `v4` (IPv4) or `v6` (IPv6) bits. An
/// IPv4-mapped IPv6 address counts as the IPv4 address it maps.
pub(crate) fn prefix(ip: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match ip {
        IpAddr::V6(addr) if addr.to_ipv4_mapped().is_some() => match addr.to_ipv4_mapped() {
            Some(mapped) => prefix(IpAddr::V4(mapped), v4, v6),
            None => ip,
        },
        IpAddr::V4(addr) => {
            let bits = u32::from(addr);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(addr) => {
            let bits = u128::from(addr);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

#[derive(Default)]
struct Counts {
    established: usize,
    handshakes: usize,
    /// Incoming handshakes and connections per prefix.
    per_prefix: HashMap<IpAddr, usize>,
    /// Incoming handshakes per prefix.
    handshakes_per_prefix: HashMap<IpAddr, usize>,
}

/// Takes one from `prefix`'s count in `map`, forgetting it at zero.
fn release(map: &mut HashMap<IpAddr, usize>, prefix: IpAddr) {
    if let Some(n) = map.get_mut(&prefix) {
        *n -= 1;
        if *n == 0 {
            map.remove(&prefix);
        }
    }
}

/// The node's admission counts and limits.
pub(crate) struct Admission {
    max_connections: usize,
    max_handshakes: usize,
    max_per_prefix: usize,
    max_handshakes_per_prefix: usize,
    v4: u8,
    v6: u8,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Admission {
            max_connections: limits.max_connections as usize,
            max_handshakes: limits.max_handshakes as usize,
            max_per_prefix: limits.max_connections_per_ip as usize,
            max_handshakes_per_prefix: limits.max_handshakes_per_ip as usize,
            v4: limits.ipv4_prefix,
            v6: limits.ipv6_prefix,
            counts: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether established connections are at `max_connections`.
    pub fn is_full(&self) -> bool {
        self.lock().established >= self.max_connections
    }

    /// Incoming handshakes in progress.
    pub fn handshakes(&self) -> usize {
        self.lock().handshakes
    }

    /// Counts an incoming handshake from `ip`, unless a limit is reached.
    pub fn begin_handshake(self: &Arc<Self>, ip: IpAddr) -> Result<Handshake, Refusal> {
        let mut counts = self.lock();
        if counts.established >= self.max_connections {
            return Err(Refusal::ConnectionLimit);
        }
        if counts.handshakes >= self.max_handshakes {
            return Err(Refusal::HandshakeLimit);
        }
        let prefix = prefix(ip, self.v4, self.v6);
        let in_progress = counts.handshakes_per_prefix.get(&prefix).copied();
        if in_progress.unwrap_or(0) >= self.max_handshakes_per_prefix {
            return Err(Refusal::AddressLimit);
        }
        let per_prefix = counts.per_prefix.entry(prefix).or_default();
        if *per_prefix >= self.max_per_prefix {
            return Err(Refusal::AddressLimit);
        }
        *per_prefix += 1;
        *counts.handshakes_per_prefix.entry(prefix).or_default() += 1;
        counts.handshakes += 1;
        Ok(Handshake {
            admission: self.clone(),
            prefix: Some(prefix),
        })
    }

    /// Counts a connection this node dials, unless `max_connections` is reached.
    pub fn dial(self: &Arc<Self>) -> Result<Admitted, Refusal> {
        let mut counts = self.lock();
        if counts.established >= self.max_connections {
            return Err(Refusal::ConnectionLimit);
        }
        counts.established += 1;
        Ok(Admitted {
            admission: self.clone(),
            prefix: None,
        })
    }
}

/// An incoming handshake in progress; gives its place back when dropped.
pub(crate) struct Handshake {
    admission: Arc<Admission>,
    /// `None` once turned into an [`Admitted`] connection.
    prefix: Option<IpAddr>,
}

impl Handshake {
    /// The handshake completed: the connection now counts as established (and still
    /// against its prefix), unless `max_connections` was reached meanwhile.
    pub fn established(mut self) -> Result<Admitted, Refusal> {
        let admission = self.admission.clone();
        let mut counts = admission.lock();
        if counts.established >= admission.max_connections {
            return Err(Refusal::ConnectionLimit); // `self` drops: both counts released
        }
        counts.handshakes -= 1;
        counts.established += 1;
        let prefix = self.prefix.take();
        if let Some(prefix) = prefix {
            release(&mut counts.handshakes_per_prefix, prefix);
        }
        Ok(Admitted {
            admission: admission.clone(),
            prefix,
        })
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Some(prefix) = self.prefix {
            let mut counts = self.admission.lock();
            counts.handshakes -= 1;
            release(&mut counts.per_prefix, prefix);
            release(&mut counts.handshakes_per_prefix, prefix);
        }
    }
}

/// One established connection; gives its place back when dropped.
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    prefix: Option<IpAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.established -= 1;
        if let Some(prefix) = self.prefix {
            release(&mut counts.per_prefix, prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: u32, handshakes: u32, per_ip: u32) -> Limits {
        Limits {
            max_connections: connections,
            max_handshakes: handshakes,
            max_connections_per_ip: per_ip,
            max_handshakes_per_ip: per_ip,
            ..Limits::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn prefixes_mask_the_host_part() {
        assert_eq!(prefix(ip("10.1.2.3"), 32, 64), ip("10.1.2.3"));
        assert_eq!(prefix(ip("10.1.2.3"), 24, 64), ip("10.1.2.0"));
        assert_eq!(
            prefix(ip("2001:db8:1:2:3:4:5:6"), 32, 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            prefix(ip("2001:db8:1:2:3:4:5:6"), 32, 128),
            ip("2001:db8:1:2:3:4:5:6")
        );
        assert_eq!(prefix(ip("::ffff:10.1.2.3"), 24, 64), ip("10.1.2.0"));
    }

    #[test]
    fn half_open_handshakes_never_take_the_room_of_dials() {
        let admission = Admission::new(&limits(2, 3, 100));
        let held: Vec<_> = (0..3)
            .map(|i| {
                admission
                    .begin_handshake(ip(&format!("10.0.0.{i}")))
                    .unwrap()
            })
            .collect();
        assert!(matches!(
            admission.begin_handshake(ip("10.0.1.1")),
            Err(Refusal::HandshakeLimit)
        ));
        // This node's own dials still go out.
        let a = admission.dial().unwrap();
        let b = admission.dial().unwrap();
        assert!(matches!(admission.dial(), Err(Refusal::ConnectionLimit)));
        drop((a, b, held));
        assert_eq!(admission.handshakes(), 0);
        assert_eq!(admission.lock().established, 0);
        assert!(admission.lock().per_prefix.is_empty());
    }

    #[test]
    fn a_completed_handshake_counts_as_a_connection_and_against_its_prefix() {
        let admission = Admission::new(&limits(1, 10, 2));
        let first = admission.begin_handshake(ip("10.0.0.1")).unwrap();
        let second = admission.begin_handshake(ip("10.0.0.1")).unwrap();
        assert!(matches!(
            admission.begin_handshake(ip("10.0.0.1")),
            Err(Refusal::AddressLimit)
        ));
        let conn = first.established().unwrap();
        assert!(matches!(
            second.established(),
            Err(Refusal::ConnectionLimit)
        ));
        assert_eq!(admission.handshakes(), 0);
        // The established one still holds its prefix place.
        assert_eq!(admission.lock().per_prefix.get(&ip("10.0.0.1")), Some(&1));
        drop(conn);
        assert!(admission.lock().per_prefix.is_empty());
        assert_eq!(admission.lock().established, 0);
    }

    #[test]
    fn one_prefix_holds_only_its_share_of_the_handshakes() {
        let mut l = limits(100, 100, 50);
        l.max_handshakes_per_ip = 2;
        let admission = Admission::new(&l);
        let a = admission.begin_handshake(ip("10.0.0.1")).unwrap();
        let _b = admission.begin_handshake(ip("10.0.0.1")).unwrap();
        assert!(matches!(
            admission.begin_handshake(ip("10.0.0.1")),
            Err(Refusal::AddressLimit)
        ));
        // Another prefix is not affected; a completed handshake frees its place.
        admission.begin_handshake(ip("10.0.0.2")).unwrap();
        let _conn = a.established().unwrap();
        admission.begin_handshake(ip("10.0.0.1")).unwrap();
        assert!(admission.lock().handshakes_per_prefix.len() <= 2);
    }
}
