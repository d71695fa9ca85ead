//! Servers in processes of their own, pinned to one CPU, one client pinned to another:
//! the per-core comparison.
//!
//! The baseline is raw quinn at its strongest: its server on a single-threaded runtime,
//! serving each connection's streams in the connection's task, speaking our wire protocol
//! with mutual TLS ([`raw_wire`](crate::raw_wire)). Ours is a
//! node as the CLI and a library user run it: a default multi-thread tokio runtime, the
//! node's I/O on a thread of its own. One raw quinn client, on a single-threaded runtime
//! of its own, drives both, so the two figures differ only by the server. A second row
//! each shows the weaker variants: raw quinn on the multi-thread runtime with a task per
//! stream (as quinn's examples run it), and our node with `io_thread = false`.
//!
//! Besides requests per second and latency: the server's CPU time per request and per
//! connection set-up (from `/proc/<pid>/task/*/schedstat`, in nanoseconds), and the
//! datagrams the server sent per request (what the client's connection received).
//!
//! Pinning uses `taskset` (util-linux). With fewer than two CPUs, or without `taskset`,
//! nothing is pinned and the figures say so.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::future::join_all;

use crate::raw_wire;
use crate::scenarios::{ECHO, STREAM_SINK};

/// The CPUs this process may use, counted once (before any pinning).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether pinning is possible here: two CPUs or more, and `taskset`.
pub fn can_pin() -> bool {
    cpus() >= 2 && Command::new("taskset").arg("-V").output().is_ok()
}

/// A server under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Our node, as the CLI runs it (multi-thread runtime, I/O thread on).
    Ours,
    /// Our node with `io_thread = false`.
    OursWithoutIoThread,
    /// Raw quinn on a single-threaded runtime: the baseline.
    Raw,
    /// Raw quinn on tokio's multi-thread runtime.
    RawMultiThread,
    /// TCP + TLS (tokio-rustls) on a single-threaded runtime: the bulk baseline.
    Tcp,
}

impl Variant {
    fn args(self) -> &'static [&'static str] {
        match self {
            Variant::Ours => &["--stack", "rustorium"],
            Variant::OursWithoutIoThread => &["--stack", "rustorium", "--no-io-thread"],
            Variant::Raw => &["--stack", "raw-wire", "--current-thread"],
            Variant::RawMultiThread => &["--stack", "raw-wire"],
            Variant::Tcp => &["--stack", "tcp-tls", "--current-thread"],
        }
    }
}

/// A server child, pinned to CPU 0 when possible; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts `variant`; our node with `max_udp_payload` as its `max_udp_payload_size`
    /// when given.
    fn start(variant: Variant, pin: bool, max_udp_payload: Option<u16>) -> anyhow::Result<Server> {
        let exe = std::env::current_exe()?;
        let mut command = if pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("0").arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let mut child = command
            .arg("bench-server")
            .args(variant.args())
            .args(match (variant, max_udp_payload) {
                (Variant::Ours | Variant::OursWithoutIoThread, Some(size)) => {
                    vec!["--max-udp-payload".to_string(), size.to_string()]
                }
                _ => Vec::new(),
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let line = line.trim();
        anyhow::ensure!(!line.is_empty(), "bench-server printed no address");
        // Our node prints a PeerAddr (`<peer id>@<address>`), raw quinn an address.
        let addr = line.rsplit('@').next().unwrap_or(line).parse()?;
        Ok(Server { child, addr })
    }

    /// CPU time every thread of the server has used so far.
    fn cpu(&self) -> Duration {
        cpu_time(self.child.id())
    }

    /// The server's user and system CPU time so far, in clock ticks (`utime` and `stime`
    /// of `/proc/<pid>/stat`, all threads): what splits [`cpu`](Self::cpu) between our
    /// code and the kernel's.
    fn user_and_system(&self) -> (u64, u64) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else {
            return (0, 0);
        };
        // After the command name (in parentheses, which may hold spaces): state is field
        // 3, utime and stime fields 14 and 15.
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let mut fields = rest.split_whitespace().skip(11);
        let mut next = || fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        (next(), next())
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time of process `pid`: the sum over its threads of the first field of
/// `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on a CPU).
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// Nanoseconds the calling thread has run (`/proc/thread-self/schedstat`).
fn own_cpu_time() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Pins every thread of this process to `cpus` (a taskset list), when possible.
fn pin_self(cpus: &str) {
    let pid = std::process::id().to_string();
    let _ = Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid])
        .stdout(Stdio::null())
        // Threads may end while taskset walks them; it says so, harmlessly.
        .stderr(Stdio::null())
        .status();
}

