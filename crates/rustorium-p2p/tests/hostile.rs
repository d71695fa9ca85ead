//! Hostile peers against a live node that must keep serving a well-behaved peer at the
//! same time: random datagrams, bad handshakes, stalled and unread streams. (Malformed
//! headers, oversized bodies, missing or non-Ed25519 certificates and a wrong ALPN are in
//! `messaging.rs` and `security.rs`.)

mod common;

use std::time::Duration;

use common::{raw_client, test_node, Bytes64, ClientCert, WAIT};
use rustorium_p2p::Node;

/// Tests here measure the whole process's memory, so they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The value of an unlabelled metric in a node's exposition.
fn metric(node: &Node, name: &str) -> f64 {
    let text = node.metrics_text();
    let prefix = format!("rustorium_p2p_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

/// UDP datagrams this host's kernel has delivered to sockets (`Udp: InDatagrams` in
/// /proc/net/snmp).
fn udp_in_datagrams() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InDatagrams")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Datagrams dropped unread by the IPv4 UDP socket bound to `port` (/proc/net/udp).
fn udp_socket_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .find(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&local))
        })
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no UDP socket on port {port}"))
}

/// A good client making `n` concurrent echo requests; all must succeed.
async fn good_traffic(client: Node, server: rustorium_p2p::PeerId, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        tasks.spawn(async move { (i, client.request(server, "echo", i.to_string()).await) });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, answer) = done.unwrap();
        assert_eq!(
            answer.unwrap_or_else(|e| panic!("good request {i}: {e}")),
            i.to_string()
        );
    }
}

#[tokio::test]
async fn a_hundred_thousand_random_datagrams_change_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (server, _) = test_node();
    let server = server.bind().await.unwrap();
    let good = Node::builder().bind().await.unwrap();
    good.connect(&server.peer_addr()).await.unwrap();
    let rss_before = common::rss_kib();

    let target = server.local_addr();
    let delivered_before = udp_in_datagrams();
    let flood = tokio::spawn(async move {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut gen = Bytes64(99);
        for i in 0..100_000u32 {
            let len = 1 + (gen.next_u64() % 1400) as usize;
            let mut datagram = gen.body(len).to_vec();
            // Some look like QUIC long-header Initial packets, to reach the handshake code.
            if i % 4 == 0 {
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                if datagram.len() > 5 {
                    datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
            }
            // A send the local socket refuses (a full send queue) is tried again: the
            // test is about what reaches the node.
            let mut tries = 0;
            while socket.send_to(&datagram, target).await.is_err() && tries < 3 {
                tries += 1;
                tokio::task::yield_now().await;
            }
        }
    });
    good_traffic(good.clone(), server.peer_id(), 300).await;
    tokio::time::timeout(WAIT * 3, flood)
        .await
        .unwrap()
        .unwrap();
    good_traffic(good.clone(), server.peer_id(), 100).await;
    // The noise reached the node and was read by it: the kernel delivered the datagrams
    // to a socket (this host's count, which only grows), and the node's socket dropped
    // almost none of them for want of reading.
    let delivered = udp_in_datagrams() - delivered_before;
    let dropped = udp_socket_drops(target.port());
    assert!(
        delivered >= 99_000,
        "only {delivered} datagrams were delivered ({dropped} dropped at the node's socket)"
    );
    assert!(
        dropped < 1_000,
        "the node's socket dropped {dropped} datagrams unread"
    );
    assert_eq!(
        server.connection_count(),
        1,
        "no connection came out of the noise"
    );
    let grown = common::rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
}

#[tokio::test]
async fn a_client_with_an_expired_certificate_is_refused() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (server, _) = test_node();
    let server = server.bind().await.unwrap();
    let good = Node::builder().bind().await.unwrap();
    good.connect(&server.peer_addr()).await.unwrap();
    let (endpoint, config) = raw_client(ClientCert::Expired, b"rustorium");
    let conn = endpoint
        .connect_with(config, server.local_addr(), "rustorium")
        .unwrap();
    let result = tokio::time::timeout(WAIT, async {
        let conn = conn.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"\x04echohi")
            .await
            .map_err(|_| quinn::ConnectionError::LocallyClosed)?;
        let _ = send.finish();
        recv.read_to_end(100).await.map_err(|_| {
            conn.close_reason()
                .unwrap_or(quinn::ConnectionError::LocallyClosed)
        })
    })
    .await
    .expect("handshake hung");
    let err = result.expect_err("an expired certificate must not get an answer");
    let text = format!("{err}");
    assert!(
        text.contains("45") || text.to_lowercase().contains("expired"),
        "{text}"
    );
    assert_eq!(server.connection_count(), 1);
    good_traffic(good, server.peer_id(), 20).await;
}

