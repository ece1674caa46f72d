//! The catalog's annotation tables: projects, cases, assignments and versions. Every change is
//! written in one transaction with its audit entry.

use rusqlite::{OptionalExtension, params};

use super::{Catalog, CatalogError, append_audit};
use crate::audit::AuditRecord;

/// A case of a project: one de-identified series volume.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AnnotationCase {
    pub project: String,
    /// Keyed token of the series and the volume's part (`<token>-<part>`).
    pub case_id: String,
    /// The patient's pseudonym.
    pub patient: String,
    pub modality: String,
    /// The image grid (JSON: shape and affine).
    pub grid: String,
    /// The case image (NIfTI) relative to the data directory, and its hash.
    pub image: String,
    pub image_hash: String,
}

/// A case assigned to a rater.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Assignment {
    pub project: String,
    pub case_id: String,
    pub rater: String,
    /// 1.. (more than one for intra-rater studies).
    pub repeat: u32,
    /// Whether the model's proposal is shown (the anchoring-bias control serves some without).
    pub with_proposal: bool,
    /// `assigned`, `submitted`, `returned`.
    pub state: String,
}

/// One saved version (never overwritten).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AnnotationVersion {
    pub id: i64,
    pub project: String,
    pub case_id: String,
    pub rater: String,
    pub repeat: u32,
    pub at: String,
    pub parent: Option<i64>,
    /// `manual`, `proposal`, `proposal-accepted`, `proposal-modified`, `proposal-rejected`,
    /// `consensus`, `import`.
    pub source: String,
    pub model: Option<String>,
    pub model_version: Option<String>,
    /// The content as JSON (labels, boxes, outlines, landmarks).
    pub content: String,
    /// The label map file relative to the data directory, and its hash.
    pub mask_path: Option<String>,
    pub mask_hash: Option<String>,
}

