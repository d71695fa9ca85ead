//! One request or one-way message per QUIC stream, both ends: the requester's side
//! ([`request`], [`send`]) and the answering side ([`serve_request`], [`serve_message`]).
//!
//! Bytes come off the stream, through [`wire`](crate::wire), to a handler, and back.
//! Every wait on the peer is bounded by a deadline, and every body by a size limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, warn, Instrument};

use crate::error::{Direction, Error};
use crate::identity::PeerId;
use crate::metrics::{Metrics, Side};
use crate::peers::Connection;
use crate::router::{call_handler, Handler, RequestContext, Router};
use crate::wire::{self, code, HeaderError, Status};

/// Limits that the answering side applies.
#[derive(Clone)]
pub(crate) struct ServeLimits {
    pub max_request_size: u64,
    pub request_timeout: Duration,
}

/// Who is on the other end of a served stream.
#[derive(Clone)]
pub(crate) struct Remote {
    pub peer: PeerId,
    pub conn: quinn::Connection,
}

/// A failed request or message, and whether sending it again is safe because the peer
/// never processed it (0-RTT data rejected, or a duplicate connection closed under it).
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: Error,
    pub retry: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            error,
            retry: false,
        }
    }
}

/// What a requester is talking to.
struct Target<'a> {
    conn: &'a Connection,
    peer: PeerId,
    route: &'a str,
}

impl<'a> Target<'a> {
    fn new(conn: &'a Connection, route: &'a str) -> Self {
        Target {
            conn,
            peer: conn.peer,
            route,
        }
    }

    fn lost(&self, err: &ConnectionError) -> Failure {
        Failure {
            error: connection_error(self.peer, self.conn.conn.remote_address(), err),
            retry: is_duplicate_close(err),
        }
    }

    fn zero_rtt_rejected(&self) -> Failure {
        Failure {
            error: Error::ConnectionLost {
                peer: self.peer,
                reason: "the peer rejected the 0-RTT data".into(),
            },
            retry: true,
        }
    }

    fn write_failed(&self, err: WriteError) -> Failure {
        match err {
            WriteError::Stopped(stop) => {
                stopped_error(self.peer, self.route, stop.into_inner()).into()
            }
            WriteError::ConnectionLost(e) => self.lost(&e),
            WriteError::ZeroRttRejected => self.zero_rtt_rejected(),
            WriteError::ClosedStream => self.protocol("the stream was closed under us"),
        }
    }

    fn read_failed(&self, err: ReadError) -> Failure {
        match err {
            ReadError::ConnectionLost(e) => self.lost(&e),
            ReadError::ZeroRttRejected => self.zero_rtt_rejected(),
            ReadError::Reset(code) => self.protocol(&format!(
                "the peer reset the answer stream with code {code} ({})",
                code::describe(code.into_inner())
            )),
            other => self.protocol(&other.to_string()),
        }
    }

    fn protocol(&self, reason: &str) -> Failure {
        Error::Protocol {
            peer: self.peer,
            reason: format!("{reason} (route {:?})", self.route),
        }
        .into()
    }

    fn timed_out(&self, after: Duration) -> Failure {
        Error::Timeout {
            peer: self.peer,
            route: self.route.to_string(),
            after,
        }
        .into()
    }
}

// ---------------------------------------------------------------- requester side

