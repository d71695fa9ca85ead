//! Getting a connection to a peer: the pooled connection if there is one, else one
//! de-duplicated dial (with 0-RTT when a session ticket is at hand); and the loop that
//! keeps known peers connected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};

use super::accept::register;
use super::Shared;
use crate::error::{ConnectError, RequestError};
use crate::event::Direction;
use crate::identity::PeerId;
use crate::metrics::{ConnectionFailure, ZeroRtt};
use crate::peers::PeerConnection;
use crate::tls::{self, PinFailure};
use crate::transport_error;

/// The live connection to `peer`, dialing its known address if there is none. Concurrent
/// callers for one peer share a single dial.
pub(super) async fn connection_to(
    shared: &Arc<Shared>,
    peer: PeerId,
) -> Result<Arc<PeerConnection>, ConnectError> {
    if shared.is_closing() {
        return Err(ConnectError::Shutdown);
    }
    if let Some(conn) = shared.peers.live(&peer) {
        return Ok(conn);
    }
    if let Err(reason) = shared.config.admits(&peer) {
        return Err(ConnectError::Refused { peer, reason });
    }
    // No state is made for a PeerId there is no way to reach.
    if shared.peers.addr(&peer).is_none() {
        return Err(ConnectError::UnknownPeer(peer));
    }
    let lock = shared.peers.dial_lock(peer);
    let _dialing = lock.lock().await;
    if let Some(conn) = shared.peers.live(&peer) {
        return Ok(conn);
    }
    let addr = shared
        .peers
        .addr(&peer)
        .ok_or(ConnectError::UnknownPeer(peer))?;
    let admitted = shared
        .admission
        .dial()
        .map_err(|reason| ConnectError::Refused { peer, reason })?;
    let limit = shared.config.limits.connect_timeout;
    let dialed = tokio::time::timeout(limit, dial(shared, peer, addr))
        .await
        .map_err(|_| ConnectError::TimedOut {
            peer,
            addr,
            after: limit,
        })
        .and_then(|dialed| dialed);
    let (conn, confirmed) = dialed.inspect_err(|e| {
        shared.metrics.connection_failed(match e {
            ConnectError::PeerIdMismatch { .. } => ConnectionFailure::PeerIdMismatch,
            ConnectError::Refused { .. } => ConnectionFailure::Refused,
            ConnectError::TimedOut { .. } => ConnectionFailure::TimedOut,
            _ => ConnectionFailure::HandshakeFailed,
        })
    })?;
    let dialer = shared.peer_id;
    let direction = Direction::Outbound;
    let conn = PeerConnection::new(
        conn,
        peer,
        direction,
        dialer,
        confirmed,
        shared.config.stream_budget(&shared.streams),
        shared.peers.share(peer),
    );
    let entry = register(shared, conn, admitted);
    Ok(entry)
}

/// A connection ready for a request: for a request that is not idempotent, the
/// handshake must be complete (no 0-RTT).
pub(super) async fn ready_connection(
    shared: &Arc<Shared>,
    peer: PeerId,
    route: &str,
    deadline: Instant,
    timeout: Duration,
    idempotent: bool,
) -> Result<Arc<PeerConnection>, RequestError> {
    // The common case, without a timer.
    if let Some(conn) = shared.peers.live(&peer) {
        if (idempotent || conn.is_confirmed()) && !shared.is_closing() {
            return Ok(conn);
        }
    }
    let timed_out = || RequestError::Timeout {
        peer,
        route: route.to_string(),
        after: timeout,
    };
    let conn = timeout_at(deadline, connection_to(shared, peer))
        .await
        .map_err(|_| timed_out())??;
    if !idempotent && !conn.is_confirmed() {
        wait_confirmed(&conn, deadline, timeout).await?;
    }
    Ok(conn)
}

/// Waits until the connection's handshake is complete.
pub(super) async fn wait_confirmed(
    conn: &PeerConnection,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let (peer, addr) = (conn.peer, conn.conn.remote_address());
    match timeout_at(deadline, conn.confirmed()).await {
        Ok(true) => Ok(()),
        // The handshake ended without completing: the connection closed (the watcher
        // gives up only then), with `LocallyClosed` if no reason is recorded yet.
        Ok(false) => {
            let why = conn
                .conn
                .close_reason()
                .unwrap_or(quinn::ConnectionError::LocallyClosed);
            Err(transport_error::connect_error(peer, addr, why))
        }
        Err(_) => Err(ConnectError::HandshakeTimedOut {
            peer,
            addr,
            after: timeout,
        }),
    }
}

