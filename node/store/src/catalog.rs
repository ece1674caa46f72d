//! The catalog: a SQLite database in the node's data directory, the source of truth for what
//! has been done. Every input, its outcome, the output it produced, quarantine entries, the
//! encrypted re-identification map and the audit chain live here.
//!
//! All SQL of the node is in this module, so another backend (a shared PostgreSQL for several
//! node workers) can be added without touching the pipeline. The schema is versioned with
//! `PRAGMA user_version` and migrated forward on open.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::audit::{AuditEntry, AuditRecord};

mod annotations;
mod users;
pub use annotations::{AnnotationCase, AnnotationVersion, Assignment};
pub use users::{SessionRecord, UserRecord};

/// Catalog errors: I/O and database failures, never content problems.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}; check the data directory's permissions and free space")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "catalog {path} has schema version {found}, newer than this build understands ({known}); upgrade fedcurate-node"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "audit key or head {path}: {source}; check the configured audit_key_file (or site secret) and the data directory's permissions"
    )]
    AuditKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Schema migrations, applied in order; index + 1 is the schema version they lead to.
const MIGRATIONS: &[&str] = &[
    // 1: inputs, runs, quarantine, vault, audit.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        mode TEXT NOT NULL,
        edition TEXT NOT NULL,
        options TEXT NOT NULL
    );
    CREATE TABLE inputs (
        id INTEGER PRIMARY KEY,
        path_key TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('written', 'duplicate', 'quarantined', 'own-output')),
        reason TEXT,
        output_path TEXT,
        output_hash TEXT,
        patient TEXT,
        study TEXT,
        series TEXT,
        instance TEXT,
        edition TEXT NOT NULL,
        options TEXT NOT NULL,
        run_id INTEGER NOT NULL REFERENCES runs(id),
        UNIQUE (path_key, content_hash)
    );
    CREATE INDEX inputs_output_path ON inputs(output_path);
    CREATE INDEX inputs_output_hash ON inputs(output_hash);
    CREATE INDEX inputs_content_hash ON inputs(content_hash);
    CREATE TABLE quarantine (
        id TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        quarantined_at TEXT NOT NULL,
        released_at TEXT
    );
    CREATE TABLE vault (
        pseudonym TEXT PRIMARY KEY,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    "#,
    // 2: provenance of harmonised volumes.
    r#"
    CREATE TABLE harmonised (
        id INTEGER PRIMARY KEY,
        output_path TEXT NOT NULL,
        output_hash TEXT NOT NULL,
        source_hash TEXT NOT NULL,
        method TEXT NOT NULL,
        model_version INTEGER NOT NULL,
        model_hash TEXT NOT NULL,
        at TEXT NOT NULL
    );
    "#,
    // 3: the egress log: every message that left for the coordinator.
    r#"
    CREATE TABLE egress (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        message_id INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        answer TEXT NOT NULL
    );
    "#,
    // 4: the privacy ledger: every release (or refusal) of aggregates, what it spent, and
    // over which patients (hashes of pseudonyms), for the budget and the differencing check.
    r#"
    CREATE TABLE releases (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        dataset TEXT NOT NULL,
        schema TEXT NOT NULL,
        round INTEGER NOT NULL,
        epsilon REAL NOT NULL,
        delta REAL NOT NULL,
        patients TEXT NOT NULL,
        outcome TEXT NOT NULL
    );
    "#,
    // 5: the query ledger per released population (one quantity, the site, a summary), so
    // that overlapping definitions of one quantity are compared with each other.
    r#"
    ALTER TABLE releases ADD COLUMN populations TEXT NOT NULL DEFAULT '[]';
    "#,
    // 6: annotation: projects, their cases (de-identified series, by keyed token), who is
    // assigned what, and every saved version (never overwritten; label maps are files beside
    // the catalog, recorded with their hash).
    r#"
    CREATE TABLE annotation_projects (
        id TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        definition TEXT NOT NULL
    );
    CREATE TABLE annotation_cases (
        project TEXT NOT NULL REFERENCES annotation_projects(id),
        case_id TEXT NOT NULL,
        patient TEXT NOT NULL,
        modality TEXT NOT NULL,
        grid TEXT NOT NULL,
        image TEXT NOT NULL,
        image_hash TEXT NOT NULL,
        PRIMARY KEY (project, case_id)
    );
    CREATE TABLE annotation_assignments (
        project TEXT NOT NULL,
        case_id TEXT NOT NULL,
        rater TEXT NOT NULL,
        repeat INTEGER NOT NULL,
        with_proposal INTEGER NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (project, case_id, rater, repeat),
        FOREIGN KEY (project, case_id) REFERENCES annotation_cases(project, case_id)
    );
    CREATE TABLE annotation_versions (
        id INTEGER PRIMARY KEY,
        project TEXT NOT NULL,
        case_id TEXT NOT NULL,
        rater TEXT NOT NULL,
        repeat INTEGER NOT NULL,
        at TEXT NOT NULL,
        parent INTEGER REFERENCES annotation_versions(id),
        source TEXT NOT NULL,
        model TEXT,
        model_version TEXT,
        content TEXT NOT NULL,
        mask_path TEXT,
        mask_hash TEXT,
        FOREIGN KEY (project, case_id) REFERENCES annotation_cases(project, case_id)
    );
    CREATE INDEX annotation_versions_case ON annotation_versions(project, case_id, rater);
    "#,
    // 7: the annotator's local accounts (argon2id password hashes) and sessions (only a hash
    // of each session token is stored).
    r#"
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        password TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL,
        changed TEXT NOT NULL
    );
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name),
        created INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    "#,
];

