//! Federated training at the coordinator: the published job, its rounds, and the streaming
//! aggregation of sites' updates.
//!
//! Updates arrive as content-hashed chunks of fixed-point words; each chunk is added into the
//! round's running sum as it arrives (the sum is the only per-parameter state held in memory:
//! 8 bytes a parameter, twice a float32 model, whatever the number of sites). Received chunks
//! are also written to the round's folder (through the operating system, no flush), so a
//! restarted coordinator rebuilds the sum and sites resend only what it lacks. When every
//! participant's update is complete the server step runs chunk by chunk over the model and the
//! optimiser state on disk, and the next revision of the global model is published.
//!
//! Under secure aggregation the words are masked pairwise by the sites; the sum is the same
//! (modulo 2^64) and so is the model, bit for bit. A secure round whose participant misses the
//! deadline restarts (a new attempt) without it, because its masks would not cancel.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protocol::secure::SignedKeys;
use protocol::training::{
    Chunk, ChunkHash, ChunkHead, JobDocument, JobHash, Layout, Method, Phase, RoundState,
    TrainingJob, UpdateOffer, from_fixed, sha256,
};
use protocol::{ErrorCode, Message, MessageId, SiteId, TrainingError};
use serde::{Deserialize, Serialize};

/// What went wrong with the training state on disk.
#[derive(Debug, thiserror::Error)]
pub enum TrainingStateError {
    #[error("training state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the initial model {0}")]
    Model(String),
    #[error("{0}")]
    Job(#[from] protocol::training::JobError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainingStateError + '_ {
    move |source| TrainingStateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One finished round, for the report and the figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub attempt: u32,
    pub sites: Vec<SiteId>,
    /// The summed weight (training samples, or sites under uniform weighting).
    pub weight: f64,
    /// Each site's metrics, in the job's order.
    pub metrics: BTreeMap<SiteId, Vec<f64>>,
    /// L2 norm of the averaged update.
    pub update_norm: f64,
    /// Seconds from the round's opening to its model.
    pub seconds: f64,
    pub noised: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    round: u32,
    attempt: u32,
    participants: Vec<SiteId>,
    joined: BTreeSet<SiteId>,
    /// Under secure aggregation: the sites whose keys the pairwise masks use.
    keyed: Vec<SiteId>,
    revision: u32,
    /// Chunk hashes of the global model at `revision`.
    model: Vec<ChunkHash>,
    opened_ms: i64,
    deadline: i64,
    /// When the first site joined (seconds since the epoch).
    #[serde(default)]
    first_join: i64,
    finished: bool,
    history: Vec<RoundRecord>,
    keys: BTreeMap<SiteId, SignedKeys>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Offer {
    chunks: Vec<ChunkHash>,
    metrics: Vec<f64>,
    noised: bool,
    #[serde(skip)]
    have: Vec<bool>,
}

impl Offer {
    fn complete(&self) -> bool {
        self.have.iter().all(|h| *h)
    }
}

/// The coordinator's side of one training job.
#[derive(Debug)]
pub struct Trainer {
    dir: PathBuf,
    doc: JobDocument,
    job: TrainingJob,
    layout: Layout,
    hash: JobHash,
    members: BTreeSet<SiteId>,
    st: State,
    offers: BTreeMap<SiteId, Offer>,
    sum: Vec<u64>,
    next_id: u64,
    /// Woken when the round, attempt or revision changes (long polls wait on it).
    notify: std::sync::Arc<tokio::sync::Notify>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Write a file whole: temporary, flush, rename.
fn put_durably(path: &Path, bytes: &[u8]) -> Result<(), TrainingStateError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Trainer {
    /// Open (or resume) the job in `state_dir/training/<id>-<hash>/`, starting from the initial
    /// model `initial` (a safetensors file whose layout the job names).
    pub fn open(
        state_dir: &Path,
        doc: JobDocument,
        initial: &[u8],
        members: impl IntoIterator<Item = SiteId>,
    ) -> Result<Self, TrainingStateError> {
        let job = doc.job()?;
        let layout = job.layout();
        let hash = doc.hash();
        let dir = state_dir
            .join("training")
            .join(format!("{}-{}", job.id, &hash.hex()[..12]));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let state_path = dir.join("state.json");
        let st: State = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| TrainingStateError::Io {
                path: state_path.clone(),
                source: std::io::Error::other(e),
            })?,
            Err(_) => {
                let start = layout
                    .check_file(initial)
                    .map_err(|e| TrainingStateError::Model(e.to_string()))?;
                let data = &initial[start..];
                if layout.values(data).any(|v| !v.is_finite()) {
                    return Err(TrainingStateError::Model(
                        "holds a value that is not finite".into(),
                    ));
                }
                let model_path = dir.join("model-0.bin");
                put_durably(&model_path, data)?;
                put_durably(&dir.join("job.toml"), doc.text().as_bytes())?;
                let st = State {
                    model: chunk_hashes(data, job.model_chunk_bytes() as usize),
                    ..State::default()
                };
                put_durably(
                    &state_path,
                    &serde_json::to_vec_pretty(&st).unwrap_or_default(),
                )?;
                st
            }
        };
        let mut t = Trainer {
            dir,
            layout,
            hash,
            members: members.into_iter().collect(),
            sum: Vec::new(),
            offers: BTreeMap::new(),
            st,
            doc,
            job,
            next_id: now_ms() as u64,
            notify: std::sync::Arc::new(tokio::sync::Notify::new()),
        };
        t.reload_round()?;
        Ok(t)
    }

    pub fn hash(&self) -> JobHash {
        self.hash
    }

    /// Woken whenever what a long poll compares changes.
    pub fn notifier(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.notify.clone()
    }

    /// (round, attempt, revision): what a long poll compares.
    pub fn position(&self) -> [u32; 3] {
        [self.st.round, self.st.attempt, self.st.revision]
    }

    pub fn job(&self) -> &TrainingJob {
        &self.job
    }

    pub fn revision(&self) -> u32 {
        self.st.revision
    }

    pub fn round(&self) -> u32 {
        self.st.round
    }

    pub fn finished(&self) -> bool {
        self.st.finished
    }

    pub fn history(&self) -> &[RoundRecord] {
        &self.st.history
    }

    /// The global model at `revision` as a safetensors file.
    pub fn model_file(&self, revision: u32) -> Result<Vec<u8>, TrainingStateError> {
        let p = self.model_path(revision);
        let data = std::fs::read(&p).map_err(io(&p))?;
        let mut out = self.layout.safetensors_header();
        out.extend_from_slice(&data);
        Ok(out)
    }

    fn model_path(&self, revision: u32) -> PathBuf {
        self.dir.join(format!("model-{revision}.bin"))
    }

    fn server_path(&self, revision: u32) -> PathBuf {
        self.dir.join(format!("server-{revision}.bin"))
    }

    fn round_dir(&self) -> PathBuf {
        self.dir
            .join(format!("round-{}-{}", self.st.round, self.st.attempt))
    }

    fn save(&self) -> Result<(), TrainingStateError> {
        put_durably(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(&self.st).unwrap_or_default(),
        )
    }

    fn id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId(self.next_id)
    }

