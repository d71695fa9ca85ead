//! The answering side of a streaming route: the handler runs as the body arrives, with a
//! transfer slot (its peer's share, then the node's) for as long as it runs, and the
//! route's `max_duration` as its end.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{watch, Mutex};
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use super::reader::BodyReader;
use super::writer::{Answer, AnswerWriter, Places};
use super::{Times, TransferError};
use crate::budget::CHUNK;
use crate::budget::{ByteBudget, Held};
use crate::framing::{poll_once, read_body, BodyError, Deadline};
use crate::handler::{catch_panics, Cause, HandlerError};
use crate::log_limit::peer_warn;
use crate::metrics::Outcome;
use crate::serve::{pair_by, try_pair, Full, Pair, Served, Serving, Stream};
use crate::transfer::StreamRoute;
use crate::wire::{code, Status};

/// A body up to this size that is all here when its stream is opened is served with a
/// handler slot rather than a transfer slot.
const WHOLE: usize = 16 * 1024;

/// A streaming request or message let in: the slots it holds, and what of its body was
/// read before its handler runs.
struct Admitted {
    /// Handler slots of a request whose body is all here: given back when its answer
    /// starts, for a transfer slot if one is free (else kept).
    until_answer: Option<Pair>,
    /// Slots held until the handler returns: transfer slots for a body still arriving,
    /// or the slots of a one-way message.
    whole_run: Option<Pair>,
    /// The bytes in `ready`, counted in the byte budget until the handler has them.
    held: Held,
    /// Body bytes read so far, in chunks of at most 64 KiB.
    ready: VecDeque<Bytes>,
    /// The whole body was read (for want of a transfer slot).
    read_whole: bool,
    /// The stream's end is among them.
    fin: bool,
}

