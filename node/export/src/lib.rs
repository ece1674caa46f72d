//! Export de-identified series for training code: NIfTI volumes with a manifest, or the
//! nnU-Net v2 raw dataset layout with train/validation/test splits assigned by patient.
//!
//! Names are derived from pseudonyms and keyed hashes of de-identified UIDs, never from input
//! names. Everything is written atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use fc_files::{content_hash, list_files, write_atomically};
use fc_volume::nifti;
use fc_volume::series::{AssembledVolume, assemble};

/// Export layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nifti,
    NnUnet,
}

/// Export errors (I/O on the node's own folders).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the de-identified folder {0}: {1}")]
    Read(PathBuf, String),
    #[error("cannot write the export to {path}: {source}; check free space and permissions")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "split fractions must be three non-negative numbers summing to 1 (train, validation, test)"
    )]
    Fractions,
    #[error(
        "{count} DICOM file(s) under {folder} are not de-identified output of this node (not in its catalog, and not marked Patient Identity Removed = YES with the basic profile's method code by a fedcurate node); export reads only de-identified data: run `fedcurate-node deid` on the archive and export its output folder"
    )]
    NotDeidentified { folder: PathBuf, count: usize },
}

/// Whether an object carries the marks a fedcurate node writes on its de-identified output:
/// Patient Identity Removed = YES, the basic profile's method code (DCM 113100), and this
/// implementation's class UID in the file meta.
pub fn marked_deidentified(obj: &dicom_object::DefaultDicomObject) -> bool {
    use dicom_core::Tag;
    let removed = fc_read::text(obj, Tag(0x0012, 0x0062)) == "YES";
    let basic = obj
        .get(Tag(0x0012, 0x0064))
        .and_then(|e| e.items())
        .is_some_and(|items| {
            items
                .iter()
                .any(|i| fc_read::text(i, Tag(0x0008, 0x0100)) == "113100")
        });
    let ours = obj.meta().implementation_class_uid().trim_end_matches('\0')
        == fc_deid::IMPLEMENTATION_CLASS_UID;
    removed && basic && ours
}

/// The category splits are stratified by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stratify {
    None,
    Modality,
    Sex,
}

impl Stratify {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Modality => "modality",
            Self::Sex => "sex",
        }
    }
}

/// Export options.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub format: Format,
    /// nnU-Net dataset id (`DatasetNNN_name`).
    pub dataset_id: u16,
    pub dataset_name: String,
    /// Seed of the split assignment.
    pub seed: u64,
    /// Fractions of patients in train, validation and test.
    pub fractions: [f64; 3],
    /// Category the splits are stratified by.
    pub stratify: Stratify,
    /// Use the harmonised volumes of this folder (made by `harmonise` from a NIfTI export of
    /// the same data) instead of the raw ones.
    pub harmonised: Option<PathBuf>,
    /// Keyed tokens naming studies and series in file names and the manifest.
    pub tokens: fc_deid::keys::Tokens,
    /// Label maps for nnU-Net's `labelsTr` (from an annotation project).
    pub labels: Option<Labels>,
    /// How volumes are written (`.nii`, or `.nii.gz` at a fast or the default level);
    /// nnU-Net's layout is always `.nii.gz`.
    pub compress: fc_volume::gz::NiftiCompression,
}

/// Label maps to export beside the images (nnU-Net `labelsTr`).
#[derive(Clone, Debug, Default)]
pub struct Labels {
    /// A NIfTI label map per case, keyed `<series token>-<part>` (the annotation case id),
    /// on the case image's grid.
    pub maps: BTreeMap<String, Vec<u8>>,
    /// Class names by label value (background 0 is implied).
    pub names: Vec<(u16, String)>,
}

