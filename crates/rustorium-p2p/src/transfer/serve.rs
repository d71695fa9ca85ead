//! The answering side of a streaming route: the handler runs as the body arrives, with a
//! transfer slot (its peer's share, then the node's) for as long as it runs, and the
//! route's `max_duration` as its end.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{Mutex, OwnedSemaphorePermit};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, warn};

use super::reader::BodyReader;
use super::writer::{Answer, AnswerWriter};
use super::TransferError;
use crate::budget::{ByteBudget, Held};
use crate::framing::{poll_once, read_body, BodyError, Deadline};
use crate::handler::catch_panics;
use crate::metrics::Outcome;
use crate::serve::{Served, Serving, Stream};
use crate::transfer::StreamRoute;
use crate::wire::{code, Status};

/// A body up to this size that is all here when its stream is opened is served with a
/// handler slot rather than a transfer slot.
const WHOLE: usize = 16 * 1024;

/// What reading a whole body (for want of a transfer slot) came to.
enum Whole {
    /// It is in `ready`; its bytes are counted until this is dropped.
    Read(Held),
    /// It is over what may be buffered: it needs a transfer slot.
    TooLarge,
    /// The stream failed or the peer was too slow.
    Failed(Outcome),
}

/// The slots a streaming request or message holds.
enum Slots {
    /// A handler slot of the peer's share and one of the node's, as a buffered request
    /// takes: its body is all here.
    Handler((OwnedSemaphorePermit, OwnedSemaphorePermit)),
    /// Held for as long as the handler runs: a transfer slot of the peer's share and one
    /// of the node's for a body still arriving; for a one-way message whose body is all
    /// here (no answer to give them back at), handler slots.
    Held((OwnedSemaphorePermit, OwnedSemaphorePermit)),
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
        recv: RecvStream,
        started: Instant,
    ) -> Served {
        let Stream {
            name,
            route,
            first,
            early,
        } = stream;
        let deadline = end_of(started, self.limits.request_timeout);
        let mut recv = recv;
        // What of the body is already here. A body that is all here (most small ones)
        // can no longer be held open by its peer: it is served like a buffered request,
        // with a handler slot, which its answer gives back once it starts (from then on
        // it counts among the peer's pending answers). A body still arriving takes a
        // transfer slot for as long as the handler runs: its peer sets the pace.
        let mut ready = VecDeque::from([first]);
        let mut here = ready[0].len();
        let fin = loop {
            if here > WHOLE {
                break false;
            }
            match poll_once(recv.read_chunk(WHOLE + 1 - here, true)).await {
                Some(Ok(Some(chunk))) => {
                    here += chunk.bytes.len();
                    ready.push_back(chunk.bytes);
                }
                Some(Ok(None)) => break true,
                Some(Err(e)) => {
                    debug!(peer = %self.peer, "stream failed: {e}");
                    return Served::new(&name, Outcome::StreamError);
                }
                None => break false,
            }
        };
        let mut fin = fin;
        // Bytes of a body read whole because no transfer slot was free (counted in the
        // byte budget, as a buffered request's, until the handler returns).
        let mut held = None;
        let slots = match (fin, send.is_some()) {
            (true, true) => self.take_slots().map(Slots::Handler),
            (false, true) => match self.take_transfer_slots() {
                Ok(slots) => Ok(Slots::Held(slots)),
                // No transfer slot: a body that fits a buffered request is read whole,
                // as a buffered route would (the byte budget, `max_request_size`,
                // `request_timeout`), and served with a handler slot. Many medium
                // bodies at once (an echo under load) are served so; only a body too
                // large to buffer is refused BUSY.
                Err(why) => match self
                    .read_whole(&mut recv, &mut ready, deadline, &route)
                    .await
                {
                    Whole::Read(bytes) => {
                        held = Some(bytes);
                        fin = true;
                        self.take_slots().map(Slots::Handler)
                    }
                    Whole::TooLarge => Err(why),
                    Whole::Failed(outcome) => {
                        let code = match outcome {
                            Outcome::TimedOut => code::TIMED_OUT,
                            _ => code::CANCELLED,
                        };
                        let _ = recv.stop(VarInt::from_u32(code));
                        if let Some(mut send) = send {
                            let _ = send.reset(VarInt::from_u32(code));
                        }
                        return Served::new(&name, outcome);
                    }
                },
            },
            // With no answer to say BUSY in, a message waits for a slot until its deadline.
            (fin, false) => {
                let (share, node) = if fin {
                    (&self.share.slots, self.slots)
                } else {
                    (&self.share.transfers, self.transfers)
                };
                let slots = async {
                    let share = share.clone().acquire_owned().await?;
                    let node = node.clone().acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((share, node))
                };
                match timeout_at(deadline, slots).await {
                    Ok(Ok(slots)) => Ok(Slots::Held(slots)),
                    _ => Err("the node is at its limit of concurrent requests or shutting down"),
                }
            }
        };
        let slots = match slots {
            Ok(slots) => slots,
            Err(why) => {
                let _ = recv.stop(VarInt::from_u32(code::BUSY));
                match send {
                    Some(mut send) => {
                        let msg = Bytes::from_static(why.as_bytes());
                        self.answer(&mut send, Status::Busy, msg, Deadline::At(deadline))
                            .await
                    }
                    None => {
                        warn!(peer = %self.peer, "dropped a one-way message on {name:?}: {why}")
                    }
                }
                return Served::new(&name, Outcome::Busy);
            }
        };
        let (handler_slots, _transfer_slots) = match slots {
            Slots::Handler(slots) => (Some(slots), None),
            Slots::Held(slots) => (None, Some(slots)),
        };
        // Streaming routes never run on 0-RTT data: a replayed body cannot be told from a
        // new one until the handshake completes.
        if !matches!(timeout_at(deadline, self.confirmed()).await, Ok(true)) {
            let _ = recv.stop(VarInt::from_u32(code::TIMED_OUT));
            if let Some(mut send) = send {
                let _ = send.reset(VarInt::from_u32(code::TIMED_OUT));
            }
            return Served::new(&name, Outcome::TimedOut);
        }

        let ends = end_of(started, route.max_duration);
        let body = BodyReader::new(
            recv,
            ready,
            fin,
            route.max_body,
            self.limits.request_timeout,
            ends,
            route.max_duration,
        );
        let answer = send.map(|send| {
            let answer = Answer::new(
                send,
                self.limits.answer_timeout,
                ends,
                route.max_duration,
                self.share.answers.clone(),
                handler_slots,
            );
            Arc::new(Mutex::new(Some(answer)))
        });
        let writer = AnswerWriter::new(answer.clone());
        let ctx = self.context(&name, answer.is_none(), early);
        let handler = &route.handler;
        let result = timeout_at(ends, catch_panics(|| handler.call(ctx, body, writer))).await;
        drop(held);

        let Some(answer) = answer else {
            let outcome = match result {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(e)) => {
                    warn!(peer = %self.peer, "one-way handler failed: {e}");
                    status_outcome(e.status)
                }
                Err(_) => Outcome::TimedOut,
            };
            return Served::new(&name, outcome);
        };
        // The handler has returned (or was dropped): the answer is the node's again. A
        // write still under way (from a task the handler spawned) ends within
        // `answer_timeout`; any after this fails with `AnswerOver`.
        let Some(mut answer) = answer.lock().await.take() else {
            unreachable!("only this function takes the answer")
        };
        answer.release_slots();
        if answer.strike {
            self.unread();
        }
        let place = answer.place.take();
        let outcome = match result {
            Err(_) => {
                debug!(peer = %self.peer, "transfer on {name:?} ran past its max_duration");
                let _ = answer.send.reset(VarInt::from_u32(code::TIMED_OUT));
                Outcome::TimedOut
            }
            Ok(Ok(())) => match &answer.failed {
                Some(e) => transfer_outcome(e),
                None if answer.started => {
                    let _ = answer.send.finish();
                    self.share.read();
                    self.delivered(&mut answer.send, deadline).await;
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
                debug!(peer = %self.peer, "streaming handler failed: {e}");
                match &answer.failed {
                    Some(failed) => transfer_outcome(failed),
                    None if answer.started => {
                        // A body over the limit (an echo is answering as it reads) says
                        // so; any other failure is the handler's.
                        let reset = match e.status {
                            Status::TooLarge => code::TOO_LARGE,
                            _ => code::HANDLER_ERROR,
                        };
                        let _ = answer.send.reset(VarInt::from_u32(reset));
                        status_outcome(e.status)
                    }
                    None => {
                        drop(place);
                        let done = Deadline::After(self.limits.request_timeout);
                        let message = Bytes::from(e.message);
                        self.answer(&mut answer.send, e.status, message, done).await;
                        status_outcome(e.status)
                    }
                }
            }
        };
        Served::new(&name, outcome)
    }

    /// Reads the rest of a body into `ready` (as one chunk), within the smaller of
    /// `max_request_size` and the route's `max_body`, the byte budget, and `deadline`.
    async fn read_whole(
        &self,
        recv: &mut RecvStream,
        ready: &mut VecDeque<Bytes>,
        deadline: Instant,
        route: &StreamRoute,
    ) -> Whole {
        let mut first = BytesMut::new();
        for chunk in ready.drain(..) {
            first.extend_from_slice(&chunk);
        }
        let limit = self.limits.max_request_size.min(route.max_body);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let budget = ByteBudget {
            peer: &self.share.bytes,
            node: self.bytes,
        };
        let read = read_body(recv, first.freeze(), limit, Some(budget));
        match timeout_at(deadline, read).await {
            Ok(Ok((body, held))) => {
                ready.push_back(body);
                Whole::Read(held)
            }
            Ok(Err(BodyError::TooLarge)) => Whole::TooLarge,
            Ok(Err(BodyError::Read(e))) => {
                debug!(peer = %self.peer, "stream failed: {e}");
                Whole::Failed(Outcome::StreamError)
            }
            Ok(Err(BodyError::Closing)) => Whole::Failed(Outcome::Busy),
            Err(_) => Whole::Failed(Outcome::TimedOut),
        }
    }

    /// Takes a transfer slot from the peer's share, then one of the node's.
    fn take_transfer_slots(
        &self,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), &'static str> {
        let share = self.share.transfers.clone().try_acquire_owned().map_err(|_| {
            "this peer is at its limit of streaming requests on the node (max_concurrent_transfers_per_peer); retry later"
        })?;
        let node = self.transfers.clone().try_acquire_owned().map_err(|_| {
            "the node is at its limit of streaming requests (max_concurrent_transfers); retry later"
        })?;
        Ok((share, node))
    }

    /// While the node shuts down, an answer counts as delivered once the peer has it.
    async fn delivered(&self, send: &mut SendStream, deadline: Instant) {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            let by = deadline.max(Instant::now() + self.limits.answer_timeout);
            let _ = timeout_at(by, send.stopped()).await;
        }
    }
}

/// The outcome label for a handler's failure with `status`.
fn status_outcome(status: Status) -> Outcome {
    match status {
        Status::Ok => Outcome::Ok,
        Status::TooLarge => Outcome::TooLarge,
        Status::Busy => Outcome::Busy,
        Status::BadRequest => Outcome::BadRequest,
        Status::UnknownRoute => Outcome::UnknownRoute,
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
        TransferError::ConnectionLost(_) => Outcome::ConnectionLost,
        _ => Outcome::StreamError,
    }
}
