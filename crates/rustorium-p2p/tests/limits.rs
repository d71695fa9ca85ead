//! Per-peer accounting: each test attacks one resource a stranger can make a node spend
//! (handshakes, handler slots, answers waiting for credit, early data) while a good peer
//! is served alongside, and checks the limit that bounds it.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, raw_client, test_node, ClientCert, WAIT};
use rustorium_p2p::{Bytes, Node};

/// A stranger that sends the first flight of a QUIC handshake from `from` (a fresh UDP
/// port) and then goes silent: a half-open handshake. The socket is returned so that it
/// stays bound (no ICMP errors reach the node).
fn half_open(server: SocketAddr, from: IpAddr) -> UdpSocket {
    let socket = UdpSocket::bind((from, 0)).unwrap();
    let (_endpoint, config) = raw_client(ClientCert::Ed25519, b"rustorium");
    drop(_endpoint);
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let (_, mut conn) = endpoint
        .connect(Instant::now(), config, server, "rustorium")
        .unwrap();
    let mut buf = Vec::new();
    while let Some(transmit) = conn.poll_transmit(Instant::now(), 1, &mut buf) {
        socket.send_to(&buf[..transmit.size], server).unwrap();
        buf.clear();
    }
    socket
}

/// A good peer: connects, and gets every one of `n` echo requests answered.
async fn good_peer_is_served(server: &Node, n: usize) -> Node {
    let good = Node::builder().bind().await.unwrap();
    tokio::time::timeout(WAIT, good.connect(&server.peer_addr()))
        .await
        .expect("good peer not connected in time")
        .unwrap_or_else(|e| panic!("good peer refused: {e}"));
    for i in 0..n {
        let answer = good.request(server.peer_id(), "echo", i.to_string()).await;
        assert_eq!(answer.unwrap(), i.to_string());
    }
    good
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_lock_out_neither_good_peers_nor_own_dials() {
    let (server, _) = test_node();
    let mut config = common::config();
    config.limits.max_connections = 16;
    config.limits.max_handshakes = 16;
    config.limits.retry_threshold = 8;
    config.limits.handshake_timeout = Duration::from_secs(1);
    let server = server.config(config).bind().await.unwrap();
    let target = server.local_addr();

    // 40 half-open handshakes from 4 source addresses (what locked a node before).
    let mut silent = Vec::new();
    for i in 0..40 {
        let from: IpAddr = format!("127.0.0.{}", 2 + i % 4).parse().unwrap();
        silent.push(half_open(target, from));
    }
    // The node holds `retry_threshold` of them; the other 32 were asked to prove their
    // address and, being silent, cost nothing more. (Without the Retry, the good peer
    // below is refused: checked when this test was written.)
    eventually("32 retries", || server.stats().retries >= 32).await;
    let good = good_peer_is_served(&server, 10).await;

    // The node's own dial goes out while the half-open handshakes are held.
    let (other, _) = test_node();
    let other = other.bind().await.unwrap();
    server.add_address(other.peer_addr());
    assert_eq!(
        server
            .request(other.peer_id(), "echo", "out")
            .await
            .unwrap(),
        "out"
    );

    // Past handshake_timeout the half-open handshakes are gone.
    eventually("half-open handshakes timed out", || {
        server
            .metrics_text()
            .contains("rustorium_p2p_connection_errors_total{reason=\"timed_out\"} 8")
    })
    .await;
    drop(silent);
    drop(good);
}

#[tokio::test]
async fn the_per_address_limit_counts_whole_prefixes() {
    let (server, _) = test_node();
    let mut config = common::config();
    config.limits.max_connections_per_ip = 4;
    config.limits.ipv4_prefix = 24;
    config.limits.retry_threshold = 1000; // no Retry: count raw handshakes
    config.limits.handshake_timeout = Duration::from_secs(2);
    let server = server.config(config).bind().await.unwrap();
    let target = server.local_addr();
    // Five sources in 127.0.0.0/24: the fifth is refused.
    let silent: Vec<_> = (2..7)
        .map(|host| half_open(target, format!("127.0.0.{host}").parse().unwrap()))
        .collect();
    eventually("the fifth refused", || {
        server.stats().connections_refused >= 1
    })
    .await;
    // A peer from another /24 is served.
    let good = Node::builder()
        .listen("127.0.1.1:0".parse().unwrap())
        .bind()
        .await
        .unwrap();
    good.connect(&server.peer_addr()).await.unwrap();
    assert_eq!(
        good.request(server.peer_id(), "echo", "x").await.unwrap(),
        "x"
    );
    drop(silent);
}

// Multi-thread: the pool and admission race here, so let them race in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_handler_slot() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let (builder, _) = test_node();
    let (g, r) = (gate.clone(), running.clone());
    let mut config = common::config();
    config.limits.max_concurrent_requests = 16;
    config.limits.max_concurrent_requests_per_peer = 4;
    let server = builder
        .config(config)
        .route("hold", move |_ctx, _body| {
            let (gate, running) = (g.clone(), r.clone());
            async move {
                running.fetch_add(1, Ordering::SeqCst);
                let _ = gate.acquire().await;
                Ok(Bytes::new())
            }
        })
        .bind()
        .await
        .unwrap();
    // A greedy peer opens 16 requests that never finish on their own.
    let greedy = Node::builder().bind().await.unwrap();
    greedy.connect(&server.peer_addr()).await.unwrap();
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (greedy, peer) = (greedy.clone(), server.peer_id());
        held.spawn(async move { greedy.request(peer, "hold", "").await });
    }
    // Four run; the other twelve are answered BUSY at once.
    let mut busy = 0;
    for _ in 0..12 {
        let done = tokio::time::timeout(WAIT, held.join_next())
            .await
            .unwrap()
            .unwrap();
        match done.unwrap() {
            Err(rustorium_p2p::RequestError::Remote {
                status: rustorium_p2p::Status::Busy,
                ..
            }) => busy += 1,
            other => panic!("expected BUSY, got {other:?}"),
        }
    }
    assert_eq!(busy, 12);
    assert_eq!(running.load(Ordering::SeqCst), 4);
    // Another peer is served meanwhile.
    good_peer_is_served(&server, 10).await;
    gate.add_permits(16);
    while let Some(done) = held.join_next().await {
        done.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_peer_that_never_grants_credit_holds_no_handler_slot_and_is_cut_off() {
    let (builder, _) = test_node();
    let mut config = common::config();
    config.limits.max_concurrent_requests = 4;
    config.limits.answer_timeout = Duration::from_millis(300);
    config.limits.max_pending_answers_per_peer = 4;
    let server = builder.config(config).bind().await.unwrap();

    // A stranger whose streams advertise a receive window of zero: no answer can reach it.
    let (endpoint, mut client) = raw_client(ClientCert::Ed25519, b"rustorium");
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(0));
    client.transport_config(Arc::new(transport));
    let conn = endpoint
        .connect_with(client, server.local_addr(), "rustorium")
        .unwrap()
        .await
        .unwrap();
    let mut request = rustorium_p2p::wire::encode_header("echo");
    request.extend_from_slice(&[7u8; 64]);
    let mut unread = Vec::new();
    for _ in 0..16 {
        let (mut send, recv) = tokio::time::timeout(WAIT, conn.open_bi())
            .await
            .expect("no stream credit in time")
            .unwrap();
        common::within("a request", send.write_all(&request))
            .await
            .unwrap();
        send.finish().unwrap();
        unread.push((send, recv));
    }

    // A good peer is served meanwhile: the stranger's unread answers hold no slot.
    good_peer_is_served(&server, 20).await;

    // The stranger loses its connection, with a code that says why.
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("not cut off");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(0x04));
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("unread"), "{reason}");
        }
        other => panic!("expected a LIMIT close, got {other:?}"),
    }
    assert!(
        server.stats().answers_abandoned >= 4,
        "{:?}",
        server.stats()
    );
    good_peer_is_served(&server, 5).await;
}

