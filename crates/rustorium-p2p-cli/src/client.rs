//! `request`, `send` and `ping`: one-shot clients with their own (ephemeral) node.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use rustorium_p2p::{Bytes, Node, PeerAddr};

#[derive(Args)]
pub struct Target {
    /// The peer: <peer_id>@<host>:<port>, as the node prints it.
    pub(crate) peer: PeerAddr,
    /// Key file to authenticate with; default: an ephemeral identity.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Give up after this long: a duration as in the config file (`2s`, `500ms`, `1m`),
    /// or a number of seconds.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub(crate) timeout: Duration,
}

#[derive(Args)]
pub struct Body {
    /// The body, as text.
    #[arg(long, conflicts_with = "file")]
    pub(crate) data: Option<String>,
    /// Read the body from a file (`-`: standard input), streamed as it is read.
    #[arg(long)]
    pub(crate) file: Option<PathBuf>,
}

impl Body {
    /// The `--data` body (empty without it). A `--file` body is streamed instead
    /// (`crate::transfer`).
    fn data(&self) -> Bytes {
        self.data.clone().map(Bytes::from).unwrap_or_default()
    }
}

/// What `request` and `send` take.
#[derive(Args)]
pub struct MessageArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// The route, for example sys/echo (1 to 255 bytes).
    #[arg(value_parser = route)]
    pub(crate) route: String,
    #[command(flatten)]
    pub(crate) body: Body,
}

#[derive(Args)]
pub struct PingArgs {
    #[command(flatten)]
    target: Target,
    /// How many pings (at least 1).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Time between pings: a duration (`1s`, `200ms`) or a number of seconds.
    #[arg(long, default_value = "1s", value_parser = duration)]
    interval: Duration,
}

/// A route argument, checked before anything starts.
fn route(text: &str) -> Result<String, String> {
    rustorium_p2p::wire::check_route(text)
        .map(|()| text.to_string())
        .map_err(|reason| reason.to_string())
}

/// A client node, connected to the target.
pub(crate) async fn connect(target: &Target) -> anyhow::Result<Node> {
    // A file named on the command line that cannot be used is a usage error (exit 2).
    let key = super::keys::key_or_ephemeral(target.key.as_deref())
        .map_err(|e| crate::Usage(format!("--key: {}", crate::report(&e))))?;
    if key.peer_id() == target.peer.peer_id {
        let path = target.key.as_deref().unwrap_or(std::path::Path::new("-"));
        return Err(crate::Usage(format!(
            "--key {}: that is the key of the node you are asking (PeerId {}); a client needs an identity of its own: leave out --key for a fresh one, or give another key",
            path.display(),
            target.peer.peer_id.short()
        ))
        .into());
    }
    let timeout = target.timeout;
    let mut config = rustorium_p2p::Config::default();
    config.limits.request_timeout = timeout;
    config.limits.connect_timeout = timeout;
    let node = Node::builder()
        .keypair(key)
        .listen(local_for(target.peer.addr))
        .config(config)
        .bind()
        .await?;
    // Nothing answering looks the same as a node that is not running: say so.
    let silent = || {
        anyhow::anyhow!(
            "no answer from {} within {timeout:?}: is a node running there, and is this its PeerAddr? (`rustorium-p2p node` prints its PeerAddr as its first line)",
            target.peer.addr
        )
    };
    match tokio::time::timeout(timeout, node.connect(&target.peer)).await {
        Err(_) | Ok(Err(rustorium_p2p::ConnectError::TimedOut { .. })) => Err(silent()),
        Ok(result) => result.map(|_| node).map_err(Into::into),
    }
}

/// A duration flag: the config file's forms (`2s`, `500ms`, `1m`), or a plain number of
/// seconds.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{text:?} is not a duration (try 2s or 500ms)")),
        Err(_) => rustorium_p2p::config::parse_duration(text),
    }
}

/// A duration flag that must be more than zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    duration(text).and_then(|d| {
        if d.is_zero() {
            Err("must be more than 0 (for example 2s or 500ms)".into())
        } else {
            Ok(d)
        }
    })
}

/// A local address of the family of `remote`: loopback for a loopback peer.
fn local_for(remote: SocketAddr) -> SocketAddr {
    match remote {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => "127.0.0.1:0".parse().unwrap(),
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(v6) if v6.ip().is_loopback() => "[::1]:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    }
}

/// What `request` takes.
#[derive(Args)]
pub struct RequestArgs {
    #[command(flatten)]
    message: MessageArgs,
    /// Write the answer to this file as it arrives, instead of to standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    // A file in or out streams: neither end is held whole in memory.
    if args.message.body.file.is_some() || args.out.is_some() {
        return crate::transfer::request(args.message, args.out).await;
    }
    let args = args.message;
    let body = args.body.data();
    let node = connect(&args.target).await?;
    let answer = node
        .request(args.target.peer.peer_id, &args.route, body)
        .await;
    node.shutdown().await;
    let answer = answer?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&answer)?;
    // On a terminal, end the line so the prompt does not run on (a pipe or a file gets
    // the answer's bytes exactly).
    if std::io::IsTerminal::is_terminal(&stdout) && !answer.is_empty() && !answer.ends_with(b"\n") {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub async fn send(args: MessageArgs) -> anyhow::Result<ExitCode> {
    if args.body.file.is_some() {
        return crate::transfer::send(args).await;
    }
    let body = args.body.data();
    let node = connect(&args.target).await?;
    let sent = node.send(args.target.peer.peer_id, &args.route, body).await;
    node.shutdown().await;
    sent?;
    Ok(ExitCode::SUCCESS)
}

pub async fn ping(args: PingArgs) -> anyhow::Result<ExitCode> {
    let interval = args.interval;
    let started = Instant::now();
    let node = connect(&args.target).await?;
    let peer = args.target.peer;
    println!(
        "PING {} at {}: connected in {:.3} ms",
        peer.peer_id.short(),
        peer.addr,
        ms(started.elapsed())
    );
    let mut times = Vec::new();
    for seq in 1..=args.count {
        if seq > 1 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        let sent = Instant::now();
        match node.request(peer.peer_id, "sys/ping", Bytes::new()).await {
            Ok(_) => {
                let rtt = sent.elapsed();
                println!("seq={seq} time={:.3} ms", ms(rtt));
                times.push(rtt);
            }
            Err(e) => println!("seq={seq} error: {e}"),
        }
    }
    node.shutdown().await;
    let failed = args.count as usize - times.len();
    print!(
        "--- {} pings, {} answered, {failed} failed",
        args.count,
        times.len()
    );
    if let (Some(min), Some(max)) = (times.iter().min(), times.iter().max()) {
        let avg = times.iter().sum::<Duration>() / times.len() as u32;
        print!(
            "; rtt min/avg/max = {:.3}/{:.3}/{:.3} ms",
            ms(*min),
            ms(avg),
            ms(*max)
        );
    }
    println!();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
