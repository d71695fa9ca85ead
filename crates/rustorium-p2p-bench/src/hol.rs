//! Head-of-line blocking, measured: on one connection across a lossy path, a bulk upload
//! runs beside a stream of sequential 64-byte requests; the small requests' p50 and p99
//! with and without the upload, for our node and for TCP + TLS (requests and 16 KiB
//! frames of the upload interleaved on one connection, as HTTP/2 would).
//!
//! The path: two network namespaces joined by a veth pair, each dropping 2 % of the
//! packets it receives with an nftables `numgen random` rule (this kernel has no netem,
//! so no delay is added). The server runs in one namespace and the client in the other,
//! each as a `rustorium-p2p bench-hol` process. Needs root, `ip` and `nft`; otherwise
//! the scenario is skipped with the reason.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rustorium_p2p::{Bytes, Node, PeerAddr};
use tokio::sync::Mutex;

use super::baselines::{TcpClient, TcpServer};
use super::scenarios::{bench_routes, ECHO, SINK};

/// Loss on each direction of the path, in percent.
pub const LOSS_PERCENT: u32 = 2;
const SERVER: &str = "198.51.100.2";
const CLIENT: &str = "198.51.100.1";

/// `bench-hol`: one side of the head-of-line scenario (hidden from `--help`).
#[derive(Args)]
pub struct HolArgs {
    /// `server` or `client`.
    #[arg(long)]
    role: String,
    /// `rustorium` or `tcp+tls`.
    #[arg(long)]
    stack: String,
    /// Server: where to listen. Client: the server's address (our node: its PeerAddr).
    #[arg(long)]
    addr: String,
    /// Client: sequential small requests before the upload.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Client: bytes of the upload.
    #[arg(long, default_value_t = 64 << 20)]
    bulk: usize,
}

/// What the client measured, in microseconds and Mbit/s.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Hol {
    pub alone_p50: f64,
    pub alone_p99: f64,
    pub beside_p50: f64,
    pub beside_p99: f64,
    pub beside_count: usize,
    pub bulk_mbit: f64,
}

/// Why the scenario cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
    let Ok(uid) = Command::new("id").arg("-u").output() else {
        return Some("cannot tell whether this is root (`id -u` failed)".into());
    };
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root (network namespaces)".into());
    }
    let tools: [(&str, &[&str]); 2] = [("ip", &["netns", "list"]), ("nft", &["--version"])];
    for (tool, args) in tools {
        let ok = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("needs `{tool}` (iproute2 / nftables)"));
        }
    }
    None
}

/// The names of this process's lab: (server namespace, client namespace, veth in the
/// root namespace, veth in the server's).
fn lab_names() -> (String, String, String, String) {
    let tag = std::process::id();
    (
        format!("rhol{tag}s"),
        format!("rhol{tag}c"),
        format!("rh{tag}c"),
        format!("rh{tag}s"),
    )
}

/// On SIGTERM (what `timeout` and CI send), removes this process's namespaces and veth
/// before exiting, which a drop would not get to do. Call from within the runtime.
pub fn clean_up_on_sigterm() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        let (server_ns, client_ns, veth, _) = lab_names();
        for ns in [&server_ns, &client_ns] {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["link", "del", &veth]);
        eprintln!("bench: stopped by SIGTERM");
        std::process::exit(143);
    });
    Ok(())
}

