//! Handlers, registered per route with [`NodeBuilder::route`](crate::NodeBuilder::route),
//! and the context they are called with.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::identity::PeerId;
use crate::peers::PeerConnection;
use crate::wire::Status;

/// What a handler knows about the request it is answering.
#[derive(Clone)]
pub struct RequestContext {
    pub(crate) peer: PeerId,
    /// The connection it came on (its address and handshake state are read only if
    /// asked for). The pool's entry, not a quinn handle: cloning that locks the
    /// connection, and a context is made for every request.
    pub(crate) connection: Arc<PeerConnection>,
    pub(crate) route: Arc<str>,
    pub(crate) one_way: bool,
    pub(crate) early_data: bool,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("peer", &self.peer)
            .field("route", &self.route)
            .field("one_way", &self.one_way)
            .field("early_data", &self.early_data)
            .finish_non_exhaustive()
    }
}

impl RequestContext {
    /// The authenticated PeerId of the sender (from its certificate).
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The sender's UDP address (now: it changes if the peer migrates).
    pub fn remote_addr(&self) -> SocketAddr {
        self.connection.conn.remote_address()
    }

    /// The route the request was sent to.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// `true` for a one-way message: whatever the handler returns is not sent anywhere.
    pub fn is_one_way(&self) -> bool {
        self.one_way
    }

    /// `true` if the request arrived as 0-RTT data: its stream was opened before the
    /// connection's handshake completed. An attacker who recorded such data can replay
    /// it, so only routes registered with
    /// [`NodeBuilder::early_data_route`](crate::NodeBuilder::early_data_route) run it
    /// before the handshake completes; other routes run it only after (see
    /// [`is_handshake_complete`](Self::is_handshake_complete)).
    pub fn is_early_data(&self) -> bool {
        self.early_data
    }

    /// `true` if the connection's handshake is complete: the peer has proven, on this
    /// connection, that it holds its key, so the request cannot be a replay. Always
    /// `true` for routes registered with [`NodeBuilder::route`](crate::NodeBuilder::route);
    /// an early-data route may see `false`.
    pub fn is_handshake_complete(&self) -> bool {
        *self.connection.confirmed_watch().borrow()
    }
}

/// A handler's failure: sent to the requester as status HANDLER_ERROR (or BUSY) with the
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub(crate) status: Status,
    pub(crate) message: String,
    /// For an error made from a [`TransferError`](crate::TransferError): whether the
    /// requester cancelled or was too slow (then there is no one to answer).
    pub(crate) cause: Option<Cause>,
}

/// What a streaming handler's failure came from, when it came from the requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The requester dropped its body or its answer.
    Cancelled,
    /// The requester's body stalled, or the transfer ran past its `max_duration`.
    TimedOut,
}

impl HandlerError {
    /// The handler failed; the requester gets HANDLER_ERROR with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            status: Status::HandlerError,
            message: message.into(),
            cause: None,
        }
    }

    /// The handler is overloaded; the requester gets BUSY with `message` and may retry.
    pub fn busy(message: impl Into<String>) -> Self {
        HandlerError {
            status: Status::Busy,
            message: message.into(),
            cause: None,
        }
    }

    /// The request is malformed (a body the handler cannot read); the requester gets
    /// BAD_REQUEST with `message`. Typed routes answer a body that does not decode so.
    pub fn bad_request(message: impl Into<String>) -> Self {
        HandlerError {
            status: Status::BadRequest,
            message: message.into(),
            cause: None,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        HandlerError::new(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        HandlerError::new(message)
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, HandlerError>> + Send>>;

/// Answers requests on one route. Any `async` closure or function
/// `Fn(RequestContext, Bytes) -> impl Future<Output = Result<Bytes, HandlerError>>` is one.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request (or one-way message) with body `body`.
    fn call(&self, ctx: RequestContext, body: Bytes) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(RequestContext, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
{
    fn call(&self, ctx: RequestContext, body: Bytes) -> HandlerFuture {
        Box::pin(self(ctx, body))
    }
}

/// Route name to handler.
#[derive(Clone, Default)]
pub(crate) struct Router {
    /// Hashed with FxHash, not SipHash: the table holds only the node's own routes and is
    /// never grown by a peer, so a peer's chosen names cannot flood a bucket beyond what the
    /// table's few entries allow; a lookup costs a fraction of SipHash's.
    routes: rustc_hash::FxHashMap<Arc<str>, Route>,
}

/// A registered route.
#[derive(Clone)]
pub(crate) struct Route {
    pub kind: RouteKind,
    /// The handler may run on 0-RTT data, before the handshake completes.
    pub early_data: bool,
    /// Its served requests' metric handles, resolved on the first one: counting an
    /// answered request then takes no lookup.
    pub metrics: Arc<crate::metrics::RouteCache>,
}

/// How a route's handler takes its request.
#[derive(Clone)]
pub(crate) enum RouteKind {
    /// The whole body, read (and counted in the byte budget) before the handler runs.
    Whole(Arc<dyn Handler>),
    /// The body as a stream, with the answer written as a stream.
    Streaming(Arc<crate::transfer::StreamRoute>),
}

impl Router {
    /// Adds `route`; `false` (and nothing changed) if the name has one already.
    pub fn insert(&mut self, name: &str, route: Route) -> bool {
        if self.routes.contains_key(name) {
            return false;
        }
        self.routes.insert(name.into(), route);
        true
    }

    /// The route called `name`, with its shared name.
    pub fn get(&self, name: &str) -> Option<(&Arc<str>, &Route)> {
        self.routes.get_key_value(name)
    }
}

/// Runs a handler, turning a panic (while making or polling its future) into a
/// HANDLER_ERROR so that one bad handler cannot take the node down.
///
/// A plain function returning a small future (the handler's boxed one): an `async fn`
/// here would hold `ctx` and `body` twice in every request's state machine.
pub(crate) fn call_handler(
    handler: &dyn Handler,
    ctx: RequestContext,
    body: Bytes,
) -> CatchUnwind<Bytes> {
    catch_panics(|| handler.call(ctx, body))
}

/// Makes a handler's future with `make`, a panic in making or running it becoming a
/// HANDLER_ERROR.
pub(crate) fn catch_panics<T>(
    make: impl FnOnce() -> Pin<Box<dyn Future<Output = Result<T, HandlerError>> + Send>>,
) -> CatchUnwind<T> {
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(future) => CatchUnwind::Running(future),
        Err(payload) => CatchUnwind::Failed(Some(panicked(payload))),
    }
}

/// A handler's future, with its panics caught.
pub(crate) enum CatchUnwind<T> {
    Running(Pin<Box<dyn Future<Output = Result<T, HandlerError>> + Send>>),
    /// Making the future panicked (taken when polled).
    Failed(Option<HandlerError>),
}

impl<T> Future for CatchUnwind<T> {
    type Output = Result<T, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Unpin: the handler's future is boxed.
        match self.get_mut() {
            CatchUnwind::Running(future) => {
                match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
                    Ok(poll) => poll,
                    Err(payload) => Poll::Ready(Err(panicked(payload))),
                }
            }
            CatchUnwind::Failed(error) => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| HandlerError::new("handler polled after it failed")))),
        }
    }
}

fn panicked(payload: Box<dyn std::any::Any + Send>) -> HandlerError {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    HandlerError::new(format!("handler panicked: {text}"))
}
