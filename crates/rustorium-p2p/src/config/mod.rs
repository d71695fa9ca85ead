//! Settings of a node: the [`Config`] type, its defaults, and validation.
//!
//! `Config` has three sections, `node`, `limits` and `transport`, and implements serde's
//! `Deserialize` (every key optional, unknown keys refused), so it can be read from any
//! format an application uses. Durations are written `"30s"`, `"250ms"`; sizes
//! `"16MiB"`, `"1.25MB"` or an integer of bytes ([`parse_duration`], [`parse_size`]).
//! The `rustorium-p2p` command reads it from a TOML file.
//!
//! ```
//! use std::time::Duration;
//! let mut config = rustorium_p2p::Config::default();
//! config.limits.request_timeout = Duration::from_secs(2);
//! config.transport.congestion_controller = rustorium_p2p::CongestionController::Bbr;
//! assert!(config.validate().is_ok());
//! ```

mod units;

pub use units::{format_duration, format_size, parse_duration, parse_size};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Refusal};
use crate::identity::{PeerAddr, PeerId};
use crate::stream_budget::{initial_limit, StreamBudget, StreamPool};

/// The default ALPN protocol name.
pub const DEFAULT_ALPN: &str = "rustorium";

/// All settings of a node. [`Config::default`] gives the documented defaults;
/// it deserializes from any serde format (the `rustorium-p2p` command reads TOML).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Identity, addresses, peers, admission.
    pub node: NodeSettings,
    /// Sizes, times and counts that bound what peers can make the node do.
    pub limits: Limits,
    /// QUIC transport settings (mapped onto quinn's `TransportConfig` / `EndpointConfig`).
    pub transport: TransportSettings,
}

/// The `[node]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NodeSettings {
    /// Key file (PKCS#8 PEM). `None`: the builder's key, or a new one.
    pub key_file: Option<PathBuf>,
    /// UDP address to listen on. Default `127.0.0.1:4433`.
    pub listen: SocketAddr,
    /// ALPN protocol both sides must agree on. Default `rustorium`.
    pub alpn: String,
    /// Peers to keep connected (redialed with backoff).
    pub peers: Vec<PeerAddr>,
    /// Only these peers may connect (both directions); absent: every peer.
    pub allow: Option<HashSet<PeerId>>,
    /// These peers may not connect (both directions).
    pub deny: HashSet<PeerId>,
    /// 0-RTT for idempotent requests on reconnect, and accepting early data. Default on.
    pub zero_rtt: bool,
    /// Run the node's I/O (quinn's drivers, and the serving of peers' streams, handlers
    /// included) on a thread of its own with a single-threaded runtime. Default on: answers
    /// then share datagrams, no wake-up crosses threads on the serving path, and each
    /// connection serves its streams in its own task (no task spawned per request).
    /// Handlers must not block that thread (run heavy work with
    /// `tokio::task::spawn_blocking`, or on a runtime of your own). Off: everything runs
    /// on the runtime that called `bind`, each stream in a task of its own, so one
    /// connection's handlers can run on several threads.
    pub io_thread: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            key_file: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            alpn: DEFAULT_ALPN.to_string(),
            peers: Vec::new(),
            allow: None,
            deny: HashSet::new(),
            zero_rtt: true,
            io_thread: true,
        }
    }
}

