//! The re-identification map: pseudonym → original patient identifiers, encrypted with
//! AES-256-GCM under a key kept in its own file (not the site secret, not in the catalog).
//! The pseudonym is the associated data, so an entry cannot be moved to another pseudonym.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

pub use fc_deid::keys::OriginalIdentity;

/// Vault errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error(
        "vault key file must hold exactly 32 bytes as 64 hex digits; create one with `fedcurate-node secret generate --out FILE`"
    )]
    BadKey,
    #[error(
        "the re-identification map entry does not decrypt with this key: wrong vault key, or the entry was altered"
    )]
    WrongKey,
    #[error("the system random number generator failed")]
    Random,
}

/// The vault key.
pub struct VaultKey(LessSafeKey);

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKey(..)")
    }
}

impl VaultKey {
    /// Parse a key file's hex text.
    pub fn from_hex(text: &str) -> Result<Self, VaultError> {
        let hex: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if hex.len() != 64 {
            return Err(VaultError::BadKey);
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| VaultError::BadKey)?;
            bytes[i] = u8::from_str_radix(s, 16).map_err(|_| VaultError::BadKey)?;
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| VaultError::BadKey)?;
        Ok(VaultKey(LessSafeKey::new(key)))
    }
}

/// An encrypted map entry: (nonce, ciphertext with tag).
pub type SealedEntry = (Vec<u8>, Vec<u8>);

/// Write a secret file (hex), owner-only, refusing to overwrite.
pub fn write_secret_file(
    path: &std::path::Path,
    secret: &fc_deid::keys::Secret,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    std::io::Write::write_all(&mut f, format!("{}\n", secret.to_hex()).as_bytes())?;
    f.sync_all()
}

/// What is known of a patient after seeing `new`: fields empty so far are filled from it
/// (objects of one patient do not all carry every identifier).
pub fn merge(known: Option<&OriginalIdentity>, new: &OriginalIdentity) -> OriginalIdentity {
    let Some(k) = known else {
        return new.clone();
    };
    let pick = |a: &String, b: &String| if a.is_empty() { b.clone() } else { a.clone() };
    OriginalIdentity {
        patient_id: pick(&k.patient_id, &new.patient_id),
        issuer: pick(&k.issuer, &new.issuer),
        name: pick(&k.name, &new.name),
        birth_date: pick(&k.birth_date, &new.birth_date),
    }
}

/// Encrypt the identity of `pseudonym`: returns (nonce, ciphertext with tag).
pub fn seal(
    key: &VaultKey,
    pseudonym: &str,
    identity: &OriginalIdentity,
) -> Result<(Vec<u8>, Vec<u8>), VaultError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| VaultError::Random)?;
    let mut data = serde_json::to_vec(identity).map_err(|_| VaultError::Random)?;
    key.0
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(pseudonym.as_bytes()),
            &mut data,
        )
        .map_err(|_| VaultError::Random)?;
    Ok((nonce.to_vec(), data))
}

/// Decrypt an entry.
pub fn open(
    key: &VaultKey,
    pseudonym: &str,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<OriginalIdentity, VaultError> {
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| VaultError::WrongKey)?;
    let mut data = ciphertext.to_vec();
    let plain = key
        .0
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(pseudonym.as_bytes()),
            &mut data,
        )
        .map_err(|_| VaultError::WrongKey)?;
    serde_json::from_slice(plain).map_err(|_| VaultError::WrongKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> VaultKey {
        VaultKey::from_hex(&format!("{b:02x}").repeat(32)).expect("key")
    }

    #[test]
    fn round_trip_wrong_key_and_moved_entry() {
        let id = OriginalIdentity {
            patient_id: "MRN-1".into(),
            issuer: "H".into(),
            name: "Doe^Jane".into(),
            birth_date: "19560312".into(),
        };
        let (n, c) = seal(&key(1), "PABC", &id).expect("seal");
        assert!(
            !c.windows(5).any(|w| w == b"MRN-1"),
            "ciphertext hides the identifiers"
        );
        assert_eq!(open(&key(1), "PABC", &n, &c), Ok(id));
        assert_eq!(open(&key(2), "PABC", &n, &c), Err(VaultError::WrongKey));
        assert_eq!(open(&key(1), "PXYZ", &n, &c), Err(VaultError::WrongKey));
        assert!(VaultKey::from_hex("abcd").is_err());
        assert!(!format!("{:?}", OriginalIdentity::default()).contains("patient_id"));
    }
}
