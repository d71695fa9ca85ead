//! The two baselines the bench measures our stack against, written here so that all
//! three do the same work: raw quinn (same rustls ring provider, one bidirectional stream
//! per request, the body until FIN each way) and TCP + TLS 1.3 with tokio-rustls (one
//! persistent connection, u32-length-prefixed frames, answers in order).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// The largest body a baseline server accepts (bulk transfers).
const MAX_BODY: usize = 1 << 31;

/// Bodies above this are bulk uploads: the servers answer them with nothing, as our
/// `sink` route does, so that all three stacks do the same work.
const ECHO_LIMIT: usize = 64 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed Ed25519 certificate, as our nodes use.
pub(crate) fn certificate() -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let cert = rcgen::CertificateParams::new(vec!["bench".to_string()])?.self_signed(&key)?;
    let der = PrivatePkcs8KeyDer::from(key.serialize_der());
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

fn server_tls(alpn: &[u8]) -> anyhow::Result<rustls::ServerConfig> {
    let (cert, key) = certificate()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.max_early_data_size = u32::MAX;
    Ok(config)
}

fn client_tls(alpn: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = true;
    Ok(config)
}

/// A QUIC client config for playing a stranger against one of our nodes: an Ed25519
/// certificate of its own, our ALPN, no check of the node's certificate; with
/// `stream_window` set, the receive window it advertises per stream.
pub fn stranger_client(stream_window: Option<u32>) -> anyhow::Result<quinn::ClientConfig> {
    let (cert, key) = certificate()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_client_auth_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![b"rustorium".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    if let Some(window) = stream_window {
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(quinn::VarInt::from_u32(window));
        config.transport_config(Arc::new(transport));
    }
    Ok(config)
}

/// The baselines skip certificate checks (they measure transport cost, not PKI); they
/// still verify nothing else is amiss by answering with the right bytes.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
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
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

// ------------------------------------------------------------------ raw quinn

/// A UDP socket on `addr`: with the OS's default buffers, or with the ones our nodes ask
/// for by default (`[transport]`), got the way a node gets them: above the kernel's cap
/// with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` where the process may (Linux).
pub(crate) fn udp_socket(
    addr: SocketAddr,
    big_buffers: bool,
) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if big_buffers {
        let ours = rustorium_p2p::config::TransportSettings::default();
        let (receive, send) = (
            ours.socket_receive_buffer as usize,
            ours.socket_send_buffer as usize,
        );
        socket.set_recv_buffer_size(receive)?;
        socket.set_send_buffer_size(send)?;
        #[cfg(target_os = "linux")]
        {
            // Linux reports twice the size set. Refused without CAP_NET_ADMIN, as for a node.
            use rustix::net::sockopt;
            if socket.recv_buffer_size()? < 2 * receive {
                let _ = sockopt::set_socket_recv_buffer_size_force(&socket, receive);
            }
            if socket.send_buffer_size()? < 2 * send {
                let _ = sockopt::set_socket_send_buffer_size_force(&socket, send);
            }
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A raw quinn echo server: each bidirectional stream's bytes come back on it.
pub struct QuinnServer {
    pub endpoint: quinn::Endpoint,
}

impl QuinnServer {
    pub fn start() -> anyhow::Result<QuinnServer> {
        Self::start_with_streams(100, "127.0.0.1:0".parse()?, false) // quinn's defaults
    }

    /// With both stream limits at `streams`, listening on `listen`; with `big_buffers`, the
    /// UDP socket buffers our nodes use (4 MiB) instead of the OS default.
    pub fn start_with_streams(
        streams: u32,
        listen: SocketAddr,
        big_buffers: bool,
    ) -> anyhow::Result<QuinnServer> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(b"bench")?)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(streams.into())
            .max_concurrent_uni_streams(streams.into());
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            udp_socket(listen, big_buffers)?,
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
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            // Kept up to ECHO_LIMIT to echo; a larger body is read and
                            // dropped as it comes (no copy, nothing held).
                            let mut kept = Vec::new();
                            let mut len = 0;
                            loop {
                                match recv.read_chunk(usize::MAX, true).await {
                                    Ok(Some(chunk)) => {
                                        len += chunk.bytes.len();
                                        if len <= ECHO_LIMIT {
                                            kept.push(chunk.bytes);
                                        } else {
                                            kept.clear();
                                        }
                                    }
                                    Ok(None) => break,
                                    Err(_) => return,
                                }
                            }
                            if len <= ECHO_LIMIT {
                                let _ = send.write_all_chunks(&mut kept).await;
                            }
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        Ok(QuinnServer { endpoint })
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound")
    }
}

/// A raw quinn client endpoint (keeps session tickets for 0-RTT).
pub struct QuinnClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl QuinnClient {
    pub fn new() -> anyhow::Result<QuinnClient> {
        Self::with_buffers(false)
    }

    /// With `big_buffers`, the UDP socket buffers our nodes use (4 MiB).
    pub fn with_buffers(big_buffers: bool) -> anyhow::Result<QuinnClient> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(b"bench")?)?;
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            udp_socket("127.0.0.1:0".parse()?, big_buffers)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(QuinnClient { endpoint, config })
    }

    /// Connects; with `zero_rtt`, uses 0-RTT when a ticket is at hand.
    pub async fn connect(
        &self,
        to: SocketAddr,
        zero_rtt: bool,
    ) -> anyhow::Result<quinn::Connection> {
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), to, "bench")?;
        if zero_rtt {
            match connecting.into_0rtt() {
                Ok((conn, _)) => return Ok(conn),
                Err(connecting) => return Ok(connecting.await?),
            }
        }
        Ok(connecting.await?)
    }
}