/// A re-identification map entry as stored: (pseudonym, nonce, ciphertext).
pub type VaultRow = (String, Vec<u8>, Vec<u8>);

/// One entry of the privacy ledger.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReleaseRecord {
    pub at: String,
    /// The consortium protocol (schema id) the release belongs to.
    pub dataset: String,
    pub schema: String,
    pub round: u32,
    /// Differential privacy spent (0 when the schema asks for none).
    pub epsilon: f64,
    pub delta: f64,
    /// Hashes of the pseudonyms of the patients the release covers, sorted.
    pub patients: Vec<String>,
    /// `released`, `refused-budget`, `refused-differencing`, `awaiting-approval`.
    pub outcome: String,
    /// The populations of the statistics released (empty in records written before they
    /// were kept: their `patients` stand for the whole site).
    pub populations: Vec<LedgerPopulation>,
}

/// The patients behind one released statistic (see `federation::aggregate::Population`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerPopulation {
    /// What is compared with what: a quantity's name, `site`, `nyul`, `ct`.
    pub family: String,
    pub definition: String,
    /// Hashes of the patients' pseudonyms, sorted.
    pub patients: Vec<String>,
}

/// One message that left the node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EgressRecord {
    pub at: String,
    /// Message kind (`hello`, `schema-ack`, `report`, ...).
    pub kind: String,
    pub message_id: u64,
    /// Size of the frame on the wire.
    pub bytes: u64,
    /// SHA-256 of the frame, as sent.
    pub sha256: String,
    /// What came back (`ack`, `error ...`, `no answer`, ...).
    pub answer: String,
}

/// The outcome of one input as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordedOutcome {
    Written,
    Duplicate,
    Quarantined,
    /// The input is a file this node wrote (recognised by its hash): not processed again.
    OwnOutput,
}

impl RecordedOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Duplicate => "duplicate",
            Self::Quarantined => "quarantined",
            Self::OwnOutput => "own-output",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "written" => Self::Written,
            "duplicate" => Self::Duplicate,
            "own-output" => Self::OwnOutput,
            _ => Self::Quarantined,
        }
    }
}

/// One row of `inputs`: only pseudonymous keys and hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputRecord {
    /// Keyed hash of the input's path relative to the input folder.
    pub path_key: String,
    pub content_hash: String,
    pub outcome: RecordedOutcome,
    pub reason: Option<String>,
    /// Output path relative to the output folder (pseudonym and keyed hashes only).
    pub output_path: Option<String>,
    pub output_hash: Option<String>,
    pub patient: Option<String>,
    pub study: Option<String>,
    pub series: Option<String>,
    pub instance: Option<String>,
}

