//! Framing: `[u32 length, big endian][u16 protocol version][u8 kind][bincode body]`.
//!
//! The length covers version, kind and body. Each kind has its own size limit, checked from
//! the header before any body is decoded; bincode itself decodes with the same limit, so a
//! hostile length field inside the body cannot make it allocate more. Kinds 0x01–0x03 are the
//! handshake, 0x20–0x2F schema, aggregate and model messages, 0x30–0x37 training messages,
//! 0x10–0x12 training chunks (their body is `[u16 head length][bincode head][raw data]`, so
//! the data is copied as it is, never decoded element by element); the rest of 0x10–0x3F is
//! reserved, so adding kinds does not change the meaning of existing frames.

use crate::message::{Message, PROTOCOL_VERSION};

/// Largest body of a chunk frame: 8 MiB of data and its head.
pub const CHUNK_BODY_LIMIT: usize = 8 * 1024 * 1024 + 1024;

/// Hard upper bound of any frame, whatever its kind.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// ALPN protocol name of the fedcurate wire protocol, set by both ends of every connection.
pub const ALPN: &[u8] = b"fedcurate/1";

const HEADER_LEN: usize = 4 + 2 + 1;

/// Frame kinds (one per message variant), with their size limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Hello = 0x01,
    Welcome = 0x02,
    Reject = 0x03,
    FetchSchema = 0x20,
    Schema = 0x21,
    SchemaAck = 0x22,
    Report = 0x23,
    FetchModel = 0x24,
    Model = 0x25,
    Refusal = 0x26,
    SecureJoin = 0x27,
    SecureSession = 0x28,
    SecureKeys = 0x29,
    FetchPeerKeys = 0x2A,
    PeerKeys = 0x2B,
    MaskedReport = 0x2C,
    Ack = 0x2E,
    Error = 0x2F,
    PutChunk = 0x10,
    GetChunk = 0x11,
    ModelChunk = 0x12,
    FetchJob = 0x30,
    Job = 0x31,
    JoinTraining = 0x32,
    TrainStatus = 0x33,
    RoundState = 0x34,
    UpdateOffer = 0x35,
    TrainKeys = 0x36,
    FetchTrainKeys = 0x37,
}

const KINDS: [Kind; 29] = [
    Kind::PutChunk,
    Kind::GetChunk,
    Kind::ModelChunk,
    Kind::FetchJob,
    Kind::Job,
    Kind::JoinTraining,
    Kind::TrainStatus,
    Kind::RoundState,
    Kind::UpdateOffer,
    Kind::TrainKeys,
    Kind::FetchTrainKeys,
    Kind::Hello,
    Kind::Welcome,
    Kind::Reject,
    Kind::FetchSchema,
    Kind::Schema,
    Kind::SchemaAck,
    Kind::Report,
    Kind::FetchModel,
    Kind::Model,
    Kind::Refusal,
    Kind::SecureJoin,
    Kind::SecureSession,
    Kind::SecureKeys,
    Kind::FetchPeerKeys,
    Kind::PeerKeys,
    Kind::MaskedReport,
    Kind::Ack,
    Kind::Error,
];

impl Kind {
    fn of(m: &Message) -> Self {
        match m {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Reject { .. } => Kind::Reject,
            Message::FetchSchema { .. } => Kind::FetchSchema,
            Message::Schema { .. } => Kind::Schema,
            Message::SchemaAck(_) => Kind::SchemaAck,
            Message::Report(_) => Kind::Report,
            Message::FetchModel { .. } => Kind::FetchModel,
            Message::Model(_) => Kind::Model,
            Message::Refusal(_) => Kind::Refusal,
            Message::SecureJoin { .. } => Kind::SecureJoin,
            Message::SecureSession(_) => Kind::SecureSession,
            Message::SecureKeys(_) => Kind::SecureKeys,
            Message::FetchPeerKeys { .. } => Kind::FetchPeerKeys,
            Message::PeerKeys(_) => Kind::PeerKeys,
            Message::MaskedReport(_) => Kind::MaskedReport,
            Message::Ack { .. } => Kind::Ack,
            Message::Error { .. } => Kind::Error,
            Message::PutChunk(_) => Kind::PutChunk,
            Message::GetChunk(_) => Kind::GetChunk,
            Message::ModelChunk(_) => Kind::ModelChunk,
            Message::FetchJob { .. } => Kind::FetchJob,
            Message::Job(_) => Kind::Job,
            Message::JoinTraining { .. } => Kind::JoinTraining,
            Message::TrainStatus { .. } => Kind::TrainStatus,
            Message::RoundState(_) => Kind::RoundState,
            Message::UpdateOffer(_) => Kind::UpdateOffer,
            Message::TrainKeys(_) => Kind::TrainKeys,
            Message::FetchTrainKeys { .. } => Kind::FetchTrainKeys,
        }
    }

