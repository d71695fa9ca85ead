//! A node: one QUIC endpoint (one UDP socket) that both accepts and dials, and the public
//! API over it ([`Node`], built by [`NodeBuilder`]). `accept` holds the accept loop and the task serving each connection;
//! `dial` the pooled, de-duplicated dial, 0-RTT and the known-peer reconnect loop.

mod accept;
mod admission;
mod dial;
mod io;
mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{BindError, ConnectError, RequestError};
use crate::event::{Direction, DisconnectReason, PeerEvent};
use crate::handler::{Handler, Route, RouteKind, Router};
use crate::identity::{Keypair, PeerAddr, PeerId};
use crate::metrics::{Metrics, NodeStats, Outcome, Side, StreamKind, SAMPLE_INTERVAL};
use crate::peers::{PeerConnection, Peers, ShareLimits};
use crate::policy;
use crate::request;
use crate::serve::ServeLimits;
use crate::stream_budget::StreamPool;
use crate::tally::Tally;
use crate::tls::TlsConfigs;
use crate::transfer::{
    AnswerStream, MessageBody, RequestBody, StreamHandler, StreamLimits, StreamRoute,
};
#[allow(unused_imports)]
use crate::transfer::{AnswerWriter, BodyReader};
use crate::wire::{self, code, Status};

/// Builds a [`Node`]: identity, settings and handlers, then [`bind`](NodeBuilder::bind).
/// The setters may be called in any order: [`config`](Self::config) gives the base
/// settings, and the other setters override single values of it whenever they are
/// called.
///
/// ```no_run
/// # async fn run() -> Result<(), rustorium_p2p::BindError> {
/// use rustorium_p2p::{Keypair, Node};
/// let node = Node::builder()
///     .keypair(Keypair::generate())
///     .listen("127.0.0.1:4433".parse().unwrap())
///     .route("echo", |_ctx, body| async move { Ok(body) })
///     .bind()
///     .await?;
/// println!("listening as {}", node.peer_addr());
/// # Ok(()) }
/// ```
pub struct NodeBuilder {
    keypair: Option<Keypair>,
    config: Option<Config>,
    overrides: Overrides,
    routes: Vec<(String, Route)>,
    /// Streaming routes, whose limits are resolved against the config at `bind`.
    streaming: Vec<(String, Box<dyn StreamHandler>, StreamLimits)>,
    /// Tests only: present this certificate instead of a fresh one.
    #[cfg(test)]
    certificate: Option<Vec<u8>>,
}

/// Single settings given to the builder, applied over its config.
#[derive(Default)]
struct Overrides {
    listen: Option<SocketAddr>,
    alpn: Option<String>,
    max_request_size: Option<u64>,
    max_response_size: Option<u64>,
    request_timeout: Option<Duration>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routes: Vec<&str> = self.routes.iter().map(|(r, _)| r.as_str()).collect();
        f.debug_struct("NodeBuilder")
            .field("keypair", &self.keypair)
            .field("routes", &routes)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The node's identity. Default: `config.node.key_file` if set, else a new random key.
    pub fn keypair(mut self, keypair: Keypair) -> Self {
        self.keypair = Some(keypair);
        self
    }

