//! The coordinator's logic, sans IO: admits sites (through the [`Registry`]), publishes the
//! schema, records acknowledgements and conformance, checks and stores aggregate reports,
//! fits the federated harmonisation model when enough sites have reported, and answers model
//! requests. Every request carries an id; a retried request is answered without being
//! applied twice. State lives in the [`Store`], so a restarted coordinator resumes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use protocol::aggregate::{
    ConformanceSummary, PrivacyViolation, SiteAggregates, check_aggregates, check_cells,
};
use protocol::schema::CurationSchema;
use protocol::{
    AggregateReport, ErrorCode, FederatedFit, Message, MessageId, ModelPublication, SchemaAck,
    SchemaDocument, SchemaHash, SiteId,
};

use crate::store::{ModelRecord, Store, StoreError, hash_hex};
use crate::{Action, Registry};

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Which fit the schema's harmonisation recipe asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FitKind {
    Nyul,
    Ct,
}

fn fit_kind(schema: &CurationSchema) -> Option<FitKind> {
    match schema.harmonisation.as_ref()?.method.as_str() {
        "nyul" => Some(FitKind::Nyul),
        "ct-nnunet" => Some(FitKind::Ct),
        _ => None,
    }
}

/// Does a report have the shape the schema asks for?
pub fn check_shape(schema: &CurationSchema, a: &SiteAggregates) -> Result<(), PrivacyViolation> {
    let st = &schema.statistics;
    let counts_ok = a.counts.len() == st.counts_by.len()
        && a.counts
            .iter()
            .zip(&st.counts_by)
            .all(|(t, v)| t.cells.len() == schema.count_table_len(v));
    let hist_ok = a.histograms.len() == st.histograms.len()
        && a.histograms
            .iter()
            .zip(&st.histograms)
            .all(|(h, spec)| h.len() == spec.edges.len() + 1);
    let moments_ok =
        a.moments.iter().map(|(q, _)| *q).collect::<Vec<_>>() == schema.moment_quantities();
    if counts_ok && hist_ok && moments_ok {
        Ok(())
    } else {
        Err(PrivacyViolation::Shape)
    }
}

fn check_conformance(
    schema: &CurationSchema,
    c: &ConformanceSummary,
    k: u64,
) -> Result<(), PrivacyViolation> {
    if c.deviations.len() != schema.data_of_interest.constraints.len() {
        return Err(PrivacyViolation::Shape);
    }
    check_cells(&c.status, k)?;
    let single = |cells: &[protocol::aggregate::Cell]| {
        if cells.iter().any(|x| protocol::aggregate::is_small(*x, k)) {
            Err(PrivacyViolation::SmallCell)
        } else {
            Ok(())
        }
    };
    single(&c.deviations)?;
    single(&c.findings)?;
    single(&[c.patients, c.quarantined])
}

/// The secure-aggregation session of the current round. The coordinator keeps the running
/// sum of masked vectors, never a site's vector on its own.
#[derive(Debug)]
struct SecureRound {
    schema: SchemaHash,
    round: u32,
    session: u32,
    participants: Vec<SiteId>,
    opened: i64,
    keys: BTreeMap<SiteId, protocol::secure::SignedKeys>,
    fetched: BTreeSet<SiteId>,
    submitted: BTreeMap<SiteId, MessageId>,
    sum: Vec<u64>,
    k: u32,
    noise: Option<protocol::aggregate::NoiseApplied>,
    complete: bool,
}

/// Fewest sites a published model may merge (with one, it is that site's summary; with two,
/// each site learns the other's).
pub const MODEL_MIN_SITES: usize = 3;

/// Fewest sites a secure session may sum (with two, each would learn the other's values).
pub const SECURE_MIN_SITES: usize = 3;

/// The coordinator.
#[derive(Debug)]
pub struct Hub {
    registry: Registry,
    store: Store,
    schema: Option<(SchemaDocument, CurationSchema)>,
    round: u32,
    members: BTreeSet<SiteId>,
    /// Reports needed before the model is fitted.
    min_sites: usize,
    next_id: u64,
    /// Every frame received, when tapped (audits and leak tests).
    tap: Option<Arc<Mutex<Vec<Vec<u8>>>>>,
    /// Frames handled so far (the report is rewritten when it changes).
    changes: u64,
    secure: Option<SecureRound>,
    /// Seconds a secure session may take before it is aborted and restarted without the
    /// sites that did not take their step.
    secure_timeout: i64,
    /// The consortium's revocation list (DER), relayed with peer keys.
    crl: Vec<u8>,
    /// The published training job, if any.
    training: Option<crate::training::Trainer>,
}

