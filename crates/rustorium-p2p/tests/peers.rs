//! The connection pool: dial de-duplication, simultaneous dial, known peers and reconnect,
//! 0-RTT, path migration, admission limits and shutdown.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{raw_connection, test_node, WAIT};
use rustorium_p2p::{
    Bytes, ConnectError, Direction, DisconnectReason, Keypair, Node, PeerEvent, Refusal,
    RequestContext, RequestError, RequestOptions,
};
use tokio::sync::broadcast;

/// Waits (bounded) for an event matching `want`.
async fn wait_event(
    events: &mut broadcast::Receiver<PeerEvent>,
    what: &str,
    want: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if want(&event) => return event,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("event stream ended while waiting for {what}: {e}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

/// Waits until both nodes hold exactly one connection, reading their events (each node
/// emits an event after every change in its connection count).
async fn wait_single_connection(
    a: &Node,
    b: &Node,
    a_events: &mut broadcast::Receiver<PeerEvent>,
    b_events: &mut broadcast::Receiver<PeerEvent>,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.connection_count() != 1 || b.connection_count() != 1 {
        let next = async {
            tokio::select! {
                _ = a_events.recv() => {}
                _ = b_events.recv() => {}
            }
        };
        if tokio::time::timeout_at(deadline, next).await.is_err() {
            panic!(
                "connections did not settle: a has {}, b has {}",
                a.connection_count(),
                b.connection_count()
            );
        }
    }
}

// Multi-thread: the pool and admission race here, so let them race in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_an_unconnected_peer_opens_one_connection() {
    let (b, _) = test_node();
    let b = b.bind().await.unwrap();
    let a = Node::builder().bind().await.unwrap();
    let (mut a_events, mut b_events) = (a.events(), b.events());
    a.add_address(b.peer_addr());
    assert_eq!(a.connection_count(), 0);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let (a, peer) = (a.clone(), b.peer_id());
        tasks.spawn(async move { (i, a.request(peer, "echo", i.to_string()).await) });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, answer) = done.unwrap();
        assert_eq!(answer.unwrap(), i.to_string());
    }
    assert_eq!(a.connection_count(), 1);
    assert_eq!(b.connection_count(), 1);
    let is_connected = |e: &PeerEvent| matches!(e, PeerEvent::Connected { .. });
    let dialed = wait_event(&mut a_events, "a's connect event", is_connected).await;
    let expected = PeerEvent::Connected {
        peer: b.peer_id(),
        addr: b.local_addr(),
        direction: Direction::Outbound,
    };
    assert_eq!(dialed, expected);
    match wait_event(&mut b_events, "b's connect event", is_connected).await {
        PeerEvent::Connected {
            peer, direction, ..
        } => {
            assert_eq!(peer, a.peer_id());
            assert_eq!(direction, Direction::Inbound);
        }
        other => unreachable!("{other:?}"),
    }
    assert!(a_events.try_recv().is_err(), "exactly one connection event");
}

// On the single-threaded test runtime both dials start in one turn, so they race into two
// connections in most rounds (checked below).
#[tokio::test]
async fn simultaneous_dials_settle_on_one_connection_and_lose_nothing() {
    let raced = simultaneous_dial_rounds().await;
    // The test is only meaningful if dials really raced.
    assert!(raced > 0, "no round produced two connections");
}

// The same on the multi-thread runtime, where the pool's own locking runs in parallel.
// (Here the dials hardly ever race into two connections: one side's handshake is through
// before the other side's request dials. What must hold is the same: nothing lost, one
// connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_on_the_multi_thread_runtime_lose_nothing() {
    simultaneous_dial_rounds().await;
}

