//! The request body, as a streaming handler reads it.

use std::collections::VecDeque;

use bytes::Bytes;
use quinn::{ReadError, RecvStream, VarInt};
use tokio::time::{timeout_at, Instant};

use super::{Times, TransferError};
use crate::budget::{Held, CHUNK};
use crate::framing::poll_once;
use crate::wire::code;

/// The body of a request (or one-way message) on a streaming route, read a chunk at a
/// time as it arrives.
///
/// Only what QUIC flow control lets the peer send ahead is buffered
/// (`transport.stream_receive_window`); a handler that does not read holds the peer back.
/// Each read waits at most `limits.request_timeout` for the peer, and all of them
/// together end at the route's `max_duration`. Dropping the reader before the end stops
/// the peer's sending with code `CANCELLED`.
///
/// ```no_run
/// # async fn handler(mut body: rustorium_p2p::BodyReader) -> Result<(), rustorium_p2p::HandlerError> {
/// let mut total = 0;
/// while let Some(chunk) = body.chunk().await? {
///     total += chunk.len();
/// }
/// # Ok(()) }
/// ```
pub struct BodyReader {
    recv: RecvStream,
    /// Bytes read off the stream before the handler ran, not yet handed out.
    ready: VecDeque<Bytes>,
    /// Their count in the byte budget, given back once they are all handed out.
    held: Held,
    /// The stream's end came with them.
    fin: bool,
    received: u64,
    limit: u64,
    times: Times,
    state: State,
}

enum State {
    Open,
    Finished,
    Failed(TransferError),
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyReader")
            .field("received", &self.received)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl BodyReader {
    pub(crate) fn new(
        recv: RecvStream,
        ready: VecDeque<Bytes>,
        held: Held,
        fin: bool,
        limit: u64,
        times: Times,
    ) -> Self {
        BodyReader {
            recv,
            ready,
            held,
            fin,
            received: 0,
            limit,
            times,
            state: State::Open,
        }
    }

    /// The next chunk of the body, `None` at its end. A chunk is at most 64 KiB.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, TransferError> {
        match &self.state {
            State::Open => {}
            State::Finished => return Ok(None),
            State::Failed(e) => return Err(e.clone()),
        }
        let next = match self.ready.pop_front() {
            Some(chunk) => {
                if self.ready.is_empty() {
                    // The handler has them all now: they are its memory, not the node's.
                    self.held = Held::default();
                }
                Ok(Some(chunk))
            }
            None if self.fin => Ok(None),
            None => self.next().await,
        };
        let next = next.and_then(|chunk| match chunk {
            Some(chunk) => {
                self.received += chunk.len() as u64;
                if self.received > self.limit {
                    Err(TransferError::TooLarge { limit: self.limit })
                } else {
                    Ok(Some(chunk))
                }
            }
            None => Ok(None),
        });
        match next {
            Ok(Some(chunk)) => Ok(Some(chunk)),
            Ok(None) => {
                self.state = State::Finished;
                Ok(None)
            }
            Err(e) => {
                let stop = match e {
                    TransferError::TooLarge { .. } => Some(code::TOO_LARGE),
                    TransferError::Stalled { .. } | TransferError::TooLong { .. } => {
                        Some(code::TIMED_OUT)
                    }
                    _ => None,
                };
                if let Some(stop) = stop {
                    let _ = self.recv.stop(VarInt::from_u32(stop));
                }
                self.state = State::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Body bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.received
    }

    /// The route's limit on the body, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reads one chunk off the stream, waiting no longer than the idle timeout and the
    /// route's end. A chunk that is already there is taken with no timer.
    async fn next(&mut self) -> Result<Option<Bytes>, TransferError> {
        // At most one byte past the limit, so that an over-long body is noticed.
        let left = self.limit.saturating_sub(self.received).saturating_add(1);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(CHUNK);
        let Times {
            wait: idle,
            ends,
            max_duration,
        } = self.times;
        let mut read = std::pin::pin!(self.recv.read_chunk(want, true));
        let result = match poll_once(read.as_mut()).await {
            Some(result) => result,
            None => {
                let by = ends.min(Instant::now() + idle);
                match timeout_at(by, read).await {
                    Ok(result) => result,
                    Err(_) if Instant::now() >= ends => {
                        return Err(TransferError::TooLong {
                            limit: max_duration,
                        })
                    }
                    Err(_) => return Err(TransferError::Stalled { after: idle }),
                }
            }
        };
        match result {
            Ok(chunk) => Ok(chunk.map(|chunk| chunk.bytes)),
            Err(ReadError::Reset(code)) => Err(TransferError::ended(code.into_inner())),
            Err(ReadError::ConnectionLost(e)) => Err(TransferError::ConnectionLost(e)),
            Err(e) => Err(TransferError::Broken(e)),
        }
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        if matches!(self.state, State::Open) {
            let _ = self.recv.stop(VarInt::from_u32(code::CANCELLED));
        }
    }
}
