//! A node: one QUIC endpoint (one UDP socket) that both accepts and dials, its accept
//! loop, the task that serves each connection, and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::config::NodeConfig;
use crate::error::Error;
use crate::identity::{Keypair, PeerAddr, PeerId};
use crate::peers::{ConnectionDirection, Peers};
use crate::router::{Handler, HandlerError, Router};
use crate::rpc::{self, Remote, ServeLimits};
use crate::tls::{self, TlsConfigs};
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
    config: NodeConfig,
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

    /// All settings at once (replaces anything set before).
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// The UDP address to listen on. Default `127.0.0.1:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// The ALPN protocol name. Default `rustorium`.
    pub fn alpn(mut self, alpn: impl Into<Vec<u8>>) -> Self {
        self.config.alpn = alpn.into();
        self
    }

    /// The largest request body this node accepts. Default 16 MiB.
    pub fn max_request_size(mut self, bytes: usize) -> Self {
        self.config.max_request_size = bytes;
        self
    }

    /// The largest answer body this node accepts. Default 16 MiB.
    pub fn max_response_size(mut self, bytes: usize) -> Self {
        self.config.max_response_size = bytes;
        self
    }

    /// How long a request may take. Default 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
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
        let keypair = self.keypair.unwrap_or_else(Keypair::generate);
        #[cfg(test)]
        let tls = match self.certificate {
            Some(cert) => TlsConfigs::with_certificate(&keypair, &config.alpn, cert)?,
            None => TlsConfigs::new(&keypair, &config.alpn)?,
        };
        #[cfg(not(test))]
        let tls = TlsConfigs::new(&keypair, &config.alpn)?;
        let transport = Arc::new(config.transport());

        let quic_server = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server.clone())
            .map_err(|e| Error::Config(format!("TLS set-up failed: {e}")))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport.clone());
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            Error::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;

        let mut router = self.router;
        let with_system = self.system_routes;
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            if with_system {
                add_system_routes(&mut router, weak.clone());
            }
            Shared {
                peer_id: keypair.peer_id(),
                local_addr,
                requests: Arc::new(Semaphore::new(config.max_concurrent_requests)),
                serve_limits: ServeLimits {
                    max_request_size: config.max_request_size,
                    request_timeout: config.request_timeout,
                },
                config,
                router,
                endpoint,
                tls,
                transport,
                peers: Peers::default(),
                closing: AtomicBool::new(false),
                started: std::time::Instant::now(),
            }
        });
        tokio::spawn(accept_loop(shared.clone()));
        info!(peer_id = %shared.peer_id, %local_addr, "node listening");
        Ok(Node { shared })
    }
}

