//! Request bytes held in memory, counted against the peer's share and the node's budget
//! (`max_buffered_request_bytes_per_peer`, `max_buffered_request_bytes`). A body is read
//! only as far as both have room: past that the node stops reading the peer's stream and
//! QUIC flow control makes the peer wait.

use std::sync::Arc;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// The most bytes one read of a counted body takes.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Where a body's bytes are counted: its peer's share, then the node's budget.
#[derive(Clone, Copy)]
pub(crate) struct ByteBudget<'a> {
    pub peer: &'a Arc<Semaphore>,
    pub node: &'a Arc<Semaphore>,
}

/// Bytes counted against a [`ByteBudget`] until dropped.
#[derive(Default)]
pub(crate) struct Held(Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>);

impl Held {
    /// How many bytes are held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |(peer, _)| peer.num_permits())
    }

    pub fn merge(&mut self, other: Held) {
        match (&mut self.0, other.0) {
            (_, None) => {}
            (None, other) => self.0 = other,
            (Some((peer, node)), Some((other_peer, other_node))) => {
                peer.merge(other_peer);
                node.merge(other_node);
            }
        }
    }
}

impl ByteBudget<'_> {
    /// Waits until `n` more bytes fit in both the peer's share and the node's budget.
    pub async fn reserve(&self, n: usize) -> Result<Held, AcquireError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let peer = self.peer.clone().acquire_many_owned(n).await?;
        let node = self.node.clone().acquire_many_owned(n).await?;
        Ok(Held(Some((peer, node))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn held_bytes_merge_and_return_when_dropped() {
        let (peer, node) = (Arc::new(Semaphore::new(100)), Arc::new(Semaphore::new(150)));
        let budget = ByteBudget {
            peer: &peer,
            node: &node,
        };
        let mut body = budget.reserve(60).await.unwrap();
        body.merge(budget.reserve(25).await.unwrap());
        assert_eq!(body.bytes(), 85);
        assert_eq!(
            (peer.available_permits(), node.available_permits()),
            (15, 65)
        );
        // Past the peer's share, a reservation waits.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(10), budget.reserve(20));
        assert!(waiting.await.is_err());
        drop(body);
        assert_eq!(
            (peer.available_permits(), node.available_permits()),
            (100, 150)
        );
    }
}
