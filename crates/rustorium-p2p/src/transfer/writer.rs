//! The answer, as a streaming handler writes it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{SendStream, VarInt, WriteError};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use super::{Times, TransferError};
use crate::framing::{write_chunks_within, Deadline, Stalled};
use crate::serve::{try_pair, Pair};
use crate::tally::{Taken, Tally};
use crate::wire::{code, Status};

/// The answer to a request on a streaming route, written a chunk at a time.
///
/// The first write sends status `OK`; the answer ends when the handler returns `Ok`.
/// Each write waits for the requester to read (flow control) for at most
/// `limits.answer_timeout` without progress, and all of them together end at the route's
/// `max_duration` (or, for a long answer to a small request made when the node had no
/// transfer slot free, `limits.request_timeout` after its first write, when the handler
/// is dropped too). For a one-way message there is no one to answer: writes succeed and
/// go nowhere.
///
/// ```no_run
/// # async fn handler(mut body: rustorium_p2p::BodyReader, mut answer: rustorium_p2p::AnswerWriter) -> Result<(), rustorium_p2p::HandlerError> {
/// // An echo.
/// while let Some(chunk) = body.chunk().await? {
///     answer.write(chunk).await?;
/// }
/// # Ok(()) }
/// ```
pub struct AnswerWriter {
    /// Shared with the node, which finishes (or resets) the answer when the handler
    /// returns; `None` for a one-way message.
    answer: Option<Arc<Mutex<Option<Answer>>>>,
}

impl std::fmt::Debug for AnswerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerWriter")
            .field("one_way", &self.answer.is_none())
            .finish_non_exhaustive()
    }
}

impl AnswerWriter {
    pub(crate) fn new(answer: Option<Arc<Mutex<Option<Answer>>>>) -> Self {
        AnswerWriter { answer }
    }

    /// Writes `chunk` (the first write also sends status `OK`), waiting while the
    /// requester has not read what came before.
    ///
    /// Cancelling a write (a `timeout` around it, a `select!`) ends the answer: what went
    /// out of it may be cut anywhere, so later writes fail with
    /// [`TransferError::Interrupted`] and the answer is reset with `HANDLER_ERROR`.
    pub async fn write(&mut self, chunk: impl Into<Bytes>) -> Result<(), TransferError> {
        let Some(answer) = &self.answer else {
            return Ok(());
        };
        let mut answer = answer.lock().await;
        match answer.as_mut() {
            Some(answer) => answer.write(chunk.into()).await,
            None => Err(TransferError::AnswerOver),
        }
    }

    /// Writes a copy of `data`; see [`write`](Self::write).
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), TransferError> {
        self.write(Bytes::copy_from_slice(data)).await
    }
}

/// What an answer may hold of the node and of its peer's share.
pub(crate) struct Places {
    /// The peer's share of answers waiting to be read.
    pub pending: Arc<Tally>,
    /// Handler slots held until the answer starts (for a body that was all there).
    pub slots: Option<Pair>,
    /// The transfer slots (the peer's share, the node's) that replace them then, if free.
    pub transfers: [Arc<Tally>; 2],
    /// How long an answer that got no transfer slot (and so keeps its handler slots)
    /// has, with its handler: `request_timeout`, a buffered request's time.
    pub buffered: Duration,
    /// Where the handler's end is told when that shortens it.
    pub ends: watch::Sender<Instant>,
}

/// An answer stream and where it stands.
pub(crate) struct Answer {
    pub send: SendStream,
    /// The status byte has gone out.
    pub started: bool,
    /// What failed a write; later writes fail the same way.
    pub failed: Option<TransferError>,
    /// The peer left the answer unread past `answer_timeout`, or had its share of unread
    /// answers already (a strike against it).
    pub strike: bool,
    /// `wait`: `answer_timeout`, for each write's progress.
    times: Times,
    /// The peer's share of answers waiting to be read.
    pending: Arc<Tally>,
    /// This answer's place in it, from its first byte.
    pub place: Option<Taken>,
    /// Handler slots held until the answer starts (for a body that was all there), and
    /// after that if no transfer slot was free.
    slots: Option<Pair>,
    /// The transfer slots (the peer's share, the node's) that replace them then, if free.
    transfers: [Arc<Tally>; 2],
    /// Transfer slots taken when the answer started.
    transfer: Option<Pair>,
    buffered: Duration,
    ends_of_handler: watch::Sender<Instant>,
    /// A write is under way; still `true` after the handler returns, it was cancelled
    /// (or panicked) midway.
    pub writing: bool,
}