/// The `[limits]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// Largest request or one-way message body accepted, in bytes. Default 16 MiB.
    #[serde(with = "units::size")]
    pub max_request_size: u64,
    /// Largest answer body accepted to this node's own requests. Default 16 MiB.
    #[serde(with = "units::size")]
    pub max_response_size: u64,
    /// Request bytes the node holds in memory at once, all peers together; past this it
    /// stops reading request bodies (flow control holds the senders back) until handlers
    /// finish with theirs. Default 256 MiB.
    #[serde(with = "units::size")]
    pub max_buffered_request_bytes: u64,
    /// Request bytes one peer's requests may hold in memory at once (its share of
    /// `max_buffered_request_bytes`). Never less than `max_request_size`, so that a peer
    /// can always send one request of the largest size (and the node budget is never less
    /// than this). Default 32 MiB.
    #[serde(with = "units::size")]
    pub max_buffered_request_bytes_per_peer: u64,
    /// A whole request, from opening its stream to the end of the answer; also how long a
    /// peer may take to send a request or read an answer. Default 10 s.
    #[serde(with = "units::duration")]
    pub request_timeout: Duration,
    /// Handlers running at once on this node; a request past this is answered BUSY.
    /// Default 4096.
    pub max_concurrent_requests: u32,
    /// Handlers running at once for one peer, so that no peer takes more than its share
    /// of `max_concurrent_requests`; a request past this is answered BUSY. Default 256.
    pub max_concurrent_requests_per_peer: u32,
    /// How long an answer may wait for the peer to read it (for flow-control credit)
    /// without any progress before its stream is reset. Default 2 s.
    #[serde(with = "units::duration")]
    pub answer_timeout: Duration,
    /// Answers of one peer waiting for it to read them at once; past this, new answers
    /// to that peer are reset, and a peer that lets `answer_timeout` run out this many
    /// times in a row loses its connection (close code `LIMIT`). Default 64.
    pub max_pending_answers_per_peer: u32,
    /// Established connections at once, both directions. Default 4096.
    pub max_connections: u32,
    /// Bytes of resumption state (session tickets, for 0-RTT reconnects) kept for peers
    /// that connected to this node; the oldest go first. Default 4 MiB.
    #[serde(with = "units::size")]
    pub max_ticket_cache_bytes: u64,
    /// Streams that all connections together may let their peers open beyond each
    /// connection's first 16 per direction (the limits grow under use up to
    /// `transport.max_concurrent_*_streams`, and shrink back). Default 65536.
    pub max_extra_streams: u64,
    /// Incoming handshakes in progress at once (kept apart from established
    /// connections: half-open handshakes never block this node's own dials).
    /// Default 256.
    pub max_handshakes: u32,
    /// How long an incoming handshake may take. Default 5 s.
    #[serde(with = "units::duration")]
    pub handshake_timeout: Duration,
    /// Incoming handshakes in progress from which a new one must first prove its address
    /// with a QUIC Retry (one more round trip, no state kept until then); 0: always.
    /// Default 32.
    pub retry_threshold: u32,
    /// Incoming connections and handshakes at once from one address prefix (see
    /// `ipv4_prefix` and `ipv6_prefix`). Default 64.
    pub max_connections_per_ip: u32,
    /// Incoming handshakes in progress at once from one address prefix, so that a few
    /// addresses cannot hold all of `max_handshakes`. Default 32.
    pub max_handshakes_per_ip: u32,
    /// Length of the IPv4 prefix that `max_connections_per_ip` counts per. Default 32
    /// (one address).
    pub ipv4_prefix: u8,
    /// Length of the IPv6 prefix that `max_connections_per_ip` counts per. Default 64
    /// (one subnet: a host is usually given a whole /64).
    pub ipv6_prefix: u8,
    /// One dial, handshake included. Default 5 s.
    #[serde(with = "units::duration")]
    pub connect_timeout: Duration,
    /// First wait before redialing a known peer; doubles (±25 % jitter). Default 100 ms.
    #[serde(with = "units::duration")]
    pub reconnect_min_backoff: Duration,
    /// Longest wait between redials. Default 30 s.
    #[serde(with = "units::duration")]
    pub reconnect_max_backoff: Duration,
    /// How long shutdown lets running requests finish. Default 5 s.
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// Largest request or one-way message body a streaming route accepts, unless the
    /// route sets its own (`StreamLimits`). Its bytes are never held whole: flow control
    /// hands them to the handler as it reads. Default 4 GiB.
    #[serde(with = "units::size")]
    pub max_stream_body_size: u64,
    /// Longest a streaming request or message may run, from its first byte to the end of
    /// its answer, unless the route sets its own. Default 10 min.
    #[serde(with = "units::duration")]
    pub max_stream_duration: Duration,
    /// Streaming requests and messages whose bodies are still arriving, served at once
    /// on this node (kept apart from `max_concurrent_requests`: a transfer runs as fast
    /// as its peer sends, so peers holding transfers never take the slots of buffered
    /// requests; a small body that is all there when its stream opens takes a handler
    /// slot instead). Past this a streaming request is answered BUSY. Default 2048: one
    /// address prefix (`max_connections_per_ip` PeerIds at
    /// `max_concurrent_transfers_per_peer` each) can hold a quarter of it.
    pub max_concurrent_transfers: u32,
    /// Streaming requests and messages served at once for one peer (its share of
    /// `max_concurrent_transfers`). Default 8.
    pub max_concurrent_transfers_per_peer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_size: 16 << 20,
            max_response_size: 16 << 20,
            max_buffered_request_bytes: 256 << 20,
            max_buffered_request_bytes_per_peer: 32 << 20,
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 4096,
            max_concurrent_requests_per_peer: 256,
            answer_timeout: Duration::from_secs(2),
            max_pending_answers_per_peer: 64,
            max_connections: 4096,
            max_ticket_cache_bytes: 4 << 20,
            max_extra_streams: 65_536,
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(5),
            retry_threshold: 32,
            max_connections_per_ip: 64,
            max_handshakes_per_ip: 32,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            connect_timeout: Duration::from_secs(5),
            reconnect_min_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_stream_body_size: 4 << 30,
            max_stream_duration: Duration::from_secs(600),
            max_concurrent_transfers: 2048,
            max_concurrent_transfers_per_peer: 8,
        }
    }
}

