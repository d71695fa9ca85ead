//! Sends one request to an echo server and prints the answer.
//!
//! ```sh
//! cargo run --example echo_client -- <PEERADDR> "hello"
//! ```

use rustorium_p2p::{Node, PeerAddr};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server: PeerAddr = args
        .next()
        .ok_or("usage: echo_client PEERADDR [TEXT]")?
        .parse()?;
    let text = args.next().unwrap_or("hello".into());

    let node = Node::builder().bind().await?; // ephemeral identity, any free port
    node.connect(&server).await?;
    let answer = node.request(server.peer_id, "echo", text).await?;
    println!("{}", String::from_utf8_lossy(&answer));
    node.shutdown().await;
    Ok(())
}
