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
//! As with the semaphore, a place given back while callers wait is handed to a waiter: it
//! is not freed but passed on (counted in `handoff`), and only a waiter woken for it can
//! claim it; [`Tally::try_take`] refuses while any waits. So neither a stream of requests
//! nor newer waiters can take a place from an older waiter (tokio's `Notify` wakes its
//! waiters oldest first). Each wait is bounded by its caller's deadline, as every wait here
//! is. (The byte budget, where a large body must not be starved by small ones, stays a
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
    /// Places given back while callers waited: still counted in `used`, each for a woken
    /// waiter to claim (or freed when the last waiter leaves).
    handoff: AtomicUsize,
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
        self.0.give_back();
    }
}

/// One place of a [`Tally`] held by a borrower of the tally (no count on the `Arc`), given
/// back when dropped: what serving a request holds, within its own borrow of the node.
#[derive(Debug)]
pub(crate) struct Lent<'a>(&'a Tally);

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// Counts a waiter for an idle tally while alive.
struct Idler<'a>(&'a AtomicUsize);

impl<'a> Idler<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, SeqCst);
        Idler(count)
    }
}

impl Drop for Idler<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Counts a waiter for a place while alive; the last to leave frees the places handed
/// over that nobody claimed.
struct Taker<'a>(&'a Tally);

impl<'a> Taker<'a> {
    fn new(tally: &'a Tally) -> Self {
        tally.takers.fetch_add(1, SeqCst);
        Taker(tally)
    }
}

impl Drop for Taker<'_> {
    fn drop(&mut self) {
        if self.0.takers.fetch_sub(1, SeqCst) == 1 {
            self.0.free_handoffs();
        }
    }
}

impl Tally {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Tally {
            used: AtomicUsize::new(0),
            max: max.min(CLOSED - 1),
            takers: AtomicUsize::new(0),
            handoff: AtomicUsize::new(0),
            freed: Notify::new(),
            idlers: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// A place, if one is free, nobody waits for one, and the tally is not closed.
    pub fn try_take(self: &Arc<Self>) -> Option<Taken> {
        self.try_claim().then(|| Taken(self.clone()))
    }

    /// A place, if one is free and the tally is not closed (waiters or not).
    fn take_free(self: &Arc<Self>) -> Option<Taken> {
        self.claim_free().then(|| Taken(self.clone()))
    }

    /// [`try_take`](Self::try_take), for a borrower.
    pub fn try_lend(&self) -> Option<Lent<'_>> {
        // Made only once claimed (`then_some` would make one, and so give a place back,
        // even when none was claimed).
        self.try_claim().then(|| Lent(self))
    }

    /// Counts a place as used, if one is free, nobody waits for one, and the tally is not
    /// closed.
    fn try_claim(&self) -> bool {
        self.takers.load(SeqCst) == 0 && self.claim_free()
    }