    fn error(&mut self, reply_to: MessageId, e: TrainingError) -> Vec<Message> {
        vec![Message::Error {
            id: self.id(),
            reply_to: Some(reply_to),
            code: ErrorCode::Training(e),
        }]
    }

    fn ack(&mut self, reply_to: MessageId, duplicate: bool) -> Vec<Message> {
        vec![Message::Ack {
            id: self.id(),
            reply_to,
            duplicate,
        }]
    }

    /// Rebuild the round's offers and running sum from its folder (after a restart).
    fn reload_round(&mut self) -> Result<(), TrainingStateError> {
        self.sum = Vec::new();
        self.offers.clear();
        if self.st.round == 0 || self.st.finished {
            return Ok(());
        }
        self.sum = vec![0u64; self.job.vector_words() as usize];
        let dir = self.round_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut resumed = 0usize;
        for e in entries.flatten() {
            let Some(site) = e.file_name().to_str().and_then(|s| SiteId::new(s).ok()) else {
                continue;
            };
            let Ok(b) = std::fs::read(e.path().join("offer.json")) else {
                continue;
            };
            let Ok(mut offer) = serde_json::from_slice::<Offer>(&b) else {
                continue;
            };
            offer.have = vec![false; offer.chunks.len()];
            for i in 0..offer.chunks.len() {
                let p = e.path().join(format!("{i}.chunk"));
                if let Ok(data) = std::fs::read(&p)
                    && sha256(&data) == offer.chunks[i]
                {
                    add_words(
                        &mut self.sum,
                        i as u64 * self.job.chunk_words(),
                        &data,
                        true,
                    );
                    offer.have[i] = true;
                    resumed += 1;
                }
            }
            self.offers.insert(site, offer);
        }
        tracing::info!(
            round = self.st.round,
            chunks = resumed,
            "resumed the training round from its received chunks"
        );
        Ok(())
    }