/// What the node's tasks share.
struct Shared {
    peer_id: PeerId,
    local_addr: SocketAddr,
    config: NodeConfig,
    serve_limits: ServeLimits,
    router: Router,
    endpoint: quinn::Endpoint,
    tls: TlsConfigs,
    transport: Arc<quinn::TransportConfig>,
    peers: Peers,
    /// One permit per running handler.
    requests: Arc<Semaphore>,
    closing: AtomicBool,
    started: std::time::Instant,
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
            config: NodeConfig::default(),
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
        self.shared.local_addr
    }

    /// `peer_id@local_addr`: what other nodes need to dial this one.
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr::new(self.shared.peer_id, self.shared.local_addr)
    }

    /// The settings in force.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.shared.peers.connection_count()
    }

    /// Peers with a live connection, in either direction.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.shared.peers.connected_peers()
    }

    /// Remembers `addr` for its peer and makes sure there is a live connection to it,
    /// dialing if needed. Fails if the node there has another PeerId.
    #[tracing::instrument(skip_all, fields(peer = %addr.peer_id.short(), addr = %addr.addr))]
    pub async fn connect(&self, addr: &PeerAddr) -> Result<(), Error> {
        self.shared.peers.set_addr(addr.peer_id, addr.addr);
        connection_to(&self.shared, addr.peer_id).await.map(drop)
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
        let timeout = self.shared.config.request_timeout;
        self.request_with_timeout(peer, route, body, timeout).await
    }

    /// [`request`](Node::request) with its own timeout.
    #[tracing::instrument(skip_all, fields(peer = %peer.short(), route))]
    pub async fn request_with_timeout(
        &self,
        peer: PeerId,
        route: &str,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        check_route(route)?;
        let deadline = Instant::now() + timeout;
        let conn = tokio::time::timeout_at(deadline, connection_to(&self.shared, peer))
            .await
            .map_err(|_| Error::Timeout {
                peer,
                route: route.to_string(),
                after: timeout,
            })??;
        let limit = self.shared.config.max_response_size;
        rpc::request(&conn, peer, route, body.into(), limit, deadline, timeout).await
    }

    /// Sends a one-way message to `route` on `peer`. Returns once the peer's QUIC stack
    /// has acknowledged every byte; fails if the peer refused the message before that
    /// (too large, unknown route, busy) or the connection broke. A handler failure on the
    /// peer is not reported back: use [`request`](Node::request) to learn the outcome.
    #[tracing::instrument(skip_all, fields(peer = %peer.short(), route))]
    pub async fn send(
        &self,
        peer: PeerId,
        route: &str,
        body: impl Into<Bytes>,
    ) -> Result<(), Error> {
        check_route(route)?;
        let timeout = self.shared.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let conn = tokio::time::timeout_at(deadline, connection_to(&self.shared, peer))
            .await
            .map_err(|_| Error::Timeout {
                peer,
                route: route.to_string(),
                after: timeout,
            })??;
        rpc::send(&conn, peer, route, body.into(), deadline, timeout).await
    }

    /// Stops accepting connections and requests, lets running requests finish (up to
    /// `shutdown_grace`), then closes every connection with code `CLOSE_SHUTDOWN` and
    /// waits (bounded) for the peers to be told.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        if shared.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let grace = shared.config.shutdown_grace;
        let all = shared.config.max_concurrent_requests as u32;
        let drained = tokio::time::timeout(grace, shared.requests.acquire_many(all)).await;
        if drained.is_err() {
            let running = all as usize - shared.requests.available_permits();
            warn!("shutdown: {running} requests still running after {grace:?}; closing anyway");
        }
        shared.requests.close();
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
        self.shared
            .endpoint
            .close(code::CLOSE_SHUTDOWN.into(), b"node dropped");
    }
}

fn check_route(route: &str) -> Result<(), Error> {
    wire::check_route(route).map_err(|reason| Error::InvalidRoute {
        route: route.to_string(),
        reason,
    })
}

/// The live connection to `peer`, dialing its known address if there is none.
async fn connection_to(shared: &Arc<Shared>, peer: PeerId) -> Result<quinn::Connection, Error> {
    if shared.closing.load(Ordering::Relaxed) {
        return Err(Error::Shutdown);
    }
    if let Some(conn) = shared.peers.live(&peer) {
        return Ok(conn);
    }
    // One dial at a time per peer: whoever waits behind it finds the new connection.
    let lock = shared.peers.dial_lock(peer);
    let _guard = lock.lock().await;
    if let Some(conn) = shared.peers.live(&peer) {
        return Ok(conn);
    }
    let addr = shared.peers.addr(&peer).ok_or(Error::UnknownPeer(peer))?;
    let conn = dial(shared, peer, addr).await?;
    shared.peers.insert(peer, conn.clone());
    tokio::spawn(serve_connection(
        shared.clone(),
        conn.clone(),
        Remote { peer, addr },
        ConnectionDirection::Outbound,
    ));
    Ok(conn)
}

async fn dial(shared: &Shared, peer: PeerId, addr: SocketAddr) -> Result<quinn::Connection, Error> {
    let connect_error = |reason: String| Error::Connect { peer, addr, reason };
    if peer == shared.peer_id {
        return Err(connect_error("that is this node's own PeerId".into()));
    }
    let (tls_config, verifier) = shared.tls.client_for(peer);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls_config))
        .map_err(|e| connect_error(format!("TLS set-up failed: {e}")))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    client_config.transport_config(shared.transport.clone());
    let connecting = shared
        .endpoint
        .connect_with(client_config, addr, &tls::server_name_for(peer))
        .map_err(|e| connect_error(e.to_string()))?;
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(e) => {
            if let Some(actual) = verifier.presented().filter(|actual| *actual != peer) {
                return Err(Error::PeerIdMismatch {
                    expected: peer,
                    actual,
                    addr,
                });
            }
            return Err(match rpc::connection_error(peer, addr, &e) {
                Error::ConnectionLost { reason, .. } => connect_error(reason),
                other => other,
            });
        }
    };
    check_alpn(shared, &conn, peer)?;
    debug!(peer = %peer, %addr, "connected (outbound)");
    Ok(conn)
}