/// Sizes of one pinned run.
#[derive(Clone, Copy)]
pub struct Sizes {
    /// Requests of each rate figure.
    pub requests: usize,
    /// Sequential requests for the latency figures.
    pub sequential: usize,
    /// Connections of each set-up figure.
    pub setups: usize,
    /// Bytes of the one-stream upload.
    pub bulk: usize,
    /// Our server's `max_udp_payload_size`, when not the default.
    pub max_udp_payload: Option<u16>,
}

/// What one stack did, pinned: (scenario, unit, value).
pub struct Pinned {
    pub figures: Vec<(String, &'static str, f64)>,
}

/// Runs the pinned scenarios against `stack`'s servers (`rustorium`, `quinn` or
/// `tcp+tls`, which has the bulk upload only).
pub fn measure(stack: &str, sizes: Sizes) -> anyhow::Result<Pinned> {
    let (main, other) = match stack {
        "rustorium" => (Variant::Ours, Variant::OursWithoutIoThread),
        "tcp+tls" => (Variant::Tcp, Variant::Tcp),
        _ => (Variant::Raw, Variant::RawMultiThread),
    };
    let pin = can_pin();
    if let (Variant::Ours, Some(size)) = (main, sizes.max_udp_payload) {
        eprintln!("pinned: our server runs with transport.max_udp_payload_size = {size}");
    }
    // The client on a single-threaded runtime of its own, on a thread of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let figures = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if pin {
                    pin_self("1");
                }
                let result = runtime.block_on(async {
                    let mut figures = Vec::new();
                    let server = Server::start(main, pin, sizes.max_udp_payload)?;
                    figures.extend(bulk(&server, main, sizes.bulk).await?);
                    if main == Variant::Tcp {
                        return Ok(figures);
                    }
                    figures.extend(latency_and_rate(&server, sizes, "").await?);
                    figures.extend(setup(&server, sizes).await?);
                    figures.extend(many_connections(&server, sizes).await?);
                    drop(server);
                    let label = " [ours: io_thread = false; quinn: multi-thread runtime]";
                    let server = Server::start(other, pin, sizes.max_udp_payload)?;
                    let rates = latency_and_rate(
                        &server,
                        Sizes {
                            sequential: 0,
                            ..sizes
                        },
                        label,
                    );
                    figures.extend(rates.await?);
                    anyhow::Ok(figures)
                });
                if pin {
                    pin_self(&format!("0-{}", cpus() - 1));
                }
                result
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the pinned client panicked"))?
    });
    let mut figures = figures?;
    if !pin {
        for f in &mut figures {
            f.0.push_str(" (not pinned: fewer than 2 CPUs or no taskset)");
        }
    }
    Ok(Pinned { figures })
}

