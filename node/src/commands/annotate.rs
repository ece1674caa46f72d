//! `annotate`: annotation projects on the de-identified output — create, assign, import
//! (label maps, COCO, model proposals), review proposals, agreement, consensus, export, status.
//! Every command goes through [`node::annotation::Annotations`], as the web annotator does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use node::annotation::{ConsensusMethod, Format, Review, SegKind};
use node::config::NodeConfig;
use node::fc_annotate::{LabelMap, Project, Source};

#[derive(Subcommand, Debug)]
pub(crate) enum AnnotateCommand {
    /// Annotation projects.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// A project's cases (keyed tokens of de-identified series) and their images.
    Cases {
        #[arg(long)]
        project: String,
        #[arg(long)]
        json: bool,
    },
    /// Assign the project's cases to raters (balanced; `raters_per_case` each).
    Assign {
        #[arg(long)]
        project: String,
        /// Rater names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        raters: Vec<String>,
    },
    /// Import annotations: a NIfTI label map of one case, or a COCO file.
    Import {
        #[arg(long)]
        project: String,
        /// Whose annotations these are (for a model's proposals, the model's name).
        #[arg(long)]
        rater: String,
        /// A NIfTI label map on the case image's grid.
        #[arg(long, conflicts_with = "coco", requires = "case")]
        labelmap: Option<PathBuf>,
        /// The case the label map belongs to.
        #[arg(long)]
        case: Option<String>,
        /// A COCO file whose images are named as `annotate export` names them.
        #[arg(long, conflicts_with_all = ["via", "cvat"])]
        coco: Option<PathBuf>,
        /// A VIA 2 project (images named as `annotate export` names them).
        #[arg(long, conflicts_with = "cvat")]
        via: Option<PathBuf>,
        /// A CVAT for images 1.1 XML file (images named as `annotate export` names them).
        #[arg(long)]
        cvat: Option<PathBuf>,
        /// These are a model's proposals (raters accept, modify or reject them).
        #[arg(long, requires = "model")]
        proposal: bool,
        /// The model's name and version (for proposals).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value = "unversioned")]
        model_version: String,
    },
    /// Run the model's command ([annotation] in the config, or after `--`) on every case
    /// without its proposal, and import what it writes as proposals.
    Propose {
        #[arg(long)]
        project: String,
        /// The model's name and version (default: [annotation] proposal_model and
        /// proposal_model_version).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        model_version: Option<String>,
        /// Seconds one case may take (default: [annotation] proposal_timeout_seconds, or 600).
        #[arg(long)]
        timeout: Option<u64>,
        /// The command and its arguments ({image}, {output}, {case} are replaced).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// A rater's decision on a proposal (a new version; the proposal stays).
    Review {
        /// The proposal's version id.
        #[arg(long)]
        version: i64,
        #[arg(long)]
        rater: String,
        #[arg(value_enum)]
        action: ReviewAction,
        /// The modified label map (for `modify`).
        #[arg(long)]
        labelmap: Option<PathBuf>,
    },
    /// Agreement of the raters: κ and α for labels, Dice, IoU, Hausdorff, HD95 and ASSD for
    /// masks, box matching, landmark errors.
    Agreement {
        #[arg(long)]
        project: String,
        #[arg(long)]
        json: bool,
    },
    /// Consensus label maps from the raters' latest masks.
    Consensus {
        #[arg(long)]
        project: String,
        #[arg(long, value_enum, default_value = "staple")]
        method: MethodArg,
    },
    /// Export label maps (NIfTI + JSON sidecar), COCO, VIA 2 and CVAT 1.1 files, and with
    /// `--seg` DICOM Segmentations.
    Export {
        #[arg(long)]
        project: String,
        #[arg(long)]
        out: PathBuf,
        /// Only the consensus versions.
        #[arg(long)]
        consensus: bool,
        /// Also write DICOM Segmentations referencing the de-identified instances: `binary`
        /// (Segmentation Storage) or `labelmap` (Label Map Segmentation Storage).
        #[arg(long, value_enum)]
        seg: Option<SegArg>,
    },
    /// How far a project is.
    Status {
        #[arg(long)]
        project: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ProjectCommand {
    /// Create a project from a TOML definition and take its cases from the de-identified
    /// output (see `deploy/annotation-project.toml`).
    Create {
        /// The definition.
        file: PathBuf,
    },
    /// The projects.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum ReviewAction {
    Accept,
    Modify,
    Reject,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum SegArg {
    Binary,
    Labelmap,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum MethodArg {
    Majority,
    Staple,
}

fn read_map(path: &Path) -> Result<LabelMap> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    LabelMap::from_nifti(&bytes).with_context(|| format!("{}", path.display()))
}

/// Run an `annotate` command.
pub(crate) fn annotate(config: &NodeConfig, command: AnnotateCommand) -> Result<()> {
    let mut a = node::annotation::open(config, config.data_dir.join("deid"))?;
    match command {
        AnnotateCommand::Project {
            command: ProjectCommand::Create { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let project: Project = toml::from_str(&text)
                .with_context(|| format!("{}: not a project definition", file.display()))?;
            let n = a.create_project(&project)?;
            println!("project {} created with {n} cases", project.id);
        }
        AnnotateCommand::Project {
            command: ProjectCommand::List { json },
        } => {
            let projects = a.projects()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&projects)?);
            } else {
                for p in projects {
                    let kinds: Vec<&str> = p.kinds.iter().map(|k| k.name()).collect();
                    println!(
                        "{:<24} {} classes, {} raters per case, kinds {}, {}",
                        p.id,
                        p.labels.len(),
                        p.raters_per_case,
                        kinds.join(","),
                        if p.blinded { "blinded" } else { "not blinded" }
                    );
                }
            }
        }
        AnnotateCommand::Cases { project, json } => {
            let cases = a.cases(&project)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cases)?);
            } else {
                for c in cases {
                    println!(
                        "{:<40} {:<4} {}",
                        c.case_id,
                        c.modality,
                        a.image_path(&c).display()
                    );
                }
            }
        }
        AnnotateCommand::Assign { project, raters } => {
            let n = a.assign(&project, &raters)?;
            println!("{n} new assignments in project {project}");
        }
        AnnotateCommand::Import {
            project,
            rater,
            labelmap,
            case,
            coco,
            via,
            cvat,
            proposal,
            model,
            model_version,
        } => {
            let source = if proposal {
                Source::Proposal
            } else {
                Source::Import
            };
            let model = model.as_deref().map(|m| (m, model_version.as_str()));
            let file = coco
                .map(|p| (p, Format::Coco))
                .or(via.map(|p| (p, Format::Via)))
                .or(cvat.map(|p| (p, Format::Cvat)));
            match (labelmap, file, case) {
                (Some(path), None, Some(case)) => {
                    let id = a.import_labelmap(&project, &case, &rater, &path, source, model)?;
                    println!("imported {} as version {id}", path.display());
                }
                (None, Some((path, format)), _) => {
                    let ids = a.import_file(&project, &rater, &path, format, source, model)?;
                    println!(
                        "imported {} cases from {} as versions {ids:?}",
                        ids.len(),
                        path.display()
                    );
                }
                _ => {
                    bail!("give --labelmap FILE --case CASE, or one of --coco, --via, --cvat FILE")
                }
            }
        }
        AnnotateCommand::Propose {
            project,
            model,
            model_version,
            timeout,
            command,
        } => {
            let configured = config.annotation.as_ref();
            let command = if command.is_empty() {
                configured
                    .map(|c| c.proposal_command.clone())
                    .context("give the command after `--`, or set [annotation] proposal_command")?
            } else {
                command
            };
            let model = model
                .or(configured.map(|c| c.proposal_model.clone()))
                .context("give --model, or set [annotation] proposal_model")?;
            let version = model_version
                .or(configured.map(|c| c.proposal_model_version.clone()))
                .unwrap_or_else(|| "unversioned".into());
            let timeout = timeout
                .or(configured.map(|c| c.proposal_timeout_seconds))
                .unwrap_or(600);
            let r = a.propose(
                &project,
                (&model, &version),
                &command,
                std::time::Duration::from_secs(timeout),
            )?;
            println!(
                "{} proposals from {model} {version} imported, {} cases already had one, {} failed",
                r.imported.len(),
                r.skipped,
                r.failed.len()
            );
            for (case, why) in &r.failed {
                println!("  {case}: {why}");
            }
        }
        AnnotateCommand::Review {
            version,
            rater,
            action,
            labelmap,
        } => {
            let review = match action {
                ReviewAction::Accept => Review::Accept,
                ReviewAction::Reject => Review::Reject,
                ReviewAction::Modify => {
                    let path = labelmap.context("`modify` needs --labelmap FILE")?;
                    Review::Modify(Box::default(), Some(Box::new(read_map(&path)?)))
                }
            };
            let id = a.review(version, &rater, 1, review)?;
            println!("saved version {id}");
        }
        AnnotateCommand::Agreement { project, json } => {
            let r = a.agreement(&project)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.3}"));
            for l in &r.labels {
                println!(
                    "{} labels: {} cases, {} raters; Cohen κ {}, Fleiss κ {} (Randolph {}), Krippendorff α {}",
                    l.level,
                    l.cases,
                    l.raters,
                    f(l.cohen_kappa),
                    f(l.fleiss_kappa),
                    f(l.randolph_kappa),
                    f(l.krippendorff_alpha)
                );
            }
            for (class, s) in &r.mask_summary {
                println!(
                    "{class}: {} pairs ({} both empty, {} one empty); Dice mean {} median {}; HD95 median {} mm; ASSD median {} mm",
                    s.pairs,
                    s.both_empty,
                    s.one_empty,
                    f(s.mean_dice),
                    f(s.median_dice),
                    f(s.median_hd95),
                    f(s.median_assd)
                );
            }
            if !r.boxes.is_empty() {
                let f1: Vec<f64> = r.boxes.iter().filter_map(|b| b.f1).collect();
                println!(
                    "boxes: {} case pairs, mean F1 at IoU 0.5 {}",
                    r.boxes.len(),
                    f((!f1.is_empty()).then(|| f1.iter().sum::<f64>() / f1.len() as f64))
                );
            }
            if !r.landmarks.is_empty() {
                let e: Vec<f64> = r
                    .landmarks
                    .iter()
                    .flat_map(|l| l.errors_mm.iter().map(|x| x.1))
                    .collect();
                println!(
                    "landmarks: {} errors, mean {} mm",
                    e.len(),
                    f((!e.is_empty()).then(|| e.iter().sum::<f64>() / e.len() as f64))
                );
            }
        }
        AnnotateCommand::Consensus { project, method } => {
            let m = match method {
                MethodArg::Majority => ConsensusMethod::Majority,
                MethodArg::Staple => ConsensusMethod::Staple,
            };
            let n = a.consensus(&project, m)?;
            println!("consensus of {n} cases saved");
        }
        AnnotateCommand::Export {
            project,
            out,
            consensus,
            seg,
        } => {
            let seg = seg.map(|s| match s {
                SegArg::Binary => SegKind::Binary,
                SegArg::Labelmap => SegKind::LabelMap,
            });
            let n = a.export(&project, &out, consensus, seg)?;
            println!("exported {n} versions to {}", out.display());
        }
        AnnotateCommand::Status { project, json } => {
            let s = a.status(&project)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "{}: {} cases, {} assignments ({} submitted, {} returned), {} versions, consensus for {} cases",
                    s.project,
                    s.cases,
                    s.assignments,
                    s.submitted,
                    s.returned,
                    s.versions,
                    s.consensus_cases
                );
                for (r, (assigned, done)) in &s.raters {
                    println!("  {r:<20} {done}/{assigned}");
                }
                let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.3}"));
                for p in &s.proposals {
                    println!(
                        "  proposals of {} {}: {} ({} accepted, {} modified, {} rejected, {} pending); median edit Dice {}",
                        p.model,
                        p.version,
                        p.proposals,
                        p.accepted,
                        p.modified,
                        p.rejected,
                        p.pending,
                        f(p.median_edit_dice)
                    );
                }
                if let Some(a) = &s.anchoring {
                    println!(
                        "  anchoring: Dice to the proposal {} when shown ({} assignments), {} when not ({})",
                        f(a.mean_dice_shown),
                        a.shown,
                        f(a.mean_dice_hidden),
                        a.hidden
                    );
                }
            }
        }
    }
    Ok(())
}
