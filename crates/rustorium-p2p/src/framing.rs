//! Bodies on QUIC streams, for both ends: a prefix (route header or status byte) and a
//! body written together, and a body read to the end of its stream within a size limit.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::time::{timeout_at, Instant};

use crate::budget::{ByteBudget, Held, CHUNK};

/// Writes `prefix` then `body` on `send` (without finishing it).
pub(crate) async fn write_framed(
    send: &mut SendStream,
    prefix: Bytes,
    body: Bytes,
) -> Result<(), WriteError> {
    let (mut chunks, count) = framed(prefix, body);
    send.write_all_chunks(&mut chunks[..count]).await
}

/// `prefix` and `body` as the chunks to write, and how many there are, neither copied.
/// (They still leave in one STREAM frame: quinn builds a frame from the stream's bytes,
/// whatever chunks they were written in, so the other side reads them in one piece.)
fn framed(prefix: Bytes, body: Bytes) -> ([Bytes; 2], usize) {
    let count = if body.is_empty() { 1 } else { 2 };
    ([prefix, body], count)
}

/// A status byte as a chunk to write, with no allocation.
pub(crate) fn status_chunk(status: crate::wire::Status) -> Bytes {
    static BYTES: [u8; 256] = {
        let mut all = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            all[i] = i as u8;
            i += 1;
        }
        all
    };
    let byte = usize::from(crate::wire::encode_status(status));
    Bytes::from_static(&BYTES[byte..=byte])
}

/// No byte of an answer could be written for the stall timeout (or the deadline passed).
pub(crate) struct Stalled;

/// When a write must be done by.
#[derive(Clone, Copy)]
pub(crate) enum Deadline {
    /// At this instant.
    At(Instant),
    /// This long after the write starts (the clock is read only if the write has to wait).
    After(Duration),
}

impl Deadline {
    /// The instant, reading the clock for [`Deadline::After`].
    pub fn at(self) -> Instant {
        match self {
            Deadline::At(at) => at,
            Deadline::After(after) => Instant::now() + after,
        }
    }
}

/// Writes `prefix` then `body` on `send` (without finishing it), giving up with
/// [`Stalled`] when no byte goes out for `stall`, or at `deadline` (which is left
/// resolved to an instant if the write had to wait).
///
/// An answer that fits the stream's window goes out in one step with no timer and no
/// clock read; only a write that has to wait arms the timers.
///
/// Not an `async fn` (which would hold `prefix` and `body` twice); the wait, when there is
/// one, is boxed: only a write that has to wait pays for its state machine. Its first step
/// repeats [`write_chunks_within`]'s rather than calling it: nested, the two state
/// machines took 112 bytes more in every request's (measured with `-Zprint-type-sizes`),
/// past the size glibc serves from its per-thread cache.
pub(crate) fn write_framed_within<'a>(
    send: &'a mut SendStream,
    prefix: Bytes,
    body: Bytes,
    stall: Duration,
    deadline: &'a mut Deadline,
) -> impl std::future::Future<Output = Result<Result<(), WriteError>, Stalled>> + Send + 'a {
    let (mut chunks, count) = framed(prefix, body);
    async move {
        // `write_chunks` is cancel-safe: dropped while pending, it has written nothing.
        let done = match poll_once(send.write_chunks(&mut chunks[..count])).await {
            Some(Ok(written)) => written.chunks,
            Some(Err(e)) => return Ok(Err(e)),
            None => 0,
        };
        if done == count {
            return Ok(Ok(()));
        }
        Box::pin(write_rest_within(
            send,
            &mut chunks[done..count],
            stall,
            deadline,
            || {},
        ))
        .await
    }
}

