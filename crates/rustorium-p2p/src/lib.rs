//! # rustorium-p2p
//!
//! Rustorium's peer-to-peer communication layer: nodes known by an Ed25519 [`PeerId`]
//! talk over QUIC (quinn) with TLS 1.3 (rustls). Every connection is mutually
//! authenticated and the dialer pins the PeerId it expects. Each request and its answer
//! travel on their own bidirectional stream, each one-way message on its own
//! unidirectional stream, so no message waits behind another.
//!
//! ```no_run
//! use rustorium_p2p::{HandlerError, Node, RequestContext};
//!
//! # async fn run() -> Result<(), rustorium_p2p::Error> {
//! let server = Node::builder()
//!     .route("greet", |ctx: RequestContext, body: bytes::Bytes| async move {
//!         let name = String::from_utf8(body.to_vec()).map_err(|_| HandlerError::new("not UTF-8"))?;
//!         Ok(format!("hello {name}, you are {}", ctx.peer().short()).into())
//!     })
//!     .bind()
//!     .await?;
//! let client = Node::builder().bind().await?;
//! client.connect(&server.peer_addr()).await?;
//! let answer = client.request(server.peer_id(), "greet", "ada").await?;
//! println!("{}", String::from_utf8_lossy(&answer));
//! client.shutdown().await;
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Each operation has its own error type ([`BindError`], [`ConnectError`],
//! [`RequestError`], ...); [`Error`] holds any of them. The byte format is in
//! `docs/PROTOCOL.md`; [`wire`] encodes and decodes it.
//!
//! Features: `metrics` (default) exports Prometheus metrics through
//! [`Node::metrics_text`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod certificate;
pub mod config;
pub mod error;
pub mod event;
pub mod handler;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod wire;

mod budget;
mod framing;
mod log_limit;
mod peers;
mod policy;
mod request;
mod serve;
mod socket;
mod stream_budget;
mod tally;
mod tls;
mod transfer;
mod transport_error;
#[cfg(feature = "typed")]
mod typed;

pub use bytes::Bytes;
pub use config::{Config, CongestionController};
#[cfg(feature = "typed")]
pub use error::CodecError;
pub use error::{
    BindError, Body, ConfigError, ConnectError, Error, KeyError, ProtocolError, Refusal,
    RequestError, TlsAlert,
};
pub use event::{Direction, DisconnectReason, PeerEvent};
pub use handler::{Handler, HandlerError, HandlerFuture, RequestContext};
pub use identity::{Keypair, ParseError, PeerAddr, PeerId};
pub use metrics::NodeStats;
pub use node::{Node, NodeBuilder, RequestOptions, WeakNode};
pub use policy::SIMULTANEOUS_DIAL_WINDOW;
pub use transfer::{
    AnswerStream, AnswerWriter, BodyReader, MessageBody, RequestBody, StreamHandler,
    StreamHandlerFuture, StreamLimits, TransferError,
};
pub use wire::Status;

/// The README's Rust examples, compiled as doctests so they cannot go stale.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