/// Congestion controller of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CongestionController {
    /// CUBIC (RFC 9438), quinn's default.
    Cubic,
    /// NewReno (RFC 9002).
    NewReno,
    /// BBR (quinn's experimental BBRv1).
    Bbr,
}

/// The `[transport]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TransportSettings {
    /// Requests a peer may have open at once on one connection. Default 100.
    ///
    /// quinn keeps state for every stream a peer may open, so a connection advertises at
    /// most 16 at first and doubles that, up to this maximum, whenever the peer has three
    /// quarters of it in use.
    pub max_concurrent_bidi_streams: u32,
    /// One-way messages a peer may have open at once on one connection. Default 1000.
    /// Grows from 16 like `max_concurrent_bidi_streams`.
    pub max_concurrent_uni_streams: u32,
    /// A connection silent this long is closed. Default 30 s.
    #[serde(with = "units::duration")]
    pub max_idle_timeout: Duration,
    /// Keep-alive after this much quiet; `"off"` for none. Default 5 s.
    #[serde(with = "units::duration_or_off")]
    pub keep_alive_interval: Option<Duration>,
    /// Round-trip time assumed before the first measurement. Default 100 ms.
    #[serde(with = "units::duration")]
    pub initial_rtt: Duration,
    /// Largest UDP payload this node accepts (advertised to peers), and the upper bound
    /// of its path MTU discovery. Default 1472 (an Ethernet path's). A path that carries
    /// more (loopback, jumbo frames: 8952) moves bulk data faster with a larger value, at a
    /// cost per connection where both ends allow it: memory and handshake work
    /// (BENCHMARKS.md, "Bulk on loopback").
    #[serde(with = "units::payload")]
    pub max_udp_payload_size: u16,
    /// UDP payload size used before path MTU discovery. Default 1200 (QUIC's minimum).
    #[serde(with = "units::payload")]
    pub initial_mtu: u16,
    /// Path MTU discovery. Default on.
    pub mtu_discovery: bool,
    /// Bytes a peer may send on one stream ahead of the node reading them. Default 1.25 MB.
    #[serde(with = "units::size")]
    pub stream_receive_window: u32,
    /// Bytes a peer may send on one connection ahead of the node reading them (all
    /// streams): the most a peer can make the node buffer. Default 8 MiB.
    #[serde(with = "units::size")]
    pub receive_window: u32,
    /// Bytes the node keeps unacknowledged per connection. Default 10 MB.
    #[serde(with = "units::size")]
    pub send_window: u64,
    /// QUIC datagrams buffered for the application; 0 turns datagrams off (the protocol
    /// does not use them). Default 0.
    #[serde(with = "units::size")]
    pub datagram_receive_buffer_size: u32,
    /// QUIC datagrams buffered for sending. Default 1 MiB.
    #[serde(with = "units::size")]
    pub datagram_send_buffer_size: u32,
    /// `cubic`, `new_reno` or `bbr`. Default `cubic`.
    pub congestion_controller: CongestionController,
    /// The UDP socket's receive buffer (SO_RCVBUF), where datagrams wait while the node
    /// is busy. The OS default (about 208 KiB) overflows under load, and every overflow is
    /// a lost packet that the peer resends only after a probe timeout. Linux caps it at
    /// `net.core.rmem_max`; above that the node tries `SO_RCVBUFFORCE` (which needs
    /// `CAP_NET_ADMIN`; Linux and Android) and otherwise logs a warning saying how to raise
    /// the cap. At least 64 KiB, at most 1 GiB. Default 8 MiB.
    #[serde(with = "units::size")]
    pub socket_receive_buffer: u32,
    /// The UDP socket's send buffer (SO_SNDBUF), capped at `net.core.wmem_max` as the
    /// receive buffer is (the same `SO_SNDBUFFORCE` attempt and warning). At least 64 KiB,
    /// at most 1 GiB. Default 4 MiB.
    #[serde(with = "units::size")]
    pub socket_send_buffer: u32,
}

