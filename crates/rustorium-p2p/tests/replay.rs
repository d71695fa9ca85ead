//! A recorded 0-RTT first flight, replayed: the idempotent (early-data) handler runs
//! exactly once, and a route that did not opt into early data never runs on the copy
//! (docs/PROTOCOL.md, "Replay, and who decides").

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, metric_sum as metric};
use rustorium_p2p::{Bytes, Node, PeerAddr, RequestContext, RequestOptions};
use tokio::net::UdpSocket;

/// A UDP relay between one client and `server` that records what the client sends before
/// the server first answers: a connection's first flight (Initial and 0-RTT packets).
struct Recorder {
    addr: SocketAddr,
    first_flight: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(server: SocketAddr) -> Recorder {
        let client_side = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = client_side.local_addr().unwrap();
        let first_flight = Arc::new(Mutex::new(Vec::new()));
        let recorded = first_flight.clone();
        let answered = AtomicBool::new(false);
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = client_side.recv_from(&mut up) => {
                        client = Some(from);
                        if !answered.load(Ordering::SeqCst) {
                            recorded.lock().unwrap().push(up[..n].to_vec());
                        }
                        let _ = upstream.send_to(&up[..n], server).await;
                    }
                    Ok(n) = upstream.recv(&mut down) => {
                        answered.store(true, Ordering::SeqCst);
                        if let Some(client) = client {
                            let _ = client_side.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        // `upstream` is unconnected: the first send from it picks its port.
        Recorder {
            addr,
            first_flight,
            task,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_replayed_0rtt_flight_runs_no_handler_a_second_time() {
    let idempotent_runs = Arc::new(AtomicUsize::new(0));
    let plain_runs = Arc::new(AtomicUsize::new(0));
    let (i, p) = (idempotent_runs.clone(), plain_runs.clone());
    let mut config = common::config();
    config.limits.handshake_timeout = Duration::from_secs(1);
    config.limits.request_timeout = Duration::from_secs(1);
    let server = Node::builder()
        .config(config)
        .early_data_route("idem", move |_ctx: RequestContext, _body| {
            let i = i.clone();
            async move {
                i.fetch_add(1, Ordering::SeqCst);
                Ok(Bytes::from_static(b"idem"))
            }
        })
        .route("plain", move |_ctx: RequestContext, _body| {
            let p = p.clone();
            async move {
                p.fetch_add(1, Ordering::SeqCst);
                Ok(Bytes::from_static(b"plain"))
            }
        })
        .bind()
        .await
        .unwrap();
    let to = server.peer_id();
    let client = Node::builder().bind().await.unwrap();
    let mut events = client.events();

    // A first connection, straight to the server: its session tickets arrive.
    client.connect(&server.peer_addr()).await.unwrap();
    client.request(to, "plain", "").await.unwrap();
    client.disconnect(&to);
    eventually("disconnected", || client.connection_count() == 0).await;
    let _ = events.try_recv();

    // The reconnection goes through the recorder: both requests as 0-RTT data.
    let recorder = Recorder::start(server.local_addr()).await;
    client.add_address(PeerAddr::new(to, recorder.addr));
    let early = RequestOptions::new().idempotent(true);
    let (idem, plain) = tokio::join!(
        client.request_with(to, "idem", "x", early.clone()),
        client.request_with(to, "plain", "y", early),
    );
    assert_eq!(idem.unwrap(), "idem");
    assert_eq!(plain.unwrap(), "plain");
    assert_eq!(client.stats().zero_rtt_attempted, 1, "sent as 0-RTT data");
    assert_eq!(idempotent_runs.load(Ordering::SeqCst), 1);
    assert_eq!(plain_runs.load(Ordering::SeqCst), 2);
    let flight = recorder.first_flight.lock().unwrap().clone();
    assert!(!flight.is_empty(), "the first flight was recorded");

    // The genuine connection ends, and the server forgets it.
    client.disconnect(&to);
    eventually("the server forgot the connection", || {
        server.connection_count() == 0
    })
    .await;

    // An attacker replays the recorded flight from an address of its own.
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let failed_before = metric(&server, &["connection_errors"]);
    let timed_out_before = metric(&server, &["requests", "status=\"timed_out\""]);
    // The copy gets nowhere: its handshake never completes (the attacker has no keys),
    // so the server gives it up (handshake_timeout, 1 s), or, had it taken the copy's
    // 0-RTT data, gives the non-early request up unconfirmed (request_timeout, 1 s).
    // (The attacker sends it again until the server takes it as a new connection: for a
    // moment after the genuine one closed, its packets still belong to that one.)
    let given_up = || {
        metric(&server, &["connection_errors"]) > failed_before
            || metric(&server, &["requests", "status=\"timed_out\""]) > timed_out_before
    };
    let mut replays = 0;
    while !given_up() {
        assert!(replays < 10, "the server never took up the replayed flight");
        for datagram in &flight {
            attacker
                .send_to(datagram, server.local_addr())
                .await
                .unwrap();
        }
        replays += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !given_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(
        idempotent_runs.load(Ordering::SeqCst),
        1,
        "the early-data handler ran again on a replay"
    );
    assert_eq!(
        plain_runs.load(Ordering::SeqCst),
        2,
        "an ordinary handler ran on replayed 0-RTT data"
    );
    drop(events);
}