/// Sends one request on a new bidirectional stream and reads the answer, by `deadline`.
/// The deadline passing, or the future being dropped, resets the stream so the peer
/// stops working on it.
pub(crate) async fn request(
    conn: &Arc<Connection>,
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
    let (peer, route) = (target.peer, target.route);
    let header = wire::encode_header(route);
    let stopped = match write_framed(&mut streams.send, &header, body).await {
        Ok(()) => {
            let _ = streams.send.finish();
            None
        }
        // The peer refused the body; its answer says why.
        Err(WriteError::Stopped(stop)) => Some(stop.into_inner()),
        Err(e) => return Err(target.write_failed(e)),
    };

    let (status, body) = match read_answer(
        &mut streams.recv,
        usize::try_from(max_response_size).unwrap_or(usize::MAX),
    )
    .await
    {
        Ok(answer) => answer,
        Err(AnswerError::TooLarge) => {
            let _ = streams.recv.stop(VarInt::from_u32(code::TOO_LARGE));
            return Err(Error::TooLarge {
                peer,
                route: route.to_string(),
                direction: Direction::Response,
                message: format!(
                    "answer exceeds this node's max_response_size of {max_response_size} bytes"
                ),
            }
            .into());
        }
        Err(AnswerError::Read(e @ (ReadError::ConnectionLost(_) | ReadError::ZeroRttRejected))) => {
            return Err(target.read_failed(e))
        }
        // No readable answer. If the peer stopped our body, that says what happened.
        Err(other) => {
            return Err(match (stopped, other) {
                (Some(stop), _) => stopped_error(peer, route, stop).into(),
                (None, AnswerError::Read(e)) => target.read_failed(e),
                (None, other) => target.protocol(&format!("bad answer: {other}")),
            })
        }
    };
    match status {
        Status::Ok => Ok(body),
        Status::TooLarge => Err(Error::TooLarge {
            peer,
            route: route.to_string(),
            direction: Direction::Request,
            message: String::from_utf8_lossy(&body).into_owned(),
        }
        .into()),
        status => Err(Error::Remote {
            peer,
            route: route.to_string(),
            status,
            message: String::from_utf8_lossy(&body).into_owned(),
        }
        .into()),
    }
}

/// The error for a stream the peer stopped with `stop` (when no answer explains it).
fn stopped_error(peer: PeerId, route: &str, stop: u64) -> Error {
    let route = route.to_string();
    let status = match stop as u32 {
        code::TOO_LARGE => {
            return Error::TooLarge {
                peer,
                route,
                direction: Direction::Request,
                message: "the peer stopped reading: over its size limit".into(),
            }
        }
        code::UNKNOWN_ROUTE => Status::UnknownRoute,
        code::BAD_REQUEST => Status::BadRequest,
        code::BUSY | code::SHUTTING_DOWN => Status::Busy,
        _ => {
            return Error::Protocol {
                peer,
                reason: format!(
                    "the peer stopped the stream with code {stop} ({})",
                    code::describe(stop)
                ),
            }
        }
    };
    Error::Remote {
        peer,
        route,
        status,
        message: format!("the peer stopped the stream: {}", code::describe(stop)),
    }
}

#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("answer over the size limit")]
    TooLarge,
    #[error("{0}")]
    Read(ReadError),
    #[error("{0}")]
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
    let body = read_body(recv, first.slice(1..), limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => AnswerError::TooLarge,
            BodyError::Read(e) => AnswerError::Read(e),
        })?;
    Ok((status, body))
}

/// Bodies up to this size are copied behind their prefix (header or status byte) and
/// written as one chunk: one STREAM frame, and one read on the other side. Larger ones go
/// as a second chunk, uncopied.
const COALESCE_LIMIT: usize = 256;

/// Writes `prefix` then `body` on `send` (without finishing it).
async fn write_framed(send: &mut SendStream, prefix: &[u8], body: Bytes) -> Result<(), WriteError> {
    if body.len() <= COALESCE_LIMIT {
        let mut joined = BytesMut::with_capacity(prefix.len() + body.len());
        joined.extend_from_slice(prefix);
        joined.extend_from_slice(&body);
        send.write_all_chunks(&mut [joined.freeze()]).await
    } else {
        let prefix = Bytes::copy_from_slice(prefix);
        send.write_all_chunks(&mut [prefix, body]).await
    }
}

