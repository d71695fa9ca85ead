//! Raw quinn speaking our wire protocol v1 with mutual TLS: the per-core baseline.
//!
//! The server is what a careful user of raw quinn would write for the same job: both
//! sides present an Ed25519 certificate and verify the other's handshake signature with
//! the provider's own algorithms (no PeerId pinning, no limits, no metrics), ALPN
//! `rustorium`, one bidirectional stream per request: route header and body until FIN
//! in, status byte and body until FIN out. The same client (a raw quinn one) drives both
//! this server and our node, so what differs between the two figures is the server.

use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustorium_p2p::wire::{self, Status};

use crate::baselines::{certificate, udp_socket};
use crate::scenarios::STREAM_SINK;

/// The largest request the raw server reads (the pinned scenarios send 1 KiB at most).
const MAX_BODY: usize = 1 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any single certificate, and checks the peer's handshake signature over it with
/// the provider's algorithms: the work a mutual-TLS handshake must do.
#[derive(Debug)]
struct Mutual(Arc<CryptoProvider>);

impl Mutual {
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for Mutual {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for Mutual {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// How the raw server serves a connection's streams.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Serving {
    /// A tokio task per stream, as quinn's examples do (raw quinn as usually run).
    TaskPerStream,
    /// Every stream in the connection's own task, as our node does with its I/O thread:
    /// no spawn per request (the strongest raw server on one thread).
    InConnectionTask,
}

/// Starts the raw server on `listen` (on the current runtime), with `streams` concurrent
/// streams of each kind per connection, as our bench node allows.
pub fn server(
    listen: SocketAddr,
    streams: u32,
    serving: Serving,
) -> anyhow::Result<quinn::Endpoint> {
    let provider = provider();
    let (cert, key) = certificate()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Mutual(provider)))
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![b"rustorium".to_vec()];
    tls.max_early_data_size = u32::MAX;
    // One ticket per handshake, as our nodes send: no ticket work ours does not do.
    tls.send_tls13_tickets = 1;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(streams.into())
        .max_concurrent_uni_streams(streams.into());
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(listen, true)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(connecting) = incoming.accept() else {
                    return;
                };
                let conn = match connecting.into_0rtt() {
                    Ok((conn, _)) => conn,
                    Err(connecting) => match connecting.await {
                        Ok(conn) => conn,
                        Err(_) => return,
                    },
                };
                match serving {
                    Serving::TaskPerStream => {
                        while let Ok((send, recv)) = conn.accept_bi().await {
                            tokio::spawn(answer(send, recv));
                        }
                    }
                    Serving::InConnectionTask => serve_in_task(&conn).await,
                }
            });
        }
    });
    Ok(endpoint)
}

