//! The requester's side of a stream: one request ([`request`]) on a new bidirectional
//! stream, or one one-way message ([`send`]) on a new unidirectional stream.
//!
//! Every wait on the peer is bounded by a deadline, and the answer by a size limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::time::{timeout_at, Instant};

use crate::error::{Body, ProtocolError, RequestError};
use crate::framing::{read_body, write_framed, BodyError};
use crate::identity::PeerId;
use crate::peers::PeerConnection;
use crate::policy::Interruption;
use crate::transport_error::{is_duplicate_close, request_error};
use crate::wire::{self, code, Status};

/// A failed request or message, and what interrupted it if the peer cannot have
/// processed it (so that [`crate::policy::may_resend`] can decide on sending it again).
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: RequestError,
    pub interrupted: Option<Interruption>,
}

impl From<RequestError> for Failure {
    fn from(error: RequestError) -> Self {
        Failure {
            error,
            interrupted: None,
        }
    }
}

/// What a requester is talking to.
pub(crate) struct Target<'a> {
    conn: &'a PeerConnection,
    peer: PeerId,
    route: &'a str,
}

impl<'a> Target<'a> {
    pub fn new(conn: &'a PeerConnection, route: &'a str) -> Self {
        Target {
            conn,
            peer: conn.peer,
            route,
        }
    }

    pub fn lost(&self, err: &ConnectionError) -> Failure {
        let interrupted = is_duplicate_close(err).then_some(Interruption::DuplicateClosed);
        let addr = self.conn.conn.remote_address();
        Failure {
            error: request_error(self.peer, addr, err.clone()),
            interrupted,
        }
    }

    pub fn zero_rtt_rejected(&self) -> Failure {
        // quinn also reports a 0-RTT stream as rejected when its connection closed before
        // the handshake completed (for example `Node::disconnect`): that is a lost
        // connection, not a rejection to re-send after.
        if let Some(closed) = self.conn.conn.close_reason() {
            return self.lost(&closed);
        }
        Failure {
            error: RequestError::ZeroRttRejected { peer: self.peer },
            interrupted: Some(Interruption::ZeroRttRejected),
        }
    }

    pub fn write_failed(&self, err: WriteError) -> Failure {
        match err {
            WriteError::Stopped(stop) => self.stopped(stop.into_inner()).into(),
            WriteError::ConnectionLost(e) => self.lost(&e),
            WriteError::ZeroRttRejected => self.zero_rtt_rejected(),
            WriteError::ClosedStream => self.protocol(ProtocolError::ClosedStream),
        }
    }

    pub fn read_failed(&self, err: ReadError) -> Failure {
        match err {
            ReadError::ConnectionLost(e) => self.lost(&e),
            ReadError::ZeroRttRejected => self.zero_rtt_rejected(),
            ReadError::Reset(code) => self.reset(code.into_inner()).into(),
            other => self.protocol(ProtocolError::Read(Box::new(other))),
        }
    }

    pub fn protocol(&self, source: ProtocolError) -> Failure {
        RequestError::Protocol {
            peer: self.peer,
            route: self.route.to_string(),
            source,
        }
        .into()
    }

    pub fn timed_out(&self, after: Duration) -> Failure {
        RequestError::Timeout {
            peer: self.peer,
            route: self.route.to_string(),
            after,
        }
        .into()
    }

    pub fn too_large(&self, body: Body, message: String) -> RequestError {
        RequestError::TooLarge {
            peer: self.peer,
            route: self.route.to_string(),
            body,
            message,
        }
    }

    pub fn remote(&self, status: Status, message: String) -> RequestError {
        RequestError::Remote {
            peer: self.peer,
            route: self.route.to_string(),
            status,
            message,
        }
    }

    /// The error for an answer stream the peer reset with `code`. The handler may have
    /// run (an answer abandoned as unread, or stalled past the peer's `answer_timeout`),
    /// so nothing here invites a retry.
    fn reset(&self, code: u64) -> RequestError {
        RequestError::Protocol {
            peer: self.peer,
            route: self.route.to_string(),
            source: ProtocolError::Reset { code },
        }
    }

    fn peer_timed_out(&self) -> RequestError {
        RequestError::PeerTimedOut {
            peer: self.peer,
            route: self.route.to_string(),
        }
    }

    /// The error for a stream the peer stopped with `stop` (when no answer explains it).
    pub fn stopped(&self, stop: u64) -> RequestError {
        let status = match u32::try_from(stop) {
            Ok(code::TIMED_OUT) => return self.peer_timed_out(),
            Ok(code::TOO_LARGE) => {
                let message = "the peer stopped reading: over its size limit".into();
                return self.too_large(Body::Request, message);
            }
            Ok(code::UNKNOWN_ROUTE) => Status::UnknownRoute,
            Ok(code::BAD_REQUEST) => Status::BadRequest,
            Ok(code::BUSY | code::SHUTTING_DOWN) => Status::Busy,
            _ => {
                return RequestError::Protocol {
                    peer: self.peer,
                    route: self.route.to_string(),
                    source: ProtocolError::Stopped { code: stop },
                }
            }
        };
        let message = format!("the peer stopped the stream: {}", code::describe(stop));
        self.remote(status, message)
    }
}