#[tokio::test]
async fn a_peer_that_never_reads_its_answers_is_cut_off() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (server, _) = test_node();
    let server = server
        .request_timeout(Duration::from_millis(500))
        .bind()
        .await
        .unwrap();
    let good = Node::builder().bind().await.unwrap();
    good.connect(&server.peer_addr()).await.unwrap();
    let (_endpoint, conn) = common::raw_connection(server.local_addr()).await;
    // Ask for 8 MB answers ten times and never read them.
    let mut unread = Vec::new();
    for _ in 0..10 {
        let (mut send, recv) = common::within("a stream", conn.open_bi()).await.unwrap();
        common::within("a request", send.write_all(b"\x03big8000000"))
            .await
            .unwrap();
        send.finish().unwrap();
        unread.push(recv);
    }
    good_traffic(good.clone(), server.peer_id(), 50).await;
    // The server gives up on every unread answer (TIMED_OUT) and frees its streams.
    for mut recv in unread {
        // Without reading a byte, wait for the server to give up on the answer.
        let reset = tokio::time::timeout(WAIT, recv.received_reset())
            .await
            .unwrap();
        match reset {
            Ok(Some(code)) => assert_eq!(code.into_inner(), 0x06, "TIMED_OUT"),
            other => panic!("expected a TIMED_OUT reset, got {other:?}"),
        }
    }
    // The server's stream tasks end right after their resets go out.
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&server, "streams_active") != 0.0 && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(metric(&server, "streams_active"), 0.0);
    good_traffic(good, server.peer_id(), 20).await;
}

#[tokio::test]
async fn ten_thousand_stalled_streams_do_not_starve_other_peers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (server, _) = test_node();
    let mut config = common::config();
    config.limits.request_timeout = Duration::from_secs(3);
    config.limits.max_connections_per_ip = 200;
    let server = server.config(config).bind().await.unwrap();
    let good = Node::builder().bind().await.unwrap();
    good.connect(&server.peer_addr()).await.unwrap();
    let rss_before = common::rss_kib();

    // 100 connections, each opening its 100 allowed streams and sending one header byte.
    let mut attackers = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let (endpoint, conn) = common::raw_connection(server.local_addr()).await;
        for _ in 0..100 {
            let (mut send, recv) = tokio::time::timeout(WAIT, conn.open_bi())
                .await
                .expect("the node gave no stream credit in time")
                .unwrap();
            tokio::time::timeout(WAIT, send.write_all(&[200]))
                .await
                .expect("one header byte could not be sent in time")
                .unwrap();
            stalled.push((send, recv));
        }
        attackers.push((endpoint, conn));
    }
    assert_eq!(stalled.len(), 10_000);
    // The good peer is served while all 10,000 streams hang.
    good_traffic(good.clone(), server.peer_id(), 200).await;
    let grown = common::rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 256 * 1024,
        "memory grew by {grown} KiB for 10,000 stalled streams"
    );

    // Every stalled stream is cut off once its time is up, with TIMED_OUT. (The send
    // halves stay alive meanwhile: dropping one would finish its stream.)
    let all_cut = async {
        for (i, (_send, recv)) in stalled.iter_mut().enumerate() {
            match recv.read_to_end(1000).await {
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                    assert_eq!(code.into_inner(), 0x06, "stream {i}: TIMED_OUT expected");
                }
                other => panic!(
                    "stream {i}: expected a TIMED_OUT reset, got {:?}",
                    other.map(|b| String::from_utf8_lossy(&b).into_owned())
                ),
            }
        }
    };
    tokio::time::timeout(3 * WAIT, all_cut)
        .await
        .expect("not every stalled stream was cut off in time");
    drop(stalled);
    drop(attackers);
}
