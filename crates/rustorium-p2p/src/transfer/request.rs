//! The requester's side of a streaming request or message: a body written a chunk at a
//! time, and an answer read a chunk at a time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::time::{timeout, timeout_at, Instant};

use crate::error::{Body, ProtocolError, RequestError};
use crate::framing::{poll_once, read_body, write_chunks_within, BodyError, Deadline, Stalled};
use crate::node::Record;
use crate::peers::{PeerConnection, StreamGuard};
use crate::request::{Failure, Target};
use crate::wire::{self, code, Status};

/// A new stream's sending half: a unidirectional stream, or a bidirectional one's.
trait Opened {
    fn send(&mut self) -> &mut SendStream;
}

impl Opened for SendStream {
    fn send(&mut self) -> &mut SendStream {
        self
    }
}

impl Opened for (SendStream, RecvStream) {
    fn send(&mut self) -> &mut SendStream {
        &mut self.0
    }
}

/// Who a streaming request is with, and how long it may wait for them.
struct With {
    conn: Arc<PeerConnection>,
    route: String,
    /// How long a write or read may make no progress.
    idle: Duration,
    _active: StreamGuard,
}

impl With {
    fn new(conn: &Arc<PeerConnection>, route: &str, idle: Duration) -> Self {
        With {
            conn: conn.clone(),
            route: route.to_string(),
            idle,
            _active: conn.stream_guard(),
        }
    }

    fn target(&self) -> Target<'_> {
        Target::new(&self.conn, &self.route)
    }

    /// The error for a body write that failed.
    fn write_failed(&self, e: WriteError) -> RequestError {
        match e {
            WriteError::Stopped(stop)
                if [code::CANCELLED, code::TIMED_OUT]
                    .map(u64::from)
                    .contains(&stop.into_inner()) =>
            {
                RequestError::BodyStopped {
                    peer: self.conn.peer,
                    route: self.route.clone(),
                    code: stop.into_inner(),
                }
            }
            e => self.target().write_failed(e).error,
        }
    }

    /// Waits (by `deadline`) for the stream `opening` opens, then writes the route header
    /// on it.
    async fn start<S: Opened>(
        &self,
        opening: impl std::future::Future<Output = Result<S, ConnectionError>>,
        deadline: Instant,
    ) -> Result<S, RequestError> {
        let mut opened = match timeout_at(deadline, opening).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(self.target().lost(&e).error),
            Err(_) => return Err(self.target().timed_out(self.idle).error),
        };
        let header = Bytes::from(wire::encode_header(&self.route));
        self.write(opened.send(), &mut [header], || {}).await?;
        Ok(opened)
    }

    /// Writes `chunks` with no more than `idle` between steps of progress, calling
    /// `progress` at each.
    async fn write(
        &self,
        send: &mut SendStream,
        chunks: &mut [Bytes],
        progress: impl FnMut(),
    ) -> Result<(), RequestError> {
        let mut never = Deadline::After(Duration::from_secs(100 * 365 * 24 * 3600));
        match write_chunks_within(send, chunks, self.idle, &mut never, progress).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.write_failed(e)),
            Err(Stalled) => {
                let _ = send.reset(VarInt::from_u32(code::CANCELLED));
                Err(self.target().timed_out(self.idle).error)
            }
        }
    }
}

/// Opens a streaming request on `conn`: its stream, with the route header written, by
/// `deadline`. A failure is counted in `record`.
pub(crate) async fn open_request(
    conn: &Arc<PeerConnection>,
    route: &str,
    idle: Duration,
    max_response_size: u64,
    deadline: Instant,
    mut record: Record,
) -> Result<(RequestBody, AnswerStream), RequestError> {
    let with = With::new(conn, route, idle);
    let (send, recv) = match with.start(conn.conn.open_bi(), deadline).await {
        Ok(streams) => streams,
        Err(e) => {
            record.failed(&e);
            return Err(e);
        }
    };
    let progress = Arc::new(std::sync::Mutex::new(Instant::now()));
    let answer = AnswerStream {
        with: With::new(conn, route, idle),
        body_progress: progress.clone(),
        recv,
        max_response_size,
        state: State::Waiting,
        record,
    };
    let body = RequestBody {
        with,
        send,
        open: true,
        progress: Some(progress),
    };
    Ok((body, answer))
}

