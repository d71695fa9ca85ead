//! Prometheus metrics scraped over HTTP after real traffic, parsed with a real parser.

use std::collections::HashMap;
use std::time::Duration;

use rustorium_p2p::{Bytes, HandlerError, Node, PeerEvent};
use rustorium_p2p_cli::{metrics_http, system};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on any single wait in a test.
const WAIT: Duration = Duration::from_secs(10);

/// Serves `node`'s metrics as the `node` command does; returns the endpoint's address.
async fn serve_metrics(node: &Node) -> std::net::SocketAddr {
    let listener = metrics_http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let weak = node.downgrade();
    let render = move || weak.upgrade().map(|n| n.metrics_text()).unwrap_or_default();
    tokio::spawn(metrics_http::serve(listener, render));
    addr
}

/// GETs `path` from `addr` and returns (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(WAIT, work).await.expect("scrape hung");
    let (head, body) = response.split_once("\r\n\r\n").expect("no header end");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Metric samples by name and labels, e.g. `requests_total{route=echo,side=server,status=ok}`.
struct Scrape(Vec<prometheus_parse::Sample>);

impl Scrape {
    async fn take(addr: std::net::SocketAddr) -> Scrape {
        let (status, body) = http_get(addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("exposition parses");
        Scrape(parsed.samples)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let name = format!("rustorium_p2p_{name}");
        self.0.iter().find_map(|s| {
            let matches =
                s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
            matches.then(|| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                other => panic!("unexpected value {other:?}"),
            })
        })
    }
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let builder = Node::builder()
        .route("echo", |_ctx, body| async move { Ok(body) })
        .route("fail", |_ctx, _body: Bytes| async move {
            Err(HandlerError::new("no"))
        });
    let (builder, info) = system::routes(builder);
    let b = builder.bind().await.unwrap();
    info.set(&b);
    let metrics = serve_metrics(&b).await;
    let mut events = b.events();

    let before = Scrape::take(metrics).await;
    assert_eq!(before.value("connections_active", &[]), Some(0.0));

    let a = Node::builder().bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    for i in 0..25 {
        a.request(b.peer_id(), "echo", format!("{i}"))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        a.request(b.peer_id(), "nope", "").await.unwrap_err();
    }
    for _ in 0..2 {
        a.request(b.peer_id(), "fail", "").await.unwrap_err();
    }
    a.send(b.peer_id(), "echo", "one way").await.unwrap();
    let info = a.request(b.peer_id(), "sys/info", "").await.unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["stats"]["connections_refused"], 0, "{info}");

    let during = Scrape::take(metrics).await;
    let server = |route, status| {
        during.value(
            "requests_total",
            &[("route", route), ("status", status), ("side", "server")],
        )
    };
    assert_eq!(during.value("connections_active", &[]), Some(1.0));
    assert_eq!(
        during.value("connections_opened_total", &[("direction", "inbound")]),
        Some(1.0)
    );
    assert_eq!(
        server("echo", "ok"),
        Some(26.0),
        "25 requests and 1 one-way message"
    );
    assert_eq!(
        server("unknown", "unknown_route"),
        Some(3.0),
        "unregistered routes share one label"
    );
    assert_eq!(server("fail", "handler_error"), Some(2.0));
    assert_eq!(
        during.value(
            "streams_opened_total",
            &[("kind", "request"), ("direction", "inbound")]
        ),
        Some(31.0)
    );
    assert_eq!(
        during.value("stream_errors_total", &[("reason", "handler_error")]),
        Some(2.0)
    );
    assert!(
        during.value("rtt_seconds", &[]).unwrap() >= 1.0,
        "RTT observed"
    );
    assert!(
        during
            .value("request_duration_seconds", &[("route", "echo")])
            .unwrap()
            >= 25.0
    );
    // The client side of the same requests, from a's own registry.
    let a_text = a.metrics_text();
    assert!(
        a_text.contains(
            "rustorium_p2p_requests_total{route=\"echo\",status=\"ok\",side=\"client\"} 26"
        ),
        "25 requests and 1 message: {a_text}"
    );

    a.shutdown().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(PeerEvent::Disconnected { .. })) => break,
            Ok(Ok(_)) => continue,
            other => panic!("no disconnect: {other:?}"),
        }
    }
    // Statistics are taken when a connection closes too; allow the sampler that runs
    // alongside to finish its last reading.
    let after = wait_for(metrics, |s| {
        s.value("packets_sent_total", &[]).unwrap_or(0.0) > 0.0
    })
    .await;
    assert_eq!(after.value("connections_active", &[]), Some(0.0));
    assert_eq!(
        after.value("packet_loss_ratio", &[]),
        Some(0.0),
        "no loss on loopback"
    );
    assert!(after.value("received_bytes_total", &[]).unwrap() > 0.0);
}