impl Answer {
    pub fn new(send: SendStream, times: Times, places: Places) -> Self {
        let Places {
            pending,
            slots,
            transfers,
            buffered,
            ends,
        } = places;
        Answer {
            send,
            started: false,
            failed: None,
            strike: false,
            times,
            pending,
            place: None,
            slots,
            transfers,
            transfer: None,
            buffered,
            ends_of_handler: ends,
            writing: false,
        }
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), TransferError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.writing {
            let _ = self.send.reset(VarInt::from_u32(code::HANDLER_ERROR));
            return Err(self.fail(TransferError::Interrupted));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        // A write that could go at once would not look at the clock: the end is checked
        // here, for a handler that writes slowly to a peer that reads fast.
        if Instant::now() >= self.times.ends {
            let _ = self.send.reset(VarInt::from_u32(code::TIMED_OUT));
            let limit = self.times.max_duration;
            return Err(self.fail(TransferError::TooLong { limit }));
        }
        let mut chunks = [Bytes::new(), chunk];
        let chunks = if self.started {
            &mut chunks[1..]
        } else {
            let Some(place) = self.pending.try_take() else {
                let _ = self.send.reset(VarInt::from_u32(code::BUSY));
                self.strike = true;
                return Err(self.fail(TransferError::Busy));
            };
            self.place = Some(place);
            // Answering now, for as long as the peer takes to read; the answer counts
            // among the peer's pending answers (as a buffered one does). A request that
            // came with handler slots trades them for transfer slots if any are free (the
            // route's `max_duration` then applies). Else it keeps them, and it and its
            // handler get a buffered request's time from now, `request_timeout`: no
            // answer holds a handler slot for longer.
            if let Some(slots) = self.slots.take() {
                let [share, node] = &self.transfers;
                match try_pair(share, node) {
                    Ok(transfer) => self.transfer = Some(transfer),
                    Err(_) => {
                        self.slots = Some(slots);
                        let by = Instant::now() + self.buffered;
                        if by < self.times.ends {
                            self.times.ends = by;
                            self.times.max_duration = self.buffered;
                            self.ends_of_handler.send_replace(by);
                        }
                    }
                }
            }
            chunks[0] = crate::framing::status_chunk(Status::Ok);
            &mut chunks[..]
        };
        let mut deadline = Deadline::At(self.times.ends);
        // Cleared when the write ends; left set if it is dropped (or panics) midway.
        self.writing = true;
        let stall = self.times.wait;
        let written =
            write_chunks_within(&mut self.send, chunks, stall, &mut deadline, || {}).await;
        self.writing = false;
        match written {
            Ok(Ok(())) => {
                self.started = true;
                Ok(())
            }
            Ok(Err(e)) => Err(self.fail(match e {
                WriteError::Stopped(code) => TransferError::ended(code.into_inner()),
                WriteError::ConnectionLost(e) => TransferError::ConnectionLost(e),
                WriteError::ClosedStream | WriteError::ZeroRttRejected => {
                    TransferError::Ended { code: 0 }
                }
            })),
            Err(Stalled) => {
                let _ = self.send.reset(VarInt::from_u32(code::TIMED_OUT));
                if Instant::now() >= self.times.ends {
                    Err(self.fail(TransferError::TooLong {
                        limit: self.times.max_duration,
                    }))
                } else {
                    self.strike = true;
                    Err(self.fail(TransferError::Stalled { after: stall }))
                }
            }
        }
    }

    /// Gives back the handler or transfer slots it holds.
    pub fn release_slots(&mut self) {
        self.slots = None;
        self.transfer = None;
    }

    fn fail(&mut self, e: TransferError) -> TransferError {
        self.failed = Some(e.clone());
        e
    }
}