/// Serves `conn`'s streams in the calling task: each turn takes every stream the peer has
/// opened, then polls the streams being served, until the connection ends and its last
/// stream is answered.
async fn serve_in_task(conn: &quinn::Connection) {
    let mut streams = FuturesUnordered::new();
    let mut accept = Box::pin(conn.accept_bi());
    let mut open = true;
    std::future::poll_fn(|cx| {
        while open {
            match accept.as_mut().poll(cx) {
                Poll::Ready(Ok((send, recv))) => {
                    streams.push(answer(send, recv));
                    accept.set(conn.accept_bi());
                }
                Poll::Ready(Err(_)) => open = false,
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
        if open || !streams.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

/// Answers one request: the body back after an OK status byte; for the streaming sink
/// route (the pinned bulk scenario), nothing, once the body is read and dropped.
async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    // The header (and, for an echo, the whole request) comes in the first chunk: taken as
    // it is, without a copy.
    let mut request = Bytes::new();
    let (sink, len) = loop {
        match wire::decode_header(&request) {
            Ok(Some((route, len))) => break (route == STREAM_SINK, len),
            Ok(None) => {}
            Err(_) => {
                let _ = send.reset(wire::code::BAD_REQUEST.into());
                return;
            }
        }
        match recv.read_chunk(MAX_BODY, true).await {
            Ok(Some(chunk)) if request.is_empty() => request = chunk.bytes,
            Ok(Some(chunk)) => request = [request, chunk.bytes].concat().into(),
            _ => return,
        }
    };
    let body = if sink {
        // Answered only once the whole body is in: a broken transfer gets no answer (and
        // its client an error), never a fast success.
        loop {
            match recv.read_chunk(usize::MAX, false).await {
                Ok(Some(_)) => {}
                Ok(None) => break Bytes::new(),
                Err(_) => return,
            }
        }
    } else {
        let mut body = request.slice(len..);
        loop {
            match recv.read_chunk(MAX_BODY, true).await {
                Ok(Some(chunk)) if body.is_empty() => body = chunk.bytes,
                Ok(Some(chunk)) if body.len() + chunk.bytes.len() <= MAX_BODY => {
                    body = [body, chunk.bytes].concat().into();
                }
                Ok(None) => break body,
                _ => return,
            }
        }
    };
    let status = Bytes::from_static(&[Status::Ok as u8]);
    let _ = send.write_all_chunks(&mut [status, body]).await;
    let _ = send.finish();
}

/// A raw quinn client with an Ed25519 certificate of its own; keeps session tickets for
/// 0-RTT.
pub struct Client {
    endpoint: quinn::Endpoint,
    resumed: quinn::ClientConfig,
    full: quinn::ClientConfig,
    /// A full handshake, and MTU discovery up to [`BULK_MTU`].
    bulk: quinn::ClientConfig,
}

/// The largest UDP payload a raw quinn sender can discover and use: quinn sends up to 10
/// datagrams in one `sendmsg` (GSO), the kernel takes at most 65,507 bytes in one, and
/// quinn-udp drops a larger batch as if it were a lost MTU probe (then black-hole
/// detection takes the path down to 1,200 bytes). Our node cuts such batches itself
/// (`node/udp.rs`); a raw quinn user stays at or under this.
pub const BULK_MTU: u16 = 6550;

impl Client {
    pub fn new() -> anyhow::Result<Client> {
        let provider = provider();
        let (cert, key) = certificate()?;
        let tls = |resume: bool, mtu: Option<u16>| -> anyhow::Result<quinn::ClientConfig> {
            let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Mutual(provider.clone())))
                .with_client_auth_cert(vec![cert.clone()], key.clone_key())?;
            tls.alpn_protocols = vec![b"rustorium".to_vec()];
            tls.enable_early_data = resume;
            if !resume {
                tls.resumption = rustls::client::Resumption::disabled();
            }
            let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
            let mut config = quinn::ClientConfig::new(Arc::new(quic));
            let mut transport = quinn::TransportConfig::default();
            transport.max_concurrent_bidi_streams(1000u32.into());
            if let Some(mtu) = mtu {
                let mut discovery = quinn::MtuDiscoveryConfig::default();
                discovery.upper_bound(mtu);
                transport.mtu_discovery_config(Some(discovery));
            }
            config.transport_config(Arc::new(transport));
            Ok(config)
        };
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            udp_socket("127.0.0.1:0".parse()?, true)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Client {
            endpoint,
            resumed: tls(true, None)?,
            full: tls(false, None)?,
            bulk: tls(false, Some(BULK_MTU))?,
        })
    }

    /// Connects to `to`: a full handshake, or with `zero_rtt` a resumed one that sends
    /// its first request as 0-RTT data when it holds a ticket.
    pub async fn connect(
        &self,
        to: SocketAddr,
        zero_rtt: bool,
    ) -> anyhow::Result<quinn::Connection> {
        Ok(self.connect_early(to, zero_rtt).await?.0)
    }

    /// A full handshake for a bulk transfer: MTU discovery goes up to [`BULK_MTU`]
    /// (quinn's default stops at 1,452 bytes), the strongest a raw quinn sender can use.
    pub async fn connect_bulk(&self, to: SocketAddr) -> anyhow::Result<quinn::Connection> {
        let connecting = self
            .endpoint
            .connect_with(self.bulk.clone(), to, "rustorium")?;
        Ok(connecting.await?)
    }

    /// [`connect`](Self::connect), and when 0-RTT was attempted, what resolves to
    /// whether the server accepted it.
    pub async fn connect_early(
        &self,
        to: SocketAddr,
        zero_rtt: bool,
    ) -> anyhow::Result<(quinn::Connection, Option<quinn::ZeroRttAccepted>)> {
        let config = if zero_rtt { &self.resumed } else { &self.full };
        let connecting = self
            .endpoint
            .connect_with(config.clone(), to, "rustorium")?;
        if zero_rtt {
            match connecting.into_0rtt() {
                Ok((conn, accepted)) => return Ok((conn, Some(accepted))),
                Err(connecting) => return Ok((connecting.await?, None)),
            }
        }
        Ok((connecting.await?, None))
    }
}

/// One request on its own stream; the answer's body.
pub async fn call(conn: &quinn::Connection, route: &str, body: Bytes) -> anyhow::Result<Bytes> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let header = Bytes::from(wire::encode_header(route));
    send.write_all_chunks(&mut [header, body]).await?;
    send.finish()?;
    let answer = Bytes::from(recv.read_to_end(MAX_BODY + 1).await?);
    let status = wire::decode_status(&answer).context("answer")?;
    anyhow::ensure!(status == Status::Ok, "answered {status:?}");
    Ok(answer.slice(1..))
}
