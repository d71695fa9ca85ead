//! Errors, one type per operation: [`KeyError`] (key material and key files),
//! [`ConfigError`] (settings), [`BindError`] (starting a node or moving it to a new socket),
//! [`ConnectError`] (getting a connection to a peer) and [`RequestError`] (a request or a
//! one-way message, which wraps a [`ConnectError`] when no connection could be had).
//! [`Error`] holds any of them, for callers that want one type.
//!
//! Each message says what happened and, where it helps, what to do. Underlying errors
//! (quinn's, rustls's, the OS's) are kept as typed [`source`](std::error::Error::source)s,
//! never flattened into text; one private module (`transport_error`) turns them
//! into words.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::{ParseError, PeerId};
use rustls::AlertDescription;

use crate::transport_error::{describe_close, describe_read};
use crate::wire::{ResponseError, Status};

/// Which body was over its receiver's size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Body {
    /// The request (or one-way message) we sent was over the peer's limit.
    Request,
    /// The answer the peer sent was over our limit.
    Response,
}

impl std::fmt::Display for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Body::Request => "request",
            Body::Response => "response",
        })
    }
}

/// A TLS alert a peer closed the connection with, and the explanation it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsAlert {
    /// The alert.
    pub description: AlertDescription,
    /// The peer's explanation (QUIC's close reason), possibly empty.
    pub message: String,
}

impl std::fmt::Display for TlsAlert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let number = u8::from(self.description);
        write!(f, "TLS alert {number} ({:?})", self.description)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl TlsAlert {
    /// Whether the alert says the peer did not accept our certificate.
    pub fn is_about_certificate(&self) -> bool {
        use AlertDescription as A;
        matches!(
            self.description,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::DecryptError // a bad CertificateVerify
                | A::CertificateRequired
        )
    }
}

/// Key material or a key file is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not an Ed25519 PKCS#8 key.
    #[error("not a valid Ed25519 PKCS#8 key ({0})")]
    Invalid(ring::error::KeyRejected),
    /// A key of another algorithm.
    #[error("this is {found}; an Ed25519 key is needed (make one with `rustorium-p2p keygen`)")]
    NotEd25519 {
        /// What kind of key it is.
        found: &'static str,
    },
    /// No PEM private key block in the text.
    #[error("no PEM private key found ({0})")]
    NoPem(#[source] rustls::pki_types::pem::Error),
    /// The key file could not be read.
    #[error("key file {}: cannot read it: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file is not text.
    #[error("key file {}: not a PEM text file", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no usable key.
    #[error("key file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        source: Box<KeyError>,
    },
    /// [`Keypair::save`](crate::Keypair::save) never overwrites a file.
    #[error("key file {}: file exists; refusing to overwrite a key (remove it first, or choose another path)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The key file could not be written.
    #[error("key file {}: cannot write it: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A setting is out of range or inconsistent with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {problem}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The key at fault, `section.key` as in the file (`limits.request_timeout`).
    pub key: &'static str,
    /// What is wrong, naming the key and the value.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(key: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            key,
            problem: problem.into(),
        }
    }
}

/// A node could not start ([`NodeBuilder::bind`](crate::NodeBuilder::bind)) or move to a
/// new socket ([`Node::rebind`](crate::Node::rebind)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The settings are not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key file could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The UDP socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Socket {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS could not be set up with this key.
    #[error("TLS set-up failed: {0}")]
    Tls(#[source] rustls::Error),
    /// A route was registered twice.
    #[error("route {0:?} is registered twice")]
    DuplicateRoute(String),
    /// A route name is not valid.
    #[error("invalid route {route:?}: {reason}")]
    InvalidRoute {
        /// The route.
        route: String,
        /// Why it is invalid.
        reason: &'static str,
    },
}