/// Sends one message on a new unidirectional stream and waits until the peer's QUIC
/// stack has acknowledged all of it (or refused it), by `deadline`.
pub(crate) async fn send(
    conn: &Arc<Connection>,
    route: &str,
    body: Bytes,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Failure> {
    let _active = conn.stream_guard();
    let target = Target::new(conn, route);
    let work = async {
        let mut stream = conn.conn.open_uni().await.map_err(|e| target.lost(&e))?;
        let header = wire::encode_header(route);
        let stop = match write_framed(&mut stream, &header, body).await {
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
            Some(stop) => Err(stopped_error(target.peer, route, stop.into_inner()).into()),
        }
    };
    let result = timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| Err(target.timed_out(timeout)));
    // A message may have been processed even though its connection then closed as a
    // duplicate: only a 0-RTT rejection makes re-sending it safe.
    result.map_err(|mut failure| {
        if failure.retry && target.conn.conn.close_reason().is_some() {
            failure.retry = false;
        }
        failure
    })
}

/// Whether the peer closed the connection as the loser of a simultaneous dial.
fn is_duplicate_close(err: &ConnectionError) -> bool {
    matches!(err, ConnectionError::ApplicationClosed(close)
        if close.error_code.into_inner() == u64::from(code::CLOSE_DUPLICATE))
}

/// Turns a connection failure into an error that says what closed it.
pub(crate) fn connection_error(peer: PeerId, addr: SocketAddr, err: &ConnectionError) -> Error {
    let reason = match err {
        ConnectionError::ApplicationClosed(close) => {
            let why = String::from_utf8_lossy(&close.reason).into_owned();
            match close.error_code.into_inner() as u32 {
                code::CLOSE_SHUTDOWN => format!("the peer shut down ({why})"),
                code::CLOSE_DUPLICATE => {
                    format!("the peer closed a duplicate connection ({why})")
                }
                code::CLOSE_REFUSED => {
                    return Error::Refused {
                        peer,
                        reason: format!("the peer refused us: {why}"),
                    }
                }
                other => format!("the peer closed the connection with code {other} ({why})"),
            }
        }
        ConnectionError::ConnectionClosed(close) => {
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED {
                return Error::Refused {
                    peer,
                    reason:
                        "the peer refused the connection (at a connection limit, or shutting down)"
                            .into(),
                };
            }
            if let Some(alert) = crypto_alert(close.error_code) {
                if is_certificate_alert(alert) {
                    return Error::CertificateRejected {
                        peer,
                        addr,
                        reason: tls_reason(alert, &close.reason),
                    };
                }
                format!(
                    "the peer ended the TLS session: {}",
                    tls_reason(alert, &close.reason)
                )
            } else {
                format!("the peer closed the connection: {close}")
            }
        }
        ConnectionError::TimedOut => {
            "no answer from the peer within the idle timeout (peer down or unreachable)".into()
        }
        ConnectionError::LocallyClosed => {
            "this node closed the connection (shutdown, disconnect, or a 0-RTT handshake that did not complete in time)".into()
        }
        ConnectionError::Reset => "the peer reset the connection (it may have restarted)".into(),
        other => other.to_string(),
    };
    Error::ConnectionLost { peer, reason }
}

/// The TLS alert carried by a QUIC CRYPTO_ERROR code (0x100 to 0x1ff).
pub(crate) fn crypto_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    // `checked_sub`, not `then_some(code - 0x100)`: that would be evaluated for any code.
    code.checked_sub(0x100)
        .filter(|alert| *alert <= 0xff)
        .map(|alert| alert as u8)
}

/// Alerts that say the peer did not accept our certificate.
pub(crate) fn is_certificate_alert(alert: u8) -> bool {
    // bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
    // certificate_unknown, unknown_ca, access_denied, decrypt_error (bad CertificateVerify),
    // certificate_required.
    matches!(alert, 42..=46 | 48 | 49 | 51 | 116)
}