impl Hub {
    /// A coordinator for `members` publishing `schema`. The aggregation round is the stored
    /// one, or the next when the schema changed since the last run. The model is fitted once
    /// `min_sites` sites (default: all members) have reported.
    pub fn new(
        members: impl IntoIterator<Item = SiteId>,
        store: Store,
        schema: Option<SchemaDocument>,
        min_sites: Option<usize>,
    ) -> Result<Self, StoreError> {
        let members: BTreeSet<SiteId> = members.into_iter().collect();
        let stored_round: u32 = store
            .meta("round")?
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let parsed = match schema {
            Some(doc) => {
                let s = doc
                    .schema()
                    .map_err(|e| StoreError::Decode(e.to_string()))?;
                Some((doc, s))
            }
            None => None,
        };
        let hash = parsed.as_ref().map(|(d, _)| hash_hex(&d.hash()));
        let round = match (&hash, store.meta("schema")?) {
            (None, _) => stored_round,
            (Some(h), Some(prev)) if *h == prev && stored_round > 0 => stored_round,
            (Some(h), _) => {
                store.set_meta("schema", h)?;
                store.set_meta("round", &(stored_round + 1).to_string())?;
                stored_round + 1
            }
        };
        let next_id: u64 = store
            .meta("next_id")?
            .and_then(|r| r.parse().ok())
            .unwrap_or(1);
        let min_sites = min_sites.unwrap_or(members.len()).max(MODEL_MIN_SITES);
        let mut hub = Hub {
            registry: Registry::new(members.clone(), parsed.as_ref().map(|(d, _)| d.hash())),
            store,
            schema: parsed,
            round,
            members,
            min_sites,
            next_id: next_id + 1_000_000,
            tap: None,
            changes: 0,
            secure: None,
            secure_timeout: 120,
            crl: Vec::new(),
            training: None,
        };
        // Resume: a fit that became due while the coordinator was down (or under a new
        // `min_sites_for_model`) is made now.
        hub.maybe_fit(now_seconds())?;
        Ok(hub)
    }

    /// Publish a training job.
    pub fn set_training(&mut self, t: crate::training::Trainer) {
        self.training = Some(t);
    }

    pub fn training(&self) -> Option<&crate::training::Trainer> {
        self.training.as_ref()
    }

    /// For a long poll: the training job's position and what wakes its waiters.
    pub fn training_watch(&self) -> Option<([u32; 3], std::sync::Arc<tokio::sync::Notify>)> {
        self.training.as_ref().map(|t| (t.position(), t.notifier()))
    }

    /// Deadlines of the training round (called periodically).
    pub fn tick(&mut self, now: i64) {
        if let Some(t) = &mut self.training
            && let Err(e) = t.tick(now)
        {
            tracing::error!(error = %e, "training state");
        }
    }

    /// Keep a copy of every frame received (for audits and tests).
    pub fn tap(&mut self) -> Arc<Mutex<Vec<Vec<u8>>>> {
        let t = Arc::new(Mutex::new(Vec::new()));
        self.tap = Some(t.clone());
        t
    }

    /// The revocation list (DER) sites check each other's certificates against.
    pub fn set_crl(&mut self, der: Vec<u8>) {
        self.crl = der;
    }

    /// How long a secure session may wait for its sites before it is restarted without them.
    pub fn set_secure_timeout(&mut self, seconds: i64) {
        self.secure_timeout = seconds.max(1);
    }