/// ALPN is enforced by rustls; this makes sure no connection without it gets through.
fn check_alpn(shared: &Shared, conn: &quinn::Connection, peer: PeerId) -> Result<(), Error> {
    if tls::negotiated_alpn(conn).as_deref() == Some(shared.config.alpn.as_slice()) {
        return Ok(());
    }
    conn.close(code::CLOSE_PROTOCOL.into(), b"wrong ALPN");
    Err(Error::Protocol {
        peer,
        reason: "no matching ALPN protocol".into(),
    })
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        if shared.closing.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        if shared.peers.connection_count() >= shared.config.max_connections {
            warn!(
                remote = %incoming.remote_address(),
                "refused a connection: at max_connections ({})",
                shared.config.max_connections
            );
            incoming.refuse();
            continue;
        }
        tokio::spawn(accept_one(shared.clone(), incoming));
    }
}

async fn accept_one(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let addr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => return debug!(remote = %addr, "handshake failed: {e}"),
    };
    let Some(peer) = tls::remote_peer_id(&conn) else {
        // Unreachable with our verifier, which requires a certificate.
        conn.close(code::CLOSE_PROTOCOL.into(), b"no certificate");
        return;
    };
    if let Err(e) = check_alpn(&shared, &conn, peer) {
        return debug!(remote = %addr, "{e}");
    }
    debug!(peer = %peer, remote = %addr, "connected (inbound)");
    shared.peers.insert(peer, conn.clone());
    let remote = Remote { peer, addr };
    serve_connection(shared, conn, remote, ConnectionDirection::Inbound).await;
}

/// Accepts the peer's streams on one connection until it closes, each request in its own
/// task.
async fn serve_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    remote: Remote,
    direction: ConnectionDirection,
) {
    let span = tracing::debug_span!("connection", peer = %remote.peer.short(), remote = %remote.addr, ?direction);
    async {
        let reason = loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let shared = shared.clone();
                        let permit = shared.requests.clone().try_acquire_owned().ok();
                        tokio::spawn(async move {
                            let busy = busy_reason(&shared, permit.is_some());
                            let limits = &shared.serve_limits;
                            rpc::serve_request(&shared.router, remote, limits, busy, send, recv).await;
                            drop(permit);
                        });
                    }
                    Err(e) => break e,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            // One-way messages wait for a free slot rather than being dropped.
                            let wait = shared.serve_limits.request_timeout;
                            let permit = tokio::time::timeout(wait, shared.requests.clone().acquire_owned()).await;
                            let mut recv = recv;
                            let Ok(Ok(permit)) = permit else {
                                warn!(peer = %remote.peer, "dropped a one-way message: node busy or shutting down");
                                let _ = recv.stop(code::BUSY.into());
                                return;
                            };
                            rpc::serve_message(&shared.router, remote, &shared.serve_limits, recv).await;
                            drop(permit);
                        });
                    }
                    Err(e) => break e,
                },
            }
        };
        shared.peers.remove(remote.peer, conn.stable_id());
        debug!("connection closed: {reason}");
    }
    .instrument(span)
    .await
}

fn busy_reason(shared: &Shared, has_permit: bool) -> Option<&'static str> {
    if shared.closing.load(Ordering::Relaxed) {
        Some("the node is shutting down")
    } else if !has_permit {
        Some("the node is at its limit of concurrent requests (max_concurrent_requests); retry later")
    } else {
        None
    }
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
    // All values are hex, digits or socket addresses: nothing needs JSON escaping.
    format!(
        "{{\"peer_id\":\"{}\",\"version\":\"{}\",\"listen\":\"{}\",\"connections\":{},\"uptime_secs\":{:.3}}}",
        node.peer_id,
        env!("CARGO_PKG_VERSION"),
        node.local_addr,
        node.peers.connection_count(),
        node.started.elapsed().as_secs_f64()
    )
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
}
