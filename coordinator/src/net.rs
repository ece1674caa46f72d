//! The coordinator's QUIC service: TLS 1.3 with client certificates required (the consortium
//! CA, its revocation list), each connection mapped to a site by its certificate's SHA-256
//! fingerprint, one framed request per bidirectional stream, answered by the registry.
//!
//! A site cannot claim another's identity: the hello's site must be the site the certificate
//! was issued to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use protocol::{HandshakeReject, MAX_FRAME_LEN, Message, MessageId, SiteId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::pki::{Issued, Role, fingerprint};
use crate::{Action, Hub};

/// What went wrong setting up the service.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("reading PEM ({what}): {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, NetError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| NetError::Pem { what, source })
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, NetError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| NetError::Pem {
        what: "private key",
        source,
    })
}

/// Server TLS for the coordinator: `ca` is the consortium CA, `crl` its revocation list;
/// TLS 1.3 only, client certificates required, ALPN `fedcurate/1`.
pub fn server_tls(
    ca: &[u8],
    crl: &[u8],
    cert: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ServerConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca, "CA certificate")? {
        roots.add(c)?;
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(crl)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| NetError::Pem {
            what: "revocation list",
            source,
        })?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .with_crls(crls)
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert, "coordinator certificate")?, key(key_pem)?)?;
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    Ok(tls)
}

/// The QUIC server configuration over [`server_tls`].
pub fn server_config(
    ca: &[u8],
    crl: &[u8],
    cert: &[u8],
    key_pem: &[u8],
) -> Result<quinn::ServerConfig, NetError> {
    quic_server_config(server_tls(ca, crl, cert, key_pem)?)
}

/// The QUIC server configuration over a server TLS configuration (60 s idle timeout).
pub fn quic_server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, NetError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| NetError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(60)
            .try_into()
            .map_err(|e: quinn::VarIntBoundsExceeded| NetError::Quic(e.to_string()))?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The fingerprint registry: active site certificates (not revoked, not expired).
pub fn site_fingerprints(issued: &[Issued], now: i64) -> HashMap<String, SiteId> {
    issued
        .iter()
        .filter(|i| i.role == Role::Site && i.revoked.is_none() && i.not_after > now)
        .filter_map(|i| Some((i.fingerprint.clone(), SiteId::new(&i.name).ok()?)))
        .collect()
}

/// The sites by certificate fingerprint; replaced when the CA's register changes.
pub type SiteMap = Arc<RwLock<HashMap<String, SiteId>>>;

/// The running service.
#[derive(Debug)]
pub struct Service {
    pub endpoint: quinn::Endpoint,
    sites: SiteMap,
}