/// Why a streaming request or message was not let in.
enum Refused {
    /// No slot (the reason names the limit).
    Busy(&'static str),
    /// The body is over the route's `max_body` (known while reading it whole).
    TooLarge(u64),
    /// The stream failed, or the peer was too slow.
    Failed(Outcome),
}

/// `start + after`, or far in the future if that overflows.
pub(crate) fn end_of(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Serving<'_> {
    /// Serves a request (with `send`, its answer stream) or a one-way message (without)
    /// on a streaming route.
    pub(crate) async fn transfer(
        &self,
        stream: Stream,
        send: Option<SendStream>,
        mut recv: RecvStream,
        started: Instant,
    ) -> Served {
        let Stream {
            name,
            route,
            first,
            early,
        } = stream;
        let deadline = end_of(started, self.limits.request_timeout);
        // Streaming routes never run on 0-RTT data: a replayed body cannot be told from a
        // new one until the handshake completes. Nothing is taken before that.
        if !matches!(timeout_at(deadline, self.confirmed()).await, Ok(true)) {
            let _ = recv.stop(VarInt::from_u32(code::TIMED_OUT));
            if let Some(mut send) = send {
                let _ = send.reset(VarInt::from_u32(code::TIMED_OUT));
            }
            return Served::new(&name, Outcome::TimedOut);
        }
        let admitted = self
            .admit(&mut recv, first, send.is_some(), deadline, &route)
            .await;
        let Admitted {
            until_answer,
            whole_run: _whole_run,
            held,
            ready,
            fin,
            read_whole,
        } = match admitted {
            Ok(admitted) => admitted,
            Err(refused) => return self.refuse(&name, refused, send, recv, deadline).await,
        };

        let ends = end_of(started, route.max_duration);
        let times = |wait| Times {
            wait,
            ends,
            max_duration: route.max_duration,
        };
        let reading = times(self.limits.request_timeout);
        // Bytes read at open go back to the budget once the handler has them; a body read
        // whole stays counted until the handler returns (slices of it share one buffer).
        let (early_held, whole_held) = if read_whole {
            (Held::default(), held)
        } else {
            (held, Held::default())
        };
        let body = BodyReader::new(recv, ready, early_held, fin, route.max_body, reading);
        // The handler's end: the route's, or sooner if its answer is held to a buffered
        // request's time (see `Places::buffered`).
        let (ends_tx, mut ends_rx) = watch::channel(ends);
        let answer = send.map(|send| {
            let places = Places {
                pending: self.connection.share.answers.clone(),
                slots: until_answer,
                transfers: [
                    self.connection.share.transfers.clone(),
                    self.transfers.clone(),
                ],
                buffered: self.limits.request_timeout,
                ends: ends_tx,
            };
            let answer = Answer::new(send, times(self.limits.answer_timeout), places);
            Arc::new(Mutex::new(Some(answer)))
        });
        let writer = AnswerWriter::new(answer.clone());
        let ctx = self.context(&name, answer.is_none(), early);
        let handler = &route.handler;
        let run = catch_panics(|| handler.call(ctx, body, writer));
        let mut run = std::pin::pin!(run);
        let mut watching = true;
        let result = loop {
            let by = *ends_rx.borrow_and_update();
            tokio::select! {
                biased;
                result = &mut run => break Ok(result),
                _ = tokio::time::sleep_until(by) => break Err(()),
                changed = ends_rx.changed(), if watching => watching = changed.is_ok(),
            }
        };
        drop(whole_held);

        let Some(answer) = answer else {
            let outcome = match result {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(e)) => {
                    peer_warn!(self.warnings, peer = %self.connection.peer, "one-way handler failed: {e}");
                    error_outcome(&e)
                }
                Err(_) => Outcome::TimedOut,
            };
            return Served::new(&name, outcome);
        };
        // A writer still alive here was moved out of the handler (into a task of its
        // own): its answer may not be complete, so it is not finished as if it were.
        let escaped = Arc::strong_count(&answer) > 1;
        // The handler has returned (or was dropped): the answer is the node's again. A
        // write still under way ends by the route's `max_duration`; any after this fails
        // with `AnswerOver`.
        let Some(mut answer) = answer.lock().await.take() else {
            unreachable!("only this function takes the answer")
        };
        // Counted among the answers being written (which shutdown waits for) before its
        // slots go, so that no moment sees neither.
        let _tracked = self.answers.try_take();
        answer.release_slots();
        if answer.strike {
            self.unread();
        }
        let place = answer.place.take();
        let reset = |answer: &mut Answer, code: u32| {
            let _ = answer.send.reset(VarInt::from_u32(code));
        };
        let outcome = match result {
            Err(_) => {
                debug!(peer = %self.connection.peer, "transfer on {name:?} ran past its max_duration");
                reset(&mut answer, code::TIMED_OUT);
                Outcome::TimedOut
            }
            // A write was cancelled (or panicked) midway, or the writer outlived its
            // handler: what went out may be cut anywhere.
            Ok(_) if (answer.writing || escaped) && answer.failed.is_none() => {
                debug!(peer = %self.connection.peer, "answer on {name:?} left incomplete by its handler");
                reset(&mut answer, code::HANDLER_ERROR);
                Outcome::HandlerError
            }
            Ok(Ok(())) => match &answer.failed {
                Some(e) => transfer_outcome(e),
                None if answer.started => {
                    let _ = answer.send.finish();
                    self.connection.share.read();
                    // The request's own deadline is long gone after a long answer.
                    let by = Deadline::After(self.limits.answer_timeout);
                    self.delivered(&mut answer.send, by).await;
                    Outcome::Ok
                }
                None => {
                    drop(place);
                    let done = Deadline::After(self.limits.request_timeout);
                    self.answer(&mut answer.send, Status::Ok, Bytes::new(), done)
                        .await;
                    Outcome::Ok
                }
            },
            Ok(Err(e)) => {
                debug!(peer = %self.connection.peer, "streaming handler failed: {e}");
                match (&answer.failed, e.cause) {
                    // The answer's own failure says what happened (the stream is reset).
                    (Some(failed), _) => transfer_outcome(failed),
                    // The body's failure: the requester cancelled, or was too slow.
                    (None, Some(Cause::Cancelled)) => {
                        reset(&mut answer, code::CANCELLED);
                        Outcome::Cancelled
                    }
                    (None, Some(Cause::TimedOut)) => {
                        reset(&mut answer, code::TIMED_OUT);
                        Outcome::TimedOut
                    }
                    // A body over the limit (an echo is answering as it reads) says so;
                    // any other failure is the handler's.
                    (None, _) if answer.started => {
                        let code = match e.status {
                            Status::TooLarge => code::TOO_LARGE,
                            _ => code::HANDLER_ERROR,
                        };
                        reset(&mut answer, code);
                        error_outcome(&e)
                    }
                    (None, _) => {
                        drop(place);
                        let done = Deadline::After(self.limits.request_timeout);
                        let outcome = error_outcome(&e);
                        let message = Bytes::from(e.message);
                        self.answer(&mut answer.send, e.status, message, done).await;
                        outcome
                    }
                }
            }
        };
        Served::new(&name, outcome)
    }

