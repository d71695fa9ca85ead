//! Self-signed Ed25519 certificates: making one for our key, and checking a peer's.
//!
//! The checker reads just what authentication needs from the DER (a strict subset of
//! X.509: the TBS certificate, its validity, the subject public key, the signature) and
//! rejects anything else, so no general X.509 parser sits in front of hostile input.

use std::fmt;

use ring::signature::{UnparsedPublicKey, ED25519};

use crate::identity::{Keypair, PeerId};

/// The subject alternative name in every node certificate.
pub const CERT_NAME: &str = "rustorium";

/// DER of the Ed25519 algorithm OID 1.3.101.112.
const ED25519_OID: &[u8] = &[0x2b, 0x65, 0x70];

/// Makes the self-signed certificate a node presents, DER encoded.
pub fn make_certificate(key: &Keypair) -> Result<Vec<u8>, rcgen::Error> {
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
pub enum CertError {
    /// Not the DER layout of an X.509 certificate.
    Malformed(&'static str),
    /// The key is not Ed25519.
    NotEd25519,
    /// The self-signature does not verify.
    BadSignature,
    /// `now` is before the validity period.
    NotYetValid,
    /// `now` is after the validity period.
    Expired,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertError::Malformed(what) => write!(f, "malformed certificate: {what}"),
            CertError::NotEd25519 => f.write_str("certificate key is not Ed25519"),
            CertError::BadSignature => f.write_str("certificate self-signature does not verify"),
            CertError::NotYetValid => f.write_str("certificate is not valid yet"),
            CertError::Expired => f.write_str("certificate has expired"),
        }
    }
}

/// Checks a peer certificate and returns the PeerId it belongs to: the DER must be a
/// certificate with an Ed25519 key, signed by that same key, valid at `now_secs` (Unix time).
pub fn verify_certificate(der: &[u8], now_secs: u64) -> Result<PeerId, CertError> {
    let parsed = parse(der)?;
    if now_secs < parsed.not_before {
        return Err(CertError::NotYetValid);
    }
    if now_secs > parsed.not_after {
        return Err(CertError::Expired);
    }
    UnparsedPublicKey::new(&ED25519, parsed.key)
        .verify(parsed.tbs, parsed.signature)
        .map_err(|_| CertError::BadSignature)?;
    let mut key = [0u8; 32];
    key.copy_from_slice(parsed.key);
    Ok(PeerId::from_bytes(key))
}

/// Reads the PeerId out of a certificate without checking it (for certificates that
/// the TLS verifier has already accepted).
pub fn peer_id_of(der: &[u8]) -> Option<PeerId> {
    let parsed = parse(der).ok()?;
    let mut key = [0u8; 32];
    key.copy_from_slice(parsed.key);
    Some(PeerId::from_bytes(key))
}

struct Parsed<'a> {
    tbs: &'a [u8],
    key: &'a [u8],
    signature: &'a [u8],
    not_before: u64,
    not_after: u64,
}

fn parse(der: &[u8]) -> Result<Parsed<'_>, CertError> {
    use CertError::Malformed as M;
    let mut outer = Der::new(der);
    let cert = outer.expect(SEQUENCE, "certificate is not a SEQUENCE")?;
    if !outer.is_empty() {
        return Err(M("trailing bytes after certificate"));
    }
    let mut cert = Der::new(cert);
    let tbs = cert.raw(SEQUENCE, "no TBS certificate")?;
    let outer_alg = cert.expect(SEQUENCE, "no signature algorithm")?;
    let signature = bit_string(cert.expect(BIT_STRING, "no signature")?)?;
    if !cert.is_empty() {
        return Err(M("trailing fields after signature"));
    }
    if !is_ed25519_alg(outer_alg)? {
        return Err(CertError::NotEd25519);
    }

    let mut fields = Der::new(Der::new(tbs).expect(SEQUENCE, "no TBS certificate")?);
    if fields.peek() == Some(0xa0) {
        fields.expect(0xa0, "bad version")?;
    }
    fields.expect(INTEGER, "no serial number")?;
    let inner_alg = fields.expect(SEQUENCE, "no TBS signature algorithm")?;
    if inner_alg != outer_alg {
        return Err(M("signature algorithms differ"));
    }
    fields.expect(SEQUENCE, "no issuer")?;
    let mut validity = Der::new(fields.expect(SEQUENCE, "no validity")?);
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    fields.expect(SEQUENCE, "no subject")?;
    let mut spki = Der::new(fields.expect(SEQUENCE, "no subject public key info")?);
    let key_alg = spki.expect(SEQUENCE, "no key algorithm")?;
    let key = bit_string(spki.expect(BIT_STRING, "no public key")?)?;
    if !is_ed25519_alg(key_alg)? || key.len() != 32 {
        return Err(CertError::NotEd25519);
    }
    if signature.len() != 64 {
        return Err(M("Ed25519 signature is not 64 bytes"));
    }
    Ok(Parsed {
        tbs,
        key,
        signature,
        not_before,
        not_after,
    })
}

