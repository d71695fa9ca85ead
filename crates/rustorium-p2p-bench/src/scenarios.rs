//! The client scenarios, each on one of three stacks: ours (a node answering on
//! `sys/echo` and `sys/ping`, the system routes every node started by the CLI serves, so
//! that `--target` can point at any such node), raw quinn and TCP + TLS (see `baselines`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustorium_p2p::{
    AnswerWriter, BodyReader, Bytes, HandlerError, Node, NodeBuilder, PeerAddr, PeerId,
    RequestContext, RequestOptions,
};

use rustorium_p2p_link::{Link, LinkConfig};

use super::baselines::{quinn_call, QuinnClient, QuinnServer, TcpClient, TcpServer};
use futures_util::future::join_all;

use super::bench_config;

/// The route that echoes (every node started by the CLI has it).
pub const ECHO: &str = "sys/echo";
/// The route that takes a body and answers nothing (every CLI node has it).
pub const SINK: &str = "sys/ping";

/// A streaming route that reads a body a chunk at a time and answers nothing: what an
/// application receiving a large upload runs (only the bench's own server has it).
pub const STREAM_SINK: &str = "bench/stream-sink";

/// The stacks, in table order.
pub const STACKS: [&str; 3] = ["rustorium", "quinn", "tcp+tls"];

/// A server of our stack on loopback.
pub async fn our_server() -> anyhow::Result<Node> {
    let node = bench_routes(Node::builder().config(bench_config()));
    Ok(node.bind().await?)
}

/// The routes the bench measures, as the CLI node serves them: [`ECHO`] answers the body,
/// [`SINK`] answers nothing.
pub fn bench_routes(builder: NodeBuilder) -> NodeBuilder {
    builder
        .early_data_route(ECHO, |_ctx, body: Bytes| async move { Ok(body) })
        .early_data_route(SINK, |_ctx, _body| async { Ok(Bytes::new()) })
        .streaming_route(
            STREAM_SINK,
            |_ctx: RequestContext, mut body: BodyReader, _answer: AnswerWriter| async move {
                while body.chunk().await?.is_some() {}
                Ok::<_, HandlerError>(())
            },
        )
}

/// The three stacks, each with a server and a connected client; against `--target`, ours
/// only, its server remote.
pub struct Stacks {
    pub ours: Node,
    pub target: PeerAddr,
    _server: Option<Node>,
    quinn: Option<(quinn::Connection, QuinnClient, QuinnServer)>,
    tcp: Option<(Arc<TcpClient>, TcpServer)>,
}

impl Stacks {
    pub async fn start(target: Option<PeerAddr>) -> anyhow::Result<Stacks> {
        let ours = Node::builder().config(bench_config()).bind().await?;
        let (server, target) = match target {
            Some(target) => (None, target),
            None => {
                let server = our_server().await?;
                let addr = server.peer_addr();
                (Some(server), addr)
            }
        };
        ours.connect(&target).await?;
        let (mut quinn, mut tcp) = (None, None);
        if server.is_some() {
            let quinn_server = QuinnServer::start()?;
            let client = QuinnClient::new()?;
            let conn = client.connect(quinn_server.addr(), false).await?;
            quinn = Some((conn, client, quinn_server));
            let tcp_server = TcpServer::start().await?;
            tcp = Some((
                Arc::new(TcpClient::connect(tcp_server.addr).await?),
                tcp_server,
            ));
        }
        Ok(Stacks {
            ours,
            target,
            _server: server,
            quinn,
            tcp,
        })
    }

    /// Whether stack `which` runs here (against `--target`, only ours does).
    pub fn has(&self, which: usize) -> bool {
        match which {
            0 => true,
            1 => self.quinn.is_some(),
            _ => self.tcp.is_some(),
        }
    }

    fn peer(&self) -> PeerId {
        self.target.peer_id
    }

    /// One echo request on stack `which`.
    pub async fn call(&self, which: usize, body: Bytes) -> anyhow::Result<Bytes> {
        match (which, &self.quinn, &self.tcp) {
            (0, _, _) => Ok(self.ours.request(self.peer(), ECHO, body).await?),
            (1, Some((conn, ..)), _) => quinn_call(conn, body).await,
            (2, _, Some((tcp, _))) => tcp.call(body).await,
            _ => anyhow::bail!("stack {which} is not running"),
        }
    }
}

