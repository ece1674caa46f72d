//! The federation session: dial out, say hello, and do what the welcome says is due —
//! fetch and acknowledge the schema, report the round's aggregates (in the clear or masked for
//! secure aggregation), fetch a published model and hand it to the site. What each message
//! says is the site's to compute, through [`Stages`]; this module only moves messages and
//! keeps the session's promises. Progress is kept in `federation/state.json` in the data
//! directory, so a restarted node resumes where it left off; requests carry ids derived from
//! their content, so a retry after a lost answer is applied once. Every frame that leaves is
//! written to the egress log first.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fc_files::{content_hash, write_atomically};
use fc_store::catalog::{Catalog, EgressRecord};
use protocol::aggregate::{ConformanceSummary, ProfileCheck, RefusalReason, SiteAggregates};
use protocol::schema::CurationSchema;
use protocol::{
    AggregateReport, ErrorCode, FederatedFit, Hello, Message, MessageId, PROTOCOL_VERSION,
    SchemaAck, SchemaDocument, SchemaHash, Welcome,
};
use serde::{Deserialize, Serialize};

use crate::settings::{FederationSettings, Transport};
use crate::{ConnectError, Link, client_config, client_tls, connect, connect_tcp};

/// Fewest sites a model this node applies may merge (the coordinator's rule, checked again).
pub const MODEL_MIN_SITES: usize = 3;

/// How long the node waits for the coordinator to answer a connection attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the node waits for the answer to one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Session errors.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the coordinator address {0} does not resolve; check [federation] coordinator")]
    Resolve(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Catalog(#[from] fc_store::catalog::CatalogError),
    #[error("the coordinator answered {0:?}")]
    Refused(ErrorCode),
    #[error("the coordinator's schema is invalid here: {0}")]
    Schema(String),
    #[error(
        "this node's de-identification profile lacks options the consortium requires ({0}); add them to [deid] options and de-identify again"
    )]
    Profile(String),
    #[error("harmonisation: {0}")]
    Harmonise(String),
    #[error("secure aggregation: {0}")]
    Secure(String),
    #[error("unexpected answer from the coordinator")]
    Unexpected,
}

/// What the session has done, kept across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// Hex hash of the schema the node follows (saved as `federation/schema.toml`).
    pub schema: Option<String>,
    /// Hex hash of the schema acknowledged.
    pub acknowledged: Option<String>,
    /// (schema hash, round) last reported.
    pub reported: Option<(String, u32)>,
    /// Revision of the model applied.
    pub model: u32,
    /// (schema hash, round, reason) of the last refusal sent, so it is sent once.
    #[serde(default)]
    pub refused: Option<(String, u32, String)>,
    /// Revision of the last model refused as implausible (never applied).
    #[serde(default)]
    pub refused_model: Option<u32>,
}

/// What one synchronisation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub fetched_schema: bool,
    pub acknowledged: bool,
    pub reported: Option<u32>,
    pub applied_model: Option<u32>,
    /// Volumes harmonised with the applied model.
    pub harmonised: usize,
    pub welcome: Option<(u32, u32)>,
    /// The round's aggregates were not released, and why.
    pub refused: Option<RefusalReason>,
    /// A secure-aggregation step waits for the other sites.
    pub secure_waiting: bool,
    /// A published model was refused as implausible (or over fewer than three sites).
    pub refused_model: Option<u32>,
}

/// What the messages say: the site computes it from its stages' public functions (the
/// session calls these between messages, on its own task; each may read the de-identified
/// output and the catalog, and must not block for long).
pub trait Stages {
    /// How many new kinds of release under `schema` wait for hospital IT's approval (0: none;
    /// the round is then refused as awaiting approval).
    fn approval_pending(&self, schema: &CurationSchema) -> Result<usize, SessionError>;
    /// Which of the schema's required de-identification options the site lacks.
    fn profile(&self, schema: &CurationSchema) -> ProfileCheck;
    /// The conformance counts the schema acknowledgement carries (`hash`: the schema's hex
    /// hash; `k`: the minimum cell count), recorded in the query ledger when they are released.
    fn conformance(
        &self,
        schema: &CurationSchema,
        hash: &str,
        k: u32,
    ) -> Result<ConformanceSummary, SessionError>;
    /// The round's release, or why it is refused. Called again after a failed send: it must
    /// return the same release (computed, noised and recorded once) until [`Stages::sent`].
    fn release(
        &self,
        schema: &CurationSchema,
        hash: &str,
        round: u32,
        k: u32,
    ) -> Result<Result<SiteAggregates, RefusalReason>, SessionError>;
    /// The round's release was acknowledged by the coordinator.
    fn sent(&self);
    /// Apply a published model that passed [`model_refusal`]; returns the volumes harmonised.
    fn apply_model(&self, fit: &FederatedFit, revision: u32) -> Result<usize, SessionError>;
}

