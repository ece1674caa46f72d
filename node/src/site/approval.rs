//! Egress approval: what a schema makes leave the site, item by item, in words hospital IT
//! can review. Everything that decides what leaves is in the items (the schema id, the
//! privacy settings, vocabulary contents and band edges, the data-of-interest constraints the
//! conformance counts follow, histogram edges, the harmonisation recipe), and the approval
//! records a canonical digest of it. A schema whose digest was approved leaves at once; one
//! that only narrows what leaves (fewer statistics, a higher k, less ε) leaves too; anything
//! new or looser (a lower k, differential privacy or secure aggregation off, a larger ε or δ,
//! finer bins, new or shifted categories, another schema id) waits until
//! `fedcurate-node egress approve`, and `egress pending` shows it as a diff against what was
//! approved.

use std::path::{Path, PathBuf};

use protocol::schema::{CurationSchema, PrivacyPolicy};
use serde::{Deserialize, Serialize};

use crate::batch::write_atomically;

fn privacy_item(p: &PrivacyPolicy) -> String {
    format!(
        "privacy: at least {} patients behind every released count; differential privacy {}; secure aggregation {}",
        p.min_cell_count,
        match &p.differential_privacy {
            Some(d) => format!(
                "on (epsilon {} and delta {} per release)",
                d.epsilon, d.delta
            ),
            None => "off".into(),
        },
        if p.secure_aggregation { "on" } else { "off" }
    )
}

/// Whether `new` releases more than `old` allows: a lower k, differential privacy switched
/// off or spending more, secure aggregation switched off.
pub fn looser(new: &PrivacyPolicy, old: &PrivacyPolicy) -> bool {
    let dp = match (&old.differential_privacy, &new.differential_privacy) {
        (Some(_), None) => true,
        (Some(o), Some(n)) => n.epsilon > o.epsilon || n.delta > o.delta,
        (None, _) => false,
    };
    new.min_cell_count < old.min_cell_count
        || (old.secure_aggregation && !new.secure_aggregation)
        || dp
}

fn constraint_text(c: &protocol::schema::Constraint) -> String {
    let what = match (&c.range, &c.allowed) {
        (Some([lo, hi]), _) => format!("in [{lo}, {hi}]"),
        (_, Some(a)) => format!("one of {a:?}"),
        _ => String::new(),
    };
    format!(
        "{:?}{} {what}",
        c.attribute,
        c.modality
            .as_ref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    )
}

fn vocabulary_text(schema: &CurationSchema, v: &str) -> String {
    let voc = &schema.vocabularies;
    match v {
        "field_strength_bands" => format!("bands from {:?} T", voc.field_strength_bands),
        "age_bands" => format!("bands from {:?} years", voc.age_bands),
        _ => format!("{:?}", schema.vocabulary(v).unwrap_or_default()),
    }
}

/// What a schema makes leave the site, one human-readable item per kind of release (the
/// privacy settings are the first item). Items are compared as text: a changed edge,
/// category or constraint is a new item.
pub fn scope(schema: &CurationSchema) -> Vec<String> {
    let doi = &schema.data_of_interest;
    let mut out = vec![
        privacy_item(&schema.privacy),
        format!(
            "schema {}: the consortium protocol these releases belong to",
            schema.id
        ),
        format!(
            "schema acknowledgement: whether the de-identification profile has the options {:?}, and counts of patients (in scope: modalities {:?}, body parts {:?}; out of scope; deviating from each constraint [{}]), patients with findings by severity and quarantined inputs",
            schema.deidentification.options,
            doi.modalities,
            doi.body_parts,
            doi.constraints
                .iter()
                .map(constraint_text)
                .collect::<Vec<_>>()
                .join("; ")
        ),
        "totals: number of patients and of series".to_owned(),
    ];
    for v in &schema.statistics.counts_by {
        out.push(format!(
            "patients by {v}: {} and 'other'",
            vocabulary_text(schema, v)
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
            "moments of {} over patients: count, sum, sum of squares, and the k-th lowest and highest value (over at least 2k-1 patients)",
            q.name()
        ));
    }
    if let Some(h) = &schema.harmonisation {
        let params = format!("contrast {:?}, parameters {:?}", h.contrast, h.parameters);
        match h.method.as_str() {
            "nyul" => out.push(format!(
                "Nyúl landmark sums over MR volumes (11 numbers and a count of volumes; {params})"
            )),
            "ct-nnunet" => out.push(format!(
                "CT foreground statistics: count, sum, sum of squares and a 1-HU histogram (bins with fewer than k patients removed; {params})"
            )),
            _ => {}
        }
    }
    out
}

