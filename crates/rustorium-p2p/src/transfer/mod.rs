//! Streaming bodies: a request or one-way message whose body is read as it arrives, and
//! an answer written as it is made, so that neither is ever held whole in memory.
//!
//! The wire format is protocol v1's: a body already runs until its stream's FIN, so a
//! streaming route can be called with [`Node::request`](crate::Node::request) and a
//! buffered route with [`Node::open_request`](crate::Node::open_request). What differs is
//! who holds the bytes: here QUIC flow control does (each stream's
//! `transport.stream_receive_window`), and the handler takes them a chunk at a time.
//!
//! - Server side: [`NodeBuilder::streaming_route`](crate::NodeBuilder::streaming_route)
//!   registers a [`StreamHandler`], called with a [`BodyReader`] and an [`AnswerWriter`].
//! - Requester side: [`Node::open_request`](crate::Node::open_request) gives a
//!   [`RequestBody`] to write and an [`AnswerStream`] to read;
//!   [`Node::open_message`](crate::Node::open_message) a [`MessageBody`].
//!
//! Dropping either end before its end resets the QUIC stream with code `CANCELLED`, which
//! the other side sees as [`TransferError::Cancelled`] (a handler) or
//! [`RequestError::BodyStopped`](crate::RequestError::BodyStopped) (a requester writing a
//! body the handler no longer reads).

mod reader;
mod request;
mod serve;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::handler::{Cause, HandlerError, RequestContext};
use crate::wire::{code, Status};

pub use reader::BodyReader;
pub(crate) use request::{open_message, open_request};
pub use request::{AnswerStream, MessageBody, RequestBody};
pub use writer::AnswerWriter;

/// The future a [`StreamHandler`] returns.
pub type StreamHandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// Serves a streaming route: reads the request body from a [`BodyReader`] and writes the
/// answer to an [`AnswerWriter`]. Any `async` closure or function
/// `Fn(RequestContext, BodyReader, AnswerWriter) -> impl Future<Output = Result<(), HandlerError>>`
/// is one.
///
/// When the handler returns `Ok`, the answer is finished (an answer it never wrote to is
/// an empty `OK`). When it returns an error before writing anything, the requester gets
/// the error's status and message, as from a buffered route; after the answer has
/// started, the answer stream is reset with code `HANDLER_ERROR` and the requester sees
/// [`RequestError::Remote`](crate::RequestError::Remote) with status `HANDLER_ERROR`.
pub trait StreamHandler: Send + Sync + 'static {
    /// Handles one request (or one-way message).
    fn call(
        &self,
        ctx: RequestContext,
        body: BodyReader,
        answer: AnswerWriter,
    ) -> StreamHandlerFuture;
}

impl<F, Fut> StreamHandler for F
where
    F: Fn(RequestContext, BodyReader, AnswerWriter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(
        &self,
        ctx: RequestContext,
        body: BodyReader,
        answer: AnswerWriter,
    ) -> StreamHandlerFuture {
        Box::pin(self(ctx, body, answer))
    }
}

/// A streaming route's own limits; what it leaves unset comes from the node's
/// configuration (`limits.max_stream_body_size`, `limits.max_stream_duration`).
///
/// ```
/// use std::time::Duration;
/// use rustorium_p2p::StreamLimits;
///
/// let snapshots = StreamLimits::new()
///     .max_body(64 << 30)
///     .max_duration(Duration::from_secs(3600));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamLimits {
    pub(crate) max_body: Option<u64>,
    pub(crate) max_duration: Option<Duration>,
}

impl StreamLimits {
    /// The node's limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest request body the route accepts, in bytes; past it the handler's next
    /// read fails with [`TransferError::TooLarge`] and the requester is told `TOO_LARGE`.
    pub fn max_body(mut self, bytes: u64) -> Self {
        self.max_body = Some(bytes);
        self
    }

    /// The longest a request may run, from its first byte to the end of its answer; past
    /// it the handler is dropped and both directions of the stream are reset.
    pub fn max_duration(mut self, duration: Duration) -> Self {
        self.max_duration = Some(duration);
        self
    }
}

