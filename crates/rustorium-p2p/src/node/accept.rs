//! Incoming connections (admission, handshake, allow/deny) and the task that serves the
//! peer's streams on every connection, whichever side dialed it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn, Instrument};

use super::admission::{Admitted, Handshake};
use super::Shared;
use crate::event::{Direction, DisconnectReason, PeerEvent};
use crate::metrics::{ConnectionFailure, StreamKind};
use crate::peers::PeerConnection;
use crate::serve::Serving;
use crate::stream_budget::StreamType;
use crate::tls;
use crate::transport_error;
use crate::wire::code;

pub(super) async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
        if shared.is_closing() {
            incoming.refuse();
            shared.metrics.connection_failed(ConnectionFailure::Refused);
            continue;
        }
        // Under load, a stranger first proves it receives at its address (a Retry costs
        // this node no state), so spoofed or silent sources cannot fill the handshakes.
        let load = shared.admission.handshakes();
        if load >= shared.config.limits.retry_threshold as usize
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            shared.metrics.retried();
            let _ = incoming.retry();
            continue;
        }
        match shared.admission.begin_handshake(remote.ip()) {
            Ok(handshake) => {
                shared
                    .io
                    .spawn(accept_one(shared.clone(), incoming, handshake));
            }
            Err(why) => {
                warn!(%remote, "refused a connection: {why}");
                shared.metrics.connection_failed(ConnectionFailure::Refused);
                incoming.refuse();
            }
        }
    }
}

async fn accept_one(shared: Arc<Shared>, incoming: quinn::Incoming, handshake: Handshake) {
    let addr = incoming.remote_address();
    let handshake_failed = |e: &quinn::ConnectionError| {
        // Our verifier refused the peer (allow/deny list) and logged it: a refusal.
        let failure = if transport_error::we_denied_access(e) {
            ConnectionFailure::Refused
        } else {
            ConnectionFailure::HandshakeFailed
        };
        shared.metrics.connection_failed(failure);
        debug!(remote = %addr, "handshake failed: {e}");
    };
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => return handshake_failed(&e),
    };
    // A resumed session names the peer at once (from its ticket), so its 0-RTT requests
    // can be served straight away (only routes that accept early data run before the
    // handshake completes). Otherwise wait for the handshake, which is where the peer's
    // certificate is checked. Either way the handshake has `handshake_timeout`; dropping
    // an unfinished one closes it.
    let limit = shared.config.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let handshaken = tokio::time::timeout_at(deadline, async {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) if tls::remote_peer_id(&conn).is_some() => {
                Ok((conn, Some(accepted)))
            }
            Ok((conn, accepted)) => {
                accepted.await;
                Ok((conn, None))
            }
            Err(connecting) => connecting.await.map(|conn| (conn, None)),
        }
    })
    .await;
    let (conn, complete) = match handshaken {
        Ok(Ok(handshaken)) => handshaken,
        Ok(Err(e)) => return handshake_failed(&e),
        Err(_) => {
            shared
                .metrics
                .connection_failed(ConnectionFailure::TimedOut);
            return debug!(remote = %addr, "handshake not complete within {limit:?}");
        }
    };
    if let Some(e) = conn.close_reason() {
        return handshake_failed(&e);
    }
    let admitted = match handshake.established() {
        Ok(admitted) => admitted,
        Err(why) => {
            warn!(remote = %addr, "refused a connection: {why}");
            shared.metrics.connection_failed(ConnectionFailure::Refused);
            conn.close(code::CLOSE_REFUSED.into(), why.to_string().as_bytes());
            return;
        }
    };
    let Some(peer) = tls::remote_peer_id(&conn) else {
        conn.close(code::CLOSE_PROTOCOL.into(), b"no certificate");
        return;
    };
    if tls::negotiated_alpn(&conn).as_deref() != Some(shared.config.node.alpn.as_bytes()) {
        conn.close(code::CLOSE_PROTOCOL.into(), b"no matching ALPN protocol");
        return debug!(remote = %addr, "closed a connection without our ALPN");
    }
    if let Err(why) = shared.config.admits(&peer) {
        warn!(peer = %peer, remote = %addr, "refused a connection: {why}");
        shared.metrics.connection_failed(ConnectionFailure::Refused);
        let reason = format!("peer {peer} refused by node {}: {why}", shared.peer_id);
        conn.close(code::CLOSE_REFUSED.into(), reason.as_bytes());
        return;
    }
    if complete.is_none() {
        // Learn where to redial a peer that dialed us (one socket per node).
        shared.peers.set_addr(peer, addr, true);
    }
    let confirmed = match complete {
        None => watch::channel(true).1,
        Some(accepted) => {
            let (tx, rx) = watch::channel(false);
            let watched = conn.clone();
            shared.io.spawn(async move {
                match tokio::time::timeout_at(deadline, accepted).await {
                    // Complete only if the handshake completed: `accepted` also resolves
                    // when the connection dies first, as a replayed flight followed by a
                    // close does, and that must not release requests held for the
                    // handshake. (On a server its value says nothing: quinn reports
                    // `accepted_0rtt` for clients only. Dropping `tx` tells the waiters
                    // the handshake never will complete.)
                    Ok(_) if watched.close_reason().is_none() => {
                        tx.send_replace(true);
                    }
                    Ok(_) => {}
                    Err(_) => watched.close(code::CLOSE_PROTOCOL.into(), b"handshake timed out"),
                }
            });
            rx
        }
    };
    let direction = Direction::Inbound;
    let conn = PeerConnection::new(
        conn,
        peer,
        direction,
        peer,
        confirmed,
        shared.config.stream_budget(&shared.streams),
        shared.peers.share(peer),
    );
    // Served in this task: a task hop here would delay the peer's 0-RTT requests.
    pool(&shared, &conn);
    serve_connection(shared, conn, admitted).await;
}

