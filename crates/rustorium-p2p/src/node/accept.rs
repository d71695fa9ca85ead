//! Incoming connections (admission, handshake, allow/deny) and the task that serves the
//! peer's streams on every connection, whichever side dialed it.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use tracing::{debug, error, Instrument};

use crate::log_limit::peer_warn;

use super::admission::{Admitted, Handshake};
use super::Shared;
use crate::event::{Direction, DisconnectReason, PeerEvent};
use crate::metrics::{ConnectionFailure, StreamKind};
use crate::peers::PeerConnection;
use crate::serve::{Served, Serving};
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
                peer_warn!(shared.peer_warnings, %remote, "refused a connection: {why}");
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
            peer_warn!(shared.peer_warnings, remote = %addr, "refused a connection: {why}");
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
        peer_warn!(shared.peer_warnings, peer = %peer, remote = %addr, "refused a connection: {why}");
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
    // Read every `SAMPLE_INTERVAL` by the node's sampler (one task for all connections).
    entry.watch(&shared.metrics);
    true
}

/// Streams a connection's task finishes in one turn at most before it lets the I/O thread
/// serve other connections (their drivers send what was written meanwhile).
const STREAMS_PER_TURN: usize = 128;

/// Accepts the peer's streams on one connection until it closes, and serves them.
///
/// With the node's own I/O thread (the default) every stream is served in this task: on a
/// single-threaded runtime a task per stream would run on the same thread anyway, and
/// would cost a spawn (an aligned allocation and a trip through the scheduler) per
/// request. Without it (`io_thread = false`) each stream gets a task of its own on the
/// caller's runtime, so one connection's handlers can run on several threads.
///
/// Each turn first takes every stream the peer has opened, then serves them. The order
/// matters: the stream budget counts a peer's streams from when they are taken, and grows
/// its limit when most of it is in use. Serving each stream as it is taken would count a
/// burst of requests answered at once as one stream at a time, the limit would stay at its
/// start, and a peer with that many requests in flight would wait for the delayed
/// acknowledgement of each batch of answers (25 ms) before it could open more.
async fn serve_connection(shared: Arc<Shared>, entry: Arc<PeerConnection>, admitted: Admitted) {
    if !announce(&shared, &entry).await {
        return;
    }
    let conn = &entry.conn;
    let in_this_task = shared.config.node.io_thread;
    let span = tracing::debug_span!("connection", peer = %entry.peer.short(), remote = %conn.remote_address(), direction = %entry.direction);
    async {
        // Each stream's state machine is held in the set's own allocation for it (no box
        // of its own). The set is made when a stream comes and dropped when it empties: an
        // empty set still holds a placeholder the size of a stream's state machine (about
        // 1 KiB), which every idle connection would keep.
        let mut streams: Option<FuturesUnordered<_>> = None;
        // Kept from turn to turn: each holds its registration for new streams.
        let mut accept_bi = std::pin::pin!(conn.accept_bi());
        let mut accept_uni = std::pin::pin!(conn.accept_uni());
        let start = |stream, streams: &mut Option<FuturesUnordered<_>>| {
            if in_this_task {
                // Not polled until every stream of this turn is taken.
                let set = streams.get_or_insert_with(FuturesUnordered::new);
                set.push(Contained { stream });
            } else {
                tokio::spawn(stream);
            }
        };
        let reason = std::future::poll_fn(|cx| {
            loop {
                match accept_bi.as_mut().poll(cx) {
                    Poll::Ready(Ok((send, recv))) => {
                        accept_bi.set(conn.accept_bi());
                        start(
                            Either::Left(request_task(&shared, &entry, send, recv)),
                            &mut streams,
                        );
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => {}
                }
                match accept_uni.as_mut().poll(cx) {
                    Poll::Ready(Ok(recv)) => {
                        accept_uni.set(conn.accept_uni());
                        start(
                            Either::Right(message_task(&shared, &entry, recv)),
                            &mut streams,
                        );
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => break,
                }
            }
            // Bounded: each call of `poll_next` ends once it has polled every stream that
            // was ready, and a turn ends after `STREAMS_PER_TURN` streams have finished
            // (the connection's task then yields, and the I/O thread serves the others).
            let Some(set) = streams.as_mut() else {
                return Poll::Pending;
            };
            for _ in 0..STREAMS_PER_TURN {
                match set.poll_next_unpin(cx) {
                    Poll::Ready(Some(())) => {}
                    Poll::Ready(None) => {
                        streams = None;
                        return Poll::Pending;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        shared.peers.remove(&entry);
        // Its last statistics (its traffic since the sampler's last reading).
        entry.sample(&shared.metrics, true);
        // Its stream growth goes back now, whoever still holds the entry.
        entry.release_streams();
        let reason = entry.disconnect_reason(&reason);
        debug!("connection closed: {reason}");
        shared.metrics.connection_closed();
        match reason {
            DisconnectReason::IdleTimeout => shared
                .metrics
                .connection_failed(ConnectionFailure::TimedOut),
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
        // Streams already accepted are served to their end, as they would be in tasks of
        // their own: a message read in full still reaches its handler. Each is bounded by
        // its own deadlines.
        if let Some(mut set) = streams {
            while set.next().await.is_some() {}
        }
    }
    .instrument(span)
    .await
}

pin_project_lite::pin_project! {
    /// A stream served in its connection's task: a panic while serving it (a bug:
    /// handlers' panics are caught where they are called) ends that stream alone, as it
    /// would in a task of its own, and never the connection's task.
    struct Contained<F> {
        #[pin]
        stream: F,
    }
}

impl<F: Future<Output = ()>> Future for Contained<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let stream = self.project().stream;
        match catch_unwind(AssertUnwindSafe(|| stream.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                error!("serving a stream panicked; the stream is dropped");
                Poll::Ready(())
            }
        }
    }
}

/// Serving one of the peer's requests (a bidirectional stream), in a `request` span.
///
/// One state machine for the request, allocated once per stream: each `async fn` layer
/// between here and the handler would be another copy of it to make, so the span wraps it
/// from the outside, and the streams are lent to what serves them.
fn request_task(
    shared: &Arc<Shared>,
    entry: &Arc<PeerConnection>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> impl Future<Output = ()> + Send + 'static {
    let guard = entry.peer_stream_guard(StreamType::Bi);
    let span = tracing::debug_span!(
        "request",
        peer = %entry.peer.short(),
        stream = %send.id(),
        route = tracing::field::Empty,
        status = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    );
    let (shared, entry) = (shared.clone(), entry.clone());
    // Taken only for a streaming route.
    let mut streams = Some((send, recv));
    let serve = async move {
        let _active = shared
            .metrics
            .stream_opened(StreamKind::Request, Direction::Inbound);
        let closing = shared.is_closing();
        let served = serving(&shared, &entry)
            .request(closing, &mut streams)
            .await;
        drop(guard);
        served
    };
    Traced { span, serve }
}

pin_project_lite::pin_project! {
    /// A request's serving, run in its `request` span, which is given the route, the
    /// status and the duration when it ends (held once: a clone inside the state machine,
    /// to record them from there, would be 40 bytes more per stream).
    struct Traced<F> {
        span: tracing::Span,
        #[pin]
        serve: F,
    }
}

impl<F: Future<Output = (Served, Duration)>> Future for Traced<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let _entered = this.span.enter();
        let Poll::Ready((served, took)) = this.serve.poll(cx) else {
            return Poll::Pending;
        };
        this.span.record("route", &*served.route);
        this.span.record("status", served.outcome.as_str());
        this.span.record("duration_us", took.as_micros() as u64);
        Poll::Ready(())
    }
}

/// Serving one of the peer's one-way messages (a unidirectional stream), in a `message`
/// span; built as [`request_task`] is.
fn message_task(
    shared: &Arc<Shared>,
    entry: &Arc<PeerConnection>,
    recv: quinn::RecvStream,
) -> impl Future<Output = ()> + Send + 'static {
    let guard = entry.peer_stream_guard(StreamType::Uni);
    let span = tracing::debug_span!("message", peer = %entry.peer.short(), stream = %recv.id());
    let (shared, entry) = (shared.clone(), entry.clone());
    // Taken only for a streaming route.
    let mut recv = Some(recv);
    async move {
        let _active = shared
            .metrics
            .stream_opened(StreamKind::OneWay, Direction::Inbound);
        serving(&shared, &entry).message(&mut recv).await;
        drop(guard);
    }
    .instrument(span)
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
        bytes: &shared.bytes,
        connection: entry,
        closing: &shared.closing,
        warnings: &shared.peer_warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};

    /// A subscriber that keeps every span's name and fields, as given when it was made and
    /// as recorded later.
    #[derive(Clone, Default)]
    struct Spans(Arc<Mutex<Vec<(&'static str, Pairs)>>>);

    /// A span's fields, by name.
    type Pairs = Vec<(String, String)>;

    struct Fields<'a>(&'a mut Pairs);

    impl Visit for Fields<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name().to_string(), value.to_string()));
        }

        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }

    impl tracing::Subscriber for Spans {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }

        fn new_span(&self, attrs: &Attributes<'_>) -> Id {
            let mut spans = self.0.lock().unwrap();
            let mut fields = Vec::new();
            attrs.record(&mut Fields(&mut fields));
            spans.push((attrs.metadata().name(), fields));
            Id::from_u64(spans.len() as u64)
        }

        fn record(&self, span: &Id, values: &Record<'_>) {
            let mut spans = self.0.lock().unwrap();
            let index = usize::try_from(span.into_u64()).unwrap() - 1;
            values.record(&mut Fields(&mut spans[index].1));
        }

        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    /// README: each request's span has the peer, the stream, and, once it is served, the
    /// route, the status and the duration. (The node serves its streams on the test's
    /// thread, `io_thread = false`, where the subscriber is set.)
    #[test]
    fn a_served_request_has_its_route_status_and_duration_in_its_span() {
        let spans = Spans::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tracing::subscriber::with_default(spans.clone(), || {
            runtime.block_on(async {
                let mut config = crate::Config::default();
                config.node.listen = "127.0.0.1:0".parse().unwrap();
                config.node.io_thread = false;
                let server = crate::Node::builder()
                    .config(config.clone())
                    .route("echo", |_ctx, body| async move { Ok(body) })
                    .bind()
                    .await
                    .unwrap();
                let client = crate::Node::builder().config(config).bind().await.unwrap();
                client.connect(&server.peer_addr()).await.unwrap();
                let answer = client.request(server.peer_id(), "echo", "x").await.unwrap();
                assert_eq!(&answer[..], b"x");
                // The request's span is given its last fields when its serving ends, which
                // may be just after the answer left: bounded wait for it.
                let recorded = || {
                    let spans = spans.0.lock().unwrap();
                    spans
                        .iter()
                        .filter(|(name, _)| *name == "request")
                        .map(|(_, fields)| fields.clone())
                        .find(|fields| fields.iter().any(|(k, _)| k == "duration_us"))
                };
                let mut fields = None;
                for _ in 0..500 {
                    fields = recorded();
                    if fields.is_some() {
                        break;
                    }
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let fields = fields.expect("the request span was given its duration");
                let get = |key: &str| {
                    let found = fields.iter().find(|(k, _)| k == key);
                    found.map(|(_, v)| v.clone()).unwrap_or_default()
                };
                assert_eq!(get("route"), "echo", "{fields:?}");
                assert_eq!(get("status"), "ok", "{fields:?}");
                assert!(get("duration_us").parse::<u64>().is_ok(), "{fields:?}");
                assert_eq!(get("peer"), client.peer_id().short().to_string());
                assert!(!get("stream").is_empty(), "{fields:?}");
            })
        });
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;
        let panics: Stream = Box::pin(async { panic!("a bug while serving") });
        let fine: Stream = Box::pin(async {});
        let mut streams = FuturesUnordered::new();
        streams.push(Contained { stream: panics });
        streams.push(Contained { stream: fine });
        let mut ended = 0;
        while streams.next().await.is_some() {
            ended += 1;
        }
        assert_eq!(
            ended, 2,
            "both streams end and the task that serves them goes on"
        );
    }
}
