//! The consortium curation schema: a versioned, hashed TOML document that the coordinator
//! distributes and every node follows. It says which data is of interest, which
//! de-identification options the consortium needs, the vocabularies statistics may be broken
//! down by (so that wire messages carry indices, never free text), which statistics to compute,
//! the harmonisation recipe, and the privacy policy.
//!
//! Its strings are the consortium's own (modality codes, manufacturer names, protocol phrases),
//! never values taken from a patient's data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::SchemaHash;

/// The schema format this build reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The smallest minimum cell count any site may use.
pub const MIN_CELL_COUNT_FLOOR: u32 = 5;

/// The narrowest age band a schema may define, in years.
pub const MIN_AGE_BAND: u32 = 5;

/// The narrowest field-strength band, in tesla.
pub const MIN_FIELD_STRENGTH_BAND: f64 = 0.5;

/// The whole document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurationSchema {
    /// Format version (1).
    pub schema_version: u32,
    /// Short identifier of the consortium protocol (a-z, 0-9, '-').
    pub id: String,
    /// Revision of this protocol, increased at every change.
    pub revision: u32,
    pub data_of_interest: DataOfInterest,
    #[serde(default)]
    pub deidentification: DeidRequirements,
    pub vocabularies: Vocabularies,
    #[serde(default)]
    pub statistics: Statistics,
    #[serde(default)]
    pub harmonisation: Option<HarmonisationRecipe>,
    pub privacy: PrivacyPolicy,
}

/// Which data the consortium wants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataOfInterest {
    /// DICOM modality codes in scope (`CT`, `MR`, ...).
    pub modalities: Vec<String>,
    /// Body Part Examined values in scope (empty: any).
    #[serde(default)]
    pub body_parts: Vec<String>,
    /// Acquisition constraints; a series in scope that violates one deviates.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
}

/// An acquisition attribute a constraint can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Acquisition {
    SliceThickness,
    PixelSpacing,
    FieldStrength,
    Kvp,
    RepetitionTime,
    EchoTime,
    Manufacturer,
    Rows,
    Columns,
    ContrastAgent,
}

/// One constraint: a numeric range or a set of allowed values, optionally per modality.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    pub attribute: Acquisition,
    /// Applies to this modality only (any when absent).
    #[serde(default)]
    pub modality: Option<String>,
    /// Inclusive numeric range `[min, max]`.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// Allowed values (compared case-insensitively).
    #[serde(default)]
    pub allowed: Option<Vec<String>>,
}

/// De-identification options the consortium needs (configuration names, e.g.
/// `retain-patient-characteristics`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidRequirements {
    #[serde(default)]
    pub options: Vec<String>,
}

/// Categorical values statistics may be broken down by; on the wire a value is its index.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vocabularies {
    pub modality: Vec<String>,
    #[serde(default)]
    pub manufacturer: Vec<String>,
    /// Field strength band edges in tesla, ascending.
    #[serde(default)]
    pub field_strength_bands: Vec<f64>,
    /// Age band lower bounds in years, ascending from 0.
    #[serde(default)]
    pub age_bands: Vec<u32>,
    #[serde(default)]
    pub sex: Vec<String>,
    #[serde(default)]
    pub finding_codes: Vec<String>,
    #[serde(default)]
    pub label_classes: Vec<String>,
}

/// A histogram to compute: the quantity and its bin edges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistogramSpec {
    /// A quantity measured once per patient: `intensity`, `pixel-spacing`, `slice-thickness`
    /// or a quality metric (`snr`, `cnr`, `cjv`, `efc`, `fber`, `cv`, ...).
    pub quantity: String,
    pub edges: Vec<f64>,
    /// Only series of this modality (any when absent).
    #[serde(default)]
    pub modality: Option<String>,
}

/// Which statistics to compute.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statistics {
    /// Counts broken down by these vocabularies (names of [`Vocabularies`] fields).
    #[serde(default)]
    pub counts_by: Vec<String>,
    #[serde(default)]
    pub histograms: Vec<HistogramSpec>,
    /// Quantities to summarise as moments (quality metric names, or `intensity`, ...).
    #[serde(default)]
    pub quality_metrics: Vec<String>,
}

/// The harmonisation recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HarmonisationRecipe {
    /// Method name as `fedcurate-node harmonise --method` takes it.
    pub method: String,
    /// MR contrast the method needs (`t1`, `t2`, `flair`, `pd`).
    #[serde(default)]
    pub contrast: Option<String>,
    /// Numeric parameters by name.
    #[serde(default)]
    pub parameters: BTreeMap<String, f64>,
}

