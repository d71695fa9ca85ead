//! `node`: run a node until a signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use rustorium_p2p::{Node, PeerAddr, PeerEvent};

#[derive(Args)]
pub struct NodeArgs {
    /// Key file; default: `node.key` in the data directory ($RUSTORIUM_P2P_DATA_DIR, else
    /// $XDG_DATA_HOME/rustorium-p2p, else ~/.local/share/rustorium-p2p), made on first run.
    #[arg(long)]
    key: Option<PathBuf>,
    /// UDP address to listen on (port 0: any free port; the first stdout line shows it).
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// A peer to keep connected (redialed with backoff when the connection drops);
    /// repeat for more.
    #[arg(long = "peer", value_name = "PEERADDR")]
    peers: Vec<PeerAddr>,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let (key, key_path) = super::keys::node_key(args.key.as_deref())?;
    let node = Node::builder()
        .keypair(key)
        .listen(args.listen)
        .system_routes()
        .bind()
        .await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", node.peer_addr())?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(key = %key_path.display(), "serving sys/ping, sys/echo, sys/info; Ctrl-C or SIGTERM stops");
    let mut events = node.events();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                PeerEvent::Connected {
                    peer,
                    addr,
                    direction,
                } => {
                    tracing::info!(%peer, %addr, ?direction, "peer connected")
                }
                PeerEvent::Disconnected {
                    peer, addr, reason, ..
                } => {
                    tracing::info!(%peer, %addr, %reason, "peer disconnected")
                }
                _ => {}
            }
        }
    });
    for peer in args.peers {
        node.add_known_peer(peer);
    }

    let signal = wait_for_signal().await?;
    tracing::info!("{signal}: shutting down (a second signal exits at once)");
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            std::process::exit(130);
        }
    });
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}
