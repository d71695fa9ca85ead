//! The answering side of a stream: a request the peer opened ([`Serving::request`]) or a
//! one-way message ([`Serving::message`]).
//!
//! Bytes come off the stream, through [`wire`](crate::wire), to a handler, and back.
//! Every wait on the peer is bounded by a deadline, and every body by a size limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, warn, Instrument};

use crate::framing::{read_body, write_framed, BodyError};
use crate::handler::{call_handler, Handler, RequestContext, Router};
use crate::identity::PeerId;
use crate::metrics::{Metrics, Outcome, Side};
use crate::wire::{self, code, HeaderError, Status};

/// Limits that the answering side applies.
#[derive(Clone)]
pub(crate) struct ServeLimits {
    pub max_request_size: u64,
    pub request_timeout: Duration,
}

/// Everything serving one stream needs: the node's routes, metrics, limits and handler
/// slots, and who is on the other end.
pub(crate) struct Serving<'a> {
    pub router: &'a Router,
    pub metrics: &'a Metrics,
    pub limits: &'a ServeLimits,
    /// One permit per running handler.
    pub slots: &'a Arc<Semaphore>,
    pub peer: PeerId,
    pub conn: quinn::Connection,
}

/// How serving a stream ended, for metrics and logs: the route label (a registered
/// route, `unknown`, or `malformed`) and the outcome.
struct Served {
    route: Arc<str>,
    outcome: Outcome,
}

impl Served {
    fn new(route: &Arc<str>, outcome: Outcome) -> Self {
        Served {
            route: route.clone(),
            outcome,
        }
    }

