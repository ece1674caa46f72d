//! The audit chain: every run, quarantine release and re-identification is recorded, each
//! entry MACed (HMAC-SHA-256 under the audit key) together with the previous entry's MAC, so
//! that editing, removing or reordering an entry breaks the chain at that point, and nobody
//! without the key (a writer of the catalog file alone) can recompute it. The head of the
//! chain (its last entry's number and MAC, MACed again) is also kept beside the catalog in
//! `audit.head`: cutting entries off the end breaks verification too. Entries hold no
//! identifying value: counts, pseudonyms, keyed markers, option names; the actor is the
//! operating-system user with its uid and login uid.
//!
//! The key comes from the node's configuration (`audit_key_file`, or a sub-key of the site
//! secret), both meant to live outside the data directory. Entries written before the chain
//! was keyed (no `k1:` prefix) are verified as the plain SHA-256 chain they were, and only as
//! the start of the chain.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;

use fc_deid::keys::hex;

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Prefix of the MAC of keyed entries.
const KEYED: &str = "k1:";

/// What is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// UTC time, RFC 3339.
    pub at: String,
    /// Operating-system user who ran the command, with uid and login uid.
    pub actor: String,
    /// `run`, `quarantine-release`, `reidentify`, `secret-restore`, ...
    pub action: String,
    /// JSON object with the details (no identifying value).
    pub detail: String,
}

impl AuditRecord {
    /// A record made now by the current user.
    pub fn now(action: &str, detail: serde_json::Value) -> Self {
        AuditRecord {
            at: utc_now(),
            actor: actor(),
            action: action.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// A stored entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: i64,
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

/// The key entries are MACed with.
#[derive(Clone)]
pub struct AuditKey(hmac::Key);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// A key from secret bytes (a key file's, or a sub-key of the site secret).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        AuditKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The audit key derived from a secret (label `fedcurate/v1/audit`).
    pub fn from_secret(secret: &fc_deid::keys::Secret) -> Self {
        Self::from_bytes(&secret.derive("fedcurate/v1/audit"))
    }
}

fn parts(seq: i64, prev: &str, r: &AuditRecord) -> Vec<Vec<u8>> {
    [
        seq.to_string().as_str(),
        prev,
        &r.at,
        &r.actor,
        &r.action,
        &r.detail,
    ]
    .iter()
    .map(|p| {
        let mut v = (p.len() as u64).to_be_bytes().to_vec();
        v.extend_from_slice(p.as_bytes());
        v
    })
    .collect()
}

/// The unkeyed hash of entry `seq` chained to `prev` (entries written before keying).
pub fn legacy_hash(seq: i64, prev: &str, r: &AuditRecord) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts(seq, prev, r) {
        ctx.update(&p);
    }
    hex(ctx.finish().as_ref())
}

/// The MAC of entry `seq` chained to `prev`.
pub fn chain_hash(key: &AuditKey, seq: i64, prev: &str, r: &AuditRecord) -> String {
    let mut ctx = hmac::Context::with_key(&key.0);
    for p in parts(seq, prev, r) {
        ctx.update(&p);
    }
    format!("{KEYED}{}", hex(ctx.sign().as_ref()))
}

/// The head of a chain as kept in `audit.head`: `seq hash mac`.
pub fn head_line(key: &AuditKey, seq: i64, hash: &str) -> String {
    let mac = hmac::sign(&key.0, format!("head {seq} {hash}").as_bytes());
    format!("{seq} {hash} {}\n", hex(mac.as_ref()))
}

/// Where the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at entry {seq}: {why}")]
pub struct ChainBreak {
    pub seq: i64,
    pub why: &'static str,
}

/// What verification found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub entries: usize,
    /// Entries written before the chain was keyed.
    pub legacy: usize,
}

