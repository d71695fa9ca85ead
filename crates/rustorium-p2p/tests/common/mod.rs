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
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["rustorium".to_string()]).unwrap();
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
            let cert = params.self_signed(&key).unwrap();
            let der = PrivatePkcs8KeyDer::from(key.serialize_der());
            builder
                .with_client_auth_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(der))
                .unwrap()
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
