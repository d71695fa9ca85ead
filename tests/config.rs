//! Configuration: the default file, validation from the real binary (exit code 2 with a
//! message naming the key), and transport settings that must reach quinn.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::WAIT;
use rustorium_p2p::{Bytes, Config, CongestionController, DisconnectReason, Node, PeerEvent};

const BIN: &str = env!("CARGO_BIN_EXE_rustorium-p2p");

fn run(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .env(
            "RUSTORIUM_P2P_DATA_DIR",
            std::env::temp_dir().join("rustorium-p2p-config-tests"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT)
        .expect("command did not finish in time")
        .unwrap()
}

fn default_file() -> String {
    let out = run(&["config", "default"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_printed_default_config_reads_back_as_the_defaults() {
    let text = default_file();
    assert_eq!(Config::from_toml_str(&text).unwrap(), Config::default());
    // Spot checks of the documented defaults.
    let config = Config::default();
    assert_eq!(config.transport.max_concurrent_uni_streams, 1000);
    assert_eq!(config.transport.max_idle_timeout, Duration::from_secs(30));
    assert_eq!(
        config.transport.keep_alive_interval,
        Some(Duration::from_secs(5))
    );
    assert_eq!(config.transport.initial_rtt, Duration::from_millis(100));
    assert_eq!(
        config.transport.congestion_controller,
        CongestionController::Cubic
    );
}

#[test]
fn a_node_runs_from_the_printed_default_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, default_file()).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "node",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUSTORIUM_P2P_DATA_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(WAIT);
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("no address printed");
    assert!(line.contains("@127.0.0.1:"), "{line}");
}

/// Writes `body` as a config file and starts `node` with it; returns the output.
fn node_with(body: &str, extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, body).unwrap();
    let mut args = vec!["node", "--config", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn each_invalid_setting_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ec_key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/openssl-p256-pkcs8.pem");
    let missing_key = dir.path().join("missing.pem");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "[limits]\nrequest_timout = \"1s\"\n".into(),
            vec!["line 2", "request_timout"],
        ),
        (
            "[transport]\nmax_idle_timeout = 30\n".into(),
            vec!["line 2", "transport.max_idle_timeout"],
        ),
        (
            "[limits]\nmax_connections = -1\n".into(),
            vec!["line 2", "limits.max_connections"],
        ),
        (
            "[limits]\nmax_connections = 0\n".into(),
            vec!["limits.max_connections"],
        ),
        (
            "[transport]\ninitial_mtu = 900\n".into(),
            vec!["transport.initial_mtu"],
        ),
        (
            "[transport]\nkeep_alive_interval = \"30s\"\n".into(),
            vec!["transport.keep_alive_interval", "max_idle_timeout"],
        ),
        (
            "[transport]\ncongestion_controller = \"vegas\"\n".into(),
            vec!["transport.congestion_controller", "vegas"],
        ),
        (
            "[node]\npeers = [\"not-a-peer\"]\n".into(),
            vec!["node.peers", "no '@'"],
        ),
        (
            "[node]\nlisten = \"localhost\"\n".into(),
            vec!["node.listen"],
        ),
        (
            format!("[node]\nkey_file = \"{}\"\n", missing_key.display()),
            vec!["missing.pem", "cannot read"],
        ),
        (
            format!("[node]\nkey_file = \"{}\"\n", ec_key.display()),
            vec!["Ed25519"],
        ),
        ("this is not toml".into(), vec!["line 1"]),
    ];
    for (body, expect) in cases {
        let out = node_with(&body, &["--listen", "127.0.0.1:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{body:?} -> {err}");
        for word in expect {
            assert!(err.contains(word), "{body:?}: expected {word:?} in: {err}");
        }
        assert!(out.stdout.is_empty(), "nothing started for {body:?}");
    }
}

#[test]
fn an_address_in_use_exits_2() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = node_with("", &["--listen", &addr]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}

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
    let a = Arc::new(Node::builder().bind().await.unwrap());
    a.connect(&b.peer_addr()).await.unwrap();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..12u32 {
        let (a, peer) = (a.clone(), b.peer_id());
        requests.spawn(async move { a.request(peer, "hold", i.to_string()).await });
    }
    // Let one request finish for each one that starts.
    for _ in 0..12 {
        tokio::time::timeout(WAIT, started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        gate.add_permits(1);
    }
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
    let a = Arc::new(Node::builder().bind().await.unwrap());
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
