//! `node`: run a node until a signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use rustorium_p2p::{Node, PeerAddr, PeerEvent};

use crate::config_file::{FileConfig, LogFormat};

#[derive(Args)]
pub struct NodeArgs {
    /// Configuration file (TOML; `rustorium-p2p config default` prints one). Flags given
    /// here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Key file; default: the config's `node.key_file`, else `node.key` in the data
    /// directory ($RUSTORIUM_P2P_DATA_DIR, else $XDG_DATA_HOME/rustorium-p2p, else
    /// ~/.local/share/rustorium-p2p), made on first run.
    #[arg(long)]
    key: Option<PathBuf>,
    /// UDP address to listen on, `host:port` (a name such as `localhost` is resolved, as
    /// in a PEERADDR, to its first IPv4 address if it has one; port 0: any free port; the
    /// first stdout line shows it).
    /// Default: the config's `node.listen`, 127.0.0.1:4433.
    #[arg(long, value_parser = listen_address)]
    listen: Option<SocketAddr>,
    /// A peer to keep connected (redialed with backoff when the connection drops);
    /// repeat for more.
    #[arg(long = "peer", value_name = "PEERADDR")]
    peers: Vec<PeerAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// Exit code for a configuration that cannot start a node.
const CONFIG_ERROR: u8 = 2;

/// The config file (or the defaults) with the command-line flags applied.
fn effective_config(args: &NodeArgs) -> Result<FileConfig, String> {
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let node = &mut file.node;
    if let Some(listen) = args.listen {
        node.listen = listen;
    }
    if let Some(key) = &args.key {
        node.key_file = Some(key.clone());
    }
    node.peers.extend(args.peers.iter().copied());
    if let Some(addr) = args.metrics {
        node.metrics_addr = Some(addr);
    }
    if let Some(format) = args.log_format {
        node.log_format = format;
    }
    file.node_config().validate().map_err(|e| e.problem)?;
    Ok(file)
}

pub fn check_config(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    // The key file too, if the file names one: a node would fail on it at start.
    let checked = FileConfig::load(path).and_then(|file| match &file.node.key_file {
        Some(key) => super::keys::node_key(Some(key))
            .map(drop)
            .map_err(|e| format!("{}: node.key_file: {}", path.display(), crate::report(&e))),
        None => Ok(()),
    });
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            Ok(ExitCode::from(CONFIG_ERROR))
        }
    }
}

pub async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    // Everything that can be wrong with the configuration is found before anything starts.
    let started = async {
        let mut file =
            effective_config(&args).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        super::init_logging(&file.node.log_level, file.node.log_format);
        let (key, key_path) = super::keys::node_key(file.node.key_file.as_deref())?;
        let lock = super::keys::lock_key(&key_path, file.node.key_file.is_some())?;
        if let Some(own) = args.peers.iter().find(|p| p.peer_id == key.peer_id()) {
            anyhow::bail!(
                "--peer {own}: that is this node's own PeerId; a node does not dial itself: give the PeerAddr of another node"
            );
        }
        // A peer list shared by every node of a cluster names each node too: skip it.
        let listed = file.node.peers.len();
        file.node.peers.retain(|p| p.peer_id != key.peer_id());
        if file.node.peers.len() < listed {
            tracing::info!("node.peers names this node itself; skipping that entry");
        }
        let metrics = match file.node.metrics_addr {
            Some(addr) => Some(
                crate::metrics_http::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?,
            ),
            None => None,
        };
        let builder = Node::builder().config(file.node_config()).keypair(key);
        let (builder, info) = crate::system::routes(builder);
        let node = builder.bind().await?;
        info.set(&node);
        Ok::<_, anyhow::Error>((node, key_path, metrics, lock))
    };
    let (node, key_path, metrics, _key_lock) = match started.await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("error: {}", crate::report(&e));
            return Ok(ExitCode::from(CONFIG_ERROR));
        }
    };
    // Signals are caught from before the address is printed: whoever starts the node and
    // reads that line may stop it at once, and gets a clean shutdown.
    let mut signals = Signals::new()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", node.peer_addr())?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(key = %key_path.display(), "serving sys/ping, sys/echo, sys/info; Ctrl-C or SIGTERM stops");
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics at http://{addr}/metrics");
        }
        let weak = node.downgrade();
        let render = move || weak.upgrade().map(|n| n.metrics_text()).unwrap_or_default();
        tokio::spawn(crate::metrics_http::serve(listener, render));
    }
    tokio::spawn(follow_events(node.events(), |seen| match seen {
        Seen::Event(PeerEvent::Connected {
            peer,
            addr,
            direction,
        }) => tracing::info!(%peer, %addr, %direction, "peer connected"),
        Seen::Event(PeerEvent::Disconnected {
            peer, addr, reason, ..
        }) => tracing::info!(%peer, %addr, %reason, "peer disconnected"),
        Seen::Event(_) => {}
        Seen::Skipped(skipped) => {
            tracing::warn!("{skipped} connection events skipped (the log fell behind)")
        }
    }));

    let signal = signals.next().await.unwrap_or("signal stream ended");
    tracing::info!("{signal}: shutting down (a second signal exits at once)");
    tokio::spawn(async move {
        if signals.next().await.is_some() {
            std::process::exit(130);
        }
    });
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere), caught from when this is made.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's name.
    async fn next(&mut self) -> Option<&'static str> {
        #[cfg(unix)]
        {
            tokio::select! {
                s = self.term.recv() => s.map(|_| "SIGTERM"),
                s = self.int.recv() => s.map(|_| "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await.ok().map(|_| "Ctrl-C")
        }
    }
}

/// What the event log sees: an event, or how many it missed.
#[derive(Debug)]
enum Seen {
    Event(PeerEvent),
    Skipped(u64),
}

/// Hands every connection event to `log` until the node is gone. A log that falls behind
/// a burst of events is told how many it missed, and goes on.
async fn follow_events(
    mut events: tokio::sync::broadcast::Receiver<PeerEvent>,
    mut log: impl FnMut(Seen),
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(event) => log(Seen::Event(event)),
            Err(RecvError::Lagged(skipped)) => log(Seen::Skipped(skipped)),
            Err(RecvError::Closed) => break,
        }
    }
}

/// `--listen`: a socket address, or `host:port` with a host name resolved to its first
/// address.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let resolved: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("expected host:port, for example 127.0.0.1:4433 ({e})"))?
        .collect();
    // IPv4 first: `localhost` often resolves to ::1 first, where peers dialing 127.0.0.1
    // would not find the node.
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_log_that_falls_behind_says_so_and_goes_on() {
        let (tx, rx) = tokio::sync::broadcast::channel(2);
        let event = |n: u16| PeerEvent::Connected {
            peer: rustorium_p2p::PeerId::from_bytes([1; 32]),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], n)),
            direction: rustorium_p2p::Direction::Inbound,
        };
        for n in 1..=5 {
            tx.send(event(n)).unwrap();
        }
        drop(tx);
        let mut seen = Vec::new();
        follow_events(rx, |s| seen.push(s)).await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(matches!(seen[0], Seen::Skipped(3)), "{seen:?}");
        // The events after the gap are still seen.
        assert!(
            matches!(&seen[2], Seen::Event(PeerEvent::Connected { addr, .. }) if addr.port() == 5),
            "{seen:?}"
        );
    }
}
