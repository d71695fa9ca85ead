//! Streaming bodies: requests, answers and one-way messages of any size, read and written
//! a chunk at a time; cancellation from each side; the limits of streaming routes, held
//! against a stranger while a good peer is still served.

mod common;

use std::time::Duration;

use common::{within, Bytes64};
use rustorium_p2p::{
    AnswerWriter, BodyReader, Bytes, HandlerError, Node, NodeBuilder, RequestContext, RequestError,
    RequestOptions, Status, StreamLimits, TransferError,
};
use tokio::sync::mpsc;

/// A streaming echo.
async fn echo(
    _ctx: RequestContext,
    mut body: BodyReader,
    mut answer: AnswerWriter,
) -> Result<(), HandlerError> {
    while let Some(chunk) = body.chunk().await? {
        answer.write(chunk).await?;
    }
    Ok(())
}

/// What a [`reporting`] handler says: `None` when it starts, then what ended its body.
type Report = Option<Result<u64, TransferError>>;

/// A streaming handler that reports that it started, then what ended its body
/// (`Ok(bytes)` at its end), and answers with the byte count.
fn reporting(tx: mpsc::UnboundedSender<Report>) -> impl rustorium_p2p::StreamHandler {
    move |_ctx: RequestContext, mut body: BodyReader, mut answer: AnswerWriter| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(None);
            let ended = loop {
                match body.chunk().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(body.bytes_read()),
                    Err(e) => break Err(e),
                }
            };
            let _ = tx.send(Some(ended.clone()));
            let count = ended?;
            answer.write(count.to_string()).await?;
            Ok(())
        }
    }
}

fn builder() -> NodeBuilder {
    Node::builder().config(common::config())
}

async fn connected(server: &Node) -> Node {
    let client = builder().bind().await.unwrap();
    within("connect", client.connect(&server.peer_addr()))
        .await
        .unwrap();
    client
}

/// Writes `total` pseudo-random bytes in 64 KiB chunks while reading the answer; returns
/// the SHA-256 of what was sent and of what came back.
async fn echo_through(client: &Node, server: &Node, total: usize) -> (Vec<u8>, Vec<u8>) {
    within("the echo", echo_through_unbounded(client, server, total)).await
}

/// [`echo_through`] with no time limit of its own.
async fn echo_through_unbounded(client: &Node, server: &Node, total: usize) -> (Vec<u8>, Vec<u8>) {
    let (mut body, mut answer) = client
        .open_request(server.peer_id(), "stream/echo")
        .await
        .unwrap();
    let send = async move {
        let mut gen = Bytes64(7);
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut left = total;
        while left > 0 {
            let chunk = gen.body(left.min(64 * 1024));
            hash.update(&chunk);
            left -= chunk.len();
            body.write(chunk).await?;
        }
        body.finish()?;
        Ok::<_, RequestError>(hash.finish().as_ref().to_vec())
    };
    let receive = async move {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        while let Some(chunk) = answer.chunk().await? {
            hash.update(&chunk);
        }
        Ok::<_, RequestError>(hash.finish().as_ref().to_vec())
    };
    tokio::try_join!(send, receive).unwrap()
}

#[tokio::test]
async fn a_body_far_over_max_request_size_streams_through_an_echo_unchanged() {
    // Buffered requests may be 64 KiB here; the streaming route takes any size.
    let server = builder()
        .max_request_size(64 * 1024)
        .streaming_route("stream/echo", echo)
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (sent, came_back) = echo_through(&client, &server, 48 << 20).await;
    assert_eq!(sent, came_back);
    let ok = common::metric_sum(&client, &["requests_total", "stream/echo", "ok"]);
    assert_eq!(ok, 1.0, "{}", client.metrics_text());
}

