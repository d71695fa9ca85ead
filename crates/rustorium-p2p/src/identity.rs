//! Who a node is: its Ed25519 [`Keypair`], the [`PeerId`] derived from it, and the
//! [`PeerAddr`] that says where to reach it.
//!
//! A `PeerId` is the 32-byte Ed25519 public key itself, written as 64 hex characters.
//! Key files are PKCS#8 PEM, the format `openssl genpkey -algorithm ed25519` writes.

use std::fmt;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::str::FromStr;

use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::KeyError;

/// The identity of a node: its 32-byte Ed25519 public key.
///
/// Text form: 64 lowercase hex characters. Parsing accepts either case.
///
/// ```
/// use rustorium_p2p::PeerId;
/// let id: PeerId = "3fa2".repeat(16).parse().unwrap();
/// assert_eq!(id.to_string(), "3fa2".repeat(16));
/// assert!("3fa2".parse::<PeerId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// Length of the public key in bytes.
    pub const LEN: usize = 32;

    /// The PeerId whose public key is `bytes`.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        PeerId(bytes)
    }

    /// The raw public key.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks an Ed25519 signature made by this peer's key.
    ///
    /// ```
    /// let key = rustorium_p2p::Keypair::generate();
    /// let sig = key.sign(b"hello");
    /// assert!(key.peer_id().verify(b"hello", &sig));
    /// assert!(!key.peer_id().verify(b"hullo", &sig));
    /// ```
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }

    /// The first 8 hex characters, for logs and tables where the full id is too long.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }

    /// The PeerId as a 52-character lowercase base32 (RFC 4648, no padding) DNS label.
    /// Used as the TLS server name so that session tickets are kept per peer.
    pub(crate) fn to_dns_label(self) -> String {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut out = String::with_capacity(52);
        let mut acc: u32 = 0;
        let mut bits = 0;
        for byte in self.0 {
            acc = (acc << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
        }
        out
    }

    /// The PeerId in a label made by [`to_dns_label`](Self::to_dns_label) (either case).
    pub(crate) fn from_dns_label(label: &str) -> Option<PeerId> {
        if label.len() != 52 {
            return None;
        }
        let mut out = [0u8; 32];
        let (mut acc, mut bits, mut n) = (0u64, 0, 0);
        for c in label.bytes() {
            let v = match c.to_ascii_lowercase() {
                c @ b'a'..=b'z' => c - b'a',
                c @ b'2'..=b'7' => c - b'2' + 26,
                _ => return None,
            };
            acc = (acc << 5) | u64::from(v);
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                *out.get_mut(n)? = (acc >> bits) as u8;
                n += 1;
            }
        }
        // 52 * 5 = 260 bits: 256 of key, 4 padding bits that must be zero.
        (n == 32 && acc & ((1 << bits) - 1) == 0).then_some(PeerId(out))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

/// Why a [`PeerId`] or [`PeerAddr`] could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The PeerId does not have 64 characters.
    #[error("a PeerId is 64 hex characters, got {0} characters")]
    PeerIdLength(usize),
    /// The PeerId contains a character that is not a hex digit.
    #[error("a PeerId is 64 hex characters, found {found:?} at position {position}")]
    PeerIdCharacter {
        /// The offending character.
        found: char,
        /// Its position (0-based, in characters).
        position: usize,
    },
    /// The address has no `@` between PeerId and host.
    #[error("a peer address is <peer_id>@<host>:<port>, got {0:?} (no '@')")]
    MissingAt(String),
    /// The part after `@` is not `host:port`.
    #[error("bad socket address {addr:?} in peer address: {reason}")]
    SocketAddr {
        /// The text after `@`.
        addr: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl FromStr for PeerId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let count = s.chars().count();
        if count != 64 {
            return Err(ParseError::PeerIdLength(count));
        }
        let mut out = [0u8; 32];
        let bytes = s.as_bytes(); // 64 chars and 64 bytes: all ASCII if the digits check passes
        for (position, c) in s.chars().enumerate() {
            if !c.is_ascii_hexdigit() {
                return Err(ParseError::PeerIdCharacter { found: c, position });
            }
        }
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).unwrap_or(0);
            let lo = (pair[1] as char).to_digit(16).unwrap_or(0);
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(PeerId(out))
    }
}

/// Where to reach a peer: its [`PeerId`] and a socket address.
///
/// Text form: `<peer_id>@<host>:<port>`, IPv6 hosts in brackets (`...@[::1]:4433`).
/// A host name is resolved when parsed.
///
/// ```
/// use rustorium_p2p::PeerAddr;
/// let text = format!("{}@127.0.0.1:4433", "ab".repeat(32));
/// let addr: PeerAddr = text.parse().unwrap();
/// assert_eq!(addr.to_string(), text);
/// assert_eq!(addr.addr.port(), 4433);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The peer's identity.
    pub peer_id: PeerId,
    /// The UDP address it listens on.
    pub addr: SocketAddr,
}

impl PeerAddr {
    /// A PeerAddr from its parts.
    pub fn new(peer_id: PeerId, addr: SocketAddr) -> Self {
        PeerAddr { peer_id, addr }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.peer_id, self.addr)
    }
}