/// Dials `peer` at `addr`. With a session ticket for the peer (and 0-RTT on), the
/// connection is usable at once for idempotent requests; the returned flag turns `true`
/// when the handshake completes.
async fn dial(
    shared: &Arc<Shared>,
    peer: PeerId,
    addr: SocketAddr,
) -> Result<(quinn::Connection, watch::Receiver<bool>), ConnectError> {
    if peer == shared.peer_id {
        return Err(ConnectError::OwnPeerId { peer, addr });
    }
    shared.tls.take_failure(peer); // a stale record from an abandoned dial
    let mut connecting = shared
        .endpoint
        .connect_with(
            shared.client_config.clone(),
            addr,
            &tls::server_name_for(peer),
        )
        .map_err(|source| ConnectError::Dial { peer, addr, source })?;

    if shared.config.node.zero_rtt {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                shared.metrics.zero_rtt(ZeroRtt::Attempted);
                let (confirmed_tx, confirmed) = watch::channel(false);
                let watched = conn.clone();
                let node = shared.clone();
                shared.io.spawn(async move {
                    // `true` only once the handshake completed with the early data
                    // accepted; `false` if it was rejected or the connection ended first.
                    let accepted = accepted.await;
                    let complete = accepted || watched.close_reason().is_none();
                    if complete {
                        node.metrics.zero_rtt(if accepted {
                            ZeroRtt::Accepted
                        } else {
                            ZeroRtt::Rejected
                        });
                        confirmed_tx.send_replace(true);
                    } else {
                        // Nobody reads why this dial's certificate was refused (the
                        // connection reports its close): drop the record now.
                        node.tls.take_failure(peer);
                    }
                });
                debug!(peer = %peer, %addr, "dialed with 0-RTT");
                return Ok((conn, confirmed));
            }
            Err(full) => connecting = full,
        }
    }

    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(e) => {
            match shared.tls.take_failure(peer) {
                Some(PinFailure::Mismatch(actual)) => {
                    return Err(ConnectError::PeerIdMismatch {
                        expected: peer,
                        actual,
                        addr,
                    });
                }
                Some(PinFailure::Certificate(reason)) => {
                    return Err(ConnectError::InvalidCertificate { peer, addr, reason });
                }
                None => {}
            }
            return Err(transport_error::connect_error(peer, addr, e));
        }
    };
    if tls::negotiated_alpn(&conn).as_deref() != Some(shared.config.node.alpn.as_bytes()) {
        conn.close(
            crate::wire::code::CLOSE_PROTOCOL.into(),
            b"no matching ALPN protocol",
        );
        return Err(ConnectError::Alpn { peer, addr });
    }
    debug!(peer = %peer, %addr, "dialed");
    Ok((conn, watch::channel(true).1))
}

/// Keeps `peer` connected until the node shuts down or the task is aborted
/// ([`Node::remove_known_peer`](crate::Node::remove_known_peer)).
pub(super) async fn keep_connected(shared: Arc<Shared>, peer: PeerId) {
    let mut shutdown = shared.shutdown.subscribe();
    let (min, max) = (
        shared.config.limits.reconnect_min_backoff,
        shared.config.limits.reconnect_max_backoff,
    );
    let mut backoff = min;
    let mut last_warned = None;
    // Whether a connection to the peer completed before: each turn of the loop starts
    // only once the last connection closed, so any later one is a reconnection. (Not told
    // apart by `stable_id`: that is the address of the connection's state, which the
    // allocator may give a new connection once the old one is freed; the restart test
    // saw a reconnection go uncounted that way.)
    let mut connected_before = false;
    loop {
        let conn = tokio::select! {
            conn = connection_to(&shared, peer) => conn,
            _ = shutdown.wait_for(|closing| *closing) => return,
        };
        match conn {
            Ok(conn) => {
                // A 0-RTT dial is usable before its handshake completes, and the peer may
                // still refuse it (or be gone): it is a reconnection, counted and logged
                // once, only when its handshake completes.
                let confirmed = tokio::select! {
                    confirmed = conn.confirmed() => confirmed,
                    _ = shutdown.wait_for(|closing| *closing) => return,
                };
                if confirmed {
                    if connected_before {
                        shared.metrics.reconnected();
                        info!(peer = %peer, "reconnected to known peer");
                    }
                    connected_before = true;
                }
                let up = tokio::time::Instant::now();
                tokio::select! {
                    _ = conn.conn.closed() => {}
                    _ = shutdown.wait_for(|closing| *closing) => return,
                }
                // The backoff starts over only after a connection that lasted: a peer that
                // closes each connection at once (or never completes one) is redialed no
                // faster than one that cannot be reached.
                if confirmed && up.elapsed() >= max {
                    backoff = min;
                } else {
                    if !confirmed {
                        debug!(peer = %peer, "0-RTT redial never completed its handshake");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(next_wait(backoff, max)) => {}
                        _ = shutdown.wait_for(|closing| *closing) => return,
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
            Err(ConnectError::Shutdown) => return,
            Err(e) => {
                let wait = next_wait(backoff, max);
                // At WARN at most once per `reconnect_max_backoff` (however the peer
                // flaps): a broken peer address shows at the default log level without
                // flooding it.
                let loud = last_warned.is_none_or(|at: tokio::time::Instant| at.elapsed() >= max);
                if loud {
                    last_warned = Some(tokio::time::Instant::now());
                    warn!(peer = %peer, "cannot reach known peer ({e}); trying again in {wait:.1?}");
                } else {
                    debug!(peer = %peer, "reconnect failed ({e}); next try in {wait:?}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|closing| *closing) => return,
                }
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

/// The wait before the next try: `backoff` with jitter, never above `max` (so
/// `reconnect_max_backoff` is the longest wait, as documented).
fn next_wait(backoff: Duration, max: Duration) -> Duration {
    jitter(backoff).min(max)
}

/// `d` scaled by a random factor in [0.75, 1.25).
fn jitter(d: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut byte = [0u8; 1];
    let _ = ring::rand::SystemRandom::new().fill(&mut byte);
    d.mul_f64(0.75 + f64::from(byte[0]) / 512.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_wait_is_the_maximum_backoff() {
        let max = Duration::from_secs(30);
        for _ in 0..200 {
            assert!(next_wait(max, max) <= max);
            let wait = next_wait(Duration::from_secs(1), max);
            assert!(wait >= Duration::from_millis(750) && wait < Duration::from_millis(1250));
        }
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let d = Duration::from_millis(1000);
        for _ in 0..200 {
            let j = jitter(d);
            assert!(
                j >= Duration::from_millis(750) && j < Duration::from_millis(1250),
                "{j:?}"
            );
        }
    }
}