/// Verify a chain under `key` against its head line (`None`: no head file). Returns the
/// number of entries.
pub fn verify(
    entries: &[AuditEntry],
    key: &AuditKey,
    head: Option<&str>,
) -> Result<Verified, ChainBreak> {
    let mut prev = GENESIS.to_owned();
    let mut legacy = 0;
    let mut keyed_seen = false;
    for (i, e) in entries.iter().enumerate() {
        let expected_seq = i as i64 + 1;
        if e.seq != expected_seq {
            return Err(ChainBreak {
                seq: e.seq,
                why: "an entry is missing or out of order",
            });
        }
        if e.prev_hash != prev {
            return Err(ChainBreak {
                seq: e.seq,
                why: "it does not point to the previous entry",
            });
        }
        let expected = if e.hash.starts_with(KEYED) {
            keyed_seen = true;
            chain_hash(key, e.seq, &e.prev_hash, &e.record)
        } else if keyed_seen {
            return Err(ChainBreak {
                seq: e.seq,
                why: "an unkeyed entry follows keyed ones (it was added by someone without the audit key)",
            });
        } else {
            legacy += 1;
            legacy_hash(e.seq, &e.prev_hash, &e.record)
        };
        if expected != e.hash {
            return Err(ChainBreak {
                seq: e.seq,
                why: "its content was changed after it was written, or it was written under another audit key",
            });
        }
        prev = e.hash.clone();
    }
    if keyed_seen || head.is_some() {
        let Some(line) = head else {
            return Err(ChainBreak {
                seq: entries.len() as i64,
                why: "the head file audit.head is missing",
            });
        };
        let mut it = line.split_whitespace();
        let (Some(seq), Some(hash), Some(_)) = (it.next(), it.next(), it.next()) else {
            return Err(ChainBreak {
                seq: 0,
                why: "the head file audit.head is malformed",
            });
        };
        let seq: i64 = seq.parse().unwrap_or(-1);
        if head_line(key, seq, hash).trim_end() != line.trim_end() {
            return Err(ChainBreak {
                seq,
                why: "the head file audit.head was not written under the audit key",
            });
        }
        // The head may lag by the entries of one interrupted append, never lead.
        let at = usize::try_from(seq).ok().and_then(|s| s.checked_sub(1));
        match at.and_then(|i| entries.get(i)) {
            Some(e) if e.hash == hash => {}
            Some(_) => {
                return Err(ChainBreak {
                    seq,
                    why: "the chain differs from its recorded head",
                });
            }
            None if seq == 0 && hash == GENESIS => {}
            None => {
                return Err(ChainBreak {
                    seq,
                    why: "entries were cut off the end of the chain",
                });
            }
        }
    }
    Ok(Verified {
        entries: entries.len(),
        legacy,
    })
}

/// Read the head line beside a catalog.
pub fn read_head(catalog_dir: &Path) -> Option<String> {
    std::fs::read_to_string(catalog_dir.join("audit.head")).ok()
}

/// The current user for audit records: the login name from the environment, with the
/// operating system's uid and login uid (the environment can say anything; the uids are
/// what the kernel says).
pub fn actor() -> String {
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid().to_string());
        let login = std::fs::read_to_string("/proc/self/loginuid")
            .map(|s| match s.trim() {
                "4294967295" => "none".to_owned(),
                v => v.to_owned(),
            })
            .unwrap_or_else(|_| "none".into());
        if let Ok(uid) = uid {
            return format!("{name} (uid {uid}, login uid {login})");
        }
    }
    name
}

