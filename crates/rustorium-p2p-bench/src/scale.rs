//! Connection scale: memory per idle connection (each side), file descriptors, and
//! handshake rate. Whatever is measured runs in a process of its own, so that its
//! resident memory is its own: `rustorium-p2p bench-server` accepts (N client nodes of
//! the bench dial it), and `rustorium-p2p bench-client` dials (one node, N connections,
//! to N nodes of a `bench-server --nodes N`). Each side's memory is counted from when its
//! node (or endpoint) is up: what the connections cost, not the node's start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rustorium_p2p::{Bytes, Config, Node, PeerAddr};

use super::baselines::{quinn_call, QuinnClient, QuinnServer};
use futures_util::future::join_all;

use super::scenarios::{bench_routes, ECHO};

/// `bench-server`: a server for the scale scenarios (hidden from `--help`).
#[derive(Args)]
pub struct ServerArgs {
    /// `rustorium`, `quinn`, or `raw-wire` (raw quinn speaking wire v1 with mutual TLS,
    /// the per-core baseline).
    #[arg(long)]
    stack: String,
    /// Where to listen (a remote `bench --target` can then use it; stops when stdin ends).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Run this many nodes (rustorium only, each on a port of its own): one PeerAddr per
    /// line on stdout. The bench dials them all from one node to measure the dialing side.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Run on a single-threaded tokio runtime (raw quinn's strongest configuration).
    #[arg(long)]
    current_thread: bool,
    /// Our node with `io_thread = false` (its I/O on the process's runtime).
    #[arg(long)]
    no_io_thread: bool,
    /// Our node's `transport.max_udp_payload_size`, when not the default.
    #[arg(long)]
    max_udp_payload: Option<u16>,
}

impl ServerArgs {
    /// Whether the server wants a single-threaded runtime.
    pub fn current_thread(&self) -> bool {
        self.current_thread
    }
}

/// Both stream limits at 1000, as in the original design, and room for many connections.
pub fn scale_config() -> Config {
    let mut config = super::bench_config();
    config.transport.max_concurrent_bidi_streams = 1000;
    config.transport.max_concurrent_uni_streams = 1000;
    config.transport.max_idle_timeout = Duration::from_secs(120);
    config.limits.max_connections = 20_000;
    config.limits.max_connections_per_ip = 20_000;
    // Thousands of handshakes from one address at once, on purpose: no per-address
    // handshake limit, and no Retry (it would add a round trip to every set-up measured).
    config.limits.max_handshakes = 20_000;
    config.limits.max_handshakes_per_ip = 20_000;
    config.limits.retry_threshold = 20_000;
    config
}

/// Runs the server until stdin closes; its first stdout lines say where to reach it.
pub async fn serve(args: ServerArgs) -> anyhow::Result<std::process::ExitCode> {
    let _keep: Box<dyn std::any::Any> = match args.stack.as_str() {
        "rustorium" => {
            let mut config = scale_config();
            config.node.listen = args.listen;
            config.node.io_thread = !args.no_io_thread;
            if let Some(size) = args.max_udp_payload {
                config.transport.max_udp_payload_size = size;
            }
            let mut nodes = Vec::with_capacity(args.nodes);
            for _ in 0..args.nodes.max(1) {
                let builder = Node::builder().config(config.clone());
                let node = bench_routes(builder).bind().await?;
                println!("{}", node.peer_addr());
                nodes.push(node);
            }
            Box::new(nodes)
        }
        "quinn" => {
            let server = QuinnServer::start_with_streams(1000, args.listen, true)?;
            println!("{}", server.addr());
            Box::new(server)
        }
        "tcp-tls" => {
            let server = crate::baselines::TcpServer::start_on(args.listen).await?;
            println!("{}", server.addr);
            Box::new(server)
        }
        "raw-wire" => {
            // On one thread, raw quinn at its strongest; on the multi-thread runtime, as
            // quinn's examples run it.
            let serving = if args.current_thread() {
                crate::raw_wire::Serving::InConnectionTask
            } else {
                crate::raw_wire::Serving::TaskPerStream
            };
            let server = crate::raw_wire::server(args.listen, 1000, serving)?;
            println!("{}", server.local_addr()?);
            Box::new(server)
        }
        other => anyhow::bail!("unknown stack {other:?}"),
    };
    // Exit when the bench closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
    })
    .await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// `bench-client`: dials every PeerAddr (or, for quinn, socket address) read from stdin