pub(crate) fn tls_reason(alert: u8, reason: &[u8]) -> String {
    let name = match alert {
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => "alert",
    };
    let text = String::from_utf8_lossy(reason);
    if text.is_empty() {
        format!("TLS alert {alert} ({name})")
    } else {
        format!("TLS alert {alert} ({name}): {text}")
    }
}

// ---------------------------------------------------------------- answering side

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Read(ReadError),
}

/// Reads the rest of a stream after `first`, up to `limit` bytes in all. A body that
/// arrives in one piece is returned without copying.
async fn read_body(recv: &mut RecvStream, first: Bytes, limit: usize) -> Result<Bytes, BodyError> {
    if first.len() > limit {
        return Err(BodyError::TooLarge);
    }
    let mut total = first.len();
    let mut single = first;
    let mut joined: Option<BytesMut> = None;
    loop {
        // Ask for at most one byte past the limit, so an over-long body is noticed.
        let chunk = match recv
            .read_chunk((limit - total).saturating_add(1), true)
            .await
        {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => break,
            Err(e) => return Err(BodyError::Read(e)),
        };
        total += chunk.len();
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        if joined.is_none() && single.is_empty() {
            single = chunk;
            continue;
        }
        let buf = joined.get_or_insert_with(|| {
            let mut buf = BytesMut::with_capacity(total.max(2 * single.len()));
            buf.extend_from_slice(&single);
            buf
        });
        buf.extend_from_slice(&chunk);
    }
    Ok(joined.map_or(single, BytesMut::freeze))
}

/// Reads a route header. Returns what `resolve` makes of the route, and whatever body
/// bytes came with the header.
async fn read_header<T>(
    recv: &mut RecvStream,
    resolve: impl FnOnce(&str) -> T,
) -> Result<(T, Bytes), HeaderFailure> {
    let mut pending = Bytes::new();
    loop {
        match wire::decode_header(&pending) {
            Ok(Some((route, len))) => return Ok((resolve(route), pending.slice(len..))),
            Ok(None) => {}
            Err(e) => return Err(HeaderFailure::Malformed(e)),
        }
        // The header is at most 256 bytes: ask for no more than it can still need.
        let want = 1 + wire::MAX_ROUTE_LEN - pending.len().min(wire::MAX_ROUTE_LEN);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) if pending.is_empty() => pending = chunk.bytes,
            Ok(Some(chunk)) => {
                let mut joined = BytesMut::with_capacity(pending.len() + chunk.bytes.len());
                joined.extend_from_slice(&pending);
                joined.extend_from_slice(&chunk.bytes);
                pending = joined.freeze();
            }
            Ok(None) => return Err(HeaderFailure::Malformed(wire::header_truncated(&pending))),
            Err(e) => return Err(HeaderFailure::Read(e)),
        }
    }
}

enum HeaderFailure {
    Malformed(HeaderError),
    Read(ReadError),
}

/// Writes an answer (status byte, body, FIN) within `deadline`.
async fn answer(send: &mut SendStream, status: Status, body: Bytes, deadline: Instant) {
    let status_byte = [wire::encode_status(status)];
    match timeout_at(deadline, write_framed(send, &status_byte, body)).await {
        Ok(Ok(())) => {
            let _ = send.finish();
        }
        Ok(Err(e)) => debug!("answer not delivered: {e}"),
        Err(_) => {
            debug!("peer did not read its answer in time; resetting the stream");
            let _ = send.reset(VarInt::from_u32(code::TIMED_OUT));
        }
    }
}

async fn refuse(
    send: &mut SendStream,
    recv: &mut RecvStream,
    status: Status,
    stop_code: u32,
    message: String,
    deadline: Instant,
) {
    let _ = recv.stop(VarInt::from_u32(stop_code));
    answer(send, status, Bytes::from(message), deadline).await;
}

/// How serving a stream ended, for metrics and logs: the route label (a registered
/// route, `unknown`, or `malformed`) and a status.
struct Outcome {
    route: Arc<str>,
    status: &'static str,
}