/// Who refused a connection, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The peer is on this node's deny list.
    DenyList,
    /// This node has an allow list and the peer is not on it.
    NotAllowed,
    /// This node is at its `max_connections` limit.
    ConnectionLimit,
    /// This node is at its `max_connections_per_ip` limit for the peer's address prefix.
    AddressLimit,
    /// This node is at its `max_handshakes` limit of incoming handshakes in progress.
    HandshakeLimit,
    /// The peer refused us, with its explanation.
    ByPeer(String),
    /// The peer does not admit us: its allow or deny list, or it is at its connection
    /// limit (TLS alert 49, access denied).
    DeniedByPeer,
    /// The peer refused the connection at the QUIC level (at a connection limit, or
    /// shutting down).
    PeerAtLimit,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::DenyList => f.write_str("the peer is on the deny list of this node"),
            Refusal::NotAllowed => f.write_str("the peer is not on the allow list of this node"),
            Refusal::ConnectionLimit => f.write_str("this node is at its max_connections limit"),
            Refusal::AddressLimit => f.write_str(
                "this node is at its max_connections_per_ip limit for that address prefix",
            ),
            Refusal::HandshakeLimit => f.write_str(
                "this node is at its max_handshakes limit of incoming handshakes in progress",
            ),
            Refusal::ByPeer(why) => write!(f, "the peer refused us: {why}"),
            Refusal::DeniedByPeer => f.write_str(
                "the peer does not admit this node: its allow or deny list, or it is at its connection limit (TLS alert 49, access denied)",
            ),
            Refusal::PeerAtLimit => f.write_str(
                "the peer refused the connection (at a connection limit, or shutting down)",
            ),
        }
    }
}

/// No connection to a peer could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer we dialed presented a different key than the PeerId we asked for.
    #[error("peer {expected} at {addr} presented key {actual}, expected {expected}: wrong address, or the node there has a new key")]
    PeerIdMismatch {
        /// The PeerId the dialer asked for.
        expected: PeerId,
        /// The key the remote presented.
        actual: PeerId,
        /// Where we dialed.
        addr: SocketAddr,
    },
    /// The peer presented a certificate no node accepts (not Ed25519, a chain, outside
    /// its validity period, malformed); the dial is refused.
    #[error("peer {peer} at {addr} presented a certificate this node refuses: {reason}")]
    InvalidCertificate {
        /// The PeerId dialed.
        peer: PeerId,
        /// Where we dialed.
        addr: SocketAddr,
        /// What is wrong with it.
        #[source]
        reason: crate::certificate::CertError,
    },
    /// The peer refused the certificate we presented.
    #[error("peer {peer} at {addr} refused our certificate: {alert}")]
    CertificateRejected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// The TLS alert it sent, with its explanation.
        alert: TlsAlert,
    },
    /// The connection was refused, by this node or by the peer.
    #[error("connection with peer {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// Who refused and why.
        reason: Refusal,
    },
    /// Nothing answered within `connect_timeout`.
    #[error(
        "could not connect to peer {peer} at {addr}: no answer within connect_timeout ({after:?})"
    )]
    TimedOut {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The connection was made with 0-RTT but its handshake did not complete in time.
    #[error("could not connect to peer {peer} at {addr}: handshake not complete within {after:?}")]
    HandshakeTimedOut {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The handshake failed, or the connection closed before it completed.
    #[error(
        "could not connect to peer {peer} at {addr}: {}",
        describe_close(source)
    )]
    Handshake {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// What closed the connection.
        source: Box<quinn::ConnectionError>,
    },
    /// The peer does not speak our ALPN protocol.
    #[error("could not connect to peer {peer} at {addr}: no matching ALPN protocol")]
    Alpn {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
    },
    /// The dial could not start (for example an address this socket cannot reach).
    #[error("could not connect to peer {peer} at {addr}: {source}")]
    Dial {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The PeerId is this node's own.
    #[error("could not connect to peer {peer} at {addr}: that is this node's own PeerId")]
    OwnPeerId {
        /// The PeerId (this node's).
        peer: PeerId,
        /// The address given for it.
        addr: SocketAddr,
    },
    /// There is no live connection to the peer and no known address to dial.
    #[error(
        "no connection to peer {0} and no known address: call connect() with its PeerAddr first"
    )]
    UnknownPeer(PeerId),
    /// The local node is shutting down or has shut down.
    #[error("the node is shut down")]
    Shutdown,
}

