//! The node's UDP socket: binding it, and getting the buffer sizes the configuration asks
//! for.
//!
//! The receive buffer is where datagrams wait while the node is busy; when it is full the
//! kernel drops them, and each drop costs the peer a probe timeout (which grows with the
//! round-trip time, so under load a drop means a second or more). Linux caps `SO_RCVBUF`
//! at `net.core.rmem_max` (often 208 KiB). Like quic-go, the node then tries
//! `SO_RCVBUFFORCE` (allowed with `CAP_NET_ADMIN`; Linux and Android only), and if that is
//! refused too it says what it got and how to raise the cap. Sizes are at most 1 GiB
//! (validated), well inside what the kernel accepts.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use crate::config::TransportSettings;

/// The buffer sizes a socket got, in the unit of `SO_RCVBUF`/`SO_SNDBUF` as set (Linux
/// reports twice that, counting its bookkeeping; this is halved back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buffers {
    pub receive: usize,
    pub send: usize,
}

/// Binds a UDP socket on `addr` with the buffers `transport` asks for.
pub(crate) fn bind(
    transport: &TransportSettings,
    addr: SocketAddr,
) -> io::Result<(std::net::UdpSocket, Buffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the OS allows it; quinn handles mapped addresses.
        let _ = socket.set_only_v6(false);
    }
    let buffers = Buffers {
        receive: size(&socket, Direction::Receive, transport.socket_receive_buffer),
        send: size(&socket, Direction::Send, transport.socket_send_buffer),
    };
    socket.bind(&addr.into())?;
    Ok((socket.into(), buffers))
}

#[derive(Clone, Copy)]
enum Direction {
    Receive,
    Send,
}

impl Direction {
    fn set(self, socket: &Socket, bytes: usize) -> io::Result<()> {
        match self {
            Direction::Receive => socket.set_recv_buffer_size(bytes),
            Direction::Send => socket.set_send_buffer_size(bytes),
        }
    }

    /// Above the kernel's cap: needs `CAP_NET_ADMIN`.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn force(self, socket: &Socket, bytes: usize) -> io::Result<()> {
        use rustix::net::sockopt;
        match self {
            Direction::Receive => sockopt::set_socket_recv_buffer_size_force(socket, bytes),
            Direction::Send => sockopt::set_socket_send_buffer_size_force(socket, bytes),
        }
        .map_err(io::Error::from)
    }

    fn get(self, socket: &Socket) -> usize {
        let reported = match self {
            Direction::Receive => socket.recv_buffer_size(),
            Direction::Send => socket.send_buffer_size(),
        }
        .unwrap_or(0);
        if cfg!(any(target_os = "linux", target_os = "android")) {
            reported / 2
        } else {
            reported
        }
    }

    fn key(self) -> (&'static str, &'static str) {
        match self {
            Direction::Receive => ("transport.socket_receive_buffer", "net.core.rmem_max"),
            Direction::Send => ("transport.socket_send_buffer", "net.core.wmem_max"),
        }
    }

    /// What a buffer too small does.
    fn harm(self) -> &'static str {
        match self {
            Direction::Receive => {
                "under load a full receive buffer drops packets, and each drop delays a \
                 request by a probe timeout"
            }
            Direction::Send => "under load a full send buffer makes the node wait to send",
        }
    }
}

/// Sets one buffer to `asked` bytes, as far as the kernel allows; returns what it got.
fn size(socket: &Socket, direction: Direction, asked: u32) -> usize {
    let asked = asked as usize;
    // Best effort: the node works with any buffer, only worse under load.
    let _ = direction.set(socket, asked);
    let got = direction.get(socket);
    let (key, cap) = direction.key();
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let got = if got < asked && direction.force(socket, asked).is_ok() {
        let forced = direction.get(socket);
        tracing::info!(asked, got = forced, "{key}: set past {cap} (CAP_NET_ADMIN)");
        forced
    } else {
        got
    };
    if got < asked {
        let harm = direction.harm();
        if cfg!(any(target_os = "linux", target_os = "android")) {
            warn!(
                asked,
                got,
                "the UDP socket got a {got}-byte buffer, not the {asked} bytes of {key}: the \
                 kernel caps it at {cap}, and {harm}. Raise the cap (`sysctl -w \
                 {cap}={asked}`) or run the node with CAP_NET_ADMIN"
            );
        } else {
            warn!(
                asked,
                got,
                "the UDP socket got a {got}-byte buffer, not the {asked} bytes of {key}: the \
                 operating system capped it, and {harm}"
            );
        }
    }
    got
}