    /// What `site` sees of the job.
    pub fn state_for(&mut self, site: &SiteId, reply_to: MessageId) -> RoundState {
        let have = self
            .offers
            .get(site)
            .map(|o| {
                o.have
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| **h)
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .unwrap_or_default();
        RoundState {
            id: self.id(),
            reply_to,
            job: self.hash,
            phase: if self.st.finished {
                Phase::Finished
            } else if self.st.round == 0 {
                Phase::Joining
            } else {
                Phase::Collecting
            },
            round: self.st.round,
            attempt: self.st.attempt,
            participants: self.st.participants.clone(),
            joined: self.st.joined.iter().cloned().collect(),
            keyed: self.st.keyed.clone(),
            revision: self.st.revision,
            model: self.st.model.clone(),
            have,
            complete: self
                .offers
                .iter()
                .filter(|(_, o)| o.complete())
                .map(|(s, _)| s.clone())
                .collect(),
        }
    }

    fn state_message(&mut self, site: &SiteId, reply_to: MessageId) -> Vec<Message> {
        vec![Message::RoundState(Box::new(
            self.state_for(site, reply_to),
        ))]
    }

    /// Handle a training message from `site` (already welcomed). `crl` is the consortium's
    /// revocation list, relayed with peer keys.
    pub fn handle(
        &mut self,
        site: &SiteId,
        message: Message,
        now: i64,
        crl: &[u8],
    ) -> Result<Vec<Message>, TrainingStateError> {
        self.tick(now)?;
        let member = self.members.contains(site);
        Ok(match message {
            Message::FetchJob { id } => {
                let state = self.state_for(site, id);
                vec![Message::Job(Box::new(protocol::message::JobOffer {
                    id: self.id(),
                    reply_to: id,
                    document: self.doc.clone(),
                    state,
                }))]
            }
            Message::JoinTraining { id, job } | Message::TrainStatus { id, job, .. }
                if job != self.hash =>
            {
                self.error(id, TrainingError::UnknownJob)
            }
            Message::JoinTraining { id, .. } => {
                if !member {
                    return Ok(self.error(id, TrainingError::NotAParticipant));
                }
                if self.st.joined.insert(site.clone()) {
                    if self.st.joined.len() == 1 {
                        self.st.first_join = now;
                    }
                    tracing::info!(%site, job = %self.job.id, "site joined the training job");
                    self.maybe_open(now)?;
                    self.save()?;
                }
                self.state_message(site, id)
            }
            Message::TrainStatus { id, .. } => self.state_message(site, id),
            Message::TrainKeys(k) => {
                let id = k.id;
                if k.schema.0 != self.hash.0 || k.round != 0 || k.session != 1 {
                    return Ok(self.error(id, TrainingError::UnknownJob));
                }
                if !self.st.keyed.contains(site) {
                    return Ok(self.error(id, TrainingError::NotAParticipant));
                }
                let signed = SignedKeys {
                    site: site.clone(),
                    certificate: k.certificate,
                    keys: k.keys,
                    signature: k.signature,
                };
                let dup = self.st.keys.get(site) == Some(&signed);
                let complete = self.st.keyed.iter().all(|s| self.st.keys.contains_key(s));
                if complete && !dup {
                    // Other sites may have derived their masks from the set already: a key
                    // changed now would leave masks that do not cancel.
                    tracing::warn!(%site, "a site sent new training keys after the key set was complete: refused");
                    return Ok(self.error(id, TrainingError::BadOffer));
                }
                self.st.keys.insert(site.clone(), signed);
                self.save()?;
                self.ack(id, dup)
            }
            Message::FetchTrainKeys { id, job, epoch } => {
                if job != self.hash || epoch != 1 {
                    return Ok(self.error(id, TrainingError::UnknownJob));
                }
                if self.st.keyed.is_empty()
                    || !self.st.keyed.iter().all(|s| self.st.keys.contains_key(s))
                {
                    return Ok(vec![Message::Error {
                        id: self.id(),
                        reply_to: Some(id),
                        code: ErrorCode::NotReady,
                    }]);
                }
                vec![Message::PeerKeys(Box::new(protocol::PeerKeys {
                    id: self.id(),
                    reply_to: id,
                    session: epoch,
                    signed: self.st.keys.values().cloned().collect(),
                    crl: crl.to_vec(),
                }))]
            }
            Message::UpdateOffer(o) => self.offer(site, *o)?,
            Message::PutChunk(c) => self.put_chunk(site, *c, now)?,
            Message::GetChunk(h) => self.get_chunk(h)?,
            other => {
                let id = other.id();
                vec![Message::Error {
                    id: self.id(),
                    reply_to: Some(id),
                    code: ErrorCode::Unexpected,
                }]
            }
        })
    }

    /// The first round opens once every member joined, or once `min_sites` did and a tenth
    /// of the round deadline passed since the first.
    fn maybe_open(&mut self, now: i64) -> Result<(), TrainingStateError> {
        let all = self.st.joined.len() >= self.members.len();
        let enough = self.st.joined.len() >= self.job.min_sites as usize
            && now >= self.st.first_join + (self.job.round_deadline_seconds / 10) as i64;
        if self.st.round == 0 && (all || enough) {
            self.st.round = 1;
            self.st.attempt = 0;
            self.st.participants = self.st.joined.iter().cloned().collect();
            if self.job.secure_aggregation {
                self.st.keyed = self.st.participants.clone();
            }
            self.open_round(now);
        }
        Ok(())
    }

    fn open_round(&mut self, now: i64) {
        self.notify.notify_waiters();
        self.st.opened_ms = now_ms();
        self.st.deadline = now + self.job.round_deadline_seconds as i64;
        self.sum = vec![0u64; self.job.vector_words() as usize];
        self.offers.clear();
        tracing::info!(
            job = %self.job.id,
            round = self.st.round,
            attempt = self.st.attempt,
            sites = self.st.participants.len(),
            "training round open"
        );
    }

    fn offer(&mut self, site: &SiteId, o: UpdateOffer) -> Result<Vec<Message>, TrainingStateError> {
        let id = o.id;
        if o.job != self.hash {
            return Ok(self.error(id, TrainingError::UnknownJob));
        }
        if !self.st.participants.contains(site) {
            return Ok(self.error(id, TrainingError::NotAParticipant));
        }
        if o.round != self.st.round || o.attempt != self.st.attempt || self.st.finished {
            return Ok(self.error(id, TrainingError::WrongRound));
        }
        if o.chunks.len() != self.job.update_chunks() as usize
            || o.metrics.len() != self.job.metrics.len()
            || o.metrics.iter().any(|m| !m.is_finite())
            || o.noised != self.job.privacy.is_some()
        {
            return Ok(self.error(id, TrainingError::BadOffer));
        }
        if let Some(old) = self.offers.get(site) {
            if old.chunks == o.chunks {
                return Ok(self.state_message(site, id));
            }
            if old.complete() {
                return Ok(self.error(id, TrainingError::AlreadyComplete));
            }
            // A different update replaces an incomplete one: take its chunks out of the sum.
            self.withdraw(site)?;
        }
        let offer = Offer {
            have: vec![false; o.chunks.len()],
            chunks: o.chunks,
            metrics: o.metrics,
            noised: o.noised,
        };
        let dir = self.round_dir().join(site.as_str());
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let p = dir.join("offer.json");
        std::fs::write(&p, serde_json::to_vec(&offer).unwrap_or_default()).map_err(io(&p))?;
        self.offers.insert(site.clone(), offer);
        Ok(self.state_message(site, id))
    }

    /// Subtract a site's received chunks from the sum and forget its offer.
    fn withdraw(&mut self, site: &SiteId) -> Result<(), TrainingStateError> {
        let Some(offer) = self.offers.remove(site) else {
            return Ok(());
        };
        let dir = self.round_dir().join(site.as_str());
        for (i, h) in offer.have.iter().enumerate() {
            if *h {
                let p = dir.join(format!("{i}.chunk"));
                let data = std::fs::read(&p).map_err(io(&p))?;
                add_words(
                    &mut self.sum,
                    i as u64 * self.job.chunk_words(),
                    &data,
                    false,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn put_chunk(
        &mut self,
        site: &SiteId,
        c: Chunk,
        now: i64,
    ) -> Result<Vec<Message>, TrainingStateError> {
        let h = &c.head;
        let id = h.id;
        if h.job != self.hash {
            return Ok(self.error(id, TrainingError::UnknownJob));
        }
        if h.round != self.st.round || h.attempt != self.st.attempt || self.st.finished {
            return Ok(self.error(id, TrainingError::WrongRound));
        }
        let cw = self.job.chunk_words();
        let words = self.job.vector_words();
        let index = h.index as u64;
        let Some(offer) = self.offers.get(site) else {
            return Ok(self.error(id, TrainingError::NotAParticipant));
        };
        let expected_words = (words - (index * cw).min(words)).min(cw);
        if index >= offer.chunks.len() as u64
            || c.data.len() as u64 != expected_words * 8
            || c.digest.unwrap_or_else(|| sha256(&c.data)) != offer.chunks[index as usize]
        {
            return Ok(self.error(id, TrainingError::BadChunk));
        }
        if offer.have[index as usize] {
            return Ok(self.ack(id, true));
        }
        let p = self
            .round_dir()
            .join(site.as_str())
            .join(format!("{index}.chunk"));
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, &c.data).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
        add_words(&mut self.sum, index * cw, &c.data, true);
        if let Some(o) = self.offers.get_mut(site) {
            o.have[index as usize] = true;
        }
        let ack = self.ack(id, false);
        if self
            .st
            .participants
            .iter()
            .all(|s| self.offers.get(s).is_some_and(Offer::complete))
        {
            self.finish_round(now)?;
        }
        Ok(ack)
    }

    fn get_chunk(&mut self, h: ChunkHead) -> Result<Vec<Message>, TrainingStateError> {
        let id = h.id;
        if h.job != self.hash {
            return Ok(self.error(id, TrainingError::UnknownJob));
        }
        if h.round != self.st.revision && h.round + 1 != self.st.revision {
            return Ok(self.error(id, TrainingError::WrongRound));
        }
        let p = self.model_path(h.round);
        let size = self.job.model_chunk_bytes();
        let len = self.layout.data_len();
        let start = u64::from(h.index) * size;
        if start >= len {
            return Ok(self.error(id, TrainingError::BadChunk));
        }
        let n = size.min(len - start) as usize;
        let mut f = std::fs::File::open(&p).map_err(io(&p))?;
        f.seek(SeekFrom::Start(start)).map_err(io(&p))?;
        let mut data = vec![0u8; n];
        f.read_exact(&mut data).map_err(io(&p))?;
        Ok(vec![Message::ModelChunk(Box::new(Chunk {
            head: ChunkHead {
                id: self.id(),
                job: self.hash,
                round: h.round,
                attempt: 0,
                index: h.index,
            },
            data,
            digest: None,
        }))])
    }

    /// Deadlines: a plain round past its deadline completes with the sites whose updates are
    /// complete (if at least `min_sites`); a secure one restarts with them.
    pub fn tick(&mut self, now: i64) -> Result<(), TrainingStateError> {
        if self.st.round == 0 && !self.st.joined.is_empty() {
            self.maybe_open(now)?;
            if self.st.round > 0 {
                self.save()?;
            }
            return Ok(());
        }
        if self.st.round == 0 || self.st.finished || now <= self.st.deadline {
            return Ok(());
        }
        let complete: Vec<SiteId> = self
            .st
            .participants
            .iter()
            .filter(|s| self.offers.get(*s).is_some_and(Offer::complete))
            .cloned()
            .collect();
        if complete.len() < self.job.min_sites as usize {
            tracing::warn!(
                job = %self.job.id,
                round = self.st.round,
                complete = complete.len(),
                needed = self.job.min_sites,
                "the round's deadline passed with too few complete updates: waiting on"
            );
            self.st.deadline = now + self.job.round_deadline_seconds as i64;
            return self.save();
        }
        let late: Vec<SiteId> = self
            .st
            .participants
            .iter()
            .filter(|s| !complete.contains(s))
            .cloned()
            .collect();
        tracing::warn!(job = %self.job.id, round = self.st.round, late = ?late, "sites missed the round's deadline");
        if self.job.secure_aggregation {
            let old = self.round_dir();
            self.st.attempt += 1;
            self.st.participants = complete;
            self.open_round(now);
            let _ = std::fs::remove_dir_all(old);
            self.save()
        } else {
            for s in &late {
                self.withdraw(s)?;
            }
            self.st.participants = complete;
            self.finish_round(now)
        }
    }

    /// Every participant's update is in: average, take the server step chunk by chunk, and
    /// publish the next revision.
    fn finish_round(&mut self, now: i64) -> Result<(), TrainingStateError> {
        let t0 = std::time::Instant::now();
        let scale = self.job.scale();
        let params = self.layout.params();
        let weight = from_fixed(self.sum[params as usize], scale);
        if weight <= 0.0 {
            tracing::error!(
                round = self.st.round,
                "the round's total weight is not positive: waiting on"
            );
            return Ok(());
        }
        let r = self.job.aggregator.resolved();
        let sw = self.job.aggregator.state_words();
        let esize = self.layout.tensors[0].dtype().map_or(4, |d| d.size());
        let chunk_bytes = self.job.model_chunk_bytes() as usize;
        let per_chunk = chunk_bytes / esize;
        let rev = self.st.revision;
        let old_model = self.model_path(rev);
        let new_model = self.model_path(rev + 1);
        let old_server = self.server_path(rev);
        let new_server = self.server_path(rev + 1);
        let mut min = std::fs::File::open(&old_model).map_err(io(&old_model))?;
        let tmp_model = new_model.with_extension("tmp");
        let mut mout =
            std::io::BufWriter::new(std::fs::File::create(&tmp_model).map_err(io(&tmp_model))?);
        let mut sin = if sw > 0 {
            std::fs::File::open(&old_server).ok()
        } else {
            None
        };
        let tmp_server = new_server.with_extension("tmp");
        let mut sout = if sw > 0 {
            Some(std::io::BufWriter::new(
                std::fs::File::create(&tmp_server).map_err(io(&tmp_server))?,
            ))
        } else {
            None
        };
        let mut hashes = Vec::new();
        let mut norm2 = 0.0f64;
        let mut p0 = 0u64;
        let mut buf = vec![0u8; chunk_bytes];
        let mut sbuf = Vec::new();
        while p0 < params {
            let n = (per_chunk as u64).min(params - p0) as usize;
            let bytes = &mut buf[..n * esize];
            min.read_exact(bytes).map_err(io(&old_model))?;
            sbuf.clear();
            sbuf.resize(n * sw * 8, 0);
            let fresh = match &mut sin {
                Some(f) => f.read_exact(&mut sbuf).is_err(),
                None => true,
            };
            if fresh && sw == 2 {
                // v starts at τ² (Reddi et al.: v₋₁ ≥ τ²), m at 0.
                for j in 0..n {
                    sbuf[(j * 2 + 1) * 8..(j * 2 + 2) * 8]
                        .copy_from_slice(&(r.tau * r.tau).to_le_bytes());
                }
            }
            for j in 0..n {
                let d = from_fixed(self.sum[(p0 as usize) + j], scale) / weight;
                norm2 += d * d;
                let x = read_elem(bytes, j, esize);
                let mut st = [0f64; 2];
                for (k, s) in st.iter_mut().enumerate().take(sw) {
                    let o = (j * sw + k) * 8;
                    *s = f64::from_le_bytes(sbuf[o..o + 8].try_into().unwrap_or([0; 8]));
                }
                let x = match r.method {
                    Method::FedAvg => x + r.eta * d,
                    Method::FedAvgM => {
                        st[0] = r.momentum * st[0] + d;
                        x + r.eta * st[0]
                    }
                    Method::FedAdagrad | Method::FedAdam | Method::FedYogi => {
                        st[0] = r.beta1 * st[0] + (1.0 - r.beta1) * d;
                        let d2 = d * d;
                        st[1] = match r.method {
                            Method::FedAdagrad => st[1] + d2,
                            Method::FedAdam => r.beta2 * st[1] + (1.0 - r.beta2) * d2,
                            _ => st[1] - (1.0 - r.beta2) * d2 * (st[1] - d2).signum(),
                        };
                        x + r.eta * st[0] / (st[1].max(0.0).sqrt() + r.tau)
                    }
                };
                write_elem(bytes, j, esize, x);
                for (k, s) in st.iter().enumerate().take(sw) {
                    let o = (j * sw + k) * 8;
                    sbuf[o..o + 8].copy_from_slice(&s.to_le_bytes());
                }
            }
            hashes.push(sha256(bytes));
            mout.write_all(bytes).map_err(io(&tmp_model))?;
            if let Some(s) = &mut sout {
                s.write_all(&sbuf).map_err(io(&tmp_server))?;
            }
            p0 += n as u64;
        }
        let finish = |w: std::io::BufWriter<std::fs::File>, tmp: &Path, path: &Path| {
            let f = w.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
            f.sync_all().map_err(io(tmp))?;
            std::fs::rename(tmp, path).map_err(io(path))
        };
        finish(mout, &tmp_model, &new_model)?;
        if let Some(s) = sout {
            finish(s, &tmp_server, &new_server)?;
        }
        let record = RoundRecord {
            round: self.st.round,
            attempt: self.st.attempt,
            sites: self.st.participants.clone(),
            weight,
            metrics: self
                .st
                .participants
                .iter()
                .filter_map(|s| Some((s.clone(), self.offers.get(s)?.metrics.clone())))
                .collect(),
            update_norm: norm2.sqrt(),
            seconds: (now_ms() - self.st.opened_ms) as f64 / 1000.0,
            noised: self.job.privacy.is_some(),
        };
        tracing::info!(
            job = %self.job.id,
            round = record.round,
            sites = record.sites.len(),
            seconds = record.seconds,
            update_norm = record.update_norm,
            step_ms = t0.elapsed().as_millis() as u64,
            "training round aggregated: global model revision {}",
            rev + 1
        );
        let old_round = self.round_dir();
        self.st.history.push(record);
        self.st.revision = rev + 1;
        self.st.model = hashes;
        if self.st.round >= self.job.rounds {
            self.st.finished = true;
            self.sum = Vec::new();
            self.offers.clear();
        } else {
            self.st.round += 1;
            self.st.attempt = 0;
            let joined = self.st.joined.iter().cloned();
            self.st.participants = if self.job.secure_aggregation {
                joined.filter(|s| self.st.keyed.contains(s)).collect()
            } else {
                joined.collect()
            };
            self.open_round(now);
        }
        self.save()?;
        self.notify.notify_waiters();
        let _ = std::fs::remove_dir_all(old_round);
        // Keep the last two revisions (a lagging site may still be downloading the earlier).
        if rev >= 1 {
            let _ = std::fs::remove_file(self.model_path(rev - 1));
            let _ = std::fs::remove_file(self.server_path(rev - 1));
        }
        let _ = std::fs::remove_file(self.server_path(rev));
        Ok(())
    }
}

/// The job document from the consortium's job file and the initial model: the file's
/// settings, with the layout read from the model's safetensors header when the file does not
/// give one (and checked against the model when it does).
pub fn job_document(job_text: &str, initial: &[u8]) -> Result<JobDocument, TrainingStateError> {
    let (layout, _) =
        Layout::from_safetensors(initial).map_err(|e| TrainingStateError::Model(e.to_string()))?;
    let mut table: toml::Table = toml::from_str(job_text)
        .map_err(|e| protocol::training::JobError(format!("does not parse: {e}")))?;
    if !table.contains_key("layout") {
        let tensors = toml::Value::try_from(&layout.tensors)
            .map_err(|e| TrainingStateError::Model(e.to_string()))?;
        table.insert("layout".into(), tensors);
    }
    let text = toml::to_string(&table).map_err(|e| protocol::training::JobError(e.to_string()))?;
    let doc = JobDocument::new(&text)?;
    if doc.job()?.layout() != layout {
        return Err(TrainingStateError::Model(
            "differs from the layout the job file gives".into(),
        ));
    }
    Ok(doc)
}

fn read_elem(bytes: &[u8], j: usize, esize: usize) -> f64 {
    if esize == 8 {
        f64::from_le_bytes(bytes[j * 8..j * 8 + 8].try_into().unwrap_or([0; 8]))
    } else {
        f32::from_le_bytes(bytes[j * 4..j * 4 + 4].try_into().unwrap_or([0; 4])) as f64
    }
}

fn write_elem(bytes: &mut [u8], j: usize, esize: usize, x: f64) {
    if esize == 8 {
        bytes[j * 8..j * 8 + 8].copy_from_slice(&x.to_le_bytes());
    } else {
        bytes[j * 4..j * 4 + 4].copy_from_slice(&(x as f32).to_le_bytes());
    }
}

/// Add (or subtract) little-endian words into the sum from word `at`.
fn add_words(sum: &mut [u64], at: u64, data: &[u8], add: bool) {
    let at = (at as usize).min(sum.len());
    for (s, c) in sum[at..].iter_mut().zip(data.chunks_exact(8)) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        *s = if add {
            s.wrapping_add(w)
        } else {
            s.wrapping_sub(w)
        };
    }
}

/// SHA-256 of each `size`-byte chunk of `data`.
pub fn chunk_hashes(data: &[u8], size: usize) -> Vec<ChunkHash> {
    if data.is_empty() {
        return vec![sha256(&[])];
    }
    data.chunks(size).map(sha256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::training::to_fixed;

    const N: usize = 6;

    fn job(method: &str, extra: &str) -> (JobDocument, Vec<u8>) {
        let layout = Layout {
            tensors: vec![protocol::training::TensorSpec {
                name: "w".into(),
                dtype: "F32".into(),
                shape: vec![N as u64],
            }],
        };
        let mut init = layout.safetensors_header();
        for i in 0..N {
            init.extend_from_slice(&(i as f32 * 0.5).to_le_bytes());
        }
        let text = format!(
            "id = \"t\"\nrounds = 3\nmin_sites = 2\nmax_update_norm = 100.0\nmax_samples = 1000\nchunk_mib = 1\n{extra}\n[aggregator]\nmethod = \"{method}\"\n"
        );
        (job_document(&text, &init).expect("job"), init)
    }

    fn sites() -> Vec<SiteId> {
        ["a", "b", "c"]
            .iter()
            .map(|s| SiteId::new(s).expect("id"))
            .collect()
    }

    /// A site's update (the change `d`, weighted by `w`) as the node encodes it.
    fn words(t: &Trainer, d: &[f64], w: f64) -> Vec<u8> {
        let scale = t.job.scale();
        let mut v: Vec<u64> = d.iter().map(|x| to_fixed(x * w, scale, 0.5)).collect();
        v.push(to_fixed(w, scale, 0.0));
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn send(t: &mut Trainer, s: &SiteId, data: Vec<u8>, now: i64) -> Vec<Message> {
        let (round, attempt) = (t.st.round, t.st.attempt);
        let offer = UpdateOffer {
            id: MessageId(1),
            job: t.hash,
            round,
            attempt,
            chunks: vec![sha256(&data)],
            metrics: vec![],
            noised: false,
        };
        let r = t
            .handle(s, Message::UpdateOffer(Box::new(offer)), now, &[])
            .expect("offer");
        assert!(matches!(r[0], Message::RoundState(_)), "{r:?}");
        t.handle(
            s,
            Message::PutChunk(Box::new(Chunk {
                head: ChunkHead {
                    id: MessageId(2),
                    job: t.hash,
                    round,
                    attempt,
                    index: 0,
                },
                data,
                digest: None,
            })),
            now,
            &[],
        )
        .expect("chunk")
    }

    fn model(t: &Trainer) -> Vec<f64> {
        let f = t.model_file(t.revision()).expect("model");
        let (layout, start) = Layout::from_safetensors(&f).expect("layout");
        layout.values(&f[start..]).collect()
    }

    fn open(method: &str, extra: &str, dir: &Path) -> Trainer {
        let (doc, init) = job(method, extra);
        let mut t = Trainer::open(dir, doc, &init, sites()).expect("open");
        for s in sites() {
            let hash = t.hash;
            t.handle(
                &s,
                Message::JoinTraining {
                    id: MessageId(0),
                    job: hash,
                },
                0,
                &[],
            )
            .expect("join");
        }
        assert_eq!(t.round(), 1);
        t
    }

    #[test]
    fn fedavg_weights_by_samples_and_fedadam_keeps_its_moments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = open("fedavg", "", &dir.path().join("avg"));
        let d: Vec<Vec<f64>> = (0..3)
            .map(|k| (0..N).map(|i| (i as f64 - k as f64) * 0.01).collect())
            .collect();
        let w = [10.0, 20.0, 30.0];
        let before = model(&t);
        for (k, s) in sites().iter().enumerate() {
            let data = words(&t, &d[k], w[k]);
            send(&mut t, s, data, 0);
        }
        assert_eq!(t.revision(), 1, "the round completed with the last chunk");
        let after = model(&t);
        for i in 0..N {
            let avg = (0..3).map(|k| w[k] * d[k][i]).sum::<f64>() / 60.0;
            assert!((after[i] - (before[i] + avg)).abs() < 1e-6, "{i}");
        }
        assert_eq!(t.history()[0].weight, 60.0);

        // FedAdam over two rounds: m and v carried from the first to the second.
        let mut t = open("fedadam", "", &dir.path().join("adam"));
        let x0 = model(&t);
        let (eta, b1, b2, tau) = (0.01, 0.9, 0.99, 1e-3);
        let (mut m, mut v) = (vec![0.0; N], vec![tau * tau; N]);
        let mut x = x0.clone();
        for round in 0..2 {
            for (k, s) in sites().iter().enumerate() {
                let data = words(&t, &d[k], w[k]);
                send(&mut t, s, data, 0);
            }
            for i in 0..N {
                let g = (0..3).map(|k| w[k] * d[k][i]).sum::<f64>() / 60.0;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                x[i] += eta * m[i] / (v[i].sqrt() + tau);
                x[i] = x[i] as f32 as f64;
            }
            assert_eq!(t.revision(), round + 1);
        }
        let got = model(&t);
        for i in 0..N {
            assert!((got[i] - x[i]).abs() < 1e-5, "{i}: {} vs {}", got[i], x[i]);
        }
    }

    #[test]
    fn a_plain_round_past_its_deadline_averages_the_sites_that_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = open("fedavg", "round_deadline_seconds = 10", dir.path());
        let s = sites();
        let d = vec![0.1; N];
        let data = words(&t, &d, 1.0);
        send(&mut t, &s[0], data, 0);
        let data = words(&t, &d, 3.0);
        send(&mut t, &s[1], data, 0);
        // Site c offers but sends half of nothing: its offer is withdrawn at the deadline.
        let before = model(&t);
        t.tick(5).expect("tick");
        assert_eq!(t.revision(), 0, "not yet past the deadline");
        t.tick(11).expect("tick");
        assert_eq!(t.revision(), 1);
        assert_eq!(t.history()[0].sites, s[..2].to_vec());
        let after = model(&t);
        assert!((after[0] - before[0] - 0.1).abs() < 1e-6);
        // A chunk that does not match its offered hash is refused.
        let data = words(&t, &d, 1.0);
        let mut bad = data.clone();
        bad[0] ^= 1;
        let offer = UpdateOffer {
            id: MessageId(1),
            job: t.hash,
            round: 2,
            attempt: 0,
            chunks: vec![sha256(&data)],
            metrics: vec![],
            noised: false,
        };
        t.handle(&s[0], Message::UpdateOffer(Box::new(offer)), 12, &[])
            .expect("offer");
        let r = t
            .handle(
                &s[0],
                Message::PutChunk(Box::new(Chunk {
                    head: ChunkHead {
                        id: MessageId(2),
                        job: t.hash,
                        round: 2,
                        attempt: 0,
                        index: 0,
                    },
                    data: bad,
                    digest: None,
                })),
                12,
                &[],
            )
            .expect("chunk");
        assert!(matches!(
            r[0],
            Message::Error {
                code: ErrorCode::Training(TrainingError::BadChunk),
                ..
            }
        ));
        // A restarted coordinator rebuilds the round from what it had received.
        drop(t);
        let (doc, init) = job("fedavg", "round_deadline_seconds = 10");
        let t = Trainer::open(dir.path(), doc, &init, sites()).expect("reopen");
        assert_eq!((t.round(), t.revision()), (2, 1));
    }
}