/// 50 rounds of two fresh nodes requesting from each other at the same moment; every
/// request answered, one connection left. One-way messages go both ways in the same race:
/// none arrives twice (a message on a connection closed as `DUPLICATE` may have run, so it
/// is never sent again) and every one whose `send` succeeded arrives. Returns how many
/// rounds raced into two.
async fn simultaneous_dial_rounds() -> usize {
    const ROUNDS: usize = 50;
    const REQUESTS: usize = 10;
    const MESSAGES: usize = 5;
    let mut rounds = tokio::task::JoinSet::new();
    for round in 0..ROUNDS {
        rounds.spawn(async move {
            let (a, mut a_notes) = test_node();
            let (b, mut b_notes) = test_node();
            let (a, b) = (
                Arc::new(a.bind().await.unwrap()),
                Arc::new(b.bind().await.unwrap()),
            );
            a.add_address(b.peer_addr());
            b.add_address(a.peer_addr());
            let (mut a_events, mut b_events) = (a.events(), b.events());
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let mut requests = tokio::task::JoinSet::new();
            // The first request each way starts at the same moment, so both sides dial.
            for i in 0..REQUESTS {
                for (from, to) in [(a.clone(), b.peer_id()), (b.clone(), a.peer_id())] {
                    let barrier = barrier.clone();
                    let body = format!("round {round} request {i} to {to}");
                    requests.spawn(async move {
                        if i == 0 {
                            barrier.wait().await;
                        }
                        let answer =
                            tokio::time::timeout(WAIT, from.request(to, "echo", body.clone()));
                        (answer.await.expect("request hung"), body)
                    });
                }
            }
            let mut sends = tokio::task::JoinSet::new();
            for i in 0..MESSAGES {
                for (from, to) in [(a.clone(), b.peer_id()), (b.clone(), a.peer_id())] {
                    let body = format!("round {round} message {i} to {to}");
                    sends.spawn(async move {
                        let sent = tokio::time::timeout(WAIT, from.send(to, "note", body.clone()));
                        (sent.await.expect("message hung").is_ok(), body)
                    });
                }
            }
            while let Some(done) = requests.join_next().await {
                let (answer, body) = done.unwrap();
                assert_eq!(answer.expect("request lost in a dial race"), body);
            }
            let mut delivered = std::collections::HashSet::new();
            while let Some(done) = sends.join_next().await {
                let (ok, body) = done.unwrap();
                if ok {
                    delivered.insert(body);
                }
            }
            assert!(!delivered.is_empty(), "no one-way message was acknowledged");
            wait_single_connection(&a, &b, &mut a_events, &mut b_events).await;
            // Every acknowledged message arrives; no message arrives twice.
            let mut received = std::collections::HashSet::new();
            let deadline = tokio::time::Instant::now() + WAIT;
            while !delivered.is_subset(&received) {
                let note = tokio::select! {
                    Some((_, body)) = a_notes.recv() => body,
                    Some((_, body)) = b_notes.recv() => body,
                    _ = tokio::time::sleep_until(deadline) => {
                        panic!("acknowledged messages never arrived")
                    }
                };
                let note = String::from_utf8(note.to_vec()).unwrap();
                assert!(received.insert(note.clone()), "{note} arrived twice");
            }
            while let Ok((_, body)) = a_notes.try_recv().or_else(|_| b_notes.try_recv()) {
                let note = String::from_utf8(body.to_vec()).unwrap();
                assert!(received.insert(note.clone()), "{note} arrived twice");
            }
            assert_eq!(a.connected_peers(), vec![b.peer_id()]);
            a.stats().duplicates_closed + b.stats().duplicates_closed
        });
    }
    let mut raced = 0;
    while let Some(done) = rounds.join_next().await {
        raced += (done.unwrap() > 0) as usize;
    }
    eprintln!("{raced} of {ROUNDS} rounds raced into two connections");
    raced
}

/// A node whose `seen` route records whether each request came as 0-RTT data, and a link
/// with a 20 ms round trip in front of it (so a request is surely sent before the
/// handshake completes).
async fn early_data_node() -> (Node, Arc<Mutex<Vec<bool>>>, rustorium_p2p_link::Link) {
    let (node, seen, _, link) = early_data_node_with_log().await;
    (node, seen, link)
}

/// Each request's `(is_early_data, is_handshake_complete)` on the `early` route, which
/// accepts early data.
type EarlyLog = Arc<Mutex<Vec<(bool, bool)>>>;

/// The early-data node, with also a route `early` registered for early data.
async fn early_data_node_with_log() -> (
    Node,
    Arc<Mutex<Vec<bool>>>,
    EarlyLog,
    rustorium_p2p_link::Link,
) {
    early_data_node_with_log_and_delay(Duration::from_millis(10)).await
}

