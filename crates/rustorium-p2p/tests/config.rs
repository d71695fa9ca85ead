//! Transport settings that must reach quinn.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::WAIT;
use rustorium_p2p::{Bytes, CongestionController, DisconnectReason, Node, PeerEvent};

#[tokio::test]
async fn max_concurrent_bidi_streams_bounds_requests_in_flight() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut config = common::config();
    config.transport.max_concurrent_bidi_streams = 4;
    let (r, m, g) = (running.clone(), most.clone(), gate.clone());
    let b = Node::builder()
        .config(config)
        .route("hold", move |_ctx, body: Bytes| {
            let (r, m, g, tx) = (r.clone(), m.clone(), g.clone(), started_tx.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let _ = tx.send(());
                g.acquire().await.expect("gate open").forget();
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(body)
            }
        })
        .bind()
        .await
        .unwrap();
    let a = Node::builder().bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..12u32 {
        let (a, peer) = (a.clone(), b.peer_id());
        requests.spawn(async move { a.request(peer, "hold", i.to_string()).await });
    }
    // The first 4 start and are held (the limit lets no fifth stream open); then one
    // request finishes for each one that starts.
    for i in 0..12 {
        tokio::time::timeout(WAIT, started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        if i >= 3 {
            gate.add_permits(1);
        }
    }
    gate.add_permits(3);
    while let Some(done) = requests.join_next().await {
        done.unwrap().unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "at most 4 requests ran at once"
    );
}

#[tokio::test]
async fn bbr_and_new_reno_complete_a_transfer() {
    for controller in [CongestionController::Bbr, CongestionController::NewReno] {
        let mut config = common::config();
        config.transport.congestion_controller = controller;
        let b = Node::builder()
            .config(config.clone())
            .route("echo", |_ctx, body| async move { Ok(body) })
            .bind()
            .await
            .unwrap();
        let a = Node::builder().config(config).bind().await.unwrap();
        a.connect(&b.peer_addr()).await.unwrap();
        let body: Bytes = (0..8_000_000u32)
            .map(|i| i as u8)
            .collect::<Vec<_>>()
            .into();
        let answer = a.request(b.peer_id(), "echo", body.clone()).await.unwrap();
        assert!(answer == body, "{controller:?} transfer intact");
    }
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_connection_and_keep_alive_holds_one() {
    let b = Node::builder()
        .route("echo", |_ctx, body| async move { Ok(body) })
        .bind()
        .await
        .unwrap();
    let short = |keep_alive: Option<Duration>| {
        let mut config = common::config();
        config.transport.max_idle_timeout = Duration::from_millis(400);
        config.transport.keep_alive_interval = keep_alive;
        Node::builder().config(config).bind()
    };
    let silent = short(None).await.unwrap();
    let kept = short(Some(Duration::from_millis(100))).await.unwrap();
    let mut events = silent.events();
    kept.connect(&b.peer_addr()).await.unwrap();
    silent.connect(&b.peer_addr()).await.unwrap();

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(PeerEvent::Disconnected { reason, .. })) => {
                assert_eq!(reason, DisconnectReason::IdleTimeout);
                break;
            }
            Ok(Ok(_)) => continue,
            other => panic!("the silent connection never timed out: {other:?}"),
        }
    }
    // The kept connection has been quiet at least as long, and is still there.
    assert_eq!(kept.connection_count(), 1);
    assert_eq!(kept.stats().reconnects, 0);
    assert_eq!(
        kept.request(b.peer_id(), "echo", "alive").await.unwrap(),
        "alive"
    );
    assert_eq!(kept.connection_count(), 1, "no redial was needed");
}

/// A connection advertises few streams at first (to save memory) and raises the limit as
/// the peer uses them: 300 requests can still all be running at once under a limit of 1000.
#[tokio::test]
async fn stream_limit_grows_to_the_configured_maximum_under_load() {
    const IN_FLIGHT: usize = 300;
    let running = Arc::new(AtomicUsize::new(0));
    let all_running = Arc::new(tokio::sync::Notify::new());
    let mut config = common::config();
    config.transport.max_concurrent_bidi_streams = 1000;
    config.limits.max_concurrent_requests = 1000;
    config.limits.max_concurrent_requests_per_peer = 1000;
    let (r, all) = (running.clone(), all_running.clone());
    let b = Node::builder()
        .config(config)
        .route("hold", move |_ctx, body: Bytes| {
            let (r, all) = (r.clone(), all.clone());
            async move {
                let released = all.notified();
                if r.fetch_add(1, Ordering::SeqCst) + 1 == IN_FLIGHT {
                    all.notify_waiters();
                } else {
                    released.await;
                }
                Ok(body)
            }
        })
        .bind()
        .await
        .unwrap();
    let a = Node::builder().bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let (a, peer) = (a.clone(), b.peer_id());
        requests.spawn(async move { a.request(peer, "hold", i.to_string()).await });
    }
    // Every handler waits until all 300 are running; a limit stuck below 300 never gets there.
    let finished = tokio::time::timeout(WAIT, async {
        while let Some(done) = requests.join_next().await {
            done.unwrap().unwrap();
        }
    })
    .await;
    assert!(
        finished.is_ok(),
        "only {} of {IN_FLIGHT} requests ever ran at once",
        running.load(Ordering::SeqCst)
    );
}

/// The buffer size the node reports in its metrics, in bytes.
#[cfg(target_os = "linux")]
fn socket_buffer(node: &Node, buffer: &str) -> usize {
    let label = format!("buffer=\"{buffer}\"");
    common::metric_sum(node, &["rustorium_p2p_socket_buffer_bytes", &label]) as usize
}

/// Whether this process may set socket buffers above the kernel's cap (CAP_NET_ADMIN,
/// bit 12 of the effective capabilities).
#[cfg(target_os = "linux")]
fn may_force_buffers() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:"));
    caps.and_then(|c| u64::from_str_radix(c.trim(), 16).ok())
        .is_some_and(|c| c & (1 << 12) != 0)
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_receive_buffer_goes_past_the_kernel_cap_where_the_process_may() {
    // A full receive buffer drops datagrams, and each drop waits out a probe timeout:
    // the soak's slowest requests (BENCHMARKS.md). The kernel caps SO_RCVBUF at
    // net.core.rmem_max; the node then tries SO_RCVBUFFORCE.
    let Ok(cap) = std::fs::read_to_string("/proc/sys/net/core/rmem_max") else {
        eprintln!("skipped: no /proc/sys/net/core/rmem_max in this network namespace");
        return;
    };
    let cap: usize = cap.trim().parse().unwrap();
    let asked = (cap * 2).clamp(64 << 10, 256 << 20);
    let mut config = common::config();
    config.transport.socket_receive_buffer = asked as u32;
    let node = Node::builder().config(config).bind().await.unwrap();
    // Without the right, the node keeps the kernel's cap (and logs how to raise it). The
    // check means something only where the process may force (CI runs as root).
    let want = if may_force_buffers() {
        asked
    } else {
        asked.min(cap)
    };
    assert_eq!(socket_buffer(&node, "receive"), want, "the cap is {cap}");
    // A rebound socket gets the same.
    node.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    assert_eq!(socket_buffer(&node, "receive"), want, "after rebind");
    // A request still goes through the socket.
    let peer = common::test_node().0.bind().await.unwrap();
    node.connect(&peer.peer_addr()).await.unwrap();
    let answer = node.request(peer.peer_id(), "echo", "hi").await.unwrap();
    assert_eq!(answer, "hi");
}