/// This site's part of the current secure-aggregation session (in memory only: private keys
/// never touch the disk; a restarted node joins a restarted session).
#[derive(Debug)]
struct SecureLocal {
    schema: SchemaHash,
    round: u32,
    session: u32,
    keys: Option<crate::secure::SessionKeys>,
    masked: Option<(MessageId, Vec<u64>)>,
    /// The masked vector was acknowledged: wait for the session to complete.
    submitted: bool,
}

fn hex(h: &SchemaHash) -> String {
    h.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random message id.
pub fn random_id() -> MessageId {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    MessageId(u64::from_be_bytes(b))
}

/// An id derived from what the request means, so its retry carries the same id.
pub fn derived_id(parts: &[&[u8]]) -> MessageId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    MessageId(u64::from_be_bytes(b))
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::FetchSchema { .. } => "fetch-schema",
        Message::SchemaAck(_) => "schema-ack",
        Message::Report(_) => "report",
        Message::FetchModel { .. } => "fetch-model",
        Message::Refusal(_) => "refusal",
        Message::SecureJoin { .. } => "secure-join",
        Message::SecureKeys(_) => "secure-keys",
        Message::FetchPeerKeys { .. } => "fetch-peer-keys",
        Message::MaskedReport(_) => "masked-report",
        Message::FetchJob { .. } => "fetch-job",
        Message::JoinTraining { .. } => "join-training",
        Message::TrainStatus { .. } => "train-status",
        Message::UpdateOffer(_) => "update-offer",
        Message::PutChunk(_) => "put-chunk",
        Message::GetChunk(_) => "get-chunk",
        Message::TrainKeys(_) => "train-keys",
        Message::FetchTrainKeys { .. } => "fetch-train-keys",
        _ => "other",
    }
}

fn answer_name(m: &Result<Message, ConnectError>) -> String {
    match m {
        Ok(Message::Welcome(_)) => "welcome".into(),
        Ok(Message::Reject { reason, .. }) => format!("reject {reason:?}"),
        Ok(Message::Schema { .. }) => "schema".into(),
        Ok(Message::Ack { duplicate, .. }) => {
            if *duplicate {
                "ack (already applied)".into()
            } else {
                "ack".into()
            }
        }
        Ok(Message::Model(m)) => format!("model revision {}", m.revision),
        Ok(Message::SecureSession(s)) => format!("session {}", s.session),
        Ok(Message::PeerKeys(p)) => format!("{} signed peer key sets", p.signed.len()),
        Ok(Message::Job(j)) => format!("job round {}", j.state.round),
        Ok(Message::RoundState(r)) => format!(
            "round {} attempt {} revision {} ({} chunks held)",
            r.round,
            r.attempt,
            r.revision,
            r.have.len()
        ),
        Ok(Message::Error { code, .. }) => format!("error {code:?}"),
        Ok(_) => "unexpected".into(),
        Err(e) => format!("no answer: {e}"),
    }
}

