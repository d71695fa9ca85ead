//! The one error type of the library. Each variant says what happened and, where it
//! helps, what to do about it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::{ParseError, PeerId};
use crate::wire::Status;

/// Which way a body that was too large was travelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// The request (or one-way message) we sent was over the peer's limit.
    Request,
    /// The answer the peer sent was over our limit.
    Response,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Request => "request",
            Direction::Response => "response",
        })
    }
}

/// Everything that can go wrong in `rustorium_p2p`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PeerId or PeerAddr text could not be parsed.
    #[error(transparent)]
    Parse(#[from] ParseError),

    /// Key material is unusable.
    #[error("bad key: {reason}")]
    Key {
        /// What is wrong with it.
        reason: String,
    },

    /// A key file could not be read or written.
    #[error("key file {}: {reason}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The node could not open its UDP socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },

    /// The metrics endpoint could not open its TCP socket.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },

    /// A setting is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

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

    /// The peer refused the certificate we presented.
    #[error("peer {peer} at {addr} refused our certificate: {reason}")]
    CertificateRejected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// What the peer said.
        reason: String,
    },

    /// The connection could not be set up (TLS or QUIC handshake failure, unreachable peer).
    #[error("could not connect to peer {peer} at {addr}: {reason}")]
    Connect {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },

    /// The connection was refused: the peer's connection limits or its allow/deny list,
    /// or this node's own allow/deny list or limits.
    #[error("connection with peer {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// Who refused and why.
        reason: String,
    },

    /// There is no live connection to the peer and no known address to dial.
    #[error(
        "no connection to peer {0} and no known address: call connect() with its PeerAddr first"
    )]
    UnknownPeer(PeerId),

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
    #[error("{direction} on {route:?} with peer {peer} is too large: {message}")]
    TooLarge {
        /// The peer.
        peer: PeerId,
        /// The route.
        route: String,
        /// Request (refused by the peer) or response (refused by us).
        direction: Direction,
        /// The receiver's explanation, naming the limit.
        message: String,
    },

    /// The connection broke (or was closed) before the operation completed.
    #[error("connection to peer {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer.
        peer: PeerId,
        /// What closed it.
        reason: String,
    },

    /// The peer broke the wire protocol.
    #[error("peer {peer} broke the protocol: {reason}")]
    Protocol {
        /// The peer.
        peer: PeerId,
        /// What it did.
        reason: String,
    },

    /// The local node is shutting down or has shut down.
    #[error("the node is shut down")]
    Shutdown,
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
