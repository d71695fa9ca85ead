//! Counts of things in use against a limit: handler slots, transfer slots, answers being
//! written (the node's and each peer's share).
//!
//! Why not tokio's `Semaphore`: every permit it gives back takes the lock on its list of
//! waiters, and a request takes and gives back four of them (its peer's handler slot and
//! the node's, its peer's answer place and the node's count of answers). Here taking and
//! giving back are one atomic operation each; only the rare waiter (a one-way message
//! waiting for a handler slot, shutdown waiting for the node to go idle) takes a lock.
//! Waiters are not served in order: each is woken when a place frees and tries again, so
//! a wait is bounded by its caller's deadline, as every wait here is. (The byte budget,
//! where a large body must not be starved by small ones, stays a `Semaphore`.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use tokio::sync::Notify;

/// Up to `max` things in use at once.
#[derive(Debug)]
pub(crate) struct Tally {
    used: AtomicUsize,
    max: usize,
    /// Callers waiting for a place or for idleness (woken on every release while any).
    waiting: AtomicUsize,
    freed: Notify,
    closed: AtomicBool,
}

/// One place of a [`Tally`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Taken(Arc<Tally>);

impl Drop for Taken {
    fn drop(&mut self) {
        let tally = &self.0;
        tally.used.fetch_sub(1, SeqCst);
        // Paired with `Waiting::new` then a second look at `used`: either the waiter sees
        // this release, or this sees the waiter and wakes it.
        if tally.waiting.load(SeqCst) != 0 {
            tally.freed.notify_waiters();
        }
    }
}

/// Counts a waiter while alive.
struct Waiting<'a>(&'a Tally);

impl<'a> Waiting<'a> {
    fn new(tally: &'a Tally) -> Self {
        tally.waiting.fetch_add(1, SeqCst);
        Waiting(tally)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, SeqCst);
    }
}

impl Tally {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Tally {
            used: AtomicUsize::new(0),
            max,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// A place, if one is free and the tally is not closed.
    pub fn try_take(self: &Arc<Self>) -> Option<Taken> {
        if self.closed.load(SeqCst) {
            return None;
        }
        let mut used = self.used.load(SeqCst);
        loop {
            if used >= self.max {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, used + 1, SeqCst, SeqCst)
            {
                Ok(_) => return Some(Taken(self.clone())),
                Err(now) => used = now,
            }
        }
    }

    /// Waits for a place; `None` once the tally is closed. Callers bound the wait.
    pub async fn take(self: &Arc<Self>) -> Option<Taken> {
        loop {
            if let Some(taken) = self.try_take() {
                return Some(taken);
            }
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the second look: a release after it wakes this.
            freed.as_mut().enable();
            let _waiting = Waiting::new(self);
            if self.closed.load(SeqCst) {
                return None;
            }
            if let Some(taken) = self.try_take() {
                return Some(taken);
            }
            freed.await;
        }
    }

    /// Refuses every place from now on (those taken stay until dropped), and wakes the
    /// waiters to say so.
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
        self.freed.notify_waiters();
    }

    /// Waits until no place is taken. Callers bound the wait.
    pub async fn until_idle(&self) {
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let _waiting = Waiting::new(self);
            if self.used.load(SeqCst) == 0 {
                return;
            }
            freed.await;
        }
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.used.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn places_are_limited_and_come_back_when_dropped() {
        let tally = Tally::new(2);
        let a = tally.try_take().unwrap();
        let _b = tally.try_take().unwrap();
        assert!(tally.try_take().is_none());
        assert_eq!(tally.in_use(), 2);
        drop(a);
        assert_eq!(tally.in_use(), 1);
        assert!(tally.try_take().is_some());
        tally.close();
        assert!(tally.try_take().is_none(), "a closed tally gives no place");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_gets_the_place_given_back_and_close_ends_the_wait() {
        let tally = Tally::new(1);
        let held = tally.try_take().unwrap();
        let waiter = {
            let tally = tally.clone();
            tokio::spawn(async move { tally.take().await.is_some() })
        };
        // Given back from another thread while the waiter may be anywhere in its wait.
        tokio::task::yield_now().await;
        drop(held);
        assert!(tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap());

        let _held = tally.try_take().unwrap();
        let waiter = {
            let tally = tally.clone();
            tokio::spawn(async move { tally.take().await.is_none() })
        };
        tokio::task::yield_now().await;
        tally.close();
        assert!(tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wakeup_is_lost_under_contention() {
        // Four tasks share two places, 2,000 times each: every wait must end.
        let tally = Tally::new(2);
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let tally = tally.clone();
                tokio::spawn(async move {
                    for _ in 0..2_000 {
                        let taken = tally.take().await.unwrap();
                        tokio::task::yield_now().await;
                        drop(taken);
                    }
                })
            })
            .collect();
        for worker in workers {
            tokio::time::timeout(WAIT, worker).await.unwrap().unwrap();
        }
        assert_eq!(tally.in_use(), 0);
        tokio::time::timeout(WAIT, tally.until_idle())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn until_idle_waits_for_the_last_place() {
        let tally = Tally::new(4);
        let held = tally.try_take().unwrap();
        let idle = tokio::time::timeout(Duration::from_millis(20), tally.until_idle());
        assert!(idle.await.is_err(), "a place is still taken");
        let waiter = {
            let tally = tally.clone();
            tokio::spawn(async move { tally.until_idle().await })
        };
        tokio::task::yield_now().await;
        drop(held);
        tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    }
}
