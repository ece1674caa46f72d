//! The annotation model: projects (label schema, kinds, raters, blinding), and the content of
//! one saved version (labels, boxes, polygons, landmarks; the mask is a label map beside it).
//!
//! Coordinates are continuous voxel indices of the case image (i, j, k along the NIfTI axes of
//! the image the node serves), so they survive any display orientation; millimetres come from
//! the image's affine ([`crate::Grid::to_mm`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A coded concept (SNOMED CT and DICOM codes, as DICOM SEG needs them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Code {
    /// e.g. `SCT`, `DCM`.
    pub scheme: String,
    pub value: String,
    pub meaning: String,
}

/// A label class of a project.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelClass {
    /// The value in label maps (1..; 0 is background).
    pub value: u16,
    pub name: String,
    /// Display colour, sRGB.
    pub colour: [u8; 3],
    /// Segmented property category and type (DICOM SEG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Code>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub property_type: Option<Code>,
}

/// Where a classification label applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Case,
    Series,
    Slice,
}

/// The kinds of annotation a project allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One class per case, series or slice.
    Label,
    /// Several classes per case, series or slice.
    MultiLabel,
    Box2d,
    Box3d,
    Polygon,
    Polyline,
    Landmark,
    Mask,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Label,
        Kind::MultiLabel,
        Kind::Box2d,
        Kind::Box3d,
        Kind::Polygon,
        Kind::Polyline,
        Kind::Landmark,
        Kind::Mask,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Label => "label",
            Kind::MultiLabel => "multi-label",
            Kind::Box2d => "box2d",
            Kind::Box3d => "box3d",
            Kind::Polygon => "polygon",
            Kind::Polyline => "polyline",
            Kind::Landmark => "landmark",
            Kind::Mask => "mask",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Which cases a project takes from the node's de-identified output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseQuery {
    /// Modalities (empty: every one).
    #[serde(default)]
    pub modalities: Vec<String>,
    /// Only series the curation report finds in the consortium protocol.
    #[serde(default)]
    pub in_protocol: bool,
    /// Leave out series with any of these curation finding codes.
    #[serde(default)]
    pub exclude_findings: Vec<String>,
}

/// An annotation project.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// A slug (a-z, 0-9, '-').
    pub id: String,
    pub labels: Vec<LabelClass>,
    pub kinds: BTreeSet<Kind>,
    /// Raters per case.
    pub raters_per_case: u32,
    /// A rater sees only their own work until adjudication (default on).
    #[serde(default = "yes")]
    pub blinded: bool,
    /// Each case is assigned to each rater this many times (more than 1 for intra-rater
    /// studies).
    #[serde(default = "one")]
    pub repeats: u32,
    /// Fraction of assignments served without the model's proposal (anchoring-bias control).
    #[serde(default)]
    pub without_proposal: f64,
    #[serde(default)]
    pub cases: CaseQuery,
    /// The largest label map the web annotator accepts in one upload, in MiB.
    #[serde(default = "default_max_upload_mib")]
    pub max_upload_mib: u64,
}

fn default_max_upload_mib() -> u64 {
    512
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// Why a project definition is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProjectError {
    #[error("project id {0:?}: use lower-case letters, digits and '-', at most 64 characters")]
    Id(String),
    #[error("label value {0} is used twice, or is 0 (0 is background)")]
    LabelValue(u16),
    #[error("label name {0:?} is used twice or empty")]
    LabelName(String),
    #[error("a project needs at least one label class and one kind of annotation")]
    Empty,
    #[error("raters per case and repeats must be at least 1")]
    Raters,
    #[error("the fraction served without proposals must be within 0..1, not {0}")]
    Fraction(f64),
}

impl Project {
    /// Check the definition.
    pub fn validate(&self) -> Result<(), ProjectError> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ProjectError::Id(self.id.clone()));
        }
        if self.labels.is_empty() || self.kinds.is_empty() {
            return Err(ProjectError::Empty);
        }
        let mut values = BTreeSet::new();
        let mut names = BTreeSet::new();
        for l in &self.labels {
            if l.value == 0 || !values.insert(l.value) {
                return Err(ProjectError::LabelValue(l.value));
            }
            if l.name.trim().is_empty() || !names.insert(l.name.as_str()) {
                return Err(ProjectError::LabelName(l.name.clone()));
            }
        }
        if self.raters_per_case == 0 || self.repeats == 0 {
            return Err(ProjectError::Raters);
        }
        if !(0.0..=1.0).contains(&self.without_proposal) {
            return Err(ProjectError::Fraction(self.without_proposal));
        }
        Ok(())
    }

    /// The class with this value.
    pub fn label(&self, value: u16) -> Option<&LabelClass> {
        self.labels.iter().find(|l| l.value == value)
    }

    /// The class with this name.
    pub fn label_named(&self, name: &str) -> Option<&LabelClass> {
        self.labels.iter().find(|l| l.name == name)
    }

    /// The largest label value: label maps are uint8 up to 255, uint16 past it.
    pub fn max_label(&self) -> u16 {
        self.labels.iter().map(|l| l.value).max().unwrap_or(0)
    }
}

