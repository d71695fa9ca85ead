//! Counts of things in use against a limit: handler slots, transfer slots, answers being
//! written (the node's and each peer's share).
//!
//! Why not tokio's `Semaphore`: every permit it gives back takes the lock on its list of
//! waiters, and a request takes and gives back four of them (its peer's handler slot and
//! the node's, its peer's answer place and the node's count of answers). Here taking a
//! place is a compare-and-swap and giving it back an atomic subtraction; locks are taken
//! only while someone waits (a one-way message waiting for a handler slot, shutdown
//! waiting for the node to go idle).
//!
//! As with the semaphore, a place given back while callers wait goes to a waiter: each
//! release wakes one of them, and [`Tally::try_take`] refuses while any waits, so a stream
//! of requests cannot starve a waiting message. Waiters are not served in order among
//! themselves; each wait is bounded by its caller's deadline, as every wait here is. (The
//! byte budget, where a large body must not be starved by small ones, stays a
//! `Semaphore`.)

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use tokio::sync::Notify;

/// The bit of `used` that says the tally is closed (set with the count in one word, so a
/// place is never taken after `close` returns).
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Up to `max` things in use at once.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Places taken, and [`CLOSED`].
    used: AtomicUsize,
    max: usize,
    /// Callers waiting in [`take`](Self::take); each release wakes one.
    takers: AtomicUsize,
    freed: Notify,
    /// Callers waiting in [`until_idle`](Self::until_idle); woken when the count reaches 0.
    idlers: AtomicUsize,
    idle: Notify,
}

/// One place of a [`Tally`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Taken(Arc<Tally>);

impl Drop for Taken {
    fn drop(&mut self) {
        let tally = &self.0;
        let before = tally.used.fetch_sub(1, SeqCst);
        // Each paired with a waiter's count, then its second look at `used`: either the
        // waiter sees this release, or this sees the waiter and wakes it.
        if tally.takers.load(SeqCst) != 0 {
            tally.freed.notify_one();
        }
        if before & !CLOSED == 1 && tally.idlers.load(SeqCst) != 0 {
            tally.idle.notify_waiters();
        }
    }
}

/// Counts a waiter while alive.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Tally {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Tally {
            used: AtomicUsize::new(0),
            max: max.min(CLOSED - 1),
            takers: AtomicUsize::new(0),
            freed: Notify::new(),
            idlers: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// A place, if one is free, nobody waits for one, and the tally is not closed.
    pub fn try_take(self: &Arc<Self>) -> Option<Taken> {
        if self.takers.load(SeqCst) != 0 {
            return None;
        }
        self.take_free()
    }

    /// A place, if one is free and the tally is not closed (waiters or not).
    fn take_free(self: &Arc<Self>) -> Option<Taken> {
        let mut used = self.used.load(SeqCst);
        loop {
            if used & CLOSED != 0 || used >= self.max {
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
        if let Some(taken) = self.try_take() {
            return Some(taken);
        }
        let _waiting = Waiting::new(&self.takers);
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the look: a release after it wakes a waiter. (A waiter
            // woken and then dropped passes its wake-up on to another.)
            freed.as_mut().enable();
            if self.is_closed() {
                return None;
            }
            if let Some(taken) = self.take_free() {
                return Some(taken);
            }
            freed.await;
        }
    }

    /// Refuses every place from now on (those taken stay until dropped), and wakes the
    /// waiters to say so.
    pub fn close(&self) {
        self.used.fetch_or(CLOSED, SeqCst);
        self.freed.notify_waiters();
    }

    fn is_closed(&self) -> bool {
        self.used.load(SeqCst) & CLOSED != 0
    }

    /// Waits until no place is taken. Callers bound the wait.
    pub async fn until_idle(&self) {
        let _waiting = Waiting::new(&self.idlers);
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.in_use() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.used.load(SeqCst) & !CLOSED
    }

    /// Callers waiting for a place now.
    #[cfg(test)]
    fn takers(&self) -> usize {
        self.takers.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    /// Lets spawned tasks run until `done` holds (current-thread runtime: each yield runs
    /// the others). Bounded.
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{what}: not after 1000 turns");
    }

    #[test]
    fn places_are_limited_and_come_back_when_dropped() {
        let tally = Tally::new(2);
        let a = tally.try_take().unwrap();
        let _b = tally.try_take().unwrap();
        assert!(tally.try_take().is_none());
        assert_eq!(tally.in_use(), 2);
        drop(a);
        assert_eq!(tally.in_use(), 1);
        let c = tally.try_take().unwrap();
        tally.close();
        drop(c);
        assert_eq!(tally.in_use(), 1, "closing keeps the count");
        assert!(tally.try_take().is_none(), "a closed tally gives no place");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_place_given_back_goes_to_the_waiter_not_to_a_later_try() {
        let tally = Tally::new(1);
        let held = tally.try_take().unwrap();
        let waiter = {
            let tally = tally.clone();
            tokio::spawn(async move { tally.take().await.map(drop).is_some() })
        };
        until("the waiter waits", || tally.takers() == 1).await;
        drop(held);
        assert!(
            tally.try_take().is_none(),
            "a place given back while someone waits is the waiter's"
        );
        assert!(tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap());
        assert_eq!((tally.takers(), tally.in_use()), (0, 0));
        assert!(tally.try_take().is_some());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_release_wakes_a_waiter_and_close_wakes_them_all() {
        let tally = Tally::new(2);
        let held = [tally.try_take().unwrap(), tally.try_take().unwrap()];
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let tally = tally.clone();
                tokio::spawn(async move { tally.take().await })
            })
            .collect();
        until("three wait", || tally.takers() == 3).await;
        drop(held);
        // Two places back: two waiters get them; the third waits until the close.
        until("two served", || tally.takers() == 1).await;
        tally.close();
        let mut got = 0;
        for waiter in waiters {
            if tokio::time::timeout(WAIT, waiter)
                .await
                .unwrap()
                .unwrap()
                .is_some()
            {
                got += 1;
            }
        }
        assert_eq!(got, 2);
        assert_eq!(tally.takers(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_that_gives_up_is_no_longer_counted() {
        let tally = Tally::new(1);
        let _held = tally.try_take().unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(5), tally.take()).await;
        assert!(gave_up.is_err());
        assert_eq!(
            tally.takers(),
            0,
            "the cancelled wait left no waiter behind"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wakeup_is_lost_under_contention() {
        // Four tasks on two threads share two places, 2,000 times each: every wait must
        // end (each release wakes one waiter, so a lost wake-up would leave one waiting).
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
        assert_eq!((tally.in_use(), tally.takers()), (0, 0));
        tokio::time::timeout(WAIT, tally.until_idle())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn until_idle_waits_for_the_last_place() {
        let tally = Tally::new(4);
        let held = [tally.try_take().unwrap(), tally.try_take().unwrap()];
        let waiter = {
            let tally = tally.clone();
            tokio::spawn(async move { tally.until_idle().await })
        };
        until("the idler waits", || tally.idlers.load(SeqCst) == 1).await;
        let [a, b] = held;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a place is still taken");
        drop(b);
        tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    }
}
