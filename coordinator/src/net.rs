//! The coordinator's QUIC service: TLS 1.3 with client certificates required (the consortium
//! CA, its revocation list), each connection mapped to a site by its certificate's SHA-256
//! fingerprint, one framed request per bidirectional stream, answered by the registry.
//!
//! A site cannot claim another's identity: the hello's site must be the site the certificate
//! was issued to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use protocol::{HandshakeReject, Message, MessageId, SiteId};
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
    // What one connection can make the coordinator hold: a few requests at a time, each
    // within the largest kind's limit, a few MiB in all.
    transport.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.stream_receive_window(STREAM_WINDOW.into());
    transport.receive_window(CONNECTION_WINDOW.into());
    // Global models go out in chunks of up to 8 MiB, a few in flight per site.
    transport.send_window(2 * u64::from(STREAM_WINDOW));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Requests one connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// Flow-control window of one request stream: the largest frame (a training chunk, 8 MiB)
/// and some.
const STREAM_WINDOW: u32 = protocol::codec::CHUNK_BODY_LIMIT as u32 + 64 * 1024;
/// Flow-control window of a connection: two chunks in flight.
const CONNECTION_WINDOW: u32 = 2 * STREAM_WINDOW;
/// Connections one site may hold at once (per transport).
pub const MAX_CONNECTIONS_PER_SITE: usize = 4;
/// Longest wait for the next bytes of a frame once its first byte is expected (a timeout on
/// lack of progress: a large frame on a slow link takes as long as it takes).
pub const FRAME_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A TCP connection with no request for this long is closed (QUIC: its idle timeout).
pub const TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Requests per second a site may make, sustained; `RATE_BURST` at once. A site beyond it
/// waits: its own requests slow down, nobody else's.
pub const RATE_PER_SECOND: f64 = 20.0;
pub const RATE_BURST: f64 = 40.0;

/// What one site may use of a service.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections one site may hold at once (per transport).
    pub connections_per_site: usize,
    /// Requests per second a site may make, sustained (0: no pacing).
    pub requests_per_second: f64,
    /// Requests a site may make at once before it is paced.
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_site: MAX_CONNECTIONS_PER_SITE,
            requests_per_second: RATE_PER_SECOND,
            burst: RATE_BURST,
        }
    }
}

/// Per-site connection counts and request rate (a token bucket), shared by a service's
/// connections.
#[derive(Debug, Default)]
pub struct Guard {
    sites: Mutex<HashMap<SiteId, SiteUse>>,
    limits: Limits,
}

#[derive(Debug)]
struct SiteUse {
    connections: usize,
    tokens: f64,
    last: std::time::Instant,
}

impl Guard {
    pub fn new(limits: Limits) -> Self {
        Guard {
            sites: Mutex::new(HashMap::new()),
            limits,
        }
    }

    fn with<R>(&self, site: &SiteId, f: impl FnOnce(&mut SiteUse) -> R) -> R {
        let mut m = match self.sites.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let burst = self.limits.burst;
        let u = m.entry(site.clone()).or_insert_with(|| SiteUse {
            connections: 0,
            tokens: burst,
            last: std::time::Instant::now(),
        });
        f(u)
    }

    /// Count a new connection of `site`; false if it holds the most it may.
    pub fn connect(&self, site: &SiteId) -> bool {
        let most = self.limits.connections_per_site;
        self.with(site, |u| {
            if u.connections >= most {
                false
            } else {
                u.connections += 1;
                true
            }
        })
    }

    pub fn disconnect(&self, site: &SiteId) {
        self.with(site, |u| u.connections = u.connections.saturating_sub(1));
    }

    /// Take a request token; how long to wait first when there is none.
    pub fn pace(&self, site: &SiteId) -> std::time::Duration {
        let Limits {
            requests_per_second: rate,
            burst,
            ..
        } = self.limits;
        self.with(site, |u| {
            let now = std::time::Instant::now();
            let dt = now.duration_since(u.last).as_secs_f64();
            u.last = now;
            u.tokens = (u.tokens + dt * rate).min(burst) - 1.0;
            if u.tokens >= 0.0 || rate <= 0.0 {
                std::time::Duration::ZERO
            } else {
                std::time::Duration::from_secs_f64((-u.tokens / rate).min(60.0))
            }
        })
    }
}