/// What an export wrote.
#[derive(Clone, Debug, Default)]
pub struct ExportSummary {
    pub volumes: usize,
    pub skipped: usize,
    pub patients: usize,
    pub splits: [usize; 3],
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    write_atomically(path, bytes).map_err(|source| ExportError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Deterministic split of patients: within each stratum, patients are ordered by a hash of
/// (seed, patient) and cut by the fractions.
pub fn split_patients(
    patients: &BTreeMap<String, String>,
    seed: u64,
    fractions: [f64; 3],
) -> BTreeMap<String, usize> {
    let mut strata: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (p, stratum) in patients {
        strata.entry(stratum.as_str()).or_default().push(p.as_str());
    }
    let mut out = BTreeMap::new();
    for (_, mut members) in strata {
        members.sort_by_key(|p| content_hash(format!("{seed}:{p}").as_bytes()));
        let n = members.len() as f64;
        let train = (n * fractions[0]).round() as usize;
        let val = (n * fractions[1]).round() as usize;
        for (i, p) in members.into_iter().enumerate() {
            let set = if i < train {
                0
            } else if i < train + val {
                1
            } else {
                2
            };
            out.insert(p.to_owned(), set);
        }
    }
    out
}

/// Export every series found under `input` (de-identified DICOM) to `out`. Every DICOM file
/// there must be this node's de-identified output: `recorded` says whether a content hash is
/// a catalogued output; otherwise the node's de-identification marks must be on the object
/// ([`marked_deidentified`]). One that is neither refuses the whole export (a raw archive
/// given by mistake would put identifiers in names and the manifest).
pub fn export(
    input: &Path,
    out: &Path,
    opts: &ExportOptions,
    recorded: &dyn Fn(&str) -> bool,
) -> Result<ExportSummary, ExportError> {
    let f = opts.fractions;
    if f.iter().any(|x| *x < 0.0) || (f.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
        return Err(ExportError::Fractions);
    }
    let files =
        list_files(input).map_err(|e| ExportError::Read(input.to_owned(), e.to_string()))?;
    let mut not_deidentified = 0;
    let mut objects = Vec::new();
    for p in &files {
        let Ok(bytes) = fs::read(p) else { continue };
        let Ok(obj) = fc_read::read_object(&bytes) else {
            continue;
        };
        if marked_deidentified(&obj) || recorded(&content_hash(&bytes)) {
            objects.push(obj);
        } else {
            not_deidentified += 1;
        }
    }
    if not_deidentified > 0 {
        return Err(ExportError::NotDeidentified {
            folder: input.to_owned(),
            count: not_deidentified,
        });
    }
    let volumes = assemble(&objects);
    let mut summary = ExportSummary::default();
    let mut manifest = String::new();
    let mut cases: Vec<(&AssembledVolume, String, Option<Vec<u8>>)> = Vec::new();
    for v in &volumes {
        let Some(vol) = &v.volume else {
            summary.skipped += 1;
            continue;
        };
        let findings: Vec<&str> = v.findings.iter().map(|f| f.code()).collect();
        let (ni, nj, nk) = vol.shape();
        let series_key = if v.part > 0 {
            format!("{}_{}", opts.tokens.token(&v.series_uid), v.part)
        } else {
            opts.tokens.token(&v.series_uid)
        };
        let nifti_rel = format!(
            "{}/{}/{series_key}{}",
            v.patient,
            opts.tokens.token(&v.study_uid),
            opts.compress.suffix()
        );
        let harmonised = match &opts.harmonised {
            Some(dir) => match fs::read(dir.join(&nifti_rel)) {
                Ok(b) => Some(b),
                Err(_) => {
                    summary.skipped += 1;
                    continue;
                }
            },
            None => None,
        };
        // nnU-Net trains on labelled cases only: with labels, the others are left out.
        if opts.format == Format::NnUnet
            && opts.labels.as_ref().is_some_and(|l| {
                !l.maps
                    .contains_key(&format!("{}-{}", opts.tokens.token(&v.series_uid), v.part))
            })
        {
            continue;
        }
        let rel = match opts.format {
            Format::Nifti => nifti_rel.clone(),
            Format::NnUnet => String::new(),
        };
        manifest.push_str(
            &serde_json::json!({
                "patient": v.patient,
                "study": opts.tokens.token(&v.study_uid),
                "series": series_key,
                "modality": v.modality,
                "shape": [ni, nj, nk],
                "volumes": 1 + v.more.len(),
                "diffusion": !v.diffusion.is_empty(),
                "spacing": vol.spacing(),
                "findings": findings,
                "file": rel,
                "harmonised": harmonised.is_some(),
            })
            .to_string(),
        );
        manifest.push('\n');
        if opts.format == Format::Nifti {
            let path = out.join(&rel);
            match harmonised {
                Some(b) => write(&path, &b)?,
                // Converted, compressed and written a block at a time.
                None => fc_files::write_atomically_with(&path, |f| {
                    nifti::write_series_as(
                        io::BufWriter::with_capacity(1 << 20, f),
                        vol,
                        &v.more,
                        v.repetition_s.unwrap_or(1.0),
                        opts.compress,
                    )?
                    .flush()
                })
                .map_err(|source| ExportError::Write {
                    path: path.clone(),
                    source,
                })?,
            }
            // Diffusion: b-values and directions beside the image, as dcm2niix writes them.
            if !v.diffusion.is_empty() {
                let (bval, bvec) = fc_volume::fsl_text(&vol.affine, &v.diffusion);
                let stem = rel.strip_suffix(opts.compress.suffix()).unwrap_or(&rel);
                write(&out.join(format!("{stem}.bval")), bval.as_bytes())?;
                write(&out.join(format!("{stem}.bvec")), bvec.as_bytes())?;
            }
        } else {
            cases.push((v, series_key, harmonised));
        }
        summary.volumes += 1;
    }
    match opts.format {
        Format::Nifti => write(&out.join("manifest.jsonl"), manifest.as_bytes())?,
        Format::NnUnet => {
            let root = out.join(format!(
                "Dataset{:03}_{}",
                opts.dataset_id, opts.dataset_name
            ));
            let mut patients: BTreeMap<String, String> = BTreeMap::new();
            let mut names = Vec::new();
            for (v, series_key, harmonised) in &cases {
                let category = match opts.stratify {
                    Stratify::None => String::new(),
                    Stratify::Modality => v.modality.clone(),
                    Stratify::Sex => v.sex.clone(),
                };
                let label = opts.labels.as_ref().and_then(|l| {
                    l.maps
                        .get(&format!("{}-{}", opts.tokens.token(&v.series_uid), v.part))
                });
                patients.entry(v.patient.clone()).or_insert(category);
                let case = format!("{}_{}", v.patient, series_key);
                if let Some(m) = label {
                    write(&root.join("labelsTr").join(format!("{case}.nii.gz")), m)?;
                }
                let vol = v.volume.as_ref().ok_or(ExportError::Fractions)?;
                let bytes = match harmonised {
                    Some(b) => b.clone(),
                    None => nifti::gzip(&nifti::encode(vol), opts.compress.level().unwrap_or(6))
                        .map_err(|source| ExportError::Write {
                            path: root.clone(),
                            source,
                        })?,
                };
                write(
                    &root.join("imagesTr").join(format!("{case}_0000.nii.gz")),
                    &bytes,
                )?;
                names.push((case, v.patient.clone()));
            }
            let assignment = split_patients(&patients, opts.seed, opts.fractions);
            let mut sets: [Vec<String>; 3] = Default::default();
            for (case, patient) in &names {
                let s = assignment.get(patient).copied().unwrap_or(0);
                sets[s].push(case.clone());
            }
            for (i, s) in sets.iter().enumerate() {
                summary.splits[i] = s.len();
            }
            let modality = cases
                .first()
                .map(|(v, _, _)| v.modality.clone())
                .unwrap_or_default();
            let mut labels = serde_json::Map::new();
            labels.insert("background".into(), 0.into());
            for (value, name) in opts.labels.iter().flat_map(|l| &l.names) {
                labels.insert(name.clone(), (*value).into());
            }
            let dataset = serde_json::json!({
                "channel_names": { "0": modality },
                "labels": labels,
                "numTraining": names.len(),
                "file_ending": ".nii.gz",
                "name": opts.dataset_name,
                "description": if opts.labels.is_some() {
                    "exported by fedcurate-node from de-identified DICOM, with label maps from an annotation project"
                } else {
                    "exported by fedcurate-node from de-identified DICOM; no labels (export with --labels PROJECT)"
                },
            });
            write(
                &root.join("dataset.json"),
                serde_json::to_string_pretty(&dataset)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            let splits = serde_json::json!({
                "seed": opts.seed,
                "by": "patient",
                "stratified_by": opts.stratify.name(),
                "train": sets[0],
                "validation": sets[1],
                "test": sets[2],
            });
            write(
                &root.join("splits.json"),
                serde_json::to_string_pretty(&splits)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            write(&root.join("manifest.jsonl"), manifest.as_bytes())?;
            summary.patients = patients.len();
        }
    }
    if opts.format == Format::Nifti {
        summary.patients = volumes
            .iter()
            .map(|v| &v.patient)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_by_patient_deterministic_and_stratified() {
        let patients: BTreeMap<String, String> = (0..40)
            .map(|i| {
                (
                    format!("P{i:03}"),
                    if i % 4 == 0 { "MR".into() } else { "CT".into() },
                )
            })
            .collect();
        let a = split_patients(&patients, 7, [0.7, 0.15, 0.15]);
        assert_eq!(a, split_patients(&patients, 7, [0.7, 0.15, 0.15]));
        assert_ne!(a, split_patients(&patients, 8, [0.7, 0.15, 0.15]));
        let count = |modality: &str, set: usize| {
            a.iter()
                .filter(|(p, s)| **s == set && patients[*p] == modality)
                .count()
        };
        assert_eq!((count("CT", 0), count("CT", 1), count("CT", 2)), (21, 5, 4));
        assert_eq!((count("MR", 0), count("MR", 1), count("MR", 2)), (7, 2, 1));
    }
}
