//! An impaired network link for tests, benchmarks and users: a UDP relay between one
//! client and one server that loses (randomly or in bursts), delays, jitters, reorders,
//! duplicates and rate-limits packets, with a seed so a run can be repeated, a
//! blackhole switch (partition), and a NAT-rebinding trigger (a new source port toward
//! the server).
//!
//! ```no_run
//! # async fn run(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use rustorium_p2p_link::{Link, LinkConfig};
//! let mut config = LinkConfig::default();
//! config.loss = 0.05;
//! config.delay = Duration::from_millis(10);
//! let link = Link::start("127.0.0.1:0".parse().unwrap(), server, config).await?;
//! // Dial `link.local_addr()` instead of `server`: every packet crosses the link.
//! link.set_blackhole(true); // partition
//! # Ok(()) }
//! ```
//!
//! The same relay runs as `rustorium-p2p link --listen ADDR --to ADDR [--loss 5%] ...`.

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the link treats packets (the same in both directions, each direction with its own
/// random sequence derived from `seed`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LinkConfig {
    /// Fraction of packets lost, 0.0 to 1.0 (below 1).
    pub loss: f64,
    /// Mean length of a loss burst in packets (1: independent losses).
    pub burst: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly by up to this much either way (packets keep
    /// their order: a packet is never delivered before one sent earlier).
    pub jitter: Duration,
    /// Fraction of packets held back (by one more `delay`, at least 1 ms) so that later
    /// ones overtake them.
    pub reorder: f64,
    /// Fraction of packets delivered twice.
    pub duplicate: f64,
    /// Bandwidth cap in bits per second (`None`: no cap).
    pub rate: Option<u64>,
    /// With a rate cap, the queue in front of it in bytes; packets that find it full are
    /// dropped (tail drop).
    pub queue: usize,
    /// Seed of the random choices.
    pub seed: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            loss: 0.0,
            burst: 1.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            duplicate: 0.0,
            rate: None,
            queue: 1 << 20,
            seed: 1,
        }
    }
}

impl LinkConfig {
    fn validate(&self) -> std::io::Result<()> {
        let bad = |msg: String| Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
        for (name, value) in [
            ("loss", self.loss),
            ("reorder", self.reorder),
            ("duplicate", self.duplicate),
        ] {
            if !(0.0..1.0).contains(&value) {
                return bad(format!(
                    "{name} must be at least 0 and below 1, got {value}"
                ));
            }
        }
        if self.burst < 1.0 || !self.burst.is_finite() {
            return bad(format!(
                "burst must be at least 1 packet, got {}",
                self.burst
            ));
        }
        if self.rate == Some(0) {
            return bad("rate must be more than 0 bits per second".into());
        }
        Ok(())
    }
}

/// Counts of what the link did, both directions together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Packets delivered (duplicates included).
    pub delivered: u64,
    /// Packets dropped (loss, blackhole, full queue).
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Packets held back to be overtaken.
    pub reordered: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

struct Shared {
    blackhole: AtomicBool,
    counters: Counters,
    /// The last address the client sent from.
    client: Mutex<Option<SocketAddr>>,
}