/// A site's federation client.
/// A site's federation session with the coordinator.
pub struct Session {
    pub settings: FederationSettings,
    /// `federation/` in the data directory: state, schema.
    dir: PathBuf,
    /// The egress log.
    catalog: Catalog,
    client: quinn::ClientConfig,
    tls: std::sync::Arc<rustls::ClientConfig>,
    /// The TCP fallback worked last time: try it first.
    prefer_tcp: std::sync::atomic::AtomicBool,
    secure: std::sync::Mutex<Option<SecureLocal>>,
    /// Signs this site's secure-aggregation keys with its certificate's key.
    signer: crate::secure::Signer,
    /// The consortium CA (PEM) and this site's copy of the revocation list (DER), to check
    /// other sites' keys with.
    ca: Vec<u8>,
    crl: Option<Vec<u8>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("site", &self.settings.site)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for the site configured by `settings`, keeping its state in `data_dir`
    /// (`federation/`, and the catalog's egress log).
    pub fn new(settings: FederationSettings, data_dir: &Path) -> Result<Self, SessionError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| SessionError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let (ca, cert, key) = (
            read(&settings.ca)?,
            read(&settings.cert)?,
            read(&settings.key)?,
        );
        let client = client_config(&ca, &cert, &key)?;
        let signer = crate::secure::Signer::from_pem(&cert, &key)
            .map_err(|e| SessionError::Schema(e.to_string()))?;
        let crl = match &settings.crl {
            Some(p) => {
                use rustls::pki_types::CertificateRevocationListDer;
                use rustls::pki_types::pem::PemObject;
                let pem = read(p)?;
                let der = CertificateRevocationListDer::pem_slice_iter(&pem)
                    .next()
                    .and_then(Result::ok)
                    .ok_or_else(|| {
                        SessionError::Schema(format!(
                            "[federation] crl {}: no revocation list in the file",
                            p.display()
                        ))
                    })?;
                Some(der.as_ref().to_vec())
            }
            None => None,
        };
        let tls = std::sync::Arc::new(client_tls(&ca, &cert, &key)?);
        let dir = data_dir.join("federation");
        std::fs::create_dir_all(&dir)?;
        let catalog = Catalog::open(&data_dir.join("catalog.sqlite"))?;
        Ok(Session {
            settings,
            dir,
            catalog,
            client,
            tls,
            prefer_tcp: std::sync::atomic::AtomicBool::new(false),
            secure: std::sync::Mutex::new(None),
            signer,
            ca,
            crl,
        })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// What the session has done (empty before the first sync).
    pub fn state(&self) -> SessionState {
        std::fs::read(self.state_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, s: &SessionState) -> Result<(), SessionError> {
        let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
        write_atomically(&self.state_path(), &bytes)?;
        Ok(())
    }

    /// The schema the node follows, if it has fetched one.
    pub fn schema(&self) -> Option<CurationSchema> {
        let text = std::fs::read_to_string(self.dir.join("schema.toml")).ok()?;
        CurationSchema::parse(&text).ok()
    }

    fn resolve(&self) -> Result<SocketAddr, SessionError> {
        self.settings
            .coordinator
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| SessionError::Resolve(self.settings.coordinator.clone()))
    }

