//! Egress approval: what a schema makes leave the site, item by item, in words hospital IT
//! can review. Items already approved leave automatically; a new one (a first schema, or a
//! schema that widens what leaves) waits until `fedcurate-node egress approve`.

use std::path::{Path, PathBuf};

use protocol::schema::CurationSchema;

use crate::batch::write_atomically;

/// What a schema makes leave the site, one human-readable item per kind of release. Items
/// are compared as text: a changed bin count or vocabulary is a new item.
pub fn scope(schema: &CurationSchema) -> Vec<String> {
    let mut out = vec![
        "schema acknowledgement: whether the de-identification profile has the required options, and counts of series (in scope, out of scope, deviating per protocol constraint), findings by severity and quarantined inputs".to_owned(),
        "totals: number of patients and of series".to_owned(),
    ];
    for v in &schema.statistics.counts_by {
        out.push(format!(
            "patients by {v} ({} categories and 'other')",
            schema.vocabulary_len(v)
        ));
    }
    for h in &schema.statistics.histograms {
        out.push(format!(
            "patients per bin of {}{} ({} bins, edges {:?})",
            h.quantity,
            h.modality
                .as_ref()
                .map(|m| format!(" in {m}"))
                .unwrap_or_default(),
            h.edges.len() + 1,
            h.edges
        ));
    }
    for q in schema.moment_quantities() {
        out.push(format!(
            "moments of {} over patients: count, sum, sum of squares, k-th lowest and highest value",
            q.name()
        ));
    }
    match schema.harmonisation.as_ref().map(|h| h.method.as_str()) {
        Some("nyul") => out.push(
            "Nyúl landmark sums over MR volumes (11 numbers and a count of volumes)".into(),
        ),
        Some("ct-nnunet") => out.push(
            "CT foreground statistics: count, sum, sum of squares and a 1-HU histogram (bins with fewer than k patients removed)".into(),
        ),
        _ => {}
    }
    out
}

/// The approved items and the pending preview, in `<data_dir>/federation/`.
#[derive(Debug)]
pub struct Approvals {
    dir: PathBuf,
}

/// What waits for approval.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub schema_id: String,
    pub schema_revision: u32,
    pub items: Vec<String>,
}

impl Approvals {
    pub fn at(federation_dir: &Path) -> Self {
        Approvals {
            dir: federation_dir.to_owned(),
        }
    }

    fn approved_path(&self) -> PathBuf {
        self.dir.join("approved.json")
    }

    fn pending_path(&self) -> PathBuf {
        self.dir.join("pending.json")
    }

    pub fn approved(&self) -> Vec<String> {
        std::fs::read(self.approved_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The items of `schema` not yet approved; records them as pending (for the preview).
    pub fn check(&self, schema: &CurationSchema) -> std::io::Result<Vec<String>> {
        let approved = self.approved();
        let new: Vec<String> = scope(schema)
            .into_iter()
            .filter(|i| !approved.contains(i))
            .collect();
        if new.is_empty() {
            let _ = std::fs::remove_file(self.pending_path());
        } else {
            let p = Pending {
                schema_id: schema.id.clone(),
                schema_revision: schema.revision,
                items: new.clone(),
            };
            write_atomically(
                &self.pending_path(),
                &serde_json::to_vec_pretty(&p).map_err(std::io::Error::other)?,
            )?;
        }
        Ok(new)
    }

    pub fn pending(&self) -> Option<Pending> {
        std::fs::read(self.pending_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Approve everything pending; returns what was approved.
    pub fn approve(&self) -> std::io::Result<Vec<String>> {
        let Some(p) = self.pending() else {
            return Ok(Vec::new());
        };
        let mut all = self.approved();
        for i in &p.items {
            if !all.contains(i) {
                all.push(i.clone());
            }
        }
        write_atomically(
            &self.approved_path(),
            &serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?,
        )?;
        std::fs::remove_file(self.pending_path())?;
        Ok(p.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../deploy/schema.toml");

    #[test]
    fn a_widening_schema_waits_and_a_narrower_one_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Approvals::at(dir.path());
        let schema = CurationSchema::parse(SCHEMA).expect("schema");
        let first = a.check(&schema).expect("check");
        assert_eq!(first, scope(&schema), "a first schema waits entirely");
        assert_eq!(a.approve().expect("approve"), first);
        assert!(a.check(&schema).expect("check").is_empty());
        // Removing a statistic narrows what leaves: nothing to approve.
        let narrower = SCHEMA.replacen(
            "counts_by = [\"modality\", \"sex\"]",
            "counts_by = [\"modality\"]",
            1,
        );
        assert_ne!(narrower, SCHEMA);
        let n = CurationSchema::parse(&narrower).expect("narrower");
        assert!(a.check(&n).expect("check").is_empty());
        // A new histogram widens it: exactly that item waits (cnr's moments were approved).
        let wider = format!(
            "{SCHEMA}\n[[statistics.histograms]]\nquantity = \"cnr\"\nedges = [0.0, 1.0, 2.0]\n"
        );
        let w = CurationSchema::parse(&wider).expect("wider");
        let pending = a.check(&w).expect("check");
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].starts_with("patients per bin of cnr"));
        assert_eq!(a.pending().map(|p| p.items), Some(pending));
    }
}