/// A running link. Dropping it stops the relay.
pub struct Link {
    listen: SocketAddr,
    shared: Arc<Shared>,
    upstream: watch::Sender<Arc<UdpSocket>>,
    upstream_bind: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Link {
    /// Starts a link that listens on `listen` for the client and forwards to `to`.
    pub async fn start(
        listen: SocketAddr,
        to: SocketAddr,
        config: LinkConfig,
    ) -> std::io::Result<Link> {
        config.validate()?;
        let client_side = Arc::new(UdpSocket::bind(listen).await?);
        let listen = client_side.local_addr()?;
        let upstream_bind = SocketAddr::new(listen.ip(), 0);
        let (upstream, upstream_rx) =
            watch::channel(Arc::new(UdpSocket::bind(upstream_bind).await?));
        let shared = Arc::new(Shared {
            blackhole: AtomicBool::new(false),
            counters: Counters::default(),
            client: Mutex::new(None),
        });
        let (to_server, server_queue) = mpsc::unbounded_channel();
        let (to_client, client_queue) = mpsc::unbounded_channel();
        let tasks = vec![
            // client -> link -> server
            tokio::spawn(receive_from_client(
                client_side.clone(),
                shared.clone(),
                Impairment::new(&config, config.seed ^ 0x5eed_0001),
                to_server,
            )),
            tokio::spawn(deliver(
                server_queue,
                Target::Server(upstream_rx.clone(), to),
            )),
            // server -> link -> client
            tokio::spawn(receive_from_server(
                upstream_rx,
                shared.clone(),
                Impairment::new(&config, config.seed ^ 0x5eed_0002),
                to_client,
            )),
            tokio::spawn(deliver(
                client_queue,
                Target::Client(client_side, shared.clone()),
            )),
        ];
        Ok(Link {
            listen,
            shared,
            upstream,
            upstream_bind,
            tasks,
        })
    }

    /// Where clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Drops every packet in both directions while on (a partition).
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Simulates a NAT rebinding: from now on the link sends to the server from a new
    /// UDP port. Returns the new source address.
    pub async fn rebind_upstream(&self) -> std::io::Result<SocketAddr> {
        let socket = Arc::new(UdpSocket::bind(self.upstream_bind).await?);
        let addr = socket.local_addr()?;
        self.upstream.send_replace(socket);
        Ok(addr)
    }

    /// What the link has done so far.
    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinkStats {
            delivered: get(&c.delivered),
            dropped: get(&c.dropped),
            duplicated: get(&c.duplicated),
            reordered: get(&c.reordered),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A packet due at `at` (ordered so the earliest comes first out of a max-heap).
struct Due {
    at: Instant,
    seq: u64,
    bytes: Vec<u8>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

enum Target {
    Server(watch::Receiver<Arc<UdpSocket>>, SocketAddr),
    Client(Arc<UdpSocket>, Arc<Shared>),
}

/// Sends each queued packet when it is due.
async fn deliver(mut queue: mpsc::UnboundedReceiver<Due>, target: Target) {
    let mut heap: BinaryHeap<Due> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|d| d.at);
        tokio::select! {
            incoming = queue.recv() => match incoming {
                Some(due) => heap.push(due),
                None => return,
            },
            _ = sleep_until(next), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|d| d.at <= now) {
                    let Some(due) = heap.pop() else { break };
                    // A send error (buffer full, peer gone) is a lost packet, as on a wire.
                    let _ = match &target {
                        Target::Server(socket, to) => {
                            let socket = socket.borrow().clone();
                            socket.send_to(&due.bytes, *to).await
                        }
                        Target::Client(socket, shared) => {
                            let client = *shared.client.lock().unwrap_or_else(|e| e.into_inner());
                            match client {
                                Some(client) => socket.send_to(&due.bytes, client).await,
                                None => Ok(0),
                            }
                        }
                    };
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

async fn receive_from_client(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    mut impairment: Impairment,
    queue: mpsc::UnboundedSender<Due>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        *shared.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
        impairment.pass(&buf[..len], &shared, &queue);
    }
}

async fn receive_from_server(
    mut upstream: watch::Receiver<Arc<UdpSocket>>,
    shared: Arc<Shared>,
    mut impairment: Impairment,
    queue: mpsc::UnboundedSender<Due>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let socket = upstream.borrow_and_update().clone();
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                if let Ok((len, _)) = received {
                    impairment.pass(&buf[..len], &shared, &queue);
                }
            }
            changed = upstream.changed() => if changed.is_err() { return },
        }
    }
}

/// One direction's impairments and random sequence.
struct Impairment {
    rng: SplitMix64,
    loss: f64,
    p_enter: f64,
    p_exit: f64,
    in_burst: bool,
    delay: Duration,
    jitter: Duration,
    reorder: f64,
    duplicate: f64,
    rate: Option<u64>,
    queue: usize,
    next_free: Instant,
    /// When the last packet not chosen for reordering is due.
    last_at: Instant,
    seq: u64,
}

impl Impairment {
    fn new(config: &LinkConfig, seed: u64) -> Self {
        // Gilbert model: the stationary loss is `loss`, the mean burst `burst` packets.
        let p_exit = 1.0 / config.burst;
        let p_enter = if config.loss > 0.0 {
            config.loss * p_exit / (1.0 - config.loss)
        } else {
            0.0
        };
        Impairment {
            rng: SplitMix64(seed),
            loss: config.loss,
            p_enter: p_enter.min(1.0),
            p_exit,
            in_burst: false,
            delay: config.delay,
            jitter: config.jitter,
            reorder: config.reorder,
            duplicate: config.duplicate,
            rate: config.rate,
            queue: config.queue,
            next_free: Instant::now(),
            last_at: Instant::now(),
            seq: 0,
        }
    }

    fn lost(&mut self) -> bool {
        if self.loss == 0.0 {
            return false;
        }
        let r = self.rng.next_f64();
        if self.in_burst {
            if r < self.p_exit {
                self.in_burst = false;
            }
        } else if r < self.p_enter {
            self.in_burst = true;
        }
        self.in_burst
    }

