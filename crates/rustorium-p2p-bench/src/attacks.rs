//! Attacks on a node (default limits) while a good peer makes sequential 64-byte
//! requests: the good peer's p50 and p99 under each attack, beside the same figures with
//! no attack, on the same node. Each attack is one of docs/SECURITY.md's rows, run at the
//! rate its name states.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustorium_p2p::{Config, Node};
use tokio::task::JoinSet;

use crate::baselines::stranger_client;
use crate::scenarios::{bench_routes, ECHO};

/// How long an attack runs before the good peer is measured.
const WARM_UP: Duration = Duration::from_secs(1);

/// One attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// Half-open handshakes (a first flight, then silence) from 4 addresses.
    HalfOpen,
    /// Strangers that advertise no receive window and keep requests open whose answers
    /// they never read; cut off, they come back with a new key.
    Unread,
    /// Requests with large bodies that are never finished, over many connections.
    Unfinished,
    /// One peer holding as many requests open as it can (handlers that never return).
    Greedy,
}

impl Attack {
    pub const ALL: [Attack; 4] = [
        Attack::HalfOpen,
        Attack::Unread,
        Attack::Unfinished,
        Attack::Greedy,
    ];

    /// The attack and its rate, for the table.
    pub fn name(self, quick: bool) -> String {
        let s = Scale::new(quick);
        match self {
            Attack::HalfOpen => format!("{} half-open handshakes/s", s.initials_per_sec),
            Attack::Unread => format!(
                "{} strangers x {} unread answers, back when cut off",
                s.unread_conns, s.unread_streams
            ),
            Attack::Unfinished => format!(
                "{} strangers x {} unfinished {} KiB bodies",
                s.body_conns,
                s.body_streams,
                s.body_bytes >> 10
            ),
            Attack::Greedy => format!("1 peer holding {} requests", s.greedy),
        }
    }
}

/// How hard each attack pushes.
struct Scale {
    initials_per_sec: u32,
    unread_conns: usize,
    unread_streams: usize,
    body_conns: usize,
    body_streams: usize,
    body_bytes: usize,
    greedy: usize,
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                initials_per_sec: 200,
                unread_conns: 2,
                unread_streams: 16,
                body_conns: 2,
                body_streams: 2,
                body_bytes: 256 << 10,
                greedy: 300,
            }
        } else {
            Scale {
                initials_per_sec: 1000,
                unread_conns: 16,
                unread_streams: 64,
                body_conns: 40,
                body_streams: 8,
                body_bytes: 1 << 20,
                greedy: 1000,
            }
        }
    }
}