/// Scrapes until `ready` holds (bounded: each scrape follows the previous one's answer).
async fn wait_for(addr: std::net::SocketAddr, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    for _ in 0..10_000 {
        let scrape = Scrape::take(addr).await;
        if ready(&scrape) || tokio::time::Instant::now() > deadline {
            return scrape;
        }
        tokio::task::yield_now().await;
    }
    panic!("metrics never became ready");
}

#[tokio::test]
async fn the_endpoint_serves_only_get_metrics() {
    let b = Node::builder().bind().await.unwrap();
    let addr = serve_metrics(&b).await;
    assert!(http_get(addr, "/").await.0.contains("404"));
    // A client that sends garbage or nothing does not disturb the next scrape.
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(&[0xff; 100]).await.unwrap();
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"));
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    drop((junk, silent));
    let names: HashMap<&str, ()> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| (l.split(' ').next().unwrap(), ()))
        .collect();
    for name in [
        "rustorium_p2p_connections_opened",
        "rustorium_p2p_connections_active",
        "rustorium_p2p_connection_errors",
        "rustorium_p2p_streams_opened",
        "rustorium_p2p_streams_active",
        "rustorium_p2p_stream_errors",
        "rustorium_p2p_rtt_seconds",
        "rustorium_p2p_bandwidth_sent_bytes_per_second",
        "rustorium_p2p_bandwidth_received_bytes_per_second",
        "rustorium_p2p_packet_loss_ratio",
        "rustorium_p2p_sent_bytes",
        "rustorium_p2p_received_bytes",
        "rustorium_p2p_zero_rtt",
        "rustorium_p2p_migrations",
    ] {
        assert!(names.contains_key(name), "{name} missing from:\n{body}");
    }
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_metrics_the_node_exports() {
    let text = include_str!("../../../contrib/grafana/rustorium-p2p.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
    // The names a node exports once it has handled a request.
    let echo = |builder: rustorium_p2p::NodeBuilder| {
        builder.route("echo", |_ctx, body| async move { Ok(body) })
    };
    let a = echo(Node::builder()).bind().await.unwrap();
    let b = echo(Node::builder()).bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    a.request(b.peer_id(), "echo", "").await.unwrap();
    let exposition = a.metrics_text();
    let exported: Vec<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .unwrap()
                .trim_end_matches("_bucket")
                .to_string()
        })
        .collect();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("rustorium_p2p_") {
                    let base = name.trim_end_matches("_bucket");
                    assert!(
                        exported
                            .iter()
                            .any(|e| e == &format!("rustorium_p2p_{base}")),
                        "dashboard uses unknown metric {word}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 15);
}

#[tokio::test]
async fn node_metrics_flag_serves_a_page_prometheus_accepts() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rustorium-p2p"))
        .args([
            "node",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .env("RUSTORIUM_P2P_DATA_DIR", dir.path())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(at) = line.find("http://") {
                let url = line[at + 7..]
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(url);
                return;
            }
        }
    });
    let addr = rx.recv_timeout(WAIT);
    let scrape = match addr {
        Ok(addr) => Ok(Scrape::take(addr.parse().unwrap()).await),
        Err(e) => Err(e),
    };
    let _ = child.kill();
    let _ = child.wait();
    let scrape = scrape.expect("the node logged no metrics address");
    assert_eq!(scrape.value("connections_active", &[]), Some(0.0));
}

#[tokio::test]
async fn slow_clients_cannot_hold_the_endpoint() {
    let b = Node::builder().bind().await.unwrap();
    let addr = serve_metrics(&b).await;
    // One address opens as many connections as it may and sends nothing.
    let mut idle = Vec::new();
    for _ in 0..metrics_http::MAX_SCRAPES_PER_IP {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // A scrape from another address is served at once.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = other.connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("scrape from another address hung")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // One more connection from the first address is dropped without an answer.
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = extra.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, extra.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "served past the per-address limit: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // The idle ones are cut off by the deadline (head within 2 s).
    for mut conn in idle {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "an idle client held its connection past the deadline"
        );
    }
}