impl Outcome {
    fn new(route: &Arc<str>, status: &'static str) -> Self {
        Outcome {
            route: route.clone(),
            status,
        }
    }

    /// For a stream whose route is not a registered one.
    fn unregistered(label: &'static str, status: &'static str) -> Self {
        Outcome {
            route: Arc::from(label),
            status,
        }
    }
}

/// Why an incoming request or message was not read in full.
enum Refusal {
    /// The header is malformed.
    Malformed(HeaderError),
    /// No handler for the route.
    UnknownRoute(String),
    /// The body is over `max_request_size`.
    TooLarge(Arc<str>, usize),
    /// The peer did not send it all within `request_timeout` (route, if known).
    TimedOut(Option<Arc<str>>),
    /// The stream broke (route, if known).
    Broken(Option<Arc<str>>),
}

impl Refusal {
    /// The STOP_SENDING code to send, if any.
    fn stop_code(&self) -> Option<u32> {
        match self {
            Refusal::Malformed(_) => Some(code::BAD_REQUEST),
            Refusal::UnknownRoute(_) => Some(code::UNKNOWN_ROUTE),
            Refusal::TooLarge(..) => Some(code::TOO_LARGE),
            Refusal::TimedOut(_) => Some(code::TIMED_OUT),
            Refusal::Broken(_) => None,
        }
    }

    /// The answer to send (status and message), if one can be sent.
    fn answer(&self) -> Option<(Status, String)> {
        match self {
            Refusal::Malformed(e) => {
                Some((Status::BadRequest, format!("malformed request header: {e}")))
            }
            Refusal::UnknownRoute(route) => Some((
                Status::UnknownRoute,
                format!("no handler for route {route:?}"),
            )),
            Refusal::TooLarge(_, limit) => Some((
                Status::TooLarge,
                format!("request body exceeds the peer's max_request_size of {limit} bytes"),
            )),
            Refusal::TimedOut(_) | Refusal::Broken(_) => None,
        }
    }

    /// The route and status labels for metrics.
    fn outcome(&self) -> Outcome {
        let known = |route: &Option<Arc<str>>| route.clone().unwrap_or_else(|| "malformed".into());
        match self {
            Refusal::Malformed(_) => Outcome::unregistered("malformed", "bad_request"),
            Refusal::UnknownRoute(_) => Outcome::unregistered("unknown", "unknown_route"),
            Refusal::TooLarge(route, _) => Outcome::new(route, "too_large"),
            Refusal::TimedOut(route) => Outcome {
                route: known(route),
                status: "timed_out",
            },
            Refusal::Broken(route) => Outcome {
                route: known(route),
                status: "stream_error",
            },
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.answer() {
            Some((_, message)) => f.write_str(&message),
            None if matches!(self, Refusal::TimedOut(_)) => f.write_str("the peer was too slow"),
            None => f.write_str("the stream broke"),
        }
    }
}

/// Reads a request or message: its header, its handler, and its whole body, by `deadline`
/// (one timer for both).
async fn read_request<'r>(
    router: &'r Router,
    recv: &mut RecvStream,
    limits: &ServeLimits,
    deadline: Instant,
) -> Result<(Arc<str>, &'r Arc<dyn Handler>, Bytes), Refusal> {
    let mut route_read: Option<Arc<str>> = None;
    let work = async {
        let resolve = |route: &str| router.get(route).ok_or_else(|| route.to_string());
        let (handler, first) = match read_header(recv, resolve).await {
            Ok((Ok((route, handler)), first)) => {
                route_read = Some(route.clone());
                (handler, first)
            }
            Ok((Err(unknown), _)) => return Err(Refusal::UnknownRoute(unknown)),
            Err(HeaderFailure::Malformed(e)) => return Err(Refusal::Malformed(e)),
            Err(HeaderFailure::Read(e)) => {
                debug!("stream failed: {e}");
                return Err(Refusal::Broken(None));
            }
        };
        let limit = usize::try_from(limits.max_request_size).unwrap_or(usize::MAX);
        let route = || route_read.clone();
        match read_body(recv, first, limit).await {
            Ok(body) => Ok((handler, body)),
            Err(BodyError::TooLarge) => Err(Refusal::TooLarge(route().unwrap_or_default(), limit)),
            Err(BodyError::Read(e)) => {
                debug!("stream failed: {e}");
                Err(Refusal::Broken(route()))
            }
        }
    };
    match timeout_at(deadline, work).await {
        Ok(Ok((handler, body))) => Ok((route_read.unwrap_or_default(), handler, body)),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(Refusal::TimedOut(route_read)),
    }
}

