//! The node's side of a training job: fetch the job, wait for hospital IT's approval, join,
//! exchange pairwise keys under secure aggregation, and round after round download the global
//! model (chunks checked against the coordinator's manifest, resumed after a restart), wait
//! for the trainer's update, spend the privacy budget, encode, offer the chunk hashes and send
//! the chunks the coordinator lacks, several at a time.
//!
//! Files in `<data_dir>/training/<job>-<hash>/`: `job.toml`, `model-<revision>.safetensors`
//! (the global models, the last two), `model-<revision>.partial` (a model being
//! downloaded), `update-<round>.safetensors` and `.json` (the trainer's accepted update and its
//! sample count and metrics), `pair-seeds.json` and `noise-<round>.seed` (secrets, 0600),
//! `metrics.jsonl` (what trainers reported locally).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fc_federation::Link;
use fc_federation::secure::{MaskContext, PairSeed, SessionKeys};
use fc_federation::session::{Session, SessionError, derived_id, random_id};
use futures_util::StreamExt;
use protocol::training::{
    Chunk, ChunkHead, JobDocument, JobHash, Layout, Phase, RoundState, TrainingJob, UpdateOffer,
    sha256,
};
use protocol::{ErrorCode, Message, SchemaHash, SiteId, TrainingError};
use serde::{Deserialize, Serialize};

use crate::encode::{self, MaskPlan, NoisePlan, Update, UpdateKind};

/// Why the agent stopped a cycle (it reconnects and resumes).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("transfer: {0}")]
    Transfer(String),
    #[error("the coordinator refused: {0:?}")]
    Refused(ErrorCode),
    #[error("unexpected answer from the coordinator")]
    Unexpected,
    #[error("training files: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Job(String),
    #[error("secure aggregation: {0}")]
    Secure(String),
    #[error(
        "the site's privacy budget cannot pay for round {round} (ε {needed:.4} more, {spent:.4} of {budget} spent): nothing more is sent for this job"
    )]
    Budget {
        round: u32,
        needed: f64,
        spent: f64,
        budget: f64,
    },
}

/// The job as the trainer sees it.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub hash: String,
    pub rounds: u32,
    pub secure_aggregation: bool,
    pub metrics: Vec<String>,
    pub trainer: std::collections::BTreeMap<String, f64>,
    pub params: u64,
    pub privacy: Option<protocol::training::TrainingPrivacy>,
    #[serde(skip)]
    pub dir: PathBuf,
}

/// What the node is doing, for the trainer's API and `train status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub site: String,
    pub job: Option<JobView>,
    pub phase: String,
    /// The round the node collects an update for (0: none open).
    pub round: u32,
    /// The latest global model held here.
    pub revision: u32,
    pub finished: bool,
    /// The latest round whose update the trainer handed in.
    pub submitted: u32,
    /// The latest round whose update was sent whole.
    pub uploaded: u32,
    pub participants: usize,
    pub error: Option<String>,
    /// Chunks sent, and chunks of an update the coordinator already held (resumed).
    pub chunks_sent: u64,
    pub chunks_skipped: u64,
    pub model_chunks_fetched: u64,
    pub model_chunks_reused: u64,
    /// ε this job spent of the site's budget so far.
    pub epsilon_spent: f64,
}

/// State shared by the agent and the trainer's API.
#[derive(Debug)]
pub struct Shared {
    status: Mutex<Status>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn new(site: &SiteId) -> Arc<Self> {
        let (changed, _) = tokio::sync::watch::channel(0);
        Arc::new(Shared {
            status: Mutex::new(Status {
                site: site.to_string(),
                phase: "starting".into(),
                ..Status::default()
            }),
            changed,
        })
    }

    pub fn status(&self) -> Status {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Change the status and wake whoever waits.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        {
            let mut s = match self.status.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            f(&mut s);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn phase(&self, p: &str) {
        let changed = self.status().phase != p;
        if changed {
            tracing::info!(phase = p, "training");
            self.update(|s| p.clone_into(&mut s.phase));
        }
    }
}

/// What the trainer handed in with its update.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateMeta {
    pub samples: u64,
    pub kind: UpdateKind,
    /// The job's metrics, in its order.
    pub metrics: Vec<f64>,
    /// The change's L2 norm, as the check computed it.
    #[serde(default)]
    pub norm: Option<f64>,
}

pub fn update_paths(dir: &Path, round: u32) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("update-{round}.safetensors")),
        dir.join(format!("update-{round}.json")),
    )
}

