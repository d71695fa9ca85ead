//! What a node measures about itself: Prometheus metrics (OpenMetrics text, names
//! prefixed `rustorium_p2p_`), the [`NodeStats`] snapshot, and the per-connection
//! sampler that turns quinn's `ConnectionStats` into RTT, bandwidth and loss figures.
//!
//! Labels stay bounded: directions, kinds, reasons and statuses are fixed sets; routes
//! are the node's registered routes (a request for any other route is counted as
//! `unknown`), or, for requests this node sends, the routes its application uses. No
//! label carries a PeerId or an address.

pub(crate) mod http;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::peers::ConnectionDirection;

/// How often each connection's statistics are sampled.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

fn direction_label(d: ConnectionDirection) -> &'static str {
    match d {
        ConnectionDirection::Inbound => "inbound",
        ConnectionDirection::Outbound => "outbound",
    }
}

fn direction_index(d: ConnectionDirection) -> usize {
    match d {
        ConnectionDirection::Inbound => 0,
        ConnectionDirection::Outbound => 1,
    }
}

/// What a stream carries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum StreamKind {
    Request = 0,
    OneWay = 1,
}

impl StreamKind {
    fn label(self) -> &'static str {
        match self {
            StreamKind::Request => "request",
            StreamKind::OneWay => "one_way",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    kind: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: &'static str,
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Which end of a request a measurement is from.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    /// This node answered it.
    Server = 0,
    /// This node sent it.
    Client = 1,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn duration_histogram() -> Histogram {
    // 25 µs to about 26 s.
    Histogram::new(exponential_buckets(25e-6, 2.0, 21))
}

/// Every metric of a node.
pub(crate) struct Metrics {
    registry: Registry,
    connections_opened: Family<DirectionLabels, Counter>,
    connections_active: Gauge,
    connection_errors: Family<ReasonLabels, Counter>,
    streams_opened: Family<StreamLabels, Counter>,
    streams_active: Gauge,
    stream_errors: Family<ReasonLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    rtt: Histogram,
    bandwidth_sent: FloatGauge,
    bandwidth_received: FloatGauge,
    bytes_sent: Counter,
    bytes_received: Counter,
    packets_sent: Counter,
    packets_lost: Counter,
    packet_loss_ratio: FloatGauge,
    zero_rtt: Family<OutcomeLabels, Counter>,
    migrations: Counter,
    rebinds: Counter,
    duplicates_closed: Counter,
    reconnects: Counter,
    /// The four `streams_opened` counters, resolved once (kind × direction).
    stream_counters: [[Counter; 2]; 2],
    /// Per side (indexed by [`Side`]) and route, the `ok` request counter and the duration
    /// histogram, resolved once: the path every successful request takes, without hashing
    /// a label set or allocating one.
    routes: [RwLock<HashMap<Box<str>, RouteHandles>>; 2],
}

/// The metrics a successful request on one route and side updates.
struct RouteHandles {
    ok: Counter,
    duration: Histogram,
}

/// At most this many routes get resolved handles; any others take the slower path.
const MAX_CACHED_ROUTES: usize = 1024;

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("rustorium_p2p"),
            connections_opened: Family::default(),
            connections_active: Gauge::default(),
            connection_errors: Family::default(),
            streams_opened: Family::default(),
            streams_active: Gauge::default(),
            stream_errors: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            rtt: Histogram::new(exponential_buckets(25e-6, 2.0, 18)),
            bandwidth_sent: FloatGauge::default(),
            bandwidth_received: FloatGauge::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            packets_sent: Counter::default(),
            packets_lost: Counter::default(),
            packet_loss_ratio: FloatGauge::default(),
            zero_rtt: Family::default(),
            migrations: Counter::default(),
            rebinds: Counter::default(),
            duplicates_closed: Counter::default(),
            reconnects: Counter::default(),
            stream_counters: Default::default(),
            routes: Default::default(),
        };
        for kind in [StreamKind::Request, StreamKind::OneWay] {
            for direction in [ConnectionDirection::Inbound, ConnectionDirection::Outbound] {
                let labels = StreamLabels {
                    kind: kind.label(),
                    direction: direction_label(direction),
                };
                m.stream_counters[kind as usize][direction_index(direction)] =
                    m.streams_opened.get_or_create(&labels).clone();
            }
        }
        let r = &mut m.registry;
        r.register(
            "connections_opened",
            "Connections established, by who dialed",
            m.connections_opened.clone(),
        );
        r.register(
            "connections_active",
            "Connections open now",
            m.connections_active.clone(),
        );
        r.register(
            "connection_errors",
            "Connections that failed or were refused, by reason",
            m.connection_errors.clone(),
        );
        r.register(
            "streams_opened",
            "Streams opened, by kind and direction",
            m.streams_opened.clone(),
        );
        r.register(
            "streams_active",
            "Streams in progress now",
            m.streams_active.clone(),
        );
        r.register(
            "stream_errors",
            "Streams that failed, by reason",
            m.stream_errors.clone(),
        );
        r.register("requests", "Requests completed, by route, status and side (server: answered here; client: sent from here)", m.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from stream open to answer, by route and side",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register_with_unit(
            "rtt",
            "Round-trip time of connections, sampled every second per connection",
            Unit::Seconds,
            m.rtt.clone(),
        );
        r.register(
            "bandwidth_sent_bytes_per_second",
            "UDP bytes sent per second, all connections, over the last sample",
            m.bandwidth_sent.clone(),
        );
        r.register(
            "bandwidth_received_bytes_per_second",
            "UDP bytes received per second, all connections, over the last sample",
            m.bandwidth_received.clone(),
        );
        r.register_with_unit(
            "sent",
            "UDP bytes sent on connections",
            Unit::Bytes,
            m.bytes_sent.clone(),
        );
        r.register_with_unit(
            "received",
            "UDP bytes received on connections",
            Unit::Bytes,
            m.bytes_received.clone(),
        );
        r.register("packets_sent", "QUIC packets sent", m.packets_sent.clone());
        r.register(
            "packets_lost",
            "QUIC packets declared lost",
            m.packets_lost.clone(),
        );
        r.register(
            "packet_loss_ratio",
            "Packets lost / packets sent, since start",
            m.packet_loss_ratio.clone(),
        );
        r.register(
            "zero_rtt",
            "0-RTT dials: attempted, and accepted or rejected by the peer",
            m.zero_rtt.clone(),
        );
        r.register(
            "migrations",
            "Peer address changes observed on connections",
            m.migrations.clone(),
        );
        r.register(
            "rebinds",
            "Moves of this node to a new UDP socket",
            m.rebinds.clone(),
        );
        r.register(
            "duplicates_closed",
            "Duplicate connections from simultaneous dials retired",
            m.duplicates_closed.clone(),
        );
        r.register(
            "reconnects",
            "Redials of known peers after their connection dropped",
            m.reconnects.clone(),
        );
        // Every fixed label value shows up from the start, at 0.
        for direction in ["inbound", "outbound"] {
            let _ = m
                .connections_opened
                .get_or_create(&DirectionLabels { direction });
            for kind in ["request", "one_way"] {
                let _ = m
                    .streams_opened
                    .get_or_create(&StreamLabels { kind, direction });
            }
        }
        for reason in [
            "handshake_failed",
            "peer_id_mismatch",
            "refused",
            "timed_out",
            "lost",
        ] {
            let _ = m.connection_errors.get_or_create(&ReasonLabels { reason });
        }
        for reason in [
            "too_large",
            "unknown_route",
            "bad_request",
            "busy",
            "timed_out",
            "cancelled",
            "handler_error",
            "stream_error",
            "connection_lost",
            "protocol_error",
            "connect_failed",
        ] {
            let _ = m.stream_errors.get_or_create(&ReasonLabels { reason });
        }
        for outcome in ["attempted", "accepted", "rejected"] {
            let _ = m.zero_rtt.get_or_create(&OutcomeLabels { outcome });
        }
        m
    }
}

