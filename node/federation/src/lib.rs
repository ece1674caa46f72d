//! The node's side of the federation: it dials out to the coordinator over QUIC with its
//! consortium certificate (TLS 1.3, mutual authentication) and counts itself connected only
//! after the hello/welcome round-trip, because a TLS 1.3 client finishes its handshake before
//! the coordinator has checked the client certificate.
//!
//! This crate moves messages and keeps the session's promises (the egress log written before
//! a frame leaves, ids that make retries idempotent, resumable state, masks for secure
//! aggregation); what the messages say is computed by the site through [`session::Stages`].

pub mod secure;
pub mod session;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;

use protocol::{HandshakeReject, Hello, MAX_FRAME_LEN, Message, Welcome};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the node is not connected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading PEM ({what}): {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC: {0}")]
    Quic(String),
    #[error(
        "the coordinator closed the connection before welcoming this site ({0}); check that this site's certificate is current and not revoked, and that the coordinator's name matches its certificate"
    )]
    NotWelcomed(String),
    #[error("the coordinator refused this site: {0:?}")]
    Rejected(HandshakeReject),
    #[error("unexpected answer from the coordinator")]
    Unexpected,
}

fn quic_err(e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Quic(e.to_string())
}

/// Client TLS for a site: trusts only the consortium CA and presents the site's certificate;
/// TLS 1.3 only, ALPN `fedcurate/1`.
pub fn client_tls(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> Result<rustls::ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        let c = c.map_err(|source| ConnectError::Pem {
            what: "CA certificate",
            source,
        })?;
        roots.add(c)?;
    }
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ConnectError::Pem {
            what: "site certificate",
            source,
        })?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| ConnectError::Pem {
        what: "site key",
        source,
    })?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    Ok(tls)
}

/// The QUIC client configuration over [`client_tls`], with a keep-alive below common NAT
/// timeouts.
pub fn client_config(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> Result<quinn::ClientConfig, ConnectError> {
    let tls = client_tls(ca, cert, key)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(quic_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Below common NAT timeouts.
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(15)));
    // Room for a few training chunks (up to 8 MiB each) in flight, in both directions.
    transport.stream_receive_window((9u32 * 1024 * 1024).into());
    transport.receive_window((36u32 * 1024 * 1024).into());
    transport.send_window(36 * 1024 * 1024);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Send one framed request on a new bidirectional stream and read the framed answer.
pub async fn request(conn: &quinn::Connection, message: &Message) -> Result<Message, ConnectError> {
    Link::Quic(conn.clone()).request(message).await
}

/// A connection to the coordinator: QUIC, or the TCP fallback (TLS 1.3 on TCP, each frame
/// preceded by a `u32` stream id that its answer repeats).
#[derive(Clone)]
pub enum Link {
    Quic(quinn::Connection),
    Tcp(Arc<tokio::sync::Mutex<TcpLink>>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.transport())
    }
}

/// The TCP fallback's stream.
pub struct TcpLink {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    next: u32,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink").field("next", &self.next).finish()
    }
}

impl Link {
    /// `quic` or `tcp`.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Tcp(_) => "tcp",
        }
    }

    /// One request and its answer.
    pub async fn request(&self, message: &Message) -> Result<Message, ConnectError> {
        let frame = protocol::encode_frame(message).map_err(quic_err)?;
        let answer = self.request_frame(&frame).await?;
        if answer.is_empty() {
            return Err(ConnectError::NotWelcomed("no answer".into()));
        }
        let (m, _) = protocol::decode_frame(&answer).map_err(quic_err)?;
        Ok(m)
    }

    /// Send one frame as it is and return the answer's frame bytes (for audits and tests of
    /// what the coordinator does with frames it cannot decode).
    pub async fn request_frame(&self, frame: &[u8]) -> Result<Vec<u8>, ConnectError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let lost = |e: &dyn std::fmt::Display| ConnectError::NotWelcomed(e.to_string());
        match self {
            Link::Quic(conn) => {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
                send.write_all(frame).await.map_err(|e| lost(&e))?;
                send.finish().map_err(quic_err)?;
                recv.read_to_end(MAX_FRAME_LEN + 16)
                    .await
                    .map_err(|e| lost(&e))
            }
            Link::Tcp(t) => {
                let mut t = t.lock().await;
                let id = t.next;
                t.next = t.next.wrapping_add(1);
                let mut out = Vec::with_capacity(4 + frame.len());
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(frame);
                t.stream.write_all(&out).await.map_err(|e| lost(&e))?;
                t.stream.flush().await.map_err(|e| lost(&e))?;
                let mut head = [0u8; 8];
                t.stream.read_exact(&mut head).await.map_err(|e| lost(&e))?;
                let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
                if head[..4] != id.to_be_bytes() || len > MAX_FRAME_LEN {
                    return Err(ConnectError::Unexpected);
                }
                let mut answer = vec![0u8; 4 + len];
                answer[..4].copy_from_slice(&head[4..]);
                t.stream
                    .read_exact(&mut answer[4..])
                    .await
                    .map_err(|e| lost(&e))?;
                Ok(answer)
            }
        }
    }

    /// Close the connection.
    pub async fn close(&self) {
        use tokio::io::AsyncWriteExt;
        match self {
            Link::Quic(c) => c.close(0u32.into(), b"done"),
            Link::Tcp(t) => {
                let _ = t.lock().await.stream.shutdown().await;
            }
        }
    }
}

/// Dial the coordinator's TCP fallback at `addr` and say hello.
pub async fn connect_tcp(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
    hello: Hello,
) -> Result<(Link, Welcome), ConnectError> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| ConnectError::Quic(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::NotWelcomed(format!("TCP: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectError::NotWelcomed(format!("TLS on TCP: {e}")))?;
    let link = Link::Tcp(Arc::new(tokio::sync::Mutex::new(TcpLink {
        stream,
        next: 1,
    })));
    match link.request(&Message::Hello(hello)).await? {
        Message::Welcome(w) => Ok((link, w)),
        Message::Reject { reason, .. } => Err(ConnectError::Rejected(reason)),
        _ => Err(ConnectError::Unexpected),
    }
}

/// Dial the coordinator at `addr` (its certificate must name `server_name`) and say hello.
/// Returns the connection once welcomed.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    hello: Hello,
) -> Result<(quinn::Connection, Welcome), ConnectError> {
    let conn = endpoint
        .connect_with(config, addr, server_name)
        .map_err(quic_err)?
        .await
        .map_err(|e| ConnectError::NotWelcomed(e.to_string()))?;
    match request(&conn, &Message::Hello(hello)).await? {
        Message::Welcome(w) => Ok((conn, w)),
        Message::Reject { reason, .. } => Err(ConnectError::Rejected(reason)),
        _ => Err(ConnectError::Unexpected),
    }
}
