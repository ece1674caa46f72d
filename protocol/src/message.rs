//! The messages. The first exchange on every connection is [`Hello`] → [`Welcome`] or
//! [`HandshakeReject`]. The welcome tells the node what is due: the schema to follow, the
//! aggregation round to report, the latest harmonisation model. Every later exchange is one
//! request from the node and one answer, on its own stream: fetch the schema, acknowledge it
//! with the site's conformance, report aggregates, fetch the model. Nothing dials into a
//! hospital. Chunked tensor transfer (model updates) comes later as new variants (its kinds
//! are reserved in [`crate::codec`], so adding them is not a version break).

use serde::{Deserialize, Serialize};

use crate::aggregate::{ConformanceSummary, PrivacyViolation, ProfileCheck, SiteAggregates};
use crate::schema::{CurationSchema, schema_hash};
use crate::summary::{CtSummary, NyulSummary};
use crate::training::{Chunk, ChunkHead, JobDocument, JobHash, RoundState, UpdateOffer};

/// A published training job and where it stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobOffer {
    pub id: MessageId,
    pub reply_to: MessageId,
    pub document: JobDocument,
    pub state: RoundState,
}

/// Version of the wire protocol this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

pub use crate::ids::{MessageId, SchemaHash, SiteId, SiteIdError};

/// A node's opening message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub id: MessageId,
    /// Protocol versions the node speaks, lowest and highest.
    pub min_version: u16,
    pub max_version: u16,
    pub site: SiteId,
    /// The curation schema the node currently follows, if any.
    pub schema: Option<SchemaHash>,
}

/// The coordinator accepts a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub id: MessageId,
    pub reply_to: MessageId,
    /// The version both sides will speak.
    pub version: u16,
    /// The schema the coordinator publishes; differs from the node's when an update is due.
    pub schema: Option<SchemaHash>,
    /// The aggregation round the coordinator collects (0: none yet).
    pub round: u32,
    /// Revision of the latest published harmonisation model (0: none yet).
    pub model: u32,
}

/// A curation schema as distributed: the document's text, which is the consortium's own
/// (never a patient's), accepted only if it parses and validates, on both ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SchemaDocument(String);

impl SchemaDocument {
    /// Wrap a document after validating it.
    pub fn new(text: &str) -> Result<Self, crate::schema::SchemaError> {
        CurationSchema::parse(text)?;
        Ok(SchemaDocument(text.to_owned()))
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SchemaHash {
        schema_hash(&self.0)
    }

    /// The parsed schema (valid by construction).
    pub fn schema(&self) -> Result<CurationSchema, crate::schema::SchemaError> {
        CurationSchema::parse(&self.0)
    }
}

impl<'de> Deserialize<'de> for SchemaDocument {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SchemaDocument::new(&s).map_err(|_| serde::de::Error::custom("invalid schema document"))
    }
}

/// A node accepts a schema and says how it stands against it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaAck {
    pub id: MessageId,
    pub schema: SchemaHash,
    pub profile: ProfileCheck,
    pub conformance: ConformanceSummary,
}

/// A site's aggregates for one round of one schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregateReport {
    pub id: MessageId,
    pub schema: SchemaHash,
    pub round: u32,
    pub aggregates: SiteAggregates,
}

/// A site declines to release a round's aggregates, and says why (the coordinator records it
/// and shows it in the report).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub id: MessageId,
    pub schema: SchemaHash,
    pub round: u32,
    pub reason: crate::aggregate::RefusalReason,
}

/// Secure aggregation: the session a site is to take part in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureSession {
    pub id: MessageId,
    pub reply_to: MessageId,
    pub round: u32,
    /// Increases when a session is aborted (a site dropped out) and restarted without it.
    pub session: u32,
    pub participants: Vec<SiteId>,
    /// The round's total is known (its sites are `participants`): nothing more to do.
    pub complete: bool,
}