/// Writes `chunks` on `send` (without finishing it), giving up with [`Stalled`] when no
/// byte goes out for `stall`, or at `deadline`, as [`write_framed_within`] does; calls
/// `progress` each time bytes go out after a wait.
pub(crate) async fn write_chunks_within(
    send: &mut SendStream,
    chunks: &mut [Bytes],
    stall: Duration,
    deadline: &mut Deadline,
    progress: impl FnMut(),
) -> Result<Result<(), WriteError>, Stalled> {
    let count = chunks.len();
    // `write_chunks` is cancel-safe: dropped while pending, it has written nothing.
    let done = match poll_once(send.write_chunks(chunks)).await {
        Some(Ok(written)) => written.chunks,
        Some(Err(e)) => return Ok(Err(e)),
        None => 0,
    };
    if done == count {
        return Ok(Ok(()));
    }
    write_rest_within(send, &mut chunks[done..count], stall, deadline, progress).await
}

/// The rest of a write that could not go out at once: the clock is read and the timers
/// armed only here.
async fn write_rest_within(
    send: &mut SendStream,
    chunks: &mut [Bytes],
    stall: Duration,
    deadline: &mut Deadline,
    mut progress: impl FnMut(),
) -> Result<Result<(), WriteError>, Stalled> {
    let count = chunks.len();
    let mut done = 0;
    // Resolved once: whatever waits after this write (shutdown's wait for the peer to
    // have the answer) shares the same instant.
    let at = deadline.at();
    *deadline = Deadline::At(at);
    let deadline = at;
    while done < count {
        let by = deadline.min(Instant::now() + stall);
        // Boxed: a tokio timer is large, and inline it would add to every write's state
        // machine.
        let write = send.write_chunks(&mut chunks[done..count]);
        match Box::pin(timeout_at(by, write)).await {
            Ok(Ok(written)) => {
                done += written.chunks;
                progress();
            }
            Ok(Err(e)) => return Ok(Err(e)),
            Err(_) => return Err(Stalled),
        }
    }
    Ok(Ok(()))
}

/// Polls `future` once: its output if it is ready at once, else `None` (dropping the
/// future, or, for a pinned `&mut`, leaving it to be polled again).
pub(crate) async fn poll_once<F: std::future::Future>(future: F) -> Option<F::Output> {
    use std::task::Poll;
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Why a body could not be read.
pub(crate) enum BodyError {
    TooLarge,
    Read(ReadError),
    /// The node is closing (its byte budget was closed).
    Closing,
}

/// Reads the rest of a stream after `first`, up to `limit` bytes in all. A body that
/// arrives in one piece is returned without copying. With a `budget`, each chunk read is
/// counted in it, waiting while it is full (the stream is not read meanwhile, so flow
/// control holds the peer back); the body's bytes stay counted in the returned [`Held`]
/// until it is dropped.
pub(crate) async fn read_body(
    recv: &mut RecvStream,
    first: Bytes,
    limit: usize,
    budget: Option<ByteBudget<'_>>,
) -> Result<(Bytes, Held), BodyError> {
    if first.len() > limit {
        return Err(BodyError::TooLarge);
    }
    let mut total = first.len();
    let mut single = first;
    let mut joined: Option<BytesMut> = None;
    let mut held = Held::default();
    loop {
        // Ask for at most one byte past the limit, so an over-long body is noticed.
        let mut want = (limit - total).saturating_add(1);
        if budget.is_some() {
            want = want.min(CHUNK);
        }
        let chunk = match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => break,
            Err(e) => return Err(BodyError::Read(e)),
        };
        // Count the chunk; when the budget is full this waits, and the stream is not read
        // meanwhile. (Counting after the read lets a body that is complete, such as a small
        // one whose FIN is all that is left, go through without waiting; what a waiting
        // stream holds beyond the budget is the one chunk it read, a packet's worth.)
        if let Some(budget) = budget {
            // Boxed: only a body of more than one chunk gets here, and the two semaphore
            // waits inline would add to every request's state machine.
            let counted = Box::pin(budget.reserve(chunk.len())).await;
            held.merge(counted.map_err(|_| BodyError::Closing)?);
        }
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
    Ok((joined.map_or(single, BytesMut::freeze), held))
}