impl Catalog {
    /// Run `f` in a transaction and append `record` to the audit chain in the same one.
    pub(super) fn with_audit<T>(
        &mut self,
        record: &AuditRecord,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, CatalogError> {
        let path = self.path.clone();
        let sq = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let key = self.audit_key()?;
        let tx = self.conn.transaction().map_err(sq)?;
        let out = f(&tx).map_err(sq)?;
        let head = append_audit(&tx, &key, record).map_err(sq)?;
        tx.commit().map_err(sq)?;
        self.write_head(&key, Some(head))?;
        Ok(out)
    }

    /// Create a project (its definition as JSON). Returns false if the id exists.
    pub fn create_annotation_project(
        &mut self,
        id: &str,
        at: &str,
        definition: &str,
        record: &AuditRecord,
    ) -> Result<bool, CatalogError> {
        self.with_audit(record, |tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO annotation_projects (id, created, definition) VALUES (?1, ?2, ?3)",
                params![id, at, definition],
            )?;
            Ok(n == 1)
        })
    }

    /// Projects: (id, created, definition).
    pub fn annotation_projects(&self) -> Result<Vec<(String, String, String)>, CatalogError> {
        let mut st = self
            .conn
            .prepare("SELECT id, created, definition FROM annotation_projects ORDER BY id")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// A project's definition.
    pub fn annotation_project(&self, id: &str) -> Result<Option<String>, CatalogError> {
        self.conn
            .query_row(
                "SELECT definition FROM annotation_projects WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    /// Add cases (ignoring those already there); returns how many were new.
    pub fn add_annotation_cases(
        &mut self,
        cases: &[AnnotationCase],
        record: &AuditRecord,
    ) -> Result<usize, CatalogError> {
        self.with_audit(record, |tx| {
            let mut n = 0;
            for c in cases {
                n += tx.execute(
                    "INSERT OR IGNORE INTO annotation_cases (project, case_id, patient, modality, grid, image, image_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![c.project, c.case_id, c.patient, c.modality, c.grid, c.image, c.image_hash],
                )?;
            }
            Ok(n)
        })
    }

    /// A project's cases, by case id.
    pub fn annotation_cases(&self, project: &str) -> Result<Vec<AnnotationCase>, CatalogError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT project, case_id, patient, modality, grid, image, image_hash FROM annotation_cases
                 WHERE project = ?1 ORDER BY case_id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![project], |r| {
                Ok(AnnotationCase {
                    project: r.get(0)?,
                    case_id: r.get(1)?,
                    patient: r.get(2)?,
                    modality: r.get(3)?,
                    grid: r.get(4)?,
                    image: r.get(5)?,
                    image_hash: r.get(6)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Add assignments (ignoring those already there); returns how many were new.
    pub fn assign(
        &mut self,
        assignments: &[Assignment],
        record: &AuditRecord,
    ) -> Result<usize, CatalogError> {
        self.with_audit(record, |tx| {
            let mut n = 0;
            for a in assignments {
                n += tx.execute(
                    "INSERT OR IGNORE INTO annotation_assignments (project, case_id, rater, repeat, with_proposal, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![a.project, a.case_id, a.rater, a.repeat, a.with_proposal, a.state],
                )?;
            }
            Ok(n)
        })
    }

    /// A project's assignments.
    pub fn assignments(&self, project: &str) -> Result<Vec<Assignment>, CatalogError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT project, case_id, rater, repeat, with_proposal, state FROM annotation_assignments
                 WHERE project = ?1 ORDER BY case_id, rater, repeat",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![project], |r| {
                Ok(Assignment {
                    project: r.get(0)?,
                    case_id: r.get(1)?,
                    rater: r.get(2)?,
                    repeat: r.get(3)?,
                    with_proposal: r.get(4)?,
                    state: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Record a version (its label map, if any, already durable at `mask_path`); the
    /// assignment it answers, if any, becomes `submitted`. Returns the version's id.
    pub fn record_annotation_version(
        &mut self,
        v: &AnnotationVersion,
        record: &AuditRecord,
    ) -> Result<i64, CatalogError> {
        self.with_audit(record, |tx| {
            tx.execute(
                "INSERT INTO annotation_versions (project, case_id, rater, repeat, at, parent, source, model, model_version, content, mask_path, mask_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    v.project, v.case_id, v.rater, v.repeat, v.at, v.parent, v.source, v.model,
                    v.model_version, v.content, v.mask_path, v.mask_hash
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "UPDATE annotation_assignments SET state = 'submitted'
                 WHERE project = ?1 AND case_id = ?2 AND rater = ?3 AND repeat = ?4",
                params![v.project, v.case_id, v.rater, v.repeat],
            )?;
            Ok(id)
        })
    }

    /// Set an assignment's state (a reviewer returns a case: `returned`).
    pub fn set_assignment_state(
        &mut self,
        a: &Assignment,
        state: &str,
        record: &AuditRecord,
    ) -> Result<bool, CatalogError> {
        self.with_audit(record, |tx| {
            let n = tx.execute(
                "UPDATE annotation_assignments SET state = ?5
                 WHERE project = ?1 AND case_id = ?2 AND rater = ?3 AND repeat = ?4",
                params![a.project, a.case_id, a.rater, a.repeat, state],
            )?;
            Ok(n == 1)
        })
    }

    /// A project's versions, oldest first (one case's, when `case` is given).
    pub fn annotation_versions(
        &self,
        project: &str,
        case: Option<&str>,
    ) -> Result<Vec<AnnotationVersion>, CatalogError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, project, case_id, rater, repeat, at, parent, source, model, model_version, content, mask_path, mask_hash
                 FROM annotation_versions WHERE project = ?1 AND (?2 IS NULL OR case_id = ?2) ORDER BY id",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![project, case], |r| {
                Ok(AnnotationVersion {
                    id: r.get(0)?,
                    project: r.get(1)?,
                    case_id: r.get(2)?,
                    rater: r.get(3)?,
                    repeat: r.get(4)?,
                    at: r.get(5)?,
                    parent: r.get(6)?,
                    source: r.get(7)?,
                    model: r.get(8)?,
                    model_version: r.get(9)?,
                    content: r.get(10)?,
                    mask_path: r.get(11)?,
                    mask_hash: r.get(12)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// How many versions there are in every project (a change marker for caches).
    pub fn annotation_versions_total(&self) -> Result<i64, CatalogError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM annotation_versions", [], |r| r.get(0))
            .map_err(self.err())
    }

    /// One version.
    pub fn annotation_version(&self, id: i64) -> Result<Option<AnnotationVersion>, CatalogError> {
        let project: Option<String> = self
            .conn
            .query_row(
                "SELECT project FROM annotation_versions WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        let Some(project) = project else {
            return Ok(None);
        };
        Ok(self
            .annotation_versions(&project, None)?
            .into_iter()
            .find(|v| v.id == id))
    }
}