/// Puts a dialed connection in the pool (see [`pool`]) and starts serving the peer's
/// streams on it in a task of its own.
pub(super) fn register(
    shared: &Arc<Shared>,
    conn: Arc<PeerConnection>,
    admitted: Admitted,
) -> Arc<PeerConnection> {
    pool(shared, &conn);
    shared
        .io
        .spawn(serve_connection(shared.clone(), conn.clone(), admitted));
    conn
}

/// Puts an established connection in the pool and retires the loser of a simultaneous
/// dial.
fn pool(shared: &Arc<Shared>, conn: &Arc<PeerConnection>) {
    let addr = conn.conn.remote_address();
    debug!(peer = %conn.peer, %addr, direction = %conn.direction, "connection up");
    if let Some(loser) = shared.peers.insert(conn.clone()) {
        shared.metrics.duplicate_closed();
        debug!(peer = %loser.peer, "two connections to one peer: retiring one");
        let quiet = (loser.conn.rtt() * 4).max(Duration::from_millis(100));
        shared
            .io
            .spawn(async move { loser.close_when_quiet(quiet).await });
    }
}

/// Waits for the handshake of a connection dialed with 0-RTT (already in the pool, so
/// idempotent requests can use it) for up to `connect_timeout`; then announces the
/// connection. Returns `false` if it never completed. (An incoming resumed connection is
/// served at once: its ticket names the peer, and its 0-RTT requests are answered as such.)
async fn announce(shared: &Arc<Shared>, entry: &Arc<PeerConnection>) -> bool {
    if entry.direction == Direction::Outbound && !entry.is_confirmed() {
        let limit = shared.config.limits.connect_timeout;
        let confirmed = tokio::time::timeout(limit, entry.confirmed()).await;
        if !matches!(confirmed, Ok(true)) {
            shared.peers.remove(entry);
            let failure = match confirmed {
                Err(_) => {
                    let why = DisconnectReason::Lost("handshake timed out".into());
                    entry.close(why, code::CLOSE_SHUTDOWN, b"handshake timed out");
                    Some(ConnectionFailure::TimedOut)
                }
                // Closed by this node (say, `disconnect`) before the handshake was seen
                // to complete: not a failure.
                Ok(_) if entry.closed_by_us() => None,
                Ok(_) => Some(ConnectionFailure::HandshakeFailed),
            };
            if let Some(failure) = failure {
                shared.metrics.connection_failed(failure);
            }
            return false;
        }
    }
    shared.emit(PeerEvent::Connected {
        peer: entry.peer,
        addr: entry.conn.remote_address(),
        direction: entry.direction,
    });
    shared.metrics.connection_opened(entry.direction);
    let watched = (shared.clone(), entry.clone());
    shared
        .io
        .spawn(async move { watched.0.metrics.watch_connection(&watched.1.conn).await });
    true
}

