//! `bench`: our stack side by side with raw quinn and TCP + TLS 1.3, in one run, on
//! 127.0.0.1. Every scenario runs several times; the table shows the median of the runs
//! (and the spread, min to max), and the ratios against both baselines, which is what to
//! compare on a shared, noisy machine.

mod attacks;
mod baselines;
pub mod hol;
mod pinned;
mod plot;
mod raw_wire;
pub mod scale;
mod scenarios;
mod streaming;
mod typed;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rustorium_p2p::{Bytes, Config, PeerAddr};

use scenarios::{Shape, Stacks, STACKS};

#[derive(Args)]
pub struct BenchArgs {
    /// Tiny sizes and counts: proves every scenario still works (no figure is meaningful).
    #[arg(long)]
    quick: bool,
    /// Repetitions of each scenario (1 to 100).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    repeat: u16,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write SVG charts to this directory: latency CDFs, request rates, bulk
    /// throughput, memory per connection.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Run the client scenarios (latency, rate, bulk, set-up) against this node instead of
    /// a local one; only our stack is measured. Bulk needs the node to accept 1 GiB
    /// requests (`max_request_size`); `rustorium-p2p bench-server --stack rustorium
    /// --listen ADDR` does.
    #[arg(long, value_name = "PEERADDR")]
    target: Option<PeerAddr>,
    /// Run only these scenarios (comma-separated; all by default).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// Run only these stacks: rustorium, quinn, tcp+tls (comma-separated; all by default).
    /// One stack alone is what to profile (`perf record`, `valgrind --tool=callgrind`).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(STACKS))]
    stacks: Vec<String>,
    /// `transport.max_udp_payload_size` of our pinned server (`--only pinned`), to
    /// measure what a larger UDP payload gives (BENCHMARKS.md, "Bulk on loopback").
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(1200..=65527))]
    max_udp_payload: Option<u16>,
}

/// The scenario groups of the bench.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Sequential 64-byte requests: p50, p99, p99.9.
    Latency,
    /// Requests per second at 1 to 256 in flight.
    Rate,
    /// Bulk transfers: one stream (buffered, and streamed), 8 streams, 4 connections.
    Bulk,
    /// Connection set-up: full handshake and 0-RTT, on loopback and at 20 ms RTT.
    Setup,
    /// Memory, file descriptors and handshake rate at 1,000 and 10,000 connections.
    Scale,
    /// A good peer's latency while strangers attack the node (docs/SECURITY.md), ours only.
    Attacks,
    /// Per core: each server in a process of its own pinned to CPU 0 (raw quinn on a
    /// single-threaded runtime), the client pinned to CPU 1; server CPU per request.
    Pinned,
    /// Typed requests (serde, postcard) against the same bytes through the byte API, ours
    /// only.
    Typed,
    /// Head-of-line blocking: small requests beside a bulk upload on one connection across
    /// a path with 2 % loss each way (network namespaces and nftables; needs root), ours
    /// and TCP + TLS.
    Hol,
    /// Streaming bodies, ours only: 16 MiB echoes streamed against buffered, and one large
    /// echo through the CLI's `sys/echo` (4 GiB; 256 MiB with `--quick`), with both
    /// processes' memory.
    Streaming,
}

/// Sizes of one run.
struct Plan {
    sequential: usize,
    rate_requests: usize,
    bulk_bytes: usize,
    setups: usize,
    link_setups: usize,
    scale: &'static [usize],
    /// The good peer's sequential requests under each attack.
    attack_requests: usize,
    /// Requests of each pinned rate scenario.
    pinned_requests: usize,
    /// Connections of each pinned set-up scenario.
    pinned_setups: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                sequential: 50,
                rate_requests: 200,
                bulk_bytes: 2 << 20,
                setups: 3,
                link_setups: 2,
                scale: &[20],
                attack_requests: 50,
                pinned_requests: 2000,
                pinned_setups: 5,
            }
        } else {
            Plan {
                sequential: 5000,
                rate_requests: 40_000,
                bulk_bytes: 1 << 30,
                setups: 50,
                link_setups: 20,
                scale: &[1000, 10_000],
                attack_requests: 3000,
                pinned_requests: 200_000,
                pinned_setups: 2000,
            }
        }
    }
}

