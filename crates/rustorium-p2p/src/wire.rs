//! The byte format of wire protocol v1: pure encoding and decoding, no I/O.
//!
//! * Request, on a new bidirectional stream: `route_len: u8` (1..=255), `route` (UTF-8),
//!   then the body until FIN.
//! * Response, on the same stream: `status: u8`, then the body until FIN.
//! * One-way message, on a new unidirectional stream: the same header as a request, then
//!   the body until FIN.
//!
//! `docs/PROTOCOL.md` is the full description, with the application error codes in [`code`].

use std::fmt;

/// The longest route, in bytes.
pub const MAX_ROUTE_LEN: usize = 255;

/// Status byte that starts every response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// The handler answered; the body is its answer.
    Ok = 0,
    /// No handler for the route.
    UnknownRoute = 1,
    /// The request body was over the receiver's limit.
    TooLarge = 2,
    /// The request header was malformed (zero length, bad UTF-8, truncated).
    BadRequest = 3,
    /// The handler failed (returned an error or panicked).
    HandlerError = 4,
    /// The receiver is overloaded; try again later.
    Busy = 5,
}

impl Status {
    /// The status for a status byte, if it is one of v1's.
    pub fn from_u8(byte: u8) -> Option<Status> {
        Some(match byte {
            0 => Status::Ok,
            1 => Status::UnknownRoute,
            2 => Status::TooLarge,
            3 => Status::BadRequest,
            4 => Status::HandlerError,
            5 => Status::Busy,
            _ => return None,
        })
    }

    /// The status byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name used in `docs/PROTOCOL.md` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::UnknownRoute => "UNKNOWN_ROUTE",
            Status::TooLarge => "TOO_LARGE",
            Status::BadRequest => "BAD_REQUEST",
            Status::HandlerError => "HANDLER_ERROR",
            Status::Busy => "BUSY",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// QUIC application error codes used by protocol v1.
pub mod code {
    /// STOP_SENDING / RESET_STREAM: the requester gave up (timeout, or its future was dropped).
    pub const CANCELLED: u32 = 0x01;
    /// STOP_SENDING: the body is over the receiver's size limit. RESET_STREAM of a
    /// streamed answer: the request body went over the limit after the answer started.
    pub const TOO_LARGE: u32 = 0x02;
    /// STOP_SENDING: the receiver has no handler for the route.
    pub const UNKNOWN_ROUTE: u32 = 0x03;
    /// STOP_SENDING: the header is malformed.
    pub const BAD_REQUEST: u32 = 0x04;
    /// STOP_SENDING: the receiver is at its limit of concurrent requests.
    pub const BUSY: u32 = 0x05;
    /// STOP_SENDING / RESET_STREAM: the peer was too slow; the receiver's time for the
    /// stream ran out.
    pub const TIMED_OUT: u32 = 0x06;
    /// STOP_SENDING / RESET_STREAM: the node is shutting down.
    pub const SHUTTING_DOWN: u32 = 0x07;
    /// RESET_STREAM: the handler failed after its answer had started (a streaming
    /// answer); what was sent of it is incomplete.
    pub const HANDLER_ERROR: u32 = 0x08;

    /// CONNECTION_CLOSE: the node is shutting down (after letting running requests
    /// finish), or the connection was closed on purpose.
    pub const CLOSE_SHUTDOWN: u32 = 0x00;
    /// CONNECTION_CLOSE: the peer broke the protocol (for example a wrong ALPN got through).
    pub const CLOSE_PROTOCOL: u32 = 0x01;
    /// CONNECTION_CLOSE: both sides dialed at once and this connection lost (see
    /// `docs/PROTOCOL.md`); nothing that was in progress on it was processed by the closer.
    pub const CLOSE_DUPLICATE: u32 = 0x02;
    /// CONNECTION_CLOSE: the peer is not admitted (deny list, allow list, a connection
    /// limit).
    pub const CLOSE_REFUSED: u32 = 0x03;
    /// CONNECTION_CLOSE: the peer went past a per-peer resource limit (for example it
    /// left too many answers unread); the reason phrase names the limit.
    pub const CLOSE_LIMIT: u32 = 0x04;

    /// What a stream code means, for error messages.
    pub fn describe(code: u64) -> &'static str {
        match code {
            0x01 => "cancelled",
            0x02 => "over the receiver's size limit",
            0x03 => "unknown route",
            0x04 => "malformed header",
            0x05 => "receiver busy",
            0x06 => "timed out at the receiver",
            0x07 => "receiver shutting down",
            0x08 => "the handler failed mid-answer",
            _ => "unknown code",
        }
    }
}

/// Why a route header is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// `route_len` is 0.
    #[error("route length is 0")]
    EmptyRoute,
    /// The stream ended inside the header.
    #[error("stream ended after {got} of {need} header bytes")]
    Truncated {
        /// Bytes the header needed.
        need: usize,
        /// Bytes that came.
        got: usize,
    },
    /// The route is not UTF-8.
    #[error("route is not valid UTF-8")]
    BadUtf8,
}