pub fn model_path(dir: &Path, revision: u32) -> PathBuf {
    dir.join(format!("model-{revision}.safetensors"))
}

/// The training agent of one node.
pub struct Agent {
    session: Session,
    endpoint: quinn::Endpoint,
    catalog: fc_store::catalog::Catalog,
    training_dir: PathBuf,
    settings: crate::TrainingSettings,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("dir", &self.training_dir)
            .finish_non_exhaustive()
    }
}

const POLL_MIN: Duration = Duration::from_millis(40);
const POLL_MAX: Duration = Duration::from_millis(1000);

impl Agent {
    pub fn new(
        session: Session,
        endpoint: quinn::Endpoint,
        data_dir: &Path,
        settings: crate::TrainingSettings,
        shared: Arc<Shared>,
    ) -> Result<Self, AgentError> {
        let training_dir = data_dir.join("training");
        std::fs::create_dir_all(&training_dir)?;
        fc_files::restrict(&training_dir, 0o700)?;
        let catalog = fc_store::catalog::Catalog::open(&data_dir.join("catalog.sqlite"))
            .map_err(|e| AgentError::Job(e.to_string()))?;
        Ok(Agent {
            session,
            endpoint,
            catalog,
            training_dir,
            settings,
            shared,
        })
    }

    /// Run until the job is finished or `stop` resolves; reconnects with backoff after any
    /// failure and resumes where it was.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut failures = 0u32;
        loop {
            let cycle = async {
                let (link, _) = self.session.connect(&self.endpoint).await?;
                let r = self.cycle(&link).await;
                link.close().await;
                r
            };
            tokio::select! {
                _ = &mut stop => return,
                r = cycle => match r {
                    Ok(true) => {
                        self.shared.phase("finished");
                        return;
                    }
                    Ok(false) => {
                        failures = 0;
                        tokio::select! {
                            _ = &mut stop => return,
                            _ = tokio::time::sleep(Duration::from_secs(self.session.settings.poll_seconds.clamp(1, 5))) => {}
                        }
                    }
                    Err(e @ AgentError::Budget { .. }) => {
                        tracing::error!(error = %e, "training stopped");
                        self.shared.update(|s| {
                            s.error = Some(e.to_string());
                            s.phase = "refused: privacy budget".into();
                        });
                        stop.await;
                        return;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let wait = fc_federation::session::backoff(failures).min(Duration::from_secs(10));
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "training interrupted; resuming");
                        self.shared.update(|s| s.error = Some(e.to_string()));
                        tokio::select! {
                            _ = &mut stop => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                },
            }
        }
    }

    async fn send(&self, link: &Link, m: &Message) -> Result<Message, AgentError> {
        Ok(self.session.send(link, m).await?)
    }