const RATE_SIZES: [usize; 2] = [64, 1024];
const IN_FLIGHT: [usize; 4] = [1, 16, 64, 256];
/// One-way delay of the link for the set-up scenario: 20 ms round trip.
const LINK_DELAY: Duration = Duration::from_millis(10);

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

/// The figures of a run.
#[derive(Default)]
struct Results {
    figures: Vec<Figure>,
    /// The last repetition's sequential latencies, per stack (for the CDF chart).
    latencies: Vec<(&'static str, Vec<Duration>)>,
}

impl Results {
    fn add(&mut self, scenario: String, stack: usize, unit: &'static str, value: f64) {
        let higher = matches!(unit, "req/s" | "Gbit/s" | "Mbit/s" | "conn/s" | "Jain");
        match self
            .figures
            .iter_mut()
            .find(|f| f.scenario == scenario && f.stack == STACKS[stack])
        {
            Some(f) => f.values.push(value),
            None => self.figures.push(Figure {
                scenario,
                stack: STACKS[stack],
                unit,
                higher_is_better: higher,
                values: vec![value],
            }),
        }
    }
}

pub(crate) fn bench_config() -> Config {
    let mut config = Config::default();
    config.node.listen = "127.0.0.1:0".parse().expect("literal");
    config.limits.max_request_size = 1 << 31;
    config.limits.max_response_size = 1 << 31;
    config.limits.request_timeout = Duration::from_secs(300);
    config.limits.max_concurrent_requests = 65_536;
    config.limits.max_concurrent_requests_per_peer = 65_536;
    config.transport.max_concurrent_bidi_streams = 1000;
    config
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(args.quick);
    let repeat = usize::from(args.repeat);
    let wanted = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    let stacks = Stacks::start(args.target).await?;
    let picked = |s: usize| args.stacks.is_empty() || args.stacks.iter().any(|n| n == STACKS[s]);
    let ran: Vec<usize> = (0..3).filter(|&s| stacks.has(s) && picked(s)).collect();
    let local = args.target.is_none();
    let n = ran.len() as u64;
    // The stacks that run the link set-ups and the scale scenarios (ours and quinn).
    let udp = ran.iter().filter(|&&s| s < 2).count() as u64;
    let per_repetition = [
        (Scenario::Latency, n),
        (
            Scenario::Rate,
            n * (RATE_SIZES.len() * IN_FLIGHT.len()) as u64,
        ),
        (
            Scenario::Bulk,
            n * (Shape::ALL.len() - usize::from(!local)) as u64,
        ),
        (Scenario::Setup, n + if local { udp } else { 0 }),
    ]
    .iter()
    .filter(|(s, _)| wanted(*s))
    .map(|(_, steps)| steps)
    .sum::<u64>();
    let scale_steps = if local && wanted(Scenario::Scale) {
        plan.scale.len() as u64 * udp
    } else {
        0
    };
    let attack_runs = local && wanted(Scenario::Attacks) && ran.contains(&0);
    let typed_runs = local && wanted(Scenario::Typed) && ran.contains(&0);
    let streaming_runs = local && wanted(Scenario::Streaming) && ran.contains(&0);
    let hol_stacks: Vec<usize> = if local && wanted(Scenario::Hol) {
        match hol::skip_reason() {
            Some(why) => {
                eprintln!("bench: head-of-line scenario skipped: {why}");
                Vec::new()
            }
            None => {
                hol::clean_up_on_sigterm()?;
                ran.iter().copied().filter(|&s| s != 1).collect()
            }
        }
    } else {
        Vec::new()
    };
    let pinned_stacks: Vec<usize> = if local && wanted(Scenario::Pinned) {
        ran.clone()
    } else {
        Vec::new()
    };
    let scale_steps = scale_steps
        + if attack_runs {
            (attacks::Attack::ALL.len() as u64 + 1) * repeat as u64
        } else {
            0
        }
        + (pinned_stacks.len() * repeat) as u64
        + if typed_runs { repeat as u64 } else { 0 }
        + if streaming_runs { 2 * repeat as u64 } else { 0 }
        + (hol_stacks.len() * repeat) as u64;
    let bar = ProgressBar::new(per_repetition * repeat as u64 + scale_steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("literal template")
            .progress_chars("=> "),
    );
    let step = |what: String| {
        bar.set_message(what);
        bar.inc(1);
    };
    let mut results = Results::default();
    let payload = if wanted(Scenario::Bulk) {
        Bytes::from(vec![9u8; plan.bulk_bytes])
    } else {
        Bytes::new()
    };

    for rep in 1..=repeat {
        let of = format!("({rep} of {repeat})");
        // Each repetition starts with another stack, so none is always the one measured
        // first (or right after another's run).
        let mut order = ran.clone();
        order.rotate_left((rep - 1) % ran.len().max(1));
        // 1. Sequential 64-byte requests.
        for &stack in order.iter().filter(|_| wanted(Scenario::Latency)) {
            step(format!("latency, {} {of}", STACKS[stack]));
            let times = scenarios::sequential(&stacks, stack, plan.sequential).await?;
            let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
            for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
                let scenario = format!("64 B sequential, {name}");
                results.add(scenario, stack, "µs", at(q).as_secs_f64() * 1e6);
            }
            if rep == repeat {
                results.latencies.push((STACKS[stack], times));
            }
        }
        // 2. Requests per second at several concurrencies on one connection.
        for size in RATE_SIZES.into_iter().filter(|_| wanted(Scenario::Rate)) {
            for in_flight in IN_FLIGHT {
                for &stack in &order {
                    step(format!(
                        "{size} B x {in_flight} in flight, {} {of}",
                        STACKS[stack]
                    ));
                    let rate = scenarios::request_rate(
                        &stacks,
                        stack,
                        size,
                        in_flight,
                        plan.rate_requests,
                    )
                    .await?;
                    let scenario = format!("{size} B, {in_flight} in flight");
                    results.add(scenario, stack, "req/s", rate);
                }
            }
        }
        // 3. Bulk upload.
        // The streamed upload needs the bench's own server (a CLI node has no streaming sink).
        let shapes = Shape::ALL
            .into_iter()
            .filter(|&s| local || !matches!(s, Shape::OneStreamStreamed));
        for shape in shapes.filter(|_| wanted(Scenario::Bulk)) {
            for &stack in &order {
                step(format!("bulk, {}, {} {of}", shape.name(), STACKS[stack]));
                let gbits = scenarios::bulk(&stacks, stack, shape, &payload).await?;
                let scenario = format!("bulk {}, {}", size_label(plan.bulk_bytes), shape.name());
                results.add(scenario, stack, "Gbit/s", gbits);
            }
        }
        // 4. Connection set-up: full handshake and 0-RTT reconnect, each to first answer;
        // on loopback, and (locally) across a link with 20 ms round trips.
        if wanted(Scenario::Setup) {
            let mut runs: Vec<(usize, Option<Duration>, usize)> =
                order.iter().map(|&s| (s, None, plan.setups)).collect();
            if local {
                for stack in order.iter().copied().filter(|&s| s < 2) {
                    runs.push((stack, Some(LINK_DELAY), plan.link_setups));
                }
            }
            for (stack, delay, count) in runs {
                let at = if delay.is_some() { " at 20 ms RTT" } else { "" };
                step(format!("set-up{at}, {} {of}", STACKS[stack]));
                let setup = scenarios::setup(stack, count, delay, args.target.as_ref()).await?;
                let full = format!("set-up{at}: full handshake + first answer");
                results.add(full, stack, "µs", setup.full);
                if let Some(zero) = setup.zero_rtt {
                    let scenario = format!("set-up{at}: 0-RTT reconnect + first answer");
                    results.add(scenario, stack, "µs", zero);
                }
            }
        }
    }