    /// For a stream whose route is not a registered one.
    fn unregistered(label: &'static str, outcome: Outcome) -> Self {
        Served {
            route: Arc::from(label),
            outcome,
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

    /// The route and outcome labels for metrics.
    fn served(&self) -> Served {
        let known = |route: &Option<Arc<str>>| route.clone().unwrap_or_else(|| "malformed".into());
        match self {
            Refusal::Malformed(_) => Served::unregistered("malformed", Outcome::BadRequest),
            Refusal::UnknownRoute(_) => Served::unregistered("unknown", Outcome::UnknownRoute),
            Refusal::TooLarge(route, _) => Served::new(route, Outcome::TooLarge),
            Refusal::TimedOut(route) => Served {
                route: known(route),
                outcome: Outcome::TimedOut,
            },
            Refusal::Broken(route) => Served {
                route: known(route),
                outcome: Outcome::StreamError,
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

impl Serving<'_> {
    /// Answers one request stream (BUSY, with the reason, when `closing`), and records
    /// it in the metrics and a `request` span.
    pub async fn request(&self, closing: bool, send: SendStream, recv: RecvStream) {
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            "request",
            peer = %self.peer.short(),
            stream = %send.id(),
            route = tracing::field::Empty,
            status = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        );
        let served = self
            .answer_request(closing, send, recv)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        span.record("route", &*served.route);
        span.record("status", served.outcome.as_str());
        span.record("duration_us", took.as_micros() as u64);
        let metrics = self.metrics;
        metrics.request_done(Side::Server, &served.route, served.outcome, took);
    }

    async fn answer_request(
        &self,
        closing: bool,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Served {
        let deadline = Instant::now() + self.limits.request_timeout;
        if closing {
            let _ = recv.stop(VarInt::from_u32(code::SHUTTING_DOWN));
            let msg = Bytes::from_static(b"the node is shutting down");
            answer(&mut send, Status::Busy, msg, deadline).await;
            return Served::unregistered("unknown", Outcome::Busy);
        }
        let (route, handler, body) = match self.read_request(&mut recv, deadline).await {
            Ok(read) => read,
            Err(refusal) => {
                debug!(peer = %self.peer, "request refused: {refusal}");
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
                return refusal.served();
            }
        };
        // A slot for the handler is taken only now, with the whole request read: a peer
        // that stalls while sending holds its own stream, never a slot others need.
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            let msg = "the node is at its limit of concurrent requests (max_concurrent_requests); retry later";
            answer(
                &mut send,
                Status::Busy,
                Bytes::from_static(msg.as_bytes()),
                deadline,
            )
            .await;
            return Served::new(&route, Outcome::Busy);
        };
        let ctx = self.context(&route, false, recv.is_0rtt());
        // The handler runs until it answers or the requester gives up (stops our send side).
        let cancelled = send.stopped();
        // Biased: a handler that answers at once never registers for the stop (a lock on
        // the connection).
        let result = tokio::select! {
            biased;
            result = call_handler(handler.as_ref(), ctx, body) => result,
            _ = cancelled => {
                debug!("requester cancelled; handler dropped");
                return Served::new(&route, Outcome::Cancelled);
            }
        };
        let deadline = Instant::now() + self.limits.request_timeout;
        match result {
            Ok(body) => {
                answer(&mut send, Status::Ok, body, deadline).await;
                Served::new(&route, Outcome::Ok)
            }
            Err(e) => {
                debug!(peer = %self.peer, "handler failed: {e}");
                let outcome = if e.status == Status::Busy {
                    Outcome::Busy
                } else {
                    Outcome::HandlerError
                };
                answer(&mut send, e.status, Bytes::from(e.message), deadline).await;
                Served::new(&route, outcome)
            }
        }
    }

    /// Delivers one one-way message to its handler, and records it.
    pub async fn message(&self, recv: RecvStream) {
        let started = std::time::Instant::now();
        let span = tracing::debug_span!("message", peer = %self.peer.short(), stream = %recv.id());
        let served = self.deliver_message(recv).instrument(span).await;
        let took = started.elapsed();
        let metrics = self.metrics;
        metrics.request_done(Side::Server, &served.route, served.outcome, took);
    }

    async fn deliver_message(&self, mut recv: RecvStream) -> Served {
        let deadline = Instant::now() + self.limits.request_timeout;
        let (route, handler, body) = match self.read_request(&mut recv, deadline).await {
            Ok(read) => read,
            Err(refusal) => {
                warn!(peer = %self.peer, "dropped a one-way message: {refusal}");
                if let Some(stop) = refusal.stop_code() {
                    let _ = recv.stop(VarInt::from_u32(stop));
                }
                return refusal.served();
            }
        };
        // As for requests, a handler slot is taken once the message is read. With no
        // answer to say BUSY in, the message waits for a slot until its deadline.
        let Ok(Ok(_slot)) = timeout_at(deadline, self.slots.clone().acquire_owned()).await else {
            warn!(peer = %self.peer, "dropped a one-way message on {route:?}: node at max_concurrent_requests or shutting down");
            return Served::new(&route, Outcome::Busy);
        };
        let ctx = self.context(&route, true, recv.is_0rtt());
        match call_handler(handler.as_ref(), ctx, body).await {
            Ok(_) => Served::new(&route, Outcome::Ok),
            Err(e) => {
                warn!(peer = %self.peer, "one-way handler failed: {e}");
                Served::new(&route, Outcome::HandlerError)
            }
        }
    }

    fn context(&self, route: &Arc<str>, one_way: bool, early_data: bool) -> RequestContext {
        RequestContext {
            peer: self.peer,
            conn: self.conn.clone(),
            route: route.clone(),
            one_way,
            early_data,
        }
    }

    /// Reads a request or message: its header, its handler, and its whole body, by
    /// `deadline` (one timer for both).
    async fn read_request(
        &self,
        recv: &mut RecvStream,
        deadline: Instant,
    ) -> Result<(Arc<str>, &Arc<dyn Handler>, Bytes), Refusal> {
        let mut route_read: Option<Arc<str>> = None;
        let work = async {
            let router = self.router;
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
            let limit = usize::try_from(self.limits.max_request_size).unwrap_or(usize::MAX);
            let route = || route_read.clone();
            match read_body(recv, first, limit).await {
                Ok(body) => Ok((handler, body)),
                Err(BodyError::TooLarge) => {
                    Err(Refusal::TooLarge(route().unwrap_or_default(), limit))
                }
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
}

enum HeaderFailure {
    Malformed(HeaderError),
    Read(ReadError),
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
