//! Several hosts as Linux network namespaces joined by veth links through a bridge, each
//! running the real `rustorium-p2p node` with its own address and a full mesh of known
//! peers. One host is cut off (its link brought down) and back: the others notice, and
//! the mesh heals. Needs root and iproute2; skipped with a printed reason otherwise.
//! Addresses are from TEST-NET-2 (198.51.100.0/24) and exist only inside the namespaces.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rustorium-p2p");
const HOSTS: usize = 3;
const WAIT: Duration = Duration::from_secs(30);

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {} failed", args.join(" "));
}

/// The namespaces of one run; removed (with their links) when dropped.
struct Lab {
    switch: String,
    hosts: Vec<String>,
    nodes: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            ip(&["netns", "del", ns]);
        }
    }
}

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    if !ip(&["netns", "list"]) {
        return Some("`ip netns` unavailable (iproute2 missing?)".into());
    }
    None
}

fn build_lab() -> Lab {
    let tag = std::process::id() % 100_000;
    let switch = format!("rp{tag}sw");
    let mut lab = Lab {
        switch: switch.clone(),
        hosts: Vec::new(),
        nodes: Vec::new(),
    };
    must(&["netns", "add", &switch]);
    must(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
    must(&["-n", &switch, "link", "set", "br0", "up"]);
    for i in 1..=HOSTS {
        let host = format!("rp{tag}h{i}");
        must(&["netns", "add", &host]);
        lab.hosts.push(host.clone());
        let (inner, outer) = (format!("rp{tag}v{i}"), format!("rp{tag}s{i}"));
        must(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer,
        ]);
        must(&["link", "set", &inner, "netns", &host]);
        must(&["link", "set", &outer, "netns", &switch]);
        must(&["-n", &switch, "link", "set", &outer, "master", "br0"]);
        must(&["-n", &switch, "link", "set", &outer, "up"]);
        must(&[
            "-n",
            &host,
            "addr",
            "add",
            &format!("198.51.100.{i}/24"),
            "dev",
            &inner,
        ]);
        must(&["-n", &host, "link", "set", &inner, "up"]);
        must(&["-n", &host, "link", "set", "lo", "up"]);
    }
    lab
}

/// Runs the binary inside `host` and returns its output.
fn exec(host: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", host, BIN])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The number of connections node `to` reports, asked from `from`.
fn connections(from: &str, to: &str) -> Option<u64> {
    let out = exec(from, &["request", to, "sys/info", "--timeout", "2"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    info["connections"].as_u64()
}

/// Polls `check` (each call is a real request, so no sleeping) until it holds or WAIT passes.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if check() {
            return;
        }
    }
    panic!("{what} did not happen within {WAIT:?}");
}

#[test]
fn a_namespaced_mesh_detects_a_cut_host_and_heals() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let mut lab = build_lab();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[transport]\nmax_idle_timeout = \"1500ms\"\nkeep_alive_interval = \"300ms\"\n\
         [limits]\nconnect_timeout = \"700ms\"\nreconnect_min_backoff = \"50ms\"\nreconnect_max_backoff = \"500ms\"\n",
    )
    .unwrap();
    let mut addrs = Vec::new();
    let mut keys = Vec::new();
    for i in 1..=HOSTS {
        let key = dir.path().join(format!("h{i}.key"));
        let out = Command::new(BIN)
            .args(["keygen", "--out", key.to_str().unwrap()])
            .output()
            .unwrap();
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        addrs.push(format!("{id}@198.51.100.{i}:4433"));
        keys.push(key);
    }
    for i in 0..HOSTS {
        let mut args = vec![
            "node".to_string(),
            "--config".into(),
            config.display().to_string(),
            "--key".into(),
            keys[i].display().to_string(),
            "--listen".into(),
            format!("198.51.100.{}:4433", i + 1),
        ];
        for (j, peer) in addrs.iter().enumerate() {
            if j != i {
                args.extend(["--peer".to_string(), peer.clone()]);
            }
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.hosts[i], BIN])
            .args(&args)
            .env("RUSTORIUM_P2P_DATA_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), addrs[i], "node {i} started at its address");
        lab.nodes.push(child);
    }
    let (h1, h2) = (lab.hosts[0].clone(), lab.hosts[1].clone());

    // The mesh forms: every node holds one connection to each other node. (Asked from a
    // fresh client, whose own connection adds one.)
    for target in &addrs {
        eventually("the full mesh", || {
            connections(&h1, target) == Some(HOSTS as u64)
        });
    }
    // Requests cross between hosts.
    let out = exec(
        &h2,
        &[
            "request",
            &addrs[0],
            "sys/echo",
            "--data",
            "across namespaces",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "across namespaces");

    // Cut host 3 off: the others notice within the idle timeout.
    let cut = format!("rp{}v3", std::process::id() % 100_000);
    must(&["-n", &lab.hosts[2], "link", "set", &cut, "down"]);
    eventually("host 3's loss noticed", || {
        connections(&h1, &addrs[0]) == Some(HOSTS as u64 - 1)
    });
    let out = exec(&h1, &["request", &addrs[2], "sys/ping", "--timeout", "1"]);
    assert!(!out.status.success(), "host 3 is unreachable");

    // And back: known-peer reconnects heal the mesh.
    must(&["-n", &lab.hosts[2], "link", "set", &cut, "up"]);
    for target in &addrs {
        eventually("the mesh healed", || {
            connections(&h2, target) == Some(HOSTS as u64)
        });
    }
}