/// A quarantine entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineEntry {
    /// Content hash of the original file (its name in the quarantine folder).
    pub id: String,
    pub reason: String,
    /// Parser detail; may quote the file, so it stays in the data directory.
    pub detail: String,
    pub quarantined_at: String,
    pub released_at: Option<String>,
}

/// The run a batch belongs to.
#[derive(Clone, Copy, Debug)]
pub struct RunProfile<'a> {
    pub id: i64,
    pub edition: &'a str,
    pub options: &'a str,
}

/// What one batch records.
#[derive(Debug, Default)]
pub struct BatchRecords {
    pub inputs: Vec<InputRecord>,
    pub quarantine: Vec<QuarantineEntry>,
    /// (pseudonym, nonce, ciphertext)
    pub vault: Vec<(String, Vec<u8>, Vec<u8>)>,
    pub audit: Vec<AuditRecord>,
}

/// Provenance of one harmonised volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarmonisedRecord {
    /// Path relative to the harmonisation output folder.
    pub output_path: String,
    pub output_hash: String,
    /// Hash of the volume file it was made from.
    pub source_hash: String,
    /// The method and its parameters (JSON).
    pub method: String,
    pub model_version: u32,
    /// SHA-256 of the serialised model.
    pub model_hash: String,
    pub at: String,
}

/// Totals of the catalog by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub written: usize,
    pub duplicates: usize,
    pub quarantined: usize,
    pub own_outputs: usize,
}

/// The catalog.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
    /// The key the audit chain is MACed with (see [`Catalog::set_audit_key`]).
    audit_key: Option<crate::audit::AuditKey>,
}

