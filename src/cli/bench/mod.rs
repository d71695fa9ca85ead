//! `bench`: our stack side by side with raw quinn and TCP + TLS 1.3, in one run, on
//! 127.0.0.1. Every scenario runs several times; the table shows the median of the runs
//! (and the spread, min to max), and the ratios against both baselines, which is what to
//! compare on a shared, noisy machine.

mod baselines;
pub mod scale;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rustorium_p2p::{Bytes, Config, Node, PeerId, RequestOptions};

use super::join_all;
use baselines::{quinn_call, QuinnClient, QuinnServer, TcpClient, TcpServer};

#[derive(Args)]
pub struct BenchArgs {
    /// Tiny sizes and counts: proves every scenario still works (no figure is meaningful).
    #[arg(long)]
    quick: bool,
    /// Repetitions of each scenario.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these scenarios (comma-separated; all by default).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
}

/// The scenario groups of the bench.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Sequential 64-byte requests: p50, p99, p99.9.
    Latency,
    /// Requests per second at 1 to 256 in flight.
    Rate,
    /// Bulk transfers.
    Bulk,
    /// Connection set-up: full handshake and 0-RTT.
    Setup,
    /// Memory, file descriptors and handshake rate at 1,000 and 10,000 connections.
    Scale,
}

/// Sizes of one run.
struct Plan {
    sequential: usize,
    rate_requests: usize,
    bulk_bytes: usize,
    setups: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sequential: 50,
                rate_requests: 200,
                bulk_bytes: 2 << 20,
                setups: 3,
            }
        } else {
            Plan {
                sequential: 5000,
                rate_requests: 40_000,
                bulk_bytes: 1 << 30,
                setups: 50,
            }
        }
    }
}

/// One figure for one stack, one value per repetition.
#[derive(serde::Serialize)]
struct Figure {
    scenario: String,
    stack: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    values: Vec<f64>,
}

impl Figure {
    fn median(&self) -> f64 {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    fn spread(&self) -> (f64, f64) {
        let min = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self
            .values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }
}

const STACKS: [&str; 3] = ["rustorium", "quinn", "tcp+tls"];

/// The three stacks, each with a server on loopback and a connected client.
struct Stacks {
    ours: Arc<Node>,
    peer: PeerId,
    _server: Node,
    quinn: quinn::Connection,
    _quinn_server: QuinnServer,
    tcp: Arc<TcpClient>,
    _tcp_server: TcpServer,
}

pub(crate) fn bench_config() -> Config {
    let mut config = Config::default();
    config.node.listen = "127.0.0.1:0".parse().expect("literal");
    config.limits.max_request_size = 1 << 31;
    config.limits.max_response_size = 1 << 31;
    config.limits.request_timeout = Duration::from_secs(300);
    config.limits.max_concurrent_requests = 65_536;
    config.transport.max_concurrent_bidi_streams = 1000;
    config
}

async fn our_server() -> anyhow::Result<Node> {
    Ok(Node::builder()
        .config(bench_config())
        .route("echo", |_ctx, body| async move { Ok(body) })
        .route("sink", |_ctx, _body| async move { Ok(Bytes::new()) })
        .bind()
        .await?)
}

impl Stacks {
    async fn start() -> anyhow::Result<Stacks> {
        let server = our_server().await?;
        let ours = Arc::new(Node::builder().config(bench_config()).bind().await?);
        ours.connect(&server.peer_addr()).await?;
        let quinn_server = QuinnServer::start()?;
        let quinn = QuinnClient::new()?
            .connect(quinn_server.addr(), false)
            .await?;
        let tcp_server = TcpServer::start().await?;
        let tcp = Arc::new(TcpClient::connect(tcp_server.addr).await?);
        Ok(Stacks {
            peer: server.peer_id(),
            ours,
            _server: server,
            quinn,
            _quinn_server: quinn_server,
            tcp,
            _tcp_server: tcp_server,
        })
    }

