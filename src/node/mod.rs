//! A node: one QUIC endpoint (one UDP socket) that both accepts and dials, and the public
//! API over it. `accept` holds the accept loop and the task serving each connection;
//! `dial` the pooled, de-duplicated dial, 0-RTT and the known-peer reconnect loop.

mod accept;
mod dial;

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
use crate::error::Error;
use crate::identity::{Keypair, PeerAddr, PeerId};
use crate::metrics::{Metrics, NodeStats, Side, StreamKind};
use crate::peers::{ConnectionDirection, DisconnectReason, PeerEvent, Peers};
use crate::router::{Handler, HandlerError, Router};
use crate::rpc::{self, ServeLimits};
use crate::tls::TlsConfigs;
use crate::wire::{self, code};

/// Builds a [`Node`]: identity, settings and handlers, then [`bind`](NodeBuilder::bind).
///
/// ```no_run
/// # async fn run() -> Result<(), rustorium_p2p::Error> {
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
    config: Config,
    router: Router,
    system_routes: bool,
    /// Tests only: present this certificate instead of a fresh one.
    #[cfg(test)]
    certificate: Option<Vec<u8>>,
}

impl NodeBuilder {
    /// The node's identity. Default: a new random key.
    pub fn keypair(mut self, keypair: Keypair) -> Self {
        self.keypair = Some(keypair);
        self
    }

