//! All SQL of the coordinator: `coordinator.sqlite` in the state directory (WAL, migrations by
//! `PRAGMA user_version`). It holds only what the wire can carry — site names, schema hashes,
//! acknowledgements, aggregates, fitted models — and a log of every frame received (its kind,
//! size and hash, not its bytes).

use std::path::Path;

use protocol::aggregate::{ConformanceSummary, ProfileCheck, SiteAggregates};
use protocol::{FederatedFit, MessageId, SchemaHash, SiteId};
use rusqlite::{Connection, OptionalExtension, params};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordinator state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("coordinator state database holds an undecodable record ({0}); restore it from backup")]
    Decode(String),
    #[error(
        "coordinator state database is at version {0}, newer than this build understands; upgrade the coordinator"
    )]
    TooNew(i64),
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sites (
    site TEXT PRIMARY KEY,
    last_contact INTEGER,
    acked_schema TEXT,
    acked_at INTEGER,
    profile TEXT,
    conformance TEXT
);
CREATE TABLE applied (
    site TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (site, message_id)
);
CREATE TABLE reports (
    site TEXT NOT NULL,
    schema TEXT NOT NULL,
    round INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    aggregates TEXT NOT NULL,
    PRIMARY KEY (site, schema, round)
);
CREATE TABLE models (
    revision INTEGER PRIMARY KEY,
    schema TEXT NOT NULL,
    round INTEGER NOT NULL,
    sites TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    fit TEXT NOT NULL
);
CREATE TABLE received (
    at INTEGER NOT NULL,
    site TEXT,
    kind INTEGER,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    outcome TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE refusals (
    site TEXT NOT NULL,
    schema TEXT NOT NULL,
    round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (site, schema, round)
);
"#,
    r#"
CREATE TABLE secure_totals (
    schema TEXT NOT NULL,
    round INTEGER NOT NULL,
    session INTEGER NOT NULL,
    sites TEXT NOT NULL,
    total TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (schema, round)
);
"#,
];

/// Hex of a schema hash (how the store keys schemas).
pub fn hash_hex(h: &SchemaHash) -> String {
    h.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Decode(e.to_string()))
}

fn unjson<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Decode(e.to_string()))
}

/// A stored JSON list of site names, validated again.
fn site_list(json: &str) -> Result<Vec<SiteId>, StoreError> {
    let names: Vec<String> = unjson(json)?;
    names
        .iter()
        .map(|s| SiteId::new(s).map_err(|e| StoreError::Decode(e.to_string())))
        .collect()
}

/// What the store knows of a site.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteRecord {
    pub last_contact: Option<i64>,
    pub acked_schema: Option<String>,
    pub profile: Option<ProfileCheck>,
    pub conformance: Option<ConformanceSummary>,
}

/// A stored model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRecord {
    pub revision: u32,
    pub schema: String,
    pub round: u32,
    pub sites: Vec<SiteId>,
    pub fit: FederatedFit,
}

/// A frame the coordinator received (never its bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub site: Option<String>,
    pub kind: Option<u8>,
    pub bytes: i64,
    pub sha256: String,
    pub outcome: String,
}

/// The coordinator's state database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// Frames logged since the logs were last pruned.
    logged: std::cell::Cell<u32>,
}

/// Days the log of received frames is kept.
pub const RECEIVED_RETENTION_DAYS: i64 = 90;
/// Most rows the log of received frames keeps (a flooding site cannot fill the disk).
pub const RECEIVED_MAX_ROWS: i64 = 200_000;
/// Days a message id is remembered as applied (retries come within minutes).
pub const APPLIED_RETENTION_DAYS: i64 = 30;
/// Frames between two prunings.
const PRUNE_EVERY: u32 = 1000;