/// Secure aggregation: a site's public keys for a session, one fresh X25519 key per peer,
/// signed with its site certificate's key over [`crate::secure::key_statement`] (the session,
/// every participant, the signer and its keys), with that certificate (DER).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureKeys {
    pub id: MessageId,
    pub schema: SchemaHash,
    pub round: u32,
    pub session: u32,
    pub keys: Vec<crate::secure::PeerKey>,
    pub certificate: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Secure aggregation: every other participant's signed key set, relayed as the site sent it,
/// and the consortium's current revocation list (DER) to check their certificates against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerKeys {
    pub id: MessageId,
    pub reply_to: MessageId,
    pub session: u32,
    pub signed: Vec<crate::secure::SignedKeys>,
    pub crl: Vec<u8>,
}

/// Secure aggregation: a site's aggregates encoded and masked modulo 2^64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedReport {
    pub id: MessageId,
    pub schema: SchemaHash,
    pub round: u32,
    pub session: u32,
    /// The minimum cell count the site applied before masking.
    pub k: u32,
    /// Differential-privacy noise the site added before masking, if any.
    pub noise: Option<crate::aggregate::NoiseApplied>,
    pub vector: Vec<u64>,
}

/// What a federated harmonisation fit learnt: the merged summaries of the sites, from which
/// every node derives exactly the model that fitting on the pooled volumes gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FederatedFit {
    Nyul(NyulSummary),
    Ct(CtSummary),
}

/// A harmonisation model the coordinator publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPublication {
    pub id: MessageId,
    pub reply_to: MessageId,
    pub schema: SchemaHash,
    pub revision: u32,
    /// Sites whose summaries it merges.
    pub sites: u32,
    pub fit: FederatedFit,
}

/// Why a request was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame could not be decoded (oversize, unknown kind, version, malformed).
    BadFrame,
    /// The request came before the hello/welcome exchange.
    NotWelcomed,
    /// The request names a schema other than the one published.
    SchemaMismatch,
    /// The round is not the one being collected.
    WrongRound,
    /// The aggregates break the privacy policy; nothing was stored.
    Privacy(PrivacyViolation),
    /// Nothing to answer yet (no schema or model published).
    NotReady,
    /// The site's profile does not satisfy the schema, or it has not acknowledged it.
    NotAcknowledged,
    /// A message a coordinator never receives.
    Unexpected,
    /// The summaries cannot come from real volumes (poisoned or broken); nothing was stored.
    Implausible(crate::summary::Implausible),
    /// A training request was not applied.
    Training(TrainingError),
}

/// Why a training request was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainingError {
    /// No job is published, or the request names another one.
    UnknownJob,
    /// The site has not joined the job, or is not a participant of this round.
    NotAParticipant,
    /// The request is for another round or attempt than the one being collected.
    WrongRound,
    /// A chunk's bytes do not match the hash offered for it, or its index or size is wrong.
    BadChunk,
    /// The offer has the wrong number of chunks or metrics, or a metric is not finite.
    BadOffer,
    /// The round's update from this site is complete; a new offer is refused.
    AlreadyComplete,
}

