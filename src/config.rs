//! Settings of a node, with their defaults. Every limit a peer could push against is here.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::Error;
use crate::identity::PeerId;

/// The default ALPN protocol name.
pub const DEFAULT_ALPN: &[u8] = b"rustorium";

/// Settings of a [`Node`](crate::Node). Build one with [`NodeConfig::default`] and change
/// fields, or use the [`NodeBuilder`](crate::NodeBuilder) methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// UDP address to listen on. Default `127.0.0.1:0` (loopback, any free port).
    pub listen: SocketAddr,
    /// ALPN protocol both sides must agree on. Default `rustorium`.
    pub alpn: Vec<u8>,
    /// Largest request or one-way message body this node accepts, in bytes. Default 16 MiB.
    pub max_request_size: usize,
    /// Largest answer body this node accepts to its own requests, in bytes. Default 16 MiB.
    pub max_response_size: usize,
    /// How long a request may take, from opening its stream to the end of the answer.
    /// Also bounds how long this node waits for a peer to send a whole request or read a
    /// whole answer. Default 10 s.
    pub request_timeout: Duration,
    /// Requests a peer may have open at once on one connection (QUIC bidirectional
    /// streams). Default 100.
    pub max_concurrent_bidi_streams: u32,
    /// One-way messages a peer may have open at once on one connection (QUIC
    /// unidirectional streams). Default 1000.
    pub max_concurrent_uni_streams: u32,
    /// Handlers running at once on this node across all peers; a request past this is
    /// answered BUSY. Default 4096.
    pub max_concurrent_requests: usize,
    /// Connections this node keeps at once, both directions and handshakes in progress
    /// counted; past this, incoming handshakes are refused and dials fail. Default 4096.
    pub max_connections: usize,
    /// Incoming connections (and handshakes) from one IP address at once. Default 64.
    pub max_connections_per_ip: usize,
    /// Only these peers may connect (both directions); `None` admits every peer.
    /// Default `None`.
    pub allow: Option<HashSet<PeerId>>,
    /// These peers may not connect (both directions). Default empty.
    pub deny: HashSet<PeerId>,
    /// How long a dial may take, handshake included. Default 5 s.
    pub connect_timeout: Duration,
    /// Reconnecting to a known peer waits this long after the first failure, doubling
    /// (with ±25 % jitter) up to `reconnect_max_backoff`. Default 100 ms.
    pub reconnect_min_backoff: Duration,
    /// The longest wait between two reconnect attempts. Default 30 s.
    pub reconnect_max_backoff: Duration,
    /// Send requests marked idempotent as 0-RTT data when reconnecting to a peer seen
    /// before, and accept 0-RTT data from peers. Default `true`.
    pub zero_rtt: bool,
    /// A connection with no traffic for this long is closed. Default 30 s.
    pub idle_timeout: Duration,
    /// Send a keep-alive when a connection has been quiet this long (must be shorter than
    /// `idle_timeout`); `None` turns keep-alives off. Default 5 s.
    pub keep_alive_interval: Option<Duration>,
    /// Bytes a peer may have in flight on one stream before this node reads them
    /// (QUIC stream flow-control window). Default 1.25 MB.
    pub stream_receive_window: u32,
    /// Bytes a peer may have in flight on one connection, all streams together, before
    /// this node reads them: the most a peer can make this node buffer. Default 8 MiB.
    pub connection_receive_window: u32,
    /// How long [`Node::shutdown`](crate::Node::shutdown) lets running requests finish
    /// before it closes connections. Default 5 s.
    pub shutdown_grace: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            alpn: DEFAULT_ALPN.to_vec(),
            max_request_size: 16 * 1024 * 1024,
            max_response_size: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            max_concurrent_bidi_streams: 100,
            max_concurrent_uni_streams: 1000,
            max_concurrent_requests: 4096,
            max_connections: 4096,
            max_connections_per_ip: 64,
            allow: None,
            deny: HashSet::new(),
            connect_timeout: Duration::from_secs(5),
            reconnect_min_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(30),
            zero_rtt: true,
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(5)),
            stream_receive_window: 1_250_000,
            connection_receive_window: 8 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl NodeConfig {
    /// Checks that the settings make sense together; the error names the setting.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.alpn.is_empty() || self.alpn.len() > 255 {
            return bad(format!(
                "alpn must be 1 to 255 bytes, got {}",
                self.alpn.len()
            ));
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be more than 0".into());
        }
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout must be more than 0".into());
        }
        if quinn::IdleTimeout::try_from(self.idle_timeout).is_err() {
            return bad(format!("idle_timeout {:?} is too long", self.idle_timeout));
        }
        if let Some(keep_alive) = self.keep_alive_interval {
            if keep_alive >= self.idle_timeout {
                return bad(format!(
                    "keep_alive_interval ({keep_alive:?}) must be shorter than idle_timeout ({:?})",
                    self.idle_timeout
                ));
            }
        }
        if self.max_concurrent_requests == 0 {
            return bad("max_concurrent_requests must be at least 1".into());
        }
        if self.max_concurrent_requests > u32::MAX as usize {
            return bad("max_concurrent_requests must be at most 4294967295".into());
        }
        if self.stream_receive_window == 0 || self.connection_receive_window == 0 {
            return bad(
                "stream_receive_window and connection_receive_window must be more than 0".into(),
            );
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return bad("max_connections and max_connections_per_ip must be at least 1".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be more than 0".into());
        }
        if self.reconnect_min_backoff.is_zero()
            || self.reconnect_min_backoff > self.reconnect_max_backoff
        {
            return bad(format!(
                "reconnect_min_backoff ({:?}) must be more than 0 and at most reconnect_max_backoff ({:?})",
                self.reconnect_min_backoff, self.reconnect_max_backoff
            ));
        }
        Ok(())
    }

    /// The quinn transport settings these values map to.
    /// Whether `peer` may connect (either direction).
    pub(crate) fn admits(&self, peer: &PeerId) -> Result<(), &'static str> {
        if self.deny.contains(peer) {
            return Err("on the deny list");
        }
        match &self.allow {
            Some(allow) if !allow.contains(peer) => Err("not on the allow list"),
            _ => Ok(()),
        }
    }

    pub(crate) fn transport(&self) -> quinn::TransportConfig {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into())
            .max_concurrent_uni_streams(self.max_concurrent_uni_streams.into())
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok())
            .keep_alive_interval(self.keep_alive_interval)
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.connection_receive_window.into())
            // The protocol uses no QUIC datagrams: refuse them rather than buffer them.
            .datagram_receive_buffer_size(None);
        transport
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn keep_alive_must_be_shorter_than_idle_timeout() {
        let config = NodeConfig {
            keep_alive_interval: Some(Duration::from_secs(30)),
            ..NodeConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("keep_alive_interval"), "{err}");
    }

    #[test]
    fn empty_alpn_is_refused() {
        let config = NodeConfig {
            alpn: vec![],
            ..NodeConfig::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("alpn"));
    }
}