/// What may leave a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// Minimum count per released cell (at least 5; a site may raise it).
    pub min_cell_count: u32,
    #[serde(default)]
    pub differential_privacy: Option<DifferentialPrivacy>,
    /// Sites send their aggregates masked (pairwise X25519 masks that cancel in the sum): the
    /// coordinator learns only totals over at least three sites.
    #[serde(default)]
    pub secure_aggregation: bool,
}

/// Differential-privacy parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DifferentialPrivacy {
    pub epsilon: f64,
    #[serde(default)]
    pub delta: f64,
}

/// A schema that cannot be used; `field` names where.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("curation schema, field `{field}`: {message}")]
pub struct SchemaError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        field: field.to_owned(),
        message: message.into(),
    }
}

const VOCABULARY_NAMES: [&str; 7] = [
    "modality",
    "manufacturer",
    "field_strength_bands",
    "age_bands",
    "sex",
    "finding_codes",
    "label_classes",
];

impl CurationSchema {
    /// Parse and validate a TOML document.
    pub fn parse(text: &str) -> Result<Self, SchemaError> {
        let schema: CurationSchema = toml::from_str(text).map_err(|e| {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .unwrap_or("document")
                .to_owned();
            SchemaError {
                field,
                message: e.message().to_owned(),
            }
        })?;
        schema.validate()?;
        Ok(schema)
    }

