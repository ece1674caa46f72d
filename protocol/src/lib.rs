//! fedcurate's wire protocol: the only types that may cross between a site node and the
//! coordinator, and their framing.
//!
//! This crate is the floor of the workspace: it depends on no other member and does no file,
//! DICOM or network I/O. Its types can hold schema items, aggregates, pseudonymous keys and
//! (later) tensors — never free text, a pixel buffer, a DICOM element, a date or an identifier
//! of a patient, study, series or file. Only [`codec`] names the encoding.

pub mod aggregate;
pub mod codec;
pub mod fuzzing;
pub mod ids;
pub mod message;
pub mod schema;
pub mod secure;
pub mod summary;
pub mod training;

pub use codec::{
    ALPN, CodecError, FRAME_HEADER_LEN, MAX_FRAME_LEN, check_header, decode_frame, encode_frame,
};
pub use message::{
    AggregateReport, ErrorCode, FederatedFit, HandshakeReject, Hello, MaskedReport, Message,
    MessageId, ModelPublication, PROTOCOL_VERSION, PeerKeys, Refusal, SchemaAck, SchemaDocument,
    SchemaHash, SecureKeys, SecureSession, SiteId, SiteIdError, TrainingError, Welcome,
};
