//! The node's side of the federation: it dials out to the coordinator over QUIC with its
//! consortium certificate (TLS 1.3, mutual authentication) and counts itself connected only
//! after the hello/welcome round-trip, because a TLS 1.3 client finishes its handshake before
//! the coordinator has checked the client certificate.

pub mod aggregate;
pub mod session;

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
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Send one framed request on a new bidirectional stream and read the framed answer.
pub async fn request(conn: &quinn::Connection, message: &Message) -> Result<Message, ConnectError> {
    let frame = protocol::encode_frame(message).map_err(quic_err)?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| ConnectError::NotWelcomed(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| ConnectError::NotWelcomed(e.to_string()))?;
    send.finish().map_err(quic_err)?;
    let bytes = recv
        .read_to_end(MAX_FRAME_LEN + 16)
        .await
        .map_err(|e| ConnectError::NotWelcomed(e.to_string()))?;
    if bytes.is_empty() {
        return Err(ConnectError::NotWelcomed("no answer".into()));
    }
    let (m, _) = protocol::decode_frame(&bytes).map_err(quic_err)?;
    Ok(m)
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
