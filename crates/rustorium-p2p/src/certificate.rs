//! Node certificates: making the one a node presents, and checking a peer's
//! ([`verify_certificate`], what the TLS verifiers of every node run on the certificate a
//! peer presents).
//!
//! A peer's certificate is parsed by `x509-cert` (RustCrypto's strict DER X.509 decoder);
//! nothing here reads ASN.1 by hand. What authentication takes from it is the Ed25519
//! public key, which is the PeerId; the TLS 1.3 CertificateVerify signature, checked with
//! that key (see [`super`]), proves the peer holds the private key. The certificate's own
//! self-signature is not checked: it would prove the same thing again (see
//! docs/PROTOCOL.md, "Certificates").

use std::fmt;

use x509_cert::der::Decode;
#[cfg(test)]
use x509_cert::der::Encode;
use x509_cert::spki::ObjectIdentifier;
use x509_cert::Certificate;

use crate::identity::{Keypair, PeerId};

/// The subject alternative name in every node certificate.
pub const CERT_NAME: &str = "rustorium";

/// The largest certificate a peer may present. Ours is about 300 bytes; this leaves room
/// for certificates made by other tools with a few extensions.
pub const MAX_CERT_SIZE: usize = 16 * 1024;

/// The Ed25519 algorithm identifier (RFC 8410).
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// Makes the self-signed certificate a node presents, DER encoded.
pub(crate) fn make_certificate(key: &Keypair) -> Result<Vec<u8>, rcgen::Error> {
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.pkcs8_der());
    let signing = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CERT_NAME);
    let cert = params.self_signed(&signing)?;
    Ok(cert.der().to_vec())
}

/// Why a peer's certificate is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertError {
    /// Larger than [`MAX_CERT_SIZE`].
    TooLarge(usize),
    /// Not a DER X.509 certificate (the decoder's reason).
    Malformed(String),
    /// The key (or the signature algorithm) is not Ed25519.
    NotEd25519,
    /// The key is one of the Ed25519 points of small order, for which signatures prove
    /// nothing.
    WeakKey,
    /// `now` is before the validity period.
    NotYetValid,
    /// `now` is after the validity period.
    Expired,
    /// A chain of this many certificates, where a peer presents exactly one, self-signed.
    NotSingle(usize),
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertError::TooLarge(size) => write!(
                f,
                "certificate of {size} bytes is over the limit of {MAX_CERT_SIZE}"
            ),
            CertError::Malformed(why) => write!(f, "malformed certificate: {why}"),
            CertError::NotEd25519 => f.write_str("certificate key is not Ed25519"),
            CertError::WeakKey => f.write_str("certificate key is a small-order Ed25519 point"),
            CertError::NotYetValid => f.write_str("certificate is not valid yet"),
            CertError::Expired => f.write_str("certificate has expired"),
            CertError::NotSingle(count) => write!(
                f,
                "expected exactly one self-signed certificate, got a chain of {count}"
            ),
        }
    }
}

impl std::error::Error for CertError {}

/// Checks a peer certificate and returns the PeerId it names: at most [`MAX_CERT_SIZE`]
/// bytes of DER X.509, signed with Ed25519 and holding an Ed25519 key that is not of small
/// order, valid at `now_secs` (Unix time).
pub fn verify_certificate(der: &[u8], now_secs: u64) -> Result<PeerId, CertError> {
    let cert = parse(der)?;
    let validity = cert.tbs_certificate().validity();
    if now_secs < validity.not_before.to_unix_duration().as_secs() {
        return Err(CertError::NotYetValid);
    }
    if now_secs > validity.not_after.to_unix_duration().as_secs() {
        return Err(CertError::Expired);
    }
    peer_id(&cert)
}

/// Reads the PeerId out of a certificate without checking its validity period (for
/// certificates that the TLS verifier has already accepted).
pub(crate) fn peer_id_of(der: &[u8]) -> Option<PeerId> {
    peer_id(&parse(der).ok()?).ok()
}

fn parse(der: &[u8]) -> Result<Certificate, CertError> {
    if der.len() > MAX_CERT_SIZE {
        return Err(CertError::TooLarge(der.len()));
    }
    let cert = Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    let outer = cert.signature_algorithm();
    let inner = cert.tbs_certificate().signature();
    if outer.oid != ED25519 || outer.parameters.is_some() || inner != outer {
        return Err(CertError::NotEd25519);
    }
    Ok(cert)
}