    /// Check every field.
    pub fn validate(&self) -> Result<(), SchemaError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(err(
                "schema_version",
                format!(
                    "version {} is not supported (this build reads {SCHEMA_VERSION})",
                    self.schema_version
                ),
            ));
        }
        let slug = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !slug {
            return Err(err("id", "must be 1-64 characters of a-z, 0-9 and '-'"));
        }
        if self.data_of_interest.modalities.is_empty() {
            return Err(err(
                "data_of_interest.modalities",
                "name at least one modality",
            ));
        }
        for (i, c) in self.data_of_interest.constraints.iter().enumerate() {
            let f = format!("data_of_interest.constraints[{i}]");
            match (&c.range, &c.allowed) {
                (None, None) | (Some(_), Some(_)) => {
                    return Err(err(&f, "give exactly one of `range` and `allowed`"));
                }
                (Some([lo, hi]), None) if lo > hi || !lo.is_finite() || !hi.is_finite() => {
                    return Err(err(
                        &format!("{f}.range"),
                        "must be [min, max] with min <= max",
                    ));
                }
                (None, Some(a)) if a.is_empty() => {
                    return Err(err(&format!("{f}.allowed"), "must not be empty"));
                }
                _ => {}
            }
        }
        if self.vocabularies.modality.is_empty() {
            return Err(err(
                "vocabularies.modality",
                "must list the modalities statistics may be broken down by",
            ));
        }
        let ascending = |v: &[f64]| v.windows(2).all(|w| w[0] < w[1]);
        if !ascending(&self.vocabularies.field_strength_bands) {
            return Err(err(
                "vocabularies.field_strength_bands",
                "edges must increase strictly",
            ));
        }
        if self
            .vocabularies
            .field_strength_bands
            .windows(2)
            .any(|w| w[1] - w[0] < MIN_FIELD_STRENGTH_BAND)
        {
            return Err(err(
                "vocabularies.field_strength_bands",
                format!("bands must be at least {MIN_FIELD_STRENGTH_BAND} T wide"),
            ));
        }
        if self
            .vocabularies
            .age_bands
            .windows(2)
            .any(|w| w[1].saturating_sub(w[0]) < MIN_AGE_BAND)
        {
            return Err(err(
                "vocabularies.age_bands",
                format!("bands must be at least {MIN_AGE_BAND} years wide"),
            ));
        }
        let bands = &self.vocabularies.age_bands;
        if !bands.is_empty() && (bands[0] != 0 || bands.windows(2).any(|w| w[0] >= w[1])) {
            return Err(err(
                "vocabularies.age_bands",
                "lower bounds must start at 0 and increase strictly",
            ));
        }
        for (i, name) in self.statistics.counts_by.iter().enumerate() {
            if !VOCABULARY_NAMES.contains(&name.as_str()) {
                return Err(err(
                    &format!("statistics.counts_by[{i}]"),
                    format!(
                        "`{name}` is not a vocabulary; known: {}",
                        VOCABULARY_NAMES.join(", ")
                    ),
                ));
            }
        }
        let known = || {
            crate::aggregate::Quantity::ALL
                .iter()
                .map(|q| q.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (i, m) in self.statistics.quality_metrics.iter().enumerate() {
            if crate::aggregate::Quantity::from_name(m).is_none() {
                return Err(err(
                    &format!("statistics.quality_metrics[{i}]"),
                    format!("`{m}` is not a known quantity; known: {}", known()),
                ));
            }
        }
        for (i, h) in self.statistics.histograms.iter().enumerate() {
            if crate::aggregate::Quantity::from_name(&h.quantity).is_none() {
                return Err(err(
                    &format!("statistics.histograms[{i}].quantity"),
                    format!(
                        "`{}` is not a known quantity; known: {}",
                        h.quantity,
                        known()
                    ),
                ));
            }
            if h.edges.len() < 2 || !ascending(&h.edges) {
                return Err(err(
                    &format!("statistics.histograms[{i}].edges"),
                    "need at least two strictly increasing edges",
                ));
            }
            if h.edges.len() + 1 > crate::aggregate::MAX_HISTOGRAM_CELLS {
                return Err(err(
                    &format!("statistics.histograms[{i}].edges"),
                    format!(
                        "at most {} edges ({} cells with the two open ends)",
                        crate::aggregate::MAX_HISTOGRAM_CELLS - 1,
                        crate::aggregate::MAX_HISTOGRAM_CELLS
                    ),
                ));
            }
            if let Some(q) = crate::aggregate::Quantity::from_name(&h.quantity)
                && h.edges.windows(2).any(|w| w[1] - w[0] < q.min_bin_width())
            {
                return Err(err(
                    &format!("statistics.histograms[{i}].edges"),
                    format!(
                        "bins of {} must be at least {} wide (finer bins locate single patients' values)",
                        h.quantity,
                        q.min_bin_width()
                    ),
                ));
            }
        }
        if self.privacy.min_cell_count < MIN_CELL_COUNT_FLOOR {
            return Err(err(
                "privacy.min_cell_count",
                format!("must be at least {MIN_CELL_COUNT_FLOOR}"),
            ));
        }
        if let Some(dp) = &self.privacy.differential_privacy
            && (dp.epsilon.is_nan() || dp.epsilon <= 0.0 || !(0.0..1.0).contains(&dp.delta))
        {
            return Err(err(
                "privacy.differential_privacy",
                "epsilon must be > 0 and delta in [0, 1)",
            ));
        }
        Ok(())
    }

    /// The index of a value in a vocabulary (what the wire carries), if listed.
    pub fn vocabulary_index(&self, vocabulary: &str, value: &str) -> Option<u32> {
        self.vocabulary(vocabulary)?
            .iter()
            .position(|v| v.eq_ignore_ascii_case(value.trim()))
            .map(|i| i as u32)
    }

    /// The entries of a named vocabulary of values (not the banded ones).
    pub fn vocabulary(&self, vocabulary: &str) -> Option<&[String]> {
        let v = &self.vocabularies;
        Some(match vocabulary {
            "modality" => &v.modality,
            "manufacturer" => &v.manufacturer,
            "sex" => &v.sex,
            "finding_codes" => &v.finding_codes,
            "label_classes" => &v.label_classes,
            _ => return None,
        })
    }

    /// Cells of a vocabulary's count table: its entries (or bands) and one more, for values
    /// not listed or missing.
    pub fn count_table_len(&self, vocabulary: &str) -> usize {
        self.vocabulary_len(vocabulary) + 1
    }

    /// Entries (or bands) of a vocabulary.
    pub fn vocabulary_len(&self, vocabulary: &str) -> usize {
        let v = &self.vocabularies;
        match vocabulary {
            "field_strength_bands" => v.field_strength_bands.len(),
            "age_bands" => v.age_bands.len(),
            other => self.vocabulary(other).map_or(0, <[String]>::len),
        }
    }

    /// The quantities whose moments a site reports, in order: `quality_metrics`, then the
    /// histogram quantities not already listed.
    pub fn moment_quantities(&self) -> Vec<crate::aggregate::Quantity> {
        let mut out = Vec::new();
        for n in self
            .statistics
            .quality_metrics
            .iter()
            .chain(self.statistics.histograms.iter().map(|h| &h.quantity))
        {
            if let Some(q) = crate::aggregate::Quantity::from_name(n)
                && !out.contains(&q)
            {
                out.push(q);
            }
        }
        out
    }

    /// The minimum cell count a site uses: the schema's, or a site's higher one.
    pub fn min_cell_count(&self, site_override: Option<u32>) -> u32 {
        self.privacy.min_cell_count.max(site_override.unwrap_or(0))
    }
}

