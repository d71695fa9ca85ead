//! The answering side of a stream: a request the peer opened ([`Serving::request`]) or a
//! one-way message ([`Serving::message`]).
//!
//! Bytes come off the stream, through [`wire`](crate::wire), to a handler, and back.
//! Every wait on the peer is bounded by a deadline, and every body by a size limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use crate::budget::{ByteBudget, Held};
use crate::framing::{
    poll_once, read_body, status_chunk, write_framed_within, BodyError, Deadline, Stalled,
};
use crate::handler::{call_handler, CatchUnwind, RequestContext, Route, RouteKind, Router};
use crate::log_limit::{peer_warn, Rarely};
use crate::metrics::{Metrics, Outcome, RouteCache, Side};
use crate::peers::PeerConnection;
use crate::tally::{Lent, Taken, Tally};
use crate::transfer::StreamRoute;
use crate::wire::{self, code, HeaderError, Status};

/// Limits that the answering side applies.
#[derive(Clone)]
pub(crate) struct ServeLimits {
    pub max_request_size: u64,
    pub request_timeout: Duration,
    /// How long an answer may make no progress (the peer not reading it).
    pub answer_timeout: Duration,
    /// Answers in a row a peer may leave unread before it loses its connection.
    pub max_stalls: u32,
}

/// Everything serving one stream needs: the node's routes, metrics, limits and handler
/// slots, and who is on the other end.
pub(crate) struct Serving<'a> {
    pub router: &'a Router,
    pub metrics: &'a Metrics,
    pub limits: &'a ServeLimits,
    /// One permit per running handler.
    pub slots: &'a Arc<Tally>,
    /// One permit per answer being written (shutdown waits for them).
    pub answers: &'a Arc<Tally>,
    /// One permit per streaming request or message being served.
    pub transfers: &'a Arc<Tally>,
    /// The node's budget of request bytes held in memory.
    pub bytes: &'a Arc<Semaphore>,
    /// The connection, as the pool knows it: who is on the other end, what that peer
    /// may hold of this node, and whether the handshake is complete.
    pub connection: &'a Arc<PeerConnection>,
    /// Set when the node starts shutting down.
    pub closing: &'a std::sync::atomic::AtomicBool,
    /// Warnings the peer's doing causes: one a second at WARN, the rest at DEBUG.
    pub warnings: &'a Rarely,
}

/// How serving a stream ended, for metrics and logs: the route label (a registered
/// route, `unknown`, or `malformed`) and the outcome.
pub(crate) struct Served {
    pub route: Arc<str>,
    pub outcome: Outcome,
    /// The route's metric handles, for an answered request of a registered route.
    pub cache: Option<Arc<RouteCache>>,
}

impl Served {
    pub fn new(route: &Arc<str>, outcome: Outcome) -> Self {
        Served {
            route: route.clone(),
            outcome,
            cache: None,
        }
    }

    /// An answered request of the registered `route` called `name`.
    pub fn ok(name: &Arc<str>, route: &Route) -> Self {
        Served {
            route: name.clone(),
            outcome: Outcome::Ok,
            cache: Some(route.metrics.clone()),
        }
    }

    /// For a stream whose route is not a registered one.
    fn unregistered(label: &'static str, outcome: Outcome) -> Self {
        Served {
            route: Arc::from(label),
            outcome,
            cache: None,
        }
    }

    /// Counts it in the metrics.
    pub fn record(&self, metrics: &Metrics, took: std::time::Duration) {
        let cache = self.cache.as_deref();
        metrics.request_done_with(Side::Server, &self.route, cache, self.outcome, took);
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
    /// It came as 0-RTT data for a route that does not take early data, and the
    /// connection's handshake never completed (a replay, or a dialer that gave up).
    Unconfirmed(Arc<str>),
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
            Refusal::TimedOut(_) | Refusal::Unconfirmed(_) => Some(code::TIMED_OUT),
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
            Refusal::TimedOut(_) | Refusal::Unconfirmed(_) | Refusal::Broken(_) => None,
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
                cache: None,
            },
            Refusal::Unconfirmed(route) => Served::new(route, Outcome::TimedOut),
            Refusal::Broken(route) => Served {
                route: known(route),
                outcome: Outcome::StreamError,
                cache: None,
            },
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.answer() {
            Some((_, message)) => f.write_str(&message),
            None if matches!(self, Refusal::TimedOut(_)) => f.write_str("the peer was too slow"),
            None if matches!(self, Refusal::Unconfirmed(_)) => {
                f.write_str("it came as 0-RTT data and the handshake never completed")
            }
            None => f.write_str("the stream broke"),
        }
    }
}