/// Answers one request stream (the answer is BUSY with the reason when `busy` is set),
/// and records it in the metrics and a `request` span.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_request(
    router: &Router,
    metrics: &Metrics,
    remote: Remote,
    limits: &ServeLimits,
    slots: &Arc<Semaphore>,
    closing: bool,
    send: SendStream,
    recv: RecvStream,
) {
    let started = std::time::Instant::now();
    let span = tracing::debug_span!(
        "request",
        peer = %remote.peer.short(),
        stream = %send.id(),
        route = tracing::field::Empty,
        status = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    );
    let outcome = answer_request(router, remote, limits, slots, closing, send, recv)
        .instrument(span.clone())
        .await;
    let took = started.elapsed();
    span.record("route", &*outcome.route);
    span.record("status", outcome.status);
    span.record("duration_us", took.as_micros() as u64);
    metrics.request_done(Side::Server, &outcome.route, outcome.status, took);
}

async fn answer_request(
    router: &Router,
    remote: Remote,
    limits: &ServeLimits,
    slots: &Arc<Semaphore>,
    closing: bool,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Outcome {
    let deadline = Instant::now() + limits.request_timeout;
    if closing {
        let msg = "the node is shutting down".to_string();
        let (status, stop) = (Status::Busy, code::SHUTTING_DOWN);
        refuse(&mut send, &mut recv, status, stop, msg, deadline).await;
        return Outcome::unregistered("unknown", "busy");
    }
    let (route, handler, body) = match read_request(router, &mut recv, limits, deadline).await {
        Ok(read) => read,
        Err(refusal) => {
            debug!(peer = %remote.peer, "request refused: {refusal}");
            if let Some(stop) = refusal.stop_code() {
                let _ = recv.stop(VarInt::from_u32(stop));
            }
            match refusal.answer() {
                Some((status, message)) => {
                    answer(&mut send, status, Bytes::from(message), deadline).await
                }
                None if matches!(refusal, Refusal::TimedOut(_)) => {
                    let _ = send.reset(VarInt::from_u32(code::TIMED_OUT));
                }
                None => {}
            }
            return refusal.outcome();
        }
    };
    // A slot for the handler is taken only now, with the whole request read: a peer that
    // stalls while sending holds its own stream, never a slot others need.
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        let msg = "the node is at its limit of concurrent requests (max_concurrent_requests); retry later";
        answer(
            &mut send,
            Status::Busy,
            Bytes::from_static(msg.as_bytes()),
            deadline,
        )
        .await;
        return Outcome::new(&route, "busy");
    };
    let ctx = RequestContext {
        peer: remote.peer,
        conn: remote.conn,
        route: route.clone(),
        one_way: false,
        early_data: recv.is_0rtt(),
    };
    // The handler runs until it answers or the requester gives up (stops our send side).
    let cancelled = send.stopped();
    // Biased: a handler that answers at once never registers for the stop (a lock on the
    // connection).
    let result = tokio::select! {
        biased;
        result = call_handler(handler.as_ref(), ctx, body) => result,
        _ = cancelled => {
            debug!("requester cancelled; handler dropped");
            return Outcome::new(&route, "cancelled");
        }
    };
    let deadline = Instant::now() + limits.request_timeout;
    match result {
        Ok(body) => {
            answer(&mut send, Status::Ok, body, deadline).await;
            Outcome::new(&route, "ok")
        }
        Err(e) => {
            debug!(peer = %remote.peer, "handler failed: {e}");
            let status = if e.status == Status::Busy {
                "busy"
            } else {
                "handler_error"
            };
            answer(&mut send, e.status, Bytes::from(e.message), deadline).await;
            Outcome::new(&route, status)
        }
    }
}