/// Sends one request on a new bidirectional stream and reads the answer, by `deadline`.
/// The deadline passing, or the future being dropped, resets the stream so the peer
/// stops working on it.
pub(crate) async fn request(
    conn: &Arc<PeerConnection>,
    route: &str,
    body: Bytes,
    max_response_size: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<Bytes, Failure> {
    let _active = conn.stream_guard();
    let target = Target::new(conn, route);
    // One timer for the whole exchange; the deadline dropping the work resets the stream.
    let work = async {
        let (send, recv) = conn.conn.open_bi().await.map_err(|e| target.lost(&e))?;
        let mut streams = CancelOnDrop {
            send,
            recv,
            armed: true,
        };
        let result = exchange(&mut streams, &target, body, max_response_size).await;
        streams.armed = false;
        result
    };
    timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| Err(target.timed_out(timeout)))
}

/// Resets both halves of a request stream unless the exchange completed.
struct CancelOnDrop {
    send: SendStream,
    recv: RecvStream,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.send.reset(VarInt::from_u32(code::CANCELLED));
            let _ = self.recv.stop(VarInt::from_u32(code::CANCELLED));
        }
    }
}

async fn exchange(
    streams: &mut CancelOnDrop,
    target: &Target<'_>,
    body: Bytes,
    max_response_size: u64,
) -> Result<Bytes, Failure> {
    let header = Bytes::from(wire::encode_header(target.route));
    let stopped = match write_framed(&mut streams.send, header, body).await {
        Ok(()) => {
            let _ = streams.send.finish();
            None
        }
        // The peer refused the body; its answer says why.
        Err(WriteError::Stopped(stop)) => Some(stop.into_inner()),
        Err(e) => return Err(target.write_failed(e)),
    };

    let limit = usize::try_from(max_response_size).unwrap_or(usize::MAX);
    let (status, body) = match read_answer(&mut streams.recv, limit).await {
        Ok(answer) => answer,
        Err(AnswerError::TooLarge) => {
            let _ = streams.recv.stop(VarInt::from_u32(code::TOO_LARGE));
            let message = format!(
                "answer exceeds this node's max_response_size of {max_response_size} bytes"
            );
            return Err(target.too_large(Body::Response, message).into());
        }
        Err(AnswerError::Read(e @ (ReadError::ConnectionLost(_) | ReadError::ZeroRttRejected))) => {
            return Err(target.read_failed(e))
        }
        // No readable answer. If the peer stopped our body, that says what happened.
        Err(other) => {
            return Err(match (stopped, other) {
                (Some(stop), _) => target.stopped(stop).into(),
                (None, AnswerError::Read(e)) => target.read_failed(e),
                (None, AnswerError::Decode(e)) => target.protocol(ProtocolError::BadAnswer(e)),
                (None, AnswerError::TooLarge) => unreachable!("handled above"),
            })
        }
    };
    let message = || String::from_utf8_lossy(&body).into_owned();
    match status {
        Status::Ok => Ok(body),
        Status::TooLarge => Err(target.too_large(Body::Request, message()).into()),
        status => Err(target.remote(status, message()).into()),
    }
}

enum AnswerError {
    TooLarge,
    Read(ReadError),
    Decode(wire::ResponseError),
}

async fn read_answer(recv: &mut RecvStream, limit: usize) -> Result<(Status, Bytes), AnswerError> {
    // The status byte comes in the first chunk; the body is the rest of it and of the stream
    // (so a body that arrives in one piece after the status byte is not copied).
    let first = loop {
        match recv.read_chunk(limit.saturating_add(1), true).await {
            Ok(Some(chunk)) if chunk.bytes.is_empty() => continue,
            Ok(Some(chunk)) => break chunk.bytes,
            Ok(None) => break Bytes::new(),
            Err(e) => return Err(AnswerError::Read(e)),
        }
    };
    let status = wire::decode_status(&first).map_err(AnswerError::Decode)?;
    // An answer is our own request's: it is bounded by `max_response_size` alone.
    let (body, _) = read_body(recv, first.slice(1..), limit, None)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => AnswerError::TooLarge,
            BodyError::Read(e) => AnswerError::Read(e),
            BodyError::Closing => AnswerError::Read(ReadError::ClosedStream),
        })?;
    Ok((status, body))
}

/// Sends one message on a new unidirectional stream and waits until the peer's QUIC
/// stack has acknowledged all of it (or refused it), by `deadline`.
pub(crate) async fn send(
    conn: &Arc<PeerConnection>,
    route: &str,
    body: Bytes,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Failure> {
    let _active = conn.stream_guard();
    let target = Target::new(conn, route);
    let work = async {
        let mut stream = conn.conn.open_uni().await.map_err(|e| target.lost(&e))?;
        let header = Bytes::from(wire::encode_header(route));
        let stop = match write_framed(&mut stream, header, body).await {
            Ok(()) => {
                let _ = stream.finish();
                match stream.stopped().await {
                    Ok(stop) => stop,
                    Err(quinn::StoppedError::ConnectionLost(e)) => return Err(target.lost(&e)),
                    Err(quinn::StoppedError::ZeroRttRejected) => {
                        return Err(target.zero_rtt_rejected())
                    }
                }
            }
            Err(e) => return Err(target.write_failed(e)),
        };
        match stop {
            None => Ok(()),
            Some(stop) => Err(target.stopped(stop.into_inner()).into()),
        }
    };
    timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| Err(target.timed_out(timeout)))
}
