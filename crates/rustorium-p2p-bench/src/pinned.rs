//! Servers in processes of their own, pinned to one CPU, the client pinned to another:
//! the per-core comparison. The raw quinn server runs on a single-threaded runtime, its
//! strongest configuration; our server is a node as the CLI runs it (its I/O on a thread
//! of its own). Besides requests per second and latency, each server's CPU time per
//! request is read from `/proc/<pid>/stat`.
//!
//! Pinning uses `taskset` (util-linux). With fewer than two CPUs, or without `taskset`,
//! nothing is pinned and the figures say so.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::future::join_all;
use rustorium_p2p::{Node, PeerAddr};

use crate::baselines::{quinn_call, QuinnClient};
use crate::scenarios::ECHO;

/// The CPUs this process may use, counted once (before any pinning).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether pinning is possible here: two CPUs or more, and `taskset`.
pub fn can_pin() -> bool {
    cpus() >= 2 && Command::new("taskset").arg("-V").output().is_ok()
}

/// A server child, pinned to CPU 0 when possible; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(stack: &str, pin: bool) -> anyhow::Result<Server> {
        let exe = std::env::current_exe()?;
        let mut args: Vec<String> = vec!["bench-server".into(), "--stack".into(), stack.into()];
        if stack == "quinn" {
            args.push("--current-thread".into());
        }
        let mut command = if pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("0").arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let mut child = command
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::ensure!(!line.trim().is_empty(), "bench-server printed no address");
        Ok(Server {
            child,
            addr: line.trim().to_string(),
        })
    }

    /// CPU time the server has used so far (user and system).
    fn cpu(&self) -> Duration {
        cpu_time(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU time of process `pid`, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let total = ticks(11) + ticks(12);
    Duration::from_secs_f64(total as f64 / 100.0) // USER_HZ is 100 on Linux
}

/// Pins every thread of this process to `cpus` (a taskset list), when possible.
fn pin_self(cpus: &str) {
    let pid = std::process::id().to_string();
    let _ = Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid])
        .stdout(Stdio::null())
        // Threads may end while taskset walks them; it says so, harmlessly.
        .stderr(Stdio::null())
        .status();
}

/// A client of one stack, connected to its pinned server.
enum Client {
    Ours(Node, rustorium_p2p::PeerId),
    /// The connection, and the client endpoint it needs alive.
    Quinn(quinn::Connection, #[allow(dead_code)] QuinnClient),
}

impl Client {
    async fn call(&self, body: Bytes) -> anyhow::Result<Bytes> {
        match self {
            Client::Ours(node, peer) => Ok(node.request(*peer, ECHO, body).await?),
            Client::Quinn(conn, _) => quinn_call(conn, body).await,
        }
    }
}

/// What one stack did, pinned.
pub struct Pinned {
    /// (scenario, unit, value).
    pub figures: Vec<(String, &'static str, f64)>,
}

/// Runs the pinned scenarios on `stack` (`rustorium` or `quinn`).
pub async fn measure(stack: &str, requests: usize, sequential: usize) -> anyhow::Result<Pinned> {
    let pin = can_pin();
    let server = Server::start(stack, pin)?;
    if pin {
        pin_self("1");
    }
    let result = run(stack, &server, requests, sequential).await;
    if pin {
        pin_self(&format!("0-{}", cpus() - 1));
    }
    let mut figures = result?;
    if !pin {
        for f in &mut figures {
            f.0.push_str(" (not pinned: fewer than 2 CPUs or no taskset)");
        }
    }
    Ok(Pinned { figures })
}

async fn run(
    stack: &str,
    server: &Server,
    requests: usize,
    sequential: usize,
) -> anyhow::Result<Vec<(String, &'static str, f64)>> {
    let client = match stack {
        "rustorium" => {
            let addr: PeerAddr = server.addr.parse()?;
            let node = Node::builder().config(crate::bench_config()).bind().await?;
            node.connect(&addr).await?;
            Client::Ours(node, addr.peer_id)
        }
        _ => {
            let quinn = QuinnClient::new()?;
            let conn = quinn.connect(server.addr.parse()?, false).await?;
            Client::Quinn(conn, quinn)
        }
    };
    let mut figures = Vec::new();
    // Sequential 64-byte requests.
    let body = Bytes::from(vec![7u8; 64]);
    let mut times = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let start = Instant::now();
        client.call(body.clone()).await?;
        times.push(start.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        let micros = at(q).as_secs_f64() * 1e6;
        figures.push((format!("pinned: 64 B sequential, {name}"), "µs", micros));
    }
    // 64 in flight, 64 B and 1 KiB: requests per second and the server's CPU per request.
    for size in [64usize, 1024] {
        let body = Bytes::from(vec![3u8; size]);
        let in_flight = 64;
        let per_worker = requests.div_ceil(in_flight);
        let cpu_before = server.cpu();
        let start = Instant::now();
        let workers = (0..in_flight).map(|_| {
            let (client, body) = (&client, body.clone());
            async move {
                for _ in 0..per_worker {
                    let answer = client.call(body.clone()).await?;
                    anyhow::ensure!(answer.len() == body.len(), "short answer");
                }
                Ok(())
            }
        });
        for done in join_all(workers).await {
            done?;
        }
        let took = start.elapsed();
        let cpu = server.cpu().saturating_sub(cpu_before);
        let total = (per_worker * in_flight) as f64;
        let name = format!("pinned: {size} B, 64 in flight");
        figures.push((name.clone(), "req/s", total / took.as_secs_f64()));
        let per_request = cpu.as_secs_f64() * 1e6 / total;
        figures.push((format!("{name}, server CPU per request"), "µs", per_request));
    }
    if let Client::Ours(node, _) = client {
        node.shutdown().await;
    }
    Ok(figures)
}