/// How long one side of a transfer may wait: `wait` for each step of progress (the
/// peer's), until `ends`, the end of the route's `max_duration` (or sooner: see
/// `writer::Places::buffered`).
#[derive(Clone, Copy)]
pub(crate) struct Times {
    pub wait: std::time::Duration,
    pub ends: tokio::time::Instant,
    pub max_duration: std::time::Duration,
}

/// A registered streaming route: its handler and its limits, resolved against the
/// node's configuration.
pub(crate) struct StreamRoute {
    pub handler: Box<dyn StreamHandler>,
    pub max_body: u64,
    pub max_duration: Duration,
}

/// Why a handler's read of a request body or write of an answer failed. After one
/// fails, every later read (or write) fails the same way.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The body is over the route's limit (the requester has been told `TOO_LARGE`).
    #[error("the request body is over this route's limit of {limit} bytes")]
    TooLarge {
        /// The route's `max_body`.
        limit: u64,
    },
    /// The peer sent nothing of the body (or read nothing of the answer) for this long:
    /// `limits.request_timeout` for a body, `limits.answer_timeout` for an answer.
    #[error("the peer made no progress for {after:?}")]
    Stalled {
        /// How long nothing moved.
        after: Duration,
    },
    /// The transfer ran past its time: the route's `max_duration`, or, for a long answer
    /// to a small request when no transfer slot was free, a buffered answer's
    /// `request_timeout` from its first write.
    #[error("the transfer ran past its time limit of {limit:?}")]
    TooLong {
        /// The limit.
        limit: Duration,
    },
    /// The requester cancelled: it dropped its body or its answer before the end.
    #[error("the requester cancelled the request")]
    Cancelled,
    /// The requester reset its body, or stopped reading the answer, with another code.
    #[error("the requester ended the stream with code {code} ({})", code::describe(*code))]
    Ended {
        /// The QUIC application error code.
        code: u64,
    },
    /// The connection closed.
    #[error("connection lost: {0}")]
    ConnectionLost(#[source] quinn::ConnectionError),
    /// The stream failed in another way.
    #[error("the stream broke: {0}")]
    Broken(#[source] quinn::ReadError),
    /// The peer has its share of answers waiting unread (`max_pending_answers_per_peer`);
    /// the answer was reset with `BUSY`.
    #[error("the peer has too many answers left unread (max_pending_answers_per_peer)")]
    Busy,
    /// The answer was written to after its handler returned.
    #[error("the answer is over: its handler has returned")]
    AnswerOver,
    /// An earlier write of the answer was cancelled (or panicked) midway: what went out
    /// may be cut anywhere, so the answer cannot go on (it is reset with
    /// `HANDLER_ERROR` when the handler returns).
    #[error("an earlier write of the answer was cancelled midway")]
    Interrupted,
}

impl From<TransferError> for HandlerError {
    /// The handler's failure for a transfer error: `TOO_LARGE` for a body over the
    /// limit, `HANDLER_ERROR` with the error's message otherwise. When the requester
    /// cancelled or was too slow, the stream is reset (`CANCELLED`, `TIMED_OUT`) rather
    /// than answered; when the answer already started, it is reset.
    fn from(e: TransferError) -> Self {
        let status = match e {
            TransferError::TooLarge { .. } => Status::TooLarge,
            TransferError::Busy => Status::Busy,
            _ => Status::HandlerError,
        };
        let cause = match e {
            TransferError::Cancelled => Some(Cause::Cancelled),
            TransferError::Stalled { .. } | TransferError::TooLong { .. } => Some(Cause::TimedOut),
            _ => None,
        };
        HandlerError {
            status,
            message: e.to_string(),
            cause,
        }
    }
}

impl TransferError {
    /// The error for a stream the peer reset (or stopped) with `code`.
    fn ended(code: u64) -> Self {
        if code == u64::from(code::CANCELLED) {
            TransferError::Cancelled
        } else {
            TransferError::Ended { code }
        }
    }
}