/// SHA-256 of a schema document's bytes as distributed.
pub fn schema_hash(text: &str) -> SchemaHash {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    SchemaHash(h)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const EXAMPLE: &str = include_str!("../../deploy/schema.toml");

    #[test]
    fn the_example_schema_parses_and_hashes_stably() {
        let s = CurationSchema::parse(EXAMPLE).expect("example schema");
        assert_eq!(s.schema_version, 1);
        assert_eq!(schema_hash(EXAMPLE), schema_hash(EXAMPLE));
        assert_ne!(schema_hash(EXAMPLE), schema_hash(&format!("{EXAMPLE}\n")));
        assert_eq!(s.vocabulary_index("modality", "mr"), Some(1));
        assert_eq!(s.min_cell_count(Some(3)), s.privacy.min_cell_count);
        assert_eq!(s.min_cell_count(Some(50)), 50);
    }

    #[test]
    fn each_kind_of_invalid_document_names_its_field() {
        let fine: Vec<String> = (0..2000)
            .map(|i| format!("{}", f64::from(i) * 0.01))
            .collect();
        let fine = format!("edges = [{}]", fine.join(", "));
        let cases: [(&str, &str, &str); 14] = [
            ("schema_version = 1", "schema_version = 2", "schema_version"),
            ("id = \"brain-mri-2027\"", "id = \"Brain MRI\"", "id"),
            (
                "min_cell_count = 10",
                "min_cell_count = 3",
                "privacy.min_cell_count",
            ),
            (
                "modalities = [\"CT\", \"MR\"]",
                "modalities = []",
                "data_of_interest.modalities",
            ),
            (
                "range = [0.5, 5.0]",
                "range = [5.0, 0.5]",
                "data_of_interest.constraints[0].range",
            ),
            (
                "age_bands = [0, 18, 40, 65, 90]",
                "age_bands = [5, 18]",
                "vocabularies.age_bands",
            ),
            (
                "counts_by = [\"modality\", \"sex\"]",
                "counts_by = [\"modality\", \"hospital\"]",
                "statistics.counts_by[1]",
            ),
            (
                "edges = [0.0, 5.0, 10.0, 20.0, 40.0]",
                "edges = [0.0]",
                "statistics.histograms[0].edges",
            ),
            (
                "epsilon = 1.0",
                "epsilon = 0.0",
                "privacy.differential_privacy",
            ),
            // 2,000 bins 0.01 wide would place every patient's value to 0.01.
            (
                "edges = [0.0, 5.0, 10.0, 20.0, 40.0]",
                &fine,
                "statistics.histograms[0].edges",
            ),
            // Narrow bins, even a few of them.
            (
                "edges = [0.0, 5.0, 10.0, 20.0, 40.0]",
                "edges = [0.0, 0.1, 0.2]",
                "statistics.histograms[0].edges",
            ),
            (
                "edges = [0.0, 1.0, 2.0, 3.0, 5.0, 10.0]",
                "edges = [0.0, 1.0, 1.2, 3.0]",
                "statistics.histograms[1].edges",
            ),
            (
                "age_bands = [0, 18, 40, 65, 90]",
                "age_bands = [0, 18, 19, 65, 90]",
                "vocabularies.age_bands",
            ),
            (
                "field_strength_bands = [0.0, 1.0, 2.0, 4.0]",
                "field_strength_bands = [0.0, 1.0, 1.1, 4.0]",
                "vocabularies.field_strength_bands",
            ),
        ];
        for (from, to, field) in cases {
            assert!(EXAMPLE.contains(from), "example lacks {from}");
            let bad = EXAMPLE.replacen(from, to, 1);
            let e = CurationSchema::parse(&bad).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
        let unknown = EXAMPLE.replacen("[privacy]", "[privacy]\nleak = true", 1);
        let e = CurationSchema::parse(&unknown).expect_err("unknown field");
        assert!(e.to_string().contains("leak"), "{e}");
    }
}