    /// One connection's work; true when the job is finished.
    async fn cycle(&self, link: &Link) -> Result<bool, AgentError> {
        let offer = match self
            .send(link, &Message::FetchJob { id: random_id() })
            .await?
        {
            Message::Job(j) => j,
            Message::Error {
                code: ErrorCode::Training(TrainingError::UnknownJob),
                ..
            } => {
                self.shared.phase("no training job published");
                return Ok(false);
            }
            Message::Error { code, .. } => return Err(AgentError::Refused(code)),
            _ => return Err(AgentError::Unexpected),
        };
        let doc: JobDocument = offer.document;
        let job = doc.job().map_err(|e| AgentError::Job(e.to_string()))?;
        let hash = doc.hash();
        let dir = self
            .training_dir
            .join(format!("{}-{}", job.id, &hash.hex()[..12]));
        std::fs::create_dir_all(&dir)?;
        if !dir.join("job.toml").exists() {
            fc_files::write_atomically(&dir.join("job.toml"), doc.text().as_bytes())?;
        }
        self.shared.update(|s| {
            s.job = Some(JobView {
                id: job.id.clone(),
                hash: hash.hex(),
                rounds: job.rounds,
                secure_aggregation: job.secure_aggregation,
                metrics: job.metrics.clone(),
                trainer: job.trainer.clone(),
                params: job.layout().params(),
                privacy: job.privacy.clone(),
                dir: dir.clone(),
            });
        });
        let approvals = crate::approval::JobApprovals::at(&self.training_dir);
        if !approvals.check(&job, &hash)? {
            self.shared
                .phase("awaiting approval (fedcurate-node egress pending / approve)");
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if approvals.is_approved(&hash) {
                    break;
                }
            }
        }
        let me = self.session.settings.site.clone();
        let mut state = match self
            .send(
                link,
                &Message::JoinTraining {
                    id: random_id(),
                    job: hash,
                },
            )
            .await?
        {
            Message::RoundState(s) => *s,
            Message::Error { code, .. } => return Err(AgentError::Refused(code)),
            _ => return Err(AgentError::Unexpected),
        };
        let seeds_path = dir.join("pair-seeds.json");
        let mut seeds: Option<Vec<PairSeed>> = std::fs::read(&seeds_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut pause = POLL_MIN;
        loop {
            self.shared.update(|s| {
                if state.phase != Phase::Collecting {
                    s.round = 0;
                }
                s.participants = state.participants.len();
            });
            let mut waited = false;
            // Nothing to do here until the coordinator's round moves on: ask it to answer
            // then (a long poll) rather than polling.
            let mut long_poll = false;
            match state.phase {
                Phase::Joining => {
                    self.shared.phase(&format!(
                        "waiting for sites to join ({} of {})",
                        state.joined.len(),
                        job.min_sites
                    ));
                    long_poll = true;
                }
                Phase::Finished => {
                    self.ensure_model(link, &job, &hash, &dir, state.revision, &state.model)
                        .await?;
                    self.shared.update(|s| {
                        s.finished = true;
                        s.round = 0;
                    });
                    return Ok(true);
                }
                Phase::Collecting => {
                    if job.secure_aggregation && seeds.is_none() && state.keyed.contains(&me) {
                        seeds = Some(self.exchange_keys(link, &hash, &state, &seeds_path).await?);
                    }
                    self.ensure_model(link, &job, &hash, &dir, state.revision, &state.model)
                        .await?;
                    // The trainer is told of the round only once its model is here.
                    self.shared.update(|s| s.round = state.round);
                    let (upath, mpath) = update_paths(&dir, state.round);
                    if !state.participants.contains(&me) {
                        self.shared.phase("not a participant of this round");
                        long_poll = true;
                    } else if state.complete.contains(&me) {
                        self.shared
                            .phase("update sent; waiting for the round's model");
                        long_poll = true;
                    } else if upath.exists() && mpath.exists() {
                        if job.secure_aggregation && seeds.is_none() {
                            return Err(AgentError::Secure(
                                "this site holds no pairwise keys for the job (it was not among the sites that exchanged keys, or lost them); it cannot take part in secure rounds".into(),
                            ));
                        }
                        self.upload(link, &job, &hash, &dir, &state, seeds.as_deref())
                            .await?;
                        waited = true;
                    } else {
                        self.shared.phase("waiting for the trainer's update");
                        let mut rx = self.shared.subscribe();
                        let _ = tokio::time::timeout(POLL_MAX, rx.changed()).await;
                        waited = true;
                    }
                }
            }
            if !waited && !long_poll {
                tokio::time::sleep(pause).await;
                pause = (pause * 3 / 2).min(POLL_MAX);
            }
            let before = (state.round, state.attempt, state.revision);
            state = match self
                .send(
                    link,
                    &Message::TrainStatus {
                        id: random_id(),
                        job: hash,
                        wait_ms: if long_poll { 20_000 } else { 0 },
                        seen: [state.round, state.attempt, state.revision],
                    },
                )
                .await?
            {
                Message::RoundState(s) => *s,
                Message::Error { code, .. } => return Err(AgentError::Refused(code)),
                _ => return Err(AgentError::Unexpected),
            };
            if (state.round, state.attempt, state.revision) != before {
                pause = POLL_MIN;
            }
        }
    }

