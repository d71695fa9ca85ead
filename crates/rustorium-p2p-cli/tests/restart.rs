//! A known peer that is a real `rustorium-p2p node` process: killed, restarted on the same
//! address with the same key, and reconnected.

use std::time::Duration;

use rustorium_p2p::{Config, DisconnectReason, Keypair, Node, PeerEvent, RequestError};
use tokio::sync::broadcast;

/// Bound on any single wait in a test.
const WAIT: Duration = Duration::from_secs(10);

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

fn fast_reconnect_config() -> Config {
    let mut config = Config::default();
    config.node.listen = "127.0.0.1:0".parse().unwrap();
    config.transport.max_idle_timeout = Duration::from_millis(1500);
    config.transport.keep_alive_interval = Some(Duration::from_millis(300));
    config.limits.connect_timeout = Duration::from_millis(500);
    config.limits.reconnect_min_backoff = Duration::from_millis(50);
    config.limits.reconnect_max_backoff = Duration::from_millis(400);
    config
}

/// A `rustorium-p2p node` process on a given port with a given key.
struct NodeProcess(std::process::Child);

impl NodeProcess {
    fn start(key: &std::path::Path, listen: &str) -> (NodeProcess, String) {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rustorium-p2p"))
            .args(["node", "--key", key.to_str().unwrap(), "--listen", listen])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).expect("node printed no address");
        (NodeProcess(child), line.trim().to_string())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

/// The sum of the client-side counts of `family` for `route` in `node`'s metrics.
fn metric_value(node: &Node, family: &str, route: &str) -> f64 {
    let route = format!("route=\"{route}\"");
    node.metrics_text()
        .lines()
        .filter(|l| l.contains(family) && l.contains(&route) && l.contains("side=\"client\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_known_peer_that_crashes_and_restarts_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("b.key");
    Keypair::generate().save(&key).unwrap();
    let (b, b_addr) = NodeProcess::start(&key, "127.0.0.1:0");
    let b_addr: rustorium_p2p::PeerAddr = b_addr.parse().unwrap();

    let a = Node::builder()
        .config(fast_reconnect_config())
        .bind()
        .await
        .unwrap();
    let mut events = a.events();
    a.add_known_peer(b_addr);
    assert_eq!(a.known_peers(), vec![b_addr.peer_id]);
    wait_event(&mut events, "first connection", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    assert_eq!(a.request(b_addr.peer_id, "sys/ping", "").await.unwrap(), "");

    // Traffic keeps flowing while the peer dies: 16 requesters, each always with one
    // request out, so some are in flight at the moment of the kill.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut traffic = tokio::task::JoinSet::new();
    for t in 0..16u32 {
        let (a, peer, stop) = (a.clone(), b_addr.peer_id, stop_rx.clone());
        traffic.spawn(async move {
            let mut errors = Vec::new();
            for i in 0..100_000u32 {
                if *stop.borrow() {
                    break;
                }
                let sent = tokio::time::Instant::now();
                if let Err(e) = a.request(peer, "sys/echo", format!("{t}/{i}")).await {
                    errors.push((sent, e));
                }
            }
            errors
        });
    }
    // A few answers first, so the requesters are under way.
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric_value(&a, "requests_total", "sys/echo") < 64.0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(b); // SIGKILL: no close frame, the connection just goes silent
    let gone = wait_event(&mut events, "disconnect", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;
    let noticed_at = tokio::time::Instant::now();
    match gone {
        PeerEvent::Disconnected { reason, .. } => assert_eq!(reason, DisconnectReason::IdleTimeout),
        other => unreachable!("{other:?}"),
    }
    let _ = stop_tx.send(true);
    let mut errors = Vec::new();
    let all = tokio::time::timeout(WAIT, async {
        while let Some(done) = traffic.join_next().await {
            errors.extend(done.unwrap());
        }
    });
    all.await
        .expect("requesters still waiting after the disconnect");
    // The requests in flight on the dead connection (sent before the node noticed it was
    // dead: a request just before the kill may still have been answered, and requests
    // after the notice fail at the dial instead) fail as lost or timed out.
    let in_flight = errors
        .iter()
        .filter(|(sent, e)| {
            *sent < noticed_at
                && matches!(
                    e,
                    RequestError::Timeout { .. } | RequestError::ConnectionLost { .. }
                )
        })
        .count();
    assert!(
        in_flight > 0,
        "no request in flight on the dead connection failed as lost ({} errors): {:?}",
        errors.len(),
        errors
            .iter()
            .map(|(_, e)| e.to_string())
            .collect::<Vec<_>>()
    );
    for (_, e) in &errors {
        assert!(
            matches!(
                e,
                RequestError::Timeout { .. }
                    | RequestError::ConnectionLost { .. }
                    | RequestError::Connect(_)
            ),
            "unclear error: {e:?}"
        );
    }
    // Nothing of the dead connection is left behind.
    let gauge = |name: &str| {
        let text = a.metrics_text();
        let prefix = format!("rustorium_p2p_{name} ");
        let found = text
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_string));
        found.unwrap()
    };
    assert_eq!(gauge("connections_active"), "0");
    let deadline = tokio::time::Instant::now() + WAIT;
    while gauge("streams_active") != "0" && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(gauge("streams_active"), "0");

    let (_b, again) = NodeProcess::start(&key, &b_addr.addr.to_string());
    assert_eq!(again, b_addr.to_string(), "same key, same address");
    let started = tokio::time::Instant::now();
    wait_event(&mut events, "reconnection", |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    // Bound: one dial that may have been in flight when the peer came back, plus the
    // longest backoff (with jitter) and the new handshake.
    let bound = Duration::from_millis(500 + 500 + 2000);
    assert!(
        started.elapsed() < bound,
        "reconnected after {:?}",
        started.elapsed()
    );
    assert_eq!(a.request(b_addr.peer_id, "sys/ping", "").await.unwrap(), "");
    // The known-peer task counts the reconnection once it sees the handshake complete,
    // as the `Connected` event's announcer does, in a task of its own: the count may
    // trail the event, so it is waited for, bounded. (CI once read 0 here; with the wait,
    // a run still saw 0 after 10 s: the task told connections apart by `stable_id`, which
    // a new connection can inherit from the freed old one.)
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.stats().reconnects == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(a.stats().reconnects >= 1, "{:?}", a.stats());

    // Once removed, the peer is no longer redialed.
    assert!(a.remove_known_peer(&b_addr.peer_id));
    assert!(a.known_peers().is_empty());
}
