//! Typed requests: a route with a request type and an answer type, each body the
//! [postcard](https://postcard.jamesmunns.com/wire-format) encoding of a serde value.
//! A thin layer over the byte API: the wire protocol is unchanged, and a typed route
//! can be called with [`Node::request`] by anyone who encodes the body the same way.

use std::any::type_name;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CodecError, RequestError};
use crate::handler::{HandlerError, RequestContext};
use crate::identity::PeerId;
use crate::node::{Node, NodeBuilder, RequestOptions};

/// The body for `value`.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(CodecError::codec)
}

/// The value in `body`, which must hold exactly one (no bytes left over).
pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(CodecError::codec)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(CodecError::trailing(rest.len()))
    }
}

/// `T`'s name without module paths (`Vec<Get>`, not `alloc::vec::Vec<my_app::kv::Get>`):
/// what a peer is told in a BAD_REQUEST, which need not learn our module layout.
fn short_type_name<T: ?Sized>() -> String {
    let full = type_name::<T>();
    let mut short = String::with_capacity(full.len());
    let mut word = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            short.push_str(word.rsplit("::").next().unwrap_or(""));
            word.clear();
            short.push(c);
        }
    }
    short.push_str(word.rsplit("::").next().unwrap_or(""));
    short
}

impl NodeBuilder {
    /// Serves `route` with a typed handler: the request body is decoded into `Req`, the
    /// handler's `Resp` is encoded as the answer (both with postcard). A body that does
    /// not decode is answered `BAD_REQUEST` with the decoder's message (a one-way message
    /// is dropped, logged and counted as `bad_request`), and the handler does not run.
    ///
    /// **Choose `Req` with strangers in mind.** Decoding is bounded by the body
    /// (`max_request_size`) for strings, bytes and sequences: a length prefix larger than
    /// what is left is refused before anything is allocated. But a recursive type (an
    /// enum that boxes itself) has no depth limit, so a deep enough body overflows the
    /// stack and aborts the process; and a type whose values are much larger in memory
    /// than on the wire (a `Vec` of an enum with one large variant, or of zero-sized
    /// values) can cost far more memory or time than the body's size. Use such types
    /// only on routes that trusted peers call (an `allow` list), or decode them yourself
    /// on a byte route with your own limits.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), rustorium_p2p::Error> {
    /// use rustorium_p2p::{HandlerError, Node, RequestContext};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Get { key: String }
    /// #[derive(Serialize, Deserialize)]
    /// struct Value { bytes: Vec<u8> }
    ///
    /// let server = Node::builder()
    ///     .typed_route("kv/get/v1", |_ctx: RequestContext, get: Get| async move {
    ///         Ok::<_, HandlerError>(Value { bytes: get.key.into_bytes() })
    ///     })
    ///     .bind()
    ///     .await?;
    /// let client = Node::builder().bind().await?;
    /// client.connect(&server.peer_addr()).await?;
    /// let value: Value = client
    ///     .request_typed(server.peer_id(), "kv/get/v1", &Get { key: "a".into() })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn typed_route<Req, Resp, F, Fut>(self, route: &str, handler: F) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(RequestContext, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.route(route, move |ctx: RequestContext, body: Bytes| {
            let handler = handler.clone();
            async move {
                let request: Req = decode(&body).map_err(|e| {
                    HandlerError::bad_request(format!(
                        "route {:?}: the body is not a {}: {e}",
                        ctx.route(),
                        short_type_name::<Req>()
                    ))
                })?;
                let answer = handler(ctx, request).await?;
                encode(&answer).map_err(|e| {
                    HandlerError::new(format!(
                        "cannot encode the answer as {}: {e}",
                        type_name::<Resp>()
                    ))
                })
            }
        })
    }
}

impl Node {
    /// [`request`](Node::request) with typed values: `request` is encoded, the answer
    /// decoded into `Resp` (postcard, as [`NodeBuilder::typed_route`] does). An answer that
    /// does not decode is [`RequestError::Decode`], naming the route and the type.
    pub async fn request_typed<Req, Resp>(
        &self,
        peer: PeerId,
        route: &str,
        request: &Req,
    ) -> Result<Resp, RequestError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_typed_with(peer, route, request, RequestOptions::default())
            .await
    }

    /// [`request_typed`](Node::request_typed) with options (a timeout of its own, or
    /// idempotent for 0-RTT).
    pub async fn request_typed_with<Req, Resp>(
        &self,
        peer: PeerId,
        route: &str,
        request: &Req,
        options: RequestOptions,
    ) -> Result<Resp, RequestError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = encode(request).map_err(|source| RequestError::Encode {
            route: route.to_string(),
            type_name: type_name::<Req>(),
            source,
        })?;
        // Decoded before the request is counted: an answer of another type is counted as
        // a protocol error, not as `ok`.
        let decoded = |answer: Bytes| {
            decode(&answer).map_err(|source| RequestError::Decode {
                peer,
                route: route.to_string(),
                type_name: type_name::<Resp>(),
                source,
            })
        };
        self.request_then(peer, route, body, options, decoded).await
    }

    /// [`send`](Node::send) with a typed value, encoded as
    /// [`request_typed`](Node::request_typed) does.
    pub async fn send_typed<T: Serialize + ?Sized>(
        &self,
        peer: PeerId,
        route: &str,
        message: &T,
    ) -> Result<(), RequestError> {
        let body = encode(message).map_err(|source| RequestError::Encode {
            route: route.to_string(),
            type_name: type_name::<T>(),
            source,
        })?;
        self.send(peer, route, body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Get {
        key: String,
        version: u64,
    }

    #[test]
    fn peers_are_told_type_names_without_module_paths() {
        assert_eq!(short_type_name::<Get>(), "Get");
        assert_eq!(short_type_name::<Vec<Option<Get>>>(), "Vec<Option<Get>>");
        assert_eq!(short_type_name::<(u8, String)>(), "(u8, String)");
    }

    #[test]
    fn values_round_trip_and_leftover_bytes_are_refused() {
        let get = Get {
            key: "a".into(),
            version: 7,
        };
        let body = encode(&get).unwrap();
        assert_eq!(decode::<Get>(&body).unwrap(), get);
        let mut longer = body.to_vec();
        longer.push(0);
        let err = decode::<Get>(&longer).unwrap_err();
        assert_eq!(err.to_string(), "1 byte left over after the value");
        assert!(decode::<Get>(&body[..body.len() - 1]).is_err());
    }
}
