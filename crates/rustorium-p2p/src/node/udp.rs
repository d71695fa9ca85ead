//! The node's UDP socket as quinn sees it: the runtime's own socket, with every batch of
//! datagrams (GSO) cut to what one send can carry.
//!
//! quinn hands the socket up to 10 datagrams of the path's MTU in one buffer, to be sent
//! with one `sendmsg` (segmentation offload). The kernel takes at most 65,507 bytes in
//! one UDP send (an IPv4 datagram's limit, GSO or not), and refuses a larger one with
//! `EMSGSIZE`, which quinn-udp ignores as if it were a lost MTU probe: with a path MTU
//! over 6,550 bytes (loopback, jumbo frames), every full batch vanished, the sender saw
//! a burst of losses, and black-hole detection took the path down to 1,200 bytes
//! (measured: 3.4 to 4.6 Gbit/s with MTU discovery up to 9,000 bytes, against 6.8 at
//! quinn's default 1,452, one stream on loopback). Here such a batch leaves in several
//! sends, each of whole datagrams.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most bytes of UDP payload one send may carry: an IPv4 datagram's 65,535 bytes
/// less its 20-byte header and UDP's 8 (IPv6 allows 20 more; one limit serves both).
pub(crate) const MAX_SEND: usize = 65_507;

/// Bytes of a batch of `len` bytes, in datagrams of `segment` bytes (the last may be
/// shorter), that one send carries: the whole batch when it fits, else as many whole
/// datagrams as fit (at least one).
pub(crate) fn per_send(len: usize, segment: usize) -> usize {
    if len <= MAX_SEND || segment == 0 {
        return len;
    }
    (MAX_SEND / segment).max(1) * segment
}

/// A socket whose batches of datagrams always fit one send each.
pub(crate) struct FitBatches(pub Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for FitBatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl AsyncUdpSocket for FitBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.0.try_send(transmit);
        };
        let step = per_send(transmit.contents.len(), segment);
        if step >= transmit.contents.len() {
            return self.0.try_send(transmit);
        }
        for (i, part) in transmit.contents.chunks(step).enumerate() {
            let sent = self.0.try_send(&Transmit {
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                ..transmit.clone()
            });
            match sent {
                Ok(()) => {}
                // Nothing sent yet: quinn waits until the socket can take the batch, and
                // tries it again.
                Err(e) if i == 0 => return Err(e),
                // The socket's buffer filled up halfway (or another error): the rest is
                // dropped and QUIC's loss recovery resends it, at the cost of a smaller
                // congestion window. Returning the error would have quinn send the whole
                // batch again, the first part twice. Only batches over `MAX_SEND` get
                // here, so only paths with an MTU over 6,550 bytes.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_fits_goes_whole() {
        assert_eq!(per_send(10 * 1452, 1452), 10 * 1452);
        assert_eq!(per_send(MAX_SEND, 6550), MAX_SEND);
        assert_eq!(per_send(500, 0), 500);
    }

    #[test]
    fn a_batch_too_large_goes_in_whole_datagrams_that_fit() {
        // 10 datagrams of 8,952 bytes (a jumbo frame's payload): 7 fit in one send.
        assert_eq!(per_send(10 * 8952, 8952), 7 * 8952);
        // The last datagram of a batch may be short; the cut is still between datagrams.
        assert_eq!(per_send(9 * 8952 + 100, 8952), 7 * 8952);
        // A datagram of the largest size is sent alone.
        assert_eq!(per_send(2 * 65_000, 65_000), 65_000);
        for segment in [1200, 1452, 6551, 8952, 16_384, 65_507] {
            let len = 10 * segment;
            let step = per_send(len, segment);
            assert!(step <= MAX_SEND, "{segment}");
            assert_eq!(step % segment, 0, "{segment}");
        }
    }
}