/// One stream (one TCP connection) carrying `bytes` to a server that reads and drops it:
/// the client sends the same 1 MiB chunk over and over (for QUIC, shared, with no copy on
/// its side), and the figure is from the first byte to the server's answer. Also the
/// client's and the server's CPU busy over the transfer: which side limits it.
async fn bulk(
    server: &Server,
    variant: Variant,
    bytes: usize,
) -> anyhow::Result<Vec<(String, &'static str, f64)>> {
    const CHUNK: usize = 1 << 20;
    let client_before = own_cpu_time();
    let server_before = server.cpu();
    // For QUIC, the largest datagram the client's connection reached (path MTU).
    let (took, mtu) = if variant == Variant::Tcp {
        let client = crate::baselines::TcpClient::connect(server.addr).await?;
        let chunk = vec![7u8; CHUNK.min(bytes)];
        let start = Instant::now();
        client.upload(&chunk, bytes).await?;
        (start.elapsed(), None)
    } else {
        let client = raw_wire::Client::new()?;
        let conn = client.connect_bulk(server.addr).await?;
        let chunk = Bytes::from(vec![7u8; CHUNK.min(bytes)]);
        let start = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&rustorium_p2p::wire::encode_header(STREAM_SINK))
            .await?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            send.write_chunk(chunk.slice(..n)).await?;
            left -= n;
        }
        send.finish()?;
        let answer = recv.read_to_end(1 << 16).await?;
        anyhow::ensure!(answer.first() == Some(&0), "the sink did not answer OK");
        let took = start.elapsed();
        let mtu = conn.stats().path.current_mtu;
        conn.close(0u32.into(), b"done");
        (took, Some(mtu))
    };
    let gbits = bytes as f64 * 8.0 / took.as_secs_f64() / 1e9;
    let busy = |cpu: Duration| cpu.as_secs_f64() / took.as_secs_f64() * 100.0;
    // Both include the connection's set-up, a few milliseconds against a second or more.
    let client = busy(own_cpu_time().saturating_sub(client_before));
    let server = busy(server.cpu().saturating_sub(server_before));
    let name = format!(
        "pinned: {} MiB, one stream (one TCP connection), body dropped as it comes",
        bytes >> 20
    );
    let mut figures = vec![
        (name.clone(), "Gbit/s", gbits),
        (format!("{name}, client CPU busy"), "%", client),
        (format!("{name}, server CPU busy"), "%", server),
    ];
    if let Some(mtu) = mtu {
        figures.push((format!("{name}, path MTU reached"), "B", f64::from(mtu)));
    }
    Ok(figures)
}

/// Datagrams the client has received on `conn`: what the server sent it.
fn received(conn: &quinn::Connection) -> u64 {
    conn.stats().udp_rx.datagrams
}

