//! Typed requests: a tiny key-value store served on `kv/get/v1` and `kv/put/v1`, each
//! route taking and answering a Rust type (postcard on the wire). Two nodes in one
//! process; prints what the client got.
//!
//! ```sh
//! cargo run --example typed_kv
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustorium_p2p::{HandlerError, Node, RequestContext};
use serde::{Deserialize, Serialize};

/// Store `value` under `key`.
#[derive(Serialize, Deserialize)]
struct Put {
    key: String,
    value: Vec<u8>,
}

/// Read `key`.
#[derive(Serialize, Deserialize)]
struct Get {
    key: String,
}

/// What `kv/get/v1` answers.
#[derive(Serialize, Deserialize, Debug)]
struct Found {
    value: Option<Vec<u8>>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let (puts, gets) = (store.clone(), store);
    let server = Node::builder()
        .typed_route("kv/put/v1", move |_ctx: RequestContext, put: Put| {
            puts.lock().unwrap().insert(put.key, put.value);
            async { Ok::<_, HandlerError>(()) }
        })
        .typed_route("kv/get/v1", move |_ctx: RequestContext, get: Get| {
            let value = gets.lock().unwrap().get(&get.key).cloned();
            async move { Ok::<_, HandlerError>(Found { value }) }
        })
        .bind()
        .await?;

    let client = Node::builder().bind().await?;
    client.connect(&server.peer_addr()).await?;
    let peer = server.peer_id();
    let put = Put {
        key: "greeting".into(),
        value: b"hello".to_vec(),
    };
    client
        .request_typed::<_, ()>(peer, "kv/put/v1", &put)
        .await?;
    let found: Found = client
        .request_typed(
            peer,
            "kv/get/v1",
            &Get {
                key: "greeting".into(),
            },
        )
        .await?;
    println!(
        "kv/get/v1 greeting -> {:?}",
        found.value.as_deref().map(String::from_utf8_lossy)
    );
    let missing: Found = client
        .request_typed(
            peer,
            "kv/get/v1",
            &Get {
                key: "nothing".into(),
            },
        )
        .await?;
    println!("kv/get/v1 nothing -> {:?}", missing.value);

    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}