/// As [`early_data_node_with_log`], behind a link that delays each datagram by `delay`.
async fn early_data_node_with_log_and_delay(
    delay: Duration,
) -> (
    Node,
    Arc<Mutex<Vec<bool>>>,
    EarlyLog,
    rustorium_p2p_link::Link,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let early = Arc::new(Mutex::new(Vec::new()));
    let (log, early_log) = (seen.clone(), early.clone());
    let node = Node::builder()
        .route("seen", move |ctx: RequestContext, body: Bytes| {
            // Not registered for early data: never runs before the handshake completes.
            assert!(ctx.is_handshake_complete(), "ran on unconfirmed early data");
            log.lock().unwrap().push(ctx.is_early_data());
            async move { Ok(body) }
        })
        .route("sync", |_ctx, body: Bytes| async move { Ok(body) })
        .early_data_route("early", move |ctx: RequestContext, body: Bytes| {
            early_log
                .lock()
                .unwrap()
                .push((ctx.is_early_data(), ctx.is_handshake_complete()));
            async move { Ok(body) }
        })
        .bind()
        .await
        .unwrap();
    let mut config = rustorium_p2p_link::LinkConfig::default();
    config.delay = delay;
    let link =
        rustorium_p2p_link::Link::start("127.0.0.1:0".parse().unwrap(), node.local_addr(), config)
            .await
            .unwrap();
    (node, seen, early, link)
}

