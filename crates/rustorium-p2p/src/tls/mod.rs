//! TLS 1.3 for QUIC: our certificate, and the verifiers that replace web PKI.
//!
//! Both sides present a self-signed Ed25519 certificate (client authentication is
//! mandatory). A verifier accepts exactly one certificate of at most 16 KiB, Ed25519 only
//! (a key not of small order), inside its validity period, and checks the TLS 1.3
//! handshake signature with that certificate's key. The dialer's verifier also pins the
//! PeerId it expects.
//! The server name a dialer sends plays no part in authentication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::certificate::{self as cert, CertError};
use tickets::{DialerTickets, TicketCache};

/// The most peers whose tickets a dialer keeps.
const MAX_TICKET_PEERS: usize = 16_384;

mod tickets;
use crate::config::Config;
use crate::error::{BindError, Refusal};
use crate::identity::{Keypair, PeerId};

/// The rustls configurations a node uses. One client config serves every dial (rustls
/// resumes a session only with the verifier instance that verified it); its verifier
/// reads the PeerId to pin from the server name.
pub(crate) struct TlsConfigs {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
    verifier: Arc<PinnedServerVerifier>,
}

impl TlsConfigs {
    pub fn new(key: &Keypair, config: &Config, full: AtCapacity) -> Result<Self, BindError> {
        // rcgen fails only on a key it cannot sign with, which `Keypair` rules out.
        let cert_der = cert::make_certificate(key).map_err(|e| {
            BindError::Tls(rustls::Error::General(format!(
                "cannot make a certificate: {e}"
            )))
        })?;
        Self::with_certificate(key, config, cert_der, true, full)
    }

    /// Configs that present `cert_der`, which must belong to `key` when `check` is set
    /// (tests turn it off to play a peer presenting someone else's certificate).
    pub fn with_certificate(
        key: &Keypair,
        config: &Config,
        cert_der: Vec<u8>,
        check: bool,
        full: AtCapacity,
    ) -> Result<Self, BindError> {
        let alpn = config.node.alpn.as_bytes();
        // Session resumption state for as many peers as the node may hold connections to.
        let sessions = (config.limits.max_connections as usize).clamp(256, MAX_TICKET_PEERS);
        let tls_err = BindError::Tls;
        let cert = CertificateDer::from(cert_der);
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing = provider
            .key_provider
            .load_private_key(private)
            .map_err(tls_err)?;
        let certified = rustls::sign::CertifiedKey::new(vec![cert], signing);
        if check {
            certified.keys_match().map_err(tls_err)?;
        }
        let ours = Arc::new(rustls::sign::SingleCertAndKey::from(certified));

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(Arc::new(PeerCertVerifier {
                config: config.clone(),
                full,
                warnings: Default::default(),
            }))
            .with_cert_resolver(ours.clone());
        server.alpn_protocols = vec![alpn.to_vec()];
        // Stateful resumption: each ticket is an id into this cache and is taken out when
        // used, so the server accepts a given 0-RTT flight once.
        // Sessions are stored only for peers admitted by the allow/deny lists (the verifier
        // refuses the others before any ticket is issued), in a cache bounded in bytes.
        let ticket_bytes =
            usize::try_from(config.limits.max_ticket_cache_bytes).unwrap_or(usize::MAX);
        server.session_storage = Arc::new(TicketCache::new(ticket_bytes));
        // One ticket per handshake (rustls sends two by default). There is one connection
        // per peer, and each connection, resumed or not, brings the dialer a fresh ticket,
        // so a second one would only be held, by this cache and the dialer's, unused.
        server.send_tls13_tickets = 1;
        if config.node.zero_rtt {
            server.max_early_data_size = u32::MAX; // QUIC allows only 0 or u32::MAX
        }

        let verifier = Arc::new(PinnedServerVerifier::default());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(ours);
        client.alpn_protocols = vec![alpn.to_vec()];
        // Tickets for up to `sessions` peers, made only for peers this node dialed; the
        // cache grows as they are dialed, and keeps the most recent.
        let tickets = Arc::new(DialerTickets::new(sessions));
        client.resumption = rustls::client::Resumption::store(tickets);
        client.enable_early_data = config.node.zero_rtt;

        Ok(TlsConfigs {
            server: Arc::new(server),
            client: Arc::new(client),
            verifier,
        })
    }

    /// Why the last dial to `expected` refused the peer's certificate (another key than
    /// the PeerId dialed, or a certificate no node accepts), if it did. (Dials to one peer
    /// are serialised, so this is that dial's.) Clears the record.
    pub fn take_failure(&self, expected: PeerId) -> Option<PinFailure> {
        let mut seen = self
            .verifier
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.remove(&expected)
    }
}