/// Accepts the peer's streams on one connection until it closes, each request in its own
/// task.
async fn serve_connection(shared: Arc<Shared>, entry: Arc<PeerConnection>, admitted: Admitted) {
    if !announce(&shared, &entry).await {
        return;
    }
    let conn = &entry.conn;
    let span = tracing::debug_span!("connection", peer = %entry.peer.short(), remote = %conn.remote_address(), direction = %entry.direction);
    async {
        let reason = loop {
            tokio::select! {
                biased;
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let guard = entry.peer_stream_guard(StreamType::Bi);
                        let (shared, entry) = (shared.clone(), entry.clone());
                        // This task runs on the node's I/O runtime: so does each stream's.
                        // Boxed: tokio moves a spawned future by value several times (into
                        // its task, and when it finishes); moving a pointer beats moving the
                        // whole serving state machine (about 1.8 KB).
                        tokio::spawn(Box::pin(async move {
                            let _active = shared.metrics.stream_opened(StreamKind::Request, Direction::Inbound);
                            let closing = shared.is_closing();
                            serving(&shared, &entry).request(closing, send, recv).await;
                            drop(guard);
                        }));
                    }
                    Err(e) => break e,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let guard = entry.peer_stream_guard(StreamType::Uni);
                        let (shared, entry) = (shared.clone(), entry.clone());
                        tokio::spawn(Box::pin(async move {
                            let _active = shared.metrics.stream_opened(StreamKind::OneWay, Direction::Inbound);
                            serving(&shared, &entry).message(recv).await;
                            drop(guard);
                        }));
                    }
                    Err(e) => break e,
                },
            }
        };
        shared.peers.remove(&entry);
        // Its stream growth goes back now, whoever still holds the entry.
        entry.release_streams();
        let reason = entry.disconnect_reason(&reason);
        debug!("connection closed: {reason}");
        shared.metrics.connection_closed();
        match reason {
            DisconnectReason::IdleTimeout => shared.metrics.connection_failed(ConnectionFailure::TimedOut),
            DisconnectReason::Lost(_) => shared.metrics.connection_failed(ConnectionFailure::Lost),
            _ => {}
        }
        // Its place goes back before anyone hears of the close: whoever redials on the
        // event finds room.
        drop(admitted);
        shared.emit(PeerEvent::Disconnected {
            peer: entry.peer,
            addr: conn.remote_address(),
            direction: entry.direction,
            reason,
        });
    }
    .instrument(span)
    .await
}

/// What serving one of the peer's streams on `entry` needs.
fn serving<'a>(shared: &'a Shared, entry: &'a Arc<PeerConnection>) -> Serving<'a> {
    Serving {
        router: &shared.router,
        metrics: &shared.metrics,
        limits: &shared.serve_limits,
        slots: &shared.requests,
        answers: &shared.answers,
        transfers: &shared.transfers,
        share: &entry.share,
        bytes: &shared.bytes,
        peer: entry.peer,
        connection: entry,
        confirmed: entry.confirmed_watch(),
        closing: &shared.closing,
    }
}