    results
        .latencies
        .sort_by_key(|(name, _)| STACKS.iter().position(|s| s == name));

    // 5 and 6. Idle connections: memory, file descriptors, handshake rate.
    for &n in plan
        .scale
        .iter()
        .filter(|_| local && wanted(Scenario::Scale))
    {
        for (stack, name) in [(0, "rustorium"), (1, "quinn")] {
            if !ran.contains(&stack) {
                continue;
            }
            step(format!("{n} connections to one {name} server"));
            let s = scale::measure(name, n).await?;
            results.add(
                format!("{n} conns: server memory per conn"),
                stack,
                "KiB",
                s.server_kib,
            );
            results.add(
                format!("{n} conns: client memory per conn"),
                stack,
                "KiB",
                s.client_kib,
            );
            let rate = format!("{n} conns: handshakes per second");
            results.add(rate, stack, "conn/s", s.handshakes_per_sec);
            results.add(
                format!("{n} conns: set-up p99"),
                stack,
                "µs",
                s.setup_p99_us,
            );
            let fds = format!("{n} conns: server open fds (before: {})", s.server_fds.1);
            results.add(fds, stack, "fds", s.server_fds.0 as f64);
        }
    }
    // 7. Per core: pinned servers in processes of their own.
    for rep in 1..=repeat {
        let mut order = pinned_stacks.clone();
        let turn = (rep - 1) % order.len().max(1);
        order.rotate_left(turn);
        for stack in order {
            step(format!("pinned, {} ({rep} of {repeat})", STACKS[stack]));
            let sizes = pinned::Sizes {
                requests: plan.pinned_requests,
                sequential: plan.sequential,
                setups: plan.pinned_setups,
                bulk: plan.bulk_bytes,
                max_udp_payload: args.max_udp_payload,
            };
            let figures = tokio::task::block_in_place(|| pinned::measure(STACKS[stack], sizes))?;
            for (scenario, unit, value) in figures.figures {
                results.add(scenario, stack, unit, value);
            }
        }
    }