/// The largest socket buffer a node asks for (1 GiB).
const SOCKET_BUFFER_MAX: u32 = 1 << 30;

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            max_concurrent_bidi_streams: 100,
            max_concurrent_uni_streams: 1000,
            max_idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(5)),
            initial_rtt: Duration::from_millis(100),
            max_udp_payload_size: 1472,
            initial_mtu: 1200,
            mtu_discovery: true,
            stream_receive_window: 1_250_000,
            receive_window: 8 << 20,
            send_window: 10_000_000,
            datagram_receive_buffer_size: 0,
            datagram_send_buffer_size: 1 << 20,
            congestion_controller: CongestionController::Cubic,
            socket_receive_buffer: 8 << 20,
            socket_send_buffer: 4 << 20,
        }
    }
}

impl Config {
    /// Checks that the settings make sense together; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (n, l, t) = (&self.node, &self.limits, &self.transport);
        let fail = |key: &'static str, msg: String| Err(ConfigError::new(key, msg));
        if n.alpn.is_empty() || n.alpn.len() > 255 {
            return fail(
                "node.alpn",
                format!("node.alpn must be 1 to 255 bytes, got {}", n.alpn.len()),
            );
        }
        for (key, value) in [
            ("limits.request_timeout", l.request_timeout),
            ("limits.connect_timeout", l.connect_timeout),
            ("limits.answer_timeout", l.answer_timeout),
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.reconnect_min_backoff", l.reconnect_min_backoff),
            ("limits.max_stream_duration", l.max_stream_duration),
            ("transport.max_idle_timeout", t.max_idle_timeout),
            ("transport.initial_rtt", t.initial_rtt),
        ] {
            if value.is_zero() {
                return fail(key, format!("{key} must be more than 0"));
            }
        }
        for (key, value) in [
            ("limits.max_concurrent_requests", l.max_concurrent_requests),
            (
                "limits.max_concurrent_requests_per_peer",
                l.max_concurrent_requests_per_peer,
            ),
            (
                "limits.max_pending_answers_per_peer",
                l.max_pending_answers_per_peer,
            ),
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_concurrent_transfers",
                l.max_concurrent_transfers,
            ),
            (
                "limits.max_concurrent_transfers_per_peer",
                l.max_concurrent_transfers_per_peer,
            ),
            ("limits.max_handshakes", l.max_handshakes),
            ("limits.max_handshakes_per_ip", l.max_handshakes_per_ip),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            ("transport.stream_receive_window", t.stream_receive_window),
            ("transport.receive_window", t.receive_window),
        ] {
            if value == 0 {
                return fail(key, format!("{key} must be at least 1"));
            }
        }
        for (key, value, least) in [
            ("limits.max_request_size", l.max_request_size, 1),
            ("limits.max_response_size", l.max_response_size, 1),
            ("limits.max_stream_body_size", l.max_stream_body_size, 1),
            (
                "limits.max_buffered_request_bytes",
                l.max_buffered_request_bytes,
                1,
            ),
            // Smaller buffers overflow on a burst of a few dozen datagrams, and each
            // overflow is a lost packet.
            (
                "transport.socket_receive_buffer",
                t.socket_receive_buffer.into(),
                64 << 10,
            ),
            (
                "transport.socket_send_buffer",
                t.socket_send_buffer.into(),
                64 << 10,
            ),
        ] {
            if value < least {
                return fail(
                    key,
                    format!(
                        "{key} must be at least {}, got {}",
                        if least == 1 {
                            "1 byte".to_string()
                        } else {
                            format_size(least)
                        },
                        format_size(value)
                    ),
                );
            }
        }
        // The kernel takes at most about 1 GiB (INT_MAX / 2, and older kernels overflow
        // doubling a larger size into a tiny buffer); more would only mislead.
        for (key, value) in [
            ("transport.socket_receive_buffer", t.socket_receive_buffer),
            ("transport.socket_send_buffer", t.socket_send_buffer),
        ] {
            if value > SOCKET_BUFFER_MAX {
                return fail(
                    key,
                    format!(
                        "{key} must be at most {}, got {}",
                        format_size(SOCKET_BUFFER_MAX.into()),
                        format_size(value.into())
                    ),
                );
            }
        }
        if l.reconnect_min_backoff > l.reconnect_max_backoff {
            return fail("limits.reconnect_min_backoff", format!(
                "limits.reconnect_min_backoff ({}) must not exceed limits.reconnect_max_backoff ({})",
                format_duration(l.reconnect_min_backoff),
                format_duration(l.reconnect_max_backoff)
            ));
        }
        if !(8..=32).contains(&l.ipv4_prefix) {
            let key = "limits.ipv4_prefix";
            return fail(key, format!("{key} must be 8 to 32, got {}", l.ipv4_prefix));
        }
        if !(16..=128).contains(&l.ipv6_prefix) {
            let key = "limits.ipv6_prefix";
            return fail(
                key,
                format!("{key} must be 16 to 128, got {}", l.ipv6_prefix),
            );
        }
        if quinn::IdleTimeout::try_from(t.max_idle_timeout).is_err() {
            let key = "transport.max_idle_timeout";
            return fail(key, format!("{key} is too long"));
        }
        if let Some(keep_alive) = t.keep_alive_interval {
            if keep_alive.is_zero() || keep_alive >= t.max_idle_timeout {
                return fail("transport.keep_alive_interval", format!(
                    "transport.keep_alive_interval ({}) must be more than 0 and shorter than transport.max_idle_timeout ({})",
                    format_duration(keep_alive),
                    format_duration(t.max_idle_timeout)
                ));
            }
        }
        if !(1200..=65527).contains(&t.max_udp_payload_size) {
            return fail(
                "transport.max_udp_payload_size",
                format!(
                    "transport.max_udp_payload_size must be 1200 to 65527, got {}",
                    t.max_udp_payload_size
                ),
            );
        }
        if t.initial_mtu < 1200 || t.initial_mtu > t.max_udp_payload_size {
            return fail(
                "transport.initial_mtu",
                format!(
                "transport.initial_mtu must be 1200 to transport.max_udp_payload_size ({}), got {}",
                t.max_udp_payload_size, t.initial_mtu
            ),
            );
        }
        if t.send_window == 0 {
            let key = "transport.send_window";
            return fail(key, format!("{key} must be at least 1"));
        }
        Ok(())
    }

    /// The byte budgets in force: each peer's share, and the node's (see
    /// `limits.max_buffered_request_bytes*`).
    pub(crate) fn byte_budgets(&self) -> (usize, usize) {
        let l = &self.limits;
        // A body of `max_request_size` is read with at most one chunk more.
        let one_request = l
            .max_request_size
            .saturating_add(crate::budget::CHUNK as u64);
        let peer = l.max_buffered_request_bytes_per_peer.max(one_request);
        let node = l.max_buffered_request_bytes.max(peer);
        let max = tokio::sync::Semaphore::MAX_PERMITS as u64;
        (peer.min(max) as usize, node.min(max) as usize)
    }

    /// Whether `peer` may connect (either direction).
    pub(crate) fn admits(&self, peer: &PeerId) -> Result<(), Refusal> {
        if self.node.deny.contains(peer) {
            return Err(Refusal::DenyList);
        }
        match &self.node.allow {
            Some(allow) if !allow.contains(peer) => Err(Refusal::NotAllowed),
            _ => Ok(()),
        }
    }

    /// A new connection's budget of streams the peer may open, up to the configured limits.
    pub(crate) fn stream_budget(&self, pool: &Arc<StreamPool>) -> StreamBudget {
        let t = &self.transport;
        let (bi, uni) = (t.max_concurrent_bidi_streams, t.max_concurrent_uni_streams);
        StreamBudget::new(bi, uni, pool.clone())
    }

    /// The quinn transport settings these values map to.
    pub(crate) fn quinn_transport(&self) -> quinn::TransportConfig {
        let t = &self.transport;
        let mut transport = quinn::TransportConfig::default();
        transport
            // Advertised small at first, raised per connection as the peer uses them.
            .max_concurrent_bidi_streams(initial_limit(t.max_concurrent_bidi_streams).into())
            .max_concurrent_uni_streams(initial_limit(t.max_concurrent_uni_streams).into())
            .max_idle_timeout(quinn::IdleTimeout::try_from(t.max_idle_timeout).ok())
            .keep_alive_interval(t.keep_alive_interval)
            .initial_rtt(t.initial_rtt)
            .initial_mtu(t.initial_mtu)
            .min_mtu(1200)
            .stream_receive_window(t.stream_receive_window.into())
            .receive_window(t.receive_window.into())
            .send_window(t.send_window)
            .datagram_receive_buffer_size(match t.datagram_receive_buffer_size {
                0 => None,
                n => Some(n as usize),
            })
            .datagram_send_buffer_size(t.datagram_send_buffer_size as usize);
        if !t.mtu_discovery {
            transport.mtu_discovery_config(None);
        } else {
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(t.max_udp_payload_size);
            transport.mtu_discovery_config(Some(mtu));
        }
        match t.congestion_controller {
            CongestionController::Cubic => transport
                .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            CongestionController::NewReno => transport.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            CongestionController::Bbr => transport
                .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
        };
        transport
    }

    /// The quinn endpoint settings these values map to.
    pub(crate) fn quinn_endpoint(&self) -> quinn::EndpointConfig {
        let mut endpoint = quinn::EndpointConfig::default();
        // Validated to be in range; the setter only rejects values outside 1200..=65527.
        let _ = endpoint.max_udp_payload_size(self.transport.max_udp_payload_size);
        endpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn socket_buffers_are_at_most_a_gibibyte() {
        let mut config = Config::default();
        config.transport.socket_receive_buffer = 1 << 30;
        assert_eq!(config.validate(), Ok(()));
        config.transport.socket_receive_buffer = (1 << 30) + 1;
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("transport.socket_receive_buffer must be at most 1024MiB"),
            "{error}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let mut config = Config::default();
        config.transport.keep_alive_interval = Some(Duration::from_secs(40));
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "transport.keep_alive_interval");
        assert!(
            err.to_string().contains("transport.keep_alive_interval"),
            "{err}"
        );

        let mut config = Config::default();
        config.limits.max_connections = 0;
        assert_eq!(config.validate().unwrap_err().key, "limits.max_connections");
    }
}
