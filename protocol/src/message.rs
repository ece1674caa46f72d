//! The messages. The first exchange on every connection is [`Hello`] → [`Welcome`] or
//! [`HandshakeReject`]; later issues add schema publication, aggregate requests and reports,
//! and chunked tensor transfer as new variants of [`Message`] (their kinds are reserved in
//! [`crate::codec`], so adding them is not a version break).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of the wire protocol this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Identifier of a message, unique per sender, so that a retried send is applied once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub u64);

/// SHA-256 of a consortium curation schema document.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaHash(pub [u8; 32]);

impl fmt::Debug for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// A site's name in the consortium: 1–32 characters of `a-z`, `0-9` and `-`, assigned by the
/// consortium (it also appears in the site's certificate). It names a hospital node, never a
/// patient, and its alphabet leaves no room for free text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SiteId(String);

/// A site name outside the allowed alphabet or length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("site id must be 1-32 characters of a-z, 0-9 and '-' (got {len} characters)")]
pub struct SiteIdError {
    len: usize,
}

impl SiteId {
    /// Validate a site name.
    pub fn new(name: &str) -> Result<Self, SiteIdError> {
        let ok = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(SiteId(name.to_owned()))
        } else {
            Err(SiteIdError { len: name.len() })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SiteId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SiteId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
}

/// Why the coordinator refused a node at the first exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeReject {
    /// No version in common; the coordinator's range is given so the node can say which
    /// side to upgrade.
    UnsupportedVersion { min_version: u16, max_version: u16 },
    /// The site is not registered with this consortium.
    UnknownSite,
    /// The site is already connected on another connection.
    AlreadyConnected,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Reject {
        id: MessageId,
        reply_to: MessageId,
        reason: HandshakeReject,
    },
}

impl Message {
    /// The message's own id.
    pub fn id(&self) -> MessageId {
        match self {
            Message::Hello(h) => h.id,
            Message::Welcome(w) => w.id,
            Message::Reject { id, .. } => *id,
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
