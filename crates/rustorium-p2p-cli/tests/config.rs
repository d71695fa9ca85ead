//! Configuration files: the default file, validation from the real binary (exit code 2
//! with a message naming the key).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use std::time::Duration;

use rustorium_p2p::{Config, CongestionController};
use rustorium_p2p_cli::config_file::FileConfig;

/// Bound on any single wait in a test.
const WAIT: Duration = Duration::from_secs(10);

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
    assert_eq!(
        FileConfig::from_toml_str(&text).unwrap(),
        FileConfig::default()
    );
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
    // A private copy: `node` refuses key files others can read before looking inside.
    let ec_key = dir.path().join("ec.pem");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rustorium-p2p/tests/fixtures/openssl-p256-pkcs8.pem");
    std::fs::copy(&fixture, &ec_key).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ec_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
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