/// A canonical digest (SHA-256, hex) of everything in a schema that decides what leaves: all
/// of it but the revision number.
pub fn digest(schema: &CurationSchema) -> String {
    #[derive(Serialize)]
    struct Egress<'a> {
        id: &'a str,
        data_of_interest: &'a protocol::schema::DataOfInterest,
        deidentification: &'a protocol::schema::DeidRequirements,
        vocabularies: &'a protocol::schema::Vocabularies,
        statistics: &'a protocol::schema::Statistics,
        harmonisation: &'a Option<protocol::schema::HarmonisationRecipe>,
        privacy: &'a PrivacyPolicy,
    }
    let e = Egress {
        id: &schema.id,
        data_of_interest: &schema.data_of_interest,
        deidentification: &schema.deidentification,
        vocabularies: &schema.vocabularies,
        statistics: &schema.statistics,
        harmonisation: &schema.harmonisation,
        privacy: &schema.privacy,
    };
    crate::batch::content_hash(&serde_json::to_vec(&e).unwrap_or_default())
}

/// The approved items and the pending preview, in `<data_dir>/federation/`.
#[derive(Debug)]
pub struct Approvals {
    dir: PathBuf,
}

/// What hospital IT approved so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Approved {
    /// Every item ever approved.
    pub items: Vec<String>,
    /// The scope of the schema approved last (the diff's "before").
    #[serde(default)]
    pub last: Vec<String>,
    /// The privacy settings approved last.
    #[serde(default)]
    pub privacy: Option<PrivacyPolicy>,
    /// Digests of the schemas approved.
    #[serde(default)]
    pub digests: Vec<String>,
}