impl FromStr for PeerAddr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, rest) = s
            .split_once('@')
            .ok_or_else(|| ParseError::MissingAt(s.to_string()))?;
        let peer_id: PeerId = id.parse()?;
        let addr = match rest.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(parse_err) => {
                let bad = |reason: String| ParseError::SocketAddr {
                    addr: rest.to_string(),
                    reason,
                };
                // Not a literal address: maybe `host:port`.
                if !rest.contains(':') {
                    return Err(bad("missing ':<port>'".into()));
                }
                let mut found = rest
                    .to_socket_addrs()
                    .map_err(|e| bad(format!("{parse_err}; name lookup: {e}")))?;
                found
                    .next()
                    .ok_or_else(|| bad("name has no address".into()))?
            }
        };
        Ok(PeerAddr { peer_id, addr })
    }
}

/// An Ed25519 key pair: the node's long-term identity.
///
/// ```
/// use rustorium_p2p::Keypair;
/// let key = Keypair::generate();
/// let again = Keypair::from_pem(&key.to_pem()).unwrap();
/// assert_eq!(key.peer_id(), again.peer_id());
/// ```
pub struct Keypair {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    peer_id: PeerId,
}

impl Keypair {
    /// A new random key pair.
    pub fn generate() -> Self {
        let rng = ring::rand::SystemRandom::new();
        // Fails only if the OS random source fails, which leaves nothing sensible to do.
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("OS random number generator failed");
        Self::from_pkcs8(doc.as_ref()).expect("ring produced an invalid PKCS#8 document")
    }

    /// A key pair from a PKCS#8 DER document (v1, as openssl writes, or v2).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(KeyError::Invalid)?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Keypair {
            pair,
            pkcs8: der.to_vec(),
            peer_id: PeerId(public),
        })
    }

    /// A key pair from PEM text holding a PKCS#8 `PRIVATE KEY` block.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(der)) => Self::from_pkcs8(der.secret_pkcs8_der()),
            Ok(PrivateKeyDer::Pkcs1(_)) => Err(KeyError::NotEd25519 {
                found: "an RSA key (PKCS#1)",
            }),
            Ok(PrivateKeyDer::Sec1(_)) => Err(KeyError::NotEd25519 {
                found: "an elliptic-curve (SEC1) key",
            }),
            Ok(_) => Err(KeyError::NotEd25519 {
                found: "an unsupported private key format",
            }),
            Err(e) => Err(KeyError::NoPem(e)),
        }
    }

    /// Loads a key file (PKCS#8 PEM).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let path_buf = || path.to_path_buf();
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path_buf(),
            source,
        })?;
        let text = String::from_utf8(text).map_err(|_| KeyError::NotText { path: path_buf() })?;
        Self::from_pem(&text).map_err(|e| KeyError::File {
            path: path_buf(),
            source: Box::new(e),
        })
    }

    /// Writes the key to a new file with mode 0600. Refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let path_buf = || path.to_path_buf();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path_buf() }
            } else {
                KeyError::Write {
                    path: path_buf(),
                    source,
                }
            }
        })?;
        file.write_all(self.to_pem().as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path_buf(),
                source,
            })
    }

    /// The key as PKCS#8 PEM text.
    pub fn to_pem(&self) -> String {
        let der = PrivatePkcs8KeyDer::from(self.pkcs8.as_slice());
        match rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519) {
            Ok(pair) => pair.serialize_pem(),
            // `self.pkcs8` was validated in `from_pkcs8`.
            Err(e) => unreachable!("validated Ed25519 key rejected by rcgen: {e}"),
        }
    }

    /// The PeerId of this key.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The PKCS#8 DER document.
    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Signs `message` with this key (Ed25519). Anyone can check the signature with
    /// [`PeerId::verify`].
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.peer_id)
    }
}

impl Clone for Keypair {
    fn clone(&self) -> Self {
        Self::from_pkcs8(&self.pkcs8).expect("validated key")
    }
}

macro_rules! serde_as_text {
    ($type:ty, $what:literal) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(|e| {
                    serde::de::Error::custom(format!(concat!("bad ", $what, ": {}"), e))
                })
            }
        }
    };
}

serde_as_text!(PeerId, "PeerId");
serde_as_text!(PeerAddr, "peer address");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_label_is_52_base32_chars() {
        let id = PeerId([0xff; 32]);
        let label = id.to_dns_label();
        assert_eq!(label.len(), 52);
        assert!(label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(PeerId([0; 32]).to_dns_label(), "a".repeat(52));
        // RFC 4648 test vector: "f" -> "MY".
        let mut bytes = [0u8; 32];
        bytes[0] = b'f';
        assert!(PeerId(bytes).to_dns_label().starts_with("my"));
    }

    #[test]
    fn dns_label_round_trip() {
        for _ in 0..50 {
            let id = Keypair::generate().peer_id();
            let label = id.to_dns_label();
            assert_eq!(PeerId::from_dns_label(&label), Some(id));
            assert_eq!(PeerId::from_dns_label(&label.to_uppercase()), Some(id));
            assert_eq!(PeerId::from_dns_label(&label[1..]), None);
            assert_eq!(PeerId::from_dns_label(&format!("{}1", &label[1..])), None);
        }
        // Non-zero padding bits are not a PeerId's label.
        let mut label = PeerId([0; 32]).to_dns_label();
        label.replace_range(51.., "b");
        assert_eq!(PeerId::from_dns_label(&label), None);
    }
}
