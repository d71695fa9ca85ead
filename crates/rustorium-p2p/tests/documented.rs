//! Behaviours README.md and docs/PROTOCOL.md promise, one test each: one-way messages
//! waiting for a handler slot, then dropped and counted; a dropped handler when the
//! requester gives up; the `shutdown_grace` cut-off; the allow list on our own dials;
//! `zero_rtt = false`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, metric_sum, WAIT};
use rustorium_p2p::{ConnectError, Node, Refusal, RequestError};
use tokio::sync::Semaphore;

#[tokio::test]
async fn one_way_messages_wait_for_a_slot_then_are_dropped_and_counted() {
    let gate = Arc::new(Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut config = common::config();
    config.limits.max_concurrent_requests = 1;
    config.limits.request_timeout = Duration::from_millis(1500);
    let counted = delivered.clone();
    let server = Node::builder()
        .config(config)
        .route("hold", common::hold(&gate, &running))
        .route("note", move |_ctx, _body| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(rustorium_p2p::Bytes::new())
            }
        })
        .bind()
        .await
        .unwrap();
    let client = Node::builder().bind().await.unwrap();
    client.connect(&server.peer_addr()).await.unwrap();
    let to = server.peer_id();
    let active = |n: f64| {
        let server = server.clone();
        move || metric_sum(&server, &["streams_active"]) == n
    };

    // The one slot taken: a message waits for it, and runs once it is free.
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.request(to, "hold", "").await }
    });
    eventually("the slot taken", || running.load(Ordering::SeqCst) == 1).await;
    client.send(to, "note", "first").await.unwrap();
    eventually("the message waiting beside the held request", active(2.0)).await;
    assert_eq!(
        delivered.load(Ordering::SeqCst),
        0,
        "it waits while the slot is taken"
    );
    gate.add_permits(1);
    held.await.unwrap().unwrap();
    eventually("the waiting message delivered", || {
        delivered.load(Ordering::SeqCst) == 1
    })
    .await;

    // Taken for longer than the message's request_timeout: it is dropped, and counted.
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.request(to, "hold", "").await }
    });
    eventually("the slot taken again", || {
        running.load(Ordering::SeqCst) == 1
    })
    .await;
    client.send(to, "note", "second").await.unwrap();
    let dropped = || {
        metric_sum(
            &server,
            &[
                "requests",
                "route=\"note\"",
                "status=\"busy\"",
                "side=\"server\"",
            ],
        ) == 1.0
    };
    eventually("the message dropped and counted as busy", dropped).await;
    gate.add_permits(1);
    held.await.unwrap().unwrap();
    // The slot is free again: a third message runs, and the dropped one never does.
    client.send(to, "note", "third").await.unwrap();
    eventually("the third message delivered", || {
        delivered.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(
        delivered.load(Ordering::SeqCst),
        2,
        "the dropped message never ran"
    );
}

#[tokio::test]
async fn a_requester_that_gives_up_has_its_handler_dropped() {
    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (s, d) = (started.clone(), dropped.clone());
    let server = Node::builder()
        .config(common::config())
        .route("forever", move |_ctx, _body| {
            let (s, d) = (s.clone(), d.clone());
            async move {
                let _guard = Dropped(d);
                s.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(rustorium_p2p::Bytes::new())
            }
        })
        .bind()
        .await
        .unwrap();
    let client = Node::builder().bind().await.unwrap();
    client.connect(&server.peer_addr()).await.unwrap();
    let to = server.peer_id();
    let request = tokio::spawn({
        let client = client.clone();
        async move { client.request(to, "forever", "").await }
    });
    eventually("the handler running", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    // Dropping the request's future cancels its stream (CANCELLED); the node drops the
    // handler rather than let it run on for nobody.
    request.abort();
    eventually("the handler dropped", || {
        dropped.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_waiting_for_handlers_at_shutdown_grace() {
    let gate = Arc::new(Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let mut config = common::config();
    config.limits.shutdown_grace = Duration::from_millis(300);
    config.limits.request_timeout = Duration::from_secs(60);
    let server = Node::builder()
        .config(config)
        .route("hold", common::hold(&gate, &running))
        .bind()
        .await
        .unwrap();
    let client = Node::builder().bind().await.unwrap();
    client.connect(&server.peer_addr()).await.unwrap();
    let to = server.peer_id();
    let request = tokio::spawn({
        let client = client.clone();
        async move { client.request(to, "hold", "").await }
    });
    eventually("the handler running", || {
        running.load(Ordering::SeqCst) == 1
    })
    .await;
    // The handler never finishes: shutdown waits `shutdown_grace` for it, then closes.
    let started = tokio::time::Instant::now();
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown waited past shutdown_grace");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "shutdown returned after {took:?}, before shutdown_grace"
    );
    // The requester gets an error, not silence.
    let answer = tokio::time::timeout(WAIT, request)
        .await
        .expect("the requester was left waiting")
        .unwrap();
    let err = answer.expect_err("a request cut off by shutdown has no answer");
    assert!(
        matches!(err, RequestError::ConnectionLost { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("shut"),
        "says the peer shut down: {err}"
    );
}

#[tokio::test]
async fn the_allow_list_applies_to_our_own_dials() {
    let stranger = Node::builder()
        .config(common::config())
        .bind()
        .await
        .unwrap();
    let friend = Node::builder()
        .config(common::config())
        .bind()
        .await
        .unwrap();
    let mut config = common::config();
    config.node.allow = Some([friend.peer_id()].into_iter().collect());
    let node = Node::builder().config(config).bind().await.unwrap();
    node.connect(&friend.peer_addr()).await.unwrap();
    let err = node.connect(&stranger.peer_addr()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                reason: Refusal::NotAllowed,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(node.connection_count(), 1, "only the friend");
}

#[tokio::test]
async fn zero_rtt_off_means_no_early_data_either_way() {
    let early = Arc::new(AtomicUsize::new(0));
    let seen = early.clone();
    let mut config = common::config();
    config.node.zero_rtt = false;
    let server = Node::builder()
        .config(config.clone())
        .early_data_route("e", move |ctx: rustorium_p2p::RequestContext, _body| {
            let seen = seen.clone();
            async move {
                if ctx.is_early_data() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                Ok(rustorium_p2p::Bytes::new())
            }
        })
        .bind()
        .await
        .unwrap();
    let client = Node::builder().config(config).bind().await.unwrap();
    let to = server.peer_id();
    for _ in 0..3 {
        client.connect(&server.peer_addr()).await.unwrap();
        let options = rustorium_p2p::RequestOptions::new().idempotent(true);
        client.request_with(to, "e", "", options).await.unwrap();
        client.disconnect(&to);
        eventually("disconnected", || client.connection_count() == 0).await;
    }
    assert_eq!(
        early.load(Ordering::SeqCst),
        0,
        "no request came as 0-RTT data"
    );
    assert_eq!(client.stats().zero_rtt_attempted, 0);
}
