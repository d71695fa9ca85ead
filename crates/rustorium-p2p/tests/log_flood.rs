//! A peer cannot flood a node's log: warnings caused by what a peer does go out at WARN
//! at most once a second (docs/SECURITY.md). Its own test binary, since it installs the
//! process's global tracing subscriber to count them.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Counts the WARN events of this library, from every thread (the node's I/O thread too).
struct CountWarnings(Arc<AtomicUsize>);

impl Subscriber for CountWarnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        if *meta.level() == Level::WARN && meta.target().starts_with("rustorium_p2p") {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[tokio::test]
async fn a_peer_sending_refused_messages_gets_one_warning_a_second_logged() {
    let warnings = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(CountWarnings(warnings.clone())).unwrap();
    let (a, b) = common::pair().await;
    // Only what follows counts (binding may warn of socket buffers the kernel capped).
    warnings.store(0, Ordering::SeqCst);
    let started = std::time::Instant::now();
    // 200 one-way messages to a route b does not have: each refused, each a warning
    // before the limit.
    // (`send` may return before b's refusal arrives, so its result is not looked at.)
    for i in 0..200 {
        let _ = a.send(b.peer_id(), "no/such/route", format!("{i}")).await;
    }
    common::eventually("b counted 200 refusals", || {
        common::metric_sum(&b, &["stream_errors_total", "unknown_route"]) >= 200.0
    })
    .await;
    let secs = started.elapsed().as_secs() as usize;
    let logged = warnings.load(Ordering::SeqCst);
    assert!(
        logged <= secs + 1,
        "{logged} warnings logged for 200 refused messages in {secs} s"
    );
    assert!(logged >= 1, "the first refusal is still logged at WARN");
    // And b still serves a good request.
    assert_eq!(a.request(b.peer_id(), "echo", "hi").await.unwrap(), "hi");
}
