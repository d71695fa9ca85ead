//! Typed requests against the byte API, ours only: the same small struct each way, once
//! through `request_typed` and a typed route (postcard on both sides), once as bytes
//! encoded beforehand through `request` and a byte route that answers bytes made
//! beforehand. The difference is what the codec costs per request.

use std::time::Instant;

use futures_util::future::join_all;
use rustorium_p2p::{Bytes, HandlerError, Node, RequestContext};
use serde::{Deserialize, Serialize};

/// A small request, as a key-value store would send.
#[derive(Serialize, Deserialize, Clone)]
struct Get {
    key: String,
    version: u64,
    consistent: bool,
}

/// Its answer.
#[derive(Serialize, Deserialize)]
struct Value {
    key: String,
    version: u64,
    bytes: Vec<u8>,
}

const IN_FLIGHT: usize = 64;

/// Requests per second: (bytes, typed).
pub async fn measure(requests: usize, typed_first: bool) -> anyhow::Result<(f64, f64)> {
    let get = Get {
        key: "accounts/3fa2c0de".into(),
        version: 1_234_567,
        consistent: true,
    };
    let value = |get: &Get| Value {
        key: get.key.clone(),
        version: get.version,
        bytes: vec![7; 32],
    };
    let answer = Bytes::from(postcard::to_stdvec(&value(&get))?);
    let server = Node::builder()
        .typed_route("get", move |_ctx: RequestContext, get: Get| {
            let answer = value(&get);
            async move { Ok::<_, HandlerError>(answer) }
        })
        .route("get-bytes", move |_ctx, _body| {
            let answer = answer.clone();
            async move { Ok(answer) }
        })
        .bind()
        .await?;
    let client = Node::builder().bind().await?;
    client.connect(&server.peer_addr()).await?;
    let body = Bytes::from(postcard::to_stdvec(&get)?);
    let peer = server.peer_id();
    let run = |typed: bool, requests: usize| {
        let (client, body, get) = (&client, body.clone(), get.clone());
        async move {
            let per_worker = requests.div_ceil(IN_FLIGHT);
            let start = Instant::now();
            let workers = (0..IN_FLIGHT).map(|_| async {
                for _ in 0..per_worker {
                    if typed {
                        let _: Value = client.request_typed(peer, "get", &get).await?;
                    } else {
                        client.request(peer, "get-bytes", body.clone()).await?;
                    }
                }
                anyhow::Ok(())
            });
            for done in join_all(workers).await {
                done?;
            }
            anyhow::Ok((per_worker * IN_FLIGHT) as f64 / start.elapsed().as_secs_f64())
        }
    };
    // Both paths warmed up (stream limits grown, buffers allocated), then measured in the
    // order `typed_first` says (the bench alternates it between repetitions).
    run(false, requests / 4).await?;
    run(true, requests / 4).await?;
    let (bytes, typed) = if typed_first {
        let typed = run(true, requests).await?;
        (run(false, requests).await?, typed)
    } else {
        let bytes = run(false, requests).await?;
        (bytes, run(true, requests).await?)
    };
    client.shutdown().await;
    server.shutdown().await;
    Ok((bytes, typed))
}