/// One request on its own stream.
pub async fn quinn_call(conn: &quinn::Connection, body: Bytes) -> anyhow::Result<Bytes> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_chunk(body).await?;
    send.finish()?;
    Ok(recv.read_to_end(MAX_BODY).await?.into())
}

// ------------------------------------------------------------------ TCP + TLS

/// A TCP + TLS 1.3 echo server: each length-prefixed frame comes back, in order.
pub struct TcpServer {
    pub addr: SocketAddr,
}

impl TcpServer {
    pub async fn start() -> anyhow::Result<TcpServer> {
        Self::start_on("127.0.0.1:0".parse()?).await
    }

    /// The same server on `addr`.
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<TcpServer> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(b"bench")?));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut read, mut write) = tokio::io::split(tls);
                    loop {
                        let Ok(len) = read.read_u32().await else {
                            return;
                        };
                        let len = len as usize;
                        let mut body = vec![0u8; len.min(ECHO_LIMIT)];
                        if len <= ECHO_LIMIT {
                            if read.read_exact(&mut body).await.is_err() {
                                return;
                            }
                        } else {
                            // A larger body is read through one buffer and dropped.
                            let mut left = len;
                            while left > 0 {
                                let want = left.min(body.len());
                                match read.read(&mut body[..want]).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => left -= n,
                                }
                            }
                        }
                        let answer = if len <= ECHO_LIMIT { &body[..] } else { &[] };
                        if write.write_u32(answer.len() as u32).await.is_err()
                            || write.write_all(answer).await.is_err()
                            || write.flush().await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(TcpServer { addr })
    }
}

type Pending = Arc<Mutex<VecDeque<oneshot::Sender<Bytes>>>>;

/// A TCP + TLS client: one connection, requests pipelined, answers matched in order.
pub struct TcpClient {
    write: tokio::sync::Mutex<
        tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    >,
    pending: Pending,
}

impl TcpClient {
    pub async fn connect(to: SocketAddr) -> anyhow::Result<TcpClient> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(b"bench")?));
        let tcp = tokio::net::TcpStream::connect(to).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("bench").context("server name")?;
        let tls = connector.connect(name, tcp).await?;
        let (mut read, write) = tokio::io::split(tls);
        let pending: Pending = Arc::default();
        let answers = pending.clone();
        tokio::spawn(async move {
            loop {
                let Ok(len) = read.read_u32().await else {
                    return;
                };
                let mut body = vec![0u8; len as usize];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                let next = answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
                if let Some(tx) = next {
                    let _ = tx.send(body.into());
                }
            }
        });
        Ok(TcpClient {
            write: tokio::sync::Mutex::new(write),
            pending,
        })
    }

    /// Sends a body of `len` bytes made of `chunk` over and over (the bulk scenario: the
    /// same hot buffer that the QUIC clients send), and waits for the answer.
    pub async fn upload(&self, chunk: &[u8], len: usize) -> anyhow::Result<Bytes> {
        anyhow::ensure!(len == 0 || !chunk.is_empty(), "an empty chunk");
        let frame_len = u32::try_from(len).context("a body over 4 GiB")?;
        let (tx, rx) = oneshot::channel();
        {
            let mut write = self.write.lock().await;
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(tx);
            write.write_u32(frame_len).await?;
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                write.write_all(&chunk[..n]).await?;
                left -= n;
            }
            write.flush().await?;
        }
        rx.await.context("connection closed")
    }

    /// Sends `body` and waits for the answer.
    pub async fn call(&self, body: Bytes) -> anyhow::Result<Bytes> {
        self.upload(&body, body.len()).await
    }
}