#[tokio::test]
async fn an_answer_past_the_share_of_unread_answers_is_reset_with_busy() {
    let (builder, _) = test_node();
    let mut config = common::config();
    config.limits.max_pending_answers_per_peer = 2;
    config.limits.answer_timeout = Duration::from_secs(5);
    let server = builder.config(config).bind().await.unwrap();
    // A peer that reads no answer (a receive window of zero on its streams).
    let (endpoint, mut client) = raw_client(ClientCert::Ed25519, b"rustorium");
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(0));
    client.transport_config(Arc::new(transport));
    let conn = tokio::time::timeout(
        WAIT,
        endpoint
            .connect_with(client, server.local_addr(), "rustorium")
            .unwrap(),
    )
    .await
    .expect("no handshake in time")
    .unwrap();
    let mut request = rustorium_p2p::wire::encode_header("echo");
    request.extend_from_slice(&[7u8; 64]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut send, recv) = common::within("a stream", conn.open_bi()).await.unwrap();
        common::within("a request", send.write_all(&request))
            .await
            .unwrap();
        send.finish().unwrap();
        held.push((send, recv));
    }
    // Two answers wait unread; the server knows of both once each handler has run.
    eventually("two answers pending", || {
        server.stats().answers_abandoned == 0 && {
            let text = server.metrics_text();
            text.lines()
                .any(|l| l.starts_with("rustorium_p2p_streams_active ") && l.ends_with(" 2"))
        }
    })
    .await;
    // The third is over the share: its stream is reset with BUSY (0x05) at once.
    let (mut send, mut recv) = common::within("a stream", conn.open_bi()).await.unwrap();
    common::within("a request", send.write_all(&request))
        .await
        .unwrap();
    send.finish().unwrap();
    let reset = tokio::time::timeout(WAIT, recv.received_reset())
        .await
        .expect("no reset in time");
    match reset {
        Ok(Some(code)) => assert_eq!(code.into_inner(), 0x05, "BUSY"),
        other => panic!("expected a BUSY reset, got {other:?}"),
    }
    drop(held);
}