/// Opens a streaming one-way message on `conn`: its stream, with the route header
/// written, by `deadline`. A failure is counted in `record`.
pub(crate) async fn open_message(
    conn: &Arc<PeerConnection>,
    route: &str,
    idle: Duration,
    deadline: Instant,
    mut record: Record,
) -> Result<MessageBody, RequestError> {
    let with = With::new(conn, route, idle);
    let send = match with.start(conn.conn.open_uni(), deadline).await {
        Ok(send) => send,
        Err(e) => {
            record.failed(&e);
            return Err(e);
        }
    };
    Ok(MessageBody {
        body: RequestBody {
            with,
            send,
            open: true,
            progress: None,
        },
        record,
    })
}

/// Records progress of a request's body for its answer's wait: while the body moves,
/// the answer may be waiting for all of it.
fn progressed(progress: &Option<Arc<std::sync::Mutex<Instant>>>) {
    if let Some(progress) = progress {
        *progress.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// The body of a streaming request, written a chunk at a time
/// ([`Node::open_request`](crate::Node::open_request)).
///
/// Each write waits while the peer has not read what came before (flow control), for at
/// most the request's timeout without progress. [`finish`](Self::finish) ends the body;
/// dropping it before that cancels the request (the stream is reset with `CANCELLED`).
/// Read the [`AnswerStream`] at the same time: a handler that answers as it reads (an
/// echo) stops reading once its answer is left unread.
pub struct RequestBody {
    with: With,
    send: SendStream,
    /// Not finished, and not failed.
    open: bool,
    /// When the body last made progress, for the answer's wait (a request's body only).
    progress: Option<Arc<std::sync::Mutex<Instant>>>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("peer", &self.with.conn.peer)
            .field("route", &self.with.route)
            .finish_non_exhaustive()
    }
}

impl RequestBody {
    /// Writes `chunk`. After a failure the body is reset, and every later write fails.
    pub async fn write(&mut self, chunk: impl Into<Bytes>) -> Result<(), RequestError> {
        if !self.open {
            return Err(self
                .with
                .target()
                .protocol(ProtocolError::ClosedStream)
                .error);
        }
        // In pieces of at most 64 KiB; each piece, and each step of one that has to
        // wait, is progress for the answer's wait.
        let chunk = chunk.into();
        let mut at = 0;
        while at < chunk.len() {
            let end = (at + crate::budget::CHUNK).min(chunk.len());
            let progress = || progressed(&self.progress);
            let piece = &mut [chunk.slice(at..end)];
            let result = self.with.write(&mut self.send, piece, progress).await;
            if let Err(e) = result {
                self.open = false;
                let _ = self.send.reset(VarInt::from_u32(code::CANCELLED));
                return Err(e);
            }
            progressed(&self.progress);
            at = end;
        }
        Ok(())
    }

    /// Writes a copy of `data`; see [`write`](Self::write).
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), RequestError> {
        self.write(Bytes::copy_from_slice(data)).await
    }

    /// Ends the body. Does not wait: the answer tells how the request went. The answer
    /// has the request's timeout from now to start, and what of the body is still in
    /// flight (up to the connection's `transport.send_window`, 10 MB by default) must
    /// reach the peer within it: on a link slower than that, give the request a longer
    /// timeout ([`Node::open_request_with`](crate::Node::open_request_with)).
    pub fn finish(mut self) -> Result<(), RequestError> {
        self.open = false;
        progressed(&self.progress);
        self.send.finish().map_err(|_| {
            self.with
                .target()
                .protocol(ProtocolError::ClosedStream)
                .error
        })
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if self.open {
            let _ = self.send.reset(VarInt::from_u32(code::CANCELLED));
        }
    }
}

/// A streaming one-way message, written a chunk at a time
/// ([`Node::open_message`](crate::Node::open_message)). Dropping it before
/// [`finish`](Self::finish) cancels it.
pub struct MessageBody {
    body: RequestBody,
    record: Record,
}

