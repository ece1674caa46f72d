//! Framing: `[u32 length, big endian][u16 protocol version][u8 kind][bincode body]`.
//!
//! The length covers version, kind and body. Each kind has its own size limit, checked from
//! the header before any body is decoded; bincode itself decodes with the same limit, so a
//! hostile length field inside the body cannot make it allocate more. Kinds 0x10–0x1F are
//! reserved for chunked tensor transfer and 0x20–0x3F for schema and aggregate messages, so
//! adding them later does not change the meaning of existing frames.

use crate::message::{Message, PROTOCOL_VERSION};

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
}

impl Kind {
    fn of(m: &Message) -> Self {
        match m {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Reject { .. } => Kind::Reject,
        }
    }

    fn from_byte(b: u8) -> Result<Self, CodecError> {
        match b {
            0x01 => Ok(Kind::Hello),
            0x02 => Ok(Kind::Welcome),
            0x03 => Ok(Kind::Reject),
            0x10..=0x3F => Err(CodecError::ReservedKind(b)),
            _ => Err(CodecError::UnknownKind(b)),
        }
    }

    /// Largest body this kind may have.
    fn limit(self) -> usize {
        match self {
            Kind::Hello | Kind::Welcome | Kind::Reject => 1024,
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
        .with_limit::<{ 1024 * 1024 }>()
}

/// Encode one message as a frame.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, CodecError> {
    let kind = Kind::of(message);
    let body = bincode::serde::encode_to_vec(message, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
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
            (any::<u64>(), any::<u64>(), any::<u16>(), hash()).prop_map(|(id, r, v, schema)| {
                Message::Welcome(Welcome {
                    id: MessageId(id),
                    reply_to: MessageId(r),
                    version: v,
                    schema,
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

    proptest! {
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
            &[0x10],
        ]
        .concat();
        assert_eq!(decode_frame(&reserved), Err(CodecError::ReservedKind(0x10)));
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
}