/// Sequential 64-byte requests: every round trip's time.
pub async fn sequential(stacks: &Stacks, stack: usize, n: usize) -> anyhow::Result<Vec<Duration>> {
    let body = Bytes::from(vec![7u8; 64]);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let answer = stacks.call(stack, body.clone()).await?;
        times.push(start.elapsed());
        anyhow::ensure!(answer == body, "{} answered other bytes", STACKS[stack]);
    }
    times.sort();
    Ok(times)
}

/// Requests per second with `in_flight` requests of `size` bytes outstanding at all times.
pub async fn request_rate(
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

/// How a bulk upload is spread.
#[derive(Clone, Copy)]
pub enum Shape {
    /// The whole payload as one message on one stream.
    OneStream,
    /// Eight messages at once on one connection, each on its own stream.
    EightStreams,
    /// Four connections at once, one message on each.
    FourConnections,
    /// One stream whose body our node streams ([`Node::open_request`] to
    /// [`STREAM_SINK`], written in 1 MiB pieces, read by the handler a chunk at a time);
    /// the baselines do as in [`Shape::OneStream`], their servers reading and dropping a
    /// large body as it comes.
    OneStreamStreamed,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::OneStream,
        Shape::OneStreamStreamed,
        Shape::EightStreams,
        Shape::FourConnections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::OneStream => "one stream",
            Shape::OneStreamStreamed => "one stream, body streamed",
            Shape::EightStreams => "8 streams, one connection",
            Shape::FourConnections => "4 connections",
        }
    }

    fn parts(self) -> usize {
        match self {
            Shape::OneStream | Shape::OneStreamStreamed => 1,
            Shape::EightStreams => 8,
            Shape::FourConnections => 4,
        }
    }
}

/// Uploads `payload` shaped as `shape` and waits for the (empty) answers. Returns Gbit/s.
/// Every stack answers a body above 64 KiB with nothing, as our `sys/ping` does.
pub async fn bulk(
    stacks: &Stacks,
    stack: usize,
    shape: Shape,
    payload: &Bytes,
) -> anyhow::Result<f64> {
    let part = payload.len() / shape.parts();
    let parts: Vec<Bytes> = (0..shape.parts())
        .map(|i| payload.slice(i * part..(i + 1) * part))
        .collect();
    let sent = (part * parts.len()) as f64;
    // Extra connections are made before the clock starts.
    let (start, took);
    match (stack, shape) {
        (0, Shape::FourConnections) => {
            let mut nodes = Vec::new();
            for _ in 0..4 {
                let node = Node::builder().config(bench_config()).bind().await?;
                node.connect(&stacks.target).await?;
                nodes.push(node);
            }
            start = Instant::now();
            let uploads = nodes.iter().zip(parts).map(|(node, part)| {
                let peer = stacks.peer();
                async move { node.request(peer, SINK, part).await }
            });
            for done in join_all(uploads).await {
                done?;
            }
            took = start.elapsed();
            for node in nodes {
                node.shutdown().await;
            }
        }
        (0, Shape::OneStreamStreamed) => {
            const PIECE: usize = 1 << 20;
            let body = parts.into_iter().next().unwrap_or_default();
            start = Instant::now();
            let (mut writer, answer) = stacks.ours.open_request(stacks.peer(), STREAM_SINK).await?;
            let send = async {
                for at in (0..body.len()).step_by(PIECE) {
                    writer
                        .write(body.slice(at..(at + PIECE).min(body.len())))
                        .await?;
                }
                writer.finish()
            };
            let (sent, answer) = tokio::join!(send, answer.read_to_end(0));
            sent?;
            answer?;
            took = start.elapsed();
        }
        (0, _) => {
            start = Instant::now();
            let uploads = parts
                .into_iter()
                .map(|part| stacks.ours.request(stacks.peer(), SINK, part));
            for done in join_all(uploads).await {
                done?;
            }
            took = start.elapsed();
        }
        (1, shape) => {
            let Some((conn, client, server)) = &stacks.quinn else {
                anyhow::bail!("quinn is not running");
            };
            let mut conns = vec![conn.clone()];
            if let Shape::FourConnections = shape {
                conns.clear();
                for _ in 0..4 {
                    conns.push(client.connect(server.addr(), false).await?);
                }
            }
            start = Instant::now();
            let uploads = parts.into_iter().enumerate().map(|(i, part)| {
                let conn = conns[i % conns.len()].clone();
                async move { quinn_call(&conn, part).await }
            });
            for done in join_all(uploads).await {
                done?;
            }
            took = start.elapsed();
        }
        (_, shape) => {
            let Some((tcp, server)) = &stacks.tcp else {
                anyhow::bail!("tcp+tls is not running");
            };
            let mut clients = vec![tcp.clone()];
            if let Shape::FourConnections = shape {
                clients.clear();
                for _ in 0..4 {
                    clients.push(Arc::new(TcpClient::connect(server.addr).await?));
                }
            }
            start = Instant::now();
            let uploads = parts.into_iter().enumerate().map(|(i, part)| {
                let client = clients[i % clients.len()].clone();
                async move { client.call(part).await }
            });
            for done in join_all(uploads).await {
                done?;
            }
            took = start.elapsed();
        }
    }
    Ok(sent * 8.0 / took.as_secs_f64() / 1e9)
}