impl Catalog {
    fn err(&self) -> impl Fn(rusqlite::Error) -> CatalogError + '_ {
        |source| CatalogError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Open (creating and migrating as needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let sq = |source| CatalogError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let existed = path.exists();
        let conn = Connection::open(path).map_err(sq)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; PRAGMA secure_delete = ON;",
        )
        .map_err(sq)?;
        #[cfg(unix)]
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let mut cat = Catalog {
            conn,
            path: path.to_owned(),
            audit_key: None,
        };
        cat.migrate()?;
        Ok(cat)
    }

    /// The current schema version.
    pub fn schema_version(&self) -> Result<i64, CatalogError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err())
    }

    fn migrate(&mut self) -> Result<(), CatalogError> {
        let current = self.schema_version()?;
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(CatalogError::TooNew {
                path: self.path.clone(),
                found: current,
                known,
            });
        }
        let path = self.path.clone();
        let sq = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = self.conn.transaction().map_err(sq)?;
            tx.execute_batch(sql).map_err(sq)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(sq)?;
            tx.commit().map_err(sq)?;
        }
        Ok(())
    }

    /// Start a run; returns its id.
    pub fn start_run(
        &self,
        at: &str,
        mode: &str,
        edition: &str,
        options: &str,
    ) -> Result<i64, CatalogError> {
        self.conn
            .execute(
                "INSERT INTO runs (started_at, mode, edition, options) VALUES (?1, ?2, ?3, ?4)",
                params![at, mode, edition, options],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Mark a run finished.
    pub fn finish_run(&self, run: i64, at: &str) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE runs SET finished_at = ?1 WHERE id = ?2",
                params![at, run],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The recorded outcome (and reason) of this input (path and content), if any.
    pub fn recorded(
        &self,
        path_key: &str,
        content_hash: &str,
    ) -> Result<Option<(RecordedOutcome, Option<String>)>, CatalogError> {
        self.conn
            .query_row(
                "SELECT outcome, reason FROM inputs WHERE path_key = ?1 AND content_hash = ?2",
                params![path_key, content_hash],
                |r| Ok((RecordedOutcome::parse(&r.get::<_, String>(0)?), r.get(1)?)),
            )
            .optional()
            .map_err(self.err())
    }

    /// Whether `hash` is the hash of a file this node wrote.
    pub fn is_own_output(&self, hash: &str) -> Result<bool, CatalogError> {
        self.conn
            .query_row(
                "SELECT 1 FROM inputs WHERE output_hash = ?1 AND outcome = 'written' LIMIT 1",
                params![hash],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(self.err())
    }

    /// The output hash already recorded for an output path, if any.
    pub fn output_hash_at(&self, output_path: &str) -> Result<Option<String>, CatalogError> {
        self.conn
            .query_row(
                "SELECT output_hash FROM inputs WHERE output_path = ?1 AND outcome = 'written' LIMIT 1",
                params![output_path],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    /// Record a batch in one transaction (after its files are durable).
    pub fn commit_batch(
        &mut self,
        run: &RunProfile<'_>,
        batch: &BatchRecords,
    ) -> Result<(), CatalogError> {
        let BatchRecords {
            inputs,
            quarantine,
            vault,
            audit,
        } = batch;
        let (run, edition, options) = (run.id, run.edition, run.options);
        let path = self.path.clone();
        let sq = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let key = self.audit_key()?;
        let tx = self.conn.transaction().map_err(sq)?;
        for r in inputs {
            tx.execute(
                "INSERT OR REPLACE INTO inputs (path_key, content_hash, outcome, reason, output_path, output_hash,
                 patient, study, series, instance, edition, options, run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    r.path_key,
                    r.content_hash,
                    r.outcome.as_str(),
                    r.reason,
                    r.output_path,
                    r.output_hash,
                    r.patient,
                    r.study,
                    r.series,
                    r.instance,
                    edition,
                    options,
                    run
                ],
            )
            .map_err(sq)?;
        }
        for q in quarantine {
            tx.execute(
                "INSERT OR REPLACE INTO quarantine (id, reason, detail, quarantined_at, released_at)
                 VALUES (?1, ?2, ?3, ?4, NULL)",
                params![q.id, q.reason, q.detail, q.quarantined_at],
            )
            .map_err(sq)?;
        }
        for (pseudonym, nonce, ciphertext) in vault {
            tx.execute(
                "INSERT OR REPLACE INTO vault (pseudonym, nonce, ciphertext) VALUES (?1, ?2, ?3)",
                params![pseudonym, nonce, ciphertext],
            )
            .map_err(sq)?;
        }
        let mut head = None;
        for a in audit {
            head = Some(append_audit(&tx, &key, a).map_err(sq)?);
        }
        tx.commit().map_err(sq)?;
        self.write_head(&key, head)
    }

    /// Every input record, in insertion order.
    pub fn inputs(&self) -> Result<Vec<(InputRecord, i64)>, CatalogError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT path_key, content_hash, outcome, reason, output_path, output_hash, patient, study,
                 series, instance, run_id FROM inputs ORDER BY id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    InputRecord {
                        path_key: r.get(0)?,
                        content_hash: r.get(1)?,
                        outcome: RecordedOutcome::parse(&r.get::<_, String>(2)?),
                        reason: r.get(3)?,
                        output_path: r.get(4)?,
                        output_hash: r.get(5)?,
                        patient: r.get(6)?,
                        study: r.get(7)?,
                        series: r.get(8)?,
                        instance: r.get(9)?,
                    },
                    r.get(10)?,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Edition and options an input row was made with, by run id.
    pub fn run_profile(&self, run: i64) -> Result<(String, String), CatalogError> {
        self.conn
            .query_row(
                "SELECT edition, options FROM runs WHERE id = ?1",
                params![run],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.err())
    }

    /// Totals by outcome over every recorded input.
    pub fn totals(&self) -> Result<Totals, CatalogError> {
        let mut st = self
            .conn
            .prepare("SELECT outcome, COUNT(*) FROM inputs GROUP BY outcome")
            .map_err(self.err())?;
        let mut t = Totals::default();
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err())?;
        for row in rows {
            let (o, n) = row.map_err(self.err())?;
            let n = n as usize;
            match RecordedOutcome::parse(&o) {
                RecordedOutcome::Written => t.written += n,
                RecordedOutcome::Duplicate => t.duplicates += n,
                RecordedOutcome::Quarantined => t.quarantined += n,
                RecordedOutcome::OwnOutput => t.own_outputs += n,
            }
        }
        Ok(t)
    }

    /// Quarantine entries (all, or only those not released).
    pub fn quarantine_entries(
        &self,
        include_released: bool,
    ) -> Result<Vec<QuarantineEntry>, CatalogError> {
        let sql = if include_released {
            "SELECT id, reason, detail, quarantined_at, released_at FROM quarantine ORDER BY quarantined_at, id"
        } else {
            "SELECT id, reason, detail, quarantined_at, released_at FROM quarantine WHERE released_at IS NULL ORDER BY quarantined_at, id"
        };
        let mut st = self.conn.prepare(sql).map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(QuarantineEntry {
                    id: r.get(0)?,
                    reason: r.get(1)?,
                    detail: r.get(2)?,
                    quarantined_at: r.get(3)?,
                    released_at: r.get(4)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Record the release of a quarantined input that now produced `output`.
    pub fn release(
        &mut self,
        id: &str,
        at: &str,
        output: &InputRecord,
        vault: &[(String, Vec<u8>, Vec<u8>)],
        audit: &AuditRecord,
    ) -> Result<(), CatalogError> {
        let path = self.path.clone();
        let sq = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let key = self.audit_key()?;
        let tx = self.conn.transaction().map_err(sq)?;
        tx.execute(
            "UPDATE quarantine SET released_at = ?1 WHERE id = ?2",
            params![at, id],
        )
        .map_err(sq)?;
        tx.execute(
            "UPDATE inputs SET outcome = 'written', reason = NULL, output_path = ?1, output_hash = ?2,
             patient = ?3, study = ?4, series = ?5, instance = ?6 WHERE content_hash = ?7 AND outcome = 'quarantined'",
            params![
                output.output_path,
                output.output_hash,
                output.patient,
                output.study,
                output.series,
                output.instance,
                id
            ],
        )
        .map_err(sq)?;
        for (pseudonym, nonce, ciphertext) in vault {
            tx.execute(
                "INSERT OR IGNORE INTO vault (pseudonym, nonce, ciphertext) VALUES (?1, ?2, ?3)",
                params![pseudonym, nonce, ciphertext],
            )
            .map_err(sq)?;
        }
        let head = append_audit(&tx, &key, audit).map_err(sq)?;
        tx.commit().map_err(sq)?;
        self.write_head(&key, Some(head))
    }

    /// The encrypted map entry of a pseudonym.
    pub fn vault_entry(
        &self,
        pseudonym: &str,
    ) -> Result<Option<crate::vault::SealedEntry>, CatalogError> {
        self.conn
            .query_row(
                "SELECT nonce, ciphertext FROM vault WHERE pseudonym = ?1",
                params![pseudonym],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())
    }

    /// Number of entries in the re-identification map.
    pub fn vault_len(&self) -> Result<usize, CatalogError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM vault", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(self.err())
    }

    /// Append one audit record on its own.
    pub fn audit(&mut self, record: &AuditRecord) -> Result<(), CatalogError> {
        let path = self.path.clone();
        let sq = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let key = self.audit_key()?;
        let tx = self.conn.transaction().map_err(sq)?;
        let head = append_audit(&tx, &key, record).map_err(sq)?;
        tx.commit().map_err(sq)?;
        self.write_head(&key, Some(head))
    }

    /// MAC the audit chain with `key` (the binary sets the one its configuration names).
    /// Without it, a key file `audit.key` beside the catalog is used (created on first use):
    /// a library default only, since that key lives in the data directory.
    pub fn set_audit_key(&mut self, key: crate::audit::AuditKey) {
        self.audit_key = Some(key);
    }

    fn audit_key(&self) -> Result<crate::audit::AuditKey, CatalogError> {
        if let Some(k) = &self.audit_key {
            return Ok(k.clone());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let file = dir.join("audit.key");
        let io = |source: std::io::Error| CatalogError::AuditKey {
            path: file.clone(),
            source,
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = fc_deid::keys::Secret::random()
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                crate::vault::write_secret_file(&file, &secret).map_err(io)?;
                secret.to_hex()
            }
            Err(e) => return Err(io(e)),
        };
        let secret = fc_deid::keys::Secret::from_hex(&text)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        Ok(crate::audit::AuditKey::from_secret(&secret))
    }

    /// The audit key in use (for verification).
    pub fn audit_key_in_use(&self) -> Result<crate::audit::AuditKey, CatalogError> {
        self.audit_key()
    }

    /// Write the chain's head beside the catalog (after the entry is committed: a crash in
    /// between leaves the head one append behind, which verification accepts).
    fn write_head(
        &self,
        key: &crate::audit::AuditKey,
        head: Option<(i64, String)>,
    ) -> Result<(), CatalogError> {
        let Some((seq, hash)) = head else {
            return Ok(());
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let file = dir.join("audit.head");
        write_durably(&file, crate::audit::head_line(key, seq, &hash).as_bytes())
            .map_err(|source| CatalogError::AuditKey { path: file, source })
    }

    /// The head line beside the catalog, if any.
    pub fn audit_head(&self) -> Option<String> {
        crate::audit::read_head(self.path.parent().unwrap_or(Path::new(".")))
    }

    /// The audit chain, in order.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>, CatalogError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT seq, at, actor, action, detail, prev_hash, hash FROM audit ORDER BY seq",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    record: AuditRecord {
                        at: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        detail: r.get(4)?,
                    },
                    prev_hash: r.get(5)?,
                    hash: r.get(6)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Record the provenance of a harmonised volume.
    pub fn record_harmonised(&self, p: &HarmonisedRecord) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "INSERT INTO harmonised (output_path, output_hash, source_hash, method, model_version, model_hash, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![p.output_path, p.output_hash, p.source_hash, p.method, p.model_version, p.model_hash, p.at],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Provenance records of harmonised volumes.
    pub fn harmonised(&self) -> Result<Vec<HarmonisedRecord>, CatalogError> {
        let mut st = self
            .conn
            .prepare("SELECT output_path, output_hash, source_hash, method, model_version, model_hash, at FROM harmonised ORDER BY id")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(HarmonisedRecord {
                    output_path: r.get(0)?,
                    output_hash: r.get(1)?,
                    source_hash: r.get(2)?,
                    method: r.get(3)?,
                    model_version: r.get(4)?,
                    model_hash: r.get(5)?,
                    at: r.get(6)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Every re-identification map entry: (pseudonym, nonce, ciphertext).
    pub fn vault_entries(&self) -> Result<Vec<VaultRow>, CatalogError> {
        let mut st = self
            .conn
            .prepare("SELECT pseudonym, nonce, ciphertext FROM vault ORDER BY pseudonym")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Replace every map entry at once (key rotation): all or nothing.
    pub fn replace_vault(&mut self, entries: &[VaultRow]) -> Result<(), CatalogError> {
        let path = self.path.clone();
        let err = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for (pseudonym, nonce, ciphertext) in entries {
            tx.execute(
                "UPDATE vault SET nonce = ?2, ciphertext = ?3 WHERE pseudonym = ?1",
                params![pseudonym, nonce, ciphertext],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        // Old ciphertexts: overwritten in the database pages (secure_delete), and the
        // write-ahead log that held the pages' previous state is checkpointed and emptied.
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(err)?;
        Ok(())
    }

    /// Record a message about to leave for the coordinator; returns its sequence number.
    pub fn record_egress(&self, e: &EgressRecord) -> Result<i64, CatalogError> {
        self.conn
            .execute(
                "INSERT INTO egress (at, kind, message_id, bytes, sha256, answer) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![e.at, e.kind, e.message_id as i64, e.bytes as i64, e.sha256, e.answer],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Record several frames about to leave, in one transaction.
    pub fn record_egress_batch(&self, rows: &[EgressRecord]) -> Result<(), CatalogError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        {
            let mut st = tx
                .prepare("INSERT INTO egress (at, kind, message_id, bytes, sha256, answer) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(self.err())?;
            for e in rows {
                st.execute(params![
                    e.at,
                    e.kind,
                    e.message_id as i64,
                    e.bytes as i64,
                    e.sha256,
                    e.answer
                ])
                .map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())
    }

    /// Record what the coordinator answered to egress record `seq`.
    pub fn set_egress_answer(&self, seq: i64, answer: &str) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE egress SET answer = ?2 WHERE seq = ?1",
                params![seq, answer],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The egress log, oldest first.
    pub fn egress(&self) -> Result<Vec<EgressRecord>, CatalogError> {
        let mut st = self
            .conn
            .prepare("SELECT at, kind, message_id, bytes, sha256, answer FROM egress ORDER BY seq")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(EgressRecord {
                    at: r.get(0)?,
                    kind: r.get(1)?,
                    message_id: r.get::<_, i64>(2)? as u64,
                    bytes: r.get::<_, i64>(3)? as u64,
                    sha256: r.get(4)?,
                    answer: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Append to the privacy ledger.
    pub fn record_release(&self, r: &ReleaseRecord) -> Result<(), CatalogError> {
        let patients = serde_json::to_string(&r.patients).unwrap_or_else(|_| "[]".into());
        let populations = serde_json::to_string(&r.populations).unwrap_or_else(|_| "[]".into());
        self.conn
            .execute(
                "INSERT INTO releases (at, dataset, schema, round, epsilon, delta, patients, outcome, populations)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![r.at, r.dataset, r.schema, r.round, r.epsilon, r.delta, patients, r.outcome, populations],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The privacy ledger, oldest first.
    pub fn releases(&self) -> Result<Vec<ReleaseRecord>, CatalogError> {
        let mut st = self
            .conn
            .prepare("SELECT at, dataset, schema, round, epsilon, delta, patients, outcome, populations FROM releases ORDER BY seq")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                let patients: String = r.get(6)?;
                Ok(ReleaseRecord {
                    at: r.get(0)?,
                    dataset: r.get(1)?,
                    schema: r.get(2)?,
                    round: r.get(3)?,
                    epsilon: r.get(4)?,
                    delta: r.get(5)?,
                    patients: serde_json::from_str(&patients).unwrap_or_default(),
                    outcome: r.get(7)?,
                    populations: serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or_default(),
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Direct access for tests that tamper with the database on purpose.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Write a small file atomically and durably: a temporary file, flushed, renamed over the
/// target, the folder flushed.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn append_audit(
    tx: &Transaction<'_>,
    key: &crate::audit::AuditKey,
    record: &AuditRecord,
) -> rusqlite::Result<(i64, String)> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, crate::audit::GENESIS.to_owned()),
    };
    let hash = crate::audit::chain_hash(key, seq, &prev, record);
    tx.execute(
        "INSERT INTO audit (seq, at, actor, action, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![seq, record.at, record.actor, record.action, record.detail, prev, hash],
    )?;
    Ok((seq, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_refuse_newer_schemas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("catalog.sqlite");
        let c = Catalog::open(&p).expect("open");
        assert_eq!(
            c.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        drop(c);
        let c = Catalog::open(&p).expect("reopen");
        c.connection()
            .pragma_update(None, "user_version", 99)
            .expect("set");
        drop(c);
        assert!(matches!(
            Catalog::open(&p),
            Err(CatalogError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn replaced_vault_ciphertexts_leave_no_trace_in_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("catalog.sqlite");
        let mut c = Catalog::open(&p).expect("open");
        // Old entries longer than their replacements: the freed bytes of each cell stay in
        // the page unless SQLite overwrites them.
        let old: Vec<VaultRow> = (0..40)
            .map(|i| {
                (
                    format!("P{i:04}"),
                    vec![1u8; 12],
                    format!("OLDCIPHERTEXT-{i:04}-").repeat(6).into_bytes(),
                )
            })
            .collect();
        for (pseudonym, nonce, ct) in &old {
            c.connection()
                .execute(
                    "INSERT INTO vault (pseudonym, nonce, ciphertext) VALUES (?1, ?2, ?3)",
                    params![pseudonym, nonce, ct],
                )
                .expect("insert");
        }
        c.connection()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        let new: Vec<VaultRow> = old
            .iter()
            .map(|(p, _, _)| (p.clone(), vec![2u8; 12], b"new".to_vec()))
            .collect();
        c.replace_vault(&new).expect("replace");
        drop(c);
        for file in ["catalog.sqlite", "catalog.sqlite-wal"] {
            let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
            assert!(
                !bytes.windows(13).any(|w| w == b"OLDCIPHERTEXT"),
                "an old ciphertext survives in {file}"
            );
        }
    }
}