    /// The base settings. Default: [`Config::default`] with the listen address
    /// `127.0.0.1:0` (any free port). A `node.key_file` is loaded if no
    /// [`keypair`](Self::keypair) is given, and `node.peers` become known peers.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The UDP address to listen on (overrides the config's `node.listen`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.overrides.listen = Some(addr);
        self
    }

    /// The ALPN protocol name (overrides `node.alpn`, default `rustorium`).
    pub fn alpn(mut self, alpn: impl Into<String>) -> Self {
        self.overrides.alpn = Some(alpn.into());
        self
    }

    /// The largest request body this node accepts (overrides `limits.max_request_size`,
    /// default 16 MiB).
    pub fn max_request_size(mut self, bytes: u64) -> Self {
        self.overrides.max_request_size = Some(bytes);
        self
    }

    /// The largest answer body this node accepts (overrides `limits.max_response_size`,
    /// default 16 MiB).
    pub fn max_response_size(mut self, bytes: u64) -> Self {
        self.overrides.max_response_size = Some(bytes);
        self
    }

    /// How long a request may take (overrides `limits.request_timeout`, default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.overrides.request_timeout = Some(timeout);
        self
    }

    /// Registers the handler for `route` (1 to 255 bytes of UTF-8). [`bind`](Self::bind)
    /// fails with [`BindError::DuplicateRoute`] if a route is registered twice, and with
    /// [`BindError::InvalidRoute`] for an empty or too long name.
    ///
    /// A request for the route that arrives as 0-RTT data on a reconnect waits until the
    /// handshake completes before the handler runs (an attacker can replay 0-RTT data,
    /// but cannot complete a handshake). See [`early_data_route`](Self::early_data_route).
    pub fn route(self, route: &str, handler: impl Handler) -> Self {
        self.add_route(route, handler, false)
    }

    /// Registers a route whose handler may run on 0-RTT data, before the handshake
    /// completes: for requests that are safe to repeat (reads, pings), since an attacker
    /// who recorded 0-RTT data can replay it. The handler sees
    /// [`RequestContext::is_early_data`](crate::RequestContext::is_early_data). Requesters
    /// send only requests marked idempotent as 0-RTT data; this is the server's side of
    /// that choice.
    pub fn early_data_route(self, route: &str, handler: impl Handler) -> Self {
        self.add_route(route, handler, true)
    }

    fn add_route(mut self, route: &str, handler: impl Handler, early_data: bool) -> Self {
        let handler = Arc::new(handler);
        self.routes.push((
            route.to_string(),
            Route {
                kind: RouteKind::Whole(handler),
                early_data,
                metrics: Arc::default(),
            },
        ));
        self
    }

    /// Registers a streaming handler for `route`: it reads the request body as it
    /// arrives ([`BodyReader`]) and writes its answer as it goes ([`AnswerWriter`]), so
    /// bodies of any size pass through without being held in memory. The body may be up
    /// to `limits.max_stream_body_size` and the request may run for up to
    /// `limits.max_stream_duration` (see [`streaming_route_with`](Self::streaming_route_with)
    /// for limits of its own). A streaming request whose body is still arriving holds one
    /// of the node's `max_concurrent_transfers` (and of its peer's
    /// `max_concurrent_transfers_per_peer`) while it runs, never a handler slot of
    /// buffered routes. A small body that is all there when its stream opens is served
    /// like a buffered request: with a handler slot until its answer starts, then a
    /// transfer slot, or (none free) the handler slot for at most `request_timeout` more.
    /// With no transfer slot free, a body that fits `max_request_size` is read whole (as
    /// a buffered route reads it) and served the same way; a larger one is answered BUSY.
    /// It never runs on 0-RTT data.
    ///
    /// Requesters may call it with [`Node::open_request`] or, for bodies that fit in
    /// memory, [`Node::request`]; the wire format is the same.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), rustorium_p2p::BindError> {
    /// use rustorium_p2p::{AnswerWriter, BodyReader, HandlerError, Node, RequestContext};
    ///
    /// let node = Node::builder()
    ///     .streaming_route("files/echo", |_ctx: RequestContext, mut body: BodyReader, mut answer: AnswerWriter| async move {
    ///         while let Some(chunk) = body.chunk().await? {
    ///             answer.write(chunk).await?;
    ///         }
    ///         Ok::<_, HandlerError>(())
    ///     })
    ///     .bind()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn streaming_route(self, route: &str, handler: impl StreamHandler) -> Self {
        self.streaming_route_with(route, StreamLimits::new(), handler)
    }

    /// [`streaming_route`](Self::streaming_route) with limits of its own.
    pub fn streaming_route_with(
        mut self,
        route: &str,
        limits: StreamLimits,
        handler: impl StreamHandler,
    ) -> Self {
        self.streaming
            .push((route.to_string(), Box::new(handler), limits));
        self
    }

    /// The settings the node will run with.
    fn settings(&mut self) -> Config {
        let mut config = self.config.take().unwrap_or_else(|| {
            let mut config = Config::default();
            config.node.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            config
        });
        let o = std::mem::take(&mut self.overrides);
        if let Some(listen) = o.listen {
            config.node.listen = listen;
        }
        if let Some(alpn) = o.alpn {
            config.node.alpn = alpn;
        }
        if let Some(size) = o.max_request_size {
            config.limits.max_request_size = size;
        }
        if let Some(size) = o.max_response_size {
            config.limits.max_response_size = size;
        }
        if let Some(timeout) = o.request_timeout {
            config.limits.request_timeout = timeout;
        }
        config
    }

    fn router(&mut self, limits: &crate::config::Limits) -> Result<Router, BindError> {
        let mut router = Router::default();
        let streaming = self.streaming.drain(..).map(|(route, handler, own)| {
            let streaming = StreamRoute {
                handler,
                max_body: own.max_body.unwrap_or(limits.max_stream_body_size),
                max_duration: own.max_duration.unwrap_or(limits.max_stream_duration),
            };
            let kind = RouteKind::Streaming(Arc::new(streaming));
            let route_entry = Route {
                kind,
                early_data: false,
                metrics: Arc::default(),
            };
            (route, route_entry)
        });
        let all: Vec<_> = self.routes.drain(..).chain(streaming).collect();
        for (route, handler) in all {
            if let Err(reason) = wire::check_route(&route) {
                return Err(BindError::InvalidRoute { route, reason });
            }
            if !router.insert(&route, handler) {
                return Err(BindError::DuplicateRoute(route));
            }
        }
        Ok(router)
    }

    /// Binds the UDP socket and starts accepting connections.
    pub async fn bind(mut self) -> Result<Node, BindError> {
        let config = self.settings();
        config.validate()?;
        let router = self.router(&config.limits)?;
        let admission = admission::Admission::new(&config.limits);
        let full: crate::tls::AtCapacity = {
            let admission = admission.clone();
            Arc::new(move || admission.is_full())
        };
        let keypair = match (self.keypair, &config.node.key_file) {
            (Some(key), _) => key,
            (None, Some(path)) => Keypair::load(path)?,
            (None, None) => Keypair::generate(),
        };
        #[cfg(test)]
        let tls = match self.certificate {
            Some(cert) => {
                TlsConfigs::with_certificate(&keypair, &config, cert, false, full.clone())?
            }
            None => TlsConfigs::new(&keypair, &config, full.clone())?,
        };
        #[cfg(not(test))]
        let tls = TlsConfigs::new(&keypair, &config, full.clone())?;
        let transport = Arc::new(config.quinn_transport());

        let no_initial_cipher = |e: quinn::crypto::rustls::NoInitialCipherSuite| {
            BindError::Tls(rustls::Error::General(e.to_string()))
        };
        let quic_server = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server.clone())
            .map_err(no_initial_cipher)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport.clone());
        let quic_client = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client.clone())
            .map_err(no_initial_cipher)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
        client_config.transport_config(transport.clone());
        let addr = config.node.listen;
        let bind_error = |source| BindError::Socket { addr, source };
        let (socket, buffers) = crate::socket::bind(&config.transport, addr).map_err(bind_error)?;
        let (io, io_thread) = if config.node.io_thread {
            let (handle, thread) =
                io::IoThread::start("rustorium-io".into()).map_err(bind_error)?;
            (handle, Some(thread))
        } else {
            (tokio::runtime::Handle::current(), None)
        };
        let endpoint = quinn::Endpoint::new(
            config.quinn_endpoint(),
            Some(server_config),
            socket,
            Arc::new(io::IoRuntime(io.clone())),
        )
        .map_err(bind_error)?;
        let local_addr = endpoint.local_addr().map_err(bind_error)?;

        let (shutdown, _) = watch::channel(false);
        let l = &config.limits;
        let (peer_bytes, node_bytes) = config.byte_budgets();
        let peers = Peers::new(
            keypair.peer_id(),
            ShareLimits {
                slots: l.max_concurrent_requests_per_peer,
                answers: l.max_pending_answers_per_peer,
                bytes: peer_bytes,
                transfers: l.max_concurrent_transfers_per_peer,
            },
        );
        let buffered = node_bytes;
        let serve_limits = ServeLimits {
            max_request_size: l.max_request_size,
            request_timeout: l.request_timeout,
            answer_timeout: l.answer_timeout,
            max_stalls: l.max_pending_answers_per_peer,
        };
        let shared = Arc::new(Shared {
            peer_id: keypair.peer_id(),
            local_addr: Mutex::new(local_addr),
            requests: Tally::new(config.limits.max_concurrent_requests as usize),
            serve_limits,
            answers: Tally::new(ANSWERS_TRACKED),
            bytes: Arc::new(Semaphore::new(buffered)),
            transfers: Tally::new(l.max_concurrent_transfers as usize),
            streams: StreamPool::new(l.max_extra_streams),
            io,
            admission,
            config,
            router,
            endpoint,
            tls,
            client_config,
            peers,
            events: broadcast::channel(1024).0,
            metrics: Metrics::default(),
            known: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            shutdown,
            peer_warnings: Default::default(),
        });
        shared.metrics.socket_buffers(buffers);
        shared.io.spawn(accept::accept_loop(shared.clone()));
        shared.io.spawn(sample_connections(Arc::downgrade(&shared)));
        info!(peer_id = %shared.peer_id, %local_addr, "node listening");
        let node = Node {
            inner: Arc::new(Handle {
                shared,
                io_thread: Mutex::new(io_thread),
            }),
        };
        for peer in node.shared().config.node.peers.clone() {
            node.add_known_peer(peer);
        }
        Ok(node)
    }
}

