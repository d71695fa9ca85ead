//! # rustorium-p2p
//!
//! Rustorium's peer-to-peer communication layer: nodes known by an Ed25519 [`PeerId`]
//! talk over QUIC (quinn) with TLS 1.3 (rustls). Every connection is mutually
//! authenticated and the dialer pins the PeerId it expects. Each request and its answer
//! travel on their own bidirectional stream, each one-way message on its own
//! unidirectional stream, so no message waits behind another.
//!
//! ```no_run
//! use rustorium_p2p::{Node, HandlerError};
//!
//! # async fn run() -> Result<(), rustorium_p2p::Error> {
//! let server = Node::builder()
//!     .route("greet", |ctx: rustorium_p2p::RequestContext, body: bytes::Bytes| async move {
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
//! The byte format is in `docs/PROTOCOL.md`; [`wire`] encodes and decodes it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod identity;
pub mod link;
mod metrics;
mod node;
mod peers;
mod router;
mod rpc;
mod stream_budget;
mod tls;
pub mod wire;

pub use bytes::Bytes;
pub use config::{Config, CongestionController, LogFormat};
pub use error::{Direction, Error, Result};
pub use identity::{Keypair, ParseError, PeerAddr, PeerId};
pub use metrics::NodeStats;
pub use node::{Node, NodeBuilder, RequestOptions};
pub use peers::{ConnectionDirection, DisconnectReason, PeerEvent};
pub use router::{Handler, HandlerError, HandlerFuture, RequestContext};
pub use wire::Status;

/// The README's Rust examples, compiled as doctests so they cannot go stale.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