impl Serving<'_> {
    /// Answers one request stream (BUSY, with the reason, when `closing`), and records it
    /// in the metrics: how it ended, and how long it took.
    ///
    /// `streams` (the request's, lent) are taken only for a streaming route. The request
    /// is read, then handled ([`handle`](Self::handle)), each phase a state machine of its
    /// own, and every path but the common one boxed: what one phase keeps never sits
    /// beside what another does in the state machine allocated per stream.
    pub async fn request(
        &self,
        closing: bool,
        streams: &mut Option<(SendStream, RecvStream)>,
    ) -> (Served, Duration) {
        let Some((send, recv)) = streams else {
            unreachable!("the streams are taken only here, for a streaming route")
        };
        // The one clock read at the start of a request: its deadline and its duration
        // both come from it.
        let started = Instant::now();
        let deadline = started + self.limits.request_timeout;
        // What comes next is chosen before it is awaited: the read's result is gone by
        // then, and takes no room beside the next phase.
        let next: Either<_, Pin<Box<dyn Future<Output = Served> + Send + '_>>> = if closing {
            Either::Right(Box::pin(self.refuse_closing(send, recv, deadline)))
        } else {
            match self.read_request(recv, deadline).await {
                Ok(Opened::Whole(read)) => Either::Left(self.handle(read, send, deadline)),
                Ok(Opened::Streaming(stream)) => {
                    let Some((send, recv)) = streams.take() else {
                        unreachable!("the streams were lent")
                    };
                    Either::Right(Box::pin(self.transfer(stream, Some(send), recv, started)))
                }
                Err(refusal) => {
                    Either::Right(Box::pin(self.refuse_request(refusal, send, recv, deadline)))
                }
            }
        };
        let served = next.await;
        let took = started.elapsed();
        served.record(self.metrics, took);
        (served, took)
    }

    /// BUSY, with the reason: the node is shutting down.
    async fn refuse_closing(
        &self,
        send: &mut SendStream,
        recv: &mut RecvStream,
        deadline: Instant,
    ) -> Served {
        let _ = recv.stop(VarInt::from_u32(code::SHUTTING_DOWN));
        let msg = Bytes::from_static(b"the node is shutting down");
        self.answer(send, Status::Busy, msg, Deadline::At(deadline))
            .await;
        Served::unregistered("unknown", Outcome::Busy)
    }

    /// Refuses a request that was not read in full, with an answer saying why where one
    /// can be sent.
    async fn refuse_request(
        &self,
        refusal: Refusal,
        send: &mut SendStream,
        recv: &mut RecvStream,
        deadline: Instant,
    ) -> Served {
        debug!(peer = %self.connection.peer, "request refused: {refusal}");
        if let Some(stop) = refusal.stop_code() {
            let _ = recv.stop(VarInt::from_u32(stop));
        }
        match refusal.answer() {
            Some((status, message)) => {
                let message = Bytes::from(message);
                self.answer(send, status, message, Deadline::At(deadline))
                    .await
            }
            None if matches!(refusal, Refusal::TimedOut(_) | Refusal::Unconfirmed(_)) => {
                let _ = send.reset(VarInt::from_u32(code::TIMED_OUT));
            }
            None => {}
        }
        refusal.served()
    }

    /// Runs the handler of a request read in full, and writes its answer.
    ///
    /// Not an `async fn`: that would hold `read` twice (as taken, and as taken apart). What
    /// needs no waiting (the handler's slots, making its future) is done before the
    /// returned future is; that future holds only what waiting needs, once. Inlined: as a
    /// call of its own it was copied twice more per request on its way to being awaited
    /// (callgrind: 2 `memcpy`s of its 600 bytes).
    #[inline(always)]
    fn handle<'s>(
        &'s self,
        read: Read<'s>,
        send: &'s mut SendStream,
        deadline: Instant,
    ) -> impl Future<Output = Served> + Send + 's {
        let Read {
            name: route,
            route: entry,
            body,
            held,
            early,
        } = read;
        let RouteKind::Whole(handler) = &entry.kind else {
            unreachable!("a streaming route's requests are opened, not read")
        };
        // A slot for the handler is taken only now, with the whole request read: a peer
        // that stalls while sending holds its own stream, never a slot others need. The
        // peer's own share is taken first, so a peer at its share takes none of the node's.
        let mut called = match self.lend_slots() {
            Ok(slots) => {
                let ctx = self.context(&route, false, early);
                Called::Running {
                    call: call_handler(handler.as_ref(), ctx, body),
                    _slots: slots,
                }
            }
            Err(why) => Called::Busy(why),
        };
        async move {
            // The handler runs until it answers or the requester gives up (stops our send
            // side). A handler that answers at once never watches for the stop: making that
            // watch takes a count on the connection (atomics) and, once polled, its lock.
            // (In a block of its own: its result is gone before the answer is written, and
            // takes no room beside it.)
            let (tracked, status, body, failed) = {
                let call = match &mut called {
                    Called::Running { call, .. } => call,
                    Called::Busy(why) => {
                        let msg = Bytes::from_static(why.as_bytes());
                        // Boxed, as every refusal is.
                        Box::pin(self.answer(send, Status::Busy, msg, Deadline::At(deadline)))
                            .await;
                        return Served::new(&route, Outcome::Busy);
                    }
                    Called::Done => unreachable!("a handler is called once"),
                };
                let result = match poll_once(&mut *call).await {
                    Some(result) => result,
                    None => {
                        // Boxed: only a handler that waits gets here.
                        let cancelled = Box::pin(send.stopped());
                        tokio::select! {
                            biased;
                            result = &mut *call => result,
                            _ = cancelled => {
                                debug!("requester cancelled; handler dropped");
                                return Served::new(&route, Outcome::Cancelled);
                            }
                        }
                    }
                };
                // The slots go back as soon as the handler returns: writing the answer
                // waits on the peer, and that wait is bounded by `answer_timeout` and the
                // peer's share of pending answers, never by the node's handler slots. The
                // request's bytes (`held`) stay counted until the answer is written: an
                // answer made of them (an echo) holds the same memory, counted once. The
                // answer is tracked (for shutdown, which waits for answers in flight)
                // before the slots go, so that no moment sees neither.
                let tracked = self.answers.try_lend();
                called = Called::Done;
                match result {
                    Ok(body) => (tracked, Status::Ok, body, None),
                    Err(e) => {
                        debug!(peer = %self.connection.peer, "handler failed: {e}");
                        let outcome = match e.status {
                            Status::Busy => Outcome::Busy,
                            Status::BadRequest => Outcome::BadRequest,
                            _ => Outcome::HandlerError,
                        };
                        (tracked, e.status, Bytes::from(e.message), Some(outcome))
                    }
                }
            };
            // The answer has `request_timeout` from now; the clock is read only if writing it
            // has to wait.
            let deadline = Deadline::After(self.limits.request_timeout);
            self.answer_tracked(tracked, send, status, body, deadline)
                .await;
            drop((held, called));
            match failed {
                None => Served::ok(&route, entry),
                Some(outcome) => Served::new(&route, outcome),
            }
        }
    }

    /// Delivers one one-way message to its handler, and records it.
    ///
    /// `recv` (lent) is taken only for a streaming route.
    pub async fn message(&self, recv: &mut Option<RecvStream>) {
        let started = Instant::now();
        let served = self.deliver_message(started, recv).await;
        let took = started.elapsed();
        served.record(self.metrics, took);
    }

    /// Reads the message, then has it delivered ([`deliver`](Self::deliver)), phases
    /// apart as for a request.
    async fn deliver_message(&self, started: Instant, lent: &mut Option<RecvStream>) -> Served {
        let Some(recv) = lent else {
            unreachable!("the stream is taken only here, for a streaming route")
        };
        let deadline = started + self.limits.request_timeout;
        let next: Either<_, Pin<Box<dyn Future<Output = Served> + Send + '_>>> = match self
            .read_request(recv, deadline)
            .await
        {
            Ok(Opened::Whole(read)) => Either::Left(self.deliver(read, deadline)),
            Ok(Opened::Streaming(stream)) => {
                let Some(recv) = lent.take() else {
                    unreachable!("the stream was lent")
                };
                // Boxed, as for a request.
                Either::Right(Box::pin(self.transfer(stream, None, recv, started)))
            }
            Err(refusal) => {
                peer_warn!(self.warnings, peer = %self.connection.peer, "dropped a one-way message: {refusal}");
                if let Some(stop) = refusal.stop_code() {
                    let _ = recv.stop(VarInt::from_u32(stop));
                }
                return refusal.served();
            }
        };
        next.await
    }

    /// Runs the handler of a one-way message read in full (not an `async fn`, as for
    /// [`handle`](Self::handle)).
    fn deliver<'s>(
        &'s self,
        read: Read<'s>,
        deadline: Instant,
    ) -> impl Future<Output = Served> + Send + 's {
        let Read {
            name: route,
            route: entry,
            body,
            held,
            early,
        } = read;
        async move {
            let RouteKind::Whole(handler) = &entry.kind else {
                unreachable!("a streaming route's messages are opened, not read")
            };
            // As for requests, handler slots are taken once the message is read (the
            // peer's share first). With no answer to say BUSY in, the message waits for
            // them until its deadline.
            let Some(_slots) = pair_by(&self.connection.share.slots, self.slots, deadline).await
            else {
                peer_warn!(self.warnings, peer = %self.connection.peer, "dropped a one-way message on {route:?}: node at max_concurrent_requests or shutting down");
                return Served::new(&route, Outcome::Busy);
            };
            let ctx = self.context(&route, true, early);
            let result = call_handler(handler.as_ref(), ctx, body).await;
            drop(held);
            match result {
                Ok(_) => Served::ok(&route, entry),
                Err(e) => {
                    peer_warn!(self.warnings, peer = %self.connection.peer, "one-way handler failed: {e}");
                    let outcome = if e.status == Status::BadRequest {
                        Outcome::BadRequest
                    } else {
                        Outcome::HandlerError
                    };
                    Served::new(&route, outcome)
                }
            }
        }
    }

    /// Waits for the connection's handshake to complete; `false` if it never will.
    pub(crate) async fn confirmed(&self) -> bool {
        let mut confirmed = self.connection.confirmed_watch().clone();
        let done = confirmed.wait_for(|done| *done).await.is_ok();
        done
    }

    pub(crate) fn context(
        &self,
        route: &Arc<str>,
        one_way: bool,
        early_data: bool,
    ) -> RequestContext {
        RequestContext {
            peer: self.connection.peer,
            connection: self.connection.clone(),
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
    ) -> Result<Opened<'_>, Refusal> {
        let mut route_read: Option<Arc<str>> = None;
        let mut early = recv.is_0rtt();
        let work = async {
            let router = self.router;
            let resolve = |route: &str| router.get(route).ok_or_else(|| route.to_string());
            let (handler, first) = match read_header(recv, resolve).await {
                Ok((Ok((route, handler)), first)) => {
                    route_read = Some(route.clone());
                    // Bytes read before the handshake completed can only be 0-RTT data.
                    early |= !*self.connection.confirmed_watch().borrow();
                    (handler, first)
                }
                Ok((Err(unknown), _)) => return Err(Refusal::UnknownRoute(unknown)),
                Err(HeaderFailure::Malformed(e)) => return Err(Refusal::Malformed(e)),
                Err(HeaderFailure::Read(e)) => {
                    debug!("stream failed: {e}");
                    return Err(Refusal::Broken(None));
                }
            };
            // A streaming route's handler reads the body itself.
            if let RouteKind::Streaming(streaming) = &handler.kind {
                return Ok(Got::Streaming(streaming.clone(), first));
            }
            let limit = usize::try_from(self.limits.max_request_size).unwrap_or(usize::MAX);
            let route = || route_read.clone();
            let budget = ByteBudget {
                peer: &self.connection.share.bytes,
                node: self.bytes,
            };
            let read = match read_body(recv, first, limit, Some(budget)).await {
                Ok((body, held)) => Ok((handler, body, held)),
                Err(BodyError::TooLarge) => {
                    Err(Refusal::TooLarge(route().unwrap_or_default(), limit))
                }
                Err(BodyError::Read(e)) => {
                    debug!("stream failed: {e}");
                    Err(Refusal::Broken(route()))
                }
                Err(BodyError::Closing) => Err(Refusal::Broken(route())),
            }?;
            // Early data runs only on routes that take it; any other waits for the
            // handshake (under the same deadline), and is dropped if it never completes.
            // (Boxed: only 0-RTT data waits here.)
            if !read.0.early_data
                && !*self.connection.confirmed_watch().borrow()
                && !Box::pin(self.confirmed()).await
            {
                return Err(Refusal::Unconfirmed(route().unwrap_or_default()));
            }
            Ok(Got::Whole(read.0, read.1, read.2))
        };
        // A request that is all there when its stream is accepted (most are) is read with
        // no timer; only one that has to wait is raced against the deadline.
        let result = {
            let mut work = std::pin::pin!(work);
            match poll_once(work.as_mut()).await {
                Some(done) => Ok(done),
                // Boxed: a tokio timer is large, and held inline it would add to every
                // request's serving state machine (allocated per stream).
                None => Box::pin(timeout_at(deadline, work)).await,
            }
        };
        match result {
            Ok(Ok(Got::Whole(route, body, held))) => Ok(Opened::Whole(Read {
                name: route_read.unwrap_or_default(),
                route,
                body,
                held,
                early,
            })),
            Ok(Ok(Got::Streaming(route, first))) => Ok(Opened::Streaming(Stream {
                name: route_read.unwrap_or_default(),
                route,
                first,
                early,
            })),
            Ok(Err(refusal)) => Err(refusal),
            Err(_) => Err(Refusal::TimedOut(route_read)),
        }
    }
}