/// Reads every connection's statistics into the metrics each [`SAMPLE_INTERVAL`] (a
/// connection's task takes the last reading when it closes), until the node is gone or
/// has shut down and its last connection has closed. One task for all connections: a
/// task and a timer of its own cost each connection about 0.5 KiB and a wake-up a second.
async fn sample_connections(shared: Weak<Shared>) {
    /// Connections read between two yields to the other tasks of the I/O thread.
    const PER_TURN: usize = 256;
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first is at once
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let connections = shared.peers.connections();
        if connections.is_empty() && shared.is_closing() {
            return;
        }
        for (i, entry) in connections.iter().enumerate() {
            if i > 0 && i % PER_TURN == 0 {
                tokio::task::yield_now().await;
            }
            entry.sample(&shared.metrics, false);
        }
    }
}

/// What the node's tasks share.
struct Shared {
    peer_id: PeerId,
    local_addr: Mutex<SocketAddr>,
    config: Config,
    serve_limits: ServeLimits,
    router: Router,
    endpoint: quinn::Endpoint,
    tls: TlsConfigs,
    client_config: quinn::ClientConfig,
    peers: Peers,
    admission: Arc<admission::Admission>,
    events: broadcast::Sender<PeerEvent>,
    metrics: Metrics,
    /// The reconnect task of each known peer.
    known: Mutex<HashMap<PeerId, JoinHandle<()>>>,
    /// One place per running handler.
    requests: Arc<Tally>,
    /// One place per answer being written (so that shutdown lets them go out).
    answers: Arc<Tally>,
    /// One permit per byte of request bodies held in memory.
    bytes: Arc<Semaphore>,
    /// One place per streaming request or message being served.
    transfers: Arc<Tally>,
    /// Streams connections may grow into beyond their first ones.
    streams: Arc<StreamPool>,
    /// The runtime the node's tasks and quinn's drivers run on.
    io: tokio::runtime::Handle,
    closing: AtomicBool,
    /// Flips to `true` when the node starts shutting down.
    shutdown: watch::Sender<bool>,
    /// Warnings a peer's doing causes (refusals, dropped messages): one a second at WARN.
    peer_warnings: crate::log_limit::Rarely,
}

impl Shared {
    fn local_addr(&self) -> SocketAddr {
        *self.local_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn emit(&self, event: PeerEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Closes everything at once (the last handle was dropped).
    fn close_now(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.shutdown.send_replace(true);
        let known = std::mem::take(&mut *self.known.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, task) in known {
            task.abort();
        }
        self.endpoint
            .close(code::CLOSE_SHUTDOWN.into(), b"node dropped");
    }
}

/// Answers in flight that shutdown waits for, at most (more are not tracked).
const ANSWERS_TRACKED: usize = 1 << 20;

/// Options for one request.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RequestOptions {
    /// Overrides the node's `request_timeout`.
    pub timeout: Option<Duration>,
    /// The request is safe to repeat (it changes nothing, or changing it twice is the
    /// same as once). Only such requests go out as 0-RTT data on a reconnect, because an
    /// attacker who records 0-RTT data can replay it. Default `false`: the request waits
    /// for the handshake to complete.
    pub idempotent: bool,
}

impl RequestOptions {
    /// Default options: the node's timeout, not idempotent.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Marks the request safe to repeat, so it may travel as 0-RTT data.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }
}

/// A running node: a cheap handle, cloned freely and shared between tasks. When the last
/// clone is dropped every connection closes at once; call [`shutdown`](Node::shutdown)
/// first to let running requests finish.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Handle>,
}

