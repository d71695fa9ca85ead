//! Load and soak: 1,000 concurrent connections to one node, each with 10 requests in
//! flight, for 60 s (`SOAK_SECS` overrides): zero errors, and memory flat after warm-up.
//! `#[ignore]`d; `.ci/run` runs it in release mode with a raised file-descriptor limit.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustorium_p2p::Node;

fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "60 s of load: run in release by .ci/run"]
async fn a_thousand_connections_ten_in_flight_each_for_a_minute() {
    const CLIENTS: usize = 1000;
    const IN_FLIGHT: usize = 10;
    if open_files_limit() < 4096 {
        eprintln!("skipped: needs `ulimit -n` of at least 4096 for {CLIENTS} sockets");
        return;
    }
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut config = common::config();
    config.limits.max_connections_per_ip = 2 * CLIENTS as u32;
    config.limits.request_timeout = Duration::from_secs(30);
    let server = Node::builder()
        .config(config)
        .route("echo", |_ctx, body| async move { Ok(body) })
        .bind()
        .await
        .unwrap();
    let mut clients = Vec::new();
    let mut client_config = common::config();
    client_config.limits.request_timeout = Duration::from_secs(30);
    for _ in 0..CLIENTS {
        let client = Node::builder()
            .config(client_config.clone())
            .bind()
            .await
            .unwrap();
        client.connect(&server.peer_addr()).await.unwrap();
        // An answer means the server's side of the handshake is done too.
        client
            .request(server.peer_id(), "echo", "hi")
            .await
            .unwrap();
        clients.push(client);
    }
    assert_eq!(server.connection_count(), CLIENTS);

    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, client) in clients.iter().enumerate() {
        for t in 0..IN_FLIGHT {
            let (client, done, peer) = (client.clone(), done.clone(), server.peer_id());
            tasks.spawn(async move {
                let mut n = 0u64;
                let mut slowest = Duration::ZERO;
                while Instant::now() < end {
                    let body = format!("{c}/{t}/{n}");
                    let sent = Instant::now();
                    let answer = client.request(peer, "echo", body.clone()).await;
                    assert_eq!(
                        answer.unwrap_or_else(|e| panic!("request failed: {e}")),
                        body
                    );
                    slowest = slowest.max(sent.elapsed());
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                slowest
            });
        }
    }
    // Memory after a warm-up third, and at the end.
    let warm = tokio::time::sleep(Duration::from_secs(secs / 3));
    warm.await;
    let rss_warm = common::rss_kib();
    let mut slowest = Duration::ZERO;
    while let Some(result) = tasks.join_next().await {
        slowest = slowest.max(result.unwrap());
    }
    let rss_end = common::rss_kib();
    let total = done.load(Ordering::Relaxed);
    eprintln!(
        "soak: {total} requests in {secs} s ({:.0}/s) over {CLIENTS} connections, slowest {slowest:?}; RSS {rss_warm} KiB after warm-up, {rss_end} KiB at the end",
        total as f64 / secs as f64
    );
    assert!(total > 0);
    assert!(
        rss_end <= rss_warm + rss_warm / 10 + 16 * 1024,
        "memory grew from {rss_warm} KiB to {rss_end} KiB"
    );
    assert_eq!(server.connection_count(), CLIENTS, "no connection dropped");
}