    // 8. Attacks: a good peer's latency beside the same with no attack.
    for rep in 1..=repeat {
        if !attack_runs {
            break;
        }
        let runs = std::iter::once(None).chain(attacks::Attack::ALL.map(Some));
        for attack in runs {
            let name = match attack {
                Some(attack) => attack.name(args.quick),
                None => "no attack".to_string(),
            };
            step(format!("good peer under {name} ({rep} of {repeat})"));
            let good = attacks::measure(attack, plan.attack_requests, args.quick).await?;
            let label = |q: &str| format!("good peer p{q}, {name}");
            results.add(label("50"), 0, "µs", good.p50_us);
            results.add(label("99"), 0, "µs", good.p99_us);
        }
    }
    // 9. Typed requests against bytes.
    for rep in 1..=repeat {
        if !typed_runs {
            break;
        }
        step(format!("typed requests ({rep} of {repeat})"));
        let (bytes, typed) = typed::measure(4 * plan.rate_requests, rep % 2 == 0).await?;
        let name = "typed: small struct, 64 in flight";
        results.add(format!("{name}, bytes"), 0, "req/s", bytes);
        results.add(format!("{name}, request_typed"), 0, "req/s", typed);
        results.add(format!("{name}, typed / bytes"), 0, "ratio", typed / bytes);
    }
    // 10. Head-of-line blocking across a lossy path.
    for rep in 1..=repeat {
        for &stack in &hol_stacks {
            step(format!(
                "head-of-line, {} ({rep} of {repeat})",
                STACKS[stack]
            ));
            let (requests, bulk) = if args.quick {
                (50, 4 << 20)
            } else {
                (1000, 64 << 20)
            };
            let h = tokio::task::block_in_place(|| hol::measure(STACKS[stack], requests, bulk))?;
            let name =
                |what: &str| format!("hol ({}% loss each way): 64 B {what}", hol::LOSS_PERCENT);
            results.add(name("p50 alone"), stack, "µs", h.alone_p50);
            results.add(name("p99 alone"), stack, "µs", h.alone_p99);
            results.add(name("p50 beside an upload"), stack, "µs", h.beside_p50);
            results.add(name("p99 beside an upload"), stack, "µs", h.beside_p99);
            let ratio = h.beside_p99 / h.alone_p99.max(1.0);
            results.add(name("p99 beside / alone"), stack, "ratio", ratio);
            let upload = format!("hol ({}% loss each way): the upload", hol::LOSS_PERCENT);
            results.add(upload, stack, "Mbit/s", h.bulk_mbit);
        }
    }
    // 11. Streaming bodies.
    for rep in 1..=repeat {
        if !streaming_runs {
            break;
        }
        step(format!("streaming 16 MiB echoes ({rep} of {repeat})"));
        let bodies = if args.quick { 2 } else { 16 };
        let (buffered, streamed) = streaming::throughput(bodies, rep % 2 == 0).await?;
        let name = "streaming: 16 MiB echoes one at a time";
        results.add(format!("{name}, buffered"), 0, "Mbit/s", buffered);
        results.add(format!("{name}, streamed"), 0, "Mbit/s", streamed);
        results.add(
            format!("{name}, streamed / buffered"),
            0,
            "ratio",
            streamed / buffered,
        );
        let bytes: u64 = if args.quick { 256 << 20 } else { 4 << 30 };
        step(format!(
            "streaming {} echo through the CLI ({rep} of {repeat})",
            size_label(bytes as usize)
        ));
        let big = tokio::task::block_in_place(|| streaming::big_echo(bytes))?;
        let name = format!(
            "streaming: {} echo through the CLI",
            size_label(bytes as usize)
        );
        results.add(format!("{name}, SHA-256 equal"), 0, "Mbit/s", big.megabits);
        results.add(
            format!("{name}, node RSS growth"),
            0,
            "MiB",
            big.node_growth_mib,
        );
        results.add(
            format!("{name}, client RSS growth"),
            0,
            "MiB",
            big.client_growth_mib,
        );
    }
    bar.finish_and_clear();