    /// Send this site's signed keys for the job's keyed sites, wait for everyone's, verify
    /// them against the consortium CA and revocation list, and keep the pairwise seeds.
    async fn exchange_keys(
        &self,
        link: &Link,
        hash: &JobHash,
        state: &RoundState,
        seeds_path: &Path,
    ) -> Result<Vec<PairSeed>, AgentError> {
        self.shared.phase("exchanging keys for secure aggregation");
        let me = self.session.settings.site.clone();
        let secure = |e: &dyn std::fmt::Display| AgentError::Secure(e.to_string());
        let ctx = MaskContext {
            schema: SchemaHash(hash.0),
            round: 0,
            session: 1,
        };
        let (keys, publics) = SessionKeys::generate(&me, &state.keyed).map_err(|e| secure(&e))?;
        let (signer, ca, mut crls) = self.session.secure_material();
        let statement =
            protocol::secure::key_statement(&ctx.schema, 0, 1, &state.keyed, &me, &publics);
        let signature = signer.sign(&statement).map_err(|e| secure(&e))?;
        let m = Message::TrainKeys(Box::new(protocol::SecureKeys {
            id: random_id(),
            schema: ctx.schema,
            round: 0,
            session: 1,
            keys: publics,
            certificate: signer.certificate().to_vec(),
            signature,
        }));
        match self.send(link, &m).await? {
            Message::Ack { .. } => {}
            Message::Error { code, .. } => return Err(AgentError::Refused(code)),
            _ => return Err(AgentError::Unexpected),
        }
        let peers = loop {
            match self
                .send(
                    link,
                    &Message::FetchTrainKeys {
                        id: random_id(),
                        job: *hash,
                        epoch: 1,
                    },
                )
                .await?
            {
                Message::PeerKeys(p) => break p,
                Message::Error {
                    code: ErrorCode::NotReady,
                    ..
                } => tokio::time::sleep(Duration::from_millis(200)).await,
                Message::Error { code, .. } => return Err(AgentError::Refused(code)),
                _ => return Err(AgentError::Unexpected),
            }
        };
        crls.push(peers.crl.clone());
        let verified =
            fc_federation::secure::verify_peers(ca, &crls, &me, &state.keyed, &ctx, &peers.signed)
                .map_err(|e| secure(&e))?;
        let seeds = keys.pair_seeds(&verified, &ctx).map_err(|e| secure(&e))?;
        fc_files::write_atomically(
            seeds_path,
            &serde_json::to_vec(&seeds).map_err(std::io::Error::other)?,
        )?;
        fc_files::restrict(seeds_path, 0o600)?;
        tracing::info!(peers = seeds.len(), "pairwise keys verified and kept");
        Ok(seeds)
    }