/// What waits for approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub schema_id: String,
    pub schema_revision: u32,
    /// The items that are new or looser than approved.
    pub items: Vec<String>,
    /// Items of the schema approved last that this one no longer has.
    #[serde(default)]
    pub removed: Vec<String>,
    /// The whole scope, the privacy settings and the digest, recorded on approval.
    #[serde(default)]
    pub scope: Vec<String>,
    pub privacy: PrivacyPolicy,
    #[serde(default)]
    pub digest: String,
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

    /// What was approved (an approval file of the earlier format, a plain list of items,
    /// reads as items without privacy settings: those wait again).
    pub fn approved(&self) -> Approved {
        let Ok(bytes) = std::fs::read(self.approved_path()) else {
            return Approved::default();
        };
        serde_json::from_slice::<Approved>(&bytes)
            .or_else(|_| {
                serde_json::from_slice::<Vec<String>>(&bytes).map(|items| Approved {
                    items,
                    ..Approved::default()
                })
            })
            .unwrap_or_default()
    }

    /// The items of `schema` not yet approved (new, changed or looser); records them as
    /// pending (for the preview and the diff).
    pub fn check(&self, schema: &CurationSchema) -> std::io::Result<Vec<String>> {
        let approved = self.approved();
        let d = digest(schema);
        let all = scope(schema);
        let mut new = Vec::new();
        if !approved.digests.contains(&d) {
            let privacy_waits = approved
                .privacy
                .as_ref()
                .is_none_or(|old| looser(&schema.privacy, old));
            for (i, item) in all.iter().enumerate() {
                // The privacy settings are judged by what they allow, not by their wording.
                let waits = if i == 0 {
                    privacy_waits
                } else {
                    !approved.items.contains(item)
                };
                if waits {
                    new.push(item.clone());
                }
            }
        }
        if new.is_empty() {
            let _ = std::fs::remove_file(self.pending_path());
        } else {
            let p = Pending {
                schema_id: schema.id.clone(),
                schema_revision: schema.revision,
                items: new.clone(),
                removed: approved
                    .last
                    .iter()
                    .filter(|i| !all.contains(i))
                    .cloned()
                    .collect(),
                scope: all,
                privacy: schema.privacy.clone(),
                digest: d,
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
        let mut a = self.approved();
        for i in p.items.iter().chain(&p.scope) {
            if !a.items.contains(i) {
                a.items.push(i.clone());
            }
        }
        a.last = p.scope.clone();
        a.privacy = Some(p.privacy.clone());
        if !p.digest.is_empty() && !a.digests.contains(&p.digest) {
            a.digests.push(p.digest.clone());
        }
        write_atomically(
            &self.approved_path(),
            &serde_json::to_vec_pretty(&a).map_err(std::io::Error::other)?,
        )?;
        std::fs::remove_file(self.pending_path())?;
        Ok(p.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYED: &str = include_str!("../../../deploy/schema.toml");

    /// The example schema, with counts by age band too.
    fn base() -> String {
        DEPLOYED.replacen(
            "counts_by = [\"modality\", \"sex\"]",
            "counts_by = [\"modality\", \"sex\", \"age_bands\"]",
            1,
        )
    }

    fn approved_dir() -> (tempfile::TempDir, Approvals, CurationSchema) {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Approvals::at(dir.path());
        let schema = CurationSchema::parse(&base()).expect("schema");
        let first = a.check(&schema).expect("check");
        assert_eq!(first, scope(&schema), "a first schema waits entirely");
        assert_eq!(a.approve().expect("approve"), first);
        assert!(a.check(&schema).expect("check").is_empty());
        (dir, a, schema)
    }

    fn variant(from: &str, to: &str) -> CurationSchema {
        let base = base();
        assert!(base.contains(from), "{from}");
        CurationSchema::parse(&base.replacen(from, to, 1)).expect("variant")
    }

    #[test]
    fn a_widening_schema_waits_and_a_narrower_one_does_not() {
        let (_dir, a, _) = approved_dir();
        // Removing a statistic narrows what leaves: nothing to approve.
        let n = variant(
            "counts_by = [\"modality\", \"sex\", \"age_bands\"]",
            "counts_by = [\"modality\"]",
        );
        assert!(a.check(&n).expect("check").is_empty());
        // A higher k and a smaller epsilon are tighter: nothing to approve either.
        let tighter = variant("min_cell_count = 10", "min_cell_count = 20");
        assert!(a.check(&tighter).expect("check").is_empty());
        let tighter = variant("epsilon = 1.0", "epsilon = 0.5");
        assert!(a.check(&tighter).expect("check").is_empty());
        // A new histogram widens it: exactly that item waits (cnr's moments were approved).
        let wider = format!(
            "{}\n[[statistics.histograms]]\nquantity = \"cnr\"\nedges = [0.0, 1.0, 2.0]\n",
            base()
        );
        let w = CurationSchema::parse(&wider).expect("wider");
        let pending = a.check(&w).expect("check");
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].starts_with("patients per bin of cnr"));
        assert_eq!(a.pending().map(|p| p.items), Some(pending));
    }

    #[test]
    fn every_loosening_waits() {
        let (_dir, a, _) = approved_dir();
        let cases = [
            ("min_cell_count = 10", "min_cell_count = 5", "privacy"),
            (
                "[privacy.differential_privacy]\nepsilon = 1.0\ndelta = 0.0",
                "",
                "privacy",
            ),
            ("epsilon = 1.0", "epsilon = 2.0", "privacy"),
            ("delta = 0.0", "delta = 0.000001", "privacy"),
            // Shifted age bands: still five categories.
            (
                "age_bands = [0, 18, 40, 65, 90]",
                "age_bands = [0, 20, 40, 65, 90]",
                "patients by age_bands",
            ),
            (
                "sex = [\"F\", \"M\", \"O\"]",
                "sex = [\"F\", \"M\", \"X\"]",
                "patients by sex",
            ),
            (
                "id = \"brain-mri-2027\"",
                "id = \"brain-mri-2028\"",
                "schema brain-mri-2028",
            ),
            (
                "range = [0.5, 5.0]",
                "range = [0.5, 3.0]",
                "schema acknowledgement",
            ),
            (
                "edges = [0.0, 5.0, 10.0, 20.0, 40.0]",
                "edges = [0.0, 5.0, 7.0, 10.0, 20.0, 40.0]",
                "patients per bin of snr",
            ),
            ("contrast = \"t1\"", "contrast = \"t2\"", "Nyúl"),
        ];
        for (from, to, starts) in cases {
            let v = variant(from, to);
            let pending = a.check(&v).expect("check");
            assert!(
                pending.iter().any(|p| p.starts_with(starts)),
                "{from} -> {to}: {pending:?}"
            );
        }
        // Secure aggregation switched off after a schema with it on was approved.
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Approvals::at(dir.path());
        let on = variant("secure_aggregation = false", "secure_aggregation = true");
        assert!(!b.check(&on).expect("check").is_empty());
        b.approve().expect("approve");
        assert!(
            b.check(&on).expect("check").is_empty(),
            "approved by digest"
        );
        let off = variant("secure_aggregation = false", "secure_aggregation = false");
        let pending = b.check(&off).expect("check");
        assert!(
            pending.iter().any(|p| p.contains("secure aggregation off")),
            "{pending:?}"
        );
    }

    #[test]
    fn the_pending_preview_is_a_diff_against_what_was_approved() {
        let (_dir, a, _) = approved_dir();
        let v = variant(
            "age_bands = [0, 18, 40, 65, 90]",
            "age_bands = [0, 20, 40, 65, 90]",
        );
        a.check(&v).expect("check");
        let p = a.pending().expect("pending");
        assert!(p.items.iter().any(|i| i.contains("[0, 20, 40, 65, 90]")));
        assert!(p.removed.iter().any(|i| i.contains("[0, 18, 40, 65, 90]")));
        assert_eq!(p.digest, digest(&v));
        // The revision number alone does not change the digest.
        let r = variant("revision = 3", "revision = 4");
        assert_eq!(
            digest(&r),
            digest(&CurationSchema::parse(&base()).expect("schema"))
        );
    }
}