/// Why the coordinator refused a node at the first exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeReject {
    /// No version in common; the coordinator's range is given so the node can say which
    /// side to upgrade.
    UnsupportedVersion { min_version: u16, max_version: u16 },
    /// The site is not registered with this consortium.
    UnknownSite,
    /// The site is already connected on another connection. (Not sent by this build, which
    /// welcomes a reconnecting site at once; kept so the wire format stays stable.)
    AlreadyConnected,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Reject {
        id: MessageId,
        reply_to: MessageId,
        reason: HandshakeReject,
    },
    FetchSchema {
        id: MessageId,
    },
    Schema {
        id: MessageId,
        reply_to: MessageId,
        document: SchemaDocument,
    },
    SchemaAck(Box<SchemaAck>),
    Report(Box<AggregateReport>),
    Refusal(Refusal),
    SecureJoin {
        id: MessageId,
        schema: SchemaHash,
        round: u32,
    },
    SecureSession(SecureSession),
    SecureKeys(Box<SecureKeys>),
    FetchPeerKeys {
        id: MessageId,
        schema: SchemaHash,
        round: u32,
        session: u32,
    },
    PeerKeys(Box<PeerKeys>),
    MaskedReport(Box<MaskedReport>),
    /// Training: ask for the published job.
    FetchJob {
        id: MessageId,
    },
    /// Training: the published job and its state.
    Job(Box<JobOffer>),
    /// Training: the site takes part in the job (its hospital IT approved it).
    JoinTraining {
        id: MessageId,
        job: JobHash,
    },
    /// Training: where the job stands. With `wait_ms`, the coordinator answers once the
    /// round, attempt or model revision differs from `seen` (or the time is up): a long poll.
    TrainStatus {
        id: MessageId,
        job: JobHash,
        wait_ms: u32,
        seen: [u32; 3],
    },
    RoundState(Box<RoundState>),
    /// Training: a site's update for a round, as chunk hashes (answered with the round state,
    /// whose `have` lists the chunks already held).
    UpdateOffer(Box<UpdateOffer>),
    /// Training: one chunk of a site's update.
    PutChunk(Box<Chunk>),
    /// Training: ask for one chunk of a global model.
    GetChunk(ChunkHead),
    /// Training: one chunk of a global model.
    ModelChunk(Box<Chunk>),
    /// Training under secure aggregation: the site's signed keys for every member of the job
    /// (`schema` carries the job hash, `round` 0, `session` the key epoch).
    TrainKeys(Box<SecureKeys>),
    /// Training under secure aggregation: every member's signed keys.
    FetchTrainKeys {
        id: MessageId,
        job: JobHash,
        epoch: u32,
    },
    FetchModel {
        id: MessageId,
        schema: SchemaHash,
    },
    Model(Box<ModelPublication>),
    /// A request was applied (`duplicate`: it had been already, under the same id).
    Ack {
        id: MessageId,
        reply_to: MessageId,
        duplicate: bool,
    },
    Error {
        id: MessageId,
        /// The request, when it could be decoded.
        reply_to: Option<MessageId>,
        code: ErrorCode,
    },
}

impl Message {
    /// The message's own id.
    pub fn id(&self) -> MessageId {
        match self {
            Message::Hello(h) => h.id,
            Message::Welcome(w) => w.id,
            Message::Reject { id, .. }
            | Message::FetchSchema { id }
            | Message::Schema { id, .. }
            | Message::FetchModel { id, .. }
            | Message::Ack { id, .. }
            | Message::Error { id, .. } => *id,
            Message::SchemaAck(a) => a.id,
            Message::Report(r) => r.id,
            Message::Refusal(r) => r.id,
            Message::SecureJoin { id, .. } | Message::FetchPeerKeys { id, .. } => *id,
            Message::SecureSession(m) => m.id,
            Message::SecureKeys(m) => m.id,
            Message::PeerKeys(m) => m.id,
            Message::MaskedReport(m) => m.id,
            Message::Model(m) => m.id,
            Message::FetchJob { id }
            | Message::JoinTraining { id, .. }
            | Message::TrainStatus { id, .. }
            | Message::FetchTrainKeys { id, .. } => *id,
            Message::Job(m) => m.id,
            Message::RoundState(m) => m.id,
            Message::UpdateOffer(m) => m.id,
            Message::PutChunk(c) | Message::ModelChunk(c) => c.head.id,
            Message::GetChunk(h) => h.id,
            Message::TrainKeys(m) => m.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_allow_only_a_slug() {
        assert!(SiteId::new("uh-leuven-1").is_ok());
        for bad in ["", "Upper", "has space", "a.b", &"x".repeat(33), "é"] {
            assert!(SiteId::new(bad).is_err(), "{bad:?}");
        }
    }
}