/// Now, in UTC, as RFC 3339 with seconds.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let d = fc_deid::dates::Date {
        year: 1970,
        month: 1,
        day: 1,
    }
    .plus_days(days);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year,
        d.month,
        d.day,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> AuditKey {
        AuditKey::from_bytes(&[b; 32])
    }

    fn chain(n: i64, k: &AuditKey) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let record = AuditRecord {
                    at: format_utc(1_700_000_000 + seq),
                    actor: "it (uid 1000, login uid 1000)".into(),
                    action: "run".into(),
                    detail: format!("{{\"written\":{seq}}}"),
                };
                let hash = chain_hash(k, seq, &prev, &record);
                let e = AuditEntry {
                    seq,
                    record,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    fn head(k: &AuditKey, c: &[AuditEntry]) -> String {
        let last = c.last().expect("entries");
        head_line(k, last.seq, &last.hash)
    }

    #[test]
    fn edits_removals_and_reorders_break_the_chain() {
        let k = key(1);
        let good = chain(5, &k);
        let h = head(&k, &good);
        assert_eq!(verify(&good, &k, Some(&h)).map(|v| v.entries), Ok(5));
        let mut edited = good.clone();
        edited[2].record.detail = "{\"written\":99}".into();
        assert_eq!(verify(&edited, &k, Some(&h)).map_err(|b| b.seq), Err(3));
        let mut removed = good.clone();
        removed.remove(1);
        assert!(verify(&removed, &k, Some(&h)).is_err());
        // Recomputing an entry needs the key: with another key the entry itself breaks.
        let mut rehashed = good.clone();
        rehashed[1].record.actor = "mallory".into();
        rehashed[1].hash = chain_hash(&key(2), 2, &rehashed[1].prev_hash, &rehashed[1].record);
        assert_eq!(verify(&rehashed, &k, Some(&h)).map_err(|b| b.seq), Err(2));
        // The old unkeyed recomputation does not pass either.
        let mut plain = good.clone();
        plain[1].hash = legacy_hash(2, &plain[1].prev_hash, &plain[1].record);
        assert!(verify(&plain, &k, Some(&h)).is_err());
    }

    #[test]
    fn truncation_and_a_forged_head_are_detected() {
        let k = key(1);
        let good = chain(5, &k);
        let h = head(&k, &good);
        let cut = &good[..3];
        let e = verify(cut, &k, Some(&h)).expect_err("truncated");
        assert!(e.why.contains("cut off"), "{e}");
        assert!(
            verify(&good, &k, None).is_err(),
            "a keyed chain needs its head"
        );
        let forged = head(&key(2), cut);
        assert!(verify(cut, &k, Some(&forged)).is_err());
        // A head one entry behind (an append interrupted before the head was written).
        let lagging = head(&k, &good[..4]);
        assert!(verify(&good, &k, Some(&lagging)).is_ok());
    }

    #[test]
    fn legacy_entries_verify_only_as_the_start_of_the_chain() {
        let k = key(1);
        let mut prev = GENESIS.to_owned();
        let mut entries = Vec::new();
        for seq in 1..=2 {
            let record = AuditRecord {
                at: format_utc(seq),
                actor: "old".into(),
                action: "run".into(),
                detail: "{}".into(),
            };
            let hash = legacy_hash(seq, &prev, &record);
            entries.push(AuditEntry {
                seq,
                record,
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        assert_eq!(
            verify(&entries, &k, None),
            Ok(Verified {
                entries: 2,
                legacy: 2
            })
        );
        // A keyed entry after them, then an unkeyed one: refused.
        let record = AuditRecord {
            at: format_utc(3),
            actor: "new".into(),
            action: "run".into(),
            detail: "{}".into(),
        };
        let hash = chain_hash(&k, 3, &prev, &record);
        entries.push(AuditEntry {
            seq: 3,
            record: record.clone(),
            prev_hash: prev,
            hash: hash.clone(),
        });
        let record4 = AuditRecord {
            at: format_utc(4),
            ..record
        };
        entries.push(AuditEntry {
            seq: 4,
            hash: legacy_hash(4, &hash, &record4),
            record: record4,
            prev_hash: hash,
        });
        let h = head(&k, &entries);
        assert!(verify(&entries, &k, Some(&h)).is_err());
    }

    #[test]
    fn the_actor_carries_the_kernel_uid() {
        let a = actor();
        assert!(a.contains("(uid "), "{a}");
        assert!(a.contains("login uid"), "{a}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_764_201_600 + 3_661), "2025-11-27T01:01:01Z");
    }
}