/// Two namespaces and their veth pair, with loss; what was made is removed when dropped
/// (also when making it failed half-way).
struct Lab {
    server_ns: String,
    client_ns: String,
    /// The veth end created in the root namespace (deleting one end deletes both).
    veth: String,
    /// Namespaces this lab created (only those are deleted).
    created: Vec<String>,
    children: Vec<Child>,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Lab {
    fn new() -> anyhow::Result<Lab> {
        let (server_ns, client_ns, vc, vs) = lab_names();
        let mut lab = Lab {
            server_ns,
            client_ns,
            veth: vc.clone(),
            created: Vec::new(),
            children: Vec::new(),
        };
        for ns in [lab.server_ns.clone(), lab.client_ns.clone()] {
            // A namespace of this name left by a killed run is not ours to delete: fail.
            run("ip", &["netns", "add", &ns])?;
            lab.created.push(ns);
        }
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        run(
            "ip",
            &["link", "add", &vc, "type", "veth", "peer", "name", &vs],
        )?;
        run("ip", &["link", "set", &vs, "netns", s])?;
        run("ip", &["link", "set", &vc, "netns", c])?;
        for (ns, dev, addr) in [(s, &vs, SERVER), (c, &vc, CLIENT)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            let nft = |rule: &[&str]| {
                let mut args = vec!["netns", "exec", ns, "nft"];
                args.extend_from_slice(rule);
                run("ip", &args)
            };
            let percent = LOSS_PERCENT.to_string();
            nft(&["add", "table", "inet", "loss"])?;
            nft(&[
                "add",
                "chain",
                "inet",
                "loss",
                "input",
                "{ type filter hook input priority 0; }",
            ])?;
            nft(&[
                "add",
                "rule",
                "inet",
                "loss",
                "input",
                "meta",
                "l4proto",
                "{ tcp, udp }",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &percent,
                "drop",
            ])?;
        }
        Ok(lab)
    }

    /// Starts `bench-hol` in `ns` with `args`.
    fn spawn(&mut self, ns: &str, args: &[&str]) -> anyhow::Result<&mut Child> {
        let exe = std::env::current_exe()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .arg("bench-hol")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.children.push(child);
        Ok(self.children.last_mut().expect("just pushed"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.created {
            let _ = run("ip", &["netns", "del", ns]);
        }
        // Still in the root namespace if moving it failed (gone with its namespace
        // otherwise, and then this fails quietly).
        let _ = run("ip", &["link", "del", &self.veth]);
    }
}

/// Runs the scenario for `stack` (`rustorium` or `tcp+tls`).
pub fn measure(stack: &str, requests: usize, bulk: usize) -> anyhow::Result<Hol> {
    let mut lab = Lab::new()?;
    let server_ns = lab.server_ns.clone();
    let client_ns = lab.client_ns.clone();
    let listen = format!("{SERVER}:0");
    let server = lab.spawn(
        &server_ns,
        &["--role", "server", "--stack", stack, "--addr", &listen],
    )?;
    let mut line = String::new();
    BufReader::new(server.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    let addr = line.trim().to_string();
    anyhow::ensure!(
        !addr.is_empty(),
        "the head-of-line server printed no address"
    );
    let (requests, bulk) = (requests.to_string(), bulk.to_string());
    let client = lab.spawn(
        &client_ns,
        &[
            "--role",
            "client",
            "--stack",
            stack,
            "--addr",
            &addr,
            "--requests",
            &requests,
            "--bulk",
            &bulk,
        ],
    )?;
    // Its one line of results, within a bound (a stalled transfer fails the bench
    // instead of hanging it; the lab's drop kills both sides).
    let stdout = client.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(300))
        .context("the head-of-line client gave no result within 300 s")?;
    serde_json::from_str(line.trim())
        .with_context(|| format!("the head-of-line client printed {line:?}"))
}

/// `bench-hol`: serves until stdin ends, or measures and prints one JSON line.
pub async fn run_side(args: HolArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.role.as_str() {
        "server" => serve(&args).await?,
        "client" => {
            let hol = client(&args).await?;
            println!("{}", serde_json::to_string(&hol)?);
        }
        other => anyhow::bail!("unknown role {other:?}"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(args: &HolArgs) -> anyhow::Result<()> {
    let listen: SocketAddr = args.addr.parse()?;
    let _keep: Box<dyn std::any::Any> = match args.stack.as_str() {
        "rustorium" => {
            let node = bench_routes(Node::builder().config(super::bench_config()))
                .listen(listen)
                .bind()
                .await?;
            println!("{}", node.peer_addr());
            Box::new(node)
        }
        "tcp+tls" => {
            let server = TcpServer::start_on(listen).await?;
            println!("{}", server.addr);
            Box::new(server)
        }
        other => anyhow::bail!("unknown stack {other:?}"),
    };
    // Until the bench closes our stdin (or kills us).
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await;
    Ok(())
}

/// One side's way of making a call: a small echo, or a part of the upload.
enum Caller {
    Ours(Node, rustorium_p2p::PeerId),
    Tcp(Arc<TcpClient>),
}

impl Caller {
    async fn echo(&self, body: Bytes) -> anyhow::Result<()> {
        let answer = match self {
            Caller::Ours(node, peer) => node.request(*peer, ECHO, body.clone()).await?,
            Caller::Tcp(tcp) => tcp.call(body.clone()).await?,
        };
        anyhow::ensure!(answer.len() == body.len(), "short echo");
        Ok(())
    }

    /// The upload: ours as one request of `bytes`; TCP as 16 KiB frames, one after the
    /// other, so that small requests can go between them.
    async fn upload(&self, bytes: usize) -> anyhow::Result<()> {
        match self {
            Caller::Ours(node, peer) => {
                node.request(*peer, SINK, Bytes::from(vec![1u8; bytes]))
                    .await?;
            }
            Caller::Tcp(tcp) => {
                // 16 KiB frames (HTTP/2's default largest frame), 32 in flight (512 KiB)
                // keep the connection busy as one long QUIC stream does; a small
                // request's frame waits for at most the frame being written.
                const CHUNK: usize = 16 << 10;
                const WINDOW: usize = 32;
                let chunk = Bytes::from(vec![1u8; CHUNK]);
                let per_lane = bytes.div_ceil(CHUNK).div_ceil(WINDOW);
                let lanes = (0..WINDOW).map(|_| async {
                    for _ in 0..per_lane {
                        tcp.call(chunk.clone()).await?;
                    }
                    anyhow::Ok(())
                });
                for lane in futures_util::future::join_all(lanes).await {
                    lane?;
                }
            }
        }
        Ok(())
    }
}

fn quantile(times: &mut [Duration], q: f64) -> f64 {
    times.sort();
    let at = ((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1));
    times.get(at).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

async fn client(args: &HolArgs) -> anyhow::Result<Hol> {
    let caller = match args.stack.as_str() {
        "rustorium" => {
            let target: PeerAddr = args.addr.parse()?;
            let mut config = super::bench_config();
            config.node.listen = format!("{CLIENT}:0").parse()?;
            let node = Node::builder().config(config).bind().await?;
            node.connect(&target).await?;
            Caller::Ours(node, target.peer_id)
        }
        "tcp+tls" => Caller::Tcp(Arc::new(TcpClient::connect(args.addr.parse()?).await?)),
        other => anyhow::bail!("unknown stack {other:?}"),
    };
    let body = Bytes::from(vec![7u8; 64]);
    for _ in 0..20 {
        caller.echo(body.clone()).await?; // warm-up
    }
    let mut alone = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let start = Instant::now();
        caller.echo(body.clone()).await?;
        alone.push(start.elapsed());
    }
    // The upload, and small requests one after another until it is done.
    let done = Arc::new(Mutex::new(false));
    let started = Instant::now();
    let upload = async {
        let result = caller.upload(args.bulk).await;
        *done.lock().await = true;
        result.map(|()| started.elapsed())
    };
    let small = async {
        let mut beside = Vec::new();
        while !*done.lock().await && beside.len() < 100_000 {
            let start = Instant::now();
            caller.echo(body.clone()).await?;
            beside.push(start.elapsed());
        }
        anyhow::Ok(beside)
    };
    let (took, beside) = tokio::join!(upload, small);
    let (took, mut beside) = (took?, beside?);
    anyhow::ensure!(
        !beside.is_empty(),
        "no small request finished beside the upload"
    );
    Ok(Hol {
        alone_p50: quantile(&mut alone, 0.5),
        alone_p99: quantile(&mut alone, 0.99),
        beside_p50: quantile(&mut beside, 0.5),
        beside_p99: quantile(&mut beside, 0.99),
        beside_count: beside.len(),
        bulk_mbit: args.bulk as f64 * 8.0 / took.as_secs_f64() / 1e6,
    })
}