/// Handle one frame on a blocking thread: the hub's lock and its SQLite writes never stall
/// the async workers that serve the other sites.
async fn dispatch_blocking(
    hub: &Arc<Mutex<Hub>>,
    site: &SiteId,
    bytes: Vec<u8>,
    welcomed: bool,
) -> (Vec<Action>, bool) {
    if let Some((wait, seen)) = long_poll(&bytes) {
        wait_for_change(hub, wait, seen).await;
    }
    let (hub, site) = (hub.clone(), site.clone());
    tokio::task::spawn_blocking(move || {
        let mut w = welcomed;
        let a = if is_chunk(&bytes) {
            dispatch_chunk(&hub, &site, bytes, w)
        } else {
            dispatch(&hub, &site, &bytes, &mut w)
        };
        (a, w)
    })
    .await
    .unwrap_or((vec![Action::Close], welcomed))
}

/// A training status request that asks to wait: for how long, and from which position.
fn long_poll(frame: &[u8]) -> Option<(std::time::Duration, [u32; 3])> {
    if protocol::codec::frame_kind(frame) != Some(0x33) {
        return None;
    }
    match protocol::decode_frame(frame) {
        Ok((Message::TrainStatus { wait_ms, seen, .. }, _)) if wait_ms > 0 => Some((
            std::time::Duration::from_millis(u64::from(wait_ms.min(LONG_POLL_MAX_MS))),
            seen,
        )),
        _ => None,
    }
}

/// Longest a training status request may wait for a change.
const LONG_POLL_MAX_MS: u32 = 30_000;

/// Wait until the training job's position differs from `seen`, or `wait` has passed.
async fn wait_for_change(hub: &Arc<Mutex<Hub>>, wait: std::time::Duration, seen: [u32; 3]) {
    let deadline = tokio::time::Instant::now() + wait;
    let watch = {
        let hub = hub.clone();
        move || {
            let hub = hub.clone();
            tokio::task::spawn_blocking(move || hub.lock().ok().and_then(|h| h.training_watch()))
        }
    };
    let Ok(Some((_, notify))) = watch().await else {
        return;
    };
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match watch().await {
            Ok(Some((pos, _))) if pos == seen => {}
            _ => return,
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return;
        }
    }
}

/// A frame refused from its header alone (answered, and its body never read).
async fn refuse_blocking(hub: &Arc<Mutex<Hub>>, site: &SiteId, head: Vec<u8>) -> Vec<Action> {
    let (hub, site) = (hub.clone(), site.clone());
    tokio::task::spawn_blocking(move || match hub.lock() {
        Ok(mut h) => h.bad_frame(&site, &head, now()),
        Err(_) => vec![Action::Close],
    })
    .await
    .unwrap_or_else(|_| vec![Action::Close])
}

/// Read and drop `n` bytes through a fixed buffer.
async fn drain<R: tokio::io::AsyncRead + Unpin>(r: &mut R, mut n: usize) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16 * 1024];
    while n > 0 {
        let want = n.min(buf.len());
        let got = r.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n -= got;
    }
    Ok(())
}

/// How reading one frame ended.
enum Read {
    /// A frame, and for a chunk its slot (held until it is handled).
    Frame(Vec<u8>, Option<tokio::sync::SemaphorePermit<'static>>),
    /// The header says no: answer from it, do not read on.
    Refused(Vec<u8>, protocol::CodecError),
    /// Reset, closed or too slow.
    Gone(String),
}

/// Read one frame from a QUIC stream: the header, its kind's limit, then exactly the body.
async fn read_quic_frame(recv: &mut quinn::RecvStream) -> Read {
    let mut head = [0u8; protocol::FRAME_HEADER_LEN];
    match tokio::time::timeout(FRAME_READ_TIMEOUT, recv.read_exact(&mut head)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Read::Gone(e.to_string()),
        Err(_) => return Read::Gone("no frame header in time".into()),
    }
    let body = match protocol::check_header(&head) {
        Ok(n) => n,
        Err(e) => return Read::Refused(head.to_vec(), e),
    };
    let slot = if is_chunk(&head) {
        CHUNK_SLOTS.acquire().await.ok()
    } else {
        None
    };
    let mut frame = vec![0u8; protocol::FRAME_HEADER_LEN + body];
    frame[..protocol::FRAME_HEADER_LEN].copy_from_slice(&head);
    let mut at = protocol::FRAME_HEADER_LEN;
    while at < frame.len() {
        match tokio::time::timeout(FRAME_READ_TIMEOUT, recv.read(&mut frame[at..])).await {
            Ok(Ok(Some(n))) => at += n,
            Ok(Ok(None)) => return Read::Gone("the stream ended inside a frame".into()),
            Ok(Err(e)) => return Read::Gone(e.to_string()),
            Err(_) => return Read::Gone("the frame stopped arriving".into()),
        }
    }
    Read::Frame(frame, slot)
}

/// Read exactly `buf.len()` bytes, waiting at most [`FRAME_READ_TIMEOUT`] for each piece.
async fn read_progress<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> bool {
    use tokio::io::AsyncReadExt;
    let mut at = 0;
    while at < buf.len() {
        match tokio::time::timeout(FRAME_READ_TIMEOUT, r.read(&mut buf[at..])).await {
            Ok(Ok(n)) if n > 0 => at += n,
            _ => return false,
        }
    }
    true
}

/// Training chunks are paced by flow control, not counted as requests.
fn is_chunk(frame: &[u8]) -> bool {
    matches!(protocol::codec::frame_kind(frame), Some(0x10..=0x1F))
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
    guard: Arc<Guard>,
}

impl Service {
    /// Bind and start accepting connections (on the current tokio runtime), with the default
    /// [`Limits`].
    pub fn start(
        config: quinn::ServerConfig,
        addr: SocketAddr,
        hub: Arc<Mutex<Hub>>,
        sites: HashMap<String, SiteId>,
    ) -> Result<Self, NetError> {
        Self::start_with(config, addr, hub, sites, Limits::default())
    }

