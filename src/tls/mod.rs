//! TLS 1.3 for QUIC: our certificate, and the verifiers that replace web PKI.
//!
//! Both sides present a self-signed Ed25519 certificate (client authentication is
//! mandatory). A verifier accepts exactly one certificate, Ed25519 only, correctly
//! self-signed and inside its validity period, and checks the TLS 1.3 handshake signature
//! with that certificate's key. The dialer's verifier also pins the PeerId it expects.
//! The server name a dialer sends plays no part in authentication.

pub mod cert;

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::Error;
use crate::identity::{Keypair, PeerId};
use cert::CertError;

/// The rustls configurations a node uses: one server config, and a client config that is
/// cloned with a pinned verifier for each dial.
pub(crate) struct TlsConfigs {
    pub server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
}

impl TlsConfigs {
    pub fn new(key: &Keypair, alpn: &[u8]) -> Result<Self, Error> {
        let cert_der = cert::make_certificate(key).map_err(|e| Error::Key {
            reason: format!("cannot make a certificate: {e}"),
        })?;
        Self::with_certificate(key, alpn, cert_der)
    }

    /// Configs that present `cert_der` (which must belong to `key`).
    pub fn with_certificate(key: &Keypair, alpn: &[u8], cert_der: Vec<u8>) -> Result<Self, Error> {
        let tls_err = |e: rustls::Error| Error::Config(format!("TLS set-up failed: {e}"));
        let cert = CertificateDer::from(cert_der);
        let private = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(Arc::new(PeerCertVerifier))
            .with_single_cert(vec![cert.clone()], private())
            .map_err(tls_err)?;
        server.alpn_protocols = vec![alpn.to_vec()];

        let placeholder = Arc::new(PinnedServerVerifier::new(key.peer_id()));
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(placeholder)
            .with_client_auth_cert(vec![cert], private())
            .map_err(tls_err)?;
        client.alpn_protocols = vec![alpn.to_vec()];

        Ok(TlsConfigs {
            server: Arc::new(server),
            client,
        })
    }

    /// A client config for one dial that accepts only `expected`'s key. The returned
    /// verifier remembers which key the remote presented, for the error message.
    pub fn client_for(
        &self,
        expected: PeerId,
    ) -> (rustls::ClientConfig, Arc<PinnedServerVerifier>) {
        let verifier = Arc::new(PinnedServerVerifier::new(expected));
        let mut config = self.client.clone();
        config
            .dangerous()
            .set_certificate_verifier(verifier.clone());
        (config, verifier)
    }
}

/// The TLS server name a dialer sends to `peer`: its PeerId as a base32 DNS label under
/// `rustorium`. rustls keys session tickets by this name, so each peer has its own.
pub(crate) fn server_name_for(peer: PeerId) -> String {
    format!("{}.{}", peer.to_dns_label(), cert::CERT_NAME)
}

/// Checks the single certificate of a peer and returns its PeerId.
fn check_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(other_cert_error(format!(
            "expected exactly one self-signed certificate, got {}",
            1 + intermediates.len()
        )));
    }
    cert::verify_certificate(end_entity, now.as_secs()).map_err(|e| match e {
        CertError::Expired => rustls::Error::InvalidCertificate(CertificateError::Expired),
        CertError::NotYetValid => rustls::Error::InvalidCertificate(CertificateError::NotValidYet),
        CertError::BadSignature => {
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        }
        CertError::Malformed(_) => rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        CertError::NotEd25519 => other_cert_error(e.to_string()),
    })
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

/// The acceptor's verifier: any peer with a valid self-signed Ed25519 certificate.
#[derive(Debug)]
struct PeerCertVerifier;

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
        check_chain(end_entity, intermediates, now).map(|_| ClientCertVerified::assertion())
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

/// The dialer's verifier: a valid self-signed Ed25519 certificate whose key is `expected`.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    expected: PeerId,
    presented: Mutex<Option<PeerId>>,
}

impl PinnedServerVerifier {
    fn new(expected: PeerId) -> Self {
        PinnedServerVerifier {
            expected,
            presented: Mutex::new(None),
        }
    }

    /// The key the remote presented, if it presented a valid certificate.
    pub fn presented(&self) -> Option<PeerId> {
        *self.presented.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = check_chain(end_entity, intermediates, now)?;
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(actual);
        if actual != self.expected {
            return Err(other_cert_error(format!(
                "peer {} presented key {actual}, expected {}",
                self.expected, self.expected
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