    /// Record frames about to leave in the egress log, in one transaction (chunk transfers:
    /// `sha256` is each chunk's content hash, which the logged offer also lists).
    pub fn log_egress_batch(
        &self,
        records: &[(&'static str, MessageId, u64, String)],
    ) -> Result<(), SessionError> {
        let rows: Vec<EgressRecord> = records
            .iter()
            .map(|(kind, id, bytes, sha256)| EgressRecord {
                at: fc_store::audit::utc_now(),
                kind: (*kind).into(),
                message_id: id.0,
                bytes: *bytes,
                sha256: sha256.clone(),
                answer: "sent".into(),
            })
            .collect();
        self.catalog.record_egress_batch(&rows)?;
        Ok(())
    }

    /// The site's signer (its certificate's key), CA and revocation lists, for secure
    /// aggregation outside the session's own rounds.
    pub fn secure_material(&self) -> (&crate::secure::Signer, &[u8], Vec<Vec<u8>>) {
        (&self.signer, &self.ca, self.crl.iter().cloned().collect())
    }

    /// Send a request, with the egress log written before the frame leaves.
    pub async fn send(&self, conn: &Link, m: &Message) -> Result<Message, SessionError> {
        let frame = protocol::encode_frame(m).map_err(|e| SessionError::Schema(e.to_string()))?;
        let seq = self.catalog.record_egress(&EgressRecord {
            at: fc_store::audit::utc_now(),
            kind: kind_name(m).into(),
            message_id: m.id().0,
            bytes: frame.len() as u64,
            sha256: content_hash(&frame),
            answer: "sent".into(),
        })?;
        // Nothing waits forever: an unanswered request fails, and the session reconnects.
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, conn.request(m)).await {
            Ok(a) => a,
            Err(_) => Err(ConnectError::NotWelcomed(format!(
                "no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        };
        self.catalog.set_egress_answer(seq, &answer_name(&answer))?;
        Ok(answer?)
    }

    fn hello(&self) -> Hello {
        let state = self.state();
        Hello {
            id: random_id(),
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            site: self.settings.site.clone(),
            schema: state.schema.as_deref().and_then(|h| {
                let mut b = [0u8; 32];
                for (i, o) in b.iter_mut().enumerate() {
                    *o = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                Some(SchemaHash(b))
            }),
        }
    }

    /// One connection attempt over one transport, logged as egress (the hello that left,
    /// and whether it was welcomed).
    async fn attempt(
        &self,
        endpoint: &quinn::Endpoint,
        transport: Transport,
    ) -> Result<(Link, Welcome), SessionError> {
        let hello = self.hello();
        let frame = protocol::encode_frame(&Message::Hello(hello.clone()))
            .map_err(|e| SessionError::Schema(e.to_string()))?;
        let seq = self.catalog.record_egress(&EgressRecord {
            at: fc_store::audit::utc_now(),
            kind: "hello".into(),
            message_id: hello.id.0,
            bytes: frame.len() as u64,
            sha256: content_hash(&frame),
            answer: "sent".into(),
        })?;
        let name = self.settings.server_name();
        let dial = async {
            match transport {
                Transport::Tcp => {
                    let addr = self.resolve_tcp()?;
                    Ok(connect_tcp(self.tls.clone(), addr, &name, hello).await?)
                }
                _ => {
                    let addr = self.resolve()?;
                    let (c, w) = connect(endpoint, self.client.clone(), addr, &name, hello).await?;
                    Ok((Link::Quic(c), w))
                }
            }
        };
        // A coordinator that is down never answers over UDP: give up after a while.
        let r: Result<(Link, Welcome), SessionError> =
            match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
                Ok(r) => r,
                Err(_) => Err(SessionError::Connect(ConnectError::NotWelcomed(format!(
                    "no answer within {} s (is the coordinator up, and {} open?)",
                    CONNECT_TIMEOUT.as_secs(),
                    if transport == Transport::Tcp {
                        "TCP"
                    } else {
                        "UDP"
                    }
                )))),
            };
        let answer = match &r {
            Ok((l, _)) => format!("welcome ({})", l.transport()),
            Err(e) => format!("not welcomed: {e}"),
        };
        self.catalog.set_egress_answer(seq, &answer)?;
        r
    }

    /// Dial the coordinator and say hello: QUIC first, then (with `transport = "auto"`) the
    /// TCP fallback when QUIC cannot connect. After a fallback succeeded, TCP is tried first.
    pub async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
    ) -> Result<(Link, Welcome), SessionError> {
        use std::sync::atomic::Ordering;
        let order: &[Transport] = match self.settings.transport {
            Transport::Quic => &[Transport::Quic],
            Transport::Tcp => &[Transport::Tcp],
            Transport::Auto if self.prefer_tcp.load(Ordering::Relaxed) => {
                &[Transport::Tcp, Transport::Quic]
            }
            Transport::Auto => &[Transport::Quic, Transport::Tcp],
        };
        let mut last = None;
        for t in order {
            match self.attempt(endpoint, *t).await {
                Ok(ok) => {
                    self.prefer_tcp
                        .store(*t == Transport::Tcp, Ordering::Relaxed);
                    return Ok(ok);
                }
                // A refusal is an answer: another transport would be refused too.
                Err(e @ SessionError::Connect(ConnectError::Rejected(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(transport = ?t, error = %e, "could not connect");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(SessionError::Unexpected))
    }

    fn resolve_tcp(&self) -> Result<SocketAddr, SessionError> {
        let target = self
            .settings
            .coordinator_tcp
            .as_deref()
            .unwrap_or(&self.settings.coordinator);
        target
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| SessionError::Resolve(target.to_owned()))
    }

    /// Say hello again on a live connection: the welcome says what is due.
    pub async fn poll(&self, conn: &Link) -> Result<Welcome, SessionError> {
        match self.send(conn, &Message::Hello(self.hello())).await? {
            Message::Welcome(w) => Ok(w),
            Message::Reject { reason, .. } => {
                Err(SessionError::Connect(ConnectError::Rejected(reason)))
            }
            _ => Err(SessionError::Unexpected),
        }
    }

    /// Do everything the welcome says is due.
    pub async fn sync(
        &self,
        conn: &Link,
        welcome: &Welcome,
        stages: &dyn Stages,
    ) -> Result<SyncOutcome, SessionError> {
        let mut out = SyncOutcome {
            welcome: Some((welcome.round, welcome.model)),
            ..SyncOutcome::default()
        };
        let Some(published) = welcome.schema else {
            return Ok(out);
        };
        let published_hex = hex(&published);
        let mut state = self.state();
        if state.schema.as_deref() != Some(published_hex.as_str()) {
            let m = self
                .send(conn, &Message::FetchSchema { id: random_id() })
                .await?;
            let document: SchemaDocument = match m {
                Message::Schema { document, .. } => document,
                Message::Error { code, .. } => return Err(SessionError::Refused(code)),
                _ => return Err(SessionError::Unexpected),
            };
            if document.hash() != published {
                return Err(SessionError::Schema(
                    "the schema fetched does not have the hash the coordinator announced".into(),
                ));
            }
            write_atomically(&self.dir.join("schema.toml"), document.text().as_bytes())?;
            state.schema = Some(published_hex.clone());
            self.save(&state)?;
            out.fetched_schema = true;
            tracing::info!(
                schema = &published_hex[..12],
                "fetched the consortium schema"
            );
        }
        let schema = self
            .schema()
            .ok_or_else(|| SessionError::Schema("federation/schema.toml is unreadable".into()))?;
        let k = schema.min_cell_count(self.settings.min_cell_count);
        let profile = stages.profile(&schema);
        let pending = stages.approval_pending(&schema)?;
        if pending > 0 {
            tracing::warn!(
                items = pending,
                "new kinds of release wait for approval: review them with `fedcurate-node egress pending`, then run `fedcurate-node egress approve`"
            );
            self.refuse(
                conn,
                &mut state,
                published,
                welcome.round,
                RefusalReason::AwaitingApproval,
            )
            .await?;
            out.refused = Some(RefusalReason::AwaitingApproval);
            return Ok(out);
        }
        if state.acknowledged.as_deref() != Some(published_hex.as_str()) {
            let conformance = stages.conformance(&schema, &published_hex, k)?;
            let ack_bytes = serde_json::to_vec(&(&profile, &conformance)).unwrap_or_default();
            let ack = SchemaAck {
                id: derived_id(&[b"ack", &published.0, &ack_bytes]),
                schema: published,
                profile: profile.clone(),
                conformance,
            };
            match self.send(conn, &Message::SchemaAck(Box::new(ack))).await? {
                Message::Ack { .. } => {}
                Message::Error { code, .. } => return Err(SessionError::Refused(code)),
                _ => return Err(SessionError::Unexpected),
            }
            state.acknowledged = Some(published_hex.clone());
            self.save(&state)?;
            out.acknowledged = true;
            tracing::info!("acknowledged the schema");
        }
        if !profile.satisfied() {
            let names: Vec<&str> = profile
                .missing
                .iter()
                .filter_map(|i| schema.deidentification.options.get(usize::from(*i)))
                .map(String::as_str)
                .collect();
            return Err(SessionError::Profile(names.join(", ")));
        }
        let due = (published_hex.clone(), welcome.round);
        if welcome.round > 0 && state.reported.as_ref() != Some(&due) {
            // A release is computed (and its noise drawn, and its budget spent) once: a
            // retry after a failed send resends it as it is, never fresh noise.
            let aggregates = match stages.release(&schema, &published_hex, welcome.round, k)? {
                Ok(a) => a,
                Err(reason) => {
                    self.refuse(conn, &mut state, published, welcome.round, reason)
                        .await?;
                    out.refused = Some(reason);
                    return Ok(out);
                }
            };
            if schema.privacy.secure_aggregation {
                let done = self
                    .secure_round(conn, published, welcome.round, &schema, &aggregates)
                    .await?;
                if !done {
                    out.secure_waiting = true;
                    return Ok(out);
                }
                state.reported = Some(due);
                self.save(&state)?;
                stages.sent();
                out.reported = Some(welcome.round);
                tracing::info!(round = welcome.round, "sent the round's masked aggregates");
            } else {
                let m = Message::Report(Box::new(AggregateReport {
                    id: derived_id(&[
                        b"report",
                        &published.0,
                        &welcome.round.to_be_bytes(),
                        self.settings.site.as_str().as_bytes(),
                    ]),
                    schema: published,
                    round: welcome.round,
                    aggregates,
                }));
                match self.send(conn, &m).await? {
                    Message::Ack { .. } => {}
                    Message::Error { code, .. } => return Err(SessionError::Refused(code)),
                    _ => return Err(SessionError::Unexpected),
                }
                state.reported = Some(due);
                self.save(&state)?;
                stages.sent();
                out.reported = Some(welcome.round);
                tracing::info!(round = welcome.round, "reported the round's aggregates");
            }
        }
        if welcome.model > state.model {
            let m = self
                .send(
                    conn,
                    &Message::FetchModel {
                        id: random_id(),
                        schema: published,
                    },
                )
                .await?;
            match m {
                Message::Model(p) => {
                    if let Some(why) = model_refusal(&p) {
                        // Never applied, and not fetched again: the next revision is.
                        tracing::warn!(
                            revision = p.revision,
                            sites = p.sites,
                            reason = %why,
                            "refused the published harmonisation model; nothing was harmonised"
                        );
                        state.model = p.revision;
                        state.refused_model = Some(p.revision);
                        self.save(&state)?;
                        out.refused_model = Some(p.revision);
                    } else {
                        out.harmonised = stages.apply_model(&p.fit, p.revision)?;
                        state.model = p.revision;
                        self.save(&state)?;
                        out.applied_model = Some(p.revision);
                    }
                }
                Message::Error {
                    code: ErrorCode::NotReady,
                    ..
                } => {}
                Message::Error { code, .. } => return Err(SessionError::Refused(code)),
                _ => return Err(SessionError::Unexpected),
            }
        }
        Ok(out)
    }

    fn secure_local<R>(&self, f: impl FnOnce(&mut Option<SecureLocal>) -> R) -> R {
        match self.secure.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// One pass of secure aggregation for the round: join the session, send fresh public keys,
    /// fetch the peers' keys, send the masked vector. Returns false while a step waits for
    /// the other sites (the next poll continues where this one stopped).
    async fn secure_round(
        &self,
        conn: &Link,
        hash: SchemaHash,
        round: u32,
        schema: &CurationSchema,
        aggregates: &protocol::aggregate::SiteAggregates,
    ) -> Result<bool, SessionError> {
        let me = self.settings.site.clone();
        let joined = match self
            .send(
                conn,
                &Message::SecureJoin {
                    id: random_id(),
                    schema: hash,
                    round,
                },
            )
            .await?
        {
            Message::SecureSession(s) => s,
            Message::Error {
                code: ErrorCode::NotReady,
                ..
            } => return Ok(false),
            Message::Error { code, .. } => return Err(SessionError::Refused(code)),
            _ => return Err(SessionError::Unexpected),
        };
        let session = joined.session;
        if joined.complete {
            self.secure_local(|l| *l = None);
            if !joined.participants.contains(&me) {
                tracing::warn!(
                    round,
                    "the round was summed without this site (it dropped out of the session)"
                );
            }
            return Ok(true);
        }
        let submitted = self.secure_local(|l| {
            l.as_ref().is_some_and(|l| {
                l.schema == hash && l.round == round && l.session == session && l.submitted
            })
        });
        if submitted {
            return Ok(false);
        }
        let fresh = self.secure_local(|l| {
            l.as_ref()
                .is_none_or(|l| l.schema != hash || l.round != round || l.session != session)
        });
        if fresh {
            let (keys, publics) = crate::secure::SessionKeys::generate(&me, &joined.participants)
                .map_err(|e| SessionError::Schema(e.to_string()))?;
            self.secure_local(|l| {
                *l = Some(SecureLocal {
                    schema: hash,
                    round,
                    session,
                    keys: Some(keys),
                    masked: None,
                    submitted: false,
                })
            });
            let statement = protocol::secure::key_statement(
                &hash,
                round,
                session,
                &joined.participants,
                &me,
                &publics,
            );
            let signature = self
                .signer
                .sign(&statement)
                .map_err(|e| SessionError::Schema(e.to_string()))?;
            let m = Message::SecureKeys(Box::new(protocol::SecureKeys {
                id: random_id(),
                schema: hash,
                round,
                session,
                keys: publics,
                certificate: self.signer.certificate().to_vec(),
                signature,
            }));
            match self.send(conn, &m).await? {
                Message::Ack { .. } => {}
                Message::Error {
                    code: ErrorCode::NotReady,
                    ..
                } => {
                    self.secure_local(|l| *l = None);
                    return Ok(false);
                }
                Message::Error { code, .. } => return Err(SessionError::Refused(code)),
                _ => return Err(SessionError::Unexpected),
            }
        }
        let have_masked = self.secure_local(|l| l.as_ref().is_some_and(|l| l.masked.is_some()));
        if !have_masked {
            let peers = match self
                .send(
                    conn,
                    &Message::FetchPeerKeys {
                        id: random_id(),
                        schema: hash,
                        round,
                        session,
                    },
                )
                .await?
            {
                Message::PeerKeys(p) => p,
                Message::Error {
                    code: ErrorCode::NotReady,
                    ..
                } => return Ok(false),
                Message::Error { code, .. } => return Err(SessionError::Refused(code)),
                _ => return Err(SessionError::Unexpected),
            };
            let context = crate::secure::MaskContext {
                schema: hash,
                round,
                session,
            };
            // Mask only for verified peers: at least three participants, this site among
            // them, every other one's keys signed by a valid certificate of that site for
            // this very session and participant list. Otherwise nothing is sent.
            let mut crls: Vec<Vec<u8>> = vec![peers.crl.clone()];
            crls.extend(self.crl.clone());
            let peers = match crate::secure::verify_peers(
                &self.ca,
                &crls,
                &me,
                &joined.participants,
                &context,
                &peers.signed,
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(round, session, error = %e, "secure aggregation refused: nothing was sent");
                    self.secure_local(|l| *l = None);
                    return Err(SessionError::Secure(e.to_string()));
                }
            };
            let vector = protocol::secure::encode(aggregates, schema);
            let keys = self.secure_local(|l| l.as_mut().and_then(|l| l.keys.take()));
            let Some(keys) = keys else {
                return Ok(false);
            };
            let masked = keys
                .mask(&me, &peers, &context, &vector)
                .map_err(|e| SessionError::Schema(e.to_string()))?;
            let id = derived_id(&[
                b"masked",
                &hash.0,
                &round.to_be_bytes(),
                &session.to_be_bytes(),
                me.as_str().as_bytes(),
            ]);
            self.secure_local(|l| {
                if let Some(l) = l.as_mut() {
                    l.masked = Some((id, masked));
                }
            });
        }
        let Some((id, vector)) = self.secure_local(|l| l.as_ref().and_then(|l| l.masked.clone()))
        else {
            return Ok(false);
        };
        let m = Message::MaskedReport(Box::new(protocol::MaskedReport {
            id,
            schema: hash,
            round,
            session,
            k: aggregates.k,
            noise: aggregates.noise,
            vector,
        }));
        match self.send(conn, &m).await? {
            Message::Ack { .. } => {
                // Received; the round is done once every participant's vector is in.
                self.secure_local(|l| {
                    if let Some(l) = l.as_mut() {
                        l.submitted = true;
                        l.masked = None;
                    }
                });
                Ok(false)
            }
            Message::Error {
                code: ErrorCode::NotReady,
                ..
            } => {
                // The session was restarted without waiting for us: join the next one.
                self.secure_local(|l| *l = None);
                Ok(false)
            }
            Message::Error { code, .. } => Err(SessionError::Refused(code)),
            _ => Err(SessionError::Unexpected),
        }
    }

    /// Tell the coordinator this round's aggregates are not released, once per reason.
    async fn refuse(
        &self,
        conn: &Link,
        state: &mut SessionState,
        schema: SchemaHash,
        round: u32,
        reason: RefusalReason,
    ) -> Result<(), SessionError> {
        let key = (hex(&schema), round, format!("{reason:?}"));
        if state.refused.as_ref() == Some(&key) {
            return Ok(());
        }
        let m = Message::Refusal(protocol::Refusal {
            id: derived_id(&[
                b"refusal",
                &schema.0,
                &round.to_be_bytes(),
                key.2.as_bytes(),
            ]),
            schema,
            round,
            reason,
        });
        match self.send(conn, &m).await? {
            Message::Ack { .. } => {}
            Message::Error { code, .. } => return Err(SessionError::Refused(code)),
            _ => return Err(SessionError::Unexpected),
        }
        state.refused = Some(key);
        self.save(state)?;
        Ok(())
    }

    /// Connect and synchronise; when `wait_model` is set and the schema has a harmonisation
    /// recipe, keep polling until a model newer than the applied one is published (or the
    /// time is up).
    pub async fn run_once(
        &self,
        endpoint: &quinn::Endpoint,
        wait_model: Option<Duration>,
        stages: &dyn Stages,
    ) -> Result<SyncOutcome, SessionError> {
        let (conn, welcome) = self.connect(endpoint).await?;
        let mut out = self.sync(&conn, &welcome, stages).await?;
        // Secure aggregation takes several steps with the other sites: keep at it.
        let deadline = tokio::time::Instant::now() + wait_model.unwrap_or(Duration::from_secs(120));
        while out.secure_waiting && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let w = self.poll(&conn).await?;
            let more = self.sync(&conn, &w, stages).await?;
            out.secure_waiting = more.secure_waiting;
            out.reported = out.reported.or(more.reported);
            out.welcome = more.welcome;
        }
        if let Some(limit) = wait_model {
            let deadline = tokio::time::Instant::now() + limit;
            let wants_model = self
                .schema()
                .and_then(|s| s.harmonisation)
                .is_some_and(|h| h.method == "nyul" || h.method == "ct-nnunet");
            while wants_model && out.applied_model.is_none() && self.state().model == 0 {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!("no harmonisation model was published in time");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let w = self.poll(&conn).await?;
                let more = self.sync(&conn, &w, stages).await?;
                out.applied_model = more.applied_model;
                out.harmonised += more.harmonised;
                out.welcome = more.welcome;
            }
        }
        conn.close().await;
        Ok(out)
    }

    /// Run as a service: stay connected, poll every `poll_seconds`, reconnect with
    /// exponential backoff and full jitter (1 s doubling to 5 min) after any failure, until
    /// `stop` resolves.
    pub async fn run(
        &self,
        endpoint: &quinn::Endpoint,
        stop: impl std::future::Future<Output = ()>,
        stages: &dyn Stages,
    ) {
        tokio::pin!(stop);
        let mut failures: u32 = 0;
        loop {
            let attempt = async {
                let (conn, mut welcome) = self.connect(endpoint).await?;
                tracing::info!(site = %self.settings.site, "connected to the coordinator");
                loop {
                    self.sync(&conn, &welcome, stages).await?;
                    tokio::time::sleep(Duration::from_secs(self.settings.poll_seconds.max(1)))
                        .await;
                    welcome = self.poll(&conn).await?;
                }
                #[allow(unreachable_code)]
                Ok::<(), SessionError>(())
            };
            tokio::select! {
                _ = &mut stop => return,
                r = attempt => {
                    if let Err(e) = r {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures);
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "federation session interrupted; reconnecting");
                        tokio::select! {
                            _ = &mut stop => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
    }
}

/// Why a published model must not be applied: its summary cannot come from real volumes (one
/// site could otherwise make every node rescale its images to nonsense), or it merges fewer
/// than [`MODEL_MIN_SITES`] sites.
pub fn model_refusal(p: &protocol::ModelPublication) -> Option<String> {
    let check = match &p.fit {
        FederatedFit::Nyul(s) => s.check(),
        FederatedFit::Ct(s) => s.check(),
    };
    match check {
        Err(e) => Some(e.to_string()),
        Ok(()) if (p.sites as usize) < MODEL_MIN_SITES => Some(format!(
            "it merges {} sites, fewer than {MODEL_MIN_SITES}",
            p.sites
        )),
        Ok(()) => None,
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(300 s, 1 s · 2^(n−1))].
pub fn backoff(failures: u32) -> Duration {
    let cap_ms = 1000u64
        .saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(300_000);
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    Duration::from_millis(u64::from_be_bytes(b) % (cap_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        for n in 1..40 {
            let cap = 1000u64.saturating_mul(1 << (n - 1).min(20)).min(300_000);
            assert!(backoff(n).as_millis() as u64 <= cap);
        }
        // Jitter: many draws at the cap are not all equal.
        let draws: std::collections::BTreeSet<u128> =
            (0..20).map(|_| backoff(12).as_millis()).collect();
        assert!(draws.len() > 5);
    }

    #[test]
    fn implausible_or_narrow_models_are_refused() {
        let mut summary = protocol::summary::NyulSummary {
            volumes: 3,
            ..Default::default()
        };
        for (i, v) in summary.landmark_sums.iter_mut().enumerate() {
            *v = protocol::summary::to_fixed(3.0 * (1.0 + 9.0 * i as f64));
        }
        let model = |fit: protocol::summary::NyulSummary, sites: u32| protocol::ModelPublication {
            id: MessageId(1),
            reply_to: MessageId(2),
            schema: SchemaHash([0; 32]),
            revision: 1,
            sites,
            fit: FederatedFit::Nyul(fit),
        };
        assert_eq!(model_refusal(&model(summary.clone(), 3)), None);
        assert!(model_refusal(&model(summary.clone(), 2)).is_some_and(|w| w.contains("2 sites")));
        let mut poisoned = summary;
        poisoned.landmark_sums[10] = protocol::summary::to_fixed(3.0 * 1e6);
        assert!(model_refusal(&model(poisoned, 3)).is_some());
    }

    #[test]
    fn derived_ids_depend_on_every_part() {
        let a = derived_id(&[b"report", b"x", &1u32.to_be_bytes()]);
        assert_eq!(a, derived_id(&[b"report", b"x", &1u32.to_be_bytes()]));
        assert_ne!(a, derived_id(&[b"report", b"x", &2u32.to_be_bytes()]));
        assert_ne!(derived_id(&[b"ab", b"c"]), derived_id(&[b"a", b"bc"]));
    }
}
