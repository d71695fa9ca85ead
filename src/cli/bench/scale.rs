//! Connection scale: memory per idle connection, file descriptors, and handshake rate,
//! with the server in a child process of its own (`rustorium-p2p bench-server`) so that
//! its resident memory is measured alone.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rustorium_p2p::{Bytes, Config, Node, PeerAddr};

use super::baselines::{quinn_call, QuinnClient, QuinnServer};
use super::scenarios::ECHO;

/// `bench-server`: a server for the scale scenarios (hidden from `--help`).
#[derive(Args)]
pub struct ServerArgs {
    /// `rustorium` or `quinn`.
    #[arg(long)]
    stack: String,
    /// Where to listen (a remote `bench --target` can then use it; stops when stdin ends).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

/// Both stream limits at 1000, as in the original design, and room for many connections.
pub fn scale_config() -> Config {
    let mut config = super::bench_config();
    config.transport.max_concurrent_bidi_streams = 1000;
    config.transport.max_concurrent_uni_streams = 1000;
    config.transport.max_idle_timeout = Duration::from_secs(120);
    config.limits.max_connections = 20_000;
    config.limits.max_connections_per_ip = 20_000;
    config
}

/// Runs the server until stdin closes; its first stdout line is where to reach it.
pub async fn serve(args: ServerArgs) -> anyhow::Result<std::process::ExitCode> {
    let _keep: Box<dyn std::any::Any> = match args.stack.as_str() {
        "rustorium" => {
            let mut config = scale_config();
            config.node.listen = args.listen;
            let node = Node::builder()
                .config(config)
                .system_routes()
                .bind()
                .await?;
            println!("{}", node.peer_addr());
            Box::new(node)
        }
        "quinn" => {
            let server = QuinnServer::start_with_streams(1000, args.listen)?;
            println!("{}", server.addr());
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

/// A running `bench-server`.
struct ServerProcess(Child);

impl ServerProcess {
    fn start(stack: &str) -> anyhow::Result<(ServerProcess, String)> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["bench-server", "--stack", stack])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        Ok((ServerProcess(child), line.trim().to_string()))
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(&format!("/proc/{}/status", self.0.id()))
    }

    fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0.id())).map_or(0, |d| d.count())
    }
}

impl Drop for ServerProcess {
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
    /// Client-side resident memory per connection, KiB (our clients are whole nodes, each
    /// with its own socket and endpoint; the quinn client is one endpoint).
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
    let (server, addr) = ServerProcess::start(stack)?;
    let (server_before, fds_before) = (server.rss_kib(), server.open_files());
    let client_before = rss_kib("/proc/self/status");
    let start;
    let mut times = Vec::with_capacity(n);
    let mut keep_ours: Vec<Node> = Vec::new();
    let mut keep_quinn: Vec<quinn::Connection> = Vec::new();
    match stack {
        "rustorium" => {
            let addr: PeerAddr = addr.parse()?;
            let mut clients = Vec::with_capacity(n);
            for _ in 0..n {
                clients.push(Node::builder().config(super::bench_config()).bind().await?);
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
                for dialed in super::join_all(dials).await {
                    times.push(dialed?);
                }
            }
            keep_ours = clients;
        }
        _ => {
            let client = Arc::new(QuinnClient::new()?);
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
                for dialed in super::join_all(dials).await {
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
    let client_kib = rss_kib("/proc/self/status").saturating_sub(client_before) as f64 / n as f64;
    let fds = (server.open_files(), fds_before);
    times.sort();
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    drop(keep_quinn);
    for node in keep_ours {
        drop(node);
    }
    Ok(Scale {
        server_kib,
        client_kib,
        handshakes_per_sec: n as f64 / elapsed.as_secs_f64(),
        setup_p99_us: p99.as_secs_f64() * 1e6,
        server_fds: fds,
    })
}
