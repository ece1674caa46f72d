//! The site's annotation workflow: projects over the de-identified output, assignments,
//! versions saved durably (label maps written temporary → flushed → renamed, then recorded with
//! their hash in the catalog, with the audit entry in the same transaction), imports, proposals
//! and their review, agreement, consensus and exports. The CLI (`fedcurate-node annotate`) and the web
//! annotator call these; the pure parts are in [`fc_annotate`].
//!
//! Files, under the data directory: `annotations/<project>/images/<case>.nii.gz` (the case
//! image, from the de-identified series) and `annotations/<project>/masks/<case>/<hash>.nii.gz`
//! (label maps, named by their content hash, so a save retried after a kill writes the same
//! file). Cases are named by keyed tokens of their series, never by a UID.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fc_annotate::agreement::project::{ProjectAgreement, Rating, agreement};
use fc_annotate::consensus;
use fc_annotate::model::ProjectError;
use fc_annotate::{Content, Grid, LabelMap, Project, Source};
use fc_store::audit::{AuditRecord, utc_now};
use fc_store::catalog::{AnnotationCase, AnnotationVersion, Assignment, Catalog, CatalogError};
use serde::Serialize;

use fc_files::{content_hash, write_atomically};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("project definition: {0}")]
    Project(#[from] ProjectError),
    #[error("{0}")]
    NotFound(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("configuration: {0}")]
    Config(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AnnotationError {
    let what = what.into();
    move |source| AnnotationError::Io { what, source }
}

/// A version with its content and label map read back.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub version: AnnotationVersion,
    pub content: Content,
    pub mask: Option<LabelMap>,
}

/// What a rater does with a proposal.
#[derive(Clone, Debug)]
pub enum Review {
    Accept,
    /// Save this content and label map instead.
    Modify(Box<Content>, Option<Box<LabelMap>>),
    Reject,
}

/// Interchange formats of vector annotations (and masks, for COCO and CVAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Coco,
    Via,
    Cvat,
}

/// DICOM Segmentation flavours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegKind {
    /// Segmentation Storage, binary: one bit-packed frame per segment and slice.
    Binary,
    /// Label Map Segmentation Storage: one frame per slice, pixels are segment numbers.
    LabelMap,
}

/// Consensus methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsensusMethod {
    Majority,
    Staple,
}

/// What became of one model version's proposals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProposalStats {
    pub model: String,
    pub version: String,
    pub proposals: usize,
    pub accepted: usize,
    pub modified: usize,
    pub rejected: usize,
    /// Proposals no rater has acted on yet.
    pub pending: usize,
    /// Median Dice between the proposal and what raters saved from it (accepted: 1).
    pub median_edit_dice: Option<f64>,
}

/// Anchoring: how close raters' final masks are to the model's proposal when they were shown
/// it, and when they were not (the assignments served without it).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Anchoring {
    pub shown: usize,
    pub mean_dice_shown: Option<f64>,
    pub hidden: usize,
    pub mean_dice_hidden: Option<f64>,
}

/// What running a model over a project's cases did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Proposed {
    /// (case, version) of each proposal imported.
    pub imported: Vec<(String, i64)>,
    /// Cases that already had a proposal from this model version.
    pub skipped: usize,
    /// (case, reason) where the command failed or wrote nothing usable.
    pub failed: Vec<(String, String)>,
}

/// Mean Dice over the classes either map contains (`None` when both are empty).
fn map_dice(a: &LabelMap, b: &LabelMap) -> Option<f64> {
    let mut present = a.present();
    present.extend(b.present());
    present.sort_unstable();
    present.dedup();
    let d: Vec<f64> = present
        .iter()
        .filter_map(|v| {
            fc_annotate::agreement::masks::compare(
                a.mask(*v).view(),
                b.mask(*v).view(),
                a.grid.spacing(),
            )
            .dice()
        })
        .collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

/// The consensus label map of raters' versions of one case (`None` under two masks), with
/// the newest version it combines.
fn combine(ls: &[&Loaded], method: ConsensusMethod) -> Option<(LabelMap, Option<i64>)> {
    let maps: Vec<&LabelMap> = ls.iter().filter_map(|l| l.mask.as_ref()).collect();
    if maps.len() < 2 {
        return None;
    }
    let flat: Vec<Vec<u16>> = maps
        .iter()
        .map(|m| m.data.iter().copied().collect())
        .collect();
    let views: Vec<&[u16]> = flat.iter().map(Vec::as_slice).collect();
    let labels = match method {
        ConsensusMethod::Majority => consensus::majority_vote(&views, Some(0)),
        ConsensusMethod::Staple => consensus::multi_label_staple(&views, Some(0), 1e-5, None).0,
    };
    let mut map = LabelMap::empty(maps[0].grid.clone());
    for (out, v) in map.data.iter_mut().zip(labels) {
        *out = v;
    }
    Some((map, ls.iter().map(|l| l.version.id).max()))
}

/// How far a project is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub project: String,
    pub cases: usize,
    pub assignments: usize,
    pub submitted: usize,
    pub returned: usize,
    pub versions: usize,
    pub by_source: BTreeMap<String, usize>,
    pub raters: BTreeMap<String, (usize, usize)>,
    pub consensus_cases: usize,
    pub proposals: Vec<ProposalStats>,
    pub anchoring: Option<Anchoring>,
}

/// What the site's annotations say of one series (keyed by its keyed token), for the
/// consortium's statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesAnnotation {
    /// Classes present in the final version of the series' cases (the consensus, or else any
    /// rater's latest).
    pub classes: std::collections::BTreeSet<String>,
    /// Per case: the mean pairwise Dice of its raters' masks.
    pub dice: Vec<f64>,
    /// Per case: Fleiss' κ of its raters' slice labels.
    pub kappa: Vec<f64>,
}

/// The site's annotation workspace.
#[derive(Debug)]
pub struct Annotations {
    data_dir: PathBuf,
    deid_dir: PathBuf,
    catalog: Catalog,
    tokens: fc_deid::keys::Tokens,
}