/// Where a version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Manual,
    ProposalAccepted,
    ProposalModified,
    ProposalRejected,
    Consensus,
    Import,
    /// A model's proposal as imported, before a rater acted on it.
    Proposal,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Manual => "manual",
            Source::ProposalAccepted => "proposal-accepted",
            Source::ProposalModified => "proposal-modified",
            Source::ProposalRejected => "proposal-rejected",
            Source::Consensus => "consensus",
            Source::Import => "import",
            Source::Proposal => "proposal",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        [
            Source::Manual,
            Source::ProposalAccepted,
            Source::ProposalModified,
            Source::ProposalRejected,
            Source::Consensus,
            Source::Import,
            Source::Proposal,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }
}

/// A classification label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassLabel {
    pub level: Level,
    /// The slice index (k) for slice-level labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<u32>,
    /// Class values (one, or several for multi-label).
    pub classes: Vec<u16>,
}

/// An axis-aligned box in voxel coordinates: 2D on one slice (`k0 == k1`, `slice` set) or 3D.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox {
    pub class: u16,
    /// The slice of a 2D box.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<u32>,
    /// Corners (continuous voxel coordinates; min then max).
    pub min: [f64; 3],
    pub max: [f64; 3],
}

/// A polygon (closed) or polyline (open) on one slice, points (i, j) in voxel coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outline {
    pub class: u16,
    pub slice: u32,
    pub closed: bool,
    pub points: Vec<[f64; 2]>,
}

/// A landmark: a named point, in voxel coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Landmark {
    pub name: String,
    pub voxel: [f64; 3],
}

/// What one saved version holds besides the mask.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Content {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<ClassLabel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<BoundingBox>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outlines: Vec<Outline>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub landmarks: Vec<Landmark>,
}

impl Content {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
            && self.boxes.is_empty()
            && self.outlines.is_empty()
            && self.landmarks.is_empty()
    }

    /// Check the content against the project and the image grid: every class is the
    /// project's, every kind allowed, every coordinate within the image.
    pub fn check(&self, project: &Project, shape: [usize; 3]) -> Result<(), String> {
        let class = |c: u16| {
            project
                .label(c)
                .map(|_| ())
                .ok_or_else(|| format!("label value {c} is not in project {}", project.id))
        };
        let allow = |k: Kind| {
            if project.kinds.contains(&k) {
                Ok(())
            } else {
                Err(format!(
                    "project {} does not allow {} annotations",
                    project.id,
                    k.name()
                ))
            }
        };
        let inside = |p: [f64; 3]| {
            let ok =
                (0..3).all(|a| p[a].is_finite() && p[a] >= -0.5 && p[a] <= shape[a] as f64 - 0.5);
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "point ({:.1}, {:.1}, {:.1}) is outside the image ({} x {} x {} voxels)",
                    p[0], p[1], p[2], shape[0], shape[1], shape[2]
                ))
            }
        };
        for l in &self.labels {
            allow(if l.classes.len() > 1 {
                Kind::MultiLabel
            } else if project.kinds.contains(&Kind::Label) {
                Kind::Label
            } else {
                Kind::MultiLabel
            })?;
            if l.classes.is_empty() {
                return Err("a classification label names no class".into());
            }
            for &c in &l.classes {
                class(c)?;
            }
            if l.level == Level::Slice {
                let k = l.slice.ok_or("a slice-level label names no slice")?;
                inside([0.0, 0.0, f64::from(k)])?;
            }
        }
        for b in &self.boxes {
            allow(if b.slice.is_some() {
                Kind::Box2d
            } else {
                Kind::Box3d
            })?;
            class(b.class)?;
            inside(b.min)?;
            inside(b.max)?;
            if (0..3).any(|a| b.min[a] > b.max[a]) {
                return Err("a box's min corner is beyond its max corner".into());
            }
        }
        for o in &self.outlines {
            allow(if o.closed {
                Kind::Polygon
            } else {
                Kind::Polyline
            })?;
            class(o.class)?;
            if o.points.len() < if o.closed { 3 } else { 2 } {
                return Err("an outline needs at least 3 points (polygon) or 2 (polyline)".into());
            }
            for p in &o.points {
                inside([p[0], p[1], f64::from(o.slice)])?;
            }
        }
        for l in &self.landmarks {
            allow(Kind::Landmark)?;
            if l.name.trim().is_empty() {
                return Err("a landmark has no name".into());
            }
            inside(l.voxel)?;
        }
        Ok(())
    }
}