    /// All settings at once (replaces anything set before, the listen address included).
    /// A `node.key_file` is loaded if no [`keypair`](Self::keypair) is given, and
    /// `node.peers` become known peers.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The UDP address to listen on. Default for a builder: `127.0.0.1:0` (any free port;
    /// [`Config::default`] says `127.0.0.1:4433`, the `node` command's default).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.node.listen = addr;
        self
    }

    /// The ALPN protocol name. Default `rustorium`.
    pub fn alpn(mut self, alpn: impl Into<String>) -> Self {
        self.config.node.alpn = alpn.into();
        self
    }

    /// The largest request body this node accepts. Default 16 MiB.
    pub fn max_request_size(mut self, bytes: u64) -> Self {
        self.config.limits.max_request_size = bytes;
        self
    }

    /// The largest answer body this node accepts. Default 16 MiB.
    pub fn max_response_size(mut self, bytes: u64) -> Self {
        self.config.limits.max_response_size = bytes;
        self
    }

    /// How long a request may take. Default 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.limits.request_timeout = timeout;
        self
    }

    /// Registers the handler for `route` (1 to 255 bytes of UTF-8). A later registration of
    /// the same route replaces the earlier one.
    ///
    /// # Panics
    /// If `route` is empty or longer than 255 bytes: that is a programming error.
    pub fn route(mut self, route: &str, handler: impl Handler) -> Self {
        if let Err(reason) = wire::check_route(route) {
            panic!("invalid route {route:?}: {reason}");
        }
        self.router.insert(route.to_string(), Arc::new(handler));
        self
    }

    /// Also serves the built-in routes: `sys/ping` (empty answer), `sys/echo` (answers the
    /// body) and `sys/info` (JSON: peer_id, version, listen, connections, uptime_secs).
    pub fn system_routes(mut self) -> Self {
        self.system_routes = true;
        self
    }

    /// Binds the UDP socket and starts accepting connections.
    pub async fn bind(self) -> Result<Node, Error> {
        let config = self.config;
        config.validate()?;
        let keypair = match (self.keypair, &config.node.key_file) {
            (Some(key), _) => key,
            (None, Some(path)) => Keypair::load(path)?,
            (None, None) => Keypair::generate(),
        };
        #[cfg(test)]
        let tls = match self.certificate {
            Some(cert) => TlsConfigs::with_certificate(&keypair, &config, cert)?,
            None => TlsConfigs::new(&keypair, &config)?,
        };
        #[cfg(not(test))]
        let tls = TlsConfigs::new(&keypair, &config)?;
        let transport = Arc::new(config.quinn_transport());

        let quic_server = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server.clone())
            .map_err(|e| Error::Config(format!("TLS set-up failed: {e}")))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport.clone());
        let quic_client = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client.clone())
            .map_err(|e| Error::Config(format!("TLS set-up failed: {e}")))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
        client_config.transport_config(transport.clone());
        let bind_error = |source| Error::Bind {
            addr: config.node.listen,
            source,
        };
        let socket = config.bind_socket(config.node.listen).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            config.quinn_endpoint(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let local_addr = endpoint.local_addr().map_err(|source| Error::Bind {
            addr: config.node.listen,
            source,
        })?;

        let metrics_listener = match config.node.metrics_addr {
            Some(addr) => Some(
                crate::metrics::http::bind(addr)
                    .await
                    .map_err(|source| Error::MetricsBind { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

        let mut router = self.router;
        let with_system = self.system_routes;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            if with_system {
                add_system_routes(&mut router, weak.clone());
            }
            Shared {
                peer_id: keypair.peer_id(),
                local_addr: Mutex::new(local_addr),
                requests: Arc::new(Semaphore::new(
                    config.limits.max_concurrent_requests as usize,
                )),
                serve_limits: ServeLimits {
                    max_request_size: config.limits.max_request_size,
                    request_timeout: config.limits.request_timeout,
                },
                admission: accept::Admission::default(),
                config,
                router,
                endpoint,
                tls,
                client_config,
                peers: Peers::new(keypair.peer_id()),
                events: broadcast::channel(1024).0,
                metrics: Metrics::default(),
                metrics_addr,
                background: Mutex::new(Vec::new()),
                known: Mutex::new(HashMap::new()),
                closing: AtomicBool::new(false),
                shutdown,
                started: std::time::Instant::now(),
            }
        });
        tokio::spawn(accept::accept_loop(shared.clone()));
        if let Some(listener) = metrics_listener {
            let node = Arc::downgrade(&shared);
            let render = move || {
                node.upgrade()
                    .map(|n| n.metrics.encode())
                    .unwrap_or_default()
            };
            let task = tokio::spawn(crate::metrics::http::serve(listener, render));
            shared
                .background
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        info!(peer_id = %shared.peer_id, %local_addr, "node listening");
        let node = Node { shared };
        for peer in node.shared.config.node.peers.clone() {
            node.add_known_peer(peer);
        }
        Ok(node)
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
    admission: accept::Admission,
    events: broadcast::Sender<PeerEvent>,
    metrics: Metrics,
    /// Where the metrics endpoint listens, if it is on.
    metrics_addr: Option<SocketAddr>,
    /// Tasks that end with the node (the metrics endpoint).
    background: Mutex<Vec<JoinHandle<()>>>,
    /// The reconnect task of each known peer.
    known: Mutex<HashMap<PeerId, JoinHandle<()>>>,
    /// One permit per running handler.
    requests: Arc<Semaphore>,
    closing: AtomicBool,
    /// Flips to `true` when the node starts shutting down.
    shutdown: watch::Sender<bool>,
    started: std::time::Instant,
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
}

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

/// A running node. Dropping it closes every connection at once; call
/// [`shutdown`](Node::shutdown) first to let running requests finish.
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// A builder with default settings.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            keypair: None,
            config: {
                let mut config = Config::default();
                config.node.listen = SocketAddr::from(([127, 0, 0, 1], 0));
                config
            },
            router: Router::default(),
            system_routes: false,
            #[cfg(test)]
            certificate: None,
        }
    }

    /// This node's identity.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// The UDP address the node is bound to (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr()
    }

    /// `peer_id@local_addr`: what other nodes need to dial this one.
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr::new(self.shared.peer_id, self.local_addr())
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.shared.peers.connection_count()
    }

    /// Peers with an open connection, in either direction.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.shared.peers.connected_peers()
    }

    /// The address of the metrics endpoint (`http://<addr>/metrics`), if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.shared.metrics_addr
    }

    /// The node's metrics in the OpenMetrics text format, for serving from an HTTP
    /// server of your own.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// The node's counters.
    pub fn stats(&self) -> NodeStats {
        self.shared.metrics.snapshot(self.connection_count())
    }

    /// Subscribes to connection events. A subscriber that falls more than 1024 events
    /// behind misses the oldest ones (and is told so by the receiver).
    pub fn events(&self) -> broadcast::Receiver<PeerEvent> {
        self.shared.events.subscribe()
    }

    /// Remembers `addr` for its peer and makes sure there is a live connection to it,
    /// dialing if needed, with the handshake complete. Fails if the node there has another
    /// PeerId.
    #[tracing::instrument(skip_all, fields(peer = %addr.peer_id.short(), addr = %addr.addr))]
    pub async fn connect(&self, addr: &PeerAddr) -> Result<(), Error> {
        self.shared.peers.set_addr(addr.peer_id, addr.addr, false);
        let conn = dial::connection_to(&self.shared, addr.peer_id).await?;
        let deadline = Instant::now() + self.shared.config.limits.connect_timeout;
        dial::wait_confirmed(&conn, deadline, self.shared.config.limits.connect_timeout).await
    }

    /// Remembers where `addr`'s peer can be reached, without dialing: the first request
    /// to it dials.
    pub fn add_address(&self, addr: PeerAddr) {
        self.shared.peers.set_addr(addr.peer_id, addr.addr, false);
    }

    /// Closes every connection to `peer` now (code `SHUTDOWN`, reason "disconnected");
    /// requests running on them fail. Returns how many were closed. A known peer is
    /// redialed: call [`remove_known_peer`](Node::remove_known_peer) first to stop that.
    pub fn disconnect(&self, peer: &PeerId) -> usize {
        let conns = self.shared.peers.connections_to(peer);
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
        self.shared.peers.set_addr(addr.peer_id, addr.addr, false);
        let task = tokio::spawn(dial::keep_connected(self.shared.clone(), addr.peer_id));
        let mut known = self.shared.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = known.insert(addr.peer_id, task) {
            old.abort();
        }
    }

    /// Stops keeping a connection to `peer` (an open connection stays open until it
    /// closes by itself). Returns whether it was known.
    pub fn remove_known_peer(&self, peer: &PeerId) -> bool {
        let mut known = self.shared.known.lock().unwrap_or_else(|e| e.into_inner());
        known.remove(peer).map(|task| task.abort()).is_some()
    }

    /// The peers this node keeps connected.
    pub fn known_peers(&self) -> Vec<PeerId> {
        let known = self.shared.known.lock().unwrap_or_else(|e| e.into_inner());
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
    ) -> Result<Bytes, Error> {
        self.request_with(peer, route, body, RequestOptions::default())
            .await
    }

    /// [`request`](Node::request) with options: a timeout of its own, or marked
    /// idempotent so that it may go out as 0-RTT data.
    #[tracing::instrument(skip_all, fields(peer = %peer.short(), route))]
    pub async fn request_with(
        &self,
        peer: PeerId,
        route: &str,
        body: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<Bytes, Error> {
        check_route(route)?;
        let body = body.into();
        let timeout = options
            .timeout
            .unwrap_or(self.shared.config.limits.request_timeout);
        let limit = self.shared.config.limits.max_response_size;
        let (kind, idempotent) = (StreamKind::Request, options.idempotent);
        self.with_retries(kind, peer, route, timeout, idempotent, |conn, deadline| {
            let body = body.clone();
            async move { rpc::request(&conn, route, body, limit, deadline, timeout).await }
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
    ) -> Result<(), Error> {
        check_route(route)?;
        let body = body.into();
        let timeout = self.shared.config.limits.request_timeout;
        self.with_retries(
            StreamKind::OneWay,
            peer,
            route,
            timeout,
            false,
            |conn, deadline| {
                let body = body.clone();
                async move { rpc::send(&conn, route, body, deadline, timeout).await }
            },
        )
        .await
    }

    /// Runs `attempt` on a connection to `peer` that is ready for it, once more (twice at
    /// most) when a failure says the peer never processed it, all within `timeout`; and
    /// records the outcome in the metrics.
    async fn with_retries<T, F, Fut>(
        &self,
        kind: StreamKind,
        peer: PeerId,
        route: &str,
        timeout: Duration,
        idempotent: bool,
        attempt: F,
    ) -> Result<T, Error>
    where
        F: Fn(Arc<crate::peers::Connection>, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, rpc::Failure>>,
    {
        let deadline = Instant::now() + timeout;
        let metrics = &self.shared.metrics;
        let _active = metrics.stream_opened(kind, ConnectionDirection::Outbound);
        let started = std::time::Instant::now();
        let mut tries = 0;
        let result = loop {
            tries += 1;
            let ready =
                dial::ready_connection(&self.shared, peer, route, deadline, timeout, idempotent);
            let conn = match ready.await {
                Ok(conn) => conn,
                Err(e) => break Err(e),
            };
            match attempt(conn, deadline).await {
                Err(failure) if failure.retry && tries < 3 => continue,
                result => break result.map_err(|f| f.error),
            }
        };
        let status = client_status(&result);
        metrics.request_done(Side::Client, route, status, started.elapsed());
        result
    }

    /// Moves the node to a new UDP socket bound to `addr` (path migration). Every
    /// connection survives: the peers see the new address, transfers in flight go on.
    /// Returns the new local address.
    pub fn rebind(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        let bind_error = |source| Error::Bind { addr, source };
        let socket = self.shared.config.bind_socket(addr).map_err(bind_error)?;
        self.shared.endpoint.rebind(socket).map_err(bind_error)?;
        let new = self.shared.endpoint.local_addr().map_err(bind_error)?;
        *self
            .shared
            .local_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = new;
        self.shared.metrics.rebound();
        info!(%new, "rebound to a new socket");
        Ok(new)
    }

    /// Stops accepting connections and requests, lets running requests finish (up to
    /// `shutdown_grace`), then closes every connection with code `SHUTDOWN` (0) and
    /// waits (bounded) for the peers to be told.
    #[tracing::instrument(skip_all, fields(peer_id = %self.shared.peer_id.short()))]
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        if shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        shared.shutdown.send_replace(true);
        let grace = shared.config.limits.shutdown_grace;
        let all = shared.config.limits.max_concurrent_requests;
        let drained = tokio::time::timeout(grace, shared.requests.acquire_many(all)).await;
        if drained.is_err() {
            let running = all as usize - shared.requests.available_permits();
            warn!("shutdown: {running} requests still running after {grace:?}; closing anyway");
        }
        shared.requests.close();
        for task in shared
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        shared
            .endpoint
            .close(code::CLOSE_SHUTDOWN.into(), b"node shutting down");
        // Lets the close frames go out; bounded because a peer may never answer.
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
        info!(peer_id = %shared.peer_id, "node shut down");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.shutdown.send_replace(true);
        for (_, task) in self
            .shared
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            task.abort();
        }
        for task in self
            .shared
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.shared
            .endpoint
            .close(code::CLOSE_SHUTDOWN.into(), b"node dropped");
    }
}

/// The `status` label of a request this node sent.
fn client_status<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::Remote { status, .. }) => match status {
            crate::wire::Status::UnknownRoute => "unknown_route",
            crate::wire::Status::BadRequest => "bad_request",
            crate::wire::Status::HandlerError => "handler_error",
            crate::wire::Status::Busy => "busy",
            _ => "error",
        },
        Err(Error::TooLarge { .. }) => "too_large",
        Err(Error::Timeout { .. }) => "timed_out",
        Err(Error::ConnectionLost { .. }) => "connection_lost",
        Err(Error::Protocol { .. }) => "protocol_error",
        Err(_) => "connect_failed",
    }
}

