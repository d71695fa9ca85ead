//! What happens to connections, as [`PeerEvent`]s from [`Node::events`](crate::Node::events).

use std::net::SocketAddr;

use crate::identity::PeerId;
use crate::wire::code;

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// We dialed the peer.
    Outbound,
    /// The peer dialed us.
    Inbound,
}

/// `inbound` or `outbound`, as the metrics' `direction` label says it.
impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The peer closed the connection (with this explanation).
    ClosedByPeer(String),
    /// The peer shut down.
    PeerShutdown,
    /// This node shut down.
    LocalShutdown,
    /// This node closed the connection ([`Node::disconnect`](crate::Node::disconnect)).
    ClosedLocally,
    /// Nothing was heard from the peer within the idle timeout.
    IdleTimeout,
    /// Both sides dialed at once; this connection lost to the other one.
    Duplicate,
    /// The connection broke for another reason.
    Lost(String),
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::ClosedByPeer(why) => write!(f, "closed by peer: {why}"),
            DisconnectReason::PeerShutdown => f.write_str("peer shut down"),
            DisconnectReason::LocalShutdown => f.write_str("this node shut down"),
            DisconnectReason::ClosedLocally => f.write_str("closed by this node"),
            DisconnectReason::IdleTimeout => f.write_str("idle timeout"),
            DisconnectReason::Duplicate => f.write_str("duplicate connection closed"),
            DisconnectReason::Lost(why) => write!(f, "lost: {why}"),
        }
    }
}

impl DisconnectReason {
    pub(crate) fn from_error(err: &quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match err {
            E::ApplicationClosed(close) => match close.error_code.into_inner() as u32 {
                code::CLOSE_SHUTDOWN => DisconnectReason::PeerShutdown,
                code::CLOSE_DUPLICATE => DisconnectReason::Duplicate,
                _ => DisconnectReason::ClosedByPeer(
                    String::from_utf8_lossy(&close.reason).into_owned(),
                ),
            },
            E::LocallyClosed => DisconnectReason::LocalShutdown,
            E::TimedOut => DisconnectReason::IdleTimeout,
            E::ConnectionClosed(close) => DisconnectReason::ClosedByPeer(close.to_string()),
            other => DisconnectReason::Lost(other.to_string()),
        }
    }
}

/// Something that happened to a connection. Subscribe with
/// [`Node::events`](crate::Node::events). Events are per connection: during a simultaneous
/// dial a peer can show two `Connected` and one `Disconnected` with reason `Duplicate`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A connection to `peer` was established.
    Connected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// Who dialed.
        direction: Direction,
    },
    /// A connection to `peer` ended.
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// Its address when the connection ended.
        addr: SocketAddr,
        /// Who had dialed.
        direction: Direction,
        /// Why it ended.
        reason: DisconnectReason,
    },
}

#[cfg(test)]
mod tests {
    /// Logs say a direction as the metrics' label does.
    #[test]
    fn directions_print_as_the_metrics_label() {
        assert_eq!(super::Direction::Inbound.to_string(), "inbound");
        assert_eq!(super::Direction::Outbound.to_string(), "outbound");
    }
}
