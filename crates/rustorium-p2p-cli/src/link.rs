//! `link`: the impaired UDP relay as a command.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use rustorium_p2p::config::parse_duration;
use rustorium_p2p_link::{parse_fraction, parse_rate, Link, LinkConfig};

#[derive(Args)]
pub struct LinkArgs {
    /// Address clients send to (port 0: any free port; printed on the first stdout line).
    #[arg(long)]
    listen: SocketAddr,
    /// The server to relay to.
    #[arg(long)]
    to: SocketAddr,
    /// Packets lost, e.g. 5%.
    #[arg(long, value_parser = parse_fraction, default_value = "0%")]
    loss: f64,
    /// Mean loss burst length in packets (1: independent losses).
    #[arg(long, default_value_t = 1.0)]
    burst: f64,
    /// One-way delay, e.g. 20ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    delay: Duration,
    /// Delay variation either way, e.g. 5ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    jitter: Duration,
    /// Packets held back to be overtaken, e.g. 1%.
    #[arg(long, value_parser = parse_fraction, default_value = "0%")]
    reorder: f64,
    /// Packets delivered twice, e.g. 1%.
    #[arg(long, value_parser = parse_fraction, default_value = "0%")]
    duplicate: f64,
    /// Bandwidth cap, e.g. 100Mbit.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Seed of the random choices (the same seed repeats the same choices).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub async fn run(args: LinkArgs) -> anyhow::Result<ExitCode> {
    let mut config = LinkConfig::default();
    config.loss = args.loss;
    config.burst = args.burst;
    config.delay = args.delay;
    config.jitter = args.jitter;
    config.reorder = args.reorder;
    config.duplicate = args.duplicate;
    config.rate = args.rate;
    config.seed = args.seed;
    let link = Link::start(args.listen, args.to, config).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", link.local_addr())?;
    stdout.flush()?;
    drop(stdout);
    eprintln!(
        "relaying {} -> {}; Ctrl-C stops",
        link.local_addr(),
        args.to
    );
    tokio::signal::ctrl_c().await?;
    let s = link.stats();
    println!(
        "delivered {} dropped {} duplicated {} reordered {}",
        s.delivered, s.dropped, s.duplicated, s.reordered
    );
    Ok(ExitCode::SUCCESS)
}
