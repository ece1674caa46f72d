//! The audit chain: every run, quarantine release and re-identification is recorded, each
//! entry hashed together with the previous entry's hash (SHA-256), so that editing, removing
//! or reordering an entry breaks the chain at that point. Entries hold no identifying value:
//! counts, pseudonyms, content hashes, option names.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::deid::keys::hex;

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// UTC time, RFC 3339.
    pub at: String,
    /// Operating-system user who ran the command.
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

/// The hash of entry `seq` chained to `prev`.
pub fn chain_hash(seq: i64, prev: &str, r: &AuditRecord) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        seq.to_string().as_str(),
        prev,
        &r.at,
        &r.actor,
        &r.action,
        &r.detail,
    ] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    hex(ctx.finish().as_ref())
}

/// Where the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at entry {seq}: {why}")]
pub struct ChainBreak {
    pub seq: i64,
    pub why: &'static str,
}

/// Verify a chain; returns the number of entries.
pub fn verify(entries: &[AuditEntry]) -> Result<usize, ChainBreak> {
    let mut prev = GENESIS.to_owned();
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
        if chain_hash(e.seq, &e.prev_hash, &e.record) != e.hash {
            return Err(ChainBreak {
                seq: e.seq,
                why: "its content was changed after it was written",
            });
        }
        prev = e.hash.clone();
    }
    Ok(entries.len())
}

/// The current user, from the environment (`USER`, `LOGNAME`), for audit records.
pub fn actor() -> String {
    if let Ok(u) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        return u;
    }
    // Without a login environment (services, CI): the numeric user id.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata("/proc/self") {
            return format!("uid:{}", m.uid());
        }
    }
    "unknown".to_owned()
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
    let d = crate::deid::dates::Date {
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

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let record = AuditRecord {
                    at: format_utc(1_700_000_000 + seq),
                    actor: "it".into(),
                    action: "run".into(),
                    detail: format!("{{\"written\":{seq}}}"),
                };
                let hash = chain_hash(seq, &prev, &record);
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

    #[test]
    fn edits_removals_and_reorders_break_the_chain() {
        let good = chain(5);
        assert_eq!(verify(&good), Ok(5));
        let mut edited = good.clone();
        edited[2].record.detail = "{\"written\":99}".into();
        assert_eq!(verify(&edited).map_err(|b| b.seq), Err(3));
        let mut removed = good.clone();
        removed.remove(1);
        assert!(verify(&removed).is_err());
        let mut rehashed = good.clone();
        rehashed[1].record.actor = "mallory".into();
        rehashed[1].hash = chain_hash(2, &rehashed[1].prev_hash, &rehashed[1].record);
        assert_eq!(
            verify(&rehashed).map_err(|b| b.seq),
            Err(3),
            "the next entry no longer points to it"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_764_201_600 + 3_661), "2025-11-27T01:01:01Z");
    }
}