/// A request's handler, called with the slots it holds; or why it was not.
enum Called<'a> {
    /// Its future, and its slots (the peer's and the node's), held until it returns.
    Running {
        call: CatchUnwind<Bytes>,
        _slots: (Lent<'a>, Lent<'a>),
    },
    /// No slot was free: the BUSY answer's reason.
    Busy(&'static str),
    /// It returned; its slots went back.
    Done,
}

/// What reading a request or message brought.
enum Got<'r> {
    /// A whole body, for the route's handler.
    Whole(&'r Route, Bytes, Held),
    /// The start of a body that a streaming handler reads itself.
    Streaming(Arc<StreamRoute>, Bytes),
}

/// A request or message, opened.
enum Opened<'r> {
    /// Read in full.
    Whole(Read<'r>),
    /// Its header read; the body is for its streaming handler to read.
    Streaming(Stream),
}

/// A request or message on a streaming route: its header read.
pub(crate) struct Stream {
    pub name: Arc<str>,
    pub route: Arc<StreamRoute>,
    /// Body bytes that came with the header.
    pub first: Bytes,
    /// Its bytes arrived as 0-RTT data.
    pub early: bool,
}

/// A request or message read in full.
struct Read<'r> {
    name: Arc<str>,
    route: &'r Route,
    body: Bytes,
    /// The body's bytes, counted against the peer's share and the node's budget.
    held: Held,
    /// Its bytes arrived as 0-RTT data.
    early: bool,
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
        // Take whatever arrived with the header: the body's first bytes then come without
        // another read or a copy. (One read returns at most one received frame, a packet's
        // worth; like the header, it is left out of the byte budget.)
        let want = crate::budget::CHUNK;
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