impl std::fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.body.fmt(f)
    }
}

impl MessageBody {
    /// Writes `chunk`; see [`RequestBody::write`].
    pub async fn write(&mut self, chunk: impl Into<Bytes>) -> Result<(), RequestError> {
        let result = self.body.write(chunk).await;
        if let Err(e) = &result {
            self.record.failed(e);
        }
        result
    }

    /// Writes a copy of `data`; see [`write`](Self::write).
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), RequestError> {
        self.write(Bytes::copy_from_slice(data)).await
    }

    /// Ends the message and waits until the peer's QUIC stack has acknowledged all of
    /// it, or refused it. The wait is bounded by the timeout as a whole (not reset by
    /// progress): what is still unacknowledged is at most the stream's flow-control
    /// window, about a megabyte, which a link must carry within `request_timeout`.
    pub async fn finish(mut self) -> Result<(), RequestError> {
        let result = self.finished().await;
        self.record.done(&result);
        result
    }

    async fn finished(&mut self) -> Result<(), RequestError> {
        let body = &mut self.body;
        if !body.open {
            return Err(body
                .with
                .target()
                .protocol(ProtocolError::ClosedStream)
                .error);
        }
        body.open = false;
        let _ = body.send.finish();
        let idle = body.with.idle;
        match timeout(idle, body.send.stopped()).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(stop))) => Err(body.with.write_failed(WriteError::Stopped(stop))),
            Ok(Err(quinn::StoppedError::ConnectionLost(e))) => {
                Err(body.with.target().lost(&e).error)
            }
            Ok(Err(quinn::StoppedError::ZeroRttRejected)) => {
                Err(body.with.target().zero_rtt_rejected().error)
            }
            Err(_) => {
                let _ = body.send.reset(VarInt::from_u32(code::CANCELLED));
                Err(body.with.target().timed_out(idle).error)
            }
        }
    }
}

enum State {
    /// The status byte has not come yet.
    Waiting,
    /// Status OK came; the body follows.
    Reading,
    /// The answer ended, or failed.
    Over,
}

/// The answer to a streaming request, read a chunk at a time
/// ([`Node::open_request`](crate::Node::open_request)).
///
/// The first [`chunk`](Self::chunk) waits for the peer's status: anything but `OK` is an
/// error with the peer's message, as from [`Node::request`](crate::Node::request). Each
/// read waits at most the request's timeout from the last progress of the answer or of
/// the request's body (so an answer may come after an upload of any length, once it
/// ends). There is no size limit on a
/// streamed answer: what it holds in memory is what the caller keeps. Dropping the
/// answer before its end cancels the request (`CANCELLED`).
pub struct AnswerStream {
    with: With,
    /// When the request's body last made progress.
    body_progress: Arc<std::sync::Mutex<Instant>>,
    recv: RecvStream,
    max_response_size: u64,
    state: State,
    record: Record,
}

impl std::fmt::Debug for AnswerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerStream")
            .field("peer", &self.with.conn.peer)
            .field("route", &self.with.route)
            .finish_non_exhaustive()
    }
}

