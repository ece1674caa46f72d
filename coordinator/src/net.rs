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
    let tls = server_tls(ca, crl, cert, key_pem)?;
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
        let actions = match protocol::decode_frame(&bytes) {
            Err(e) => {
                tracing::warn!(%site, error = %e, "rejected a frame");
                match hub.lock() {
                    Ok(mut h) => h.bad_frame(&site, &bytes, now()),
                    Err(_) => vec![Action::Close],
                }
            }
            // The hello must name the certificate's site.
            Ok((Message::Hello(h), _)) if h.site != site => {
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
                    let actions = h.handle_frame(&site, &bytes, message, now(), welcomed);
                    let welcome = actions
                        .iter()
                        .any(|a| matches!(a, Action::Reply(Message::Welcome(_))));
                    if welcome && !welcomed {
                        welcomed = true;
                        h.connected(&site);
                    }
                    actions
                }
                Err(_) => vec![Action::Close],
            },
        };
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
