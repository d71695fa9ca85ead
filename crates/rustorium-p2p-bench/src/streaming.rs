//! Streaming bodies, ours only.
//!
//! 1. **Throughput**: 16 MiB echoes, one at a time, through the buffered API and a buffered
//!    route, and through [`Node::open_request`] and a streaming route (64 KiB chunks), on
//!    one node pair in this process. The ratio is what streaming costs.
//! 2. **A large echo through the CLI**: a `rustorium-p2p node` and a
//!    `rustorium-p2p request ADDR sys/echo --file -`, each in a process of its own. This
//!    process writes pseudo-random bytes to the client's standard input and reads the
//!    answer from its standard output, comparing SHA-256 hashes, while it samples both
//!    processes' resident memory (VmHWM, the kernel's peak, every 100 ms). The client's
//!    growth is its peak over the peak of the same command echoing one byte.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustorium_p2p::{AnswerWriter, BodyReader, Bytes, HandlerError, Node, RequestContext};

const BODY: usize = 16 << 20;
const CHUNK: usize = 64 * 1024;

/// Megabits per second of 16 MiB echoes: (buffered, streaming).
pub async fn throughput(bodies: usize, streaming_first: bool) -> anyhow::Result<(f64, f64)> {
    let mut config = rustorium_p2p::Config::default();
    config.node.listen = "127.0.0.1:0".parse()?;
    config.limits.max_request_size = BODY as u64;
    config.limits.max_response_size = BODY as u64;
    let server = Node::builder()
        .config(config.clone())
        .route("echo", |_ctx, body: Bytes| async move { Ok(body) })
        .streaming_route(
            "echo-stream",
            |_ctx: RequestContext, mut body: BodyReader, mut answer: AnswerWriter| async move {
                while let Some(chunk) = body.chunk().await? {
                    answer.write(chunk).await?;
                }
                Ok::<_, HandlerError>(())
            },
        )
        .bind()
        .await?;
    let client = Node::builder().config(config).bind().await?;
    client.connect(&server.peer_addr()).await?;
    let peer = server.peer_id();
    let body = Bytes::from(vec![5u8; BODY]);
    let run = |streaming: bool, count: usize| {
        let (client, body) = (&client, body.clone());
        async move {
            let start = Instant::now();
            for _ in 0..count {
                let back = if streaming {
                    let (mut writer, answer) = client.open_request(peer, "echo-stream").await?;
                    let send = async {
                        for at in (0..BODY).step_by(CHUNK) {
                            writer.write(body.slice(at..(at + CHUNK).min(BODY))).await?;
                        }
                        writer.finish()
                    };
                    let (sent, back) = tokio::join!(send, answer.read_to_end(BODY));
                    sent?;
                    back?.len()
                } else {
                    client.request(peer, "echo", body.clone()).await?.len()
                };
                anyhow::ensure!(back == BODY, "the echo came back {back} bytes long");
            }
            let bits = (2 * BODY * count * 8) as f64;
            anyhow::Ok(bits / start.elapsed().as_secs_f64() / 1e6)
        }
    };
    // Both warmed up (windows grown), then measured in the order given.
    run(false, 1).await?;
    run(true, 1).await?;
    let (buffered, streaming) = if streaming_first {
        let streaming = run(true, bodies).await?;
        (run(false, bodies).await?, streaming)
    } else {
        let buffered = run(false, bodies).await?;
        (buffered, run(true, bodies).await?)
    };
    client.shutdown().await;
    server.shutdown().await;
    Ok((buffered, streaming))
}

/// What one large echo through the CLI showed.
pub struct BigEcho {
    pub megabits: f64,
    /// Peak resident memory over the node's before the echo, MiB.
    pub node_growth_mib: f64,
    /// Peak resident memory over that of the same command echoing one byte, MiB.
    pub client_growth_mib: f64,
}

/// Echoes `bytes` through a CLI node and a CLI client; fails if what came back differs.
pub fn big_echo(bytes: u64) -> anyhow::Result<BigEcho> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[limits]\nmax_stream_body_size = {bytes}\n"),
    )?;
    let exe = std::env::current_exe()?;
    let mut node = Killed(
        Command::new(&exe)
            .args(["node", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("RUSTORIUM_P2P_DATA_DIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(node.0.stdout.take().context("node stdout")?).read_line(&mut line)?;
    let addr = line.trim().to_string();
    anyhow::ensure!(addr.contains('@'), "the node printed no PeerAddr");
    let node_pid = node.0.id();
    // The client's footprint with a body of one byte: its fixed cost.
    let (_, small) = echo_through(&exe, &addr, 1, node_pid)?;
    let node_before = status_kib(node_pid, "VmRSS:");
    let started = Instant::now();
    let (peaks, client_peak) = echo_through(&exe, &addr, bytes, node_pid)?;
    let took = started.elapsed();
    Ok(BigEcho {
        megabits: (2 * bytes * 8) as f64 / took.as_secs_f64() / 1e6,
        node_growth_mib: peaks.saturating_sub(node_before) as f64 / 1024.0,
        client_growth_mib: client_peak.saturating_sub(small) as f64 / 1024.0,
    })
}

/// Runs one `request --file -` echo of `bytes`; returns the node's and the client's peak
/// resident memory (KiB) seen while it ran.
fn echo_through(
    exe: &std::path::Path,
    addr: &str,
    bytes: u64,
    node_pid: u32,
) -> anyhow::Result<(u64, u64)> {
    let mut client = Killed(
        Command::new(exe)
            .args([
                "request",
                addr,
                "sys/echo",
                "--file",
                "-",
                "--timeout",
                "30s",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let pid = client.0.id();
    let mut stdin = client.0.stdin.take().context("client stdin")?;
    let mut stdout = client.0.stdout.take().context("client stdout")?;
    let writer = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut gen = 0x5eed_u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            for word in buf[..n].chunks_mut(8) {
                gen = gen.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let z = (gen ^ (gen >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
            }
            hash.update(&buf[..n]);
            stdin.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(hash.finish().as_ref().to_vec())
    });
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Vec<u8>)> {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                return Ok((total, hash.finish().as_ref().to_vec()));
            }
            hash.update(&buf[..n]);
            total += n as u64;
        }
    });
    // Peaks, sampled until the answer ends (bounded: an hour at most).
    let (mut node_peak, mut client_peak) = (0, 0);
    let until = Instant::now() + Duration::from_secs(3600);
    while !reader.is_finished() && Instant::now() < until {
        node_peak = node_peak.max(status_kib(node_pid, "VmHWM:"));
        client_peak = client_peak.max(status_kib(pid, "VmHWM:"));
        std::thread::sleep(Duration::from_millis(100));
    }
    client_peak = client_peak.max(status_kib(pid, "VmHWM:"));
    node_peak = node_peak.max(status_kib(node_pid, "VmHWM:"));
    let sent = writer.join().expect("writer thread")?;
    let (total, came_back) = reader.join().expect("reader thread")?;
    let status = client.0.wait()?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = client.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        anyhow::bail!("the client failed ({status}): {}", err.trim());
    }
    anyhow::ensure!(total == bytes, "{total} of {bytes} bytes came back");
    anyhow::ensure!(sent == came_back, "the echo came back different (SHA-256)");
    Ok((node_peak, client_peak))
}

/// A field of `/proc/<pid>/status`, in KiB (0 if the process is gone).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