impl AnswerStream {
    /// The next chunk of the answer's body, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, RequestError> {
        let result = match self.state {
            State::Over => return Ok(None),
            State::Waiting => self.status().await,
            State::Reading => self.next().await,
        };
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.state = State::Over;
                self.record.ok();
            }
            Err(e) => {
                self.state = State::Over;
                let _ = self.recv.stop(VarInt::from_u32(code::CANCELLED));
                self.record.failed(e);
            }
        }
        result
    }

    /// Reads the rest of the answer into memory, failing past `limit` bytes.
    pub async fn read_to_end(mut self, limit: usize) -> Result<Bytes, RequestError> {
        let mut all = bytes::BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            if all.len() + chunk.len() > limit {
                let message =
                    format!("answer exceeds the limit of {limit} bytes given to read_to_end");
                let e = self.with.target().too_large(Body::Response, message);
                self.record.failed(&e);
                return Err(e);
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }

    /// Reads the status byte (and any body bytes with it); for a status other than OK,
    /// the peer's message as the error.
    async fn status(&mut self) -> Result<Option<Bytes>, RequestError> {
        let first = loop {
            match self.read(usize::MAX).await? {
                Some(chunk) if chunk.is_empty() => continue,
                Some(chunk) => break chunk,
                None => break Bytes::new(),
            }
        };
        let target = self.with.target();
        let status = wire::decode_status(&first)
            .map_err(|e| target.protocol(ProtocolError::BadAnswer(e)).error)?;
        let rest = first.slice(1..);
        if status == Status::Ok {
            self.state = State::Reading;
            return if rest.is_empty() {
                self.next().await
            } else {
                Ok(Some(rest))
            };
        }
        // An error's message is read whole, within max_response_size.
        let limit = usize::try_from(self.max_response_size).unwrap_or(usize::MAX);
        let read = timeout(self.with.idle, read_body(&mut self.recv, rest, limit, None)).await;
        let message = match read {
            Ok(Ok((message, _))) => String::from_utf8_lossy(&message).into_owned(),
            Ok(Err(BodyError::TooLarge)) => "(a message over max_response_size)".into(),
            Ok(Err(BodyError::Read(e))) => return Err(self.read_failed(e)),
            Ok(Err(BodyError::Closing)) | Err(_) => "(a message that did not arrive)".into(),
        };
        Err(match status {
            Status::TooLarge => target.too_large(Body::Request, message),
            status => target.remote(status, message),
        })
    }

    /// The next chunk of the body.
    async fn next(&mut self) -> Result<Option<Bytes>, RequestError> {
        self.read(crate::budget::CHUNK).await
    }

    /// One read off the stream, waiting at most the idle timeout since the last progress
    /// of the answer or of the body (an answer may wait for the whole body); a chunk
    /// already there is taken with no timer.
    async fn read(&mut self, want: usize) -> Result<Option<Bytes>, RequestError> {
        let idle = self.with.idle;
        let body_progress = self.body_progress.clone();
        let body_moved = || *body_progress.lock().unwrap_or_else(|e| e.into_inner());
        let result = {
            let mut read = std::pin::pin!(self.recv.read_chunk(want, true));
            match poll_once(read.as_mut()).await {
                Some(result) => result,
                None => {
                    let mut since = Instant::now().max(body_moved());
                    loop {
                        match timeout_at(since + idle, read.as_mut()).await {
                            Ok(result) => break result,
                            // The body moved meanwhile: the wait starts again from then.
                            Err(_) if body_moved() > since => since = body_moved(),
                            Err(_) => return Err(self.with.target().timed_out(idle).error),
                        }
                    }
                }
            }
        };
        match result {
            Ok(chunk) => Ok(chunk.map(|chunk| chunk.bytes)),
            Err(e) => Err(self.read_failed(e)),
        }
    }

    fn read_failed(&self, e: ReadError) -> RequestError {
        let target = self.with.target();
        match e {
            ReadError::Reset(reset) if reset.into_inner() == u64::from(code::TOO_LARGE) => {
                let message = "the request body went over the peer's limit for this route (max_stream_body_size) while it was answering; what came of the answer is incomplete".to_string();
                target.too_large(Body::Request, message)
            }
            ReadError::Reset(reset) if reset.into_inner() == u64::from(code::TIMED_OUT) => {
                RequestError::TransferTimedOut {
                    peer: self.with.conn.peer,
                    route: self.with.route.clone(),
                }
            }
            ReadError::Reset(reset) if reset.into_inner() == u64::from(code::HANDLER_ERROR) => {
                let message = "the handler failed after its answer had started (stream reset with HANDLER_ERROR); what came of the answer is incomplete".to_string();
                target.remote(Status::HandlerError, message)
            }
            e => {
                let Failure { error, .. } = target.read_failed(e);
                error
            }
        }
    }
}

impl Drop for AnswerStream {
    fn drop(&mut self) {
        if !matches!(self.state, State::Over) {
            let _ = self.recv.stop(VarInt::from_u32(code::CANCELLED));
        }
    }
}
