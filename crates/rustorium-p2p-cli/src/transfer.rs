//! `request --file/--out` and `send --file`: bodies streamed from disk (or standard input)
//! and answers streamed to disk (or standard output), never held whole in memory, with a
//! progress line on a terminal for transfers that last more than a moment.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::BytesMut;
use rustorium_p2p::RequestError;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufWriter};

use crate::client::{connect, MessageArgs};

/// How much is read from the file per write.
const CHUNK: usize = 64 * 1024;

/// The answer is gathered this much at a time before it is written out: it comes in
/// chunks of about a packet, and tokio's file and stdout writes each take a trip to a
/// blocking thread.
const SINK_BUFFER: usize = 256 * 1024;

type Source = (Box<dyn AsyncRead + Unpin + Send>, Option<u64>);

/// The body's source (`--file`, `-` for standard input, else `--data` or nothing) and its
/// size when known. A file that cannot be opened is a usage error (exit 2).
async fn open_source(args: &MessageArgs) -> anyhow::Result<Source> {
    let usage = |e: anyhow::Error| crate::Usage(format!("--file: {}", crate::report(&e)));
    match (&args.body.data, &args.body.file) {
        (Some(text), _) => Ok((
            Box::new(std::io::Cursor::new(text.clone().into_bytes())),
            Some(text.len() as u64),
        )),
        (None, Some(path)) if path.as_os_str() == "-" => Ok((Box::new(tokio::io::stdin()), None)),
        (None, Some(path)) => {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(usage)?;
            let meta = file.metadata().await.ok();
            if meta.as_ref().is_some_and(|m| m.is_dir()) {
                let e = anyhow::anyhow!("{} is a directory", path.display());
                return Err(usage(e).into());
            }
            Ok((Box::new(file), meta.map(|m| m.len())))
        }
        (None, None) => Ok((Box::new(tokio::io::empty()), Some(0))),
    }
}

/// Where the answer goes: `--out`, or standard output. A file that cannot be created is a
/// usage error (exit 2).
async fn open_sink(
    out: Option<&Path>,
) -> anyhow::Result<(Box<dyn AsyncWrite + Unpin + Send>, bool)> {
    match out {
        Some(path) => {
            let file = tokio::fs::File::create(path).await.map_err(|e| {
                crate::Usage(format!("--out: cannot create {}: {e}", path.display()))
            })?;
            Ok((Box::new(BufWriter::with_capacity(SINK_BUFFER, file)), false))
        }
        None => Ok((
            Box::new(BufWriter::with_capacity(SINK_BUFFER, tokio::io::stdout())),
            std::io::stdout().is_terminal(),
        )),
    }
}

/// The next chunk of `source`, `None` at its end.
async fn next_chunk(
    source: &mut Source,
    progress: &Progress,
) -> anyhow::Result<Option<bytes::Bytes>> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    let n = source
        .0
        .read_buf(&mut buf)
        .await
        .context("cannot read the body")?;
    progress.sent.fetch_add(n as u64, Ordering::Relaxed);
    Ok((n > 0).then(|| buf.freeze()))
}