/// A slot of a peer's share and one of the node's (handler or transfer slots).
pub(crate) type Pair = (Taken, Taken);

/// Which of a [`Pair`]'s limits is full.
pub(crate) enum Full {
    Share,
    Node,
}

/// Takes a slot of the peer's `share`, then one of the `node`'s, if both are free.
pub(crate) fn try_pair(share: &Arc<Tally>, node: &Arc<Tally>) -> Result<Pair, Full> {
    let share = share.try_take().ok_or(Full::Share)?;
    let node = node.try_take().ok_or(Full::Node)?;
    Ok((share, node))
}

/// Waits for a slot of the peer's `share`, then one of the `node`'s, until `deadline`;
/// `None` past it, or once the node closes them (shutting down).
pub(crate) async fn pair_by(
    share: &Arc<Tally>,
    node: &Arc<Tally>,
    deadline: Instant,
) -> Option<Pair> {
    let pair = async {
        let share = share.take().await?;
        let node = node.take().await?;
        Some((share, node))
    };
    timeout_at(deadline, pair).await.ok().flatten()
}

/// Why no handler slot was taken, as said in the BUSY answer.
fn slots_full(full: Full) -> &'static str {
    match full {
        Full::Share => "this peer is at its limit of concurrent requests on the node (max_concurrent_requests_per_peer); retry later",
        Full::Node => "the node is at its limit of concurrent requests (max_concurrent_requests); retry later",
    }
}