fn check_route(route: &str) -> Result<(), Error> {
    wire::check_route(route).map_err(|reason| Error::InvalidRoute {
        route: route.to_string(),
        reason,
    })
}

fn add_system_routes(router: &mut Router, node: Weak<Shared>) {
    router.insert(
        "sys/ping".into(),
        Arc::new(|_ctx, _body| async { Ok(Bytes::new()) }),
    );
    router.insert(
        "sys/echo".into(),
        Arc::new(|_ctx, body: Bytes| async move { Ok(body) }),
    );
    router.insert(
        "sys/info".into(),
        Arc::new(move |_ctx, _body| {
            let node = node.upgrade();
            async move {
                let node = node.ok_or_else(|| HandlerError::new("node is shutting down"))?;
                Ok(Bytes::from(system_info(&node)))
            }
        }),
    );
}

fn system_info(node: &Shared) -> String {
    let stats = node.metrics.snapshot(node.peers.connection_count());
    serde_json::json!({
        "peer_id": node.peer_id.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "listen": node.local_addr().to_string(),
        "connections": stats.connections,
        "uptime_secs": node.started.elapsed().as_secs_f64(),
        "stats": stats,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Err(e) => Err(e),
        };
        match result {
            Err(Error::CertificateRejected { peer, reason, .. }) => {
                assert_eq!(peer, server.peer_id());
                assert!(reason.contains("expired"), "{reason}");
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
            server.shared.peers.entries(),
            0,
            "no state left for departed peers"
        );
        // An address the application gave is kept.
        let known = Keypair::generate().peer_id();
        server.add_address(PeerAddr::new(known, "127.0.0.1:9".parse().unwrap()));
        assert_eq!(server.shared.peers.entries(), 1);
    }
}
