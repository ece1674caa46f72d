//! Keyed derivations: UID remapping, patient pseudonyms, date shifts and output path tokens.
//!
//! Every derivation is an HMAC-SHA-256 under a sub-key of the secret, with a distinct label per
//! purpose, so a value learnt in one role (a path token, say) says nothing about another (a
//! UID). Pseudonymisation uses the site secret (stable across batches); anonymisation uses a
//! fresh random secret that lives only in memory for one run.

use std::fmt;
use std::ops::RangeInclusive;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Minimum length of a site secret in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Errors about secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "site secret is {0} bytes; it must be at least {MIN_SECRET_LEN} bytes of random data (hex-encoded in the file)"
    )]
    TooShort(usize),
    #[error(
        "site secret file is not hex: write {MIN_SECRET_LEN} or more random bytes as hex digits, e.g. `fedcurate-node secret generate`"
    )]
    NotHex,
    #[error("the system random number generator failed")]
    Random,
}

/// A secret the keyed derivations are made from. Its bytes never leave this type: `Debug`
/// prints only a fingerprint.
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wrap raw secret bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SecretError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// Parse the hex text of a secret file (whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, SecretError> {
        let hex: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !hex.len().is_multiple_of(2) {
            return Err(SecretError::NotHex);
        }
        let mut out = Vec::with_capacity(hex.len() / 2);
        for pair in hex.chunks(2) {
            let s = std::str::from_utf8(pair).map_err(|_| SecretError::NotHex)?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| SecretError::NotHex)?);
        }
        Self::from_bytes(out)
    }

    /// A fresh random secret (anonymisation, or a new site).
    pub fn random() -> Result<Self, SecretError> {
        let mut b = vec![0u8; MIN_SECRET_LEN];
        SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| SecretError::Random)?;
        Ok(Self(b))
    }

    /// Hex text for a secret file.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A key derived from this secret under `label` (HMAC-SHA-256), for uses outside
    /// de-identification (the audit chain's key); the secret itself never leaves.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&root, label.as_bytes()).as_ref());
        out
    }

    /// A short, non-reversible fingerprint, safe to log.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex(&d.as_ref()[..6])
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(fingerprint {})", self.fingerprint())
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A patient pseudonym: derived from the original identity, written to Patient ID and
/// Patient's Name, safe to log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pseudonym(String);

impl Pseudonym {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What identifies a patient in the original object, in order of preference.
#[derive(Clone, PartialEq, Eq)]
pub enum PatientIdentity {
    /// Patient ID with its issuer (empty when absent).
    Id { id: String, issuer: String },
    /// No Patient ID: name and birth date.
    NameAndBirthDate { name: String, birth_date: String },
    /// Neither: the study stands in for the patient.
    Study(String),
}

impl fmt::Debug for PatientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the identifying values.
        let kind = match self {
            Self::Id { .. } => "Id",
            Self::NameAndBirthDate { .. } => "NameAndBirthDate",
            Self::Study(_) => "Study",
        };
        write!(f, "PatientIdentity::{kind}(..)")
    }
}

impl PatientIdentity {
    fn encode(&self) -> Vec<u8> {
        // Length-prefixed fields so ("ab","c") and ("a","bc") differ.
        let mut out = Vec::new();
        let mut field = |s: &str| {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        match self {
            Self::Id { id, issuer } => {
                field("id");
                field(id);
                field(issuer);
            }
            Self::NameAndBirthDate { name, birth_date } => {
                field("name");
                field(name);
                field(birth_date);
            }
            Self::Study(uid) => {
                field("study");
                field(uid);
            }
        }
        out
    }
}

/// The original identifiers of a patient. Never logged: `Debug` prints nothing of them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OriginalIdentity {
    pub patient_id: String,
    pub issuer: String,
    pub name: String,
    pub birth_date: String,
}

impl fmt::Debug for OriginalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OriginalIdentity(..)")
    }
}

/// The sub-keys derived from a secret.
pub struct Keys {
    uid: hmac::Key,
    patient: hmac::Key,
    date: hmac::Key,
    path: hmac::Key,
    token: hmac::Key,
    input: hmac::Key,
    locator: hmac::Key,
    report: hmac::Key,
    fingerprint: String,
}

/// Short keyed tokens of (de-identified) UIDs for reports, exports and harmonised file names:
/// never a plain hash that anyone holding the value (with Retain UIDs, the original) could
/// recompute.
#[derive(Clone)]
pub struct Tokens(hmac::Key);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tokens(..)")
    }
}

impl Tokens {
    /// 12 hex digits for `value`.
    pub fn token(&self, value: &str) -> String {
        hex(&hmac::sign(&self.0, value.trim_end_matches(['\0', ' ']).as_bytes()).as_ref()[..6])
    }

    /// Tokens under a fresh random key (benches and tests that compare no tokens across runs).
    pub fn ephemeral() -> Tokens {
        let mut b = [0u8; 32];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        Tokens(hmac::Key::new(hmac::HMAC_SHA256, &b))
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys(secret fingerprint {})", self.fingerprint)
    }
}