impl Service {
    /// Bind and start accepting connections (on the current tokio runtime).
    pub fn start(
        config: quinn::ServerConfig,
        addr: SocketAddr,
        hub: Arc<Mutex<Hub>>,
        sites: HashMap<String, SiteId>,
    ) -> Result<Self, NetError> {
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| NetError::Bind { addr, source })?;
        let ep = endpoint.clone();
        let sites: SiteMap = Arc::new(RwLock::new(sites));
        let map = sites.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let hub = hub.clone();
                let map = map.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => serve_connection(conn, hub, &map).await,
                        Err(e) => tracing::warn!(
                            %remote,
                            error = %e,
                            "refused a handshake (no or untrusted client certificate, revoked or expired certificate, or wrong protocol)"
                        ),
                    }
                });
            }
        });
        Ok(Service { endpoint, sites })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The fingerprint registry (shared with a [`TcpService`], so one reload serves both).
    pub fn sites(&self) -> SiteMap {
        self.sites.clone()
    }

    /// Apply new TLS material (e.g. a re-signed revocation list) and a new fingerprint
    /// registry: new handshakes use them at once; a connection whose certificate is no longer
    /// registered is refused at its next request.
    pub fn reload(&self, config: quinn::ServerConfig, sites: HashMap<String, SiteId>) {
        self.endpoint.set_server_config(Some(config));
        if let Ok(mut m) = self.sites.write() {
            *m = sites;
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn lookup(sites: &SiteMap, fp: Option<&str>) -> Option<SiteId> {
    let fp = fp?;
    sites.read().ok()?.get(fp).cloned()
}

async fn serve_connection(conn: quinn::Connection, hub: Arc<Mutex<Hub>>, sites: &SiteMap) {
    let fp = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| fingerprint(c.as_ref())));
    let Some(site) = lookup(sites, fp.as_deref()) else {
        tracing::warn!(
            fingerprint = fp.as_deref().unwrap_or("none"),
            "a certificate of the consortium CA that is not a registered site: closing"
        );
        conn.close(1u32.into(), b"unknown site certificate");
        return;
    };
    tracing::info!(%site, remote = %conn.remote_address(), "site connected");
    let mut welcomed = false;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%site, reason = %e, "connection ended");
                break;
            }
        };
        // A certificate revoked while connected loses its connection at the next request.
        if lookup(sites, fp.as_deref()).as_ref() != Some(&site) {
            tracing::warn!(%site, "certificate no longer registered (revoked?): closing");
            conn.close(1u32.into(), b"certificate no longer valid");
            break;
        }
        let bytes = match recv.read_to_end(MAX_FRAME_LEN + 16).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%site, error = %e, "unreadable request (over the frame limit or reset)");
                let actions = match hub.lock() {
                    Ok(mut h) => h.bad_frame(&site, &[], now()),
                    Err(_) => vec![Action::Close],
                };
                if answer(&mut send, actions).await {
                    break;
                }
                continue;
            }
        };
        let actions = dispatch(&hub, &site, &bytes, &mut welcomed);
        if answer(&mut send, actions).await {
            let _ = send.stopped().await;
            conn.close(0u32.into(), b"closed by coordinator");
            break;
        }
    }
    if welcomed && let Ok(mut h) = hub.lock() {
        h.disconnected(&site);
    }
}

/// Decode and handle one frame from `site` on a connection (`welcomed` is the connection's
/// state); the same for QUIC streams and the TCP fallback.
fn dispatch(hub: &Mutex<Hub>, site: &SiteId, bytes: &[u8], welcomed: &mut bool) -> Vec<Action> {
    match protocol::decode_frame(bytes) {
        Err(e) => {
            tracing::warn!(%site, error = %e, "rejected a frame");
            match hub.lock() {
                Ok(mut h) => h.bad_frame(site, bytes, now()),
                Err(_) => vec![Action::Close],
            }
        }
        // The hello must name the certificate's site.
        Ok((Message::Hello(h), _)) if h.site != *site => {
            tracing::warn!(%site, "hello names another site: refused");
            vec![
                Action::Reply(Message::Reject {
                    id: MessageId(now() as u64),
                    reply_to: h.id,
                    reason: HandshakeReject::UnknownSite,
                }),
                Action::Close,
            ]
        }
        Ok((message, _)) => match hub.lock() {
            Ok(mut h) => {
                let actions = h.handle_frame(site, bytes, message, now(), *welcomed);
                let welcome = actions
                    .iter()
                    .any(|a| matches!(a, Action::Reply(Message::Welcome(_))));
                if welcome && !*welcomed {
                    *welcomed = true;
                    h.connected(site);
                }
                actions
            }
            Err(_) => vec![Action::Close],
        },
    }
}

/// Send the replies; true if the connection is to be closed.
async fn answer(send: &mut quinn::SendStream, actions: Vec<Action>) -> bool {
    let mut close = false;
    for a in actions {
        match a {
            Action::Reply(m) => match protocol::encode_frame(&m) {
                Ok(frame) => {
                    let _ = send.write_all(&frame).await;
                }
                Err(e) => tracing::error!(error = %e, "could not encode an answer"),
            },
            Action::Close => close = true,
        }
    }
    let _ = send.finish();
    close
}