/// Rater names: a slug (letters, digits, '-', '_', '.'), at most 64 characters.
pub fn valid_rater(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The rater name of consensus versions.
pub const CONSENSUS_RATER: &str = "consensus";

impl Annotations {
    /// Open the workspace in `data_dir` (its catalog, with the audit chain under `audit_key`),
    /// reading cases from `deid_dir` and naming them with the site's keyed `tokens`.
    pub fn open(
        data_dir: &Path,
        deid_dir: PathBuf,
        audit_key: fc_store::audit::AuditKey,
        tokens: fc_deid::keys::Tokens,
    ) -> Result<Self, AnnotationError> {
        let mut catalog = Catalog::open(&data_dir.join("catalog.sqlite"))?;
        catalog.set_audit_key(audit_key);
        Ok(Self::from_parts(
            catalog,
            data_dir.to_owned(),
            deid_dir,
            tokens,
        ))
    }

    /// A workspace over an open catalog (the site uses it to compute what it releases).
    pub fn from_parts(
        catalog: Catalog,
        data_dir: PathBuf,
        deid_dir: PathBuf,
        tokens: fc_deid::keys::Tokens,
    ) -> Self {
        Annotations {
            data_dir,
            deid_dir,
            catalog,
            tokens,
        }
    }

    /// What every project's annotations say of each series (by keyed series token): the
    /// classes of its final versions, and per case the raters' Dice and slice-label κ. These
    /// feed the consortium's statistics (`label_classes` counts, the `annotation-dice` and
    /// `annotation-kappa` quantities) under the same k rules, ledger and approval as every
    /// other aggregate.
    pub fn site_facts(&self) -> Result<BTreeMap<String, SeriesAnnotation>, AnnotationError> {
        use fc_annotate::agreement::labels::{Chance, fleiss_kappa};
        use fc_annotate::model::Level;
        let mut out: BTreeMap<String, SeriesAnnotation> = BTreeMap::new();
        for p in self.projects()? {
            let latest = self.latest(&p.id)?;
            let consensus = self.consensus_versions(&p.id)?;
            let mut by_case: BTreeMap<&str, Vec<&Loaded>> = BTreeMap::new();
            for l in &latest {
                by_case
                    .entry(l.version.case_id.as_str())
                    .or_default()
                    .push(l);
            }
            let name = |v: u16| p.label(v).map(|l| l.name.clone());
            let classes_of = |l: &Loaded| -> Vec<String> {
                let mut c: Vec<u16> = l.mask.as_ref().map(LabelMap::present).unwrap_or_default();
                c.extend(
                    l.content
                        .labels
                        .iter()
                        .flat_map(|x| x.classes.iter().copied()),
                );
                c.extend(l.content.boxes.iter().map(|b| b.class));
                c.extend(l.content.outlines.iter().map(|o| o.class));
                c.into_iter().filter_map(name).collect()
            };
            for (case, ls) in &by_case {
                let series = case.rsplit_once('-').map_or(*case, |(s, _)| s).to_owned();
                let entry = out.entry(series).or_default();
                match consensus.iter().find(|c| c.version.case_id == *case) {
                    Some(c) => entry.classes.extend(classes_of(c)),
                    None => ls.iter().for_each(|l| entry.classes.extend(classes_of(l))),
                }
                // Dice: the mean over rater pairs of the mean over the classes either marked.
                let masks: Vec<&LabelMap> = ls.iter().filter_map(|l| l.mask.as_ref()).collect();
                let mut pairs = Vec::new();
                for (x, a) in masks.iter().enumerate() {
                    pairs.extend(masks[x + 1..].iter().filter_map(|b| map_dice(a, b)));
                }
                if !pairs.is_empty() {
                    entry
                        .dice
                        .push(pairs.iter().sum::<f64>() / pairs.len() as f64);
                }
                // κ over the slices every rater labelled (one class each).
                let slice_labels: Vec<BTreeMap<u32, u16>> = ls
                    .iter()
                    .map(|l| {
                        l.content
                            .labels
                            .iter()
                            .filter(|x| x.level == Level::Slice && x.classes.len() == 1)
                            .filter_map(|x| Some((x.slice?, x.classes[0])))
                            .collect()
                    })
                    .filter(|m: &BTreeMap<u32, u16>| !m.is_empty())
                    .collect();
                if slice_labels.len() >= 2 {
                    let values: Vec<u16> = p.labels.iter().map(|l| l.value).collect();
                    let counts: Vec<Vec<u32>> = slice_labels[0]
                        .keys()
                        .filter(|k| slice_labels.iter().all(|m| m.contains_key(k)))
                        .map(|k| {
                            let mut row = vec![0u32; values.len()];
                            for m in &slice_labels {
                                if let Some(i) = values.iter().position(|v| *v == m[k]) {
                                    row[i] += 1;
                                }
                            }
                            row
                        })
                        .collect();
                    if let Some(k) = fleiss_kappa(&counts, Chance::Fleiss) {
                        entry.kappa.push(k);
                    }
                }
            }
        }
        Ok(out)
    }

    fn root(&self, project: &str) -> PathBuf {
        self.data_dir.join("annotations").join(project)
    }

    /// Create a project and take its cases from the de-identified output. Returns the number
    /// of cases.
    pub fn create_project(&mut self, project: &Project) -> Result<usize, AnnotationError> {
        project.validate()?;
        let definition =
            serde_json::to_string(project).map_err(|e| AnnotationError::Refused(e.to_string()))?;
        let created = self.catalog.create_annotation_project(
            &project.id,
            &utc_now(),
            &definition,
            &AuditRecord::now(
                "annotation-project",
                serde_json::json!({"project": project.id, "definition": project}),
            ),
        )?;
        if !created {
            return Err(AnnotationError::Refused(format!(
                "project {} exists; choose another id",
                project.id
            )));
        }
        self.add_cases(project)
    }

    /// Take the project's cases from the de-identified output (again: new series are added,
    /// existing cases stay as they are). Returns the number of new cases.
    pub fn add_cases(&mut self, project: &Project) -> Result<usize, AnnotationError> {
        let files = fc_files::list_files(&self.deid_dir).map_err(|e| {
            AnnotationError::Refused(format!(
                "cannot list the de-identified folder {}: {e}",
                self.deid_dir.display()
            ))
        })?;
        let objects: Vec<_> = files
            .iter()
            .filter_map(|p| fc_read::read_object(&std::fs::read(p).ok()?).ok())
            .collect();
        let excluded = self.excluded_series(project)?;
        let root = self.root(&project.id);
        let mut cases = Vec::new();
        for v in fc_volume::series::assemble(&objects) {
            let Some(vol) = v.volume else { continue };
            let q = &project.cases;
            if !q.modalities.is_empty() && !q.modalities.contains(&v.modality) {
                continue;
            }
            let series = self.tokens.token(&v.series_uid);
            if excluded.contains(&series) {
                continue;
            }
            let case_id = format!("{series}-{}", v.part);
            let bytes = fc_volume::nifti::encode_gz(&vol).map_err(io("encoding a case image"))?;
            let rel = format!("annotations/{}/images/{case_id}.nii.gz", project.id);
            write_atomically(
                &root.join("images").join(format!("{case_id}.nii.gz")),
                &bytes,
            )
            .map_err(io(format!("writing {rel}")))?;
            cases.push(AnnotationCase {
                project: project.id.clone(),
                case_id,
                patient: v.patient.clone(),
                modality: v.modality.clone(),
                grid: serde_json::to_string(&Grid::of(&vol))
                    .map_err(|e| AnnotationError::Refused(e.to_string()))?,
                image: rel,
                image_hash: content_hash(&bytes),
            });
        }
        let n = self.catalog.add_annotation_cases(
            &cases,
            &AuditRecord::now(
                "annotation-cases",
                serde_json::json!({"project": project.id, "cases": cases.len()}),
            ),
        )?;
        tracing::info!(project = %project.id, new = n, "annotation cases taken from the de-identified output");
        Ok(n)
    }

    /// Series the project's query leaves out by curation (keyed tokens).
    fn excluded_series(
        &self,
        project: &Project,
    ) -> Result<std::collections::BTreeSet<String>, AnnotationError> {
        let q = &project.cases;
        if !q.in_protocol && q.exclude_findings.is_empty() {
            return Ok(Default::default());
        }
        let schema_text =
            std::fs::read_to_string(self.data_dir.join("federation").join("schema.toml")).ok();
        let schema = schema_text
            .as_deref()
            .and_then(|t| protocol::schema::CurationSchema::parse(t).ok());
        if q.in_protocol && schema.is_none() {
            return Err(AnnotationError::Refused(
                "the project takes only series in the consortium protocol, but this node has no schema yet (run `fedcurate-node federate --once`)".into(),
            ));
        }
        let report = fc_curate::report::curate(
            &self.deid_dir,
            schema.as_ref().map(|s| (s, String::new())),
            Vec::new(),
            &self.tokens,
        )
        .map_err(io("curating the de-identified output"))?;
        Ok(report
            .series
            .iter()
            .filter(|s| {
                (q.in_protocol && !matches!(s.protocol, fc_curate::report::ProtocolStatus::InScope))
                    || s.findings
                        .iter()
                        .any(|f| q.exclude_findings.iter().any(|c| c == f.code))
            })
            .map(|s| s.series.clone())
            .collect())
    }

    /// Every project.
    pub fn projects(&self) -> Result<Vec<Project>, AnnotationError> {
        self.catalog
            .annotation_projects()?
            .into_iter()
            .map(|(_, _, d)| {
                serde_json::from_str(&d).map_err(|e| AnnotationError::Refused(e.to_string()))
            })
            .collect()
    }

    /// One project.
    pub fn project(&self, id: &str) -> Result<Project, AnnotationError> {
        let d = self.catalog.annotation_project(id)?.ok_or_else(|| {
            AnnotationError::NotFound(format!(
                "no annotation project {id}; `fedcurate-node annotate project list` shows them"
            ))
        })?;
        serde_json::from_str(&d).map_err(|e| AnnotationError::Refused(e.to_string()))
    }

    /// A project's cases.
    pub fn cases(&self, project: &str) -> Result<Vec<AnnotationCase>, AnnotationError> {
        Ok(self.catalog.annotation_cases(project)?)
    }

    /// Each case's image grid.
    fn grids(&self, project: &str) -> Result<BTreeMap<String, Grid>, AnnotationError> {
        Ok(self
            .cases(project)?
            .into_iter()
            .filter_map(|c| Some((c.case_id.clone(), serde_json::from_str(&c.grid).ok()?)))
            .collect())
    }

    /// A case of a project, with its grid.
    pub fn case(
        &self,
        project: &str,
        case: &str,
    ) -> Result<(AnnotationCase, Grid), AnnotationError> {
        let c = self
            .cases(project)?
            .into_iter()
            .find(|c| c.case_id == case)
            .ok_or_else(|| {
                AnnotationError::NotFound(format!("project {project} has no case {case}"))
            })?;
        let grid =
            serde_json::from_str(&c.grid).map_err(|e| AnnotationError::Refused(e.to_string()))?;
        Ok((c, grid))
    }

    /// The path of a case image.
    pub fn image_path(&self, case: &AnnotationCase) -> PathBuf {
        self.data_dir.join(&case.image)
    }

    /// Assign every case to `raters_per_case` of `raters` (balanced, in an order keyed by the
    /// case, so it is stable and not by patient), `repeats` times each; a keyed fraction of
    /// assignments is served without proposals. Returns the number of new assignments.
    pub fn assign(&mut self, project: &str, raters: &[String]) -> Result<usize, AnnotationError> {
        let p = self.project(project)?;
        if let Some(bad) = raters
            .iter()
            .find(|r| !valid_rater(r) || *r == CONSENSUS_RATER)
        {
            return Err(AnnotationError::Refused(format!(
                "rater name {bad:?}: use letters, digits, '-', '_' or '.' (and not {CONSENSUS_RATER:?})"
            )));
        }
        if raters.len() < p.raters_per_case as usize {
            return Err(AnnotationError::Refused(format!(
                "project {project} needs {} raters per case; {} given",
                p.raters_per_case,
                raters.len()
            )));
        }
        let mut load: BTreeMap<&str, usize> = raters.iter().map(|r| (r.as_str(), 0)).collect();
        for a in self.catalog.assignments(project)? {
            if let Some(n) = load.get_mut(a.rater.as_str()) {
                *n += 1;
            }
        }
        let existing: std::collections::BTreeSet<String> = self
            .catalog
            .assignments(project)?
            .into_iter()
            .map(|a| a.case_id)
            .collect();
        let mut out = Vec::new();
        for c in self.cases(project)? {
            if existing.contains(&c.case_id) {
                continue;
            }
            // The least loaded raters, ties broken by a keyed order per case.
            let mut order: Vec<&str> = raters.iter().map(String::as_str).collect();
            order.sort_by_key(|r| (load[r], self.tokens.token(&format!("{}/{r}", c.case_id))));
            for r in order.into_iter().take(p.raters_per_case as usize) {
                *load.entry(r).or_default() += 1;
                for repeat in 1..=p.repeats {
                    let key = self
                        .tokens
                        .token(&format!("{}/{r}/{repeat}/proposal", c.case_id));
                    let draw = u32::from_str_radix(&key[..8], 16).unwrap_or(0) as f64
                        / f64::from(u32::MAX);
                    out.push(Assignment {
                        project: project.to_owned(),
                        case_id: c.case_id.clone(),
                        rater: r.to_owned(),
                        repeat,
                        with_proposal: draw >= p.without_proposal,
                        state: "assigned".into(),
                    });
                }
            }
        }
        Ok(self.catalog.assign(
            &out,
            &AuditRecord::now(
                "annotation-assign",
                serde_json::json!({"project": project, "assignments": out.len(), "raters": raters}),
            ),
        )?)
    }

    /// A project's versions, oldest first (one case's, when `case` is given), without their
    /// content read back.
    pub fn versions(
        &self,
        project: &str,
        case: Option<&str>,
    ) -> Result<Vec<AnnotationVersion>, AnnotationError> {
        Ok(self.catalog.annotation_versions(project, case)?)
    }

    /// A reviewer returns a rater's submitted case for more work (state `returned`).
    pub fn return_case(
        &mut self,
        project: &str,
        case: &str,
        rater: &str,
        repeat: u32,
        reviewer: &str,
        reason: &str,
    ) -> Result<(), AnnotationError> {
        let a = self
            .catalog
            .assignments(project)?
            .into_iter()
            .find(|a| a.case_id == case && a.rater == rater && a.repeat == repeat)
            .ok_or_else(|| {
                AnnotationError::NotFound(format!("{rater} has no assignment {repeat} of {case}"))
            })?;
        self.catalog.set_assignment_state(
            &a,
            "returned",
            &AuditRecord::now(
                "annotation-return",
                serde_json::json!({"project": project, "case": case, "rater": rater,
                    "repeat": repeat, "reviewer": reviewer, "reason": reason}),
            ),
        )?;
        Ok(())
    }

    /// A project's assignments.
    pub fn assignments(&self, project: &str) -> Result<Vec<Assignment>, AnnotationError> {
        Ok(self.catalog.assignments(project)?)
    }

    /// Save a version: the content checked against the project and the image, the label map
    /// checked against the image grid and the classes, written durably, then recorded.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        project: &str,
        case: &str,
        rater: &str,
        repeat: u32,
        content: &Content,
        mask: Option<&LabelMap>,
        source: Source,
        parent: Option<i64>,
        model: Option<(&str, &str)>,
    ) -> Result<i64, AnnotationError> {
        let p = self.project(project)?;
        if !valid_rater(rater) {
            return Err(AnnotationError::Refused(format!(
                "rater name {rater:?} is not valid"
            )));
        }
        let (_, grid) = self.case(project, case)?;
        content
            .check(&p, grid.shape)
            .map_err(AnnotationError::Refused)?;
        if mask.is_some() && !p.kinds.contains(&fc_annotate::Kind::Mask) {
            return Err(AnnotationError::Refused(format!(
                "project {project} does not allow masks"
            )));
        }
        let (mask_path, mask_hash) = match mask {
            Some(m) => {
                m.check(&grid, &p)
                    .map_err(|e| AnnotationError::Refused(e.to_string()))?;
                let bytes = m.to_nifti_gz().map_err(io("encoding a label map"))?;
                let hash = content_hash(&bytes);
                let rel = format!("annotations/{project}/masks/{case}/{}.nii.gz", &hash[..32]);
                write_atomically(&self.data_dir.join(&rel), &bytes)
                    .map_err(io(format!("writing {rel}")))?;
                (Some(rel), Some(hash))
            }
            None => (None, None),
        };
        if let Some(parent) = parent {
            let pv = self
                .catalog
                .annotation_version(parent)?
                .ok_or_else(|| AnnotationError::NotFound(format!("no version {parent}")))?;
            if pv.project != project || pv.case_id != case {
                return Err(AnnotationError::Refused(format!(
                    "version {parent} belongs to another case"
                )));
            }
        }
        let content_json =
            serde_json::to_string(content).map_err(|e| AnnotationError::Refused(e.to_string()))?;
        let v = AnnotationVersion {
            id: 0,
            project: project.to_owned(),
            case_id: case.to_owned(),
            rater: rater.to_owned(),
            repeat,
            at: utc_now(),
            parent,
            source: source.name().to_owned(),
            model: model.map(|m| m.0.to_owned()),
            model_version: model.map(|m| m.1.to_owned()),
            content: content_json,
            mask_path,
            mask_hash: mask_hash.clone(),
        };
        let id = self.catalog.record_annotation_version(
            &v,
            &AuditRecord::now(
                "annotation-save",
                serde_json::json!({
                    "project": project, "case": case, "rater": rater, "repeat": repeat,
                    "source": source.name(), "parent": parent, "mask_hash": mask_hash,
                    "model": model.map(|m| format!("{} {}", m.0, m.1)),
                }),
            ),
        )?;
        Ok(id)
    }

    /// The stored label map file of a version (NIfTI, gzipped), its hash checked; `None`
    /// when the version has no mask.
    pub fn mask_bytes(&self, v: &AnnotationVersion) -> Result<Option<Vec<u8>>, AnnotationError> {
        let (Some(p), Some(h)) = (&v.mask_path, &v.mask_hash) else {
            return Ok(None);
        };
        let bytes = std::fs::read(self.data_dir.join(p)).map_err(io(format!("reading {p}")))?;
        if content_hash(&bytes) != *h {
            return Err(AnnotationError::Refused(format!(
                "{p} does not have the hash the catalog recorded; restore it from backup"
            )));
        }
        Ok(Some(bytes))
    }

    /// A version with its content and label map (the map's hash checked).
    pub fn load(&self, id: i64) -> Result<Loaded, AnnotationError> {
        let v = self
            .catalog
            .annotation_version(id)?
            .ok_or_else(|| AnnotationError::NotFound(format!("no annotation version {id}")))?;
        self.loaded(v)
    }

    fn loaded(&self, v: AnnotationVersion) -> Result<Loaded, AnnotationError> {
        let content: Content = serde_json::from_str(&v.content)
            .map_err(|e| AnnotationError::Refused(e.to_string()))?;
        let mask = match (&v.mask_path, &v.mask_hash) {
            (Some(p), Some(h)) => {
                let bytes =
                    std::fs::read(self.data_dir.join(p)).map_err(io(format!("reading {p}")))?;
                if content_hash(&bytes) != *h {
                    return Err(AnnotationError::Refused(format!(
                        "{p} does not have the hash the catalog recorded; restore it from backup"
                    )));
                }
                Some(
                    LabelMap::from_nifti(&bytes)
                        .map_err(|e| AnnotationError::Refused(e.to_string()))?,
                )
            }
            _ => None,
        };
        Ok(Loaded {
            version: v,
            content,
            mask,
        })
    }

    /// Import a NIfTI label map for a case (refused if its grid or labels do not fit).
    #[allow(clippy::too_many_arguments)]
    pub fn import_labelmap(
        &mut self,
        project: &str,
        case: &str,
        rater: &str,
        path: &Path,
        source: Source,
        model: Option<(&str, &str)>,
    ) -> Result<i64, AnnotationError> {
        let bytes = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
        let map = LabelMap::from_nifti(&bytes)
            .map_err(|e| AnnotationError::Refused(format!("{}: {e}", path.display())))?;
        let (_, grid) = self.case(project, case)?;
        let p = self.project(project)?;
        map.check(&grid, &p)
            .map_err(|e| AnnotationError::Refused(format!("{}: {e}", path.display())))?;
        self.save(
            project,
            case,
            rater,
            1,
            &Content::default(),
            Some(&map),
            source,
            None,
            model,
        )
    }

    /// Import a COCO, VIA 2 or CVAT 1.1 file (cases named as this node exports them).
    /// Returns the versions saved.
    pub fn import_file(
        &mut self,
        project: &str,
        rater: &str,
        path: &Path,
        format: Format,
        source: Source,
        model: Option<(&str, &str)>,
    ) -> Result<Vec<i64>, AnnotationError> {
        let p = self.project(project)?;
        let text = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
        let doc = serde_json::from_slice::<serde_json::Value>(&text)
            .map_err(|e| AnnotationError::Refused(format!("{}: {e}", path.display())));
        let grids = self.grids(project)?;
        let imported = match format {
            Format::Coco => fc_annotate::coco::import(&doc?, &p, &grids),
            Format::Via => fc_annotate::via::import(&doc?, &p, &grids),
            Format::Cvat => fc_annotate::cvat::import(&String::from_utf8_lossy(&text), &p, &grids),
        }
        .map_err(|e| AnnotationError::Refused(format!("{}: {e}", path.display())))?;
        let mut ids = Vec::new();
        for (case, i) in imported {
            ids.push(self.save(
                project,
                &case,
                rater,
                1,
                &i.content,
                i.mask.as_ref(),
                source,
                None,
                model,
            )?);
        }
        Ok(ids)
    }

    /// A rater's decision on a proposal: a new version whose parent is the proposal.
    pub fn review(
        &mut self,
        proposal: i64,
        rater: &str,
        repeat: u32,
        action: Review,
    ) -> Result<i64, AnnotationError> {
        let p = self.load(proposal)?;
        if p.version.source != Source::Proposal.name() {
            return Err(AnnotationError::Refused(format!(
                "version {proposal} is not a proposal (it is {})",
                p.version.source
            )));
        }
        let model = p
            .version
            .model
            .as_deref()
            .zip(p.version.model_version.as_deref());
        let (project, case) = (p.version.project.clone(), p.version.case_id.clone());
        match action {
            Review::Accept => self.save(
                &project,
                &case,
                rater,
                repeat,
                &p.content,
                p.mask.as_ref(),
                Source::ProposalAccepted,
                Some(proposal),
                model,
            ),
            Review::Modify(c, m) => self.save(
                &project,
                &case,
                rater,
                repeat,
                &c,
                m.as_deref(),
                Source::ProposalModified,
                Some(proposal),
                model,
            ),
            Review::Reject => self.save(
                &project,
                &case,
                rater,
                repeat,
                &Content::default(),
                None,
                Source::ProposalRejected,
                Some(proposal),
                model,
            ),
        }
    }

    /// Each rater's latest version of each case (first repeat; proposals and consensus left
    /// out), with content and label map.
    pub fn latest(&self, project: &str) -> Result<Vec<Loaded>, AnnotationError> {
        self.latest_of(project, None)
    }

    /// [`Self::latest`] of one case, or of all when `case` is `None`.
    fn latest_of(&self, project: &str, case: Option<&str>) -> Result<Vec<Loaded>, AnnotationError> {
        let mut last: BTreeMap<(String, String), AnnotationVersion> = BTreeMap::new();
        for v in self.catalog.annotation_versions(project, case)? {
            if v.repeat != 1 || v.rater == CONSENSUS_RATER || v.source == Source::Proposal.name() {
                continue;
            }
            last.insert((v.case_id.clone(), v.rater.clone()), v);
        }
        last.into_values().map(|v| self.loaded(v)).collect()
    }

    /// The agreement of the project's raters.
    pub fn agreement(&self, project: &str) -> Result<ProjectAgreement, AnnotationError> {
        self.agreement_of(project, None)
    }

    fn agreement_of(
        &self,
        project: &str,
        case: Option<&str>,
    ) -> Result<ProjectAgreement, AnnotationError> {
        let p = self.project(project)?;
        let latest = self.latest_of(project, case)?;
        let grids = self.grids(project)?;
        let ratings: Vec<Rating<'_>> = latest
            .iter()
            .filter_map(|l| {
                Some(Rating {
                    case: &l.version.case_id,
                    rater: &l.version.rater,
                    grid: grids.get(&l.version.case_id)?,
                    content: &l.content,
                    mask: l.mask.as_ref(),
                })
            })
            .collect();
        Ok(agreement(&p, &ratings))
    }

    /// Consensus label maps of every case with at least two raters' masks, saved as versions
    /// of the rater `consensus` (source `consensus`). Returns the number of cases.
    pub fn consensus(
        &mut self,
        project: &str,
        method: ConsensusMethod,
    ) -> Result<usize, AnnotationError> {
        let latest = self.latest(project)?;
        let mut by_case: BTreeMap<String, Vec<&Loaded>> = BTreeMap::new();
        for l in &latest {
            if l.mask.is_some() {
                by_case
                    .entry(l.version.case_id.clone())
                    .or_default()
                    .push(l);
            }
        }
        let mut n = 0;
        for (case, ls) in by_case {
            let Some((map, parent)) = combine(&ls, method) else {
                continue;
            };
            self.save(
                project,
                &case,
                CONSENSUS_RATER,
                1,
                &Content::default(),
                Some(&map),
                Source::Consensus,
                parent,
                Some((
                    match method {
                        ConsensusMethod::Majority => "majority-vote",
                        ConsensusMethod::Staple => "multi-label-staple",
                    },
                    "1",
                )),
            )?;
            n += 1;
        }
        Ok(n)
    }

    /// A starting point for adjudicating one case: the consensus of its raters' latest masks
    /// (at least two), not saved, with the newest of the versions it combines.
    pub fn case_consensus(
        &self,
        project: &str,
        case: &str,
        method: ConsensusMethod,
    ) -> Result<Option<(LabelMap, i64)>, AnnotationError> {
        let latest = self.latest_of(project, Some(case))?;
        let ls: Vec<&Loaded> = latest.iter().filter(|l| l.mask.is_some()).collect();
        Ok(combine(&ls, method).and_then(|(m, p)| Some((m, p?))))
    }

    /// The agreement of one case's raters (only this case's versions are read).
    pub fn case_agreement(
        &self,
        project: &str,
        case: &str,
    ) -> Result<ProjectAgreement, AnnotationError> {
        let mut a = self.agreement_of(project, Some(case))?;
        // Summaries over one case say nothing the pairs do not.
        a.mask_summary.clear();
        a.labels.clear();
        Ok(a)
    }

    /// A reviewer's adjudication of a case: a consensus version (rater `consensus`, source
    /// `consensus`) whose parent is the version it started from, recorded with the reviewer's
    /// name and the starting point (`edit`, `majority-vote` or `multi-label-staple`).
    #[allow(clippy::too_many_arguments)]
    pub fn adjudicate(
        &mut self,
        project: &str,
        case: &str,
        reviewer: &str,
        start: &str,
        content: &Content,
        mask: Option<&LabelMap>,
        parent: Option<i64>,
    ) -> Result<i64, AnnotationError> {
        if !valid_rater(reviewer) {
            return Err(AnnotationError::Refused(format!(
                "reviewer name {reviewer:?} is not valid"
            )));
        }
        self.save(
            project,
            case,
            CONSENSUS_RATER,
            1,
            content,
            mask,
            Source::Consensus,
            parent,
            Some((&format!("adjudication-{start}"), reviewer)),
        )
    }

    /// The latest consensus version of each case.
    pub fn consensus_versions(&self, project: &str) -> Result<Vec<Loaded>, AnnotationError> {
        let mut last: BTreeMap<String, AnnotationVersion> = BTreeMap::new();
        for v in self.catalog.annotation_versions(project, None)? {
            if v.rater == CONSENSUS_RATER {
                last.insert(v.case_id.clone(), v);
            }
        }
        last.into_values().map(|v| self.loaded(v)).collect()
    }

    /// Export the latest versions (or the consensus) as NIfTI label maps with JSON sidecars
    /// (`labels/<case>[_<rater>].nii.gz`), DICOM Segmentations when `seg` is set
    /// (`seg/<case>[_<rater>].dcm`), and one file each of COCO (`coco.json`), VIA 2
    /// (`via.json`) and CVAT 1.1 (`cvat.xml`). Returns the number of versions exported.
    pub fn export(
        &self,
        project: &str,
        out: &Path,
        consensus_only: bool,
        seg: Option<SegKind>,
    ) -> Result<usize, AnnotationError> {
        let p = self.project(project)?;
        let versions = if consensus_only {
            self.consensus_versions(project)?
        } else {
            self.latest(project)?
        };
        let grids = self.grids(project)?;
        let sidecar = serde_json::to_vec_pretty(&fc_annotate::labelmap::sidecar(&p))
            .map_err(|e| AnnotationError::Refused(e.to_string()))?;
        let mut coco_cases = Vec::new();
        for l in &versions {
            let name = if consensus_only {
                l.version.case_id.clone()
            } else {
                format!("{}_{}", l.version.case_id, l.version.rater)
            };
            if let Some(m) = &l.mask {
                let bytes = m.to_nifti_gz().map_err(io("encoding a label map"))?;
                write_atomically(&out.join("labels").join(format!("{name}.nii.gz")), &bytes)
                    .map_err(io("writing the export"))?;
                write_atomically(&out.join("labels").join(format!("{name}.json")), &sidecar)
                    .map_err(io("writing the export"))?;
                if let Some(kind) = seg
                    && !m.present().is_empty()
                {
                    self.export_seg(
                        l.version.id,
                        &out.join("seg").join(format!("{name}.dcm")),
                        kind,
                    )?;
                }
            }
            if let Some(g) = grids.get(&l.version.case_id) {
                coco_cases.push(fc_annotate::coco::CaseAnnotations {
                    case: &l.version.case_id,
                    grid: g,
                    content: &l.content,
                    mask: l.mask.as_ref(),
                    rater: &l.version.rater,
                    version: l.version.id,
                });
            }
        }
        write_atomically(
            &out.join("via.json"),
            &serde_json::to_vec(&fc_annotate::via::export(&p, &coco_cases))
                .map_err(|e| AnnotationError::Refused(e.to_string()))?,
        )
        .map_err(io("writing the export"))?;
        write_atomically(
            &out.join("cvat.xml"),
            fc_annotate::cvat::export(&p, &coco_cases, false).as_bytes(),
        )
        .map_err(io("writing the export"))?;
        let coco = fc_annotate::coco::export(&p, &coco_cases);
        write_atomically(
            &out.join("coco.json"),
            &serde_json::to_vec(&coco).map_err(|e| AnnotationError::Refused(e.to_string()))?,
        )
        .map_err(io("writing the export"))?;
        Ok(versions.len())
    }

    /// Write version `id`'s label map as a DICOM Segmentation (binary) to `out`, referencing
    /// the de-identified instances of its case.
    pub fn export_seg(&self, id: i64, out: &Path, kind: SegKind) -> Result<(), AnnotationError> {
        use fc_annotate::seg::{
            SegIdentity, SegSource, SourceSlice, binary_seg, labelmap_seg, uid_from_hex,
        };
        let l = self.load(id)?;
        let map = l.mask.as_ref().ok_or_else(|| {
            AnnotationError::Refused(format!("version {id} has no label map to write as SEG"))
        })?;
        let p = self.project(&l.version.project)?;
        let (_, grid) = self.case(&l.version.project, &l.version.case_id)?;
        let series_token = l
            .version
            .case_id
            .rsplit_once('-')
            .map_or(l.version.case_id.as_str(), |(s, _)| s);
        let files = fc_files::list_files(&self.deid_dir).map_err(|e| {
            AnnotationError::Refused(format!(
                "cannot list the de-identified folder {}: {e}",
                self.deid_dir.display()
            ))
        })?;
        let text = |o: &dicom_object::InMemDicomObject, t| fc_read::text(o, t);
        let inverse = invert(&grid.affine).ok_or_else(|| {
            AnnotationError::Refused("the case image's affine is singular".into())
        })?;
        let mut slices: Vec<Option<SourceSlice>> = vec![None; grid.shape[2]];
        let mut reference = None;
        let mut series_uid = String::new();
        for f in &files {
            let Ok(bytes) = std::fs::read(f) else {
                continue;
            };
            let Ok(obj) = fc_read::read_object(&bytes) else {
                continue;
            };
            let uid = text(&obj, dicom_core::Tag(0x0020, 0x000E));
            if self.tokens.token(&uid) != series_token {
                continue;
            }
            let frames: u32 = text(&obj, dicom_core::Tag(0x0028, 0x0008))
                .trim()
                .parse()
                .unwrap_or(1);
            if frames > 1 {
                return Err(AnnotationError::Refused(
                    "the source series is multi-frame; SEG export references single-frame series only for now".into(),
                ));
            }
            let pos: Vec<f64> = text(&obj, dicom_core::Tag(0x0020, 0x0032))
                .split('\\')
                .filter_map(|x| x.trim().parse().ok())
                .collect();
            if pos.len() != 3 {
                continue;
            }
            // The instance's first pixel in the case's voxel coordinates: it must sit at
            // (0, 0, k) for a whole k.
            let ras = [-pos[0], -pos[1], pos[2]];
            let v: [f64; 3] = std::array::from_fn(|r| {
                inverse[r][0] * ras[0]
                    + inverse[r][1] * ras[1]
                    + inverse[r][2] * ras[2]
                    + inverse[r][3]
            });
            let k = v[2].round();
            if v[0].abs() > 0.05 || v[1].abs() > 0.05 || (v[2] - k).abs() > 0.05 || k < 0.0 {
                continue;
            }
            let Some(slot) = slices.get_mut(k as usize) else {
                continue;
            };
            *slot = Some(SourceSlice {
                sop_class: text(&obj, dicom_core::Tag(0x0008, 0x0016)),
                sop_instance: text(&obj, dicom_core::Tag(0x0008, 0x0018)),
            });
            if reference.is_none() {
                series_uid = uid;
                reference = Some(obj.into_inner());
            }
        }
        let reference = reference.ok_or_else(|| {
            AnnotationError::NotFound(format!(
                "no de-identified instance of case {} in {}",
                l.version.case_id,
                self.deid_dir.display()
            ))
        })?;
        let at = utc_now();
        let digits: String = at.chars().filter(char::is_ascii_digit).collect();
        let uid = |what: &str| {
            uid_from_hex(&content_hash(
                format!(
                    "fedcurate-seg:{what}:{}:{}:{id}:{}",
                    l.version.project,
                    l.version.case_id,
                    self.tokens.token(&format!("seg/{}", l.version.case_id))
                )
                .as_bytes(),
            ))
            .unwrap_or_default()
        };
        let identity = SegIdentity {
            series_uid: uid("series"),
            instance_uid: uid("instance"),
            series_number: 9000 + (id % 1000) as i32,
            date: digits.get(..8).unwrap_or("19700101").to_owned(),
            time: digits.get(8..14).unwrap_or("000000").to_owned(),
            creator: l.version.rater.clone(),
            source: Source::parse(&l.version.source).unwrap_or(Source::Manual),
            model: l.version.model.clone().zip(l.version.model_version.clone()),
        };
        let write = match kind {
            SegKind::Binary => binary_seg,
            SegKind::LabelMap => labelmap_seg,
        };
        let bytes = write(
            &p,
            map,
            &SegSource {
                reference: &reference,
                series_uid,
                slices,
            },
            &identity,
        )
        .map_err(AnnotationError::Refused)?;
        write_atomically(out, &bytes).map_err(io(format!("writing {}", out.display())))
    }

    /// Label maps for an nnU-Net export: the consensus (or `rater`'s latest) of each case,
    /// keyed by case id, with the project's class names.
    pub fn nnunet_labels(
        &self,
        project: &str,
        rater: Option<&str>,
    ) -> Result<fc_export::Labels, AnnotationError> {
        let p = self.project(project)?;
        let versions = match rater {
            None => self.consensus_versions(project)?,
            Some(r) => self
                .latest(project)?
                .into_iter()
                .filter(|l| l.version.rater == r)
                .collect(),
        };
        let mut maps = BTreeMap::new();
        for l in versions {
            if let Some(m) = &l.mask {
                let bytes = m.to_nifti_gz().map_err(io("encoding a label map"))?;
                maps.insert(l.version.case_id.clone(), bytes);
            }
        }
        Ok(fc_export::Labels {
            maps,
            names: p.labels.iter().map(|l| (l.value, l.name.clone())).collect(),
        })
    }

    /// Run a model's command on each case that has no proposal from this model version yet,
    /// and import what it writes as a proposal (rater: the model's name). In `command` (a
    /// program and its arguments, run without a shell), `{image}` is the case image (NIfTI),
    /// `{output}` the label map to write, `{case}` the case id. A command that fails, runs past
    /// `timeout`, or writes a map that does not fit the image is reported, not fatal.
    pub fn propose(
        &mut self,
        project: &str,
        model: (&str, &str),
        command: &[String],
        timeout: std::time::Duration,
    ) -> Result<Proposed, AnnotationError> {
        if !valid_rater(model.0) {
            return Err(AnnotationError::Refused(format!(
                "model name {:?}: use letters, digits, '-', '_' or '.'",
                model.0
            )));
        }
        let program = command
            .first()
            .ok_or_else(|| AnnotationError::Config("no proposal command given".into()))?;
        let done: std::collections::BTreeSet<String> = self
            .catalog
            .annotation_versions(project, None)?
            .into_iter()
            .filter(|v| {
                v.source == Source::Proposal.name()
                    && v.model.as_deref() == Some(model.0)
                    && v.model_version.as_deref() == Some(model.1)
            })
            .map(|v| v.case_id)
            .collect();
        let work = self.root(project).join("proposals-tmp");
        std::fs::create_dir_all(&work).map_err(io(format!("creating {}", work.display())))?;
        let mut out = Proposed::default();
        for c in self.cases(project)? {
            if done.contains(&c.case_id) {
                out.skipped += 1;
                continue;
            }
            let output = work.join(format!("{}.nii.gz", c.case_id));
            let _ = std::fs::remove_file(&output);
            let image = self.image_path(&c);
            let fill = |a: &String| {
                a.replace("{image}", &image.display().to_string())
                    .replace("{output}", &output.display().to_string())
                    .replace("{case}", &c.case_id)
            };
            let mut child = match std::process::Command::new(fill(program))
                .args(command[1..].iter().map(fill))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
            {
                Ok(child) => child,
                Err(e) => {
                    return Err(AnnotationError::Config(format!(
                        "cannot run the proposal command {program}: {e}"
                    )));
                }
            };
            let started = std::time::Instant::now();
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if started.elapsed() > timeout => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
                    Err(_) => break None,
                }
            };
            let failure = match status {
                None => Some(format!("no result within {} s", timeout.as_secs())),
                Some(s) if !s.success() => Some(format!("the command exited with {s}")),
                Some(_) if !output.is_file() => Some("the command wrote no label map".into()),
                Some(_) => None,
            };
            if let Some(why) = failure {
                tracing::warn!(project, case = %c.case_id, reason = %why, "no proposal");
                out.failed.push((c.case_id.clone(), why));
                continue;
            }
            match self.import_labelmap(
                project,
                &c.case_id,
                model.0,
                &output,
                Source::Proposal,
                Some(model),
            ) {
                Ok(id) => out.imported.push((c.case_id.clone(), id)),
                Err(e) => out.failed.push((c.case_id.clone(), e.to_string())),
            }
            let _ = std::fs::remove_file(&output);
        }
        Ok(out)
    }

    /// Proposal outcomes per model version, and the anchoring comparison.
    pub fn proposal_stats(
        &self,
        project: &str,
    ) -> Result<(Vec<ProposalStats>, Option<Anchoring>), AnnotationError> {
        let versions = self.catalog.annotation_versions(project, None)?;
        let proposals: Vec<&AnnotationVersion> = versions
            .iter()
            .filter(|v| v.source == Source::Proposal.name())
            .collect();
        let mut stats: BTreeMap<(String, String), (ProposalStats, Vec<f64>)> = BTreeMap::new();
        let mut masks: BTreeMap<i64, Option<LabelMap>> = BTreeMap::new();
        let mut mask_of = |id: i64| -> Result<Option<LabelMap>, AnnotationError> {
            if let Some(m) = masks.get(&id) {
                return Ok(m.clone());
            }
            let m = self.load(id)?.mask;
            masks.insert(id, m.clone());
            Ok(m)
        };
        for p in &proposals {
            let key = (
                p.model.clone().unwrap_or_default(),
                p.model_version.clone().unwrap_or_default(),
            );
            let (s, edits) = stats.entry(key.clone()).or_insert_with(|| {
                (
                    ProposalStats {
                        model: key.0.clone(),
                        version: key.1.clone(),
                        ..ProposalStats::default()
                    },
                    Vec::new(),
                )
            });
            s.proposals += 1;
            let children: Vec<&AnnotationVersion> =
                versions.iter().filter(|v| v.parent == Some(p.id)).collect();
            if children.is_empty() {
                s.pending += 1;
            }
            for c in children {
                match c.source.as_str() {
                    "proposal-accepted" => {
                        s.accepted += 1;
                        edits.push(1.0);
                    }
                    "proposal-modified" => {
                        s.modified += 1;
                        if let (Some(a), Some(b)) = (mask_of(p.id)?, mask_of(c.id)?) {
                            edits.push(map_dice(&a, &b).unwrap_or(1.0));
                        }
                    }
                    "proposal-rejected" => s.rejected += 1,
                    _ => {}
                }
            }
        }
        let out: Vec<ProposalStats> = stats
            .into_values()
            .map(|(mut s, mut e)| {
                e.sort_by(f64::total_cmp);
                s.median_edit_dice = (!e.is_empty())
                    .then(|| fc_annotate::agreement::masks::percentile_sorted(&e, 50.0));
                s
            })
            .collect();
        // Anchoring: each rater's latest mask against the case's (latest) proposal, grouped by
        // whether the assignment showed the proposal.
        let latest = self.latest(project)?;
        let mut shown = Vec::new();
        let mut hidden = Vec::new();
        for a in self.catalog.assignments(project)? {
            let Some(p) = proposals.iter().rev().find(|p| p.case_id == a.case_id) else {
                continue;
            };
            let Some(l) = latest
                .iter()
                .find(|l| l.version.case_id == a.case_id && l.version.rater == a.rater)
            else {
                continue;
            };
            let (Some(pm), Some(lm)) = (mask_of(p.id)?, l.mask.as_ref()) else {
                continue;
            };
            let d = map_dice(&pm, lm).unwrap_or(1.0);
            if a.with_proposal {
                shown.push(d);
            } else {
                hidden.push(d);
            }
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let anchoring = (!shown.is_empty() || !hidden.is_empty()).then(|| Anchoring {
            shown: shown.len(),
            mean_dice_shown: mean(&shown),
            hidden: hidden.len(),
            mean_dice_hidden: mean(&hidden),
        });
        Ok((out, anchoring))
    }

    /// How far the project is.
    pub fn status(&self, project: &str) -> Result<Status, AnnotationError> {
        let _ = self.project(project)?;
        let mut s = Status {
            project: project.to_owned(),
            cases: self.cases(project)?.len(),
            ..Status::default()
        };
        for a in self.catalog.assignments(project)? {
            s.assignments += 1;
            let e = s.raters.entry(a.rater.clone()).or_default();
            e.0 += 1;
            match a.state.as_str() {
                "submitted" => {
                    s.submitted += 1;
                    e.1 += 1;
                }
                "returned" => s.returned += 1,
                _ => {}
            }
        }
        let mut consensus = std::collections::BTreeSet::new();
        for v in self.catalog.annotation_versions(project, None)? {
            s.versions += 1;
            *s.by_source.entry(v.source.clone()).or_default() += 1;
            if v.rater == CONSENSUS_RATER {
                consensus.insert(v.case_id);
            }
        }
        s.consensus_cases = consensus.len();
        let (proposals, anchoring) = self.proposal_stats(project)?;
        s.proposals = proposals;
        s.anchoring = anchoring;
        Ok(s)
    }
}

/// The inverse of an affine (4×4, last row 0 0 0 1).
fn invert(a: &fc_volume::Affine) -> Option<fc_volume::Affine> {
    let m = |r: usize, c: usize| a[r][c];
    let det = m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1))
        - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0));
    if det.abs() < 1e-12 {
        return None;
    }
    let mut inv: fc_volume::Affine = std::array::from_fn(|r| {
        std::array::from_fn(|c| {
            if r == 3 || c == 3 {
                return f64::from(u8::from(r == 3 && c == 3));
            }
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            (m(r1, c1) * m(r2, c2) - m(r1, c2) * m(r2, c1)) / det
        })
    });
    let t: [f64; 3] = std::array::from_fn(|r| -(0..3).map(|c| inv[r][c] * a[c][3]).sum::<f64>());
    for (row, v) in inv.iter_mut().zip(t) {
        row[3] = v;
    }
    Some(inv)
}