/// up to an empty line, from one node (one endpoint), and answers on stdout with its
/// resident memory once the node is up and after the connections, in KiB; exits when
/// stdin closes (hidden from `--help`).
#[derive(Args)]
pub struct ClientArgs {
    /// `rustorium` or `quinn`.
    #[arg(long)]
    stack: String,
}

/// Runs `bench-client`.
pub async fn dial(args: ClientArgs) -> anyhow::Result<std::process::ExitCode> {
    let addrs = tokio::task::spawn_blocking(|| -> std::io::Result<Vec<String>> {
        let mut addrs = Vec::new();
        for line in std::io::stdin().lines() {
            let line = line?;
            if line.trim().is_empty() {
                break;
            }
            addrs.push(line.trim().to_string());
        }
        Ok(addrs)
    })
    .await??;
    // Memory is counted from when the node (or endpoint) is up, as on the accepting side
    // (whose reading starts once its server is listening): what the connections cost.
    let before;
    let _keep: Box<dyn std::any::Any> = match args.stack.as_str() {
        "rustorium" => {
            let client = Node::builder().config(scale_config()).bind().await?;
            before = rss_kib("/proc/self/status");
            let addrs = addrs
                .iter()
                .map(|a| a.parse::<PeerAddr>())
                .collect::<Result<Vec<_>, _>>()?;
            for batch in addrs.chunks(64) {
                let dials = batch.iter().map(|addr| {
                    let client = &client;
                    async move {
                        client.connect(addr).await?;
                        client
                            .request(addr.peer_id, ECHO, Bytes::from_static(b"x"))
                            .await?;
                        Ok::<_, anyhow::Error>(())
                    }
                });
                for dialed in join_all(dials).await {
                    dialed?;
                }
            }
            Box::new(client)
        }
        _ => {
            let client = Arc::new(QuinnClient::with_buffers(true)?);
            before = rss_kib("/proc/self/status");
            let mut conns = Vec::new();
            for batch in addrs.chunks(64) {
                let dials = batch.iter().map(|addr| {
                    let client = client.clone();
                    async move {
                        let conn = client.connect(addr.parse()?, false).await?;
                        quinn_call(&conn, Bytes::from_static(b"x")).await?;
                        Ok::<_, anyhow::Error>(conn)
                    }
                });
                for dialed in join_all(dials).await {
                    conns.push(dialed?);
                }
            }
            Box::new((client, conns))
        }
    };
    // Let the connections settle (tickets arrive, handshake state goes).
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("{before} {}", rss_kib("/proc/self/status"));
    tokio::task::spawn_blocking(|| std::io::stdin().lines().count()).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The dialing side on `stack`: one node (one quinn endpoint) in a process of its own
/// connected to `n` servers (our nodes: one each, in another process; quinn: `n`
/// connections to one server). Its resident memory per connection, KiB.
async fn dialing_side(stack: &str, n: usize) -> anyhow::Result<f64> {
    let (servers, mut addrs) =
        BenchProcess::start(stack, if stack == "rustorium" { n } else { 1 })?;
    if stack != "rustorium" {
        addrs = vec![addrs[0].clone(); n];
    }
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["bench-client", "--stack", stack])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let client = BenchProcess(child);
    let answer = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        use std::io::Write as _;
        for addr in &addrs {
            writeln!(stdin, "{addr}")?;
        }
        writeln!(stdin)?;
        stdin.flush()?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        drop(stdin);
        Ok(line)
    })
    .await??;
    drop((client, servers));
    let kib: Vec<u64> = answer
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [before, after] = kib[..] else {
        anyhow::bail!("bench-client failed (it said {answer:?})");
    };
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// A running `bench-server` (or `bench-client`), killed when dropped.
struct BenchProcess(Child);