    /// Counts a place as used, if one is free and the tally is not closed.
    fn claim_free(&self) -> bool {
        let mut used = self.used.load(SeqCst);
        loop {
            if used & CLOSED != 0 || used >= self.max {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(used, used + 1, SeqCst, SeqCst)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    /// A place comes back: handed to a waiter if there is one, else freed.
    fn give_back(&self) {
        self.give_back_seeing(self.takers.load(SeqCst) != 0);
    }

    /// [`give_back`](Self::give_back), once it has looked for waiters (`waiters`): its two
    /// steps apart, so that a test can start a wait between them.
    fn give_back_seeing(&self, waiters: bool) {
        if waiters {
            // Handed to a waiter rather than freed; then, in case the last waiter left
            // meanwhile (and so found nothing to free), freed after all.
            self.handoff.fetch_add(1, SeqCst);
            self.freed.notify_one();
            if self.takers.load(SeqCst) == 0 {
                self.free_handoffs();
            }
        } else {
            self.free(1);
            // A caller may have begun to wait between the look at `takers` and the free
            // (it found no free place then, and `try_take` now refuses because it waits):
            // woken, it finds this one.
            if self.takers.load(SeqCst) != 0 {
                self.freed.notify_one();
            }
        }
    }

    /// Waits for a place; `None` once the tally is closed. Callers bound the wait.
    pub async fn take(self: &Arc<Self>) -> Option<Taken> {
        if let Some(taken) = self.try_take() {
            return Some(taken);
        }
        let _waiting = Taker::new(self);
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the look: a release after it wakes a waiter. (A waiter
            // woken and then dropped passes its wake-up on to another.)
            freed.as_mut().enable();
            if self.is_closed() {
                return None;
            }
            // A place freed before this caller was counted as a waiter (a release that
            // saw none): nobody else waits for it.
            if let Some(taken) = self.take_free() {
                return Some(taken);
            }
            freed.await;
            // Woken: a place handed over is this waiter's to claim, unless the tally has
            // closed (the last waiter to leave then frees it).
            if self.is_closed() {
                return None;
            }
            if self.claim_handoff() {
                // More places handed over than waiters woken (a waiter counted but not yet
                // listening when they were given back: `Notify` keeps one wake-up, not
                // one per release): pass a wake-up on to the next waiter.
                if self.handoff.load(SeqCst) != 0 {
                    self.freed.notify_one();
                }
                return Some(Taken(self.clone()));
            }
        }
    }

    /// Takes one place handed over, if any.
    fn claim_handoff(&self) -> bool {
        let mut handoff = self.handoff.load(SeqCst);
        while handoff != 0 {
            match self
                .handoff
                .compare_exchange_weak(handoff, handoff - 1, SeqCst, SeqCst)
            {
                Ok(_) => return true,
                Err(now) => handoff = now,
            }
        }
        false
    }

    /// Frees the places handed over that no waiter claimed (no waiter is left).
    fn free_handoffs(&self) {
        let unclaimed = self.handoff.swap(0, SeqCst);
        if unclaimed != 0 {
            self.free(unclaimed);
        }
    }

    /// Gives `n` places back to the count, waking those waiting for idleness at 0.
    fn free(&self, n: usize) {
        let before = self.used.fetch_sub(n, SeqCst);
        if before & !CLOSED == n && self.idlers.load(SeqCst) != 0 {
            self.idle.notify_waiters();
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
        let _waiting = Idler::new(&self.idlers);
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
    use std::future::Future;
    use std::task::Poll;
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

    /// A task waiting for a place: `true` if it got one (given back at once).
    fn waiter(tally: &Arc<Tally>) -> tokio::task::JoinHandle<bool> {
        let tally = tally.clone();
        tokio::spawn(async move { tally.take().await.map(drop).is_some() })
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
        let waiter = waiter(&tally);
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
    async fn a_lent_place_counts_and_goes_back_as_a_taken_one() {
        let tally = Tally::new(2);
        let lent = tally.try_lend().unwrap();
        let taken = tally.try_take().unwrap();
        assert_eq!(tally.in_use(), 2);
        assert!(tally.try_lend().is_none(), "a full tally lends nothing");
        let waiter = waiter(&tally);
        until("the waiter waits", || tally.takers() == 1).await;
        assert!(tally.try_lend().is_none(), "no place is lent past a waiter");
        drop(lent);
        assert!(tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap());
        drop(taken);
        assert_eq!((tally.takers(), tally.in_use()), (0, 0));
        tally.close();
        assert!(tally.try_lend().is_none(), "a closed tally lends nothing");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_newer_waiter_cannot_take_the_place_handed_to_an_older_one() {
        let tally = Tally::new(1);
        let held = tally.try_take().unwrap();
        let older = waiter(&tally);
        until("the older waiter waits", || tally.takers() == 1).await;
        // Given back: handed to the older waiter, which has not run yet. A newer caller
        // that comes first finds no free place and waits.
        drop(held);
        let mut newer = Box::pin(tally.take());
        let waits = std::future::poll_fn(|cx| Poll::Ready(newer.as_mut().poll(cx).is_pending()));
        assert!(
            waits.await,
            "the newer caller took the older waiter's place"
        );
        assert!(tokio::time::timeout(WAIT, older).await.unwrap().unwrap());
        // The older one is done with it: the newer one gets it now.
        assert!(tokio::time::timeout(WAIT, newer).await.unwrap().is_some());
        assert_eq!((tally.takers(), tally.in_use()), (0, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_place_handed_to_a_waiter_that_gives_up_is_freed() {
        let tally = Tally::new(1);
        let held = tally.try_take().unwrap();
        let waiter = {
            let tally = tally.clone();
            tokio::spawn(async move { tally.take().await.map(drop) })
        };
        until("the waiter waits", || tally.takers() == 1).await;
        drop(held);
        // Handed over, then the waiter is cancelled before it runs.
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(
            (tally.takers(), tally.in_use()),
            (0, 0),
            "the place came back"
        );
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
    async fn a_place_freed_as_a_caller_begins_to_wait_wakes_it() {
        // A release looks for waiters and finds none; a caller then begins to wait (no
        // place is free yet); then the release frees its place. Before the fix nothing woke
        // the caller, and `try_take` refused everyone else because it waited: the place
        // stayed free, unused, until the caller's deadline.
        let tally = Tally::new(1);
        assert!(tally.claim_free(), "the place, held");
        let waiter = waiter(&tally);
        until("the waiter waits", || tally.takers() == 1).await;
        tally.give_back_seeing(false); // as if it had looked before the waiter came
        assert!(
            tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap(),
            "the waiter got the freed place"
        );
        assert_eq!((tally.takers(), tally.in_use()), (0, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn places_handed_over_before_their_waiters_listen_reach_every_waiter() {
        // Two places given back while a caller is counted as a waiter but not yet
        // listening: two hand-overs, but `Notify` keeps one wake-up. Two waiters come; the
        // first is woken and takes one place, and before the fix the second slept with
        // the other place handed over and unclaimed (and `try_take` refusing everyone).
        let tally = Tally::new(2);
        assert!(
            tally.claim_free() && tally.claim_free(),
            "both places, held"
        );
        let counted = Taker::new(&tally); // counted, never listening
        tally.give_back();
        tally.give_back();
        // Each keeps its place (given back, it would be handed over again).
        let keeping = || {
            let tally = tally.clone();
            tokio::spawn(async move { tally.take().await })
        };
        let (first, second) = (keeping(), keeping());
        let first = tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
        let second = tokio::time::timeout(WAIT, second).await;
        let second = second.expect("the second place did not reach the second waiter");
        assert!(first.is_some() && second.unwrap().is_some());
        drop(counted);
        assert_eq!(tally.takers(), 0);
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
