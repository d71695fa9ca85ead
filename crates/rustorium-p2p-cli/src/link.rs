//! `link`: the impaired UDP relay as a command.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use rustorium_p2p::config::parse_duration;
use rustorium_p2p_link::{parse_percent, parse_rate, Link, LinkConfig};

#[derive(Args)]
pub struct LinkArgs {
    /// Address clients send to (port 0: any free port; printed on the first stdout line).
    #[arg(long)]
    listen: SocketAddr,
    /// The server to relay to.
    #[arg(long)]
    to: SocketAddr,
    /// Packets lost, e.g. 5%.
    #[arg(long, value_parser = parse_percent, default_value = "0%")]
    loss: f64,
    /// Mean loss burst length in packets, at least 1 (1: independent losses).
    #[arg(long, default_value_t = 1.0, value_parser = burst)]
    burst: f64,
    /// One-way delay, e.g. 20ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    delay: Duration,
    /// Delay variation either way, e.g. 5ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    jitter: Duration,
    /// Packets held back to be overtaken, e.g. 1%.
    #[arg(long, value_parser = parse_percent, default_value = "0%")]
    reorder: f64,
    /// Packets delivered twice, e.g. 1%.
    #[arg(long, value_parser = parse_percent, default_value = "0%")]
    duplicate: f64,
    /// Bandwidth cap, e.g. 100Mbit.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Seed of the random choices (the same seed repeats the same choices).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `--burst`: a mean length in packets, at least 1.
fn burst(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(n) if n >= 1.0 && n.is_finite() => Ok(n),
        _ => Err(format!(
            "{text:?} is not a mean burst length of at least 1 packet"
        )),
    }
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
    // Signals are caught from before the address is printed: whoever reads that line may
    // stop the link at once, and still gets its statistics.
    let stop = stop_signal()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", link.local_addr())?;
    stdout.flush()?;
    drop(stdout);
    eprintln!(
        "relaying {} -> {}; Ctrl-C or SIGTERM stops and prints what was relayed",
        link.local_addr(),
        args.to
    );
    stop.await?;
    let s = link.stats();
    println!(
        "delivered {} dropped {} duplicated {} reordered {}",
        s.delivered, s.dropped, s.duplicated, s.reordered
    );
    Ok(ExitCode::SUCCESS)
}

/// A future that ends on Ctrl-C (SIGINT) or, on Unix, SIGTERM (what `kill` and service
/// managers send). On Unix both are caught from the moment this returns.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok(())
        })
    }
    #[cfg(not(unix))]
    Ok(tokio::signal::ctrl_c())
}