#[tokio::test]
async fn unfinished_bodies_over_many_connections_stay_within_the_byte_budget() {
    const NODE: u64 = 4 << 20;
    const PEER: u64 = 1 << 20;
    let (builder, _) = test_node();
    let mut config = common::config();
    config.limits.max_request_size = 1 << 20;
    config.limits.max_buffered_request_bytes_per_peer = PEER + 1;
    config.limits.max_buffered_request_bytes = NODE;
    let server = builder.config(config).bind().await.unwrap();

    // Ten strangers, each with two requests of 1 MiB of which they send 900 KiB and
    // never the rest: 18 MiB that the node would otherwise hold.
    let mut strangers = Vec::new();
    for _ in 0..10 {
        let (endpoint, conn) = common::raw_connection(server.local_addr()).await;
        for _ in 0..2 {
            let (mut send, recv) = common::within("a stream", conn.open_bi()).await.unwrap();
            let mut head = rustorium_p2p::wire::encode_header("echo");
            head.extend_from_slice(&vec![1u8; 900 << 10]);
            // Written in the background: flow control stops it when the node stops reading.
            tokio::spawn(async move {
                let _ = send.write_all(&head).await;
                let _keep = (send, recv);
                std::future::pending::<()>().await;
            });
        }
        strangers.push((endpoint, conn));
    }
    // The node fills its budget, and holds no more than it.
    eventually("the budget filled", || {
        server.stats().buffered_request_bytes >= NODE - (PEER + 1)
    })
    .await;
    assert!(
        server.stats().buffered_request_bytes <= NODE,
        "{:?}",
        server.stats()
    );

    // A good peer's requests are answered meanwhile.
    good_peer_is_served(&server, 20).await;
    assert!(
        server.stats().buffered_request_bytes <= NODE,
        "{:?}",
        server.stats()
    );
    drop(strangers);
}

/// Held requests on the `hold` route of a node, released all at once.
struct Holds {
    gate: Arc<tokio::sync::Semaphore>,
    running: Arc<AtomicUsize>,
}