impl<'a> Serving<'a> {
    /// Takes a handler slot from the peer's share, then one of the node's.
    pub(crate) fn take_slots(&self) -> Result<Pair, &'static str> {
        try_pair(&self.connection.share.slots, self.slots).map_err(slots_full)
    }

    /// [`take_slots`](Self::take_slots) for a request served within this borrow of the
    /// node: the places are lent, with no count on the tallies' `Arc`s.
    fn lend_slots(&self) -> Result<(Lent<'a>, Lent<'a>), &'static str> {
        let share = self.connection.share.slots.try_lend();
        let share = share.ok_or_else(|| slots_full(Full::Share))?;
        let node = self
            .slots
            .try_lend()
            .ok_or_else(|| slots_full(Full::Node))?;
        Ok((share, node))
    }

    /// Writes an answer (status byte, body, FIN) by `deadline`, resetting the stream if
    /// the peer reads none of it for `answer_timeout`, or already has its share of answers
    /// waiting. A peer that leaves `max_stalls` answers in a row unread loses its
    /// connection (close code `LIMIT`).
    pub(crate) async fn answer(
        &self,
        send: &mut SendStream,
        status: Status,
        body: Bytes,
        deadline: Deadline,
    ) {
        self.answer_tracked(None, send, status, body, deadline)
            .await
    }

    /// [`answer`](Self::answer), already counted among the answers in flight when
    /// `tracked` is given (else counted here).
    ///
    /// Not an `async fn`, which would hold its arguments twice in every request's state
    /// machine: what needs no waiting is done before the future is made.
    fn answer_tracked<'s>(
        &'s self,
        tracked: Option<Lent<'s>>,
        send: &'s mut SendStream,
        status: Status,
        body: Bytes,
        mut deadline: Deadline,
    ) -> impl Future<Output = ()> + Send + 's {
        // Shutdown waits for the answers it counts; a refusal sent while closing is not
        // counted, so a peer that keeps asking cannot hold shutdown up.
        let tracked = tracked.or_else(|| {
            let closing = self.closing.load(std::sync::atomic::Ordering::SeqCst);
            (!closing).then(|| self.answers.try_lend()).flatten()
        });
        let pending = self.connection.share.answers.try_lend();
        async move {
            // `tracked` and `pending` are held to the end, not bound again: a binding of its
            // own would be a second copy in the state machine.
            if pending.is_none() {
                // The peer has its share of answers unread and asks for more: a strike,
                // as an answer left unread is.
                debug!(peer = %self.connection.peer, "too many unread answers; resetting the stream");
                let _ = send.reset(VarInt::from_u32(code::BUSY));
                self.unread();
                return;
            }
            let status_byte = status_chunk(status);
            let stall = self.limits.answer_timeout;
            let written = write_framed_within(send, status_byte, body, stall, &mut deadline).await;
            // Settled before the next wait, so that the write's result is gone by then.
            let delivered = match written {
                Ok(Ok(())) => {
                    self.connection.share.read();
                    let _ = send.finish();
                    true
                }
                Ok(Err(e)) => {
                    debug!("answer not delivered: {e}");
                    false
                }
                Err(Stalled) => {
                    debug!(peer = %self.connection.peer, "peer did not read its answer in time; resetting the stream");
                    let _ = send.reset(VarInt::from_u32(code::TIMED_OUT));
                    self.unread();
                    false
                }
            };
            if delivered {
                self.delivered(send, deadline).await;
            }
            drop((tracked, pending));
        }
    }

    /// While the node shuts down, an answer counts as delivered once the peer has it
    /// (waited for until `by`): shutdown waits for answers in flight, then closes. The
    /// clock is read only then.
    pub(crate) async fn delivered(&self, send: &mut SendStream, by: Deadline) {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            // Boxed, as in `read_request`: only shutdown takes this path.
            let _ = Box::pin(timeout_at(by.at(), send.stopped())).await;
        }
    }

    /// Counts an answer the peer left unread; past `max_stalls` in a row, the peer loses
    /// its connection.
    pub(crate) fn unread(&self) {
        self.metrics.answer_abandoned();
        if self.connection.share.stalled() >= self.limits.max_stalls {
            peer_warn!(self.warnings, peer = %self.connection.peer, "closing the connection: the peer does not read its answers");
            self.connection.conn.close(
                code::CLOSE_LIMIT.into(),
                b"too many answers left unread (max_pending_answers_per_peer)",
            );
        }
    }
}