impl Store {
    /// Open (and migrate) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::init(Connection::open(path)?)
    }

    /// SQLite's integrity check (`ok` when the database is sound).
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }

    /// The `synchronous` setting in force (2 = FULL).
    pub fn synchronous(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))?)
    }

    /// A database in memory (tests, benchmarks).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a transaction is on disk when it commits, so an acknowledged report cannot
        // roll back after a power cut (NORMAL in WAL mode only protects against corruption).
        // The power-loss harness's calibration switch (coordinator/tests/powerloss.rs): with
        // it, commits are not flushed, and the harness must see acknowledged reports vanish.
        let skip = std::env::var_os("FEDCURATE_TEST_SKIP_FLUSH").is_some();
        conn.pragma_update(None, "synchronous", if skip { "OFF" } else { "FULL" })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew(version));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.execute_batch(&format!(
                "BEGIN; {m} PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))?;
        }
        Ok(Store {
            conn,
            logged: std::cell::Cell::new(0),
        })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Record a frame received (kind byte, size, SHA-256, what became of it).
    pub fn log_received(
        &self,
        at: i64,
        site: Option<&SiteId>,
        kind: Option<u8>,
        frame: &[u8],
        outcome: &str,
    ) -> Result<(), StoreError> {
        let d = ring::digest::digest(&ring::digest::SHA256, frame);
        let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        self.conn.execute(
            "INSERT INTO received (at, site, kind, bytes, sha256, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![at, site.map(|s| s.as_str()), kind, frame.len() as i64, hex, outcome],
        )?;
        let n = self.logged.get() + 1;
        if n >= PRUNE_EVERY {
            self.logged.set(0);
            self.prune(at)?;
        } else {
            self.logged.set(n);
        }
        Ok(())
    }

    /// Apply the retention of the logs: received frames older than
    /// [`RECEIVED_RETENTION_DAYS`] or beyond the newest [`RECEIVED_MAX_ROWS`], applied ids
    /// older than [`APPLIED_RETENTION_DAYS`]. Returns the rows removed.
    pub fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let day = 86_400;
        let mut n = self.conn.execute(
            "DELETE FROM received WHERE at < ?1",
            params![now - RECEIVED_RETENTION_DAYS * day],
        )?;
        n += self.conn.execute(
            "DELETE FROM received WHERE rowid <= (SELECT MAX(rowid) FROM received) - ?1",
            params![RECEIVED_MAX_ROWS],
        )?;
        n += self.conn.execute(
            "DELETE FROM applied WHERE at < ?1",
            params![now - APPLIED_RETENTION_DAYS * day],
        )?;
        Ok(n)
    }

    /// Whether `id` from `site` was applied already; records it if not.
    pub fn first_application(
        &self,
        site: &SiteId,
        id: MessageId,
        at: i64,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO applied (site, message_id, at) VALUES (?1, ?2, ?3)",
            params![site.as_str(), id.0 as i64, at],
        )?;
        Ok(n == 1)
    }

    pub fn touch(&self, site: &SiteId, at: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO sites (site, last_contact) VALUES (?1, ?2)
             ON CONFLICT (site) DO UPDATE SET last_contact = excluded.last_contact",
            params![site.as_str(), at],
        )?;
        Ok(())
    }

    pub fn record_ack(
        &self,
        site: &SiteId,
        schema: &SchemaHash,
        profile: &ProfileCheck,
        conformance: &ConformanceSummary,
        at: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO sites (site, last_contact, acked_schema, acked_at, profile, conformance)
             VALUES (?1, ?2, ?3, ?2, ?4, ?5)
             ON CONFLICT (site) DO UPDATE SET last_contact = excluded.last_contact,
                acked_schema = excluded.acked_schema, acked_at = excluded.acked_at,
                profile = excluded.profile, conformance = excluded.conformance",
            params![
                site.as_str(),
                at,
                hash_hex(schema),
                json(profile)?,
                json(conformance)?
            ],
        )?;
        Ok(())
    }

    pub fn site(&self, site: &SiteId) -> Result<SiteRecord, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT last_contact, acked_schema, profile, conformance FROM sites WHERE site = ?1",
                [site.as_str()],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((last_contact, acked_schema, profile, conformance)) = row else {
            return Ok(SiteRecord::default());
        };
        Ok(SiteRecord {
            last_contact,
            acked_schema,
            profile: profile.as_deref().map(unjson).transpose()?,
            conformance: conformance.as_deref().map(unjson).transpose()?,
        })
    }

    /// Store a site's report for (schema, round), replacing an earlier one of the same round.
    pub fn put_report(
        &self,
        site: &SiteId,
        schema: &SchemaHash,
        round: u32,
        aggregates: &SiteAggregates,
        at: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO reports (site, schema, round, received_at, aggregates) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (site, schema, round) DO UPDATE SET received_at = excluded.received_at,
                aggregates = excluded.aggregates",
            params![site.as_str(), hash_hex(schema), round, at, json(aggregates)?],
        )?;
        Ok(())
    }

    /// Record that a site declined to release (schema, round), and why.
    pub fn put_refusal(
        &self,
        site: &SiteId,
        schema: &SchemaHash,
        round: u32,
        reason: protocol::aggregate::RefusalReason,
        at: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO refusals (site, schema, round, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (site, schema, round) DO UPDATE SET reason = excluded.reason, at = excluded.at",
            params![site.as_str(), hash_hex(schema), round, json(&reason)?, at],
        )?;
        Ok(())
    }

    /// A site's refusal of (schema, round), if any.
    pub fn refusal(
        &self,
        site: &SiteId,
        schema: &SchemaHash,
        round: u32,
    ) -> Result<Option<protocol::aggregate::RefusalReason>, StoreError> {
        let r: Option<String> = self
            .conn
            .query_row(
                "SELECT reason FROM refusals WHERE site = ?1 AND schema = ?2 AND round = ?3",
                params![site.as_str(), hash_hex(schema), round],
                |r| r.get(0),
            )
            .optional()?;
        r.as_deref().map(unjson).transpose()
    }

    /// Store the unmasked total of a secure session (the only thing kept of it).
    pub fn put_secure_total(
        &self,
        schema: &SchemaHash,
        round: u32,
        session: u32,
        sites: &[SiteId],
        total: &protocol::secure::SecureTotal,
        at: i64,
    ) -> Result<(), StoreError> {
        let names: Vec<&str> = sites.iter().map(|s| s.as_str()).collect();
        self.conn.execute(
            "INSERT INTO secure_totals (schema, round, session, sites, total, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (schema, round) DO UPDATE SET session = excluded.session,
                sites = excluded.sites, total = excluded.total, at = excluded.at",
            params![hash_hex(schema), round, session, json(&names)?, json(total)?, at],
        )?;
        Ok(())
    }

    /// The secure total of (schema, round), with the sites it sums.
    pub fn secure_total(
        &self,
        schema: &SchemaHash,
        round: u32,
    ) -> Result<Option<(Vec<SiteId>, protocol::secure::SecureTotal)>, StoreError> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT sites, total FROM secure_totals WHERE schema = ?1 AND round = ?2",
                params![hash_hex(schema), round],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((sites, total)) = row else {
            return Ok(None);
        };
        let sites = site_list(&sites)?;
        Ok(Some((sites, unjson(&total)?)))
    }

    /// How many sites reported (schema, round).
    pub fn report_count(&self, schema: &SchemaHash, round: u32) -> Result<usize, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM reports WHERE schema = ?1 AND round = ?2",
            params![hash_hex(schema), round],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// The reports of (schema, round), by site name.
    pub fn reports(
        &self,
        schema: &SchemaHash,
        round: u32,
    ) -> Result<Vec<(SiteId, SiteAggregates)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT site, aggregates FROM reports WHERE schema = ?1 AND round = ?2 ORDER BY site",
        )?;
        let rows = st.query_map(params![hash_hex(schema), round], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (site, a) = row?;
            let site = SiteId::new(&site).map_err(|e| StoreError::Decode(e.to_string()))?;
            out.push((site, unjson(&a)?));
        }
        Ok(out)
    }

    pub fn put_model(&self, m: &ModelRecord, at: i64) -> Result<(), StoreError> {
        let sites: Vec<&str> = m.sites.iter().map(|s| s.as_str()).collect();
        self.conn.execute(
            "INSERT INTO models (revision, schema, round, sites, created_at, fit) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![m.revision, m.schema, m.round, json(&sites)?, at, json(&m.fit)?],
        )?;
        Ok(())
    }

    /// The latest model.
    pub fn latest_model(&self) -> Result<Option<ModelRecord>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT revision, schema, round, sites, fit FROM models ORDER BY revision DESC LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((revision, schema, round, sites, fit)) = row else {
            return Ok(None);
        };
        let sites = site_list(&sites)?;
        Ok(Some(ModelRecord {
            revision,
            schema,
            round,
            sites,
            fit: unjson(&fit)?,
        }))
    }

    /// Frames received, oldest first.
    pub fn received(&self) -> Result<Vec<Received>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT site, kind, bytes, sha256, outcome FROM received ORDER BY rowid")?;
        let rows = st.query_map([], |r| {
            Ok(Received {
                site: r.get(0)?,
                kind: r.get(1)?,
                bytes: r.get(2)?,
                sha256: r.get(3)?,
                outcome: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_means_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("coordinator.sqlite")).expect("open");
        assert_eq!(
            store.synchronous().expect("pragma"),
            2,
            "synchronous = FULL"
        );
    }

    #[test]
    fn the_logs_have_a_retention() {
        let store = Store::in_memory().expect("store");
        let site = SiteId::new("site-a").expect("id");
        let day = 86_400;
        let now = 1_800_000_000;
        // An old frame and an old applied id go; recent ones stay.
        store
            .log_received(now - 100 * day, Some(&site), Some(1), b"old", "ok")
            .expect("log");
        store
            .first_application(&site, MessageId(1), now - 40 * day)
            .expect("applied");
        store
            .first_application(&site, MessageId(2), now)
            .expect("applied");
        for i in 0..(PRUNE_EVERY - 1) {
            store
                .log_received(now, Some(&site), Some(1), &i.to_be_bytes(), "ok")
                .expect("log");
        }
        // The last of a thousand frames pruned the logs.
        assert_eq!(
            store.received().expect("received").len(),
            PRUNE_EVERY as usize - 1
        );
        assert!(
            store
                .first_application(&site, MessageId(1), now)
                .expect("again")
        );
        assert!(
            !store
                .first_application(&site, MessageId(2), now)
                .expect("again")
        );
        // The row cap: beyond the newest rows, the oldest go.
        let n: i64 = store
            .conn
            .query_row("SELECT MAX(rowid) FROM received", [], |r| r.get(0))
            .expect("rowid");
        store
            .conn
            .execute(
                "INSERT INTO received (rowid, at, site, kind, bytes, sha256, outcome) VALUES (?1, ?2, 'site-a', 1, 1, 'x', 'ok')",
                params![n + RECEIVED_MAX_ROWS + 5, now],
            )
            .expect("far row");
        store.prune(now).expect("prune");
        assert_eq!(store.received().expect("received").len(), 1);
    }
}