impl ConnectError {
    /// The peer the error is about, when there is one.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            ConnectError::PeerIdMismatch { expected: peer, .. }
            | ConnectError::CertificateRejected { peer, .. }
            | ConnectError::InvalidCertificate { peer, .. }
            | ConnectError::Refused { peer, .. }
            | ConnectError::TimedOut { peer, .. }
            | ConnectError::HandshakeTimedOut { peer, .. }
            | ConnectError::Handshake { peer, .. }
            | ConnectError::Alpn { peer, .. }
            | ConnectError::Dial { peer, .. }
            | ConnectError::OwnPeerId { peer, .. }
            | ConnectError::UnknownPeer(peer) => Some(*peer),
            ConnectError::Shutdown => None,
        }
    }
}

/// How the peer broke the wire protocol or abandoned a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The answer does not start with a valid status byte.
    #[error("bad answer: {0}")]
    BadAnswer(#[source] ResponseError),
    /// The peer reset the answer stream.
    #[error("the peer reset the answer stream with code {code} ({})", crate::wire::code::describe(*.code))]
    Reset {
        /// The stream error code.
        code: u64,
    },
    /// The peer stopped reading our stream with a code that explains nothing.
    #[error("the peer stopped the stream with code {code} ({})", crate::wire::code::describe(*.code))]
    Stopped {
        /// The stream error code.
        code: u64,
    },
    /// The stream could not be read for another reason.
    #[error("{}", describe_read(.0))]
    Read(#[source] Box<quinn::ReadError>),
    /// The stream was closed under us.
    #[error("the stream was closed under us")]
    ClosedStream,
}

/// A request or one-way message failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No connection to the peer could be had.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The route name is not valid (empty, or longer than 255 bytes).
    #[error("invalid route {route:?}: {reason}")]
    InvalidRoute {
        /// The route.
        route: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// No answer came within the request timeout.
    #[error("request {route:?} to peer {peer} timed out after {after:?}")]
    Timeout {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The peer answered with a status other than OK.
    #[error("peer {peer} answered {route:?} with {status}: {message}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// The status it answered.
        status: Status,
        /// Its message.
        message: String,
    },
    /// A body was over the size limit of its receiver.
    #[error("{body} on {route:?} with peer {peer} is too large: {message}")]
    TooLarge {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// The request (refused by the peer) or the response (refused by us).
        body: Body,
        /// The receiver's explanation, naming the limit.
        message: String,
    },
    /// The connection broke (or was closed) before the request completed.
    #[error("connection to peer {peer} lost: {}", describe_close(source))]
    ConnectionLost {
        /// The peer.
        peer: PeerId,
        /// What closed it.
        source: Box<quinn::ConnectionError>,
    },
    /// The peer rejected the 0-RTT data the request travelled in (it is re-sent once the
    /// handshake completes; this is seen only when that, too, failed).
    #[error("connection to peer {peer} lost: the peer rejected the 0-RTT data")]
    ZeroRttRejected {
        /// The peer.
        peer: PeerId,
    },
    /// The peer stopped reading the request when its own `request_timeout` ran out
    /// (STOP_SENDING with code `TIMED_OUT`): the request did not arrive whole in time. Its
    /// handler did not run.
    #[error(
        "peer {peer} gave up on request {route:?} when its own request_timeout ran out (stream code TIMED_OUT): the request did not arrive whole in time; send less, or raise limits.request_timeout on that node"
    )]
    PeerTimedOut {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
    },
    /// The peer ended a streaming request when one of its time limits ran out (stream code
    /// `TIMED_OUT` on the answer): the body made no progress for the peer's
    /// `request_timeout`, the answer was not read for its `answer_timeout`, or the whole
    /// transfer ran past the route's `max_stream_duration`.
    #[error("peer {peer} ended {route:?} when one of its time limits ran out (stream code TIMED_OUT): the body made no progress for its limits.request_timeout, the answer was left unread for its limits.answer_timeout, or (on a streaming route) the transfer ran past its max_stream_duration, or its limits.request_timeout for a long answer to a small request while it had no transfer slot free")]
    TransferTimedOut {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
    },
    /// The peer stopped reading the body of a streaming request or message before its
    /// end: its handler returned (or failed) without reading it all (`CANCELLED`), or the
    /// body made no progress for the peer's `request_timeout` or ran past the route's
    /// `max_duration` (`TIMED_OUT`). For a request, its answer says why.
    #[error("peer {peer} stopped reading the body of {route:?} ({}): {}", crate::wire::code::describe(*.code), body_stopped_hint(*.code))]
    BodyStopped {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// The stream code it stopped with.
        code: u64,
    },
    /// A typed request or message could not be encoded (see
    /// [`Node::request_typed`](crate::Node::request_typed)); nothing was sent.
    #[cfg(feature = "typed")]
    #[error("cannot encode the request for route {route:?} as {type_name}: {source}")]
    Encode {
        /// The route.
        route: String,
        /// The Rust type of the value.
        type_name: &'static str,
        /// What the codec said.
        source: CodecError,
    },
    /// The answer to a typed request is not a value of the expected type: the peer
    /// serves another version of the route, or another type under its name.
    #[cfg(feature = "typed")]
    #[error(
        "peer {peer} answered route {route:?} with a body that is not a {type_name}: {source}"
    )]
    Decode {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// The Rust type expected.
        type_name: &'static str,
        /// What the codec said.
        source: CodecError,
    },
    /// The peer abandoned the request's stream (a reset or stop whose code explains no
    /// answer), or its answer broke the wire protocol. Its handler may have run.
    #[error("peer {peer} did not answer request {route:?} properly: {source}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// What it did.
        source: ProtocolError,
    },
}

