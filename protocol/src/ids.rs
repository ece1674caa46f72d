//! The identifiers every other module names: message ids, schema hashes, site ids. Kept
//! apart so that the schema, the secure-aggregation encoding and the messages depend on them
//! without depending on each other.

use std::fmt;

use serde::{Deserialize, Serialize};

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
