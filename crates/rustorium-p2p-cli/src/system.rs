//! The system routes every node started by this command serves: `sys/ping` (empty
//! answer), `sys/echo` (streams the body back, any size) and `sys/info` (JSON: peer_id, version, listen,
//! connections, uptime_secs, stats).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rustorium_p2p::{
    AnswerWriter, BodyReader, Bytes, HandlerError, Node, NodeBuilder, RequestContext, WeakNode,
};

/// Where `sys/info` finds its node once it is bound: call [`SystemInfo::set`] with it.
#[derive(Clone, Default)]
pub struct SystemInfo(Arc<OnceLock<WeakNode>>);

impl SystemInfo {
    /// Gives `sys/info` the node it describes.
    pub fn set(&self, node: &Node) {
        let _ = self.0.set(node.downgrade());
    }
}

/// Adds the system routes to `builder`; `sys/info` answers once [`SystemInfo::set`] is
/// called.
pub fn routes(builder: NodeBuilder) -> (NodeBuilder, SystemInfo) {
    let info = SystemInfo::default();
    let started = Instant::now();
    let cell = info.clone();
    // Ping and info change nothing, so they may run on 0-RTT data. Echo streams, so it
    // answers a body of any size the node's limits allow (`limits.max_stream_body_size`),
    // holding no more of it than flow control lets in; like every streaming route, it runs
    // once the handshake is complete.
    let builder = builder
        .early_data_route("sys/ping", |_ctx, _body| async { Ok(Bytes::new()) })
        .streaming_route("sys/echo", echo)
        .early_data_route("sys/info", move |_ctx, _body| {
            let node = cell.0.get().and_then(WeakNode::upgrade);
            async move {
                let node = node.ok_or_else(|| HandlerError::new("node is shutting down"))?;
                Ok(Bytes::from(describe(&node, started)))
            }
        });
    (builder, info)
}

/// `sys/echo`: each chunk of the body is written back as it arrives.
async fn echo(
    _ctx: RequestContext,
    mut body: BodyReader,
    mut answer: AnswerWriter,
) -> Result<(), HandlerError> {
    while let Some(chunk) = body.chunk().await? {
        answer.write(chunk).await?;
    }
    Ok(())
}

fn describe(node: &Node, started: Instant) -> String {
    let stats = node.stats();
    serde_json::json!({
        "peer_id": node.peer_id().to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "listen": node.local_addr().to_string(),
        "connections": stats.connections,
        "uptime_secs": started.elapsed().as_secs_f64(),
        "stats": stats,
    })
    .to_string()
}