/// The good peer's figures: p50 and p99 in µs.
pub struct GoodPeer {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A node with the default limits and the bench's routes, plus `hold` (never answers).
async fn server() -> anyhow::Result<Node> {
    let mut config = Config::default();
    config.node.listen = "127.0.0.1:0".parse()?;
    let builder = bench_routes(Node::builder().config(config)).route("hold", |_ctx, _body| async {
        std::future::pending::<()>().await;
        Ok(Bytes::new())
    });
    Ok(builder.bind().await?)
}

/// `n` sequential 64-byte echoes by a good peer.
async fn good_peer(server: &Node, n: usize) -> anyhow::Result<GoodPeer> {
    let good = Node::builder().bind().await?;
    good.connect(&server.peer_addr()).await?;
    let body = Bytes::from(vec![7u8; 64]);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let answer = good.request(server.peer_id(), ECHO, body.clone()).await?;
        times.push(start.elapsed());
        anyhow::ensure!(answer == body, "the good peer got other bytes back");
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    good.shutdown().await;
    Ok(GoodPeer {
        p50_us: at(0.5).as_secs_f64() * 1e6,
        p99_us: at(0.99).as_secs_f64() * 1e6,
    })
}

/// The good peer with no attack, then under `attack`, each on a fresh node.
pub async fn measure(
    attack: Option<Attack>,
    requests: usize,
    quick: bool,
) -> anyhow::Result<GoodPeer> {
    let node = server().await?;
    let mut attackers = JoinSet::new();
    let mut keep = Vec::new();
    if let Some(attack) = attack {
        start(attack, &node, Scale::new(quick), &mut attackers, &mut keep).await?;
    }
    if attack.is_some() {
        // Measured once the attack is under way, not while it starts.
        tokio::time::sleep(WARM_UP).await;
    }
    let figures = good_peer(&node, requests).await;
    attackers.abort_all();
    drop(keep);
    node.shutdown().await;
    figures
}

/// Starts `attack` on `node` in `tasks`; what must stay alive goes in `keep`.
async fn start(
    attack: Attack,
    node: &Node,
    s: Scale,
    tasks: &mut JoinSet<()>,
    keep: &mut Vec<quinn::Endpoint>,
) -> anyhow::Result<()> {
    let target = node.local_addr();
    match attack {
        Attack::HalfOpen => {
            let config = stranger_client(None)?;
            tasks.spawn(async move {
                let interval = Duration::from_secs(1) / s.initials_per_sec;
                let mut ticker = tokio::time::interval(interval);
                let mut sockets = std::collections::VecDeque::new();
                for i in 0u32.. {
                    ticker.tick().await;
                    let from: IpAddr = [127, 0, 0, 2 + (i % 4) as u8].into();
                    if let Ok(socket) = half_open(target, from, config.clone()) {
                        // Keep the last few bound (no ICMP back to the node).
                        sockets.push_back(socket);
                        if sockets.len() > 1024 {
                            sockets.pop_front();
                        }
                    }
                }
            });
        }
        Attack::Unread => {
            for _ in 0..s.unread_conns {
                tasks.spawn(async move {
                    let mut request = rustorium_p2p::wire::encode_header(ECHO);
                    request.extend_from_slice(&[7u8; 64]);
                    // Each time the node cuts it off, the stranger comes back with a new key.
                    loop {
                        let Ok(config) = stranger_client(Some(0)) else {
                            return;
                        };
                        let Ok((_endpoint, conn)) = connect(target, config).await else {
                            continue;
                        };
                        // Keep `unread_streams` requests open, replacing those reset.
                        let mut open = std::collections::VecDeque::new();
                        while let Ok((mut send, recv)) = conn.open_bi().await {
                            let _ = send.write_all(&request).await;
                            let _ = send.finish();
                            open.push_back((send, recv));
                            if open.len() >= s.unread_streams {
                                open.pop_front();
                            }
                        }
                    }
                });
            }
        }
        Attack::Unfinished => {
            for _ in 0..s.body_conns {
                // A fresh key for each connection: as many strangers.
                let (endpoint, conn) = connect(target, stranger_client(None)?).await?;
                keep.push(endpoint);
                for _ in 0..s.body_streams {
                    let conn = conn.clone();
                    tasks.spawn(async move {
                        let Ok((mut send, _recv)) = conn.open_bi().await else {
                            return;
                        };
                        let mut body = rustorium_p2p::wire::encode_header(ECHO);
                        body.resize(body.len() + s.body_bytes - 1, 1);
                        let _ = send.write_all(&body).await;
                        std::future::pending::<()>().await; // never finished
                    });
                }
            }
        }
        Attack::Greedy => {
            let greedy = Node::builder().bind().await?;
            greedy.connect(&node.peer_addr()).await?;
            for _ in 0..s.greedy {
                let (greedy, peer) = (greedy.clone(), node.peer_id());
                tasks.spawn(async move {
                    let _ = greedy.request(peer, "hold", Bytes::new()).await;
                });
            }
        }
    }
    Ok(())
}

async fn connect(
    target: SocketAddr,
    config: quinn::ClientConfig,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = endpoint.connect_with(config, target, "rustorium")?.await?;
    Ok((endpoint, conn))
}

/// Sends the first flight of a QUIC handshake to `target` from a fresh port on `from`,
/// and answers nothing after it.
fn half_open(
    target: SocketAddr,
    from: IpAddr,
    config: quinn::ClientConfig,
) -> anyhow::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind((from, 0))?;
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let (_, mut conn) = endpoint.connect(Instant::now(), config, target, "rustorium")?;
    let mut buf = Vec::new();
    while let Some(transmit) = conn.poll_transmit(Instant::now(), 1, &mut buf) {
        socket.send_to(&buf[..transmit.size], target)?;
        buf.clear();
    }
    Ok(socket)
}