    /// Frames handled so far.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn members(&self) -> &BTreeSet<SiteId> {
        &self.members
    }

    pub fn schema(&self) -> Option<&(SchemaDocument, CurationSchema)> {
        self.schema.as_ref()
    }

    /// Start the next aggregation round: sites report again (e.g. after new data arrived).
    pub fn next_round(&mut self) -> Result<u32, StoreError> {
        self.round += 1;
        self.store.set_meta("round", &self.round.to_string())?;
        Ok(self.round)
    }

    fn id(&mut self) -> MessageId {
        let id = MessageId(self.next_id);
        self.next_id += 1;
        if self.next_id.is_multiple_of(1000) {
            let _ = self.store.set_meta("next_id", &self.next_id.to_string());
        }
        id
    }

    fn error(&mut self, reply_to: Option<MessageId>, code: ErrorCode) -> Vec<Action> {
        let id = self.id();
        vec![Action::Reply(Message::Error { id, reply_to, code })]
    }

    fn ack(&mut self, reply_to: MessageId, duplicate: bool) -> Vec<Action> {
        let id = self.id();
        vec![Action::Reply(Message::Ack {
            id,
            reply_to,
            duplicate,
        })]
    }

    /// A frame from `peer` that did not decode: log it and answer with a typed error.
    pub fn bad_frame(&mut self, peer: &SiteId, frame: &[u8], now: i64) -> Vec<Action> {
        self.changes += 1;
        if let Some(t) = &self.tap
            && let Ok(mut t) = t.lock()
        {
            t.push(frame.to_vec());
        }
        if let Err(e) = self.store.log_received(
            now,
            Some(peer),
            protocol::codec::frame_kind(frame),
            frame,
            "bad-frame",
        ) {
            tracing::error!(error = %e, "could not log a received frame");
        }
        self.error(None, ErrorCode::BadFrame)
    }

    /// Handle a decoded frame from the connection authenticated as `peer`.
    pub fn handle_frame(
        &mut self,
        peer: &SiteId,
        frame: &[u8],
        message: Message,
        now: i64,
        welcomed: bool,
    ) -> Vec<Action> {
        if let Some(t) = &self.tap
            && let Ok(mut t) = t.lock()
        {
            t.push(frame.to_vec());
        }
        self.changes += 1;
        let kind = protocol::codec::frame_kind(frame);
        let chunk = matches!(message, Message::PutChunk(_));
        let actions = self.handle(peer, message, now, welcomed);
        if chunk {
            // Chunks are content-hashed and recorded by the training state; a log row each
            // would cost a database write per few MiB.
            return actions;
        }
        let outcome = match actions.first() {
            Some(Action::Reply(Message::Error { code, .. })) => format!("error {code:?}"),
            Some(Action::Reply(Message::Reject { reason, .. })) => format!("reject {reason:?}"),
            _ => "ok".to_owned(),
        };
        if let Err(e) = self
            .store
            .log_received(now, Some(peer), kind, frame, &outcome)
        {
            tracing::error!(error = %e, "could not log a received frame");
        }
        actions
    }

    /// A connection of `peer` was welcomed (the network edge calls this once per connection).
    pub fn connected(&mut self, peer: &SiteId) {
        self.registry.connected(peer);
    }

    /// Handle a message from `peer` at `now` (seconds since the epoch); `welcomed` says
    /// whether this connection has had its hello answered with a welcome.
    pub fn handle(
        &mut self,
        peer: &SiteId,
        message: Message,
        now: i64,
        welcomed: bool,
    ) -> Vec<Action> {
        if let Message::Hello(_) = message {
            let mut actions = self.registry.handle(peer, message, now.max(0) as u64);
            let model = self
                .store
                .latest_model()
                .ok()
                .flatten()
                .map_or(0, |m| m.revision);
            for a in &mut actions {
                if let Action::Reply(Message::Welcome(w)) = a {
                    w.round = self.round;
                    w.model = model;
                }
            }
            if let Err(e) = self.store.touch(peer, now) {
                tracing::error!(error = %e, "could not record contact");
            }
            return actions;
        }
        if !welcomed {
            return self.error(Some(message.id()), ErrorCode::NotWelcomed);
        }
        let result = match message {
            Message::FetchSchema { id } => Ok(self.fetch_schema(id)),
            Message::SchemaAck(a) => self.schema_ack(peer, *a, now),
            Message::Report(r) => self.report(peer, *r, now),
            Message::FetchModel { id, schema } => self.fetch_model(id, schema),
            Message::Refusal(r) => self.refusal(peer, r, now),
            Message::SecureJoin { id, schema, round } => {
                self.secure_join(peer, id, schema, round, now)
            }
            Message::SecureKeys(m) => self.secure_keys(peer, *m, now),
            Message::FetchPeerKeys {
                id,
                schema,
                round,
                session,
            } => Ok(self.fetch_peer_keys(peer, id, schema, round, session)),
            Message::MaskedReport(m) => self.masked_report(peer, *m, now),
            m @ (Message::FetchJob { .. }
            | Message::JoinTraining { .. }
            | Message::TrainStatus { .. }
            | Message::UpdateOffer(_)
            | Message::PutChunk(_)
            | Message::GetChunk(_)
            | Message::TrainKeys(_)
            | Message::FetchTrainKeys { .. }) => {
                let id = m.id();
                match &mut self.training {
                    None => Ok(self.error(
                        Some(id),
                        ErrorCode::Training(protocol::TrainingError::UnknownJob),
                    )),
                    Some(t) => match t.handle(peer, m, now, &self.crl) {
                        Ok(ms) => Ok(ms.into_iter().map(Action::Reply).collect()),
                        Err(e) => {
                            tracing::error!(error = %e, %peer, "training state error; the request was not applied");
                            Ok(self.error(Some(id), ErrorCode::NotReady))
                        }
                    },
                }
            }
            other => Ok(self.error(Some(other.id()), ErrorCode::Unexpected)),
        };
        result.unwrap_or_else(|e| {
            tracing::error!(error = %e, %peer, "state database error; the request was not applied");
            vec![Action::Close]
        })
    }

    fn fetch_schema(&mut self, reply_to: MessageId) -> Vec<Action> {
        match &self.schema {
            Some((doc, _)) => {
                let document = doc.clone();
                let id = self.id();
                vec![Action::Reply(Message::Schema {
                    id,
                    reply_to,
                    document,
                })]
            }
            None => self.error(Some(reply_to), ErrorCode::NotReady),
        }
    }

    fn current(&self, hash: &SchemaHash) -> Option<&CurationSchema> {
        self.schema
            .as_ref()
            .filter(|(d, _)| d.hash() == *hash)
            .map(|(_, s)| s)
    }

    fn schema_ack(
        &mut self,
        peer: &SiteId,
        a: SchemaAck,
        now: i64,
    ) -> Result<Vec<Action>, StoreError> {
        let Some(schema) = self.current(&a.schema) else {
            return Ok(self.error(Some(a.id), ErrorCode::SchemaMismatch));
        };
        let k = u64::from(schema.privacy.min_cell_count);
        let options = schema.deidentification.options.len();
        let checked = check_conformance(schema, &a.conformance, k).and_then(|()| {
            if a.profile.missing.iter().all(|i| usize::from(*i) < options) {
                Ok(())
            } else {
                Err(PrivacyViolation::Shape)
            }
        });
        if let Err(v) = checked {
            tracing::warn!(%peer, violation = %v, "refused a schema acknowledgement");
            return Ok(self.error(Some(a.id), ErrorCode::Privacy(v)));
        }
        if !self.store.first_application(peer, a.id, now)? {
            return Ok(self.ack(a.id, true));
        }
        self.store
            .record_ack(peer, &a.schema, &a.profile, &a.conformance, now)?;
        if a.profile.satisfied() {
            tracing::info!(%peer, "site acknowledged the schema");
        } else {
            tracing::warn!(%peer, missing = a.profile.missing.len(), "site acknowledged the schema but its de-identification profile does not satisfy it; its reports will be refused");
        }
        Ok(self.ack(a.id, false))
    }

    fn report(
        &mut self,
        peer: &SiteId,
        r: AggregateReport,
        now: i64,
    ) -> Result<Vec<Action>, StoreError> {
        let Some(schema) = self.current(&r.schema) else {
            return Ok(self.error(Some(r.id), ErrorCode::SchemaMismatch));
        };
        if r.round != self.round {
            return Ok(self.error(Some(r.id), ErrorCode::WrongRound));
        }
        let k = u64::from(schema.privacy.min_cell_count);
        if let Err(v) =
            check_shape(schema, &r.aggregates).and_then(|()| check_aggregates(&r.aggregates, k))
        {
            tracing::warn!(%peer, violation = %v, "refused an aggregate report; nothing stored");
            return Ok(self.error(Some(r.id), ErrorCode::Privacy(v)));
        }
        if let Err(why) = protocol::aggregate::check_plausible(&r.aggregates) {
            tracing::warn!(%peer, reason = %why, "refused an implausible aggregate report; nothing stored");
            return Ok(self.error(Some(r.id), ErrorCode::Implausible(why)));
        }
        let site = self.store.site(peer)?;
        let acked = site.acked_schema.as_deref() == Some(hash_hex(&r.schema).as_str())
            && site.profile.is_some_and(|p| p.satisfied());
        if !acked {
            return Ok(self.error(Some(r.id), ErrorCode::NotAcknowledged));
        }
        if !self.store.first_application(peer, r.id, now)? {
            return Ok(self.ack(r.id, true));
        }
        self.store
            .put_report(peer, &r.schema, r.round, &r.aggregates, now)?;
        tracing::info!(%peer, round = r.round, "aggregate report stored");
        self.maybe_fit(now)?;
        Ok(self.ack(r.id, false))
    }

    /// Fit the model from the current round's reports once enough sites reported (the
    /// configured minimum, and never fewer than [`MODEL_MIN_SITES`]); once per round.
    fn maybe_fit(&mut self, now: i64) -> Result<Option<u32>, StoreError> {
        let Some((doc, schema)) = &self.schema else {
            return Ok(None);
        };
        let Some(kind) = fit_kind(schema) else {
            return Ok(None);
        };
        let hash = doc.hash();
        let reports = if schema.privacy.secure_aggregation {
            // The secure total stands for its sites together.
            match self.store.secure_total(&hash, self.round)? {
                Some((sites, total)) => {
                    let mut a = total.aggregates;
                    let fit = match kind {
                        FitKind::Nyul => a.nyul.take().map(|n| FederatedFit::Nyul(n.summary)),
                        FitKind::Ct => a.ct.take().map(|c| FederatedFit::Ct(c.summary)),
                    };
                    return self.publish(hash, sites, fit, now);
                }
                _ => return Ok(None),
            }
        } else {
            // Decoding every report is only worth it once enough sites have reported.
            if self.store.report_count(&hash, self.round)? < self.min_sites {
                return Ok(None);
            }
            self.store.reports(&hash, self.round)?
        };
        let mut sites = Vec::new();
        let mut fit: Option<FederatedFit> = None;
        for (site, a) in &reports {
            match (kind, &a.nyul, &a.ct, &mut fit) {
                (FitKind::Nyul, Some(n), _, None) => {
                    fit = Some(FederatedFit::Nyul(n.summary.clone()))
                }
                (FitKind::Nyul, Some(n), _, Some(FederatedFit::Nyul(s))) => s.merge(&n.summary),
                (FitKind::Ct, _, Some(c), None) => fit = Some(FederatedFit::Ct(c.summary.clone())),
                (FitKind::Ct, _, Some(c), Some(FederatedFit::Ct(s))) => s.merge(&c.summary),
                _ => continue,
            }
            sites.push(site.clone());
        }
        if sites.len() < self.min_sites {
            return Ok(None);
        }
        self.publish(hash, sites, fit, now)
    }

    /// Store a fitted model as the next revision: over at least [`MODEL_MIN_SITES`] sites,
    /// once per round (a second model in a round, over one more site, would be that site's
    /// summary by subtraction), and only if the merged summary is plausible.
    fn publish(
        &mut self,
        hash: SchemaHash,
        sites: Vec<SiteId>,
        fit: Option<FederatedFit>,
        now: i64,
    ) -> Result<Option<u32>, StoreError> {
        let Some(fit) = fit else { return Ok(None) };
        if sites.len() < MODEL_MIN_SITES {
            tracing::info!(
                sites = sites.len(),
                "no model published: a model needs the summaries of at least {MODEL_MIN_SITES} sites"
            );
            return Ok(None);
        }
        let check = match &fit {
            FederatedFit::Nyul(s) => s.check(),
            FederatedFit::Ct(s) => s.check(),
        };
        if let Err(why) = check {
            tracing::warn!(reason = %why, "no model published: the merged summary is implausible");
            return Ok(None);
        }
        let latest = self.store.latest_model()?;
        let hex = hash_hex(&hash);
        if let Some(m) = &latest
            && m.schema == hex
            && m.round == self.round
        {
            return Ok(None);
        }
        let revision = latest.map_or(1, |m| m.revision + 1);
        self.store.put_model(
            &ModelRecord {
                revision,
                schema: hex,
                round: self.round,
                sites: sites.clone(),
                fit,
            },
            now,
        )?;
        tracing::info!(
            revision,
            sites = sites.len(),
            "published a federated harmonisation model"
        );
        Ok(Some(revision))
    }

    /// Sites that acknowledged the schema with a satisfying profile.
    fn eligible(&self, hash: &SchemaHash) -> Result<Vec<SiteId>, StoreError> {
        let hex = hash_hex(hash);
        let mut out = Vec::new();
        for m in &self.members {
            let rec = self.store.site(m)?;
            if rec.acked_schema.as_deref() == Some(hex.as_str())
                && rec.profile.is_some_and(|p| p.satisfied())
            {
                out.push(m.clone());
            }
        }
        Ok(out)
    }

    fn next_session(&mut self) -> Result<u32, StoreError> {
        let n: u32 = self
            .store
            .meta("secure_session")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            + 1;
        self.store.set_meta("secure_session", &n.to_string())?;
        Ok(n)
    }

    fn open_session(
        &mut self,
        hash: SchemaHash,
        participants: Vec<SiteId>,
        now: i64,
    ) -> Result<(), StoreError> {
        let len = self
            .schema
            .as_ref()
            .map_or(0, |(_, s)| protocol::secure::vector_len(s));
        let session = self.next_session()?;
        tracing::info!(
            session,
            sites = participants.len(),
            round = self.round,
            "opened a secure aggregation session"
        );
        self.secure = Some(SecureRound {
            schema: hash,
            round: self.round,
            session,
            participants,
            opened: now,
            keys: BTreeMap::new(),
            fetched: BTreeSet::new(),
            submitted: BTreeMap::new(),
            sum: vec![0; len],
            k: 0,
            noise: None,
            complete: false,
        });
        Ok(())
    }

    /// The current session of the round, opened when enough sites are eligible, and
    /// restarted without the sites that did not take their step in time.
    fn current_session(&mut self, hash: SchemaHash, now: i64) -> Result<bool, StoreError> {
        let stale = self
            .secure
            .as_ref()
            .is_none_or(|s| s.schema != hash || s.round != self.round);
        if stale {
            self.secure = None;
            if self.store.secure_total(&hash, self.round)?.is_some() {
                return Ok(false);
            }
            let eligible = self.eligible(&hash)?;
            if eligible.len() < self.min_sites.max(SECURE_MIN_SITES) {
                return Ok(false);
            }
            self.open_session(hash, eligible, now)?;
            return Ok(true);
        }
        let Some(s) = &self.secure else {
            return Ok(false);
        };
        if !s.complete && now - s.opened > self.secure_timeout {
            // Dropout: restart with the sites that reached the furthest step.
            let survivors: Vec<SiteId> = if !s.submitted.is_empty() {
                s.submitted.keys().cloned().collect()
            } else {
                s.keys.keys().cloned().collect()
            };
            let dropped: Vec<String> = s
                .participants
                .iter()
                .filter(|p| !survivors.contains(p))
                .map(|p| p.to_string())
                .collect();
            tracing::warn!(session = s.session, dropped = ?dropped, "a secure session timed out: aborted; the masked vectors received cannot be unmasked and are discarded");
            self.secure = None;
            if survivors.len() < SECURE_MIN_SITES {
                tracing::error!(
                    "fewer than {SECURE_MIN_SITES} sites remain: the round cannot be summed securely"
                );
                return Ok(false);
            }
            self.open_session(hash, survivors, now)?;
        }
        Ok(self.secure.is_some())
    }

    fn secure_schema(&self, hash: &SchemaHash) -> Option<&CurationSchema> {
        self.current(hash).filter(|s| s.privacy.secure_aggregation)
    }

    fn secure_join(
        &mut self,
        peer: &SiteId,
        id: MessageId,
        hash: SchemaHash,
        round: u32,
        now: i64,
    ) -> Result<Vec<Action>, StoreError> {
        if self.secure_schema(&hash).is_none() {
            return Ok(self.error(Some(id), ErrorCode::SchemaMismatch));
        }
        if round != self.round {
            return Ok(self.error(Some(id), ErrorCode::WrongRound));
        }
        if !self.eligible(&hash)?.contains(peer) {
            return Ok(self.error(Some(id), ErrorCode::NotAcknowledged));
        }
        if let Some((sites, _)) = self.store.secure_total(&hash, round)? {
            let session = self.secure.as_ref().map_or(0, |s| s.session);
            let reply = self.id();
            return Ok(vec![Action::Reply(Message::SecureSession(
                protocol::SecureSession {
                    id: reply,
                    reply_to: id,
                    round,
                    session,
                    participants: sites,
                    complete: true,
                },
            ))]);
        }
        if !self.current_session(hash, now)? {
            return Ok(self.error(Some(id), ErrorCode::NotReady));
        }
        let Some(s) = &self.secure else {
            return Ok(self.error(Some(id), ErrorCode::NotReady));
        };
        if !s.participants.contains(peer) {
            return Ok(self.error(Some(id), ErrorCode::NotReady));
        }
        let (session, participants) = (s.session, s.participants.clone());
        let reply = self.id();
        Ok(vec![Action::Reply(Message::SecureSession(
            protocol::SecureSession {
                id: reply,
                reply_to: id,
                round,
                session,
                participants,
                complete: false,
            },
        ))])
    }

    fn secure_keys(
        &mut self,
        peer: &SiteId,
        m: protocol::SecureKeys,
        now: i64,
    ) -> Result<Vec<Action>, StoreError> {
        let ok = self.secure.as_ref().is_some_and(|s| {
            s.schema == m.schema
                && s.round == m.round
                && s.session == m.session
                && s.participants.contains(peer)
        });
        if !ok {
            return Ok(self.error(Some(m.id), ErrorCode::NotReady));
        }
        let Some(s) = self.secure.as_mut() else {
            return Ok(self.error(Some(m.id), ErrorCode::NotReady));
        };
        let mut peers: Vec<&SiteId> = m.keys.iter().map(|k| &k.peer).collect();
        peers.sort();
        let expected: Vec<&SiteId> = s.participants.iter().filter(|p| *p != peer).collect();
        if peers != expected {
            return Ok(self.error(Some(m.id), ErrorCode::Unexpected));
        }
        let signed = protocol::secure::SignedKeys {
            site: peer.clone(),
            certificate: m.certificate,
            keys: m.keys,
            signature: m.signature,
        };
        match s.keys.get(peer) {
            Some(old) if *old == signed => return Ok(self.ack(m.id, true)),
            Some(_) if !s.fetched.is_empty() => {
                // New keys after others used the old ones: the site lost its keys (restart).
                tracing::warn!(%peer, session = s.session, "a site replaced its keys mid-session: restarting the session");
                let (hash, participants) = (s.schema, s.participants.clone());
                self.open_session(hash, participants, now)?;
                return Ok(self.error(Some(m.id), ErrorCode::NotReady));
            }
            _ => {}
        }
        s.keys.insert(peer.clone(), signed);
        Ok(self.ack(m.id, false))
    }

    fn fetch_peer_keys(
        &mut self,
        peer: &SiteId,
        id: MessageId,
        hash: SchemaHash,
        round: u32,
        session: u32,
    ) -> Vec<Action> {
        let Some(s) = self.secure.as_mut() else {
            return self.error(Some(id), ErrorCode::NotReady);
        };
        if s.schema != hash
            || s.round != round
            || s.session != session
            || !s.participants.contains(peer)
            || s.keys.len() < s.participants.len()
        {
            return self.error(Some(id), ErrorCode::NotReady);
        }
        // Each participant's key set as it signed it: the asking site checks the signature
        // and the certificate, so the coordinator cannot substitute a key.
        let signed: Vec<protocol::secure::SignedKeys> = s
            .keys
            .iter()
            .filter(|(from, _)| *from != peer)
            .map(|(_, k)| k.clone())
            .collect();
        s.fetched.insert(peer.clone());
        let crl = self.crl.clone();
        let reply = self.id();
        vec![Action::Reply(Message::PeerKeys(Box::new(
            protocol::PeerKeys {
                id: reply,
                reply_to: id,
                session,
                signed,
                crl,
            },
        )))]
    }

    fn masked_report(
        &mut self,
        peer: &SiteId,
        m: protocol::MaskedReport,
        now: i64,
    ) -> Result<Vec<Action>, StoreError> {
        let Some(schema) = self.secure_schema(&m.schema).cloned() else {
            return Ok(self.error(Some(m.id), ErrorCode::SchemaMismatch));
        };
        let Some(s) = self.secure.as_mut() else {
            return Ok(self.error(Some(m.id), ErrorCode::NotReady));
        };
        if s.round != m.round || s.session != m.session || !s.participants.contains(peer) {
            return Ok(self.error(Some(m.id), ErrorCode::NotReady));
        }
        if s.submitted.get(peer) == Some(&m.id) {
            return Ok(self.ack(m.id, true));
        }
        if s.submitted.contains_key(peer) {
            return Ok(self.error(Some(m.id), ErrorCode::Unexpected));
        }
        if m.vector.len() != s.sum.len() {
            return Ok(self.error(Some(m.id), ErrorCode::Privacy(PrivacyViolation::Shape)));
        }
        if m.k < schema.privacy.min_cell_count {
            return Ok(self.error(Some(m.id), ErrorCode::Privacy(PrivacyViolation::SmallCell)));
        }
        protocol::secure::add_into(&mut s.sum, &m.vector);
        s.submitted.insert(peer.clone(), m.id);
        s.k = s.k.max(m.k);
        s.noise = s.noise.or(m.noise);
        if s.submitted.len() < s.participants.len() {
            return Ok(self.ack(m.id, false));
        }
        // Every participant is in: the masks cancel.
        s.complete = true;
        let (hash, round, session, sites) = (s.schema, s.round, s.session, s.participants.clone());
        let k = u64::from(s.k);
        let sum = std::mem::take(&mut s.sum);
        let noise = s.noise;
        match protocol::secure::decode(&sum, &schema, sites.len() as u32, k) {
            Ok(mut total) if total.aggregates.patients != protocol::aggregate::Cell::Suppressed => {
                total.aggregates.noise = noise;
                self.store
                    .put_secure_total(&hash, round, session, &sites, &total, now)?;
                tracing::info!(
                    session,
                    sites = sites.len(),
                    "secure aggregation complete: only the total was learnt"
                );
                self.maybe_fit(now)?;
            }
            Ok(_) => tracing::warn!(
                session,
                "the secure total covers fewer than k patients: not kept"
            ),
            Err(e) => tracing::error!(session, error = %e, "could not decode the secure total"),
        }
        Ok(self.ack(m.id, false))
    }

    fn refusal(
        &mut self,
        peer: &SiteId,
        r: protocol::Refusal,
        now: i64,
    ) -> Result<Vec<Action>, StoreError> {
        if self.current(&r.schema).is_none() {
            return Ok(self.error(Some(r.id), ErrorCode::SchemaMismatch));
        }
        if !self.store.first_application(peer, r.id, now)? {
            return Ok(self.ack(r.id, true));
        }
        self.store
            .put_refusal(peer, &r.schema, r.round, r.reason, now)?;
        tracing::warn!(%peer, round = r.round, reason = ?r.reason, "site declined to release the round's aggregates");
        Ok(self.ack(r.id, false))
    }

    fn fetch_model(
        &mut self,
        reply_to: MessageId,
        schema: SchemaHash,
    ) -> Result<Vec<Action>, StoreError> {
        let model = self.store.latest_model()?;
        match model {
            Some(m) if m.schema == hash_hex(&schema) => {
                let id = self.id();
                Ok(vec![Action::Reply(Message::Model(Box::new(
                    ModelPublication {
                        id,
                        reply_to,
                        schema,
                        revision: m.revision,
                        sites: m.sites.len() as u32,
                        fit: m.fit,
                    },
                )))])
            }
            _ => Ok(self.error(Some(reply_to), ErrorCode::NotReady)),
        }
    }

    /// A welcomed connection of `peer` ended.
    pub fn disconnected(&mut self, peer: &SiteId) {
        self.registry.disconnected(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::aggregate::{Cell, CountTable, NyulRelease, ProfileCheck};
    use protocol::summary::NyulSummary;

    const SCHEMA: &str = include_str!("../../deploy/schema.toml");

    fn site(s: &str) -> SiteId {
        SiteId::new(s).expect("id")
    }

    fn hub(min_sites: Option<usize>) -> Hub {
        Hub::new(
            [site("a"), site("b"), site("c")],
            Store::in_memory().expect("store"),
            Some(SchemaDocument::new(SCHEMA).expect("schema")),
            min_sites,
        )
        .expect("hub")
    }

    fn conformance(schema: &CurationSchema) -> ConformanceSummary {
        ConformanceSummary {
            patients: Cell::Value(20),
            status: [Cell::Value(20), Cell::Value(0), Cell::Value(0)],
            deviations: vec![Cell::Value(0); schema.data_of_interest.constraints.len()],
            findings: [Cell::Value(0); 3],
            quarantined: Cell::Value(0),
        }
    }

    fn aggregates(schema: &CurationSchema, landmark: i64) -> SiteAggregates {
        SiteAggregates {
            k: schema.privacy.min_cell_count,
            patients: Cell::Value(20),
            series: Cell::Value(20),
            counts: schema
                .statistics
                .counts_by
                .iter()
                .map(|v| {
                    let mut cells = vec![Cell::Value(0); schema.count_table_len(v)];
                    cells[0] = Cell::Value(20);
                    CountTable { cells }
                })
                .collect(),
            histograms: schema
                .statistics
                .histograms
                .iter()
                .map(|h| vec![Cell::Value(0); h.edges.len() + 1])
                .collect(),
            moments: schema
                .moment_quantities()
                .into_iter()
                .map(|q| (q, None))
                .collect(),
            nyul: Some(NyulRelease {
                patients: 20,
                // 20 volumes whose mean landmarks increase from about 1 to 76 (plausible);
                // `landmark` shifts the sums so that merges can be told apart.
                summary: NyulSummary {
                    landmark_sums: std::array::from_fn(|i| {
                        20_000_000 + landmark + i as i64 * 150_000_000
                    }),
                    volumes: 20,
                },
            }),
            ct: None,
            noise: None,
        }
    }

    fn answer(actions: &[Action]) -> &Message {
        match actions.first() {
            Some(Action::Reply(m)) => m,
            other => panic!("no reply: {other:?}"),
        }
    }

    fn welcome(h: &mut Hub, s: &str) -> protocol::Welcome {
        let m = Message::Hello(protocol::Hello {
            id: MessageId(1),
            min_version: protocol::PROTOCOL_VERSION,
            max_version: protocol::PROTOCOL_VERSION,
            site: site(s),
            schema: None,
        });
        match answer(&h.handle(&site(s), m, 10, false)) {
            Message::Welcome(w) => w.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn code(actions: &[Action]) -> Option<ErrorCode> {
        match answer(actions) {
            Message::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn acknowledge_report_fit_and_every_refusal() {
        let mut h = hub(None);
        let schema = h.schema().map(|(_, s)| s.clone()).expect("schema");
        let hash = h.schema().map(|(d, _)| d.hash()).expect("hash");
        let w = welcome(&mut h, "a");
        assert_eq!((w.round, w.model, w.schema), (1, 0, Some(hash)));
        let report = |id: u64, a: SiteAggregates, round: u32| {
            Message::Report(Box::new(AggregateReport {
                id: MessageId(id),
                schema: hash,
                round,
                aggregates: a,
            }))
        };
        // Before the welcome on this connection: refused.
        let r = h.handle(
            &site("a"),
            Message::FetchSchema { id: MessageId(2) },
            11,
            false,
        );
        assert_eq!(code(&r), Some(ErrorCode::NotWelcomed));
        let r = h.handle(
            &site("a"),
            Message::FetchSchema { id: MessageId(2) },
            11,
            true,
        );
        assert!(matches!(answer(&r), Message::Schema { document, .. } if document.hash() == hash));
        // A report before the acknowledgement is refused.
        let r = h.handle(&site("a"), report(3, aggregates(&schema, 1), 1), 12, true);
        assert_eq!(code(&r), Some(ErrorCode::NotAcknowledged));
        let ack = |id: u64, missing: Vec<u16>| {
            Message::SchemaAck(Box::new(SchemaAck {
                id: MessageId(id),
                schema: hash,
                profile: ProfileCheck { missing },
                conformance: conformance(&schema),
            }))
        };
        assert!(matches!(
            answer(&h.handle(&site("a"), ack(4, vec![]), 13, true)),
            Message::Ack {
                duplicate: false,
                ..
            }
        ));
        assert!(matches!(
            answer(&h.handle(&site("a"), ack(4, vec![]), 13, true)),
            Message::Ack {
                duplicate: true,
                ..
            }
        ));
        // A small cell, a single suppression and the wrong shape are refused; nothing stored.
        let mut small = aggregates(&schema, 1);
        small.counts[0].cells[1] = Cell::Value(3);
        let mut single = aggregates(&schema, 1);
        single.counts[0].cells[1] = Cell::Suppressed;
        let mut shape = aggregates(&schema, 1);
        shape.histograms.pop();
        for (a, v) in [
            (small, PrivacyViolation::SmallCell),
            (single, PrivacyViolation::SingleSuppression),
            (shape, PrivacyViolation::Shape),
        ] {
            let r = h.handle(&site("a"), report(5, a, 1), 14, true);
            assert_eq!(code(&r), Some(ErrorCode::Privacy(v)));
        }
        assert!(h.store().reports(&hash, 1).expect("reports").is_empty());
        let r = h.handle(&site("a"), report(6, aggregates(&schema, 1), 2), 15, true);
        assert_eq!(code(&r), Some(ErrorCode::WrongRound));
        let mut other = hash;
        other.0[0] ^= 1;
        let r = h.handle(
            &site("a"),
            Message::FetchModel {
                id: MessageId(7),
                schema: other,
            },
            15,
            true,
        );
        assert_eq!(code(&r), Some(ErrorCode::NotReady));
        // A valid report is stored once, even when retried.
        for dup in [false, true] {
            let r = h.handle(
                &site("a"),
                report(8, aggregates(&schema, 1_000_000), 1),
                16,
                true,
            );
            assert!(
                matches!(answer(&r), Message::Ack { duplicate, .. } if *duplicate == dup),
                "{r:?}"
            );
        }
        assert_eq!(h.store().reports(&hash, 1).expect("reports").len(), 1);
        // One site of two: no model yet.
        assert_eq!(welcome(&mut h, "a").model, 0);
        welcome(&mut h, "b");
        h.handle(&site("b"), ack(1, vec![]), 17, true);
        h.handle(
            &site("b"),
            report(2, aggregates(&schema, 3_000_000), 1),
            18,
            true,
        );
        // Two sites of three: a model over two would show each site the other's summary.
        assert_eq!(welcome(&mut h, "a").model, 0);
        // An implausible summary (landmarks far outside the output range) is refused and
        // not stored.
        welcome(&mut h, "c");
        h.handle(&site("c"), ack(1, vec![]), 18, true);
        let mut poisoned = aggregates(&schema, 1_000_000);
        if let Some(n) = poisoned.nyul.as_mut() {
            n.summary.landmark_sums[10] = 1_000_000_000_000;
        }
        let r = h.handle(&site("c"), report(2, poisoned, 1), 18, true);
        assert_eq!(
            code(&r),
            Some(ErrorCode::Implausible(
                protocol::summary::Implausible::LandmarkRange
            ))
        );
        assert_eq!(welcome(&mut h, "a").model, 0);
        h.handle(
            &site("c"),
            report(3, aggregates(&schema, 2_000_000), 1),
            18,
            true,
        );
        assert_eq!(welcome(&mut h, "a").model, 1);
        let r = h.handle(
            &site("a"),
            Message::FetchModel {
                id: MessageId(9),
                schema: hash,
            },
            19,
            true,
        );
        let Message::Model(m) = answer(&r) else {
            panic!("{r:?}")
        };
        let FederatedFit::Nyul(s) = &m.fit else {
            panic!("nyul")
        };
        assert_eq!(
            (s.volumes, s.landmark_sums[0], m.sites),
            (60, 66_000_000, 3)
        );
        // A site whose profile lacks an option is recorded, and its reports are refused.
        let mut h = hub(Some(1));
        welcome(&mut h, "b");
        h.handle(&site("b"), ack(1, vec![0]), 20, true);
        let r = h.handle(&site("b"), report(2, aggregates(&schema, 1), 1), 21, true);
        assert_eq!(code(&r), Some(ErrorCode::NotAcknowledged));
        let rec = h.store().site(&site("b")).expect("site");
        assert_eq!(rec.profile.map(|p| p.missing), Some(vec![0]));
    }

    #[test]
    fn the_round_survives_a_restart_and_advances_with_a_new_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("c.sqlite");
        let open = |text: &str| {
            Hub::new(
                [site("a")],
                Store::open(&db).expect("store"),
                Some(SchemaDocument::new(text).expect("schema")),
                None,
            )
            .expect("hub")
        };
        assert_eq!(open(SCHEMA).round(), 1);
        assert_eq!(open(SCHEMA).round(), 1, "same schema, same round");
        let changed = SCHEMA.replacen("revision = 3", "revision = 4", 1);
        assert_eq!(open(&changed).round(), 2);
        let mut h = open(&changed);
        assert_eq!(h.next_round().expect("next"), 3);
        assert_eq!(open(&changed).round(), 3);
    }
}
