//! Where a node's I/O runs: by default a thread of its own with a single-threaded tokio
//! runtime, on which quinn's endpoint and connection drivers and the serving of the peers'
//! streams (in each connection's task) run together.
//!
//! Why: on tokio's multi-thread scheduler, a connection driver woken by a written answer
//! runs right after the writing task (the LIFO slot), before the other ready streams have
//! written, so every answer leaves in a datagram of its own (quinn issue 1433). With the
//! drivers and the serving tasks on one thread, answers written in one turn of the
//! scheduler share datagrams, and no wake-up crosses threads on the serving path.
//! Handlers run there too, so a handler must not block (see
//! [`NodeSettings::io_thread`](crate::config::NodeSettings::io_thread)).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// quinn's tokio runtime, bound to one runtime's handle rather than the caller's, with
/// its UDP socket's batches cut to fit one send each ([`FitBatches`](super::udp::FitBatches)).
pub(crate) struct IoRuntime(pub Handle);

impl fmt::Debug for IoRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IoRuntime")
    }
}

impl Runtime for IoRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _in = self.0.enter();
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
        let _in = self.0.enter();
        let socket = TokioRuntime.wrap_udp_socket(t)?;
        Ok(Arc::new(super::udp::FitBatches(socket)))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// A node's I/O thread; ends (after `stop`'s future is done) when dropped.
pub(crate) struct IoThread {
    stop: Option<oneshot::Sender<Pin<Box<dyn Future<Output = ()> + Send>>>>,
}

impl IoThread {
    /// Starts a thread named `name` running a single-threaded runtime; returns its
    /// handle.
    pub fn start(name: String) -> std::io::Result<(Handle, IoThread)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<Pin<Box<dyn Future<Output = ()> + Send>>>();
        std::thread::Builder::new().name(name).spawn(move || {
            runtime.block_on(async move {
                // Runs the last work (letting close frames go out), then the thread ends and
                // every task still on the runtime is dropped.
                if let Ok(last) = stopped.await {
                    last.await;
                }
            });
        })?;
        Ok((handle, IoThread { stop: Some(stop) }))
    }

    /// Stops the thread once `last` (run on it) is done.
    pub fn stop_after(&mut self, last: impl Future<Output = ()> + Send + 'static) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Box::pin(last));
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop_after(async {});
    }
}