    print_table(&results.figures, args.quick);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&results.figures)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(dir) = &args.plot {
        let written = plot::write_all(dir, &results)?;
        for file in written {
            eprintln!("bench: wrote {}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b => format!("{} MiB", b >> 20),
    }
}

fn print_table(figures: &[Figure], quick: bool) {
    if quick {
        println!("(--quick: tiny sizes, the figures mean nothing)");
    }
    println!(
        "{:<52} {:>22} {:>22} {:>22} {:>9} {:>9}",
        "scenario (median of runs, [min-max])",
        "rustorium",
        "quinn",
        "tcp+tls",
        "vs quinn",
        "vs tcp"
    );
    for scenario in scenarios_in_order(figures) {
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
        let unit = STACKS
            .iter()
            .find_map(|stack| get(stack))
            .map_or("", |f| f.unit);
        println!(
            "{:<52} {:>22} {:>22} {:>22} {:>9} {:>9}",
            format!("{scenario} ({unit})"),
            cell(ours),
            cell(get("quinn")),
            cell(get("tcp+tls")),
            ratio(get("quinn")),
            ratio(get("tcp+tls")),
        );
    }
    println!(
        "ratios: ours / baseline (for µs, ms, KiB and fds lower is better; for req/s, Gbit/s, Mbit/s, conn/s and Jain higher is better)"
    );
}

/// The scenarios, in the order they were first measured.
fn scenarios_in_order<'a>(figures: impl IntoIterator<Item = &'a Figure>) -> Vec<&'a str> {
    let mut scenarios: Vec<&str> = Vec::new();
    for f in figures {
        if !scenarios.contains(&f.scenario.as_str()) {
            scenarios.push(&f.scenario);
        }
    }
    scenarios
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