#[tokio::test]
async fn a_reconnect_uses_0rtt_for_idempotent_requests_only() {
    let (b, seen, link) = early_data_node().await;
    let b_addr = rustorium_p2p::PeerAddr::new(b.peer_id(), link.local_addr());
    let a = Node::builder().bind().await.unwrap();
    let mut events = a.events();
    a.connect(&b_addr).await.unwrap();
    a.request(b.peer_id(), "seen", "first").await.unwrap(); // session tickets arrive
    assert_eq!(
        a.stats().zero_rtt_attempted,
        0,
        "first contact is a full handshake"
    );

    assert_eq!(a.disconnect(&b.peer_id()), 1);
    wait_event(&mut events, "disconnect", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;

    let idempotent = RequestOptions::new().idempotent(true);
    let answer = a
        .request_with(b.peer_id(), "seen", "again", idempotent)
        .await
        .unwrap();
    assert_eq!(answer, "again");
    // The dial went out with 0-RTT and the server took the request as early data.
    assert_eq!(a.stats().zero_rtt_attempted, 1);
    assert_eq!(*seen.lock().unwrap(), vec![false, true]);

    // A request not marked idempotent waits for the handshake: never early data.
    wait_event(&mut events, "reconnection", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    a.disconnect(&b.peer_id());
    wait_event(&mut events, "disconnect", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;
    a.request(b.peer_id(), "seen", "plain").await.unwrap();
    assert_eq!(a.stats().zero_rtt_attempted, 2);
    assert_eq!(*seen.lock().unwrap(), vec![false, true, false]);
    let stats = a.stats();
    assert_eq!(stats.zero_rtt_accepted, 2, "{stats:?}");
    assert_eq!(stats.zero_rtt_rejected, 0);
}

/// A node keeps a session ticket for as many peers as it may hold connections to (at least
/// 256), not an eighth of that (rustls counts tickets, eight per server).
#[tokio::test]
async fn tickets_are_kept_for_as_many_peers_as_connections() {
    let mut config = common::config();
    config.limits.max_connections = 16; // tickets for 256 peers
    let a = Node::builder().config(config).bind().await.unwrap();
    let mut events = a.events();
    let mut peers = Vec::new();
    // More peers than rustls's own cache kept for this configuration (256 / 8 = 32, the
    // bug this test was written for), one connection at a time.
    for _ in 0..40 {
        let peer = test_node().0.bind().await.unwrap();
        a.connect(&peer.peer_addr()).await.unwrap();
        a.request(peer.peer_id(), "echo", "x").await.unwrap(); // the tickets arrive
        assert_eq!(a.disconnect(&peer.peer_id()), 1);
        wait_event(&mut events, "disconnect", |e| {
            matches!(e, PeerEvent::Disconnected { .. })
        })
        .await;
        peers.push(peer);
    }
    // The first peer's ticket is still there: the reconnection goes out with 0-RTT.
    let idempotent = RequestOptions::new().idempotent(true);
    let first = peers[0].peer_id();
    let answer = a.request_with(first, "echo", "again", idempotent).await;
    assert_eq!(answer.unwrap(), "again");
    let stats = a.stats();
    assert_eq!(stats.zero_rtt_attempted, 1, "{stats:?}");
}

/// The server decides what runs on 0-RTT data: a route registered for early data runs
/// before the handshake completes, any other waits for it (and its handler asserts so).
#[tokio::test]
async fn only_early_data_routes_run_before_the_handshake_completes() {
    let (b, seen, early, link) = early_data_node_with_log().await;
    let b_addr = rustorium_p2p::PeerAddr::new(b.peer_id(), link.local_addr());
    let a = Node::builder().bind().await.unwrap();
    let mut events = a.events();
    a.connect(&b_addr).await.unwrap();
    a.request(b.peer_id(), "seen", "first").await.unwrap(); // session tickets arrive
    for (round, route) in ["early", "seen"].into_iter().enumerate() {
        a.disconnect(&b.peer_id());
        wait_event(&mut events, "disconnect", |e| {
            matches!(e, PeerEvent::Disconnected { .. })
        })
        .await;
        let idempotent = RequestOptions::new().idempotent(true);
        let answer = a.request_with(b.peer_id(), route, "x", idempotent).await;
        assert_eq!(answer.unwrap(), "x");
        assert_eq!(a.stats().zero_rtt_attempted, round as u64 + 1);
        wait_event(&mut events, "reconnection", |e| {
            matches!(e, PeerEvent::Connected { .. })
        })
        .await;
        // A node sends one ticket per handshake, once the dialer's Finished has reached
        // it: a round trip after the handshake brings it, for the next reconnection.
        a.request(b.peer_id(), "sync", "").await.unwrap();
    }
    // Early route: 0-RTT data, run before the handshake completed (one RTT of 20 ms).
    assert_eq!(*early.lock().unwrap(), vec![(true, false)]);
    // Other route: 0-RTT data too, but its handler ran only once the handshake completed
    // (it asserts `is_handshake_complete`).
    assert_eq!(*seen.lock().unwrap(), vec![false, true]);
}

/// A handshake gives the dialer one ticket (rustls's default is two): after a 0-RTT
/// reconnection that ends before its own ticket arrives (a round trip after the
/// handshake), the next reconnection has none and makes a full handshake.
#[tokio::test]
async fn a_handshake_gives_the_dialer_one_ticket() {
    // 50 ms each way: the resumed connection's ticket comes 100 ms after its early answer,
    // so the disconnect right after that answer comes first on a busy machine too.
    let (b, _seen, _early, link) =
        early_data_node_with_log_and_delay(Duration::from_millis(50)).await;
    let b_addr = rustorium_p2p::PeerAddr::new(b.peer_id(), link.local_addr());
    let a = Node::builder().bind().await.unwrap();
    let mut events = a.events();
    a.connect(&b_addr).await.unwrap();
    a.request(b.peer_id(), "sync", "").await.unwrap(); // the ticket arrives
    for round in 0..2u64 {
        a.disconnect(&b.peer_id());
        wait_event(&mut events, "disconnect", |e| {
            matches!(e, PeerEvent::Disconnected { .. })
        })
        .await;
        // Answered from 0-RTT data, a round trip before the new connection's ticket.
        let idempotent = RequestOptions::new().idempotent(true);
        let answer = a.request_with(b.peer_id(), "early", "x", idempotent).await;
        assert_eq!(answer.unwrap(), "x");
        assert_eq!(a.stats().zero_rtt_attempted, 1, "round {round}");
    }
}

/// A 0-RTT request whose connection closes before the handshake completes (what a
/// replayed first flight followed by a close looks like) never reaches a handler that did
/// not ask for early data.
#[tokio::test]
async fn early_data_on_a_connection_closed_before_its_handshake_runs_no_ordinary_handler() {
    let (b, seen, _early, link) = early_data_node_with_log().await;
    let b_addr = rustorium_p2p::PeerAddr::new(b.peer_id(), link.local_addr());
    let a = Node::builder().bind().await.unwrap();
    let mut events = a.events();
    a.connect(&b_addr).await.unwrap();
    a.request(b.peer_id(), "seen", "first").await.unwrap(); // session tickets arrive
    a.disconnect(&b.peer_id());
    wait_event(&mut events, "disconnect", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;

    // A 0-RTT request to `seen`; once the server has its stream (10 ms after the dial,
    // over the link), the dialer closes the connection, before the server's answer flight
    // (10 ms more) can reach it: the server sees the close before the handshake completes.
    let inbound_requests = |node: &Node| {
        let text = node.metrics_text();
        text.lines()
            .find(|l| {
                l.starts_with("rustorium_p2p_streams_opened_total")
                    && l.contains("kind=\"request\"")
                    && l.contains("direction=\"inbound\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = inbound_requests(&b);
    let (a2, to) = (a.clone(), b.peer_id());
    let idempotent = RequestOptions::new().idempotent(true);
    let request =
        tokio::spawn(async move { a2.request_with(to, "seen", "replayed", idempotent).await });
    let deadline = tokio::time::Instant::now() + WAIT;
    while inbound_requests(&b) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 0-RTT request never arrived"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(a.stats().zero_rtt_attempted, 1);
    assert_eq!(
        a.disconnect(&b.peer_id()),
        1,
        "the 0-RTT connection is closed"
    );
    // The dialer closed the connection under its request: the request fails (it is not
    // re-sent: the node closed it on purpose).
    assert!(request.await.unwrap().is_err());
    assert_eq!(a.stats().zero_rtt_attempted, 1);

    // The server gave the request held on the closed connection up (it is counted as timed
    // out) without running the handler.
    let gave_up = || {
        b.metrics_text().lines().any(|l| {
            l.contains("route=\"seen\"") && l.contains("status=\"timed_out\"") && !l.ends_with(" 0")
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !gave_up() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            b.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![false],
        "a handler ran on unconfirmed data"
    );
}

#[tokio::test]
async fn a_0rtt_dial_this_node_closes_before_its_handshake_is_no_handshake_failure() {
    let (b, _seen, link) = early_data_node().await;
    let b_addr = rustorium_p2p::PeerAddr::new(b.peer_id(), link.local_addr());
    let mut config = common::config();
    // One connection at a time: a new dial is refused until the closed connection's task
    // has finished with it (which is where a handshake failure would be counted).
    config.limits.max_connections = 1;
    let a = Node::builder().config(config).bind().await.unwrap();
    let mut events = a.events();
    a.connect(&b_addr).await.unwrap();
    a.request(b.peer_id(), "seen", "first").await.unwrap(); // session tickets arrive
    a.disconnect(&b.peer_id());
    wait_event(&mut events, "disconnect", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;

    // An idempotent request dials with 0-RTT; its handshake needs a 20 ms round trip, and
    // the connection is closed as soon as it is in the pool.
    let request = tokio::spawn({
        let (a, peer) = (a.clone(), b.peer_id());
        async move {
            let idempotent = RequestOptions::new().idempotent(true);
            a.request_with(peer, "seen", "early", idempotent).await
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.connected_peers().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no 0-RTT dial");
        tokio::task::yield_now().await;
    }
    assert_eq!(a.disconnect(&b.peer_id()), 1);
    tokio::time::timeout(WAIT, request)
        .await
        .unwrap()
        .unwrap()
        .ok();
    assert_eq!(a.stats().zero_rtt_attempted, 1);

    // Redial until the limit lets it through: the closed connection's task is done.
    loop {
        match a.request(b.peer_id(), "seen", "after").await {
            Ok(_) => break,
            Err(RequestError::Connect(ConnectError::Refused { .. })) => {
                assert!(tokio::time::Instant::now() < deadline, "still refused");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let text = a.metrics_text();
    let failed = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("rustorium_p2p_connection_errors_total{reason=\"handshake_failed\"} ")
        })
        .unwrap_or_else(|| panic!("no handshake_failed counter in {text}"));
    assert_eq!(
        failed, "0",
        "a connection closed by this node is no handshake failure"
    );
    let stats = a.stats();
    assert_eq!(stats.zero_rtt_rejected, 0, "{stats:?}");
}

#[tokio::test]
async fn a_rejected_0rtt_request_is_sent_again_and_answered_once() {
    // b1 and b2 share a key but not a session cache (b2 is b1 "restarted" elsewhere).
    let key = Keypair::generate();
    let handled = Arc::new(AtomicUsize::new(0));
    let make = |key: Keypair| {
        let handled = handled.clone();
        Node::builder()
            .keypair(key)
            .route("count", move |_ctx, body: Bytes| {
                handled.fetch_add(1, Ordering::SeqCst);
                async move { Ok(body) }
            })
            .bind()
    };
    let b1 = make(key.clone()).await.unwrap();
    let a = Node::builder().bind().await.unwrap();
    a.connect(&b1.peer_addr()).await.unwrap();
    a.request(b1.peer_id(), "count", "one").await.unwrap(); // tickets arrive
    drop(b1);

    let b2 = make(key).await.unwrap();
    a.disconnect(&b2.peer_id());
    a.add_address(b2.peer_addr());
    let idempotent = RequestOptions::new().idempotent(true);
    let answer = a
        .request_with(b2.peer_id(), "count", "two", idempotent)
        .await
        .unwrap();
    assert_eq!(answer, "two");
    let stats = a.stats();
    assert_eq!(stats.zero_rtt_attempted, 1, "{stats:?}");
    assert_eq!(stats.zero_rtt_rejected, 1, "{stats:?}");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        2,
        "each request handled exactly once"
    );
}

#[tokio::test]
async fn rebinding_mid_transfer_keeps_every_connection() {
    // b serves a 50 MB answer and tells us when it starts sending it.
    let (started_tx, started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let seen_addr = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    let log = seen_addr.clone();
    let mut config = common::config();
    config.limits.max_request_size = 64 << 20;
    config.limits.max_response_size = 64 << 20;
    config.limits.request_timeout = Duration::from_secs(60);
    let big: Bytes = (0..50_000_000u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let served = big.clone();
    let b = Node::builder()
        .config(config.clone())
        .route("big", move |_ctx, _body| {
            let (tx, body) = (started_tx.clone(), served.clone());
            async move {
                let _ = tx.send(()).await;
                Ok(body)
            }
        })
        .route("addr", move |ctx: RequestContext, body: Bytes| {
            log.lock().unwrap().push(ctx.remote_addr());
            async move { Ok(body) }
        })
        .bind()
        .await
        .unwrap();
    let a = Node::builder().config(config).bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    let old_addr = a.local_addr();

    let download = tokio::spawn({
        let (a, peer) = (a.clone(), b.peer_id());
        async move { a.request(peer, "big", "").await }
    });
    let mut started_rx = started_rx;
    tokio::time::timeout(WAIT, started_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let new_addr = a.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    assert_ne!(new_addr, old_addr);
    assert_eq!(a.local_addr(), new_addr);

    let answer = tokio::time::timeout(Duration::from_secs(60), download)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.unwrap() == big, "50 MB answer arrived intact");
    a.request(b.peer_id(), "addr", "").await.unwrap();
    assert_eq!(
        seen_addr.lock().unwrap().last(),
        Some(&new_addr),
        "b sees the new address"
    );
    assert_eq!(a.connection_count(), 1, "the same connection survived");
    assert_eq!(a.stats().rebinds, 1);
}

#[tokio::test]
async fn rebinding_during_a_thousand_requests_loses_none() {
    let handled = Arc::new(AtomicUsize::new(0));
    let (halfway_tx, mut halfway_rx) = tokio::sync::mpsc::channel::<()>(1);
    let count = handled.clone();
    let b = Node::builder()
        .route("echo", move |_ctx, body: Bytes| {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let tx = halfway_tx.clone();
            async move {
                if n == 100 {
                    let _ = tx.send(()).await;
                }
                Ok(body)
            }
        })
        .bind()
        .await
        .unwrap();
    let a = Node::builder().bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let (a, peer) = (a.clone(), b.peer_id());
        tasks.spawn(async move {
            let body = Bytes::from(format!("request {i}"));
            (a.request(peer, "echo", body.clone()).await, body)
        });
    }
    tokio::time::timeout(WAIT, halfway_rx.recv())
        .await
        .unwrap()
        .unwrap();
    a.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    while let Some(done) = tasks.join_next().await {
        let (answer, body) = done.unwrap();
        assert_eq!(answer.unwrap(), body);
    }
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1000,
        "each request handled exactly once"
    );
    assert_eq!(a.connection_count(), 1);
}

async fn client() -> Node {
    Node::builder().bind().await.unwrap()
}

// Multi-thread: the pool and admission race here, so let them race in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_limited() {
    let (b, _) = test_node();
    let mut config = common::config();
    config.limits.max_connections_per_ip = 2;
    let b = b.config(config).bind().await.unwrap();
    let (c1, c2, c3) = (client().await, client().await, client().await);
    c1.connect(&b.peer_addr()).await.unwrap();
    c2.connect(&b.peer_addr()).await.unwrap();
    let err = c3.connect(&b.peer_addr()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
    assert_eq!(b.stats().connections_refused, 1);
    assert_eq!(c1.request(b.peer_id(), "echo", "1").await.unwrap(), "1");
    assert_eq!(c2.request(b.peer_id(), "echo", "2").await.unwrap(), "2");
    // A slot frees up when a client leaves.
    let mut events = b.events();
    c1.shutdown().await;
    wait_event(&mut events, "c1 leaving", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;
    c3.connect(&b.peer_addr()).await.unwrap();
}

// Multi-thread: the pool and admission race here, so let them race in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_connections_are_limited() {
    let (b, _) = test_node();
    let mut config = common::config();
    config.limits.max_connections = 1;
    let b = b.config(config).bind().await.unwrap();
    let mut events = b.events();
    let (c1, c2) = (client().await, client().await);
    c1.connect(&b.peer_addr()).await.unwrap();
    // Once b counts c1's connection (the dialer's side of a handshake completes first)...
    wait_event(&mut events, "c1 connected", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    // ...c2 is refused.
    assert!(matches!(
        c2.connect(&b.peer_addr()).await,
        Err(ConnectError::Refused { .. })
    ));
    assert_eq!(c1.request(b.peer_id(), "echo", "ok").await.unwrap(), "ok");
    // b itself cannot dial out past its limit either.
    let d = client().await;
    b.add_address(d.peer_addr());
    assert!(matches!(
        b.request(d.peer_id(), "echo", "").await,
        Err(RequestError::Connect(ConnectError::Refused { .. }))
    ));
}

#[tokio::test]
async fn allow_and_deny_lists_refuse_with_a_clear_reason() {
    let (friend, stranger, enemy) = (client().await, client().await, client().await);
    let (b, _) = test_node();
    let mut config = common::config();
    config.node.allow = Some(HashSet::from([friend.peer_id(), enemy.peer_id()]));
    config.node.deny = HashSet::from([enemy.peer_id()]);
    let b = b.config(config).bind().await.unwrap();

    friend.connect(&b.peer_addr()).await.unwrap();
    assert_eq!(
        friend.request(b.peer_id(), "echo", "hi").await.unwrap(),
        "hi"
    );
    // Refused during the handshake, with TLS alert 49 (access denied): the stranger learns
    // it is not admitted, not which list keeps it out, and gets no session ticket.
    for who in [&stranger, &enemy] {
        let err = match who.connect(&b.peer_addr()).await {
            Ok(()) => who.request(b.peer_id(), "echo", "x").await.unwrap_err(),
            Err(e) => e.into(),
        };
        match &err {
            RequestError::Connect(ConnectError::Refused {
                reason: Refusal::DeniedByPeer,
                ..
            }) => assert!(err.to_string().contains("allow or deny list"), "{err}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        // No ticket came with the refusal, so the next dial is a full handshake.
        let again = match who.connect(&b.peer_addr()).await {
            Ok(()) => who.request(b.peer_id(), "echo", "x").await.map(drop),
            Err(e) => Err(e.into()),
        };
        assert!(again.is_err());
        assert_eq!(
            who.stats().zero_rtt_attempted,
            0,
            "a refused peer got a ticket"
        );
    }
    assert!(b.stats().connections_refused >= 4, "{:?}", b.stats());
    assert_eq!(b.connection_count(), 1);
    // b will not dial a denied peer either.
    b.add_address(enemy.peer_addr());
    let err = b.request(enemy.peer_id(), "echo", "").await.unwrap_err();
    assert!(
        matches!(err, RequestError::Connect(ConnectError::Refused { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn stalled_streams_are_cut_off_and_others_are_served() {
    let (b, _) = test_node();
    let b = b
        .request_timeout(Duration::from_millis(300))
        .bind()
        .await
        .unwrap();
    let good = client().await;
    good.connect(&b.peer_addr()).await.unwrap();

    // A raw peer opens 100 request streams, sends one header byte on each, and stalls.
    let (_endpoint, conn) = raw_connection(b.local_addr()).await;
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let (mut send, recv) = common::within("a stream", conn.open_bi()).await.unwrap();
        common::within("a header byte", send.write_all(&[5]))
            .await
            .unwrap();
        stalled.push((send, recv));
    }
    // Meanwhile the well-behaved peer is served.
    for i in 0..20 {
        assert_eq!(
            good.request(b.peer_id(), "echo", format!("{i}"))
                .await
                .unwrap(),
            format!("{i}")
        );
    }
    // Each stalled stream is reset by b once its time is up.
    for (_, mut recv) in stalled {
        let result = tokio::time::timeout(WAIT, recv.read_to_end(100))
            .await
            .unwrap();
        match result {
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                assert_eq!(code.into_inner(), 0x06, "TIMED_OUT")
            }
            other => panic!("expected a reset stream, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_is_seen_as_shutdown_by_the_peer() {
    let (a, b) = common::pair().await;
    let mut events = a.events();
    // A request answered means b's side of the handshake is complete too (a connection
    // still handshaking can only be refused with a transport-level close).
    a.request(b.peer_id(), "echo", "").await.unwrap();
    b.shutdown().await;
    let event = wait_event(&mut events, "disconnect", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;
    match event {
        PeerEvent::Disconnected { peer, reason, .. } => {
            assert_eq!(peer, b.peer_id());
            assert_eq!(reason, DisconnectReason::PeerShutdown);
        }
        other => unreachable!("{other:?}"),
    }
}

/// A node with `key` whose `who` route answers `tag`.
async fn tagged(key: &Keypair, tag: &'static str) -> Node {
    Node::builder()
        .config(common::config())
        .keypair(Keypair::from_pem(&key.to_pem()).unwrap())
        .route("who", move |_ctx, _body| async move {
            Ok(Bytes::from_static(tag.as_bytes()))
        })
        .bind()
        .await
        .unwrap()
}

/// The lower PeerId dials first; then the higher one "restarts" (a new node with its key)
/// and dials again. Within the simultaneous-dial window the lower one's connection wins;
/// past it, the newer connection wins, so a restarted peer is reachable again.
#[tokio::test]
async fn past_the_simultaneous_dial_window_the_newer_connection_wins() {
    let (k1, k2) = (Keypair::generate(), Keypair::generate());
    let (low, high) = if k1.peer_id() < k2.peer_id() {
        (k1, k2)
    } else {
        (k2, k1)
    };
    for past_window in [false, true] {
        let lower = tagged(&low, "lower").await;
        let old = tagged(&high, "old").await;
        lower.connect(&old.peer_addr()).await.unwrap();
        assert_eq!(
            lower.request(old.peer_id(), "who", "").await.unwrap(),
            "old"
        );
        if past_window {
            // The rule is about age: wait it out (the window is the behaviour under test).
            tokio::time::sleep(
                rustorium_p2p::SIMULTANEOUS_DIAL_WINDOW + Duration::from_millis(300),
            )
            .await;
        }
        let mut events = lower.events();
        let restarted = tagged(&high, "new").await;
        restarted.connect(&lower.peer_addr()).await.unwrap();
        // The lower node settles on one connection to the higher PeerId.
        let gone = wait_event(&mut events, "a duplicate closed", |e| {
            matches!(
                e,
                PeerEvent::Disconnected {
                    reason: DisconnectReason::Duplicate,
                    ..
                }
            )
        })
        .await;
        let answer = tokio::time::timeout(WAIT, lower.request(high.peer_id(), "who", ""))
            .await
            .expect("request hung")
            .unwrap();
        let expected = if past_window { "new" } else { "old" };
        assert_eq!(
            answer, expected,
            "past the window: {past_window}; closed {gone:?}"
        );
    }
}

/// A known peer that shuts down is redialed (with 0-RTT, since a ticket is at hand); those
/// redials go nowhere, and none of them may count as a reconnection: that needs a
/// completed handshake.
#[tokio::test]
async fn a_known_peer_that_is_gone_is_never_counted_as_reconnected() {
    let mut config = common::config();
    config.limits.reconnect_min_backoff = Duration::from_millis(20);
    config.limits.reconnect_max_backoff = Duration::from_millis(100);
    config.limits.connect_timeout = Duration::from_millis(300);
    config.transport.max_idle_timeout = Duration::from_millis(500);
    config.transport.keep_alive_interval = Some(Duration::from_millis(100));
    let (b, _) = test_node();
    let b = b.bind().await.unwrap();
    let a = Node::builder().config(config).bind().await.unwrap();
    let mut events = a.events();
    a.add_known_peer(b.peer_addr());
    wait_event(&mut events, "connected", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    a.request(b.peer_id(), "echo", "tickets").await.unwrap(); // session tickets arrive
    b.shutdown().await;
    drop(b);
    // The redials: wait until a 0-RTT one was made and at least two more dials after it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let dials_failed = |a: &Node| {
        a.metrics_text()
            .lines()
            .filter(|l| l.starts_with("rustorium_p2p_connection_errors_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    while !(a.stats().zero_rtt_attempted >= 1 && dials_failed(&a) >= 2.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no redials seen: {:?}",
            a.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.stats().reconnects, 0, "{:?}", a.stats());
}