const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const SEQUENCE: u8 = 0x30;

/// `AlgorithmIdentifier` is exactly `{ id-Ed25519 }` (RFC 8410: no parameters).
fn is_ed25519_alg(alg: &[u8]) -> Result<bool, CertError> {
    let mut alg = Der::new(alg);
    let oid = alg.expect(OID, "algorithm without OID")?;
    Ok(oid == ED25519_OID && alg.is_empty())
}

fn bit_string(content: &[u8]) -> Result<&[u8], CertError> {
    match content.split_first() {
        Some((0, bits)) => Ok(bits),
        _ => Err(CertError::Malformed("BIT STRING with unused bits")),
    }
}

/// Reads a UTCTime or GeneralizedTime (`...Z`, seconds precision) as Unix seconds.
fn time(der: &mut Der<'_>) -> Result<u64, CertError> {
    let bad = CertError::Malformed("bad time in validity");
    let (tag, content) = der
        .any()
        .ok_or(CertError::Malformed("missing validity time"))?;
    let (year, rest) = match (tag, content.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&content[..2]).ok_or(bad.clone())?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &content[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&content[..4]).ok_or(bad.clone())?, &content[4..]),
        _ => return Err(bad),
    };
    if rest[10] != b'Z' {
        return Err(bad);
    }
    let field = |i: usize| digits(&rest[i..i + 2]).ok_or(bad.clone());
    let (month, day, hour, min, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err(bad);
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + min * 60 + sec);
    Ok(secs.max(0) as u64)
}

fn digits(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A cursor over DER TLVs (definite lengths, single-byte tags).
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next TLV as (tag, content, whole TLV).
    fn next_tlv(&mut self) -> Option<(u8, &'a [u8], &'a [u8])> {
        let all = self.rest;
        let (&tag, rest) = all.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let header = all.len() - rest.len();
        self.rest = &rest[len..];
        Some((tag, &rest[..len], &all[..header + len]))
    }

    fn any(&mut self) -> Option<(u8, &'a [u8])> {
        self.next_tlv().map(|(tag, content, _)| (tag, content))
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], CertError> {
        match self.next_tlv() {
            Some((t, content, _)) if t == tag => Ok(content),
            _ => Err(CertError::Malformed(what)),
        }
    }

    fn raw(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], CertError> {
        match self.next_tlv() {
            Some((t, _, raw)) if t == tag => Ok(raw),
            _ => Err(CertError::Malformed(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000; // 2027-01-15

    #[test]
    fn our_certificate_verifies_and_names_our_key() {
        let key = Keypair::generate();
        let der = make_certificate(&key).unwrap();
        assert_eq!(verify_certificate(&der, NOW), Ok(key.peer_id()));
        assert_eq!(peer_id_of(&der), Some(key.peer_id()));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_rejected_or_harmless() {
        let key = Keypair::generate();
        let der = make_certificate(&key).unwrap();
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0x01;
            // Any change to signed bytes or the signature must fail; no input may panic.
            assert!(
                verify_certificate(&bad, NOW).is_err(),
                "byte {i} flipped still verifies"
            );
        }
        for cut in 0..der.len() {
            assert!(verify_certificate(&der[..cut], NOW).is_err());
        }
    }

    #[test]
    fn validity_period_is_enforced() {
        let key = Keypair::generate();
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.pkcs8_der());
        let signing =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let cert = params.self_signed(&signing).unwrap();
        assert_eq!(verify_certificate(cert.der(), NOW), Err(CertError::Expired));
        assert_eq!(
            verify_certificate(cert.der(), 900_000_000), // 1998
            Err(CertError::NotYetValid)
        );
        assert_eq!(
            verify_certificate(cert.der(), 960_000_000),
            Ok(key.peer_id())
        ); // 2000
    }

    #[test]
    fn other_key_types_are_rejected() {
        let ecdsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).unwrap();
        let cert = params.self_signed(&ecdsa).unwrap();
        assert_eq!(
            verify_certificate(cert.der(), NOW),
            Err(CertError::NotEd25519)
        );
    }

    #[test]
    fn signature_by_another_key_is_rejected() {
        // A certificate for key A whose signature was made by key B.
        let a = Keypair::generate();
        let b = Keypair::generate();
        let der = make_certificate(&a).unwrap();
        let parsed = parse(&der).unwrap();
        let forged_sig = b.sign(parsed.tbs);
        let mut forged = der.clone();
        let at = der.len() - 64;
        forged[at..].copy_from_slice(&forged_sig);
        assert_eq!(
            verify_certificate(&forged, NOW),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            days_from_civil(2027, 1, 15) * 86_400,
            1_800_000_000 - 1_800_000_000 % 86_400
        );
    }
}