/// Connection set-up times (medians, µs): a full handshake + first answer, and a 0-RTT
/// reconnect + first answer (none for TCP). With `delay`, across a link adding that much
/// each way.
pub struct Setup {
    pub full: f64,
    pub zero_rtt: Option<f64>,
}

/// Set-up on stack `which`, `n` times: to `target` (ours only) or to a fresh local server,
/// across a link with one-way `delay` if given.
pub async fn setup(
    which: usize,
    n: usize,
    delay: Option<Duration>,
    target: Option<&PeerAddr>,
) -> anyhow::Result<Setup> {
    match which {
        0 => {
            let (_local, server) = match target {
                Some(target) => (None, *target),
                None => {
                    let node = our_server().await?;
                    let addr = node.peer_addr();
                    (Some(node), addr)
                }
            };
            let link = through(server.addr, delay).await?;
            let to = PeerAddr {
                addr: link.as_ref().map_or(server.addr, Link::local_addr),
                ..server
            };
            our_setup(&to, n).await
        }
        1 => {
            let server = QuinnServer::start()?;
            let link = through(server.addr(), delay).await?;
            let to = link.as_ref().map_or(server.addr(), Link::local_addr);
            quinn_setup(to, n).await
        }
        _ => tcp_setup(n).await,
    }
}

async fn through(to: SocketAddr, delay: Option<Duration>) -> anyhow::Result<Option<Link>> {
    let Some(delay) = delay else {
        return Ok(None);
    };
    let mut config = LinkConfig::default();
    config.delay = delay;
    let listen = SocketAddr::new(to.ip(), 0);
    Ok(Some(Link::start(listen, to, config).await?))
}

async fn our_setup(to: &PeerAddr, n: usize) -> anyhow::Result<Setup> {
    let (mut full, mut zero) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let client = Node::builder().config(bench_config()).bind().await?;
        let start = Instant::now();
        client.add_address(*to);
        client
            .request(to.peer_id, ECHO, Bytes::from_static(b"x"))
            .await?;
        full.push(start.elapsed());
        let mut events = client.events();
        client.disconnect(&to.peer_id);
        let _ = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        let start = Instant::now();
        let options = RequestOptions::new().idempotent(true);
        client
            .request_with(to.peer_id, ECHO, Bytes::from_static(b"x"), options)
            .await?;
        zero.push(start.elapsed());
        client.shutdown().await;
    }
    Ok(Setup {
        full: median_us(full),
        zero_rtt: Some(median_us(zero)),
    })
}

async fn quinn_setup(to: SocketAddr, n: usize) -> anyhow::Result<Setup> {
    let (mut full, mut zero) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let client = QuinnClient::new()?;
        let start = Instant::now();
        let conn = client.connect(to, false).await?;
        quinn_call(&conn, Bytes::from_static(b"x")).await?;
        full.push(start.elapsed());
        conn.close(0u32.into(), b"");
        let start = Instant::now();
        let conn = client.connect(to, true).await?;
        quinn_call(&conn, Bytes::from_static(b"x")).await?;
        zero.push(start.elapsed());
        conn.close(0u32.into(), b"");
    }
    Ok(Setup {
        full: median_us(full),
        zero_rtt: Some(median_us(zero)),
    })
}

async fn tcp_setup(n: usize) -> anyhow::Result<Setup> {
    let server = TcpServer::start().await?;
    let mut full = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let client = TcpClient::connect(server.addr).await?;
        client.call(Bytes::from_static(b"x")).await?;
        full.push(start.elapsed());
    }
    Ok(Setup {
        full: median_us(full),
        zero_rtt: None,
    })
}

fn median_us(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e6
}