async fn latency_and_rate(
    server: &Server,
    sizes: Sizes,
    label: &str,
) -> anyhow::Result<Vec<(String, &'static str, f64)>> {
    let client = raw_wire::Client::new()?;
    let conn = client.connect(server.addr, false).await?;
    let mut figures = Vec::new();
    // Sequential 64-byte requests.
    if sizes.sequential > 0 {
        let body = Bytes::from(vec![7u8; 64]);
        let mut times = Vec::with_capacity(sizes.sequential);
        for _ in 0..sizes.sequential {
            let start = Instant::now();
            raw_wire::call(&conn, ECHO, body.clone()).await?;
            times.push(start.elapsed());
        }
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            let micros = at(q).as_secs_f64() * 1e6;
            figures.push((
                format!("pinned: 64 B sequential, {name}{label}"),
                "µs",
                micros,
            ));
        }
    }
    // 64 in flight, 64 B and 1 KiB: requests per second, and the server's CPU and
    // datagrams per request.
    for size in [64usize, 1024] {
        let body = Bytes::from(vec![3u8; size]);
        let in_flight = 64;
        let per_worker = sizes.requests.div_ceil(in_flight);
        let cpu_before = server.cpu();
        let ticks_before = server.user_and_system();
        let client_before = own_cpu_time();
        let datagrams_before = received(&conn);
        let bytes_before = conn.stats().udp_rx.bytes;
        let max_streams_before = conn.stats().frame_rx.max_streams_bidi;
        let start = Instant::now();
        let workers = (0..in_flight).map(|_| {
            let (conn, body) = (&conn, body.clone());
            async move {
                for _ in 0..per_worker {
                    let answer = raw_wire::call(conn, ECHO, body.clone()).await?;
                    anyhow::ensure!(answer.len() == body.len(), "short answer");
                }
                Ok(())
            }
        });
        for done in join_all(workers).await {
            done?;
        }
        let took = start.elapsed();
        let cpu = server.cpu().saturating_sub(cpu_before);
        let ticks = server.user_and_system();
        let client_cpu = own_cpu_time().saturating_sub(client_before);
        let datagrams = received(&conn) - datagrams_before;
        let bytes = conn.stats().udp_rx.bytes - bytes_before;
        let total = (per_worker * in_flight) as f64;
        let name = format!("pinned: {size} B, 64 in flight{label}");
        figures.push((name.clone(), "req/s", total / took.as_secs_f64()));
        let per_request = cpu.as_secs_f64() * 1e6 / total;
        figures.push((format!("{name}, server CPU per request"), "µs", per_request));
        // The same CPU split between user space (our code, quinn's) and the kernel (the
        // socket, wake-ups), at the resolution of a clock tick (10 ms).
        let micros = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / total;
        let user = micros(ticks.0.saturating_sub(ticks_before.0));
        let system = micros(ticks.1.saturating_sub(ticks_before.1));
        figures.push((format!("{name}, server user CPU per request"), "µs", user));
        figures.push((
            format!("{name}, server system CPU per request"),
            "µs",
            system,
        ));
        // The one client thread is near its limit at these rates: its CPU per request
        // (which depends on how the server packs its answers) bounds the rate as well.
        let busy = client_cpu.as_secs_f64() / took.as_secs_f64();
        figures.push((format!("{name}, client CPU busy"), "%", busy * 100.0));
        let sent = datagrams as f64 / total;
        figures.push((
            format!("{name}, server datagrams per request"),
            "dgrams",
            sent,
        ));
        let bytes = bytes as f64 / total;
        figures.push((format!("{name}, server UDP bytes per request"), "B", bytes));
        // Stream credit the server announced (MAX_STREAMS), which explains most of a
        // difference in datagrams: quinn announces it after each eighth of the limit.
        let max_streams = conn.stats().frame_rx.max_streams_bidi - max_streams_before;
        figures.push((
            format!("{name}, server MAX_STREAMS frames per 1,000 requests"),
            "frames",
            max_streams as f64 * 1000.0 / total,
        ));
    }
    conn.close(0u32.into(), b"done");
    Ok(figures)
}

/// Server CPU per connection set-up, each with two 64-byte requests: full handshakes,
/// then 0-RTT reconnections (the first request as early data).
async fn setup(server: &Server, sizes: Sizes) -> anyhow::Result<Vec<(String, &'static str, f64)>> {
    let client = raw_wire::Client::new()?;
    let body = Bytes::from(vec![5u8; 64]);
    let mut figures = Vec::new();
    for zero_rtt in [false, true] {
        if zero_rtt {
            // A first connection to fetch a ticket.
            let conn = client.connect(server.addr, true).await?;
            raw_wire::call(&conn, ECHO, body.clone()).await?;
            conn.close(0u32.into(), b"done");
        }
        let cpu_before = server.cpu();
        let mut accepted = 0usize;
        for _ in 0..sizes.setups {
            let (conn, early) = client.connect_early(server.addr, zero_rtt).await?;
            raw_wire::call(&conn, ECHO, body.clone()).await?;
            if let Some(early) = early {
                accepted += usize::from(early.await);
            }
            // A second request, a round trip after the handshake: by its answer the
            // server's session tickets have arrived, so every reconnection has one.
            raw_wire::call(&conn, ECHO, body.clone()).await?;
            conn.close(0u32.into(), b"done");
        }
        let cpu = server.cpu().saturating_sub(cpu_before);
        let per = cpu.as_secs_f64() * 1e6 / sizes.setups as f64;
        let name = if zero_rtt {
            "pinned: 0-RTT reconnection + two requests, server CPU"
        } else {
            "pinned: full handshake (mutual TLS) + two requests, server CPU"
        };
        figures.push((name.to_string(), "µs", per));
        if zero_rtt {
            let share = accepted as f64 * 100.0 / sizes.setups as f64;
            figures.push(("pinned: 0-RTT reconnections accepted".into(), "%", share));
        }
    }
    Ok(figures)
}