impl RequestError {
    /// Whether the node was shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, RequestError::Connect(ConnectError::Shutdown))
    }
}

/// A typed body could not be encoded or decoded (postcard's wire format).
#[cfg(feature = "typed")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(CodecProblem);

#[cfg(feature = "typed")]
#[derive(Debug, Clone, PartialEq, Eq)]
enum CodecProblem {
    Codec(postcard::Error),
    Trailing(usize),
}

#[cfg(feature = "typed")]
impl CodecError {
    pub(crate) fn codec(error: postcard::Error) -> Self {
        CodecError(CodecProblem::Codec(error))
    }

    pub(crate) fn trailing(bytes: usize) -> Self {
        CodecError(CodecProblem::Trailing(bytes))
    }
}

#[cfg(feature = "typed")]
impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            CodecProblem::Codec(e) => write!(f, "{e}"),
            CodecProblem::Trailing(1) => f.write_str("1 byte left over after the value"),
            CodecProblem::Trailing(n) => write!(f, "{n} bytes left over after the value"),
        }
    }
}

#[cfg(feature = "typed")]
impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            CodecProblem::Codec(e) => Some(e),
            CodecProblem::Trailing(_) => None,
        }
    }
}

/// Any error of this crate, for callers that want one type (each operation returns its
/// own: match on that one to act on a particular failure).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PeerId or PeerAddr text could not be parsed.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// Key material is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A setting is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A node could not start or move.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// No connection could be had.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A request or message failed.
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// What a requester can do about a body the peer stopped reading with `code`.
fn body_stopped_hint(code: u64) -> &'static str {
    if code == u64::from(crate::wire::code::TIMED_OUT) {
        "the body stalled past the peer's limits.request_timeout, or ran past the route's max_duration"
    } else {
        "its handler ended without reading it all; read the answer to learn why"
    }
}

#[cfg(test)]
mod tests {
    /// Errors travel in every `Result` a request returns: they stay small.
    #[test]
    fn errors_are_small() {
        assert!(std::mem::size_of::<super::RequestError>() <= 112);
        assert!(std::mem::size_of::<super::ConnectError>() <= 112);
    }
}