impl Keys {
    /// Derive the sub-keys of a secret.
    pub fn derive(secret: &Secret) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &secret.0);
        let sub = |label: &str| {
            let tag = hmac::sign(&root, label.as_bytes());
            hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref())
        };
        Keys {
            uid: sub("fedcurate/v1/uid"),
            patient: sub("fedcurate/v1/patient"),
            date: sub("fedcurate/v1/date-shift"),
            path: sub("fedcurate/v1/path"),
            token: sub("fedcurate/v1/token"),
            input: sub("fedcurate/v1/input"),
            locator: sub("fedcurate/v1/input-path"),
            report: sub("fedcurate/v1/report"),
            fingerprint: secret.fingerprint(),
        }
    }

    /// The new UID for an original UID: `2.25.` followed by the decimal value of 128 keyed
    /// bits (PS3.5 B.2 form, at most 44 characters, no leading zeros).
    pub fn remap_uid(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches(['\0', ' ']);
        let tag = hmac::sign(&self.uid, uid.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&tag.as_ref()[..16]);
        format!("2.25.{}", u128::from_be_bytes(b))
    }

    /// The pseudonym of a patient: `P` and 16 upper-case hex digits.
    pub fn pseudonym(&self, identity: &PatientIdentity) -> Pseudonym {
        let tag = hmac::sign(&self.patient, &identity.encode());
        Pseudonym(format!("P{}", hex(&tag.as_ref()[..8]).to_uppercase()))
    }

    /// Days to shift every date of the patient back by, within `range`.
    pub fn date_shift_days(&self, identity: &PatientIdentity, range: &RangeInclusive<u32>) -> u32 {
        let tag = hmac::sign(&self.date, &identity.encode());
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        let span = u64::from(range.end().saturating_sub(*range.start())) + 1;
        range.start() + (u64::from_be_bytes(b) % span) as u32
    }

    /// A 16-hex-digit path component for an original value (study or series UID, ...).
    pub fn path_token(&self, kind: &str, value: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.path);
        ctx.update(kind.as_bytes());
        ctx.update(&[0]);
        ctx.update(value.trim_end_matches(['\0', ' ']).as_bytes());
        hex(&ctx.sign().as_ref()[..8])
    }

    /// A short consistent replacement token for a cleaned value (AE titles and the like),
    /// `prefix` followed by hex, at most `max_len` characters.
    pub fn token(&self, prefix: &str, value: &str, max_len: usize) -> String {
        let tag = hmac::sign(&self.token, value.trim_end_matches(['\0', ' ']).as_bytes());
        let mut s = format!("{prefix}{}", hex(&tag.as_ref()[..8]).to_uppercase());
        s.truncate(max_len);
        s
    }

    /// The catalog's marker of an input file, from its SHA-256 (hex): keyed, so that whoever
    /// holds a copy of the original (the patient's CD) cannot find its row, its quarantine
    /// entry or its pseudonym by hashing it. Under anonymisation the keys come from a secret
    /// that is discarded after the run: the marker then links nothing to anything.
    pub fn input_marker(&self, sha256_hex: &str) -> String {
        hex(hmac::sign(&self.input, sha256_hex.as_bytes()).as_ref())
    }

    /// The catalog's marker of an input's path relative to the input folder (32 hex digits).
    pub fn path_marker(&self, relative: &str) -> String {
        hex(&hmac::sign(&self.locator, relative.as_bytes()).as_ref()[..16])
    }

    /// Keyed tokens for reports, exports and harmonised paths.
    pub fn tokens(&self) -> Tokens {
        Tokens(self.report.clone())
    }

    /// Fingerprint of the secret these keys come from.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> Keys {
        Keys::derive(&Secret::from_bytes(vec![seed; 32]).expect("32 bytes"))
    }

    #[test]
    fn uids_are_valid_consistent_and_keyed() {
        let k = keys(1);
        let a = k.remap_uid("1.2.3.4");
        assert_eq!(a, k.remap_uid("1.2.3.4\0"));
        assert_ne!(a, k.remap_uid("1.2.3.5"));
        assert_ne!(a, keys(2).remap_uid("1.2.3.4"));
        assert!(a.starts_with("2.25.") && a.len() <= 64);
        for comp in a.split('.') {
            assert!(!comp.is_empty() && comp.chars().all(|c| c.is_ascii_digit()));
            assert!(comp == "0" || !comp.starts_with('0'));
        }
    }

    #[test]
    fn uid_remapping_has_no_collisions_over_many_inputs() {
        let k = keys(3);
        let mut seen = std::collections::HashSet::new();
        for i in 0..200_000u32 {
            assert!(seen.insert(k.remap_uid(&format!("1.2.826.0.1.{i}"))));
        }
    }

    #[test]
    fn pseudonyms_and_shifts_depend_on_identity_and_key() {
        let k = keys(1);
        let a = PatientIdentity::Id {
            id: "12345".into(),
            issuer: "".into(),
        };
        let b = PatientIdentity::Id {
            id: "1234".into(),
            issuer: "5".into(),
        };
        assert_ne!(k.pseudonym(&a), k.pseudonym(&b));
        assert_eq!(k.pseudonym(&a), keys(1).pseudonym(&a));
        assert_ne!(k.pseudonym(&a), keys(2).pseudonym(&a));
        assert_eq!(k.pseudonym(&a).as_str().len(), 17);
        let range = 10..=20;
        for i in 0..100 {
            let id = PatientIdentity::Id {
                id: i.to_string(),
                issuer: String::new(),
            };
            let d = k.date_shift_days(&id, &range);
            assert!(range.contains(&d));
        }
        assert!(!format!("{a:?}").contains("12345"));
    }

    #[test]
    fn secrets_parse_from_hex_and_refuse_short_ones() {
        let s = Secret::random().expect("rng");
        let back = Secret::from_hex(&format!("{}\n", s.to_hex())).expect("hex");
        assert_eq!(back.to_hex(), s.to_hex());
        assert!(matches!(
            Secret::from_hex("abcd"),
            Err(SecretError::TooShort(2))
        ));
        assert!(matches!(Secret::from_hex("zz"), Err(SecretError::NotHex)));
        assert!(!format!("{s:?}").contains(&s.to_hex()));
    }
}