/// Connections and requests in flight of the many-connections figures: 3,200 requests in
/// flight.
const MANY_CONNECTIONS: usize = 200;
const MANY_IN_FLIGHT: usize = 16;

/// Many connections, each keeping requests in flight, for a fixed time: requests per
/// second, the latency tail (including the slowest request), Jain's fairness index over
/// the requests each connection got answered (1: all alike; 1/n: one connection got
/// everything), and how busy the server's CPU was (below 100 %, the client set the pace).
async fn many_connections(
    server: &Server,
    sizes: Sizes,
) -> anyhow::Result<Vec<(String, &'static str, f64)>> {
    // A client (key and socket) per connection: our node keeps one connection per peer.
    let mut clients = Vec::with_capacity(MANY_CONNECTIONS);
    let mut conns = Vec::with_capacity(MANY_CONNECTIONS);
    for _ in 0..MANY_CONNECTIONS {
        let client = raw_wire::Client::new()?;
        conns.push(client.connect(server.addr, false).await?);
        clients.push(client);
    }
    // 2 s at full size, 0.2 s for --quick.
    let length = Duration::from_millis((sizes.requests as u64 / 100).clamp(200, 2000));
    let body = Bytes::from(vec![9u8; 64]);
    let cpu_before = server.cpu();
    let start = Instant::now();
    let end = start + length;
    let workers = conns.iter().flat_map(|conn| {
        let body = body.clone();
        (0..MANY_IN_FLIGHT).map(move |_| {
            let body = body.clone();
            async move {
                let mut times = Vec::new();
                while Instant::now() < end {
                    let sent = Instant::now();
                    raw_wire::call(conn, ECHO, body.clone()).await?;
                    times.push(sent.elapsed());
                }
                anyhow::Ok(times)
            }
        })
    });
    let mut per_connection = vec![0u64; MANY_CONNECTIONS];
    let mut times = Vec::new();
    for (i, done) in join_all(workers).await.into_iter().enumerate() {
        let worker = done?;
        per_connection[i / MANY_IN_FLIGHT] += worker.len() as u64;
        times.extend(worker);
    }
    let took = start.elapsed();
    let cpu = server.cpu().saturating_sub(cpu_before);
    for conn in &conns {
        conn.close(0u32.into(), b"done");
    }
    anyhow::ensure!(
        !times.is_empty(),
        "no request answered on the many connections"
    );
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let name = format!("pinned: {MANY_CONNECTIONS} connections x {MANY_IN_FLIGHT} in flight");
    Ok(vec![
        (
            name.clone(),
            "req/s",
            times.len() as f64 / took.as_secs_f64(),
        ),
        (format!("{name}, p50"), "ms", ms(at(0.5))),
        (format!("{name}, p99.9"), "ms", ms(at(0.999))),
        (format!("{name}, slowest"), "ms", ms(times[times.len() - 1])),
        (
            format!("{name}, fairness across connections"),
            "Jain",
            jain(&per_connection),
        ),
        // Below 100 %, the client, not the server, set the pace.
        (
            format!("{name}, server CPU busy"),
            "%",
            cpu.as_secs_f64() * 100.0 / took.as_secs_f64(),
        ),
    ])
}

/// Jain's fairness index of `shares`: 1 when all are equal, 1/n when one has it all.
pub fn jain(shares: &[u64]) -> f64 {
    let sum: f64 = shares.iter().map(|&x| x as f64).sum();
    let squares: f64 = shares.iter().map(|&x| (x as f64).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

#[cfg(test)]
mod tests {
    #[test]
    fn jain_index() {
        assert!((super::jain(&[5, 5, 5, 5]) - 1.0).abs() < 1e-9);
        assert!((super::jain(&[8, 0, 0, 0]) - 0.25).abs() < 1e-9);
        assert_eq!(super::jain(&[0, 0]), 0.0);
    }
}