impl BenchProcess {
    /// Starts `nodes` servers of `stack` in one child process; returns their addresses.
    ///
    /// Many nodes share the process's runtime (`io_thread = false`): each with an I/O
    /// thread of its own would take a thread and five file descriptors, 50,000 at 10,000
    /// nodes, past a common limit of open files.
    fn start(stack: &str, nodes: usize) -> anyhow::Result<(BenchProcess, Vec<String>)> {
        let exe = std::env::current_exe()?;
        let nodes_arg = nodes.to_string();
        let mut args = vec!["bench-server", "--stack", stack, "--nodes", &nodes_arg];
        if nodes > 1 {
            args.push("--no-io-thread");
        }
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let process = BenchProcess(child);
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs = Vec::with_capacity(nodes);
        for _ in 0..nodes {
            let line = lines
                .next()
                .context("bench-server ended before printing its addresses")??;
            addrs.push(line.trim().to_string());
        }
        Ok((process, addrs))
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(&format!("/proc/{}/status", self.0.id()))
    }

    fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0.id())).map_or(0, |d| d.count())
    }
}

impl Drop for BenchProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What one scale run measured.
pub struct Scale {
    /// Server resident memory per connection, KiB.
    pub server_kib: f64,
    /// Dialing-side resident memory per connection, KiB: one node (or one quinn endpoint)
    /// holding all `n` connections.
    pub client_kib: f64,
    /// New connections per second (handshake + first answer), 64 dials at a time (our
    /// client nodes are made before the clock starts).
    pub handshakes_per_sec: f64,
    /// p99 of one dial + first answer, µs.
    pub setup_p99_us: f64,
    /// The server's open file descriptors after all connections, and before.
    pub server_fds: (usize, usize),
}

/// Opens `n` connections to a fresh server of `stack` and measures.
pub async fn measure(stack: &str, n: usize) -> anyhow::Result<Scale> {
    let (server, addrs) = BenchProcess::start(stack, 1)?;
    let addr = &addrs[0];
    let (server_before, fds_before) = (server.rss_kib(), server.open_files());
    let start;
    let mut times = Vec::with_capacity(n);
    let mut keep_ours: Vec<Node> = Vec::new();
    let mut keep_quinn: Vec<quinn::Connection> = Vec::new();
    match stack {
        "rustorium" => {
            let addr: PeerAddr = addr.parse()?;
            let mut clients = Vec::with_capacity(n);
            // Each client a node of its own, sharing this process's runtime (as the
            // servers of `dialing_side` do): an I/O thread each would be 10,000 threads.
            let mut config = super::bench_config();
            config.node.io_thread = false;
            for _ in 0..n {
                clients.push(Node::builder().config(config.clone()).bind().await?);
            }
            start = Instant::now();
            for batch in clients.chunks(64) {
                let dials = batch.iter().map(|node| async move {
                    let t = Instant::now();
                    node.connect(&addr).await?;
                    node.request(addr.peer_id, ECHO, Bytes::from_static(b"x"))
                        .await?;
                    Ok::<_, anyhow::Error>(t.elapsed())
                });
                for dialed in join_all(dials).await {
                    times.push(dialed?);
                }
            }
            keep_ours = clients;
        }
        _ => {
            let client = Arc::new(QuinnClient::with_buffers(true)?);
            start = Instant::now();
            let to = addr.parse()?;
            for batch in (0..n).collect::<Vec<_>>().chunks(64) {
                let dials = batch.iter().map(|_| {
                    let client = client.clone();
                    async move {
                        let t = Instant::now();
                        let conn = client.connect(to, false).await?;
                        quinn_call(&conn, Bytes::from_static(b"x")).await?;
                        Ok::<_, anyhow::Error>((conn, t.elapsed()))
                    }
                });
                for dialed in join_all(dials).await {
                    let (conn, took) = dialed?;
                    times.push(took);
                    keep_quinn.push(conn);
                }
            }
        }
    }
    let elapsed = start.elapsed();
    // Let both sides settle (the server frees handshake state, tickets go out).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_kib = server.rss_kib().saturating_sub(server_before) as f64 / n as f64;
    let fds = (server.open_files(), fds_before);
    times.sort();
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    drop(keep_quinn);
    drop(keep_ours);
    drop(server);
    let client_kib = dialing_side(stack, n).await?;
    Ok(Scale {
        server_kib,
        client_kib,
        handshakes_per_sec: n as f64 / elapsed.as_secs_f64(),
        setup_p99_us: p99.as_secs_f64() * 1e6,
        server_fds: fds,
    })
}