/// What the handles share: dropping it closes the node. The node's own tasks hold the
/// [`Shared`] state only, so they do not keep it alive.
struct Handle {
    shared: Arc<Shared>,
    /// The node's I/O thread, if it has one (`node.io_thread`).
    io_thread: Mutex<Option<io::IoThread>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close_now();
        let thread = self
            .io_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut thread) = thread {
            // The thread lets the close frames go out (bounded: a peer may never answer),
            // then ends.
            let endpoint = self.shared.endpoint.clone();
            thread.stop_after(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            });
        }
    }
}

/// A handle to a [`Node`] that does not keep it running (for handlers that need the
/// node they run on: a [`Node`] held there would keep it alive forever).
#[derive(Clone, Debug)]
pub struct WeakNode {
    inner: Weak<Handle>,
}

impl WeakNode {
    /// The node, if it is still running.
    pub fn upgrade(&self) -> Option<Node> {
        self.inner.upgrade().map(|inner| Node { inner })
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id())
            .field("local_addr", &self.local_addr())
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl Node {
    /// A builder with default settings.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            keypair: None,
            config: None,
            overrides: Overrides::default(),
            routes: Vec::new(),
            streaming: Vec::new(),
            #[cfg(test)]
            certificate: None,
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// A handle that does not keep the node running.
    pub fn downgrade(&self) -> WeakNode {
        WeakNode {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// This node's identity.
    pub fn peer_id(&self) -> PeerId {
        self.shared().peer_id
    }

    /// The UDP address the node is bound to (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared().local_addr()
    }

    /// `peer_id@local_addr`: what other nodes need to dial this one.
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr::new(self.shared().peer_id, self.local_addr())
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.shared().config
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.shared().peers.connection_count()
    }

    /// Peers with an open connection, in either direction.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.shared().peers.connected_peers()
    }

    /// The node's metrics in the OpenMetrics text format, for serving over HTTP (the
    /// `rustorium-p2p node --metrics ADDR` command does). Empty without the `metrics`
    /// feature.
    pub fn metrics_text(&self) -> String {
        self.shared().metrics.encode()
    }

    /// The node's counters.
    pub fn stats(&self) -> NodeStats {
        let shared = self.shared();
        let mut stats = shared.metrics.snapshot(self.connection_count());
        let (_, budget) = shared.config.byte_budgets();
        let free = shared.bytes.available_permits();
        stats.buffered_request_bytes = budget.saturating_sub(free) as u64;
        stats
    }

    /// Subscribes to connection events. A subscriber that falls more than 1024 events
    /// behind misses the oldest ones (and is told so by the receiver).
    pub fn events(&self) -> broadcast::Receiver<PeerEvent> {
        self.shared().events.subscribe()
    }

    /// Remembers `addr` for its peer and makes sure there is a live connection to it,
    /// dialing if needed, with the handshake complete. Fails if the node there has another
    /// PeerId.
    #[tracing::instrument(skip_all, fields(peer = %addr.peer_id.short(), addr = %addr.addr))]
    pub async fn connect(&self, addr: &PeerAddr) -> Result<(), ConnectError> {
        let shared = self.shared();
        shared.peers.set_addr(addr.peer_id, addr.addr, false);
        let conn = dial::connection_to(shared, addr.peer_id).await?;
        let deadline = Instant::now() + shared.config.limits.connect_timeout;
        dial::wait_confirmed(&conn, deadline, shared.config.limits.connect_timeout).await
    }

    /// Remembers where `addr`'s peer can be reached, without dialing: the first request
    /// to it dials.
    pub fn add_address(&self, addr: PeerAddr) {
        self.shared().peers.set_addr(addr.peer_id, addr.addr, false);
    }

    /// Closes every connection to `peer` now (code `SHUTDOWN`, reason "disconnected");
    /// requests running on them fail. Returns how many were closed. A known peer is
    /// redialed: call [`remove_known_peer`](Node::remove_known_peer) first to stop that.
    pub fn disconnect(&self, peer: &PeerId) -> usize {
        let conns = self.shared().peers.connections_to(peer);
        for conn in &conns {
            conn.close(
                DisconnectReason::ClosedLocally,
                code::CLOSE_SHUTDOWN,
                b"disconnected",
            );
        }
        conns.len()
    }

    /// Keeps a connection to `addr`'s peer: dials it now (in the background) and redials
    /// whenever the connection drops, with exponential backoff and jitter between
    /// `reconnect_min_backoff` and `reconnect_max_backoff`. Replaces an earlier address.
    pub fn add_known_peer(&self, addr: PeerAddr) {
        let shared = self.shared();
        shared.peers.set_addr(addr.peer_id, addr.addr, false);
        let task = shared
            .io
            .spawn(dial::keep_connected(shared.clone(), addr.peer_id));
        let mut known = shared.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = known.insert(addr.peer_id, task) {
            old.abort();
        }
    }

    /// Stops keeping a connection to `peer` (an open connection stays open until it
    /// closes by itself). Returns whether it was known.
    pub fn remove_known_peer(&self, peer: &PeerId) -> bool {
        let mut known = self
            .shared()
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        known.remove(peer).map(|task| task.abort()).is_some()
    }