    /// Reads what of the body is already here (counted in the byte budget) and takes the
    /// slots the request or message needs. A body that is all here (most small ones)
    /// can no longer be held open by its peer: it is served like a buffered request, with
    /// a handler slot. A body still arriving takes a transfer slot for as long as the
    /// handler runs, since its peer sets the pace; with none free, a body that fits
    /// `max_request_size` is read whole, as a buffered route would read it.
    async fn admit(
        &self,
        recv: &mut RecvStream,
        first: Bytes,
        request: bool,
        deadline: Instant,
        route: &StreamRoute,
    ) -> Result<Admitted, Refused> {
        let budget = ByteBudget {
            peer: &self.connection.share.bytes,
            node: self.bytes,
        };
        let count = |n: usize| async move {
            match timeout_at(deadline, budget.reserve(n)).await {
                Ok(Ok(held)) => Ok(held),
                Ok(Err(_)) => Err(Refused::Busy("the node is shutting down")),
                Err(_) => Err(Refused::Failed(Outcome::TimedOut)),
            }
        };
        // The header's chunk (and what came with it) is left out of the budget, as on a
        // buffered route; what is read after it is counted.
        let mut held = Held::default();
        let mut here = first.len();
        let mut ready = VecDeque::from([first]);
        let fin = loop {
            if here > WHOLE {
                break false;
            }
            match poll_once(recv.read_chunk(WHOLE + 1 - here, true)).await {
                Some(Ok(Some(chunk))) => {
                    held.merge(count(chunk.bytes.len()).await?);
                    here += chunk.bytes.len();
                    ready.push_back(chunk.bytes);
                }
                Some(Ok(None)) => break true,
                Some(Err(e)) => {
                    debug!(peer = %self.connection.peer, "stream failed: {e}");
                    return Err(Refused::Failed(Outcome::StreamError));
                }
                None => break false,
            }
        };
        let admitted = |until_answer, whole_run, held, ready, fin| Admitted {
            until_answer,
            whole_run,
            held,
            ready,
            fin,
            read_whole: false,
        };
        if !request {
            // With no answer to say BUSY in, a message waits for its slots until its
            // deadline, and holds them until its handler returns.
            let (share, node) = if fin {
                (&self.connection.share.slots, self.slots)
            } else {
                (&self.connection.share.transfers, self.transfers)
            };
            return match pair_by(share, node, deadline).await {
                Some(slots) => Ok(admitted(None, Some(slots), held, ready, fin)),
                None => Err(Refused::Busy(
                    "the node is at its limit of concurrent requests or shutting down",
                )),
            };
        }
        if !fin {
            match self.take_transfer_slots() {
                Ok(slots) => return Ok(admitted(None, Some(slots), held, ready, fin)),
                Err(why) => {
                    let whole = self.read_whole(recv, &mut ready, deadline, route, why);
                    held.merge(whole.await?);
                    let slots = self.take_slots().map_err(Refused::Busy)?;
                    return Ok(Admitted {
                        read_whole: true,
                        ..admitted(Some(slots), None, held, ready, true)
                    });
                }
            }
        }
        let slots = self.take_slots().map_err(Refused::Busy)?;
        Ok(admitted(Some(slots), None, held, ready, fin))
    }