/// The TLS server name a dialer sends to `peer`: its PeerId as a base32 DNS label under
/// `rustorium`. rustls keys session tickets by this name, so each peer has its own.
pub(crate) fn server_name_for(peer: PeerId) -> String {
    format!("{}.{}", peer.to_dns_label(), cert::CERT_NAME)
}

/// The PeerId a server name made by [`server_name_for`] names.
fn expected_peer(name: &ServerName<'_>) -> Option<PeerId> {
    let ServerName::DnsName(name) = name else {
        return None;
    };
    let label = name.as_ref().strip_suffix(".rustorium")?;
    PeerId::from_dns_label(label)
}

/// Checks the single certificate of a peer and returns its PeerId.
fn check_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<PeerId, rustls::Error> {
    check_single(end_entity, intermediates, now).map_err(|e| tls_cert_error(&e))
}

/// [`check_chain`], with our own error.
fn check_single(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<PeerId, CertError> {
    if !intermediates.is_empty() {
        return Err(CertError::NotSingle(1 + intermediates.len()));
    }
    cert::verify_certificate(end_entity, now.as_secs())
}

/// The rustls error (and so the TLS alert) for a certificate we refuse.
fn tls_cert_error(e: &CertError) -> rustls::Error {
    match e {
        CertError::Expired => rustls::Error::InvalidCertificate(CertificateError::Expired),
        CertError::NotYetValid => rustls::Error::InvalidCertificate(CertificateError::NotValidYet),
        CertError::Malformed(_) => rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        _ => other_cert_error(e.to_string()),
    }
}

fn other_cert_error(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        MessageError(message),
    ))))
}

#[derive(Debug)]
struct MessageError(String);

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MessageError {}

fn check_handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::General(format!(
            "handshake signed with {:?}; only Ed25519 is accepted",
            dss.scheme
        )));
    }
    let peer = cert::peer_id_of(cert).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))?;
    if peer.verify(message, dss.signature()) {
        Ok(HandshakeSignatureValid::assertion())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        ))
    }
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("TLS 1.2 is not supported".into()))
}

/// Whether the node is at its connection limit (asked by the acceptor's verifier).
pub(crate) type AtCapacity = Arc<dyn Fn() -> bool + Send + Sync>;

/// The acceptor's verifier: any peer with a valid Ed25519 certificate whom the allow and
/// deny lists admit, while the node has room for its connection. Refusing the others
/// here, during the handshake, means they get no session ticket and cost no connection.
struct PeerCertVerifier {
    config: Config,
    full: AtCapacity,
    /// Refusals: one a second at WARN (a stranger can present certificates without end).
    warnings: crate::log_limit::Rarely,
}

impl std::fmt::Debug for PeerCertVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCertVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for PeerCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let peer = check_chain(end_entity, intermediates, now)?;
        let admitted = match self.config.admits(&peer) {
            Ok(()) if (self.full)() => Err(Refusal::ConnectionLimit),
            other => other,
        };
        if let Err(why) = admitted {
            crate::log_limit::peer_warn!(self.warnings, peer = %peer, "refused a connection: {why}");
            // TLS alert 49 (access_denied): the peer learns it is not admitted, not why.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The dialer's verifier: a valid self-signed Ed25519 certificate whose key is the PeerId
/// named by the server name ([`server_name_for`]).
#[derive(Debug, Default)]
struct PinnedServerVerifier {
    /// Expected PeerId to why its certificate was refused, for dials that failed on it.
    failures: Mutex<HashMap<PeerId, PinFailure>>,
}

/// Why a dialed peer's certificate was refused.
#[derive(Debug)]
pub(crate) enum PinFailure {
    /// It holds another key than the PeerId dialed.
    Mismatch(PeerId),
    /// It is not a certificate a node accepts.
    Certificate(CertError),
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = expected_peer(server_name).ok_or_else(|| {
            other_cert_error(format!("server name {server_name:?} names no PeerId"))
        })?;
        let record = |failure: PinFailure| {
            let mut seen = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            seen.insert(expected, failure);
        };
        let actual = check_single(end_entity, intermediates, now).map_err(|e| {
            let error = tls_cert_error(&e);
            record(PinFailure::Certificate(e));
            error
        })?;
        if actual != expected {
            record(PinFailure::Mismatch(actual));
            return Err(other_cert_error(format!(
                "peer {expected} presented key {actual}, expected {expected}"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The PeerId of the remote side of an established connection (from its verified certificate).
pub(crate) fn remote_peer_id(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert::peer_id_of(certs.first()?)
}

/// The ALPN protocol negotiated on a connection.
pub(crate) fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}
