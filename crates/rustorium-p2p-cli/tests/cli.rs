//! The `rustorium-p2p` binary, run as real processes talking over 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_rustorium-p2p");
const WAIT: Duration = Duration::from_secs(20);

/// A running `node` process, killed if the test ends early.
struct NodeProcess {
    child: Option<Child>,
    peer_addr: String,
}

impl NodeProcess {
    fn start(data_dir: &Path, extra: &[&str]) -> NodeProcess {
        Self::listening(data_dir, "127.0.0.1:0", extra)
    }

    /// A node on `listen`, as `--listen` takes it.
    fn listening(data_dir: &Path, listen: &str, extra: &[&str]) -> NodeProcess {
        let mut child = Command::new(BIN)
            .args(["node", "--listen", listen])
            .args(extra)
            .env("RUSTORIUM_P2P_DATA_DIR", data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut node = NodeProcess {
            child: Some(child),
            peer_addr: String::new(),
        };
        let line = rx
            .recv_timeout(WAIT)
            .expect("node printed no address in time");
        node.peer_addr = line.trim().to_string();
        assert!(
            node.peer_addr.contains("@127.0.0.1:") || node.peer_addr.contains("@[::1]:"),
            "first line: {line:?}"
        );
        node
    }

    fn peer_id(&self) -> &str {
        self.peer_addr.split('@').next().unwrap()
    }

    /// Sends SIGTERM and returns the exit status (bounded wait).
    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        let killed = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status();
        assert!(killed.unwrap().success());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        rx.recv_timeout(WAIT)
            .expect("node did not exit after SIGTERM")
            .unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(args: &[&str]) -> Output {
    run_with_stdin(args, b"")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn keygen_and_id_agree_and_keygen_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    let key = key.to_str().unwrap();
    let made = run(&["keygen", "--out", key]);
    assert!(made.status.success(), "{}", stderr(&made));
    let id = stdout(&made).trim().to_string();
    assert_eq!(id.len(), 64);
    let shown = run(&["id", "--key", key]);
    assert!(shown.status.success());
    assert_eq!(stdout(&shown).trim(), id);
    let again = run(&["keygen", "--out", key]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        stdout(&run(&["id", "--key", key])).trim(),
        id,
        "key unchanged"
    );
}

#[test]
fn node_request_send_and_ping_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let made = run(&["keygen", "--out", key.to_str().unwrap()]);
    let id = stdout(&made).trim().to_string();
    let before_start = std::time::Instant::now();
    let node = NodeProcess::start(dir.path(), &["--key", key.to_str().unwrap()]);
    assert_eq!(node.peer_id(), id, "node runs with the named key");
    let addr = node.peer_addr.as_str();

    let echo = run(&["request", addr, "sys/echo", "--data", "hello over quic"]);
    assert!(echo.status.success(), "{}", stderr(&echo));
    assert_eq!(stdout(&echo), "hello over quic");

    let file = dir.path().join("body.bin");
    std::fs::write(&file, vec![b'z'; 100_000]).unwrap();
    let echo = run(&[
        "request",
        addr,
        "sys/echo",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(echo.status.success(), "{}", stderr(&echo));
    assert_eq!(echo.stdout.len(), 100_000);

    let info = run(&["request", addr, "sys/info"]);
    assert!(info.status.success(), "{}", stderr(&info));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["peer_id"], id);
    assert_eq!(info["connections"], 1, "the requester's own connection");
    // The node's own clock: it started after `before_start`, and has run a while.
    let uptime = info["uptime_secs"].as_f64().unwrap();
    let most = before_start.elapsed().as_secs_f64();
    assert!(
        uptime > 0.0 && uptime <= most,
        "uptime {uptime} s, at most {most} s"
    );

    let unknown = run(&["request", addr, "no/such"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("UNKNOWN_ROUTE"),
        "{}",
        stderr(&unknown)
    );

    let sent = run(&["send", addr, "sys/echo", "--data", "one way"]);
    assert!(sent.status.success(), "{}", stderr(&sent));

    let ping = run(&["ping", addr, "--count", "3", "--interval", "0"]);
    assert!(ping.status.success(), "{}", stderr(&ping));
    let text = stdout(&ping);
    assert_eq!(text.matches("seq=").count(), 3, "{text}");
    assert!(text.contains("3 pings, 3 answered, 0 failed"), "{text}");
    assert!(text.contains("rtt min/avg/max"), "{text}");

    assert!(node.terminate().success(), "clean exit on SIGTERM");
}

#[cfg(unix)]
#[test]
fn node_refuses_a_key_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    assert!(run(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&[
        "node",
        "--key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("chmod 600") && err.contains("644"), "{err}");
    assert!(out.stdout.is_empty(), "no node started");
    // Made private, the same file runs a node.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = NodeProcess::start(dir.path(), &["--key", key.to_str().unwrap()]);
    assert!(node.terminate().success());
}

#[test]
fn durations_take_the_config_file_forms() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let addr = node.peer_addr.as_str();
    for timeout in ["2s", "1500ms", "1m", "3"] {
        let out = run(&["request", addr, "sys/ping", "--timeout", timeout]);
        assert!(
            out.status.success(),
            "--timeout {timeout}: {}",
            stderr(&out)
        );
    }
    let ping = run(&["ping", addr, "--count", "2", "--interval", "10ms"]);
    assert!(ping.status.success(), "{}", stderr(&ping));
    for bad in ["0", "0s", "fast", "-1"] {
        let flag = format!("--timeout={bad}");
        let out = run(&["request", addr, "sys/ping", &flag]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--timeout {bad}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("--timeout"), "{}", stderr(&out));
    }
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let lines = log_lines_until_listening(&[]);
    for line in &lines {
        assert!(
            !line.contains('\x1b'),
            "colour codes in a piped log: {line:?}"
        );
    }
}

/// A child process killed when dropped (also when a test fails before it ends it).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node with `extra` flags (default log level) and a channel of its stderr lines.
fn node_with_logs(extra: &[&str], data_dir: &Path) -> (KillOnDrop, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["node", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUSTORIUM_P2P_DATA_DIR", data_dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (KillOnDrop(child), rx)
}

/// Runs a node with `extra` flags and returns its stderr lines up to "node listening".
fn log_lines_until_listening(extra: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let (_node, rx) = node_with_logs(extra, dir.path());
    let mut lines = Vec::new();
    while lines
        .last()
        .is_none_or(|l: &String| !l.contains("node listening"))
    {
        lines.push(
            rx.recv_timeout(WAIT)
                .expect("no 'node listening' log line in time"),
        );
        assert!(lines.len() < 100, "{lines:?}");
    }
    lines
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let lines = log_lines_until_listening(&["--log-format", "json"]);
    for line in &lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
    let listening: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(listening["level"], "INFO");
}

#[test]
fn config_check_says_ok_or_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\nrequest_timeout = \"2s\"\n").unwrap();
    let ok = run(&["config", "check", good.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("ok"), "{}", stdout(&ok));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nrequest_timeout = \"soon\"\n").unwrap();
    let refused = run(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("request_timeout"),
        "names the key: {}",
        stderr(&refused)
    );

    let missing = run(&[
        "config",
        "check",
        dir.path().join("none.toml").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("none.toml"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn a_wrong_peer_id_or_dead_address_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let port = node.peer_addr.rsplit(':').next().unwrap();
    let impostor = format!("{}@127.0.0.1:{port}", "ab".repeat(32));
    let out = run(&["request", &impostor, "sys/ping", "--timeout", "5"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("presented key") && err.contains(node.peer_id()),
        "{err}"
    );

    let out = run(&["request", "nonsense", "sys/ping"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    assert!(stderr(&out).contains("no '@'"), "{}", stderr(&out));
}

#[test]
fn node_without_key_makes_one_in_the_data_dir_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = NodeProcess::start(dir.path(), &[]);
    let id = first.peer_id().to_string();
    assert!(first.terminate().success());
    let key = dir.path().join("node.key");
    let shown = run(&["id", "--key", key.to_str().unwrap()]);
    assert_eq!(stdout(&shown).trim(), id);
    let second = NodeProcess::start(dir.path(), &[]);
    assert_eq!(second.peer_id(), id, "same identity after restart");
}

#[tokio::test]
async fn node_keeps_its_peer_flags_connected() {
    use rustorium_p2p::{Node, PeerEvent};
    let b = Node::builder().bind().await.unwrap();
    let mut events = b.events();
    let dir = tempfile::tempdir().unwrap();
    let peer_flag = b.peer_addr().to_string();
    let a = NodeProcess::start(dir.path(), &["--peer", &peer_flag]);
    let a_id: rustorium_p2p::PeerId = a.peer_id().parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(PeerEvent::Connected { peer, .. })) if peer == a_id => break,
            Ok(Ok(_)) => continue,
            other => panic!("the node never dialed its --peer: {other:?}"),
        }
    }
    assert!(b.connected_peers().contains(&a_id));
    assert!(a.terminate().success());
}

#[test]
fn the_link_command_relays_with_impairments() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let node_addr = node.peer_addr.split('@').nth(1).unwrap().to_string();
    let mut link = Command::new(BIN)
        .args(["link", "--listen", "127.0.0.1:0", "--to", &node_addr])
        .args([
            "--loss",
            "2%",
            "--delay",
            "2ms",
            "--jitter",
            "1ms",
            "--reorder",
            "1%",
            "--seed",
            "5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let link_out = link.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(link_out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let relay = rx.recv_timeout(WAIT);
    let via = relay.map(|line| format!("{}@{}", node.peer_id(), line.trim()));
    let out = via
        .as_ref()
        .map(|via| run(&["request", via, "sys/echo", "--data", "through the link"]));
    let _ = link.kill();
    let _ = link.wait();
    let out = out.expect("the link printed no address");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "through the link");

    let bad = run(&[
        "link",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &node_addr,
        "--loss",
        "150%",
    ]);
    assert_eq!(bad.status.code(), Some(2), "a bad flag is a usage error");
}

#[test]
fn bench_writes_its_table_json_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    let (json, plots) = (dir.path().join("bench.json"), dir.path().join("plots"));
    let out = run(&[
        "bench",
        "--quick",
        "--repeat",
        "1",
        "--only",
        "latency,setup",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("64 B sequential, p50"), "{table}");
    assert!(
        table.contains("set-up at 20 ms RTT: 0-RTT reconnect"),
        "{table}"
    );
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let stacks: std::collections::BTreeSet<&str> = figures
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["stack"].as_str().unwrap())
        .collect();
    assert_eq!(
        stacks.into_iter().collect::<Vec<_>>(),
        ["quinn", "rustorium", "tcp+tls"]
    );
    for chart in ["latency_cdf.svg", "setup.svg"] {
        let svg = std::fs::read_to_string(plots.join(chart)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("rustorium"),
            "{chart}"
        );
    }
}

/// The bench's `64 B sequential, p50` row, from a run that must have succeeded.
fn p50_row(out: &Output) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    let table = stdout(out);
    table
        .lines()
        .find(|l| l.starts_with("64 B sequential, p50"))
        .unwrap_or_else(|| panic!("{table}"))
        .to_string()
}

#[test]
fn bench_target_measures_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let out = run(&[
        "bench",
        "--quick",
        "--repeat",
        "1",
        "--only",
        "latency,rate",
        "--target",
        &node.peer_addr,
    ]);
    let p50 = p50_row(&out);
    // Our column has a figure; the baselines do not run against a remote node.
    let cells: Vec<&str> = p50.split_whitespace().collect();
    assert!(cells.contains(&"-"), "{p50}");
    assert!(!cells[5].starts_with('-'), "{p50}");
    node.terminate();
}

#[test]
fn bench_stacks_runs_only_the_named_stacks() {
    let out = run(&[
        "bench", "--quick", "--repeat", "1", "--only", "latency", "--stacks", "quinn",
    ]);
    let p50 = p50_row(&out);
    // ours, then quinn's figure with its spread, then tcp+tls, then the two ratios.
    assert!(
        p50.contains("p50 (µs)"),
        "the unit comes from the stack measured: {p50}"
    );
    let cells: Vec<&str> = p50.split_whitespace().skip(5).collect();
    assert_eq!(cells[0], "-", "{p50}");
    assert!(cells[1].parse::<f64>().is_ok(), "{p50}");
    assert_eq!(&cells[3..], ["-", "-", "-"], "{p50}");
    let refused = run(&["bench", "--quick", "--stacks", "grpc"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
}

#[test]
fn a_second_node_on_the_same_key_is_refused_and_told_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let first = NodeProcess::start(dir.path(), &[]);
    // The same data directory, no --key: the same key, which the first node holds.
    let second = Command::new(BIN)
        .args(["node", "--listen", "127.0.0.1:0"])
        .env("RUSTORIUM_P2P_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    let message = stderr(&second);
    assert!(
        message.contains("in use by another running node"),
        "{message}"
    );
    assert!(message.contains("--key"), "says how to fix it: {message}");
    // Once the first node has stopped, the key is free again.
    assert!(first.terminate().success());
    let again = NodeProcess::start(dir.path(), &[]);
    drop(again);
}

#[test]
fn a_peer_flag_with_the_nodes_own_peer_id_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let made = run(&["keygen", "--out", key.to_str().unwrap()]);
    let id = stdout(&made).trim().to_string();
    let own = format!("{id}@127.0.0.1:4433");
    let out = Command::new(BIN)
        .args([
            "node",
            "--listen",
            "127.0.0.1:0",
            "--key",
            key.to_str().unwrap(),
        ])
        .args(["--peer", &own])
        .env("RUSTORIUM_P2P_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("own PeerId"), "{}", stderr(&out));

    // In the file's peer list (one list shared by a whole cluster) it is skipped instead.
    let file = dir.path().join("node.toml");
    std::fs::write(&file, format!("[node]\npeers = [\"{own}\"]\n")).unwrap();
    let node = NodeProcess::start(
        dir.path(),
        &[
            "--key",
            key.to_str().unwrap(),
            "--config",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(node.peer_id(), id);
}

#[test]
fn an_empty_data_directory_variable_is_refused_not_ignored() {
    let mut node = Command::new(BIN);
    node.args(["node", "--listen", "127.0.0.1:0"])
        .env("RUSTORIUM_P2P_DATA_DIR", "");
    let out = finish(node, b"");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("RUSTORIUM_P2P_DATA_DIR is set but empty"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn listen_takes_a_host_name_as_peeraddr_does() {
    let dir = tempfile::tempdir().unwrap();
    // `localhost` resolves through /etc/hosts: loopback, no DNS query. `listening`
    // checks that the first line is a loopback PeerAddr.
    NodeProcess::listening(dir.path(), "localhost:0", &[]);
}

/// Runs the binary with `input` on its standard input.
fn run_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args);
    finish(command, input)
}

/// Runs `command` with `input` on its standard input and its output captured; fails the
/// test if it has not ended within [`WAIT`].
fn finish(mut command: Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, &input);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT)
        .expect("command did not finish in time")
        .unwrap()
}

#[test]
fn config_check_refuses_each_newcomer_mistake_in_our_words() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key\n").unwrap();
    let cases = [
        (
            "[limits]\nmax_request_size = -1\n",
            "a size cannot be negative",
        ),
        (
            "[limits]\nmax_request_size = 0\n",
            "must be at least 1 byte",
        ),
        (
            "[limits]\nmax_request_size = 1.5\n",
            "not a whole number of bytes",
        ),
        (
            "[transport]\nmax_udp_payload_size = 70000\n",
            "a UDP payload size is 1200 to 65527 bytes",
        ),
        (
            "[node]\nlog_level = \"verbose\"\n",
            "\"verbose\" is not a level",
        ),
        ("[node]\nlog_level = \"rustorium_p2p=loud\"\n", "\"loud\""),
        (
            "[node]\nkey_file = \"missing.pem\"\n",
            "missing.pem: cannot read it",
        ),
        ("[node]\nkey_file = \"junk.pem\"\n", "junk.pem"),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("node.toml");
        std::fs::write(&file, text).unwrap();
        let out = run(&["config", "check", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(expected), "{text}: {err}");
        assert!(
            !err.contains("untagged") && !err.contains("u16"),
            "{text}: a dependency's words: {err}"
        );
    }
    // A key others may read: the node would refuse it, so the check does too.
    let open = dir.path().join("open.key");
    assert!(run(&["keygen", "--out", open.to_str().unwrap()])
        .status
        .success());
    let mut perms = std::fs::metadata(&open).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&open, perms).unwrap();
    let file = dir.path().join("open.toml");
    std::fs::write(&file, "[node]\nkey_file = \"open.key\"\n").unwrap();
    let out = run(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));

    // A relative key_file is the config file's neighbour, whatever the working directory.
    let key = dir.path().join("node.key");
    assert!(run(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let file = dir.path().join("relative.toml");
    std::fs::write(
        &file,
        "[node]\nkey_file = \"node.key\"\nlog_level = \"rustorium_p2p=debug,warn,hyper=4\"\n",
    )
    .unwrap();
    let out = run(&["config", "check", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn usage_mistakes_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    assert!(run(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let node = NodeProcess::start(dir.path(), &["--key", key.to_str().unwrap()]);
    let addr = node.peer_addr.as_str();
    let long_route = "r".repeat(300);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["request", addr, ""], "route"),
        (vec!["request", addr, &long_route], "route"),
        (vec!["send", addr, ""], "route"),
        (
            vec!["request", addr, "sys/ping", "--key", key.to_str().unwrap()],
            "the key of the node you are asking",
        ),
        (
            vec!["request", addr, "sys/ping", "--timeout", "0"],
            "--timeout",
        ),
        (vec!["demo", "--requests", "0"], "--requests"),
        (vec!["ping", addr, "--count", "0"], "--count"),
        (vec!["bench", "--repeat", "0"], "--repeat"),
        (
            vec!["request", addr, "sys/echo", "--file", "no-such-file"],
            "--file: cannot read no-such-file",
        ),
        (
            vec!["request", addr, "sys/echo", "--key", "no-such.key"],
            "--key: key file no-such.key",
        ),
        (
            vec![
                "link",
                "--listen",
                "127.0.0.1:0",
                "--to",
                "127.0.0.1:9",
                "--burst",
                "0",
            ],
            "--burst",
        ),
        (
            vec![
                "link",
                "--listen",
                "127.0.0.1:0",
                "--to",
                "127.0.0.1:9",
                "--loss",
                "0.5",
            ],
            "needs a % sign",
        ),
    ];
    for (args, expected) in cases {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_dead_address_says_a_node_may_not_be_running() {
    // A port nothing listens on: bound, then freed.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = format!("{}@127.0.0.1:{port}", "ab".repeat(32));
    let out = run(&["request", &peer, "sys/ping", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no answer from 127.0.0.1") && err.contains("is a node running there"),
        "{err}"
    );
    assert!(
        !err.contains("connect_timeout"),
        "a key the client cannot set: {err}"
    );
}

#[test]
fn file_dash_is_standard_input_and_a_terminal_gets_a_final_newline() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let addr = node.peer_addr.as_str();
    let out = run_with_stdin(&["request", addr, "sys/echo", "--file", "-"], b"from stdin");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from stdin", "a pipe gets the bytes exactly");

    // A terminal (a pseudo-terminal made by util-linux's `script`) gets a newline after.
    // Its stderr (log lines) is left out of the terminal; `timeout` bounds the wait.
    let command = format!("{BIN} request {addr} sys/echo --data 'no newline' 2>/dev/null");
    let mut script = Command::new("timeout"); // util-linux `script`, coreutils `timeout`
    script.args(["15", "script", "-qec", &command, "/dev/null"]);
    let out = finish(script, b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "no newline\r\n");
}

#[test]
fn link_prints_what_it_relayed_on_sigterm() {
    let mut link = Command::new(BIN)
        .args(["link", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = link.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        let first = lines.next();
        let _ = tx.send(first);
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let _ = tx.send(Some(Ok(rest.join("\n"))));
    });
    rx.recv_timeout(WAIT).expect("the link printed no address");
    let pid = link.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest = rx
        .recv_timeout(WAIT)
        .expect("the link did not stop on SIGTERM");
    let rest = rest.unwrap().unwrap();
    let _ = link.wait();
    assert!(rest.contains("delivered 0 dropped 0"), "{rest:?}");
}

/// A `--peer` nobody answers for shows at the default log level, with the reason, and
/// is not repeated at WARN on every retry.
#[test]
fn an_unreachable_peer_flag_is_logged_at_warn_with_the_reason() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = format!("{}@127.0.0.1:{port}", "ab".repeat(32));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    // Quick retries, so that several fail within the test's wait.
    std::fs::write(
        &config,
        "[limits]\nconnect_timeout = \"300ms\"\nreconnect_min_backoff = \"50ms\"\nreconnect_max_backoff = \"20s\"\n",
    )
    .unwrap();
    let flags = ["--peer", &peer, "--config", config.to_str().unwrap()];
    let (_node, rx) = node_with_logs(&flags, dir.path());
    // The first failure is a WARN naming the reason.
    let deadline = std::time::Instant::now() + WAIT;
    let warned = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("no WARN about the unreachable peer in time");
        if line.contains("cannot reach known peer") {
            break line;
        }
    };
    assert!(warned.contains("WARN"), "{warned}");
    assert!(
        warned.contains("no answer within connect_timeout"),
        "{warned}"
    );
    // Retries follow every 50 ms to 1.6 s for the next 2.5 s; none of them warns again
    // (the next WARN is due 20 s after the first).
    let quiet_until = std::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(line) =
        rx.recv_timeout(quiet_until.saturating_duration_since(std::time::Instant::now()))
    {
        assert!(
            !line.contains("cannot reach known peer"),
            "repeated: {line}"
        );
    }
}

#[test]
fn file_and_out_stream_bodies_far_past_max_request_size() {
    let dir = tempfile::tempdir().unwrap();
    // Buffered bodies may be 64 KiB here; `--file` and `--out` stream through sys/echo.
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[limits]\nmax_request_size = \"64KiB\"\n").unwrap();
    let node = NodeProcess::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let addr = node.peer_addr.as_str();
    let body: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let file = dir.path().join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let out = dir.path().join("answer.bin");
    let (file, out) = (file.to_str().unwrap(), out.to_str().unwrap());

    let echo = run(&["request", addr, "sys/echo", "--file", file, "--out", out]);
    assert!(echo.status.success(), "{}", stderr(&echo));
    assert!(echo.stdout.is_empty(), "the answer went to --out");
    assert!(std::fs::read(out).unwrap() == body, "the echo differs");
    // No progress line when standard error is not a terminal.
    assert!(!stderr(&echo).contains("sent "), "{}", stderr(&echo));

    // To standard output, and as a one-way message.
    let echo = run(&["request", addr, "sys/echo", "--file", file]);
    assert!(echo.status.success(), "{}", stderr(&echo));
    assert!(echo.stdout == body, "the echo on stdout differs");
    let sent = run(&["send", addr, "sys/echo", "--file", file]);
    assert!(sent.status.success(), "{}", stderr(&sent));

    // Over the node's limit for streamed bodies: refused, naming the limit.
    let small = dir.path().join("small.toml");
    std::fs::write(&small, "[limits]\nmax_stream_body_size = \"1MiB\"\n").unwrap();
    let other = tempfile::tempdir().unwrap();
    let strict = NodeProcess::start(other.path(), &["--config", small.to_str().unwrap()]);
    let refused = run(&[
        "request",
        &strict.peer_addr,
        "sys/echo",
        "--file",
        file,
        "--out",
        out,
    ]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("max_stream_body_size"),
        "{}",
        stderr(&refused)
    );

    // A buffered body that size is still refused, naming the limit.
    let big = String::from_utf8(vec![b'a'; 100_000]).unwrap();
    let refused = run(&["request", addr, "sys/ping", "--data", &big]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("max_request_size"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn an_out_file_that_cannot_be_made_or_a_directory_to_send_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let addr = node.peer_addr.as_str();
    let nowhere = dir.path().join("no/such/dir/answer.bin");
    let out = run(&[
        "request",
        addr,
        "sys/echo",
        "--data",
        "x",
        "--out",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--out: cannot create"),
        "{}",
        stderr(&out)
    );
    let folder = dir.path().to_str().unwrap();
    let out = run(&["request", addr, "sys/echo", "--file", folder]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is a directory"), "{}", stderr(&out));
}

#[test]
fn a_transfer_longer_than_a_moment_shows_progress_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(dir.path(), &[]);
    let addr = node.peer_addr.as_str();
    let out = dir.path().join("answer.bin");
    let out = out.to_str().unwrap();
    // A body that takes two seconds to come (the shell's pause shapes the load; nothing
    // waits on it), sent from a pseudo-terminal made by `script`.
    let command = format!(
        "(printf start; sleep 2; printf end) | {BIN} request {addr} sys/echo --file - --out {out}"
    );
    let mut script = Command::new("timeout");
    script.args(["15", "script", "-qec", &command, "/dev/null"]);
    let shown = finish(script, b"");
    assert!(shown.status.success(), "{}", stderr(&shown));
    let terminal = stdout(&shown);
    assert!(terminal.contains("sent 5 B, received 5 B"), "{terminal:?}");
    assert_eq!(std::fs::read(out).unwrap(), b"startend");
}