/// `request` with the body streamed from `--file` and/or the answer streamed to `--out`.
pub async fn request(args: MessageArgs, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut source = open_source(&args).await?;
    let (mut sink, terminal) = open_sink(out.as_deref()).await?;
    let node = connect(&args.target).await?;
    let progress = Progress::start(source.1);
    let result = exchange(&node, &args, &mut source, &mut sink, terminal, &progress).await;
    progress.stop();
    node.shutdown().await;
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn exchange(
    node: &rustorium_p2p::Node,
    args: &MessageArgs,
    source: &mut Source,
    sink: &mut Box<dyn AsyncWrite + Unpin + Send>,
    terminal: bool,
    progress: &Progress,
) -> anyhow::Result<()> {
    let peer = args.target.peer.peer_id;
    let (mut body, mut answer) = node.open_request(peer, &args.route).await?;
    let send = async {
        while let Some(chunk) = next_chunk(source, progress).await? {
            body.write(chunk).await?;
        }
        body.finish()?;
        Ok::<_, anyhow::Error>(())
    };
    let receive = async {
        let mut last = None;
        while let Some(chunk) = answer.chunk().await? {
            progress
                .received
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            last = chunk.last().copied();
            sink.write_all(&chunk)
                .await
                .context("cannot write the answer")?;
        }
        // On a terminal, end the line so the prompt does not run on.
        if terminal && last.is_some_and(|b| b != b'\n') {
            sink.write_all(b"\n").await?;
        }
        sink.flush().await.context("cannot write the answer")?;
        Ok::<_, anyhow::Error>(())
    };
    let (mut send, mut receive) = (std::pin::pin!(send), std::pin::pin!(receive));
    let mut sent: Option<anyhow::Result<()>> = None;
    loop {
        tokio::select! {
            received = &mut receive => {
                // The answer decides; a body the peer stopped reading is explained by it
                // (an answer that came anyway still means the body did not all go).
                return match (received, sent) {
                    (Err(e), _) | (Ok(()), Some(Err(e))) => Err(e),
                    (Ok(()), None) => Err(anyhow::anyhow!(
                        "the peer answered before the whole body was sent; the answer is above"
                    )),
                    (Ok(()), Some(Ok(()))) => Ok(()),
                };
            }
            result = &mut send, if sent.is_none() => match result {
                // The peer stopped reading the body (too large, busy, its handler is done):
                // its answer says why.
                Err(e) if matches!(
                    e.downcast_ref(),
                    Some(
                        RequestError::BodyStopped { .. }
                            | RequestError::TooLarge { .. }
                            | RequestError::Remote { .. }
                    )
                ) => {
                    sent = Some(Err(e));
                }
                Err(e) => return Err(e),
                Ok(()) => sent = Some(Ok(())),
            },
        }
    }
}

/// `send` with the body streamed from `--file`.
pub async fn send(args: MessageArgs) -> anyhow::Result<ExitCode> {
    let mut source = open_source(&args).await?;
    let node = connect(&args.target).await?;
    let progress = Progress::start(source.1);
    let result = async {
        let peer = args.target.peer.peer_id;
        let mut message = node.open_message(peer, &args.route).await?;
        while let Some(chunk) = next_chunk(&mut source, &progress).await? {
            message.write(chunk).await?;
        }
        message.finish().await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    progress.stop();
    node.shutdown().await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Bytes sent and received, shown on standard error (when it is a terminal) once a
/// transfer has run for [`Progress::AFTER`].
struct Progress {
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    bar: indicatif::ProgressBar,
    shown: tokio::task::JoinHandle<()>,
}

impl Progress {
    const AFTER: Duration = Duration::from_secs(1);

    fn start(total: Option<u64>) -> Self {
        let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        // Hidden at first; indicatif draws nothing when standard error is not a terminal.
        let bar = indicatif::ProgressBar::hidden();
        let shown = {
            let (sent, received, bar) = (sent.clone(), received.clone(), bar.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                tokio::time::sleep(Self::AFTER).await;
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    bar.set_message(progress_line(
                        sent.load(Ordering::Relaxed),
                        received.load(Ordering::Relaxed),
                        total,
                        started.elapsed(),
                    ));
                    bar.tick();
                }
            })
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("literal template"),
        );
        Progress {
            sent,
            received,
            bar,
            shown,
        }
    }

    /// Stops the line and clears it.
    fn stop(&self) {
        self.shown.abort();
        self.bar.finish_and_clear();
    }
}

/// `sent 1.5 GiB of 4.0 GiB (37%), received 1.4 GiB, 312.0 MiB/s`.
fn progress_line(sent: u64, received: u64, total: Option<u64>, took: Duration) -> String {
    let of = match total {
        Some(total) if total > 0 => format!(
            " of {} ({}%)",
            size(total),
            (sent as f64 * 100.0 / total as f64) as u64
        ),
        _ => String::new(),
    };
    let rate = (sent.max(received) as f64 / took.as_secs_f64().max(1e-3)) as u64;
    format!(
        "sent {}{of}, received {}, {}/s",
        size(sent),
        size(received),
        size(rate)
    )
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_says_how_far_and_how_fast() {
        let line = progress_line(3 << 29, 1 << 30, Some(4 << 30), Duration::from_secs(2));
        assert_eq!(
            line,
            "sent 1.5 GiB of 4.0 GiB (37%), received 1.0 GiB, 768.0 MiB/s"
        );
        assert_eq!(
            progress_line(10, 0, None, Duration::from_secs(1)),
            "sent 10 B, received 0 B, 10 B/s"
        );
    }
}