#[tokio::test]
async fn the_buffered_api_and_the_streaming_api_call_each_others_routes() {
    let server = builder()
        .streaming_route("stream/echo", echo)
        .route("echo", |_ctx, body: Bytes| async move { Ok(body) })
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let peer = server.peer_id();
    // A buffered request to a streaming route.
    let answer = client
        .request(peer, "stream/echo", "buffered in")
        .await
        .unwrap();
    assert_eq!(&answer[..], b"buffered in");
    // An empty body to a streaming route: an empty answer.
    assert!(client
        .request(peer, "stream/echo", "")
        .await
        .unwrap()
        .is_empty());
    // A streaming request to a buffered route.
    let (mut body, answer) = client.open_request(peer, "echo").await.unwrap();
    body.write("streamed ").await.unwrap();
    body.write_all(b"in").await.unwrap();
    body.finish().unwrap();
    let answer = within("answer", answer.read_to_end(1024)).await.unwrap();
    assert_eq!(&answer[..], b"streamed in");
}

#[tokio::test]
async fn a_requester_that_drops_its_body_cancels_the_handler_read() {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let server = builder()
        .streaming_route("stream/count", reporting(tx))
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (mut body, answer) = client
        .open_request(server.peer_id(), "stream/count")
        .await
        .unwrap();
    body.write(vec![1u8; 100_000]).await.unwrap();
    assert!(within("start", ended.recv()).await.unwrap().is_none());
    drop(body);
    let seen = within("the handler's read", ended.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(seen, Err(TransferError::Cancelled)),
        "handler saw {seen:?}"
    );
    drop(answer);
    common::eventually("the cancel counted", || {
        common::metric_sum(&client, &["requests_total", "stream/count", "cancelled"]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_requester_that_drops_the_answer_cancels_the_handler_write() {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let server = builder()
        .streaming_route(
            "stream/forever",
            move |_ctx: RequestContext, _body: BodyReader, mut answer: AnswerWriter| {
                let tx = tx.clone();
                async move {
                    // Writes until the requester goes (bounded: the test ends it).
                    let mut written = 0u64;
                    let failed = loop {
                        if let Err(e) = answer.write(vec![0u8; 64 * 1024]).await {
                            break e;
                        }
                        written += 1;
                        if written > 1_000_000 {
                            return Err(HandlerError::new("the requester never left"));
                        }
                    };
                    let _ = tx.send(failed.clone());
                    Err(failed.into())
                }
            },
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (body, mut answer) = client
        .open_request(server.peer_id(), "stream/forever")
        .await
        .unwrap();
    body.finish().unwrap();
    let first = within("the first chunk", answer.chunk()).await.unwrap();
    assert!(first.is_some());
    drop(answer);
    let seen = within("the handler's write", ended.recv()).await.unwrap();
    assert!(
        matches!(seen, TransferError::Cancelled),
        "handler saw {seen:?}"
    );
    common::eventually("the server counts it cancelled", || {
        common::metric_sum(&server, &["requests_total", "stream/forever", "cancelled"]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_fails_mid_answer_is_reported_as_such() {
    let server = builder()
        .streaming_route(
            "stream/half",
            |_ctx: RequestContext, mut body: BodyReader, mut answer: AnswerWriter| async move {
                answer.write("the first half").await?;
                // Fails once the requester, having read the first half, ends its body (a
                // reset discards what the requester has not read yet).
                while body.chunk().await?.is_some() {}
                Err(HandlerError::new("disk on fire"))
            },
        )
        .streaming_route(
            "stream/refuse",
            |_ctx: RequestContext, _body: BodyReader, _answer: AnswerWriter| async move {
                Err(HandlerError::bad_request("not this file"))
            },
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let peer = server.peer_id();

    let (body, mut answer) = client.open_request(peer, "stream/half").await.unwrap();
    let first = within("first", answer.chunk()).await.unwrap().unwrap();
    assert_eq!(&first[..], b"the first half");
    body.finish().unwrap();
    let err = within("second", answer.chunk()).await.unwrap_err();
    match &err {
        RequestError::Remote {
            status: Status::HandlerError,
            message,
            ..
        } => assert!(message.contains("after its answer had started"), "{err}"),
        other => panic!("expected a mid-answer HANDLER_ERROR, got {other:?}"),
    }

    // Before the answer starts, a handler's error is a status and message, as always.
    let (body, mut answer) = client.open_request(peer, "stream/refuse").await.unwrap();
    body.finish().unwrap();
    let err = within("refusal", answer.chunk()).await.unwrap_err();
    assert!(
        matches!(&err, RequestError::Remote { status: Status::BadRequest, message, .. } if message == "not this file"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_handler_that_stops_reading_early_still_answers() {
    let server = builder()
        .streaming_route(
            "stream/first",
            |_ctx: RequestContext, mut body: BodyReader, mut answer: AnswerWriter| async move {
                let first = body.chunk().await?.unwrap_or_default();
                drop(body);
                answer
                    .write(format!("first chunk {} bytes", first.len()))
                    .await?;
                Ok(())
            },
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (mut body, answer) = client
        .open_request(server.peer_id(), "stream/first")
        .await
        .unwrap();
    let answer = tokio::spawn(answer.read_to_end(1024));
    // The requester keeps writing until it learns the handler stopped reading.
    let mut stopped = None;
    for _ in 0..10_000 {
        if let Err(e) = within("a write", body.write(vec![3u8; 16 * 1024])).await {
            stopped = Some(e);
            break;
        }
    }
    let stopped = stopped.expect("the handler stopped reading; a write must fail");
    assert!(
        matches!(stopped, RequestError::BodyStopped { code: 1, .. }),
        "{stopped:?}"
    );
    assert!(stopped.to_string().contains("read the answer"), "{stopped}");
    let answer = within("answer", answer).await.unwrap().unwrap();
    assert!(answer.starts_with(b"first chunk "), "{answer:?}");
}

#[tokio::test]
async fn a_body_over_the_routes_limit_is_refused_too_large() {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let server = builder()
        .streaming_route_with(
            "stream/count",
            StreamLimits::new().max_body(1 << 20),
            reporting(tx),
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (mut body, answer) = client
        .open_request(server.peer_id(), "stream/count")
        .await
        .unwrap();
    let answer = tokio::spawn(answer.read_to_end(1 << 20));
    let mut written = 0;
    while written <= 1 << 20 {
        if within("a write", body.write(vec![0u8; 64 * 1024]))
            .await
            .is_err()
        {
            break;
        }
        written += 64 * 1024;
    }
    let _ = body.finish();
    assert!(within("start", ended.recv()).await.unwrap().is_none());
    let seen = within("handler", ended.recv()).await.unwrap().unwrap();
    assert!(
        matches!(seen, Err(TransferError::TooLarge { limit }) if limit == 1 << 20),
        "{seen:?}"
    );
    let err = within("answer", answer).await.unwrap().unwrap_err();
    assert!(matches!(err, RequestError::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("1048576"), "{err}");
}

#[tokio::test]
async fn a_body_that_stalls_past_request_timeout_ends_the_handler_read() {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let mut config = common::config();
    config.limits.request_timeout = Duration::from_millis(300);
    let server = Node::builder()
        .config(config)
        .streaming_route("stream/count", reporting(tx))
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (mut body, answer) = client
        .open_request(server.peer_id(), "stream/count")
        .await
        .unwrap();
    body.write("a start, then nothing").await.unwrap();
    assert!(within("start", ended.recv()).await.unwrap().is_none());
    let seen = within("handler", ended.recv()).await.unwrap().unwrap();
    assert!(
        matches!(seen, Err(TransferError::Stalled { after }) if after == Duration::from_millis(300)),
        "{seen:?}"
    );
    // The requester is told the peer's time ran out, not that a handler failed.
    let err = within("answer", answer.read_to_end(1024))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::TransferTimedOut { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("request_timeout"), "{err}");
    drop(body);
    common::eventually("the server counts it timed out", || {
        common::metric_sum(&server, &["requests_total", "stream/count", "timed_out"]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_transfer_past_the_routes_max_duration_is_reset() {
    let server = builder()
        .streaming_route_with(
            "stream/slow",
            StreamLimits::new().max_duration(Duration::from_millis(300)),
            |_ctx: RequestContext, _body: BodyReader, mut answer: AnswerWriter| async move {
                answer.write("started").await?;
                std::future::pending::<()>().await;
                Ok(())
            },
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (body, mut answer) = client
        .open_request(server.peer_id(), "stream/slow")
        .await
        .unwrap();
    body.finish().unwrap();
    assert!(within("start", answer.chunk()).await.unwrap().is_some());
    let err = within("the end", answer.chunk()).await.unwrap_err();
    assert!(
        matches!(&err, RequestError::TransferTimedOut { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_stream_duration"), "{err}");
    common::eventually("the server counts it timed out", || {
        common::metric_sum(&server, &["requests_total", "stream/slow", "timed_out"]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_does_not_read_holds_the_sender_back() {
    // Flow control, end to end: nothing reads the body, so the sender can get no further
    // than the stream's receive window ahead.
    let mut config = common::config();
    config.transport.stream_receive_window = 256 * 1024;
    let server = Node::builder()
        .config(config)
        .streaming_route(
            "stream/deaf",
            |_ctx: RequestContext, body: BodyReader, _answer: AnswerWriter| async move {
                std::future::pending::<()>().await;
                drop(body);
                Ok(())
            },
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let options = RequestOptions::new().timeout(Duration::from_millis(500));
    let (mut body, _answer) = client
        .open_request_with(server.peer_id(), "stream/deaf", options)
        .await
        .unwrap();
    let mut written = 0usize;
    let err = loop {
        match within("a write", body.write(vec![0u8; 16 * 1024])).await {
            Ok(()) => written += 16 * 1024,
            Err(e) => break e,
        }
        assert!(written <= 64 << 20, "the sender was never held back");
    };
    assert!(matches!(err, RequestError::Timeout { .. }), "{err:?}");
    // quinn's send buffer holds some beyond the peer's window; nothing like the 64 MiB.
    assert!(
        written <= 4 << 20,
        "{written} bytes went out to a reader that reads nothing"
    );
}

#[tokio::test]
async fn a_stranger_holding_its_transfers_leaves_a_good_peer_served() {
    let mut config = common::config();
    config.limits.max_concurrent_transfers_per_peer = 2;
    config.limits.max_concurrent_transfers = 3;
    config.limits.max_request_size = 64 * 1024;
    let server = Node::builder()
        .config(config)
        .streaming_route("stream/echo", echo)
        .route("echo", |_ctx, body: Bytes| async move { Ok(body) })
        .bind()
        .await
        .unwrap();
    let stranger = connected(&server).await;
    let peer = server.peer_id();
    // The stranger opens transfers and sends nothing more: it holds its share.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(stranger.open_request(peer, "stream/echo").await.unwrap());
    }
    common::eventually("the stranger's transfers are running", || {
        common::metric_sum(&server, &["streams_active"]) >= 2.0
    })
    .await;
    // Its third transfer (a body still arriving, too large to read whole) is refused
    // BUSY, naming the per-peer limit.
    let (mut body, answer) = stranger.open_request(peer, "stream/echo").await.unwrap();
    body.write(vec![0u8; 128 * 1024]).await.unwrap();
    let err = within("busy", answer.read_to_end(1024)).await.unwrap_err();
    drop(body);
    assert!(
        matches!(&err, RequestError::Remote { status: Status::Busy, message, .. } if message.contains("max_concurrent_transfers_per_peer")),
        "{err:?}"
    );
    // A good peer still streams, and its buffered requests never wait on transfers.
    let good = connected(&server).await;
    let (sent, came_back) = echo_through(&good, &server, 1 << 20).await;
    assert_eq!(sent, came_back);
    let answer = within("buffered", good.request(peer, "echo", "hi"))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"hi");
    drop(held);
}

#[tokio::test]
async fn a_streamed_one_way_message_arrives_whole() {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let server = builder()
        .streaming_route("stream/count", reporting(tx))
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let mut message = client
        .open_message(server.peer_id(), "stream/count")
        .await
        .unwrap();
    for _ in 0..64 {
        message.write(vec![9u8; 64 * 1024]).await.unwrap();
    }
    within("acknowledged", message.finish()).await.unwrap();
    assert!(within("start", ended.recv()).await.unwrap().is_none());
    let seen = within("handler", ended.recv()).await.unwrap().unwrap();
    assert_eq!(seen.unwrap(), 64 * 64 * 1024);
}

#[tokio::test]
async fn small_bodies_that_are_all_there_are_not_held_to_the_transfer_limit() {
    // Whole small bodies are served with handler slots: many at once, even with room for
    // one transfer per peer.
    let mut config = common::config();
    config.limits.max_concurrent_transfers_per_peer = 1;
    config.limits.max_concurrent_transfers = 1;
    let server = Node::builder()
        .config(config)
        .streaming_route("stream/echo", echo)
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let peer = server.peer_id();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = client.clone();
        requests.spawn(async move {
            let body = format!("request {i}");
            (
                client.request(peer, "stream/echo", body.clone()).await,
                body,
            )
        });
    }
    let answers = within("64 small echoes", requests.join_all()).await;
    for (answer, body) in answers {
        assert_eq!(answer.unwrap(), body.as_bytes());
    }
}

/// Peak resident memory of this process so far, KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full size: run in release by .ci/run"]
async fn a_several_gib_echo_comes_back_identical_in_flat_memory() {
    const TOTAL: usize = 3 << 30;
    let mut config = common::config();
    config.limits.max_stream_body_size = TOTAL as u64;
    let server = Node::builder()
        .config(config)
        .streaming_route("stream/echo", echo)
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    // Warm up (windows grown, buffers allocated), then measure from here.
    let _ = echo_through(&client, &server, 8 << 20).await;
    let before = common::rss_kib();
    let started = std::time::Instant::now();
    let (sent, came_back) = tokio::time::timeout(
        Duration::from_secs(600),
        echo_through_unbounded(&client, &server, TOTAL),
    )
    .await
    .expect("3 GiB echoed within 10 minutes");
    assert_eq!(sent, came_back, "the echo differs (SHA-256)");
    let grew = peak_rss_kib().saturating_sub(before);
    println!(
        "3 GiB echo in {:?}; peak resident memory {} MiB over the start (both nodes, one process)",
        started.elapsed(),
        grew / 1024
    );
    assert!(grew < 64 * 1024, "resident memory grew {grew} KiB");
}

#[tokio::test]
async fn a_streamed_answer_left_unread_is_given_up_and_counted_against_the_peer() {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let mut config = common::config();
    config.limits.answer_timeout = Duration::from_millis(300);
    let server = Node::builder()
        .config(config)
        .streaming_route(
            "stream/download",
            move |_ctx: RequestContext, _body: BodyReader, mut answer: AnswerWriter| {
                let tx = tx.clone();
                async move {
                    // Writes until the requester stops taking it (bounded by the count).
                    for _ in 0..100_000 {
                        if let Err(e) = answer.write(vec![0u8; 64 * 1024]).await {
                            let _ = tx.send(e.clone());
                            return Err(e.into());
                        }
                    }
                    Ok(())
                }
            },
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (body, answer) = client
        .open_request(server.peer_id(), "stream/download")
        .await
        .unwrap();
    body.finish().unwrap();
    // The requester holds the answer and never reads it.
    let seen = within("the handler's write", ended.recv()).await.unwrap();
    assert!(
        matches!(seen, TransferError::Stalled { after } if after == Duration::from_millis(300)),
        "{seen:?}"
    );
    common::eventually("the unread answer is counted", || {
        common::metric_sum(&server, &["answers_abandoned"]) == 1.0
    })
    .await;
    drop(answer);
}

#[tokio::test]
async fn an_echo_over_the_routes_limit_says_too_large_though_its_answer_had_started() {
    let server = builder()
        .streaming_route_with(
            "stream/echo",
            StreamLimits::new().max_body(256 * 1024),
            echo,
        )
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let (mut body, answer) = client
        .open_request(server.peer_id(), "stream/echo")
        .await
        .unwrap();
    let answer = tokio::spawn(answer.read_to_end(1 << 30));
    let mut stopped = None;
    for _ in 0..1000 {
        if let Err(e) = within("a write", body.write(vec![1u8; 16 * 1024])).await {
            stopped = Some(e);
            break;
        }
    }
    let stopped = stopped.expect("the peer stops reading past its limit");
    assert!(
        matches!(stopped, RequestError::TooLarge { .. }),
        "{stopped:?}"
    );
    let err = within("answer", answer).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, RequestError::TooLarge { message, .. } if message.contains("max_stream_body_size")),
        "{err:?}"
    );
}

#[tokio::test]
async fn bodies_still_arriving_when_no_transfer_slot_is_free_are_read_whole_if_they_fit() {
    let mut config = common::config();
    config.limits.max_concurrent_transfers_per_peer = 1;
    let server = Node::builder()
        .config(config)
        .streaming_route("stream/echo", echo)
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let peer = server.peer_id();
    // The peer's one transfer slot is taken by a body that never ends.
    let (mut held, _answer) = client.open_request(peer, "stream/echo").await.unwrap();
    held.write(vec![0u8; 32 * 1024]).await.unwrap();
    common::eventually("the held transfer is running", || {
        common::metric_sum(&server, &["streams_active"]) >= 1.0
    })
    .await;
    // 100 KiB bodies arrive in many packets: never whole when their streams open.
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..16u8 {
        let client = client.clone();
        requests.spawn(async move {
            let body = Bytes::from(vec![i; 100 * 1024]);
            (
                client.request(peer, "stream/echo", body.clone()).await,
                body,
            )
        });
    }
    for (answer, body) in within("16 echoes of 100 KiB", requests.join_all()).await {
        assert!(answer.unwrap() == body, "an echo differs");
    }
    drop(held);
}

/// A streaming route that answers with 64 KiB chunks for as long as it is read.
fn download() -> impl rustorium_p2p::StreamHandler {
    |_ctx: RequestContext, _body: BodyReader, mut answer: AnswerWriter| async move {
        for _ in 0..1_000_000 {
            answer.write(vec![0u8; 64 * 1024]).await?;
        }
        Ok::<_, HandlerError>(())
    }
}

/// Reads `answer` until it ends; its error, if it ends in one.
async fn read_out(answer: &mut rustorium_p2p::AnswerStream) -> Option<RequestError> {
    loop {
        match answer.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

#[tokio::test]
async fn a_long_answer_to_a_small_request_holds_a_slot_no_longer_than_a_buffered_one() {
    // A download asked for with a small body: when its answer starts, its handler slot is
    // traded for a transfer slot; with none free, it keeps the handler slot, and it and
    // its handler get a buffered request's time (request_timeout) from then. The node's
    // limits always count it, and no download holds a handler slot for longer.
    let mut config = common::config();
    config.limits.max_concurrent_requests = 1;
    config.limits.max_concurrent_transfers = 1;
    config.limits.request_timeout = Duration::from_secs(1);
    config.limits.answer_timeout = Duration::from_secs(30);
    let server = Node::builder()
        .config(config)
        .streaming_route("stream/download", download())
        .streaming_route(
            "stream/stall",
            |_ctx: RequestContext, _body: BodyReader, mut answer: AnswerWriter| async move {
                answer.write("a start").await?;
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(())
            },
        )
        .route("echo", |_ctx, body: Bytes| async move { Ok(body) })
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let peer = server.peer_id();
    let open = |route: &'static str| {
        let client = client.clone();
        async move {
            let (body, mut answer) = client.open_request(peer, route).await.unwrap();
            body.finish().unwrap();
            assert!(within("a first chunk", answer.chunk())
                .await
                .unwrap()
                .is_some());
            answer
        }
    };
    // The first takes the one transfer slot and goes on past request_timeout.
    let mut first = open("stream/download").await;
    // The second keeps the one handler slot: buffered requests are BUSY meanwhile...
    let mut second = open("stream/download").await;
    let err = within("busy", client.request(peer, "echo", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::Remote { status: Status::Busy, message, .. } if message.contains("max_concurrent_requests")),
        "{err:?}"
    );
    // ... until it ends at its request_timeout, however fast it is read.
    let ended = within("the second download's end", read_out(&mut second)).await;
    assert!(
        matches!(ended, Some(RequestError::TransferTimedOut { .. })),
        "{ended:?}"
    );
    let answer = within("echo", client.request(peer, "echo", "x"))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"x");
    // A handler that stops writing after its start is dropped at the same time.
    let mut stalled = open("stream/stall").await;
    let ended = within("the stalled answer's end", read_out(&mut stalled)).await;
    assert!(
        matches!(ended, Some(RequestError::TransferTimedOut { .. })),
        "{ended:?}"
    );
    // The first, with its transfer slot, went on all along.
    assert!(within("the first goes on", first.chunk())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn an_answer_cut_by_a_cancelled_write_is_reset_not_finished() {
    let server = builder()
        .streaming_route(
            "stream/cut",
            |_ctx: RequestContext, _body: BodyReader, mut answer: AnswerWriter| async move {
                // A write larger than the requester's window, given up midway.
                let big = vec![1u8; 4 << 20];
                let cut = tokio::time::timeout(Duration::from_millis(50), answer.write(big)).await;
                assert!(cut.is_err(), "the write should not fit the window");
                Ok::<_, HandlerError>(())
            },
        )
        .bind()
        .await
        .unwrap();
    let mut config = common::config();
    config.transport.stream_receive_window = 64 * 1024;
    let client = Node::builder().config(config).bind().await.unwrap();
    within("connect", client.connect(&server.peer_addr()))
        .await
        .unwrap();
    let (body, answer) = client
        .open_request(server.peer_id(), "stream/cut")
        .await
        .unwrap();
    body.finish().unwrap();
    // Not read until the handler has given up its write (the window holds it back).
    common::eventually("the handler returned", || {
        common::metric_sum(&server, &["requests_total", "stream/cut"]) == 1.0
    })
    .await;
    let err = within("answer", answer.read_to_end(8 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::Remote { status: Status::HandlerError, message, .. } if message.contains("incomplete")),
        "a cut answer must not read as complete: {err:?}"
    );
}

#[tokio::test]
async fn an_answer_may_wait_for_an_upload_longer_than_the_timeout() {
    // The route answers once it has the whole body; the upload takes longer than the
    // requester's timeout, but it keeps moving, so the answer's wait does not run out.
    let (tx, _ended) = mpsc::unbounded_channel();
    let server = builder()
        .streaming_route("stream/count", reporting(tx))
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let options = RequestOptions::new().timeout(Duration::from_millis(300));
    let (mut body, answer) = client
        .open_request_with(server.peer_id(), "stream/count", options)
        .await
        .unwrap();
    let answer = tokio::spawn(answer.read_to_end(64));
    for _ in 0..12 {
        body.write(vec![0u8; 1024]).await.unwrap();
        // The upload's pace (load shape, not synchronisation): 12 x 100 ms.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    body.finish().unwrap();
    let answer = within("answer", answer).await.unwrap().unwrap();
    assert_eq!(&answer[..], b"12288");
}

#[tokio::test]
async fn a_body_read_whole_for_want_of_a_transfer_slot_still_meets_the_routes_limit() {
    let mut config = common::config();
    config.limits.max_concurrent_transfers_per_peer = 1;
    let server = Node::builder()
        .config(config)
        .streaming_route_with("stream/echo", StreamLimits::new().max_body(32 * 1024), echo)
        .bind()
        .await
        .unwrap();
    let client = connected(&server).await;
    let peer = server.peer_id();
    let (mut held, _answer) = client.open_request(peer, "stream/echo").await.unwrap();
    held.write(vec![0u8; 20 * 1024]).await.unwrap();
    common::eventually("the held transfer is running", || {
        common::metric_sum(&server, &["streams_active"]) >= 1.0
    })
    .await;
    let err = within(
        "too large",
        client.request(peer, "stream/echo", vec![0u8; 100 * 1024]),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, RequestError::TooLarge { message, .. } if message.contains("32768")),
        "{err:?}"
    );
    drop(held);
}