    fn from_byte(b: u8) -> Result<Self, CodecError> {
        if let Some(k) = KINDS.iter().find(|k| **k as u8 == b) {
            return Ok(*k);
        }
        match b {
            0x10..=0x3F => Err(CodecError::ReservedKind(b)),
            _ => Err(CodecError::UnknownKind(b)),
        }
    }

    /// Largest body this kind may have.
    fn limit(self) -> usize {
        match self {
            Kind::Hello
            | Kind::Welcome
            | Kind::Reject
            | Kind::FetchSchema
            | Kind::FetchModel
            | Kind::Refusal
            | Kind::SecureJoin
            | Kind::FetchPeerKeys
            | Kind::Ack
            | Kind::Error
            | Kind::FetchJob
            | Kind::JoinTraining
            | Kind::TrainStatus
            | Kind::GetChunk
            | Kind::FetchTrainKeys => 1024,
            Kind::SchemaAck | Kind::SecureSession | Kind::SecureKeys | Kind::TrainKeys => 64 * 1024,
            Kind::Job | Kind::RoundState | Kind::UpdateOffer => 1024 * 1024,
            // A chunk (at most 8 MiB, the job's `chunk_mib`) and its head.
            Kind::PutChunk | Kind::ModelChunk => CHUNK_BODY_LIMIT,
            Kind::Schema | Kind::Model => 256 * 1024,
            // Every participant's certificate and keys, and the revocation list.
            Kind::Report | Kind::MaskedReport | Kind::PeerKeys => 1024 * 1024,
        }
    }
}

/// Framing and decoding errors. The connection survives all of them: the caller answers
/// with an error message or drops the frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame is incomplete: {needed} more bytes needed")]
    Incomplete { needed: usize },
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes for its kind")]
    Oversize { len: usize, limit: usize },
    #[error("protocol version {0} is not supported by this build (speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("message kind 0x{0:02x} is reserved for a later protocol feature")]
    ReservedKind(u8),
    #[error("message body does not decode: {0}")]
    Malformed(String),
    #[error("frame body has {0} trailing bytes")]
    TrailingBytes(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<{ 1024 * 1024 + 1024 }>()
}

/// The kind byte of a frame's header, if the header is complete (for logs and typed errors
/// about a frame that does not decode).
pub fn frame_kind(bytes: &[u8]) -> Option<u8> {
    bytes.get(6).copied()
}

/// Encode one message as a frame.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, CodecError> {
    let kind = Kind::of(message);
    let body = match message {
        // Chunks: `[u16 head length][head][data]`, the data copied as it is.
        Message::PutChunk(c) | Message::ModelChunk(c) => {
            let head = bincode::serde::encode_to_vec(&c.head, config())
                .map_err(|e| CodecError::Malformed(e.to_string()))?;
            let mut b = Vec::with_capacity(2 + head.len() + c.data.len());
            b.extend_from_slice(&(head.len() as u16).to_be_bytes());
            b.extend_from_slice(&head);
            b.extend_from_slice(&c.data);
            b
        }
        _ => bincode::serde::encode_to_vec(message, config())
            .map_err(|e| CodecError::Malformed(e.to_string()))?,
    };
    if body.len() > kind.limit() {
        return Err(CodecError::Oversize {
            len: body.len(),
            limit: kind.limit(),
        });
    }
    let len = (2 + 1 + body.len()) as u32;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Length of a frame header (length, version, kind).