    /// Reads the rest of a body into `ready` (in chunks of at most 64 KiB), within the
    /// smaller of `max_request_size` and the route's `max_body`, the byte budget, and
    /// `deadline`; its bytes stay counted in the returned [`Held`]. A body over
    /// `max_request_size` needs a transfer slot: refused with `busy`.
    async fn read_whole(
        &self,
        recv: &mut RecvStream,
        ready: &mut VecDeque<Bytes>,
        deadline: Instant,
        route: &StreamRoute,
        busy: &'static str,
    ) -> Result<Held, Refused> {
        let mut first = BytesMut::new();
        for chunk in ready.drain(..) {
            first.extend_from_slice(&chunk);
        }
        let over_route = route.max_body <= self.limits.max_request_size;
        let limit = self.limits.max_request_size.min(route.max_body);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let budget = ByteBudget {
            peer: &self.connection.share.bytes,
            node: self.bytes,
        };
        let read = read_body(recv, first.freeze(), limit, Some(budget));
        match timeout_at(deadline, read).await {
            Ok(Ok((body, held))) => {
                let mut at = 0;
                while at < body.len() {
                    let end = (at + CHUNK).min(body.len());
                    ready.push_back(body.slice(at..end));
                    at = end;
                }
                Ok(held)
            }
            Ok(Err(BodyError::TooLarge)) if over_route => Err(Refused::TooLarge(route.max_body)),
            Ok(Err(BodyError::TooLarge)) => Err(Refused::Busy(busy)),
            Ok(Err(BodyError::Read(e))) => {
                debug!(peer = %self.connection.peer, "stream failed: {e}");
                Err(Refused::Failed(Outcome::StreamError))
            }
            Ok(Err(BodyError::Closing)) => Err(Refused::Busy("the node is shutting down")),
            Err(_) => Err(Refused::Failed(Outcome::TimedOut)),
        }
    }

    /// Refuses a streaming request or message: BUSY or TOO_LARGE with the reason (a
    /// request's answer; a message is logged), or, for a failed or too slow stream, a
    /// reset.
    async fn refuse(
        &self,
        name: &Arc<str>,
        refused: Refused,
        send: Option<SendStream>,
        mut recv: RecvStream,
        deadline: Instant,
    ) -> Served {
        let (status, message, outcome) = match refused {
            Refused::Busy(why) => (Status::Busy, why.to_string(), Outcome::Busy),
            Refused::TooLarge(limit) => (
                Status::TooLarge,
                format!("request body exceeds this route's limit of {limit} bytes (max_stream_body_size)"),
                Outcome::TooLarge,
            ),
            Refused::Failed(outcome) => {
                let code = match outcome {
                    Outcome::TimedOut => code::TIMED_OUT,
                    _ => code::CANCELLED,
                };
                let _ = recv.stop(VarInt::from_u32(code));
                if let Some(mut send) = send {
                    let _ = send.reset(VarInt::from_u32(code));
                }
                return Served::new(name, outcome);
            }
        };
        let stop = match status {
            Status::TooLarge => code::TOO_LARGE,
            _ => code::BUSY,
        };
        let _ = recv.stop(VarInt::from_u32(stop));
        match send {
            Some(mut send) => {
                let message = Bytes::from(message);
                self.answer(&mut send, status, message, Deadline::At(deadline))
                    .await
            }
            None => {
                peer_warn!(self.warnings, peer = %self.connection.peer, "dropped a one-way message on {name:?}: {message}")
            }
        }
        Served::new(name, outcome)
    }

    /// Takes a transfer slot from the peer's share, then one of the node's.
    fn take_transfer_slots(&self) -> Result<Pair, &'static str> {
        try_pair(&self.connection.share.transfers, self.transfers).map_err(|full| match full {
            Full::Share => "this peer is at its limit of streaming requests on the node (max_concurrent_transfers_per_peer); retry later",
            Full::Node => "the node is at its limit of streaming requests (max_concurrent_transfers); retry later",
        })
    }
}

/// The outcome label for a handler's failure `e`.
fn error_outcome(e: &HandlerError) -> Outcome {
    match (e.cause, e.status) {
        (Some(Cause::Cancelled), _) => Outcome::Cancelled,
        (Some(Cause::TimedOut), _) => Outcome::TimedOut,
        (_, Status::Ok) => Outcome::Ok,
        (_, Status::TooLarge) => Outcome::TooLarge,
        (_, Status::Busy) => Outcome::Busy,
        (_, Status::BadRequest) => Outcome::BadRequest,
        (_, Status::UnknownRoute) => Outcome::UnknownRoute,
        _ => Outcome::HandlerError,
    }
}

/// The outcome label for a transfer whose answer failed with `e`.
fn transfer_outcome(e: &TransferError) -> Outcome {
    match e {
        TransferError::TooLarge { .. } => Outcome::TooLarge,
        TransferError::Stalled { .. } | TransferError::TooLong { .. } => Outcome::TimedOut,
        TransferError::Cancelled => Outcome::Cancelled,
        TransferError::Busy => Outcome::Busy,
        TransferError::Interrupted => Outcome::HandlerError,
        TransferError::ConnectionLost(_) => Outcome::ConnectionLost,
        _ => Outcome::StreamError,
    }
}