    /// The peers this node keeps connected.
    pub fn known_peers(&self) -> Vec<PeerId> {
        let known = self
            .shared()
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        known.keys().copied().collect()
    }

    /// Sends a request to `route` on `peer` and returns the answer body, within the
    /// configured `request_timeout`. Uses the live connection to the peer (whichever side
    /// dialed it), or dials its known address.
    pub async fn request(
        &self,
        peer: PeerId,
        route: &str,
        body: impl Into<Bytes>,
    ) -> Result<Bytes, RequestError> {
        self.request_with(peer, route, body, RequestOptions::default())
            .await
    }

    /// [`request`](Node::request) with options: a timeout of its own, or marked
    /// idempotent so that it may go out as 0-RTT data.
    pub async fn request_with(
        &self,
        peer: PeerId,
        route: &str,
        body: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<Bytes, RequestError> {
        self.request_then(peer, route, body.into(), options, Ok)
            .await
    }

    /// [`request_with`](Node::request_with), its answer turned into a `T` by `then`
    /// before the request is counted, so that an answer `then` refuses is counted as the
    /// error it returns.
    #[tracing::instrument(skip_all, fields(peer = %peer.short(), route))]
    pub(crate) async fn request_then<T>(
        &self,
        peer: PeerId,
        route: &str,
        body: Bytes,
        options: RequestOptions,
        then: impl Fn(Bytes) -> Result<T, RequestError>,
    ) -> Result<T, RequestError> {
        check_route(route)?;
        let timeout = options
            .timeout
            .unwrap_or(self.shared().config.limits.request_timeout);
        let limit = self.shared().config.limits.max_response_size;
        let (kind, idempotent) = (StreamKind::Request, options.idempotent);
        let then = &then;
        self.with_retries(kind, peer, route, timeout, idempotent, |conn, deadline| {
            let body = body.clone();
            async move {
                let answer = request::request(&conn, route, body, limit, deadline, timeout).await?;
                then(answer).map_err(request::Failure::from)
            }
        })
        .await
    }

    /// Sends a one-way message to `route` on `peer`. Returns once the peer's QUIC stack
    /// has acknowledged every byte; fails if the peer refused the message before that
    /// (too large, unknown route, busy) or the connection broke. A handler failure on the
    /// peer is not reported back: use [`request`](Node::request) to learn the outcome.
    /// One-way messages never travel as 0-RTT data.
    #[tracing::instrument(skip_all, fields(peer = %peer.short(), route))]
    pub async fn send(
        &self,
        peer: PeerId,
        route: &str,
        body: impl Into<Bytes>,
    ) -> Result<(), RequestError> {
        check_route(route)?;
        let body = body.into();
        let timeout = self.shared().config.limits.request_timeout;
        self.with_retries(
            StreamKind::OneWay,
            peer,
            route,
            timeout,
            false,
            |conn, deadline| {
                let body = body.clone();
                async move { request::send(&conn, route, body, deadline, timeout).await }
            },
        )
        .await
    }

    /// Opens a streaming request to `route` on `peer`: a [`RequestBody`] to write the
    /// body to, and an [`AnswerStream`] to read the answer from, at the same time. Each
    /// write waits at most `request_timeout` without progress, and each read at most
    /// `request_timeout` from the last progress of the body or the answer (the whole
    /// request has no time limit here: the peer's route has its `max_duration`). The
    /// request is never sent as 0-RTT data, nor sent again after a failure.
    ///
    /// ```no_run
    /// # async fn run(node: rustorium_p2p::Node, peer: rustorium_p2p::PeerId) -> Result<(), rustorium_p2p::RequestError> {
    /// let (mut body, mut answer) = node.open_request(peer, "files/echo").await?;
    /// let send = async move {
    ///     for _ in 0..1024 {
    ///         body.write(vec![7u8; 64 * 1024]).await?;
    ///     }
    ///     body.finish()
    /// };
    /// let receive = async move {
    ///     let mut total = 0;
    ///     while let Some(chunk) = answer.chunk().await? {
    ///         total += chunk.len();
    ///     }
    ///     Ok(total)
    /// };
    /// let ((), total) = tokio::try_join!(send, receive)?;
    /// assert_eq!(total, 64 << 20);
    /// # Ok(()) }
    /// ```
    pub async fn open_request(
        &self,
        peer: PeerId,
        route: &str,
    ) -> Result<(RequestBody, AnswerStream), RequestError> {
        self.open_request_with(peer, route, RequestOptions::default())
            .await
    }

    /// [`open_request`](Node::open_request) with options: the timeout is how long each
    /// write or read may wait for the peer (`idempotent` has no effect: a streaming
    /// request never goes as 0-RTT data).
    #[tracing::instrument(skip_all, fields(peer = %peer.short(), route))]
    pub async fn open_request_with(
        &self,
        peer: PeerId,
        route: &str,
        options: RequestOptions,
    ) -> Result<(RequestBody, AnswerStream), RequestError> {
        let idle = options
            .timeout
            .unwrap_or(self.shared().config.limits.request_timeout);
        let (conn, record, deadline) = self
            .stream_to(peer, route, StreamKind::Request, idle)
            .await?;
        let limit = self.shared().config.limits.max_response_size;
        crate::transfer::open_request(&conn, route, idle, limit, deadline, record).await
    }

    /// Opens a streaming one-way message to `route` on `peer`: write its body, then
    /// [`finish`](MessageBody::finish) it, which waits until the peer's QUIC stack has
    /// acknowledged every byte. Each write waits at most `request_timeout` for the peer.
    pub async fn open_message(
        &self,
        peer: PeerId,
        route: &str,
    ) -> Result<MessageBody, RequestError> {
        let idle = self.shared().config.limits.request_timeout;
        let (conn, record, deadline) = self
            .stream_to(peer, route, StreamKind::OneWay, idle)
            .await?;
        crate::transfer::open_message(&conn, route, idle, deadline, record).await
    }

    /// A connection to `peer` ready for a streaming request or message (never 0-RTT),
    /// within `idle`; the stream's place in the metrics; and the deadline for opening it.
    async fn stream_to(
        &self,
        peer: PeerId,
        route: &str,
        kind: StreamKind,
        idle: Duration,
    ) -> Result<(Arc<PeerConnection>, Record, Instant), RequestError> {
        check_route(route)?;
        let shared = self.shared();
        let mut record = Record::new(shared, kind, route);
        let deadline = Instant::now() + idle;
        match dial::ready_connection(shared, peer, route, deadline, idle, false).await {
            Ok(conn) => Ok((conn, record, deadline)),
            Err(e) => {
                record.failed(&e);
                Err(e)
            }
        }
    }

    /// Runs `attempt` on a connection to `peer` that is ready for it, again when a
    /// failure says the peer never processed it ([`policy::may_resend`]), all within
    /// `timeout`; and records the outcome in the metrics.
    async fn with_retries<T, F, Fut>(
        &self,
        kind: StreamKind,
        peer: PeerId,
        route: &str,
        timeout: Duration,
        idempotent: bool,
        attempt: F,
    ) -> Result<T, RequestError>
    where
        F: Fn(Arc<PeerConnection>, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, request::Failure>>,
    {
        let shared = self.shared();
        let deadline = Instant::now() + timeout;
        let metrics = &shared.metrics;
        let _active = metrics.stream_opened(kind, Direction::Outbound);
        let started = std::time::Instant::now();
        let one_way = matches!(kind, StreamKind::OneWay);
        let mut tries = 0;
        let result = loop {
            tries += 1;
            let ready = dial::ready_connection(shared, peer, route, deadline, timeout, idempotent);
            let conn = match ready.await {
                Ok(conn) => conn,
                Err(e) => break Err(e),
            };
            match attempt(conn, deadline).await {
                Err(request::Failure {
                    interrupted: Some(why),
                    ..
                }) if policy::may_resend(one_way, why, tries) => continue,
                result => break result.map_err(|f| f.error),
            }
        };
        metrics.request_done(Side::Client, route, outcome(&result), started.elapsed());
        result
    }

    /// Moves the node to a new UDP socket bound to `addr` (path migration). Every
    /// connection survives: the peers see the new address, transfers in flight go on.
    /// Returns the new local address.
    pub fn rebind(&self, addr: SocketAddr) -> Result<SocketAddr, BindError> {
        let shared = self.shared();
        let bind_error = |source| BindError::Socket { addr, source };
        let (socket, buffers) =
            crate::socket::bind(&shared.config.transport, addr).map_err(bind_error)?;
        shared.endpoint.rebind(socket).map_err(bind_error)?;
        let new = shared.endpoint.local_addr().map_err(bind_error)?;
        *shared.local_addr.lock().unwrap_or_else(|e| e.into_inner()) = new;
        shared.metrics.rebound();
        shared.metrics.socket_buffers(buffers);
        info!(%new, "rebound to a new socket");
        Ok(new)
    }

    /// Stops accepting connections and requests, lets running requests finish (up to
    /// `shutdown_grace`), then closes every connection with code `SHUTDOWN` (0) and
    /// waits (bounded) for the peers to be told.
    #[tracing::instrument(skip_all, fields(peer_id = %self.peer_id().short()))]
    pub async fn shutdown(&self) {
        let shared = self.shared();
        if shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        shared.shutdown.send_replace(true);
        let grace = shared.config.limits.shutdown_grace;
        // No handler or transfer starts from now on (a request gets BUSY, a message waiting
        // for a slot is dropped); those running finish, and their answers go out. Answers
        // are waited for last: a handler's or transfer's answer is counted before its slot
        // goes back. (Refusals sent while closing are not counted: a peer that keeps
        // asking does not hold shutdown up.)
        shared.requests.close();
        shared.transfers.close();
        let drained = tokio::time::timeout(grace, async {
            shared.requests.until_idle().await;
            shared.transfers.until_idle().await;
            shared.answers.until_idle().await;
        })
        .await;
        if drained.is_err() {
            let running = shared.requests.in_use() + shared.transfers.in_use();
            let answers = shared.answers.in_use();
            warn!("shutdown: {running} requests still running and {answers} answers not yet delivered after {grace:?}; closing anyway");
        }
        // Closed from the node's own runtime, after what its drivers have queued: the last
        // answers are on their way before the close frames.
        let endpoint = shared.endpoint.clone();
        let closed = shared.io.spawn(async move {
            tokio::task::yield_now().await;
            endpoint.close(code::CLOSE_SHUTDOWN.into(), b"node shutting down");
        });
        let _ = closed.await;
        // Lets the close frames go out; bounded because a peer may never answer.
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
        info!(peer_id = %shared.peer_id, "node shut down");
    }
}

/// A streaming request or message this node sent, in the metrics: an active stream
/// until dropped, and its outcome recorded once (`cancelled` if dropped before).
pub(crate) struct Record {
    shared: Arc<Shared>,
    route: String,
    started: std::time::Instant,
    done: bool,
}

impl Record {
    fn new(shared: &Arc<Shared>, kind: StreamKind, route: &str) -> Self {
        shared
            .metrics
            .stream_opened_owned(kind, Direction::Outbound);
        Record {
            shared: shared.clone(),
            route: route.to_string(),
            started: std::time::Instant::now(),
            done: false,
        }
    }

    fn record(&mut self, outcome: Outcome) {
        if !std::mem::replace(&mut self.done, true) {
            let took = self.started.elapsed();
            let metrics = &self.shared.metrics;
            metrics.request_done(Side::Client, &self.route, outcome, took);
        }
    }

    /// It ended well.
    pub fn ok(&mut self) {
        self.record(Outcome::Ok);
    }

    /// It failed with `e`.
    pub fn failed(&mut self, e: &RequestError) {
        self.record(error_outcome(e));
    }

    /// It ended with `result`.
    pub fn done<T>(&mut self, result: &Result<T, RequestError>) {
        self.record(outcome(result));
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.record(Outcome::Cancelled);
        self.shared.metrics.stream_closed();
    }
}

/// The `status` label of a request this node sent.
fn outcome<T>(result: &Result<T, RequestError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => error_outcome(e),
    }
}

/// The `status` label of a request this node sent that failed with `e`.
fn error_outcome(e: &RequestError) -> Outcome {
    match e {
        RequestError::Remote { status, .. } => match status {
            Status::UnknownRoute => Outcome::UnknownRoute,
            Status::BadRequest => Outcome::BadRequest,
            Status::HandlerError => Outcome::HandlerError,
            Status::Busy => Outcome::Busy,
            _ => Outcome::ProtocolError,
        },
        RequestError::TooLarge { .. } => Outcome::TooLarge,
        RequestError::Timeout { .. }
        | RequestError::PeerTimedOut { .. }
        | RequestError::TransferTimedOut { .. } => Outcome::TimedOut,
        RequestError::ConnectionLost { .. } | RequestError::ZeroRttRejected { .. } => {
            Outcome::ConnectionLost
        }
        RequestError::BodyStopped { .. } => Outcome::StreamError,
        #[cfg(feature = "typed")]
        RequestError::Decode { .. } => Outcome::ProtocolError,
        RequestError::Protocol { .. } => Outcome::ProtocolError,
        _ => Outcome::ConnectFailed,
    }
}

fn check_route(route: &str) -> Result<(), RequestError> {
    wire::check_route(route).map_err(|reason| RequestError::InvalidRoute {
        route: route.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configured congestion controller is the one quinn's connections run, on both
    /// the dialing and the accepting side (a transfer would complete with any of them).
    #[tokio::test]
    async fn the_configured_congestion_controller_reaches_quinn() {
        use crate::config::CongestionController;
        use std::any::Any;
        fn kind(conn: &quinn::Connection) -> &'static str {
            let any: Box<dyn Any> = conn.congestion_state().into_any();
            if any.is::<quinn::congestion::Bbr>() {
                "bbr"
            } else if any.is::<quinn::congestion::NewReno>() {
                "new_reno"
            } else if any.is::<quinn::congestion::Cubic>() {
                "cubic"
            } else {
                "other"
            }
        }
        for (controller, name) in [
            (CongestionController::Bbr, "bbr"),
            (CongestionController::NewReno, "new_reno"),
            (CongestionController::Cubic, "cubic"),
        ] {
            let mut config = Config::default();
            config.node.listen = "127.0.0.1:0".parse().unwrap();
            config.transport.congestion_controller = controller;
            let b = Node::builder()
                .config(config.clone())
                .route("echo", |_ctx, body| async move { Ok(body) })
                .bind()
                .await
                .unwrap();
            let a = Node::builder().config(config).bind().await.unwrap();
            a.connect(&b.peer_addr()).await.unwrap();
            a.request(b.peer_id(), "echo", "x").await.unwrap();
            let dialer = a.shared().peers.live(&b.peer_id()).unwrap();
            let acceptor = b.shared().peers.live(&a.peer_id()).unwrap();
            assert_eq!(kind(&dialer.conn), name, "dialing side");
            assert_eq!(kind(&acceptor.conn), name, "accepting side");
        }
    }

    /// A certificate for `key` that expired in 2001.
    fn expired_certificate(key: &Keypair) -> Vec<u8> {
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.pkcs8_der());
        let signing =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["rustorium".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        params.self_signed(&signing).unwrap().der().to_vec()
    }

    #[tokio::test]
    async fn a_dialer_whose_certificate_is_refused_is_told_so() {
        let server = Node::builder()
            .route("echo", |_ctx, body| async move { Ok(body) })
            .bind()
            .await
            .unwrap();
        let key = Keypair::generate();
        let mut builder = Node::builder();
        builder.certificate = Some(expired_certificate(&key));
        let client = builder.keypair(key).bind().await.unwrap();

        // The handshake may look finished to the dialer before the acceptor has checked
        // its certificate, so the refusal may surface at connect() or at the first request.
        let result = match client.connect(&server.peer_addr()).await {
            Ok(()) => client
                .request(server.peer_id(), "echo", "x")
                .await
                .map(drop),
            Err(e) => Err(e.into()),
        };
        match result {
            Err(RequestError::Connect(ConnectError::CertificateRejected {
                peer, alert, ..
            })) => {
                assert_eq!(peer, server.peer_id());
                assert_eq!(
                    alert.description,
                    rustls::AlertDescription::CertificateExpired
                );
            }
            other => panic!("expected CertificateRejected, got {other:?}"),
        }
        assert_eq!(server.connection_count(), 0);

        // The acceptor goes on serving a peer with a good certificate.
        let good = Node::builder().bind().await.unwrap();
        good.connect(&server.peer_addr()).await.unwrap();
        assert_eq!(
            good.request(server.peer_id(), "echo", "y").await.unwrap(),
            "y"
        );
    }

    /// A node that presents another key's certificate (it lacks that key's private
    /// half) fails the TLS CertificateVerify check, whichever side it is on: the
    /// certificate's own self-signature is not what authenticates a peer.
    #[tokio::test]
    async fn a_certificate_for_a_key_the_peer_does_not_hold_is_refused() {
        let server = Node::builder()
            .route("echo", |_ctx, body| async move { Ok(body) })
            .bind()
            .await
            .unwrap();
        let victim = Keypair::generate();
        let mut builder = Node::builder();
        builder.certificate = Some(crate::certificate::make_certificate(&victim).unwrap());
        let impostor = builder.keypair(Keypair::generate()).bind().await.unwrap();
        let result = match impostor.connect(&server.peer_addr()).await {
            Ok(()) => impostor
                .request(server.peer_id(), "echo", "x")
                .await
                .map(drop),
            Err(e) => Err(e.into()),
        };
        assert!(result.is_err(), "an impostor was served");
        assert_eq!(server.connection_count(), 0);

        // As a server: a dialer pinning the victim's PeerId reaches the impostor.
        let mut builder = Node::builder();
        builder.certificate = Some(crate::certificate::make_certificate(&victim).unwrap());
        let fake_server = builder.keypair(Keypair::generate()).bind().await.unwrap();
        let dialer = Node::builder().bind().await.unwrap();
        let target = PeerAddr::new(victim.peer_id(), fake_server.local_addr());
        let err = dialer.connect(&target).await.unwrap_err();
        assert!(
            matches!(
                err,
                ConnectError::Handshake { .. } | ConnectError::CertificateRejected { .. }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn builder_setters_do_not_depend_on_their_order() {
        let mut config = Config::default();
        config.limits.request_timeout = Duration::from_secs(3);
        let a = Node::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .max_request_size(1000)
            .config(config.clone())
            .bind()
            .await
            .unwrap();
        let b = Node::builder()
            .config(config)
            .max_request_size(1000)
            .listen("127.0.0.1:0".parse().unwrap())
            .bind()
            .await
            .unwrap();
        for node in [&a, &b] {
            assert_eq!(node.config().limits.max_request_size, 1000);
            assert_eq!(node.config().limits.request_timeout, Duration::from_secs(3));
            assert_eq!(node.local_addr().ip().to_string(), "127.0.0.1");
            assert_ne!(node.local_addr().port(), 4433);
        }
    }

    #[tokio::test]
    async fn a_route_registered_twice_or_misnamed_is_an_error() {
        let err = Node::builder()
            .route("echo", |_ctx, body| async move { Ok(body) })
            .route("echo", |_ctx, _body| async move { Ok(Bytes::new()) })
            .bind()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BindError::DuplicateRoute(r) if r == "echo"),
            "{err:?}"
        );
        let err = Node::builder()
            .route("", |_ctx, body| async move { Ok(body) })
            .bind()
            .await
            .unwrap_err();
        assert!(matches!(err, BindError::InvalidRoute { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_node_is_a_cheap_handle_that_closes_with_its_last_clone() {
        let server = Node::builder()
            .route("echo", |_ctx, body| async move { Ok(body) })
            .bind()
            .await
            .unwrap();
        let client = Node::builder().bind().await.unwrap();
        let copy = client.clone();
        let weak = client.downgrade();
        copy.connect(&server.peer_addr()).await.unwrap();
        drop(client);
        // The clone still works.
        assert_eq!(
            copy.request(server.peer_id(), "echo", "x").await.unwrap(),
            "x"
        );
        assert!(format!("{copy:?}").contains(&copy.peer_id().to_string()));
        assert!(weak.upgrade().is_some());
        drop(copy);
        assert!(weak.upgrade().is_none(), "the last clone closes the node");
    }

    #[tokio::test]
    async fn peers_that_only_dialed_us_are_forgotten_when_they_leave() {
        let server = Node::builder()
            .route("echo", |_ctx, body| async move { Ok(body) })
            .bind()
            .await
            .unwrap();
        let mut events = server.events();
        for _ in 0..20 {
            let client = Node::builder().bind().await.unwrap();
            client.connect(&server.peer_addr()).await.unwrap();
            client.request(server.peer_id(), "echo", "x").await.unwrap();
            client.shutdown().await;
        }
        let mut gone = 0;
        while gone < 20 {
            let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
            if let Ok(Ok(PeerEvent::Disconnected { .. })) = event {
                gone += 1;
            } else if event.is_err() {
                panic!("only {gone} of 20 disconnects seen");
            }
        }
        assert_eq!(server.connection_count(), 0);
        assert_eq!(
            server.shared().peers.entries(),
            0,
            "no state left for departed peers"
        );
        // Asking for peers with no known address leaves nothing behind either.
        for _ in 0..100 {
            let stranger = Keypair::generate().peer_id();
            let err = server.request(stranger, "echo", "x").await.unwrap_err();
            assert!(matches!(
                err,
                RequestError::Connect(ConnectError::UnknownPeer(_))
            ));
        }
        assert_eq!(
            server.shared().peers.entries(),
            0,
            "no state for unknown peers"
        );
        // An address the application gave is kept.
        let known = Keypair::generate().peer_id();
        server.add_address(PeerAddr::new(known, "127.0.0.1:9".parse().unwrap()));
        assert_eq!(server.shared().peers.entries(), 1);
    }
}