    fn pass(&mut self, bytes: &[u8], shared: &Shared, queue: &mpsc::UnboundedSender<Due>) {
        let c = &shared.counters;
        if shared.blackhole.load(Ordering::Relaxed) || self.lost() {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut depart = now;
        if let Some(rate) = self.rate {
            depart = self.next_free.max(now);
            let backlog = depart.saturating_duration_since(now).as_secs_f64() * rate as f64 / 8.0;
            if backlog as usize + bytes.len() > self.queue {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.next_free =
                depart + Duration::from_secs_f64(bytes.len() as f64 * 8.0 / rate as f64);
        }
        let mut at = depart + self.delay;
        if !self.jitter.is_zero() {
            let swing = self.jitter.mul_f64(self.rng.next_f64() * 2.0);
            at = (at + swing)
                .checked_sub(self.jitter)
                .unwrap_or(depart)
                .max(depart);
            // Jitter varies the delay but keeps the order, as on one path through a
            // queue; reordering is its own setting.
            at = at.max(self.last_at);
        }
        self.last_at = self.last_at.max(at);
        if self.reorder > 0.0 && self.rng.next_f64() < self.reorder {
            at += self.delay.max(Duration::from_millis(1));
            c.reordered.fetch_add(1, Ordering::Relaxed);
        }
        let copies = if self.duplicate > 0.0 && self.rng.next_f64() < self.duplicate {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for copy in 0..copies {
            self.seq += 1;
            c.delivered.fetch_add(1, Ordering::Relaxed);
            let due = Due {
                at: at + Duration::from_micros(copy * 200),
                seq: self.seq,
                bytes: bytes.to_vec(),
            };
            let _ = queue.send(due);
        }
    }
}

/// A small seeded generator (SplitMix64): fast, and the same sequence for the same seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Parses a percentage, `"5%"` or `"0.5%"`, into a fraction (0.05, 0.005). The `%` is
/// required: a bare `0.5` could mean half or half a percent.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let Some(number) = text.strip_suffix('%') else {
        return Err(format!(
            "{text:?} needs a % sign: \"{text}%\" is {text} percent (\"5%\", \"0.5%\")"
        ));
    };
    let percent = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a percentage like \"5%\""))?;
    if (0.0..100.0).contains(&percent) {
        Ok(percent / 100.0)
    } else {
        Err(format!("{text:?} must be at least 0% and below 100%"))
    }
}

/// Parses a rate: `"100Mbit"`, `"1.5Gbit"`, `"800kbit"`, `"64000bit"` (bits per second).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "bit" | "bps" | "" => 1e0,
        "kbit" | "kbps" => 1e3,
        "mbit" | "mbps" => 1e6,
        "gbit" | "gbps" => 1e9,
        other => {
            return Err(format!(
                "unknown rate unit {other:?} (use bit, kbit, Mbit or Gbit)"
            ))
        }
    };
    let bits = value * scale;
    if bits < 1.0 {
        return Err(format!("{text:?} is below 1 bit per second"));
    }
    Ok(bits as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let config = LinkConfig {
            loss: 0.1,
            burst: 3.0,
            ..LinkConfig::default()
        };
        let run = |seed| {
            let mut imp = Impairment::new(&config, seed);
            (0..1000).map(|_| imp.lost()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn loss_rate_and_burst_length_match_the_config() {
        for (loss, burst) in [(0.01, 1.0), (0.05, 1.0), (0.10, 4.0)] {
            let config = LinkConfig {
                loss,
                burst,
                ..LinkConfig::default()
            };
            let mut imp = Impairment::new(&config, 42);
            let n = 200_000;
            let fates: Vec<bool> = (0..n).map(|_| imp.lost()).collect();
            let lost = fates.iter().filter(|l| **l).count() as f64 / n as f64;
            assert!((lost - loss).abs() < loss * 0.15, "loss {lost} for {loss}");
            let bursts = fates.windows(2).filter(|w| !w[0] && w[1]).count().max(1);
            let mean = fates.iter().filter(|l| **l).count() as f64 / bursts as f64;
            assert!(
                (mean - burst).abs() < burst * 0.2 + 0.1,
                "burst {mean} for {burst}"
            );
        }
    }

    #[test]
    fn fractions_and_rates_parse() {
        assert_eq!(parse_percent("5%"), Ok(0.05));
        assert_eq!(parse_percent("0.5%"), Ok(0.005));
        assert!(parse_percent("0.25")
            .unwrap_err()
            .contains("needs a % sign"));
        assert!(parse_percent("100%").is_err());
        assert!(parse_percent("lots%").is_err());
        assert_eq!(parse_rate("100Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
        assert!(parse_rate("3 parsecs").is_err());
    }
}