pub const FRAME_HEADER_LEN: usize = HEADER_LEN;

/// Check a frame's header before its body is read: returns the body's length if the version
/// is spoken, the kind known and the length within that kind's limit. A reader reads the
/// header, asks this, and then reads exactly that many bytes (never up to [`MAX_FRAME_LEN`]
/// on a hostile peer's word).
pub fn check_header(header: &[u8; HEADER_LEN]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len < 3 {
        return Err(CodecError::Malformed(
            "frame shorter than its header".into(),
        ));
    }
    let version = u16::from_be_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let kind = Kind::from_byte(header[6])?;
    let body_len = len - 3;
    if body_len > kind.limit() {
        return Err(CodecError::Oversize {
            len: body_len,
            limit: kind.limit(),
        });
    }
    Ok(body_len)
}

/// Decode the frame at the start of `bytes`; returns the message and the bytes consumed.
pub fn decode_frame(bytes: &[u8]) -> Result<(Message, usize), CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Incomplete {
            needed: HEADER_LEN - bytes.len(),
        });
    }
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::Oversize {
            len,
            limit: MAX_FRAME_LEN,
        });
    }
    if len < 3 {
        return Err(CodecError::Malformed(
            "frame shorter than its header".into(),
        ));
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let kind = Kind::from_byte(bytes[6])?;
    let body_len = len - 3;
    if body_len > kind.limit() {
        return Err(CodecError::Oversize {
            len: body_len,
            limit: kind.limit(),
        });
    }
    let total = 4 + len;
    if bytes.len() < total {
        return Err(CodecError::Incomplete {
            needed: total - bytes.len(),
        });
    }
    let body = &bytes[HEADER_LEN..total];
    if matches!(kind, Kind::PutChunk | Kind::ModelChunk) {
        return decode_chunk(kind, body).map(|m| (m, total));
    }
    let (message, used): (Message, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    if Kind::of(&message) != kind {
        return Err(CodecError::Malformed(
            "frame kind does not match its body".into(),
        ));
    }
    Ok((message, total))
}

/// [`decode_frame`] of a whole frame the caller owns: a chunk's data keeps the frame's
/// allocation (its head is cut off in place) instead of being copied.
pub fn decode_frame_owned(mut frame: Vec<u8>) -> Result<Message, CodecError> {
    let chunk = matches!(frame.get(6), Some(0x10 | 0x12));
    if !chunk {
        return decode_frame(&frame).and_then(|(m, used)| {
            if used == frame.len() {
                Ok(m)
            } else {
                Err(CodecError::TrailingBytes(frame.len() - used))
            }
        });
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(
        frame
            .get(..HEADER_LEN)
            .ok_or(CodecError::Incomplete { needed: HEADER_LEN })?,
    );
    let body = check_header(&header)?;
    if frame.len() != HEADER_LEN + body {
        return Err(CodecError::Malformed(
            "frame length differs from its header".into(),
        ));
    }
    let short = || CodecError::Malformed("chunk frame shorter than its head".into());
    let n = frame
        .get(HEADER_LEN..HEADER_LEN + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(short)?;
    let head_bytes = frame
        .get(HEADER_LEN + 2..HEADER_LEN + 2 + n)
        .ok_or_else(short)?;
    let (head, used): (crate::training::ChunkHead, usize) =
        bincode::serde::decode_from_slice(head_bytes, config())
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != n {
        return Err(CodecError::TrailingBytes(n - used));
    }
    frame.drain(..HEADER_LEN + 2 + n);
    let c = Box::new(crate::training::Chunk {
        head,
        data: frame,
        digest: None,
    });
    Ok(if header[6] == 0x10 {
        Message::PutChunk(c)
    } else {
        Message::ModelChunk(c)
    })
}

fn decode_chunk(kind: Kind, body: &[u8]) -> Result<Message, CodecError> {
    let short = || CodecError::Malformed("chunk frame shorter than its head".into());
    let n = body
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(short)?;
    let head_bytes = body.get(2..2 + n).ok_or_else(short)?;
    let (head, used): (crate::training::ChunkHead, usize) =
        bincode::serde::decode_from_slice(head_bytes, config())
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != n {
        return Err(CodecError::TrailingBytes(n - used));
    }
    let chunk = Box::new(crate::training::Chunk {
        head,
        data: body[2 + n..].to_vec(),
        digest: None,
    });
    Ok(match kind {
        Kind::PutChunk => Message::PutChunk(chunk),
        _ => Message::ModelChunk(chunk),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use proptest::prelude::*;

    fn site() -> impl Strategy<Value = SiteId> {
        "[a-z0-9-]{1,32}".prop_map(|s| SiteId::new(&s).expect("valid by construction"))
    }

    fn hash() -> impl Strategy<Value = Option<SchemaHash>> {
        proptest::option::of(any::<[u8; 32]>().prop_map(SchemaHash))
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<u16>(), any::<u16>(), site(), hash()).prop_map(
                |(id, a, b, site, schema)| {
                    Message::Hello(Hello {
                        id: MessageId(id),
                        min_version: a,
                        max_version: b,
                        site,
                        schema,
                    })
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u16>(),
                hash(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(id, r, v, schema, round, model)| {
                    Message::Welcome(Welcome {
                        id: MessageId(id),
                        reply_to: MessageId(r),
                        version: v,
                        schema,
                        round,
                        model,
                    })
                }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u16>(),
                any::<u16>(),
                0..3u8
            )
                .prop_map(|(id, r, a, b, k)| {
                    let reason = match k {
                        0 => HandshakeReject::UnsupportedVersion {
                            min_version: a,
                            max_version: b,
                        },
                        1 => HandshakeReject::UnknownSite,
                        _ => HandshakeReject::AlreadyConnected,
                    };
                    Message::Reject {
                        id: MessageId(id),
                        reply_to: MessageId(r),
                        reason,
                    }
                }),
        ]
    }

    fn cell() -> impl Strategy<Value = crate::aggregate::Cell> {
        use crate::aggregate::Cell;
        prop_oneof![any::<u64>().prop_map(Cell::Value), Just(Cell::Suppressed)]
    }

    fn cells(n: usize) -> impl Strategy<Value = Vec<crate::aggregate::Cell>> {
        proptest::collection::vec(cell(), 0..n)
    }

    fn moments() -> impl Strategy<Value = crate::aggregate::Moments> {
        (
            any::<u64>(),
            any::<i64>(),
            any::<i64>(),
            any::<Option<i64>>(),
            any::<Option<i64>>(),
        )
            .prop_map(|(patients, sum, sum_squares, low, high)| {
                crate::aggregate::Moments {
                    patients,
                    sum,
                    sum_squares,
                    low,
                    high,
                }
            })
    }

    fn aggregates() -> impl Strategy<Value = crate::aggregate::SiteAggregates> {
        use crate::aggregate::*;
        use crate::summary::*;
        (
            any::<u32>(),
            cell(),
            cell(),
            proptest::collection::vec(cells(8).prop_map(|cells| CountTable { cells }), 0..4),
            proptest::collection::vec(cells(12), 0..4),
            proptest::collection::vec(
                (0..Quantity::ALL.len(), proptest::option::of(moments()))
                    .prop_map(|(q, m)| (Quantity::ALL[q], m)),
                0..6,
            ),
            proptest::option::of(
                (
                    any::<u64>(),
                    proptest::array::uniform11(any::<i64>()),
                    any::<u64>(),
                )
                    .prop_map(|(patients, landmark_sums, volumes)| NyulRelease {
                        patients,
                        summary: NyulSummary {
                            landmark_sums,
                            volumes,
                        },
                    }),
            ),
            proptest::option::of(
                (
                    any::<u64>(),
                    any::<bool>(),
                    any::<i64>(),
                    proptest::collection::vec(any::<u64>(), 0..64),
                )
                    .prop_map(|(patients, trimmed, sum, histogram)| CtRelease {
                        patients,
                        trimmed,
                        summary: CtSummary {
                            count: patients,
                            sum,
                            sum_squares: sum,
                            histogram,
                        },
                    }),
            ),
        )
            .prop_map(
                |(k, patients, series, counts, histograms, moments, nyul, ct)| SiteAggregates {
                    k,
                    patients,
                    series,
                    counts,
                    histograms,
                    moments,
                    nyul,
                    noise: (k % 2 == 1).then_some(NoiseApplied {
                        mechanism: if k % 4 == 1 {
                            Mechanism::DiscreteLaplace
                        } else {
                            Mechanism::DiscreteGaussian
                        },
                        epsilon_micro: u64::from(k),
                        delta_pico: u64::from(k) * 3,
                    }),
                    ct,
                },
            )
    }

    fn later() -> impl Strategy<Value = Message> {
        use crate::aggregate::*;
        let hash32 = any::<[u8; 32]>().prop_map(SchemaHash);
        prop_oneof![
            any::<u64>().prop_map(|id| Message::FetchSchema { id: MessageId(id) }),
            (any::<u64>(), any::<u64>(), 0..2usize).prop_map(|(id, r, extra)| {
                let text = format!("{}{}", crate::schema::tests::EXAMPLE, "\n".repeat(extra));
                Message::Schema {
                    id: MessageId(id),
                    reply_to: MessageId(r),
                    document: SchemaDocument::new(&text).expect("the example is valid"),
                }
            }),
            (
                any::<u64>(),
                hash32.clone(),
                proptest::collection::vec(any::<u16>(), 0..4),
                cell(),
                proptest::array::uniform3(cell()),
                cells(6),
                proptest::array::uniform3(cell()),
                cell()
            )
                .prop_map(
                    |(id, schema, missing, patients, status, deviations, findings, quarantined)| {
                        Message::SchemaAck(Box::new(SchemaAck {
                            id: MessageId(id),
                            schema,
                            profile: ProfileCheck { missing },
                            conformance: ConformanceSummary {
                                patients,
                                status,
                                deviations,
                                findings,
                                quarantined,
                            },
                        }))
                    }
                ),
            (any::<u64>(), hash32.clone(), any::<u32>(), aggregates()).prop_map(
                |(id, schema, round, aggregates)| Message::Report(Box::new(AggregateReport {
                    id: MessageId(id),
                    schema,
                    round,
                    aggregates,
                }))
            ),
            (any::<u64>(), hash32.clone(), any::<u32>(), 0..3u8).prop_map(
                |(id, schema, round, r)| Message::Refusal(Refusal {
                    id: MessageId(id),
                    schema,
                    round,
                    reason: match r {
                        0 => RefusalReason::BudgetExhausted,
                        1 => RefusalReason::Differencing,
                        _ => RefusalReason::AwaitingApproval,
                    },
                })
            ),
            (
                any::<u64>(),
                hash32.clone(),
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec((site(), any::<[u8; 32]>()), 0..5),
                proptest::collection::vec(any::<u64>(), 0..64)
            )
                .prop_map(|(id, schema, round, session, keys, vector)| {
                    let keys: Vec<crate::secure::PeerKey> = keys
                        .into_iter()
                        .map(|(peer, public)| crate::secure::PeerKey { peer, public })
                        .collect();
                    match id % 5 {
                        0 => Message::SecureKeys(Box::new(SecureKeys {
                            id: MessageId(id),
                            schema,
                            round,
                            session,
                            keys,
                            certificate: vector.iter().map(|w| *w as u8).collect(),
                            signature: vec![session as u8; 64],
                        })),
                        1 => Message::PeerKeys(Box::new(PeerKeys {
                            id: MessageId(id),
                            reply_to: MessageId(round.into()),
                            session,
                            signed: keys
                                .iter()
                                .map(|k| crate::secure::SignedKeys {
                                    site: k.peer.clone(),
                                    certificate: k.public.to_vec(),
                                    keys: vec![k.clone()],
                                    signature: vec![1; 70],
                                })
                                .collect(),
                            crl: vector.iter().map(|w| *w as u8).collect(),
                        })),
                        2 => Message::MaskedReport(Box::new(MaskedReport {
                            id: MessageId(id),
                            schema,
                            round,
                            session,
                            k: session,
                            noise: None,
                            vector,
                        })),
                        3 => Message::SecureSession(SecureSession {
                            id: MessageId(id),
                            reply_to: MessageId(1),
                            round,
                            session,
                            participants: keys.into_iter().map(|k| k.peer).collect(),
                            complete: session % 2 == 0,
                        }),
                        _ => Message::FetchPeerKeys {
                            id: MessageId(id),
                            schema,
                            round,
                            session,
                        },
                    }
                }),
            (any::<u64>(), hash32.clone(), any::<u32>()).prop_map(|(id, schema, round)| {
                Message::SecureJoin {
                    id: MessageId(id),
                    schema,
                    round,
                }
            }),
            (any::<u64>(), hash32.clone()).prop_map(|(id, schema)| Message::FetchModel {
                id: MessageId(id),
                schema
            }),
            (
                any::<u64>(),
                any::<u64>(),
                hash32,
                any::<u32>(),
                any::<u32>(),
                proptest::array::uniform11(any::<i64>()),
                any::<u64>()
            )
                .prop_map(
                    |(id, r, schema, revision, sites, landmark_sums, volumes)| {
                        Message::Model(Box::new(ModelPublication {
                            id: MessageId(id),
                            reply_to: MessageId(r),
                            schema,
                            revision,
                            sites,
                            fit: FederatedFit::Nyul(crate::summary::NyulSummary {
                                landmark_sums,
                                volumes,
                            }),
                        }))
                    }
                ),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(id, r, duplicate)| {
                Message::Ack {
                    id: MessageId(id),
                    reply_to: MessageId(r),
                    duplicate,
                }
            }),
            (any::<u64>(), proptest::option::of(any::<u64>()), 0..8u8).prop_map(|(id, r, c)| {
                let code = match c {
                    0 => ErrorCode::BadFrame,
                    1 => ErrorCode::NotWelcomed,
                    2 => ErrorCode::SchemaMismatch,
                    3 => ErrorCode::WrongRound,
                    4 => ErrorCode::Privacy(PrivacyViolation::SmallCell),
                    5 => ErrorCode::NotReady,
                    6 => ErrorCode::NotAcknowledged,
                    _ => ErrorCode::Unexpected,
                };
                Message::Error {
                    id: MessageId(id),
                    reply_to: r.map(MessageId),
                    code,
                }
            }),
        ]
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![message(), later()]
    }

    proptest! {
        #[test]
        fn every_later_message_round_trips(m in later()) {
            let frame = encode_frame(&m).expect("encodes");
            let (back, used) = decode_frame(&frame).expect("decodes");
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, m);
        }

        #[test]
        fn mutated_frames_never_panic(
            m in any_message(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)
        ) {
            let mut frame = encode_frame(&m).expect("encodes");
            for (at, b) in flips {
                let i = at % frame.len();
                frame[i] ^= b;
            }
            let _ = decode_frame(&frame);
        }

        #[test]
        fn every_message_round_trips(m in message()) {
            let frame = encode_frame(&m).expect("encodes");
            let (back, used) = decode_frame(&frame).expect("decodes");
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, m);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn truncated_frames_say_incomplete(m in message(), cut in 1usize..20) {
            let frame = encode_frame(&m).expect("encodes");
            let cut = cut.min(frame.len());
            let r = decode_frame(&frame[..frame.len() - cut]);
            let incomplete = matches!(r, Err(CodecError::Incomplete { .. }));
            prop_assert!(incomplete, "expected Incomplete, got {:?}", r);
        }
    }

    #[test]
    fn oversize_unknown_reserved_and_version_are_typed_errors() {
        let mut big = vec![0u8; 7];
        big[..4].copy_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
        assert!(matches!(
            decode_frame(&big),
            Err(CodecError::Oversize { .. })
        ));
        let hello_oversize = [
            &(5000u32).to_be_bytes()[..],
            &PROTOCOL_VERSION.to_be_bytes(),
            &[0x01],
        ]
        .concat();
        assert_eq!(
            decode_frame(&hello_oversize),
            Err(CodecError::Oversize {
                len: 4997,
                limit: 1024
            })
        );
        let unknown = [
            &3u32.to_be_bytes()[..],
            &PROTOCOL_VERSION.to_be_bytes(),
            &[0x7F],
        ]
        .concat();
        assert_eq!(decode_frame(&unknown), Err(CodecError::UnknownKind(0x7F)));
        let reserved = [
            &3u32.to_be_bytes()[..],
            &PROTOCOL_VERSION.to_be_bytes(),
            &[0x1F],
        ]
        .concat();
        assert_eq!(decode_frame(&reserved), Err(CodecError::ReservedKind(0x1F)));
        let future = [&3u32.to_be_bytes()[..], &99u16.to_be_bytes(), &[0x01]].concat();
        assert_eq!(
            decode_frame(&future),
            Err(CodecError::UnsupportedVersion(99))
        );
    }

    #[test]
    fn a_body_of_the_wrong_kind_is_refused() {
        let m = Message::Reject {
            id: MessageId(1),
            reply_to: MessageId(2),
            reason: HandshakeReject::UnknownSite,
        };
        let mut frame = encode_frame(&m).expect("encodes");
        frame[6] = 0x01; // claims to be a Hello
        assert!(matches!(
            decode_frame(&frame),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn site_ids_are_validated_on_decode() {
        let m = Message::Hello(Hello {
            id: MessageId(1),
            min_version: 1,
            max_version: 1,
            site: SiteId::new("abc").expect("valid"),
            schema: None,
        });
        let mut frame = encode_frame(&m).expect("encodes");
        // Patch the site id bytes "abc" to "A c" in place.
        let pos = frame
            .windows(3)
            .position(|w| w == b"abc")
            .expect("site id in frame");
        frame[pos] = b'A';
        assert!(matches!(
            decode_frame(&frame),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn chunk_frames_carry_their_bytes_and_refuse_what_is_too_large() {
        use crate::training::{Chunk, ChunkHead, JobHash};
        let head = ChunkHead {
            id: MessageId(7),
            job: JobHash([9; 32]),
            round: 3,
            attempt: 1,
            index: 12,
        };
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let m = Message::PutChunk(Box::new(Chunk {
            head: head.clone(),
            data: data.clone(),
            digest: None,
        }));
        let frame = encode_frame(&m).expect("encodes");
        let (back, used) = decode_frame(&frame).expect("decodes");
        assert_eq!(used, frame.len());
        assert_eq!(back, m);
        assert_eq!(decode_frame_owned(frame.clone()).expect("decodes"), m);
        // A model chunk of the same head is another kind.
        let mc = Message::ModelChunk(Box::new(Chunk {
            head,
            data,
            digest: None,
        }));
        assert_ne!(encode_frame(&mc).expect("encodes")[6], frame[6]);
        // A head cut short is malformed; a body beyond 8 MiB is refused from the header.
        let mut cut = frame[..7].to_vec();
        cut.extend_from_slice(&[0, 200, 1, 2]);
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(decode_frame(&cut), Err(CodecError::Malformed(_))));
        let mut big = [0u8; FRAME_HEADER_LEN];
        big[..4].copy_from_slice(&((CHUNK_BODY_LIMIT + 4) as u32).to_be_bytes());
        big[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        big[6] = 0x10;
        assert!(matches!(
            check_header(&big),
            Err(CodecError::Oversize { .. })
        ));
    }
}