/// Why a connection failed, for `connection_errors_total`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ConnectionFailure {
    HandshakeFailed,
    PeerIdMismatch,
    Refused,
    TimedOut,
    Lost,
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn connection_opened(&self, direction: ConnectionDirection) {
        let labels = DirectionLabels {
            direction: direction_label(direction),
        };
        self.connections_opened.get_or_create(&labels).inc();
        self.connections_active.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    pub fn connection_failed(&self, failure: ConnectionFailure) {
        let reason = match failure {
            ConnectionFailure::HandshakeFailed => "handshake_failed",
            ConnectionFailure::PeerIdMismatch => "peer_id_mismatch",
            ConnectionFailure::Refused => "refused",
            ConnectionFailure::TimedOut => "timed_out",
            ConnectionFailure::Lost => "lost",
        };
        self.connection_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a stream as opened and active until the guard drops.
    pub fn stream_opened(
        &self,
        kind: StreamKind,
        direction: ConnectionDirection,
    ) -> ActiveStream<'_> {
        self.stream_counters[kind as usize][direction_index(direction)].inc();
        self.streams_active.inc();
        ActiveStream(&self.streams_active)
    }

    pub fn stream_failed(&self, reason: &'static str) {
        self.stream_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records a finished request (and, unless its status is `ok`, a stream error).
    pub fn request_done(&self, side: Side, route: &str, status: &'static str, took: Duration) {
        if status == "ok" {
            let record = |handles: &RouteHandles| {
                handles.ok.inc();
                handles.duration.observe(took.as_secs_f64());
            };
            if self.with_route_handles(side, route, record) {
                return;
            }
        } else {
            self.stream_failed(status);
        }
        let side = side.label();
        let labels = RequestLabels {
            route: route.to_string(),
            status,
            side,
        };
        self.requests.get_or_create(&labels).inc();
        let route = RouteLabels {
            route: labels.route,
            side,
        };
        self.request_duration
            .get_or_create(&route)
            .observe(took.as_secs_f64());
    }

    /// Runs `record` with the resolved handles for `route` on `side`, resolving them on
    /// first use (up to [`MAX_CACHED_ROUTES`] routes). `false` if the route has none.
    fn with_route_handles(
        &self,
        side: Side,
        route: &str,
        record: impl FnOnce(&RouteHandles),
    ) -> bool {
        let routes = &self.routes[side as usize];
        let cached = routes.read().unwrap_or_else(|e| e.into_inner());
        if let Some(handles) = cached.get(route) {
            record(handles);
            return true;
        }
        let full = cached.len() >= MAX_CACHED_ROUTES;
        drop(cached);
        if full {
            return false;
        }
        let labels = RequestLabels {
            route: route.to_string(),
            status: "ok",
            side: side.label(),
        };
        let ok = self.requests.get_or_create(&labels).clone();
        let route_labels = RouteLabels {
            route: labels.route,
            side: side.label(),
        };
        let duration = self.request_duration.get_or_create(&route_labels).clone();
        let handles = RouteHandles { ok, duration };
        record(&handles);
        routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route.into(), handles);
        true
    }

    pub fn zero_rtt(&self, outcome: &'static str) {
        self.zero_rtt
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn migrated(&self) {
        self.migrations.inc();
    }

    pub fn rebound(&self) {
        self.rebinds.inc();
    }

    pub fn duplicate_closed(&self) {
        self.duplicates_closed.inc();
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self, connections: usize) -> NodeStats {
        let errors = |reason| {
            self.connection_errors
                .get_or_create(&ReasonLabels { reason })
                .get()
        };
        let zero_rtt = |outcome| {
            self.zero_rtt
                .get_or_create(&OutcomeLabels { outcome })
                .get()
        };
        NodeStats {
            connections,
            connections_refused: errors("refused"),
            zero_rtt_attempted: zero_rtt("attempted"),
            zero_rtt_accepted: zero_rtt("accepted"),
            zero_rtt_rejected: zero_rtt("rejected"),
            duplicates_closed: self.duplicates_closed.get(),
            reconnects: self.reconnects.get(),
            rebinds: self.rebinds.get(),
            migrations: self.migrations.get(),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
            packets_sent: self.packets_sent.get(),
            packets_lost: self.packets_lost.get(),
        }
    }

    /// Samples a connection every [`SAMPLE_INTERVAL`] until it closes: RTT into the
    /// histogram, byte and packet deltas into the totals, rates into the bandwidth gauges,
    /// and address changes into `migrations`.
    pub async fn watch_connection(&self, conn: &quinn::Connection) {
        let mut last = Sample::take(conn);
        self.rtt.observe(last.rtt.as_secs_f64()); // the handshake's measurement
        let mut addr = conn.remote_address();
        let (mut tx_rate, mut rx_rate) = (0.0, 0.0);
        loop {
            let closed = tokio::select! {
                _ = tokio::time::sleep(SAMPLE_INTERVAL) => false,
                _ = conn.closed() => true,
            };
            let now = Sample::take(conn);
            let secs = now.at.duration_since(last.at).as_secs_f64().max(1e-3);
            let (sent, received) = (now.tx_bytes - last.tx_bytes, now.rx_bytes - last.rx_bytes);
            self.bytes_sent.inc_by(sent);
            self.bytes_received.inc_by(received);
            self.packets_sent.inc_by(now.tx_packets - last.tx_packets);
            self.packets_lost
                .inc_by(now.lost_packets - last.lost_packets);
            let (total_sent, total_lost) = (self.packets_sent.get(), self.packets_lost.get());
            if total_sent > 0 {
                self.packet_loss_ratio
                    .set(total_lost as f64 / total_sent as f64);
            }
            // Keep the gauges the sum of every connection's latest rate.
            let (new_tx, new_rx) = if closed {
                (0.0, 0.0)
            } else {
                (sent as f64 / secs, received as f64 / secs)
            };
            self.bandwidth_sent.inc_by(new_tx - tx_rate);
            self.bandwidth_received.inc_by(new_rx - rx_rate);
            (tx_rate, rx_rate) = (new_tx, new_rx);
            if closed {
                return;
            }
            self.rtt.observe(now.rtt.as_secs_f64());
            let current = conn.remote_address();
            if current != addr {
                self.migrated();
                addr = current;
            }
            last = now;
        }
    }
}

/// One reading of a connection's statistics.
struct Sample {
    at: Instant,
    rtt: Duration,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_packets: u64,
    lost_packets: u64,
}

impl Sample {
    fn take(conn: &quinn::Connection) -> Sample {
        let stats = conn.stats();
        Sample {
            at: Instant::now(),
            rtt: stats.path.rtt,
            tx_bytes: stats.udp_tx.bytes,
            rx_bytes: stats.udp_rx.bytes,
            tx_packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
        }
    }
}

/// Keeps `streams_active` up while alive.
pub(crate) struct ActiveStream<'a>(&'a Gauge);

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A snapshot of a node's counters ([`Node::stats`](crate::Node::stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct NodeStats {
    /// Open connections now.
    pub connections: usize,
    /// Connections refused: over a connection limit, denied, not allowed, shutting down.
    pub connections_refused: u64,
    /// Dials that sent 0-RTT data (a session ticket for the peer was at hand).
    pub zero_rtt_attempted: u64,
    /// ... of which the peer accepted the 0-RTT data.
    pub zero_rtt_accepted: u64,
    /// ... of which the peer rejected it (the requests sent in it were re-sent).
    pub zero_rtt_rejected: u64,
    /// Duplicate connections (from simultaneous dials) this node retired.
    pub duplicates_closed: u64,
    /// Successful redials of known peers after their connection dropped.
    pub reconnects: u64,
    /// Times the node moved to a new UDP socket ([`Node::rebind`](crate::Node::rebind)).
    pub rebinds: u64,
    /// Peer address changes observed on connections.
    pub migrations: u64,
    /// UDP bytes sent on connections (sampled every second, and when a connection closes).
    pub bytes_sent: u64,
    /// UDP bytes received on connections (sampled likewise).
    pub bytes_received: u64,
    /// QUIC packets sent (sampled likewise).
    pub packets_sent: u64,
    /// QUIC packets declared lost (sampled likewise).
    pub packets_lost: u64,
}
