//! Typed requests (serde values, postcard bodies): round trips, and the errors on each
//! side when a body is not the type it should be.
#![cfg(feature = "typed")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustorium_p2p::{HandlerError, Node, RequestContext, RequestError, Status};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Get {
    key: String,
    version: u64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Value {
    key: String,
    bytes: Vec<u8>,
    found: bool,
}

/// A different answer type under the same route name (another version of the route).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct ValueV2 {
    key: String,
    bytes: Vec<u8>,
    found: bool,
    expires_at: u64,
}

/// A server with `kv/get/v1` (typed; counts its calls) and a client connected to it.
async fn pair() -> (Node, Node, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = Node::builder()
        .config(common::config())
        .typed_route("kv/get/v1", move |_ctx: RequestContext, get: Get| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, HandlerError>(Value {
                    bytes: get.key.clone().into_bytes(),
                    key: get.key,
                    found: get.version > 0,
                })
            }
        })
        .bind()
        .await
        .unwrap();
    let client = Node::builder()
        .config(common::config())
        .bind()
        .await
        .unwrap();
    client.connect(&server.peer_addr()).await.unwrap();
    (server, client, calls)
}

#[tokio::test]
async fn a_typed_request_gets_a_typed_answer() {
    let (server, client, calls) = pair().await;
    let get = Get {
        key: "accounts/3fa2".into(),
        version: 3,
    };
    let value: Value = common::within(
        "typed answer",
        client.request_typed(server.peer_id(), "kv/get/v1", &get),
    )
    .await
    .unwrap();
    assert_eq!(
        value,
        Value {
            key: get.key.clone(),
            bytes: get.key.clone().into_bytes(),
            found: true
        }
    );
    // One-way, typed: the handler runs; its answer goes nowhere.
    common::within(
        "typed message",
        client.send_typed(server.peer_id(), "kv/get/v1", &get),
    )
    .await
    .unwrap();
    common::eventually("the message handled", || calls.load(Ordering::SeqCst) == 2).await;
}

#[tokio::test]
async fn a_body_that_does_not_decode_is_bad_request_and_the_handler_does_not_run() {
    let (server, client, calls) = pair().await;
    // A body that is not a Get: a bare u8 (postcard needs a string length, then a u64).
    let err = common::within(
        "answer",
        client.request(server.peer_id(), "kv/get/v1", vec![0xffu8; 3]),
    )
    .await
    .unwrap_err();
    match &err {
        RequestError::Remote {
            status: Status::BadRequest,
            message,
            ..
        } => {
            assert!(message.contains("kv/get/v1"), "{message}");
            assert!(
                message.contains("is not a") && message.contains("Get"),
                "{message}"
            );
        }
        other => panic!("expected BAD_REQUEST, got {other:?}"),
    }
    // The same through the typed API, with a value of another type.
    let err = common::within(
        "answer",
        client.request_typed::<_, Value>(server.peer_id(), "kv/get/v1", &(1u8, true)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::Remote {
                status: Status::BadRequest,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
}

#[tokio::test]
async fn an_answer_of_another_type_is_a_decode_error_naming_route_and_type() {
    let (server, client, _calls) = pair().await;
    let get = Get {
        key: "k".into(),
        version: 1,
    };
    let err = common::within(
        "answer",
        client.request_typed::<_, ValueV2>(server.peer_id(), "kv/get/v1", &get),
    )
    .await
    .unwrap_err();
    match &err {
        RequestError::Decode {
            route, type_name, ..
        } => {
            assert_eq!(route, "kv/get/v1");
            assert!(type_name.ends_with("ValueV2"), "{type_name}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("kv/get/v1") && text.contains("ValueV2"),
        "{text}"
    );
    // Counted as a protocol error on the requester, not as an answer it could use.
    let counted = |status: &str| {
        common::metric_sum(&client, &["requests_total", "kv/get/v1", "client", status])
    };
    assert_eq!(counted("protocol_error"), 1.0, "{}", client.metrics_text());
    assert_eq!(counted("\"ok\""), 0.0, "{}", client.metrics_text());
}

/// A typed route speaks postcard's documented wire format: a client of another language
/// can call it with bytes made by hand.
#[tokio::test]
async fn a_typed_route_answers_bytes_in_postcards_wire_format() {
    let (server, client, _calls) = pair().await;
    let get = Get {
        key: "k".into(),
        version: 1,
    };
    let raw = common::within(
        "answer",
        client.request(server.peer_id(), "kv/get/v1", postcard_get(&get)),
    )
    .await
    .unwrap();
    // Value { key: "k", bytes: b"k", found: true }: length-prefixed string, length-
    // prefixed bytes, one byte for the bool.
    assert_eq!(&raw[..], &[1, b'k', 1, b'k', 1]);
}

/// `get` as postcard bytes, written by hand from the wire format (a varint length and
/// the UTF-8 of the string, then a varint): what another implementation would send.
fn postcard_get(get: &Get) -> Vec<u8> {
    let mut body = vec![get.key.len() as u8];
    body.extend_from_slice(get.key.as_bytes());
    body.push(get.version as u8);
    body
}

/// A one-way message whose body does not decode is dropped before the handler and counted
/// as `bad_request` (the sender cannot be told: a one-way message has no answer).
#[tokio::test]
async fn a_one_way_message_that_does_not_decode_is_counted_as_bad_request() {
    let (server, client, calls) = pair().await;
    common::within(
        "message",
        client.send(server.peer_id(), "kv/get/v1", vec![0xffu8; 3]),
    )
    .await
    .unwrap();
    common::eventually("counted as bad_request", || {
        common::metric_sum(&server, &["stream_errors_total", "bad_request"]) >= 1.0
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
}
