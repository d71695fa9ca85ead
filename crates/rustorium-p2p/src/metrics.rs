//! What a node measures about itself: Prometheus metrics (OpenMetrics text, names
//! prefixed `rustorium_p2p_`), the [`NodeStats`] snapshot, and the per-connection
//! sampler that turns quinn's `ConnectionStats` into RTT, bandwidth and loss figures.
//!
//! Labels stay bounded: directions, kinds, reasons and statuses are fixed sets; routes
//! are the node's registered routes (a request for any other route is counted as
//! `unknown`), or, for requests this node sends, the routes its application uses. No
//! label carries a PeerId or an address.

#[cfg(feature = "metrics")]
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
#[cfg(feature = "metrics")]
use std::sync::RwLock;
use std::time::{Duration, Instant};

#[cfg(feature = "metrics")]
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

#[cfg(not(feature = "metrics"))]
use off::{Counter, Gauge, Histogram};

use crate::event::Direction;

/// How often each connection's statistics are sampled.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Enums whose variants are label values: `as_str` gives the value, `ALL` every variant
/// in index order (`as usize`).
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub(crate) enum $name { $($(#[$vdoc])* $variant,)+ }

        impl $name {
            #[allow(dead_code)]
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant,)+];

            #[allow(dead_code)]
            pub(crate) fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        #[cfg(feature = "metrics")]
        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_enum!(
    /// What a stream carries.
    StreamKind { Request = "request", OneWay = "one_way", }
);

label_enum!(
    /// Which end of a request a measurement is from.
    Side {
        /// This node answered it.
        Server = "server",
        /// This node sent it.
        Client = "client",
    }
);

label_enum!(
    /// Why a connection failed, for `connection_errors_total`.
    ConnectionFailure {
        HandshakeFailed = "handshake_failed",
        PeerIdMismatch = "peer_id_mismatch",
        Refused = "refused",
        TimedOut = "timed_out",
        Lost = "lost",
    }
);

label_enum!(
    /// How a request or message ended: `ok`, or the reason counted in
    /// `stream_errors_total`.
    Outcome {
        Ok = "ok",
        TooLarge = "too_large",
        UnknownRoute = "unknown_route",
        BadRequest = "bad_request",
        Busy = "busy",
        TimedOut = "timed_out",
        Cancelled = "cancelled",
        HandlerError = "handler_error",
        StreamError = "stream_error",
        ConnectionLost = "connection_lost",
        ProtocolError = "protocol_error",
        ConnectFailed = "connect_failed",
    }
);

label_enum!(
    /// What became of a 0-RTT dial.
    ZeroRtt { Attempted = "attempted", Accepted = "accepted", Rejected = "rejected", }
);

label_enum!(
    /// Who dialed a connection (the label form of [`Direction`]).
    DirectionLabel { Inbound = "inbound", Outbound = "outbound", }
);

label_enum!(
    /// Which of the UDP socket's buffers.
    BufferLabel { Receive = "receive", Send = "send", }
);

impl From<Direction> for DirectionLabel {
    fn from(direction: Direction) -> Self {
        match direction {
            Direction::Inbound => DirectionLabel::Inbound,
            Direction::Outbound => DirectionLabel::Outbound,
        }
    }
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: DirectionLabel,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BufferLabels {
    buffer: BufferLabel,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: ConnectionFailure,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamErrorLabels {
    reason: Outcome,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    kind: StreamKind,
    direction: DirectionLabel,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: Outcome,
    side: Side,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    side: Side,
}

#[cfg(feature = "metrics")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: ZeroRtt,
}

type FloatGauge = Gauge<f64, AtomicU64>;

#[cfg(feature = "metrics")]
fn duration_histogram() -> Histogram {
    // 25 µs to about 26 s.
    Histogram::new(exponential_buckets(25e-6, 2.0, 21))
}

/// Stand-ins with the same methods when the `metrics` feature is off: counters still
/// count (for [`NodeStats`]); gauges and histograms do nothing.
#[cfg(not(feature = "metrics"))]
mod off {
    use std::marker::PhantomData;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default, Debug)]
    pub struct Counter(Arc<AtomicU64>);

    impl Counter {
        pub fn inc(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        pub fn inc_by(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        pub fn get(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[derive(Debug)]
    pub struct Gauge<N = i64, A = ()>(PhantomData<(N, A)>);

    impl<N, A> Default for Gauge<N, A> {
        fn default() -> Self {
            Gauge(PhantomData)
        }
    }

    impl<N, A> Gauge<N, A> {
        pub fn inc(&self) {}
        pub fn dec(&self) {}
        pub fn inc_by(&self, _: N) {}
        pub fn set(&self, _: N) {}
    }

    #[derive(Default, Debug)]
    pub struct Histogram;

    impl Histogram {
        pub fn observe(&self, _: f64) {}
    }
}

/// Every metric of a node. Labelled counters with a fixed label set are kept as arrays of
/// handles indexed by the label enum, resolved once, so that counting takes no lookup.
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    registry: Registry,
    /// By [`DirectionLabel`].
    connections_opened: [Counter; 2],
    connections_active: Gauge,
    /// By [`ConnectionFailure`].
    connection_errors: [Counter; 5],
    /// By [`StreamKind`], then [`DirectionLabel`].
    streams_opened: [[Counter; 2]; 2],
    streams_active: Gauge,
    /// By [`Outcome`] (the `ok` slot is unused).
    stream_errors: [Counter; 12],
    /// By [`ZeroRtt`].
    zero_rtt: [Counter; 3],
    #[cfg(feature = "metrics")]
    requests: Family<RequestLabels, Counter>,
    #[cfg(feature = "metrics")]
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Per [`Side`] and route, the `ok` request counter and the duration histogram,
    /// resolved once: the path every successful request takes, without hashing a label
    /// set or allocating one.
    #[cfg(feature = "metrics")]
    routes: [RwLock<HashMap<Box<str>, RouteHandles>>; 2],
    rtt: Histogram,
    bandwidth_sent: FloatGauge,
    bandwidth_received: FloatGauge,
    bytes_sent: Counter,
    bytes_received: Counter,
    packets_sent: Counter,
    packets_lost: Counter,
    packet_loss_ratio: FloatGauge,
    migrations: Counter,
    rebinds: Counter,
    duplicates_closed: Counter,
    reconnects: Counter,
    retries: Counter,
    answers_abandoned: Counter,
    /// The UDP socket's receive and send buffers, as the kernel granted them.
    socket_buffers: [Gauge; 2],
}

/// The metrics a successful request on one route and side updates.
#[cfg(feature = "metrics")]
struct RouteHandles {
    ok: Counter,
    duration: Histogram,
}

/// A served route's metric handles, resolved on its first answered request and kept with
/// the route ([`Route`](crate::handler::Route)): counting then takes no lookup.
#[derive(Default)]
pub(crate) struct RouteCache {
    #[cfg(feature = "metrics")]
    handles: std::sync::OnceLock<RouteHandles>,
}

/// At most this many routes get resolved handles; any others take the slower path.
#[cfg(feature = "metrics")]
const MAX_CACHED_ROUTES: usize = 1024;

impl Default for Metrics {
    fn default() -> Self {
        #[cfg(feature = "metrics")]
        let rtt = Histogram::new(exponential_buckets(25e-6, 2.0, 18));
        #[cfg(not(feature = "metrics"))]
        let rtt = Histogram;
        #[allow(unused_mut)]
        let mut m = Metrics {
            #[cfg(feature = "metrics")]
            registry: Registry::with_prefix("rustorium_p2p"),
            connections_opened: Default::default(),
            connections_active: Gauge::default(),
            connection_errors: Default::default(),
            streams_opened: Default::default(),
            streams_active: Gauge::default(),
            stream_errors: Default::default(),
            zero_rtt: Default::default(),
            #[cfg(feature = "metrics")]
            requests: Family::default(),
            #[cfg(feature = "metrics")]
            request_duration: Family::new_with_constructor(duration_histogram),
            #[cfg(feature = "metrics")]
            routes: Default::default(),
            rtt,
            bandwidth_sent: FloatGauge::default(),
            bandwidth_received: FloatGauge::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            packets_sent: Counter::default(),
            packets_lost: Counter::default(),
            packet_loss_ratio: FloatGauge::default(),
            migrations: Counter::default(),
            rebinds: Counter::default(),
            duplicates_closed: Counter::default(),
            reconnects: Counter::default(),
            retries: Counter::default(),
            answers_abandoned: Counter::default(),
            socket_buffers: Default::default(),
        };
        #[cfg(feature = "metrics")]
        m.register();
        m
    }
}

#[cfg(feature = "metrics")]
impl Metrics {
    /// Registers every metric, each labelled family with all its fixed label values (so
    /// they show from the start, at 0) and their handles kept in the arrays.
    fn register(&mut self) {
        let connections_opened = Family::<DirectionLabels, Counter>::default();
        let connection_errors = Family::<ReasonLabels, Counter>::default();
        let streams_opened = Family::<StreamLabels, Counter>::default();
        let stream_errors = Family::<StreamErrorLabels, Counter>::default();
        let zero_rtt = Family::<OutcomeLabels, Counter>::default();
        for &direction in DirectionLabel::ALL {
            self.connections_opened[direction as usize] = connections_opened
                .get_or_create(&DirectionLabels { direction })
                .clone();
            for &kind in StreamKind::ALL {
                let labels = StreamLabels { kind, direction };
                self.streams_opened[kind as usize][direction as usize] =
                    streams_opened.get_or_create(&labels).clone();
            }
        }
        for &reason in ConnectionFailure::ALL {
            self.connection_errors[reason as usize] = connection_errors
                .get_or_create(&ReasonLabels { reason })
                .clone();
        }
        for &reason in &Outcome::ALL[1..] {
            self.stream_errors[reason as usize] = stream_errors
                .get_or_create(&StreamErrorLabels { reason })
                .clone();
        }
        for &outcome in ZeroRtt::ALL {
            self.zero_rtt[outcome as usize] =
                zero_rtt.get_or_create(&OutcomeLabels { outcome }).clone();
        }
        let r = &mut self.registry;
        r.register(
            "connections_opened",
            "Connections established, by who dialed",
            connections_opened,
        );
        r.register(
            "connections_active",
            "Connections open now",
            self.connections_active.clone(),
        );
        r.register(
            "connection_errors",
            "Connections that failed or were refused, by reason",
            connection_errors,
        );
        r.register(
            "streams_opened",
            "Streams opened, by kind and direction",
            streams_opened,
        );
        r.register(
            "streams_active",
            "Streams in progress now",
            self.streams_active.clone(),
        );
        r.register(
            "stream_errors",
            "Streams that failed, by reason",
            stream_errors,
        );
        r.register("requests", "Requests completed, by route, status and side (server: answered here; client: sent from here)", self.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from stream open to answer, by route and side",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register_with_unit(
            "rtt",
            "Round-trip time of connections, sampled every second per connection",
            Unit::Seconds,
            self.rtt.clone(),
        );
        r.register(
            "bandwidth_sent_bytes_per_second",
            "UDP bytes sent per second, all connections, over the last sample",
            self.bandwidth_sent.clone(),
        );
        r.register(
            "bandwidth_received_bytes_per_second",
            "UDP bytes received per second, all connections, over the last sample",
            self.bandwidth_received.clone(),
        );
        r.register_with_unit(
            "sent",
            "UDP bytes sent on connections",
            Unit::Bytes,
            self.bytes_sent.clone(),
        );
        r.register_with_unit(
            "received",
            "UDP bytes received on connections",
            Unit::Bytes,
            self.bytes_received.clone(),
        );
        r.register(
            "packets_sent",
            "QUIC packets sent",
            self.packets_sent.clone(),
        );
        r.register(
            "packets_lost",
            "QUIC packets declared lost",
            self.packets_lost.clone(),
        );
        r.register(
            "packet_loss_ratio",
            "Packets lost / packets sent, since start",
            self.packet_loss_ratio.clone(),
        );
        r.register(
            "zero_rtt",
            "0-RTT dials: attempted, and accepted or rejected by the peer",
            zero_rtt,
        );
        r.register(
            "migrations",
            "Peer address changes observed on connections",
            self.migrations.clone(),
        );
        r.register(
            "rebinds",
            "Moves of this node to a new UDP socket",
            self.rebinds.clone(),
        );
        r.register(
            "duplicates_closed",
            "Duplicate connections from simultaneous dials retired",
            self.duplicates_closed.clone(),
        );
        r.register(
            "reconnects",
            "Redials of known peers after their connection dropped",
            self.reconnects.clone(),
        );
        r.register(
            "retries",
            "Incoming handshakes asked to prove their address with a QUIC Retry",
            self.retries.clone(),
        );
        r.register(
            "answers_abandoned",
            "Answers reset because the peer did not read them (answer_timeout, or too many pending)",
            self.answers_abandoned.clone(),
        );
        let socket_buffers = Family::<BufferLabels, Gauge>::default();
        for &buffer in BufferLabel::ALL {
            self.socket_buffers[buffer as usize] = socket_buffers
                .get_or_create(&BufferLabels { buffer })
                .clone();
        }
        r.register_with_unit(
            "socket_buffer",
            "The UDP socket's buffers as the kernel granted them (less than configured when capped by net.core.rmem_max or wmem_max)",
            Unit::Bytes,
            socket_buffers,
        );
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a request by route, status and side, and its duration.
    fn record_request(
        &self,
        side: Side,
        route: &str,
        cache: Option<&RouteCache>,
        status: Outcome,
        took: Duration,
    ) {
        if status == Outcome::Ok {
            let record = |handles: &RouteHandles| {
                handles.ok.inc();
                handles.duration.observe(took.as_secs_f64());
            };
            if let Some(cache) = cache {
                record(cache.handles.get_or_init(|| self.resolve(side, route)));
                return;
            }
            if self.with_route_handles(side, route, record) {
                return;
            }
        }
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
        let handles = self.resolve(side, route);
        record(&handles);
        routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route.into(), handles);
        true
    }
}

#[cfg(feature = "metrics")]
impl Metrics {
    /// The handles of `route`'s `ok` counter and duration histogram on `side`.
    fn resolve(&self, side: Side, route: &str) -> RouteHandles {
        let labels = RequestLabels {
            route: route.to_string(),
            status: Outcome::Ok,
            side,
        };
        let ok = self.requests.get_or_create(&labels).clone();
        let route_labels = RouteLabels {
            route: labels.route,
            side,
        };
        let duration = self.request_duration.get_or_create(&route_labels).clone();
        RouteHandles { ok, duration }
    }
}

#[cfg(not(feature = "metrics"))]
impl Metrics {
    /// Without the `metrics` feature there is nothing to expose.
    pub fn encode(&self) -> String {
        String::new()
    }

    fn record_request(
        &self,
        _side: Side,
        _route: &str,
        _cache: Option<&RouteCache>,
        _status: Outcome,
        _took: Duration,
    ) {
    }
}

impl Metrics {
    pub fn connection_opened(&self, direction: Direction) {
        self.connections_opened[DirectionLabel::from(direction) as usize].inc();
        self.connections_active.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    pub fn connection_failed(&self, failure: ConnectionFailure) {
        self.connection_errors[failure as usize].inc();
    }

    /// Counts a stream as opened and active until the guard drops.
    pub fn stream_opened(&self, kind: StreamKind, direction: Direction) -> ActiveStream<'_> {
        self.streams_opened[kind as usize][DirectionLabel::from(direction) as usize].inc();
        self.streams_active.inc();
        ActiveStream(&self.streams_active)
    }

    /// Counts a stream as opened and active until [`stream_closed`](Self::stream_closed).
    pub fn stream_opened_owned(&self, kind: StreamKind, direction: Direction) {
        self.streams_opened[kind as usize][DirectionLabel::from(direction) as usize].inc();
        self.streams_active.inc();
    }

    /// A stream counted by [`stream_opened_owned`](Self::stream_opened_owned) ended.
    pub fn stream_closed(&self) {
        self.streams_active.dec();
    }

    /// Records a finished request (and, unless it ended `ok`, a stream error).
    pub fn request_done(&self, side: Side, route: &str, status: Outcome, took: Duration) {
        self.request_done_with(side, route, None, status, took);
    }

    /// As [`Metrics::request_done`], with the route's own handles if it has them.
    pub fn request_done_with(
        &self,
        side: Side,
        route: &str,
        cache: Option<&RouteCache>,
        status: Outcome,
        took: Duration,
    ) {
        if status != Outcome::Ok {
            self.stream_errors[status as usize].inc();
        }
        self.record_request(side, route, cache, status, took);
    }

    pub fn zero_rtt(&self, outcome: ZeroRtt) {
        self.zero_rtt[outcome as usize].inc();
    }

    pub fn migrated(&self) {
        self.migrations.inc();
    }

    /// Records the buffers the node's UDP socket got.
    pub fn socket_buffers(&self, buffers: crate::socket::Buffers) {
        let as_gauge = |bytes: usize| i64::try_from(bytes).unwrap_or(i64::MAX);
        self.socket_buffers[BufferLabel::Receive as usize].set(as_gauge(buffers.receive));
        self.socket_buffers[BufferLabel::Send as usize].set(as_gauge(buffers.send));
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

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn answer_abandoned(&self) {
        self.answers_abandoned.inc();
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self, connections: usize) -> NodeStats {
        let zero_rtt = |outcome: ZeroRtt| self.zero_rtt[outcome as usize].get();
        NodeStats {
            connections,
            connections_refused: self.connection_errors[ConnectionFailure::Refused as usize].get(),
            zero_rtt_attempted: zero_rtt(ZeroRtt::Attempted),
            zero_rtt_accepted: zero_rtt(ZeroRtt::Accepted),
            zero_rtt_rejected: zero_rtt(ZeroRtt::Rejected),
            duplicates_closed: self.duplicates_closed.get(),
            reconnects: self.reconnects.get(),
            retries: self.retries.get(),
            answers_abandoned: self.answers_abandoned.get(),
            // Filled in by `Node::stats`, which holds the byte budget.
            buffered_request_bytes: 0,
            rebinds: self.rebinds.get(),
            migrations: self.migrations.get(),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
            packets_sent: self.packets_sent.get(),
            packets_lost: self.packets_lost.get(),
        }
    }

    /// Starts watching a connection just announced: its handshake's RTT goes into the
    /// histogram, and the reading is the base of the next [`sample`](Metrics::sample).
    pub fn watch(&self, conn: &quinn::Connection) -> Watched {
        let last = Sample::take(conn);
        self.rtt.observe(last.rtt.as_secs_f64());
        Watched {
            last,
            addr: conn.remote_address(),
            rates: (0.0, 0.0),
        }
    }

    /// Reads a watched connection (the node's sampler does, every [`SAMPLE_INTERVAL`],
    /// and its task once more when it closes, `closed`): byte and packet deltas into the
    /// totals, rates into the bandwidth gauges, RTT into the histogram and an address
    /// change into `migrations`.
    ///
    /// A reading less than half an interval after the last (the first after a connection
    /// is announced can be) is skipped unless it is the last: a rate over a sliver of time
    /// would say little and hold for a second.
    pub fn sample(&self, conn: &quinn::Connection, watched: &mut Watched, closed: bool) {
        let now = Sample::take(conn);
        let last = &watched.last;
        let elapsed = now.at.duration_since(last.at);
        if !closed && elapsed < SAMPLE_INTERVAL / 2 {
            return;
        }
        let secs = elapsed.as_secs_f64().max(1e-3);
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
        // Keep the gauges the sum of every connection's latest rate, in whole bytes per
        // second: sums of whole numbers are exact in an f64 (up to 2^53), so a closed
        // connection's share leaves the gauge exactly, with no rounding left behind.
        let (tx_rate, rx_rate) = watched.rates;
        let (new_tx, new_rx) = if closed {
            (0.0, 0.0)
        } else {
            (
                (sent as f64 / secs).round(),
                (received as f64 / secs).round(),
            )
        };
        self.bandwidth_sent.inc_by(new_tx - tx_rate);
        self.bandwidth_received.inc_by(new_rx - rx_rate);
        watched.rates = (new_tx, new_rx);
        if closed {
            return;
        }
        self.rtt.observe(now.rtt.as_secs_f64());
        let current = conn.remote_address();
        if current != watched.addr {
            self.migrated();
            watched.addr = current;
        }
        watched.last = now;
    }
}

/// What the node's sampler last read of one connection.
pub(crate) struct Watched {
    last: Sample,
    addr: std::net::SocketAddr,
    /// Its share of the bandwidth gauges (sent, received), whole bytes per second.
    rates: (f64, f64),
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
    /// Successful redials of known peers after their connection dropped. Counted by the
    /// peer's reconnecting task when it sees the new handshake complete, so it may trail
    /// the [`PeerEvent::Connected`](crate::PeerEvent::Connected) of that connection by a
    /// moment.
    pub reconnects: u64,
    /// Incoming handshakes asked to prove their address with a QUIC Retry (see
    /// `limits.retry_threshold`).
    pub retries: u64,
    /// Answers reset because the peer did not read them in time, or had too many
    /// unread (see `limits.answer_timeout`).
    pub answers_abandoned: u64,
    /// Request bytes held in memory now (at most `limits.max_buffered_request_bytes`).
    pub buffered_request_bytes: u64,
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
