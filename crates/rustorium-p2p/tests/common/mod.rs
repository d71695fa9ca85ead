//! Helpers shared by the integration tests: nodes with test routes, and a raw quinn
//! client for sending what our library never would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustorium_p2p::{Bytes, HandlerError, Node, NodeBuilder, RequestContext};
use tokio::sync::mpsc;

/// Bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// A node with `echo`, `whoami`, `fail`, `panic`, `big` (answers N bytes, N = body as
/// decimal) and `note` (one-way: forwarded to the returned channel).
pub fn test_node() -> (
    NodeBuilder,
    mpsc::UnboundedReceiver<(RequestContext, Bytes)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let builder = Node::builder()
        .route("echo", |_ctx, body| async move { Ok(body) })
        .route("whoami", |ctx: RequestContext, _body| async move {
            Ok(Bytes::from(ctx.peer().to_string()))
        })
        .route("fail", |_ctx, _body| async move {
            Err(HandlerError::new("the handler says no"))
        })
        .route("panic", |_ctx, _body| async move {
            if true {
                panic!("deliberate test panic");
            }
            Ok(Bytes::new())
        })
        .route("big", |_ctx, body: Bytes| async move {
            let n: usize = std::str::from_utf8(&body)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| HandlerError::new("body must be a number"))?;
            Ok(Bytes::from(vec![7u8; n]))
        })
        .route("note", move |ctx, body| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((ctx, body));
                Ok(Bytes::new())
            }
        });
    (builder, rx)
}

/// Two bound test nodes, the first connected to the second.
pub async fn pair() -> (Node, Node) {
    let (a, _) = test_node();
    let (b, _) = test_node();
    let a = a.bind().await.unwrap();
    let b = b.bind().await.unwrap();
    a.connect(&b.peer_addr()).await.unwrap();
    (a, b)
}

/// Accepts any server certificate (tests only: lets a raw client reach a node).
#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ]
    }
}

/// Which certificate a raw client presents.
pub enum ClientCert {
    None,
    Ed25519,
    EcdsaP256,
    /// Ed25519, but valid only in 2000.
    Expired,
    /// Ed25519, valid only from 2100.
    NotYetValid,
    /// ECDSA P-256, sent and used to sign even though the node's CertificateRequest
    /// offers only Ed25519 (a custom resolver and signer force it).
    ForcedEcdsaP256,
    /// A valid Ed25519 certificate followed by a second one: a chain of two.
    Chain,
}

/// Always offers its certificate, whatever the server asked for.
#[derive(Debug)]
struct ForcedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ForcedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Signs with ECDSA P-256 whatever schemes the server offered.
#[derive(Debug)]
struct EcdsaAnyway(Arc<dyn rustls::sign::SigningKey>);

impl rustls::sign::SigningKey for EcdsaAnyway {
    fn choose_scheme(&self, _offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        self.0
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.0.algorithm()
    }
}

/// An Ed25519 certificate valid from `not_before` to `not_after` (years), and its key.
fn ed25519_valid(
    not_before: i32,
    not_after: i32,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["rustorium".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let der = PrivatePkcs8KeyDer::from(key.serialize_der());
    (cert.der().clone(), PrivateKeyDer::Pkcs8(der))
}

/// A self-signed certificate and its key.
pub fn certificate(
    alg: &'static rcgen::SignatureAlgorithm,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let params = rcgen::CertificateParams::new(vec!["rustorium".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = PrivatePkcs8KeyDer::from(key.serialize_der());
    (cert.der().clone(), PrivateKeyDer::Pkcs8(der))
}

/// The TLS alert a raw client's connection was closed with (QUIC CRYPTO_ERROR 0x100 +
/// alert), if that is how it ended.
pub fn tls_alert_of(err: &quinn::ConnectionError) -> Option<u8> {
    match err {
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code)
            .checked_sub(0x100)
            .and_then(|a| u8::try_from(a).ok()),
        _ => None,
    }
}

/// Connects a raw client with `cert` and sends one echo request; the connection error it
/// ends with (the node refuses a bad certificate once it has read it, which in TLS 1.3
/// may be after the client thinks the handshake is done).
pub async fn refused_raw_client(to: SocketAddr, cert: ClientCert) -> quinn::ConnectionError {
    let (endpoint, config) = raw_client(cert, b"rustorium");
    let connecting = endpoint.connect_with(config, to, "rustorium").unwrap();
    let result = tokio::time::timeout(WAIT, async {
        let conn = connecting.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let _ = send.write_all(b"\x04echohi").await;
        let _ = send.finish();
        let _ = recv.read_to_end(100).await;
        Err(conn.closed().await)
    })
    .await
    .expect("a refused client did not learn so in time");
    match result {
        Err(e) => e,
        Ok(()) => unreachable!(),
    }
}

