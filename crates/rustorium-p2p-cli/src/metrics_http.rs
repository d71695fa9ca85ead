//! A minimal HTTP/1.1 endpoint that serves `GET /metrics`. Hand-written on tokio rather
//! than pulling in an HTTP stack for one route: it reads at most 8 KiB of request head
//! within 2 s, answers, and closes the connection, all within 5 s. At most 32 scrapes are
//! served at once, and at most 4 from one IP address (one /64 for IPv6), so slow clients
//! cannot hold it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The most one scrape may take, from accepting its connection to closing it.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_SCRAPES: usize = 32;
/// Scrapes at once from one IP address.
pub const MAX_SCRAPES_PER_IP: usize = 4;

/// The address a scrape counts under: an IPv4 address, or an IPv6 address's /64 (a host
/// is usually given a whole /64).
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    }
}

/// Scrapes in progress per IP address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_default();
        if *n >= MAX_SCRAPES_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

/// One scrape's place in its address's count; given back when dropped.
struct IpSlot(Arc<PerIp>, IpAddr);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// The OpenMetrics text content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `render()` at `/metrics` on `listener` until the task is dropped.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let per_ip = Arc::new(PerIp::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("metrics endpoint: accept failed: {e}");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(ip_slot) = per_ip.take(prefix(peer.ip())) else {
            continue; // that address is at its limit: drop the connection
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // over the limit: drop the connection
        };
        let render = render.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(SCRAPE_TIMEOUT, respond(stream, &*render)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "metrics scrape failed: {e}"),
                Err(_) => debug!(%peer, "metrics scrape cut off after {SCRAPE_TIMEOUT:?}"),
            }
            drop((slot, ip_slot));
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        // Only the bytes new since the last read (and the 3 before them) can complete the
        // end of the head: a client sending a byte at a time costs no rescans.
        let mut scanned = 0usize;
        while !head[scanned.saturating_sub(3)..]
            .windows(4)
            .any(|w| w == b"\r\n\r\n")
        {
            scanned = head.len();
            if head.len() >= MAX_HEAD {
                return Err(std::io::Error::other("request head too large"));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other(
                    "connection closed before the request head",
                ));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::other("request head not received in time")),
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", CONTENT_TYPE, render()),
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served here\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(HEAD_TIMEOUT, stream.write_all(response.as_bytes()))
        .await
        .map_err(|_| std::io::Error::other("scraper did not read the answer in time"))??;
    stream.shutdown().await
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