fn peer_id(cert: &Certificate) -> Result<PeerId, CertError> {
    let spki = cert.tbs_certificate().subject_public_key_info();
    // RFC 8410: the algorithm identifier has no parameters.
    if spki.algorithm.oid != ED25519 || spki.algorithm.parameters.is_some() {
        return Err(CertError::NotEd25519);
    }
    let key: [u8; 32] = spki
        .subject_public_key
        .as_bytes()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(CertError::NotEd25519)?;
    if has_small_order(&key) {
        return Err(CertError::WeakKey);
    }
    Ok(PeerId::from_bytes(key))
}

/// The encodings of the Ed25519 points of small order (and their non-canonical
/// spellings), compared without the sign bit: libsodium's blocklist
/// (`ge25519_has_small_order`). A constant table, so no curve arithmetic library is
/// needed for it.
const SMALL_ORDER: [[u8; 32]; 7] = [
    // 0 (order 4)
    [0; 32],
    // 1 (order 1)
    [
        0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0,
    ],
    // order 8
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    // order 8
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    // p - 1 (order 2)
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p (= 0, order 4)
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p + 1 (= 1, order 1)
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Whether an encoded Ed25519 public key is a point of small order.
pub(crate) fn has_small_order(key: &[u8; 32]) -> bool {
    SMALL_ORDER
        .iter()
        .any(|bad| key[..31] == bad[..31] && key[31] & 0x7f == bad[31])
}

/// Re-encodes a decoded certificate (tests: checks the decoder read all of it).
#[cfg(test)]
fn reencode(der: &[u8]) -> Vec<u8> {
    Certificate::from_der(der).unwrap().to_der().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000; // 2027-01-15

    fn certificate_with(
        key: &rcgen::KeyPair,
        build: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).unwrap();
        build(&mut params);
        params.self_signed(key).unwrap().der().to_vec()
    }

    fn signing_key(key: &Keypair) -> rcgen::KeyPair {
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.pkcs8_der());
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).unwrap()
    }

    #[test]
    fn our_certificate_verifies_and_names_our_key() {
        let key = Keypair::generate();
        let der = make_certificate(&key).unwrap();
        assert_eq!(verify_certificate(&der, NOW), Ok(key.peer_id()));
        assert_eq!(peer_id_of(&der), Some(key.peer_id()));
        assert_eq!(reencode(&der), der);
    }

    #[test]
    fn damaged_certificates_are_rejected_without_panicking() {
        let key = Keypair::generate();
        let der = make_certificate(&key).unwrap();
        // Every truncation is refused.
        for cut in 0..der.len() {
            assert!(
                verify_certificate(&der[..cut], NOW).is_err(),
                "cut at {cut}"
            );
        }
        // A flipped bit anywhere either is refused or leaves the PeerId a different one
        // or unchanged (a flip inside the signature or a name): never a panic. Identity
        // rests on the TLS handshake signature, not on these bytes.
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0x01;
            let _ = verify_certificate(&bad, NOW);
        }
        // Trailing bytes after the certificate are refused.
        let mut long = der.clone();
        long.push(0);
        assert!(matches!(
            verify_certificate(&long, NOW),
            Err(CertError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_certificates_are_refused_before_parsing() {
        let big = vec![0x30; MAX_CERT_SIZE + 1];
        assert_eq!(
            verify_certificate(&big, NOW),
            Err(CertError::TooLarge(MAX_CERT_SIZE + 1))
        );
    }

    #[test]
    fn validity_period_is_enforced() {
        let key = Keypair::generate();
        let der = certificate_with(&signing_key(&key), |params| {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        assert_eq!(verify_certificate(&der, NOW), Err(CertError::Expired));
        assert_eq!(
            verify_certificate(&der, 900_000_000), // 1998
            Err(CertError::NotYetValid)
        );
        assert_eq!(verify_certificate(&der, 960_000_000), Ok(key.peer_id())); // 2000
    }

    #[test]
    fn other_key_types_are_rejected() {
        let ecdsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = certificate_with(&ecdsa, |_| {});
        assert_eq!(verify_certificate(&der, NOW), Err(CertError::NotEd25519));
    }

    #[test]
    fn small_order_keys_are_rejected() {
        for bad in SMALL_ORDER {
            assert!(has_small_order(&bad));
            let mut signed = bad;
            signed[31] |= 0x80; // the other sign of x
            assert!(has_small_order(&signed));
        }
        for _ in 0..100 {
            assert!(!has_small_order(Keypair::generate().peer_id().as_bytes()));
        }
        // A certificate carrying the identity point as its key.
        let key = Keypair::generate();
        let der = make_certificate(&key).unwrap();
        let at = der
            .windows(32)
            .position(|w| w == key.peer_id().as_bytes())
            .unwrap();
        let mut weak = der.clone();
        weak[at..at + 32].copy_from_slice(&SMALL_ORDER[1]);
        assert_eq!(verify_certificate(&weak, NOW), Err(CertError::WeakKey));
    }
}