/// Checks that `route` can be sent: 1 to 255 bytes.
pub fn check_route(route: &str) -> Result<(), &'static str> {
    match route.len() {
        0 => Err("a route is at least 1 byte"),
        n if n > MAX_ROUTE_LEN => Err("a route is at most 255 bytes"),
        _ => Ok(()),
    }
}

/// Encodes the header of a request or one-way message. The route must pass [`check_route`].
pub fn encode_header(route: &str) -> Vec<u8> {
    debug_assert!(check_route(route).is_ok());
    let mut out = Vec::with_capacity(1 + route.len());
    out.push(route.len() as u8);
    out.extend_from_slice(route.as_bytes());
    out
}

/// Decodes a route header from the start of `buf`.
///
/// Returns `Ok(None)` while more bytes are needed, `Ok(Some((route, header_len)))` once the
/// header is complete (the body starts at `header_len`). Call [`header_truncated`] if the
/// stream ends while this still returns `None`.
pub fn decode_header(buf: &[u8]) -> Result<Option<(&str, usize)>, HeaderError> {
    let Some(&len) = buf.first() else {
        return Ok(None);
    };
    if len == 0 {
        return Err(HeaderError::EmptyRoute);
    }
    let end = 1 + usize::from(len);
    let Some(route) = buf.get(1..end) else {
        return Ok(None);
    };
    let route = std::str::from_utf8(route).map_err(|_| HeaderError::BadUtf8)?;
    Ok(Some((route, end)))
}

/// The error for a stream that ended after `got` bytes, before its header was complete.
pub fn header_truncated(buf: &[u8]) -> HeaderError {
    let need = buf.first().map_or(1, |&len| 1 + usize::from(len));
    HeaderError::Truncated {
        need,
        got: buf.len(),
    }
}

/// Why a response could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// The stream ended before the status byte.
    #[error("the answer stream ended before its status byte")]
    Empty,
    /// The status byte is not one of v1's.
    #[error("unknown status byte {0}")]
    UnknownStatus(u8),
}

/// The status byte that starts a response.
pub fn encode_status(status: Status) -> u8 {
    status as u8
}

/// Decodes the status byte that starts a response.
pub fn decode_status(buf: &[u8]) -> Result<Status, ResponseError> {
    let &byte = buf.first().ok_or(ResponseError::Empty)?;
    Status::from_u8(byte).ok_or(ResponseError::UnknownStatus(byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for route in ["a", "sys/echo", &"é".repeat(127), &"x".repeat(255)] {
            let mut bytes = encode_header(route);
            bytes.extend_from_slice(b"body");
            let (decoded, len) = decode_header(&bytes).unwrap().unwrap();
            assert_eq!(decoded, route);
            assert_eq!(&bytes[len..], b"body");
        }
    }

    #[test]
    fn header_incomplete_then_truncated() {
        let bytes = encode_header("sys/ping");
        for cut in 0..bytes.len() {
            assert_eq!(decode_header(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            header_truncated(&bytes[..3]),
            HeaderError::Truncated { need: 9, got: 3 }
        );
        assert_eq!(
            header_truncated(&[]),
            HeaderError::Truncated { need: 1, got: 0 }
        );
    }

    #[test]
    fn header_errors() {
        assert_eq!(decode_header(&[0, b'a']), Err(HeaderError::EmptyRoute));
        assert_eq!(decode_header(&[2, 0xff, 0xfe]), Err(HeaderError::BadUtf8));
    }

    #[test]
    fn routes_checked() {
        assert!(check_route("").is_err());
        assert!(check_route(&"x".repeat(256)).is_err());
        assert!(check_route(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn status_bytes() {
        for byte in 0..=5u8 {
            let status = Status::from_u8(byte).unwrap();
            assert_eq!(status.as_u8(), byte);
            assert_eq!(decode_status(&[byte, 9]), Ok(status));
        }
        assert_eq!(decode_status(&[6]), Err(ResponseError::UnknownStatus(6)));
        assert_eq!(decode_status(&[]), Err(ResponseError::Empty));
    }

    #[test]
    fn every_short_input_decodes_consistently() {
        // Exhaustive over all 1- and 2-byte inputs and all 3-byte ones with route_len 1 or 2.
        let check = |buf: &[u8]| match decode_header(buf) {
            Ok(Some((route, len))) => {
                assert_eq!(len, 1 + usize::from(buf[0]));
                assert_eq!(route.as_bytes(), &buf[1..len]);
            }
            Ok(None) => assert!(buf.is_empty() || buf.len() < 1 + usize::from(buf[0])),
            Err(HeaderError::EmptyRoute) => assert_eq!(buf[0], 0),
            Err(HeaderError::BadUtf8) => {
                let end = 1 + usize::from(buf[0]);
                assert!(std::str::from_utf8(&buf[1..end]).is_err())
            }
            Err(e) => panic!("unexpected {e:?} for {buf:?}"),
        };
        for a in 0..=255u8 {
            check(&[a]);
            assert_eq!(decode_status(&[a]).is_ok(), a <= 5);
            for b in 0..=255u8 {
                check(&[a, b]);
                check(&[1, a, b]);
                check(&[2, a, b]);
            }
        }
    }
}