    /// Have the global model at `revision` locally: download the chunks missing (each checked
    /// against the manifest), then assemble the safetensors file.
    async fn ensure_model(
        &self,
        link: &Link,
        job: &TrainingJob,
        hash: &JobHash,
        dir: &Path,
        revision: u32,
        manifest: &[protocol::training::ChunkHash],
    ) -> Result<(), AgentError> {
        let path = model_path(dir, revision);
        if path.exists() {
            self.shared.update(|s| s.revision = revision);
            return Ok(());
        }
        self.shared.phase(&format!(
            "downloading the global model (revision {revision})"
        ));
        let t0 = std::time::Instant::now();
        // The chunks are written in place into `model-<revision>.partial` (header first), each
        // checked against the manifest and for finite values as it arrives; a restarted node
        // keeps the chunks already there.
        use std::os::unix::fs::FileExt;
        let layout = job.layout();
        let header = layout.safetensors_header();
        let size = job.model_chunk_bytes() as usize;
        let total = header.len() as u64 + layout.data_len();
        let partial = dir.join(format!("model-{revision}.partial"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)?;
        let fresh = file.metadata()?.len() != total;
        if fresh {
            file.set_len(0)?;
            file.set_len(total)?;
            file.write_all_at(&header, 0)?;
        }
        let offset = |i: usize| header.len() as u64 + (i * size) as u64;
        let len_of = |i: usize| (layout.data_len() as usize - i * size).min(size);
        let missing: Vec<usize> = (0..manifest.len())
            .filter(|i| {
                fresh || {
                    let mut b = vec![0u8; len_of(*i)];
                    file.read_exact_at(&mut b, offset(*i)).is_err() || sha256(&b) != manifest[*i]
                }
            })
            .collect();
        let reused = (manifest.len() - missing.len()) as u64;
        self.session.log_egress_batch(
            &missing
                .iter()
                .map(|i| {
                    (
                        "get-chunk",
                        chunk_id(b"get", hash, revision, 0, *i as u32),
                        64u64,
                        format!("model {revision} chunk {i}"),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        let (file, layout) = (&file, &layout);
        let fetched = futures_util::stream::iter(missing.iter().copied())
            .map(|i| async move {
                let m = Message::GetChunk(ChunkHead {
                    id: chunk_id(b"get", hash, revision, 0, i as u32),
                    job: *hash,
                    round: revision,
                    attempt: 0,
                    index: i as u32,
                });
                let answer = link
                    .request(&m)
                    .await
                    .map_err(|e| AgentError::Transfer(e.to_string()))?;
                match answer {
                    Message::ModelChunk(c) if sha256(&c.data) == manifest[i] => {
                        if layout.values(&c.data).any(|v| !v.is_finite()) {
                            return Err(AgentError::Transfer(
                                "the global model holds a value that is not finite: not used"
                                    .into(),
                            ));
                        }
                        file.write_all_at(&c.data, offset(i))?;
                        Ok(())
                    }
                    Message::ModelChunk(_) => Err(AgentError::Transfer(format!(
                        "model chunk {i} does not match its hash"
                    ))),
                    Message::Error { code, .. } => Err(AgentError::Refused(code)),
                    _ => Err(AgentError::Unexpected),
                }
            })
            .buffer_unordered(self.settings.transfers_in_flight.max(1))
            .collect::<Vec<Result<(), AgentError>>>()
            .await;
        for r in fetched {
            r?;
        }
        file.sync_all()?;
        std::fs::rename(&partial, &path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        if revision >= 2 {
            let _ = std::fs::remove_file(model_path(dir, revision - 2));
        }
        tracing::info!(
            revision,
            chunks = manifest.len(),
            reused,
            ms = t0.elapsed().as_millis() as u64,
            "global model downloaded"
        );
        self.shared.update(|s| {
            s.revision = revision;
            s.model_chunks_fetched += missing.len() as u64;
            s.model_chunks_reused += reused;
        });
        Ok(())
    }

    /// Record the round's privacy spending in the ledger (once per round), refusing past the
    /// site's budget. Returns the ε this job has spent.
    fn spend(&self, job: &TrainingJob, hash: &JobHash, round: u32) -> Result<f64, AgentError> {
        let Some(p) = &job.privacy else {
            return Ok(0.0);
        };
        let dataset = format!("training:{}", job.id);
        let ledger = self
            .catalog
            .releases()
            .map_err(|e| AgentError::Job(e.to_string()))?;
        let mine = |r: &&fc_store::catalog::ReleaseRecord| {
            r.dataset == dataset && r.schema == hash.hex() && r.outcome == "released"
        };
        let job_spent: f64 = ledger.iter().filter(mine).map(|r| r.epsilon).sum();
        if ledger.iter().filter(mine).any(|r| r.round == round) {
            return Ok(job_spent);
        }
        let (before, _) = crate::accountant::epsilon(p.noise_multiplier, round - 1, p.delta);
        let (after, _) = crate::accountant::epsilon(p.noise_multiplier, round, p.delta);
        let needed = after - before;
        let delta = if round == 1 { p.delta } else { 0.0 };
        let (spent, spent_delta) = ledger
            .iter()
            .filter(|r| r.outcome == "released")
            .fold((0.0, 0.0), |(e, d), r| (e + r.epsilon, d + r.delta));
        let settings = &self.session.settings;
        let record = |outcome: &str, eps: f64, delta: f64| fc_store::catalog::ReleaseRecord {
            at: fc_store::audit::utc_now(),
            dataset: dataset.clone(),
            schema: hash.hex(),
            round,
            epsilon: eps,
            delta,
            patients: Vec::new(),
            outcome: outcome.into(),
            populations: Vec::new(),
        };
        if spent + needed > settings.privacy_budget_epsilon + 1e-12
            || spent_delta + delta > settings.privacy_budget_delta + 1e-18
        {
            self.catalog
                .record_release(&record("refused-budget", 0.0, 0.0))
                .map_err(|e| AgentError::Job(e.to_string()))?;
            return Err(AgentError::Budget {
                round,
                needed,
                spent,
                budget: settings.privacy_budget_epsilon,
            });
        }
        // Recorded before anything leaves: a crash after sending still counts as spent.
        self.catalog
            .record_release(&record("released", needed, delta))
            .map_err(|e| AgentError::Job(e.to_string()))?;
        Ok(job_spent + needed)
    }

    /// Send this round's update: encode it, offer its chunk hashes, send what the coordinator
    /// lacks.
    async fn upload(
        &self,
        link: &Link,
        job: &TrainingJob,
        hash: &JobHash,
        dir: &Path,
        state: &RoundState,
        seeds: Option<&[PairSeed]>,
    ) -> Result<(), AgentError> {
        let round = state.round;
        let (upath, mpath) = update_paths(dir, round);
        let meta: UpdateMeta = serde_json::from_slice(&std::fs::read(&mpath)?)
            .map_err(|e| AgentError::Job(format!("{}: {e}", mpath.display())))?;
        let spent = self.spend(job, hash, round)?;
        self.shared.update(|s| s.epsilon_spent = spent);
        self.shared
            .phase(&format!("sending the update of round {round}"));
        let noise = match &job.privacy {
            Some(p) => {
                let seed_path = dir.join(format!("noise-{round}.seed"));
                let seed: [u8; 32] = match std::fs::read(&seed_path) {
                    Ok(b) if b.len() == 32 => b.try_into().unwrap_or([0; 32]),
                    _ => {
                        let mut s = [0u8; 32];
                        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                            .map_err(|_| AgentError::Job("the random generator failed".into()))?;
                        fc_files::write_atomically(&seed_path, &s)?;
                        fc_files::restrict(&seed_path, 0o600)?;
                        s
                    }
                };
                let share = if job.secure_aggregation {
                    (state.participants.len().max(1) as f64).sqrt()
                } else {
                    1.0
                };
                Some(NoisePlan {
                    seed,
                    sigma_units: p.noise_multiplier * p.clip_norm * job.scale() / share,
                })
            }
            None => None,
        };
        let me = self.session.settings.site.clone();
        let mut salt = b"fedcurate training round v1".to_vec();
        salt.extend_from_slice(&hash.0);
        salt.extend_from_slice(&round.to_be_bytes());
        salt.extend_from_slice(&state.attempt.to_be_bytes());
        let (job2, state2) = (job.clone(), state.clone());
        let seeds2 = seeds.map(<[PairSeed]>::to_vec);
        let t0 = std::time::Instant::now();
        let global = std::fs::read(model_path(dir, state.revision))?;
        let bytes = std::fs::read(&upath)?;
        let enc = tokio::task::spawn_blocking(move || {
            let layout: Layout = job2.layout();
            let start = layout
                .check_file(&global)
                .map_err(|e| AgentError::Job(e.to_string()))?;
            let u = Update {
                bytes: &bytes,
                kind: meta.kind,
                samples: meta.samples,
                norm: meta.norm,
            };
            let plan = seeds2.as_deref().map(|s| MaskPlan {
                me: &me,
                seeds: s,
                participants: &state2.participants,
                salt,
            });
            encode::encode(
                &job2,
                &layout,
                &global[start..],
                &u,
                round,
                noise.as_ref(),
                plan.as_ref(),
            )
            .map_err(|e| AgentError::Job(format!("the update of round {round}: {e}")))
        })
        .await
        .map_err(|e| AgentError::Job(e.to_string()))??;
        let encoded_ms = t0.elapsed().as_millis() as u64;
        let mut id_parts: Vec<&[u8]> = vec![b"offer", &hash.0];
        let rb = round.to_be_bytes();
        let ab = state.attempt.to_be_bytes();
        id_parts.push(&rb);
        id_parts.push(&ab);
        for h in &enc.hashes {
            id_parts.push(h);
        }
        let offer = Message::UpdateOffer(Box::new(UpdateOffer {
            id: derived_id(&id_parts),
            job: *hash,
            round,
            attempt: state.attempt,
            chunks: enc.hashes.clone(),
            metrics: meta.metrics.clone(),
            noised: job.privacy.is_some(),
        }));
        let held = match self.send(link, &offer).await? {
            Message::RoundState(s) => s.have,
            Message::Error {
                code:
                    ErrorCode::Training(TrainingError::WrongRound | TrainingError::AlreadyComplete),
                ..
            } => return Ok(()),
            Message::Error { code, .. } => return Err(AgentError::Refused(code)),
            _ => return Err(AgentError::Unexpected),
        };
        let n = enc.hashes.len();
        let missing: Vec<usize> = (0..n).filter(|i| !held.contains(&(*i as u32))).collect();
        let skipped = (n - missing.len()) as u64;
        if skipped > 0 {
            tracing::info!(
                round,
                skipped,
                missing = missing.len(),
                "resuming an upload"
            );
        }
        let cw = job.chunk_words() as usize;
        self.session.log_egress_batch(
            &missing
                .iter()
                .map(|i| {
                    (
                        "put-chunk",
                        chunk_id(b"put", hash, round, state.attempt, *i as u32),
                        ((enc.words.len() - i * cw).min(cw) * 8) as u64,
                        enc.hashes[*i].iter().map(|b| format!("{b:02x}")).collect(),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        let words = &enc.words;
        let attempt = state.attempt;
        let sent = futures_util::stream::iter(missing.iter().copied())
            .map(|i| async move {
                let m = Message::PutChunk(Box::new(Chunk {
                    head: ChunkHead {
                        id: chunk_id(b"put", hash, round, attempt, i as u32),
                        job: *hash,
                        round,
                        attempt,
                        index: i as u32,
                    },
                    data: encode::chunk_bytes(words, cw, i),
                    digest: None,
                }));
                match link.request(&m).await {
                    Ok(Message::Ack { .. }) => Ok(true),
                    Ok(Message::Error {
                        code: ErrorCode::Training(TrainingError::WrongRound),
                        ..
                    }) => Ok(false),
                    Ok(Message::Error { code, .. }) => Err(AgentError::Refused(code)),
                    Ok(_) => Err(AgentError::Unexpected),
                    Err(e) => Err(AgentError::Transfer(e.to_string())),
                }
            })
            .buffer_unordered(self.settings.transfers_in_flight.max(1))
            .collect::<Vec<Result<bool, AgentError>>>()
            .await;
        let mut count = 0u64;
        let mut first_err = None;
        for r in sent {
            match r {
                Ok(true) => count += 1,
                Ok(false) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.shared.update(|s| {
            s.chunks_sent += count;
            s.chunks_skipped += skipped;
        });
        if let Some(e) = first_err {
            return Err(e);
        }
        tracing::info!(
            round,
            chunks = n,
            sent = count,
            norm = enc.norm,
            clipped = enc.clip_factor < 1.0,
            encoded_ms,
            sent_ms = t0.elapsed().as_millis() as u64 - encoded_ms,
            "update sent"
        );
        self.shared.update(|s| s.uploaded = round);
        Ok(())
    }
}

fn chunk_id(what: &[u8], hash: &JobHash, round: u32, attempt: u32, i: u32) -> protocol::MessageId {
    derived_id(&[
        what,
        &hash.0,
        &round.to_be_bytes(),
        &attempt.to_be_bytes(),
        &i.to_be_bytes(),
    ])
}