    /// One echo request on stack `which`.
    async fn call(&self, which: usize, body: Bytes) -> anyhow::Result<Bytes> {
        match which {
            0 => Ok(self.ours.request(self.peer, "echo", body).await?),
            1 => quinn_call(&self.quinn, body).await,
            _ => self.tcp.call(body).await,
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(args.quick);
    let repeat = args.repeat.max(1);
    let stacks = Stacks::start().await?;
    let mut figures: Vec<Figure> = Vec::new();
    let mut add = |scenario: String, stack: usize, unit, higher: bool, value: f64| match figures
        .iter_mut()
        .find(|f| f.scenario == scenario && f.stack == STACKS[stack])
    {
        Some(f) => f.values.push(value),
        None => figures.push(Figure {
            scenario,
            stack: STACKS[stack],
            unit,
            higher_is_better: higher,
            values: vec![value],
        }),
    };
    let progress = |what: &str| eprintln!("bench: {what}");
    let wanted = |s: Scenario| args.only.is_empty() || args.only.contains(&s);

    for rep in 0..repeat {
        progress(&format!("repetition {} of {repeat}", rep + 1));
        // 1. Sequential 64-byte requests.
        for (stack, name) in STACKS
            .iter()
            .enumerate()
            .filter(|_| wanted(Scenario::Latency))
        {
            let body = Bytes::from(vec![7u8; 64]);
            let mut times = Vec::with_capacity(plan.sequential);
            for _ in 0..plan.sequential {
                let start = Instant::now();
                let answer = stacks.call(stack, body.clone()).await?;
                times.push(start.elapsed());
                anyhow::ensure!(answer == body, "{name} answered other bytes");
            }
            times.sort();
            let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
            for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
                let scenario = format!("64 B sequential, {name}");
                add(scenario, stack, "µs", false, at(q).as_secs_f64() * 1e6);
            }
        }
        // 2. Requests per second at several concurrencies on one connection.
        for size in [64usize, 1024]
            .into_iter()
            .filter(|_| wanted(Scenario::Rate))
        {
            for in_flight in [1usize, 16, 64, 256] {
                for stack in 0..3 {
                    let rate =
                        request_rate(&stacks, stack, size, in_flight, plan.rate_requests).await?;
                    add(
                        format!("{size} B, {in_flight} in flight"),
                        stack,
                        "req/s",
                        true,
                        rate,
                    );
                }
            }
        }
        // 3. Bulk upload.
        for stack in (0..3).filter(|_| wanted(Scenario::Bulk)) {
            let gbits = bulk(&stacks, stack, plan.bulk_bytes).await?;
            add(
                "bulk upload, one connection".into(),
                stack,
                "Gbit/s",
                true,
                gbits,
            );
        }
        // 4. Connection set-up: full handshake and 0-RTT reconnect, each to first answer.
        if !wanted(Scenario::Setup) {
            continue;
        }
        let (full, zero) = our_setup(plan.setups).await?;
        add(
            "set-up: full handshake + first answer".into(),
            0,
            "µs",
            false,
            full,
        );
        add(
            "set-up: 0-RTT reconnect + first answer".into(),
            0,
            "µs",
            false,
            zero,
        );
        let (full, zero) = quinn_setup(plan.setups).await?;
        add(
            "set-up: full handshake + first answer".into(),
            1,
            "µs",
            false,
            full,
        );
        add(
            "set-up: 0-RTT reconnect + first answer".into(),
            1,
            "µs",
            false,
            zero,
        );
        let full = tcp_setup(plan.setups).await?;
        add(
            "set-up: full handshake + first answer".into(),
            2,
            "µs",
            false,
            full,
        );
    }

    // 5 and 6. Idle connections: memory, file descriptors, handshake rate.
    let sizes: &[usize] = match (args.quick, wanted(Scenario::Scale)) {
        (_, false) => &[],
        (true, true) => &[20],
        (false, true) => &[1000, 10_000],
    };
    for &n in sizes {
        for (stack, name) in [(0, "rustorium"), (1, "quinn")] {
            progress(&format!("{n} connections to one {name} server"));
            let s = scale::measure(name, n).await?;
            add(
                format!("{n} conns: server memory per conn"),
                stack,
                "KiB",
                false,
                s.server_kib,
            );
            add(
                format!("{n} conns: client memory per conn"),
                stack,
                "KiB",
                false,
                s.client_kib,
            );
            add(
                format!("{n} conns: handshakes per second"),
                stack,
                "conn/s",
                true,
                s.handshakes_per_sec,
            );
            add(
                format!("{n} conns: set-up p99"),
                stack,
                "µs",
                false,
                s.setup_p99_us,
            );
            add(
                format!("{n} conns: server open fds (before: {})", s.server_fds.1),
                stack,
                "fds",
                false,
                s.server_fds.0 as f64,
            );
        }
    }

    print_table(&figures, args.quick);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&figures)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn request_rate(
    stacks: &Stacks,
    stack: usize,
    size: usize,
    in_flight: usize,
    total: usize,
) -> anyhow::Result<f64> {
    let body = Bytes::from(vec![3u8; size]);
    let per_worker = total.div_ceil(in_flight);
    let start = Instant::now();
    let workers = (0..in_flight).map(|_| {
        let body = body.clone();
        async move {
            for _ in 0..per_worker {
                let answer = stacks.call(stack, body.clone()).await?;
                anyhow::ensure!(answer.len() == body.len(), "short answer");
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    for result in join_all(workers).await {
        result?;
    }
    Ok((per_worker * in_flight) as f64 / start.elapsed().as_secs_f64())
}

/// Uploads `bytes` and gets an empty answer: on our stack as 16 MiB requests to a sink
/// (each its own stream), on quinn as one stream, on TCP as 16 MiB frames.
async fn bulk(stacks: &Stacks, stack: usize, bytes: usize) -> anyhow::Result<f64> {
    const CHUNK: usize = 16 << 20;
    let chunk = Bytes::from(vec![9u8; CHUNK.min(bytes)]);
    let chunks = bytes.div_ceil(chunk.len());
    let start = Instant::now();
    match stack {
        0 => {
            for _ in 0..chunks {
                stacks
                    .ours
                    .request(stacks.peer, "sink", chunk.clone())
                    .await?;
            }
        }
        1 => {
            let (mut send, mut recv) = stacks.quinn.open_bi().await?;
            for _ in 0..chunks {
                send.write_chunk(chunk.clone()).await?;
            }
            send.finish()?;
            recv.read_to_end(16).await?;
        }
        _ => {
            for _ in 0..chunks {
                stacks.tcp.call(chunk.clone()).await?;
            }
        }
    }
    Ok((chunks * chunk.len()) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

async fn our_setup(n: usize) -> anyhow::Result<(f64, f64)> {
    let server = our_server().await?;
    let (mut full, mut zero) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let client = Node::builder().config(bench_config()).bind().await?;
        let start = Instant::now();
        client.add_address(server.peer_addr());
        client
            .request(server.peer_id(), "echo", Bytes::from_static(b"x"))
            .await?;
        full.push(start.elapsed());
        let mut events = client.events();
        client.disconnect(&server.peer_id());
        let _ = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        let start = Instant::now();
        let options = RequestOptions::new().idempotent(true);
        client
            .request_with(server.peer_id(), "echo", Bytes::from_static(b"x"), options)
            .await?;
        zero.push(start.elapsed());
        client.shutdown().await;
    }
    Ok((median_us(full), median_us(zero)))
}

async fn quinn_setup(n: usize) -> anyhow::Result<(f64, f64)> {
    let server = QuinnServer::start()?;
    let (mut full, mut zero) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let client = QuinnClient::new()?;
        let start = Instant::now();
        let conn = client.connect(server.addr(), false).await?;
        quinn_call(&conn, Bytes::from_static(b"x")).await?;
        full.push(start.elapsed());
        conn.close(0u32.into(), b"");
        let start = Instant::now();
        let conn = client.connect(server.addr(), true).await?;
        quinn_call(&conn, Bytes::from_static(b"x")).await?;
        zero.push(start.elapsed());
        conn.close(0u32.into(), b"");
    }
    Ok((median_us(full), median_us(zero)))
}

async fn tcp_setup(n: usize) -> anyhow::Result<f64> {
    let server = TcpServer::start().await?;
    let mut full = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let client = TcpClient::connect(server.addr).await?;
        client.call(Bytes::from_static(b"x")).await?;
        full.push(start.elapsed());
    }
    Ok(median_us(full))
}

fn median_us(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e6
}

fn print_table(figures: &[Figure], quick: bool) {
    if quick {
        println!("(--quick: tiny sizes, the figures mean nothing)");
    }
    println!(
        "{:<44} {:>22} {:>22} {:>22} {:>9} {:>9}",
        "scenario (median of runs, [min-max])",
        "rustorium",
        "quinn",
        "tcp+tls",
        "vs quinn",
        "vs tcp"
    );
    let mut scenarios: Vec<&str> = Vec::new();
    for f in figures {
        if !scenarios.contains(&f.scenario.as_str()) {
            scenarios.push(&f.scenario);
        }
    }
    for scenario in scenarios {
        let get = |stack| {
            figures
                .iter()
                .find(|f| f.scenario == scenario && f.stack == stack)
        };
        let cell = |f: Option<&Figure>| match f {
            Some(f) => {
                let (lo, hi) = f.spread();
                format!("{} [{}-{}]", short(f.median()), short(lo), short(hi))
            }
            None => "-".into(),
        };
        let ours = get("rustorium");
        let ratio = |other: Option<&Figure>| match (ours, other) {
            (Some(o), Some(b)) if b.median() > 0.0 => format!("{:.2}x", o.median() / b.median()),
            _ => "-".into(),
        };
        let unit = ours.map_or("", |f| f.unit);
        println!(
            "{:<44} {:>22} {:>22} {:>22} {:>9} {:>9}",
            format!("{scenario} ({unit})"),
            cell(ours),
            cell(get("quinn")),
            cell(get("tcp+tls")),
            ratio(get("quinn")),
            ratio(get("tcp+tls")),
        );
    }
    println!(
        "ratios: ours / baseline (for µs lower is better, for req/s and Gbit/s higher is better)"
    );
}

fn short(v: f64) -> String {
    if v >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