    /// [`Service::start`] with the given per-site limits.
    pub fn start_with(
        config: quinn::ServerConfig,
        addr: SocketAddr,
        hub: Arc<Mutex<Hub>>,
        sites: HashMap<String, SiteId>,
        limits: Limits,
    ) -> Result<Self, NetError> {
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| NetError::Bind { addr, source })?;
        let ep = endpoint.clone();
        let sites: SiteMap = Arc::new(RwLock::new(sites));
        let map = sites.clone();
        let guard = Arc::new(Guard::new(limits));
        let g = guard.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let hub = hub.clone();
                let map = map.clone();
                let guard = g.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => serve_connection(conn, hub, &map, &guard).await,
                        Err(e) => tracing::warn!(
                            %remote,
                            error = %e,
                            "refused a handshake (no or untrusted client certificate, revoked or expired certificate, or wrong protocol)"
                        ),
                    }
                });
            }
        });
        Ok(Service {
            endpoint,
            sites,
            guard,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The per-site limits (connections, request rate).
    pub fn guard(&self) -> Arc<Guard> {
        self.guard.clone()
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

async fn serve_connection(
    conn: quinn::Connection,
    hub: Arc<Mutex<Hub>>,
    sites: &SiteMap,
    guard: &Arc<Guard>,
) {
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
    if !guard.connect(&site) {
        tracing::warn!(%site, limit = MAX_CONNECTIONS_PER_SITE, "too many connections from one site: closing the newest");
        conn.close(2u32.into(), b"too many connections");
        return;
    }
    tracing::info!(%site, remote = %conn.remote_address(), "site connected");
    // Requests on one connection are served concurrently (QUIC caps how many are open), so a
    // site's chunk transfers overlap; the hello is answered before anything else is sent.
    let welcomed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
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
        let (hub, site, welcomed, conn, guard) = (
            hub.clone(),
            site.clone(),
            welcomed.clone(),
            conn.clone(),
            guard.clone(),
        );
        tasks.spawn(async move {
            let actions = match read_quic_frame(&mut recv).await {
                Read::Frame(bytes, _slot) => {
                    if !is_chunk(&bytes) {
                        let wait = guard.pace(&site);
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    let w = welcomed.load(std::sync::atomic::Ordering::SeqCst);
                    let (actions, w) = dispatch_blocking(&hub, &site, bytes, w).await;
                    if w {
                        welcomed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    actions
                }
                Read::Refused(head, e) => {
                    tracing::warn!(%site, error = %e, "refused a frame from its header");
                    let _ = recv.stop(0u32.into());
                    refuse_blocking(&hub, &site, head).await
                }
                Read::Gone(why) => {
                    tracing::warn!(%site, reason = %why, "unreadable request");
                    let _ = recv.stop(0u32.into());
                    refuse_blocking(&hub, &site, Vec::new()).await
                }
            };
            if answer(&mut send, actions).await {
                let _ = send.stopped().await;
                conn.close(0u32.into(), b"closed by coordinator");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.abort_all();
    guard.disconnect(&site);
    if welcomed.load(std::sync::atomic::Ordering::SeqCst)
        && let Ok(mut h) = hub.lock()
    {
        h.disconnected(&site);
    }
}

/// A training chunk: decoded in place (its data keeps the frame's allocation) and hashed
/// before the hub's lock, so chunks from several streams and sites are hashed in parallel.
fn dispatch_chunk(hub: &Mutex<Hub>, site: &SiteId, bytes: Vec<u8>, welcomed: bool) -> Vec<Action> {
    let head: Vec<u8> = bytes
        .iter()
        .take(protocol::FRAME_HEADER_LEN)
        .copied()
        .collect();
    match protocol::codec::decode_frame_owned(bytes) {
        Err(e) => {
            tracing::warn!(%site, error = %e, "rejected a frame");
            match hub.lock() {
                Ok(mut h) => h.bad_frame(site, &head, now()),
                Err(_) => vec![Action::Close],
            }
        }
        Ok(mut message) => {
            if let Message::PutChunk(c) = &mut message {
                c.digest = Some(protocol::training::sha256(&c.data));
            }
            match hub.lock() {
                Ok(mut h) => h.handle_frame(site, &head, message, now(), welcomed),
                Err(_) => vec![Action::Close],
            }
        }
    }
}

/// Chunk frames read at once, across every connection: what the coordinator holds of chunks
/// in flight stays a few frames, whatever the number of sites.
static CHUNK_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);

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

impl TcpService {
    /// Bind and start accepting (on the current tokio runtime), with the default [`Limits`].
    pub async fn start(
        tls: rustls::ServerConfig,
        addr: SocketAddr,
        hub: Arc<Mutex<Hub>>,
        sites: SiteMap,
    ) -> Result<Self, NetError> {
        Self::start_with(tls, addr, hub, sites, Limits::default()).await
    }

    /// [`TcpService::start`] with the given per-site limits.
    pub async fn start_with(
        tls: rustls::ServerConfig,
        addr: SocketAddr,
        hub: Arc<Mutex<Hub>>,
        sites: SiteMap,
        limits: Limits,
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
        let guard = Arc::new(Guard::new(limits));
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
                let (hub, sites, stop, guard) =
                    (hub.clone(), sites.clone(), stopped.clone(), guard.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(current);
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => serve_tcp(stream, hub, &sites, &guard, stop).await,
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
    guard: &Guard,
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
    if !guard.connect(&site) {
        tracing::warn!(%site, limit = MAX_CONNECTIONS_PER_SITE, "too many TCP connections from one site: closing the newest");
        let _ = stream.shutdown().await;
        return;
    }
    tracing::info!(%site, "site connected over TCP");
    let mut welcomed = false;
    loop {
        // The stream id and the frame header; an idle connection is closed.
        let mut head = [0u8; 4 + protocol::FRAME_HEADER_LEN];
        let read = tokio::select! {
            r = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut head)) => r,
            _ = stop.changed() => break,
        };
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::info!(%site, "idle TCP connection closed");
                break;
            }
        }
        let stream_id = [head[0], head[1], head[2], head[3]];
        if lookup(sites, fp.as_deref()).as_ref() != Some(&site) {
            tracing::warn!(%site, "certificate no longer registered (revoked?): closing");
            break;
        }
        let mut header = [0u8; protocol::FRAME_HEADER_LEN];
        header.copy_from_slice(&head[4..]);
        if !is_chunk(&header) {
            let wait = guard.pace(&site);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let actions = match protocol::check_header(&header) {
            Err(e) => {
                // The body is not kept. Within the hard frame limit it is read through a small
                // buffer and dropped, so the connection stays in step and survives; beyond it
                // the stream cannot be resynchronised: answer and close.
                let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
                let mut a = refuse_blocking(&hub, &site, header.to_vec()).await;
                let drained = if (3..=protocol::MAX_FRAME_LEN).contains(&len) {
                    tokio::time::timeout(FRAME_READ_TIMEOUT, drain(&mut stream, len - 3))
                        .await
                        .is_ok_and(|r| r.is_ok())
                } else {
                    false
                };
                if drained {
                    tracing::warn!(%site, error = %e, "refused a frame from its header on TCP");
                } else {
                    tracing::warn!(%site, error = %e, "refused a frame from its header on TCP: answering and closing");
                    a.push(Action::Close);
                }
                a
            }
            Ok(body) => {
                let _slot = if is_chunk(&header) {
                    CHUNK_SLOTS.acquire().await.ok()
                } else {
                    None
                };
                let mut frame = vec![0u8; protocol::FRAME_HEADER_LEN + body];
                frame[..protocol::FRAME_HEADER_LEN].copy_from_slice(&header);
                if !read_progress(&mut stream, &mut frame[protocol::FRAME_HEADER_LEN..]).await {
                    break;
                }
                let (a, w) = dispatch_blocking(&hub, &site, frame, welcomed).await;
                welcomed = w;
                a
            }
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
    guard.disconnect(&site);
    let _ = stream.shutdown().await;
    if welcomed && let Ok(mut h) = hub.lock() {
        h.disconnected(&site);
    }
}