/// Delivers one one-way message to its handler, and records it.
pub(crate) async fn serve_message(
    router: &Router,
    metrics: &Metrics,
    remote: Remote,
    limits: &ServeLimits,
    slots: &Arc<Semaphore>,
    recv: RecvStream,
) {
    let started = std::time::Instant::now();
    let span = tracing::debug_span!("message", peer = %remote.peer.short(), stream = %recv.id());
    let outcome = deliver_message(router, remote, limits, slots, recv)
        .instrument(span)
        .await;
    metrics.request_done(
        Side::Server,
        &outcome.route,
        outcome.status,
        started.elapsed(),
    );
}

async fn deliver_message(
    router: &Router,
    remote: Remote,
    limits: &ServeLimits,
    slots: &Arc<Semaphore>,
    mut recv: RecvStream,
) -> Outcome {
    let deadline = Instant::now() + limits.request_timeout;
    let (route, handler, body) = match read_request(router, &mut recv, limits, deadline).await {
        Ok(read) => read,
        Err(refusal) => {
            warn!(peer = %remote.peer, "dropped a one-way message: {refusal}");
            if let Some(stop) = refusal.stop_code() {
                let _ = recv.stop(VarInt::from_u32(stop));
            }
            return refusal.outcome();
        }
    };
    // As for requests, a handler slot is taken once the message is read. With no answer to
    // say BUSY in, the message waits for a slot until its deadline.
    let Ok(Ok(_slot)) = timeout_at(deadline, slots.clone().acquire_owned()).await else {
        warn!(peer = %remote.peer, "dropped a one-way message on {route:?}: node at max_concurrent_requests or shutting down");
        return Outcome::new(&route, "busy");
    };
    let ctx = RequestContext {
        peer: remote.peer,
        conn: remote.conn,
        route: route.clone(),
        one_way: true,
        early_data: recv.is_0rtt(),
    };
    match call_handler(handler.as_ref(), ctx, body).await {
        Ok(_) => Outcome::new(&route, "ok"),
        Err(e) => {
            warn!(peer = %remote.peer, "one-way handler failed: {e}");
            Outcome::new(&route, "handler_error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_alerts_are_read_from_crypto_error_codes_only() {
        use quinn::TransportErrorCode as Code;
        assert_eq!(crypto_alert(Code::crypto(45)), Some(45));
        assert_eq!(crypto_alert(Code::crypto(0)), Some(0));
        assert_eq!(crypto_alert(Code::crypto(0xff)), Some(0xff));
        // Transport codes below the CRYPTO_ERROR range (the overflow this guards against).
        for other in [
            Code::NO_ERROR,
            Code::INTERNAL_ERROR,
            Code::CONNECTION_REFUSED,
            Code::PROTOCOL_VIOLATION,
            Code::AEAD_LIMIT_REACHED,
        ] {
            assert_eq!(crypto_alert(other), None, "code {other:?}");
        }
    }

    #[test]
    fn tls_reasons_name_the_alert() {
        let text = tls_reason(45, b"invalid peer certificate: Expired");
        assert_eq!(
            text,
            "TLS alert 45 (certificate_expired): invalid peer certificate: Expired"
        );
        assert_eq!(
            tls_reason(120, b""),
            "TLS alert 120 (no_application_protocol)"
        );
        assert!(is_certificate_alert(45) && is_certificate_alert(116));
        assert!(!is_certificate_alert(120));
    }
}