impl Holds {
    fn new() -> Self {
        Holds {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn route(&self, builder: rustorium_p2p::NodeBuilder) -> rustorium_p2p::NodeBuilder {
        builder.route("hold", common::hold(&self.gate, &self.running))
    }
}

#[tokio::test]
async fn stream_limits_shrink_back_and_their_growth_is_bounded_node_wide() {
    let holds = Holds::new();
    let (builder, _) = test_node();
    let mut config = common::config();
    config.transport.max_concurrent_bidi_streams = 1000;
    config.limits.max_extra_streams = 64; // 16 first + at most 64 grown, all connections
    config.limits.request_timeout = Duration::from_secs(30);
    let server = holds.route(builder.config(config)).bind().await.unwrap();

    // Two peers each try to hold 200 requests at once: together they get 2 x 16 + 64.
    let mut peers = Vec::new();
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let peer = Node::builder().bind().await.unwrap();
        peer.connect(&server.peer_addr()).await.unwrap();
        for _ in 0..200 {
            let (peer, to) = (peer.clone(), server.peer_id());
            held.spawn(async move { peer.request(to, "hold", "").await });
        }
        peers.push(peer);
    }
    let running = holds.running.clone();
    eventually("the limits reached", || {
        running.load(Ordering::SeqCst) == 96
    })
    .await;
    // Released, the streams close and the limits come back down; the requests that were
    // waiting for stream credit then run, 96 at a time at most.
    holds.gate.add_permits(1_000_000);
    let finished = tokio::time::timeout(WAIT, async {
        while let Some(done) = held.join_next().await {
            done.unwrap().unwrap();
        }
    })
    .await;
    assert!(finished.is_ok(), "held requests did not finish");

    // With the others quiet, one peer can grow into the whole pool again.
    holds.gate.forget_permits(usize::MAX);
    let late = Node::builder().bind().await.unwrap();
    late.connect(&server.peer_addr()).await.unwrap();
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (peer, to) = (late.clone(), server.peer_id());
        held.spawn(async move { peer.request(to, "hold", "").await });
    }
    // A limit holds for a second after it last changed (so that bursts are not throttled),
    // so the pool refills a second after the others went quiet. Growth is decided as
    // streams open: one handler at a time is let through, so that the late peer keeps
    // opening streams until it finds the pool full again.
    let trickle = async {
        for _ in 0..400 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            holds.gate.add_permits(1);
        }
    };
    tokio::select! {
        biased;
        _ = eventually("one peer grew into the pool", || {
            running.load(Ordering::SeqCst) >= 80
        }) => {}
        _ = trickle => panic!("one peer did not grow into the pool"),
    }
    let most = running.load(Ordering::SeqCst);
    assert!(most <= 80, "{most} running: the pool allows 16 + 64");
    holds.gate.add_permits(1_000_000);
    while let Some(done) = held.join_next().await {
        done.unwrap().unwrap();
    }
    drop(peers);
}

#[tokio::test]
async fn a_burst_of_quick_requests_grows_the_stream_limit() {
    // Sixteen requests (a connection's first limit) that arrive together and are answered
    // at once must count as sixteen streams in use, so that the limit grows: each stream
    // the node serves in the connection's task is taken before any is served. Counted one
    // at a time, the limit would stay at 16 and a peer with 16 requests in flight would
    // wait for its own delayed acknowledgement of each batch of answers (25 ms) before it
    // could open more.
    let (builder, _) = test_node();
    let server = builder.config(common::config()).bind().await.unwrap();
    let (_endpoint, conn) = common::raw_connection(server.local_addr()).await;
    let mut streams = Vec::new();
    for _ in 0..16 {
        streams.push(common::within("a stream", conn.open_bi()).await.unwrap());
    }
    let mut request = rustorium_p2p::wire::encode_header("echo");
    request.extend_from_slice(b"hi");
    for (send, _) in &mut streams {
        send.write_all(&request).await.unwrap();
        send.finish().unwrap();
    }
    for (_, recv) in &mut streams {
        let answer = common::within("an answer", recv.read_to_end(64))
            .await
            .unwrap();
        assert_eq!(answer, b"\x00hi");
    }
    // The first 16 streams are done (freed once their answers are acknowledged): with the
    // limit grown to 32, 32 more can be open at once; at 16, only 16.
    let mut more = Vec::new();
    for _ in 0..32 {
        more.push(
            common::within("32 streams open at once", conn.open_bi())
                .await
                .unwrap(),
        );
    }
}