/// A raw quinn client endpoint that skips server verification.
pub fn raw_client(cert: ClientCert, alpn: &[u8]) -> (quinn::Endpoint, quinn::ClientConfig) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut tls = match cert {
        ClientCert::None => builder.with_no_client_auth(),
        ClientCert::Ed25519 => {
            let (c, k) = certificate(&rcgen::PKCS_ED25519);
            builder.with_client_auth_cert(vec![c], k).unwrap()
        }
        ClientCert::EcdsaP256 => {
            let (c, k) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
            builder.with_client_auth_cert(vec![c], k).unwrap()
        }
        ClientCert::Expired => {
            let (c, k) = ed25519_valid(2000, 2001);
            builder.with_client_auth_cert(vec![c], k).unwrap()
        }
        ClientCert::NotYetValid => {
            let (c, k) = ed25519_valid(2100, 2101);
            builder.with_client_auth_cert(vec![c], k).unwrap()
        }
        ClientCert::Chain => {
            let (c, k) = certificate(&rcgen::PKCS_ED25519);
            let (second, _) = certificate(&rcgen::PKCS_ED25519);
            builder.with_client_auth_cert(vec![c, second], k).unwrap()
        }
        ClientCert::ForcedEcdsaP256 => {
            let (c, k) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
            let provider = rustls::crypto::ring::default_provider();
            let key = provider.key_provider.load_private_key(k).unwrap();
            let certified = rustls::sign::CertifiedKey::new(vec![c], Arc::new(EcdsaAnyway(key)));
            builder.with_client_cert_resolver(Arc::new(ForcedCert(Arc::new(certified))))
        }
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(quic));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, config)
}

/// Connects a raw client with an Ed25519 certificate (accepted by nodes). Keep the
/// endpoint alive as long as the connection is used.
pub async fn raw_connection(to: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    let (endpoint, config) = raw_client(ClientCert::Ed25519, b"rustorium");
    let conn = endpoint
        .connect_with(config, to, "rustorium")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

/// Sends raw bytes as a request stream and reads the raw answer (status byte + body).
pub async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .expect("no answer in time")
        .expect("answer stream failed")
}

/// The default configuration, listening on any free loopback port.
pub fn config() -> rustorium_p2p::Config {
    let mut config = rustorium_p2p::Config::default();
    config.node.listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// A deterministic byte generator for test bodies (SplitMix64).
pub struct Bytes64(pub u64);

impl Bytes64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` pseudo-random bytes.
    pub fn body(&mut self, len: usize) -> rustorium_p2p::Bytes {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out.into()
    }
}

/// SHA-256 of `bytes`, to compare bodies by hash.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What a hostile raw server presents to a node that dials it.
pub enum ServerCert {
    /// ECDSA P-256, forced through whatever the dialer offered.
    ForcedEcdsaP256,
    /// The right Ed25519 certificate followed by a second one.
    Chain,
    /// An Ed25519 certificate valid only from 2100.
    NotYetValid,
}

/// Always presents its certificate, whatever the client asked for.
#[derive(Debug)]
struct ForcedServerCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for ForcedServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A raw quinn server (ALPN `rustorium`) presenting `cert`; returns its endpoint (keep it
/// alive) and the PeerId a dialer would pin (the Ed25519 key's, where there is one).
pub fn raw_server(cert: ServerCert) -> (quinn::Endpoint, rustorium_p2p::PeerId) {
    let provider = rustls::crypto::ring::default_provider();
    let key = rustorium_p2p::Keypair::generate();
    let signing_key = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
    let ed25519 = |not_before: i32, not_after: i32| {
        let mut params = rcgen::CertificateParams::new(vec!["rustorium".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
        params.self_signed(&signing_key).unwrap().der().clone()
    };
    let own_key = || {
        let der = PrivatePkcs8KeyDer::from(signing_key.serialize_der());
        provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(der))
            .unwrap()
    };
    let certified = match cert {
        ServerCert::ForcedEcdsaP256 => {
            let (c, k) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
            let key = provider.key_provider.load_private_key(k).unwrap();
            rustls::sign::CertifiedKey::new(vec![c], Arc::new(EcdsaAnyway(key)))
        }
        ServerCert::Chain => {
            let (second, _) = certificate(&rcgen::PKCS_ED25519);
            rustls::sign::CertifiedKey::new(vec![ed25519(2000, 4000), second], own_key())
        }
        ServerCert::NotYetValid => {
            rustls::sign::CertifiedKey::new(vec![ed25519(2100, 2101)], own_key())
        }
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ForcedServerCert(Arc::new(certified))));
    tls.alpn_protocols = vec![b"rustorium".to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let _ = incoming.await;
            });
        }
    });
    (endpoint, key.peer_id())
}

/// Awaits `future`, failing the test naming `what` if it takes longer than [`WAIT`]: for
/// awaits on a peer (a stream's credit, a write) that would otherwise hang the suite.
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not within {WAIT:?}"),
    }
}

/// Waits (bounded by [`WAIT`]) until `check` holds; fails the test naming `what`.
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of `node`'s metric lines (comments left out) that hold every one of `parts`.
pub fn metric_sum(node: &Node, parts: &[&str]) -> f64 {
    node.metrics_text()
        .lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A handler that runs until `gate` lets it through, counting how many are running.
pub fn hold(
    gate: &Arc<tokio::sync::Semaphore>,
    running: &Arc<std::sync::atomic::AtomicUsize>,
) -> impl rustorium_p2p::Handler {
    let (gate, running) = (gate.clone(), running.clone());
    move |_ctx, _body| {
        let (gate, running) = (gate.clone(), running.clone());
        async move {
            running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            Ok(rustorium_p2p::Bytes::new())
        }
    }
}
