//! An echo server: answers every request on `echo` with its body.
//!
//! ```sh
//! cargo run --example echo_server            # prints its PeerAddr
//! cargo run --example echo_client -- <PEERADDR> "hello"
//! ```

use rustorium_p2p::{Bytes, Node, RequestContext};

#[tokio::main]
async fn main() -> Result<(), rustorium_p2p::Error> {
    // Any free port unless one is given: 4433 is the `rustorium-p2p node` default.
    let listen = std::env::args().nth(1).unwrap_or("127.0.0.1:0".into());
    let node = Node::builder()
        .listen(listen.parse().expect("listen address, e.g. 127.0.0.1:4500"))
        .route("echo", |ctx: RequestContext, body: Bytes| async move {
            println!("{} bytes from {}", body.len(), ctx.peer().short());
            Ok(body)
        })
        .bind()
        .await?;
    println!("{}", node.peer_addr());
    tokio::signal::ctrl_c().await.ok();
    node.shutdown().await;
    Ok(())
}