/// The TCP fallback for hospitals that block UDP: the same protocol over TLS 1.3 on TCP, with
/// the same mutual authentication. Each frame is preceded by a `u32` stream id (big endian),
/// and its answers carry the same id: a small multiplex in place of QUIC's streams. Requests
/// on one connection are answered in order.
#[derive(Debug)]
pub struct TcpService {
    local: SocketAddr,
    tls: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// Largest frame the TCP fallback reads; a longer length field closes the connection (the
/// stream cannot be resynchronised without reading it).
const TCP_MAX: usize = MAX_FRAME_LEN;

impl TcpService {
    /// Bind and start accepting (on the current tokio runtime).
    pub async fn start(
        tls: rustls::ServerConfig,
        addr: SocketAddr,
        hub: Arc<Mutex<Hub>>,
        sites: SiteMap,
    ) -> Result<Self, NetError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| NetError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| NetError::Bind { addr, source })?;
        let tls = Arc::new(RwLock::new(Arc::new(tls)));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let config = tls.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.changed() => break,
                };
                let Ok((tcp, remote)) = accepted else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let Ok(current) = config.read().map(|c| c.clone()) else {
                    break;
                };
                let (hub, sites, stop) = (hub.clone(), sites.clone(), stopped.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(current);
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => serve_tcp(stream, hub, &sites, stop).await,
                        Ok(Err(e)) => tracing::warn!(
                            %remote,
                            error = %e,
                            "refused a TLS handshake on TCP (no or untrusted client certificate, revoked or expired certificate, or wrong protocol)"
                        ),
                        Err(_) => tracing::warn!(%remote, "TLS handshake on TCP timed out"),
                    }
                });
            }
        });
        Ok(TcpService { local, tls, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Use new TLS material for new connections.
    pub fn reload(&self, tls: rustls::ServerConfig) {
        if let Ok(mut t) = self.tls.write() {
            *t = Arc::new(tls);
        }
    }

    /// Stop accepting and close every connection.
    pub fn close(&self) {
        let _ = self.stop.send(true);
    }
}

async fn serve_tcp(
    mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    hub: Arc<Mutex<Hub>>,
    sites: &SiteMap,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fp = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first().map(|c| fingerprint(c.as_ref())));
    let Some(site) = lookup(sites, fp.as_deref()) else {
        tracing::warn!(
            fingerprint = fp.as_deref().unwrap_or("none"),
            "a certificate of the consortium CA that is not a registered site: closing (TCP)"
        );
        let _ = stream.shutdown().await;
        return;
    };
    tracing::info!(%site, "site connected over TCP");
    let mut welcomed = false;
    loop {
        let mut head = [0u8; 8];
        let read = tokio::select! {
            r = stream.read_exact(&mut head) => r,
            _ = stop.changed() => break,
        };
        if read.is_err() {
            break;
        }
        let stream_id = [head[0], head[1], head[2], head[3]];
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if lookup(sites, fp.as_deref()).as_ref() != Some(&site) {
            tracing::warn!(%site, "certificate no longer registered (revoked?): closing");
            break;
        }
        let actions = if len > TCP_MAX {
            tracing::warn!(%site, len, "frame over the hard limit on TCP: answering and closing");
            let mut a = match hub.lock() {
                Ok(mut h) => h.bad_frame(&site, &head[4..], now()),
                Err(_) => Vec::new(),
            };
            a.push(Action::Close);
            a
        } else {
            let mut frame = vec![0u8; 4 + len];
            frame[..4].copy_from_slice(&head[4..]);
            if stream.read_exact(&mut frame[4..]).await.is_err() {
                break;
            }
            dispatch(&hub, &site, &frame, &mut welcomed)
        };
        let mut close = false;
        for a in actions {
            match a {
                Action::Reply(m) => {
                    if let Ok(f) = protocol::encode_frame(&m) {
                        let mut out = Vec::with_capacity(4 + f.len());
                        out.extend_from_slice(&stream_id);
                        out.extend_from_slice(&f);
                        if stream.write_all(&out).await.is_err() {
                            close = true;
                        }
                    }
                }
                Action::Close => close = true,
            }
        }
        let _ = stream.flush().await;
        if close {
            break;
        }
    }
    let _ = stream.shutdown().await;
    if welcomed && let Ok(mut h) = hub.lock() {
        h.disconnected(&site);
    }
}
