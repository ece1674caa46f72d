//! De-identify a folder of DICOM files: the I/O edge around [`crate::deid`].
//!
//! Every input ends as exactly one output file or one quarantine entry. Outputs are written
//! to a temporary file in their destination folder, flushed and renamed, so a killed process
//! leaves no half-written output. Logs name content hashes and pseudonyms, never a path or a
//! value from the input.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dicom_object::OpenFileOptions;

use crate::deid::keys::{Pseudonym, hex};
use crate::deid::{Deidentifier, Finding};

/// Errors that stop a batch (I/O on the node's own folders); content problems are not errors.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The failing entry's path is not named: below the root the user gave, folder names can
    /// be identifying (`SMITH_JOHN_19560312/`).
    #[error(
        "cannot list the input folder {root} ({kind:?} at depth {depth}); check that it exists and the node's user can read every folder in it"
    )]
    InputFolder {
        root: PathBuf,
        kind: Option<io::ErrorKind>,
        depth: usize,
    },
    #[error("cannot write to the {what} folder {path}: {source}; check free space and permissions")]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the output folder {0} is inside the input folder; choose an output outside it")]
    OutputInsideInput(PathBuf),
}

/// Where a batch reads and writes.
#[derive(Clone, Debug)]
pub struct BatchPaths {
    /// Folder of original files (read only).
    pub input: PathBuf,
    /// Folder of de-identified output.
    pub output: PathBuf,
    /// Folder for refused originals and their reasons (holds identifying data: owner-only).
    pub quarantine: PathBuf,
}

/// What happened to one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written to the output tree.
    Written { patient: Pseudonym, path: PathBuf },
    /// Identical to an input already written in this batch; recorded once.
    Duplicate,
    /// Refused, with a machine-readable reason.
    Quarantined { reason: String },
}

/// Counts of a batch. `inputs == written + duplicates + quarantined`.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub inputs: usize,
    pub written: usize,
    pub duplicates: usize,
    pub quarantined: BTreeMap<String, usize>,
    pub patients: BTreeSet<Pseudonym>,
    pub studies: BTreeSet<String>,
    pub series: BTreeSet<String>,
    pub bytes_in: u64,
    pub elapsed: Duration,
}

impl Summary {
    /// Total quarantined inputs.
    pub fn quarantined_total(&self) -> usize {
        self.quarantined.values().sum()
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "inputs        {}", self.inputs)?;
        writeln!(f, "written       {}", self.written)?;
        writeln!(f, "duplicates    {}", self.duplicates)?;
        writeln!(f, "quarantined   {}", self.quarantined_total())?;
        for (reason, n) in &self.quarantined {
            writeln!(f, "  {reason:<28} {n}")?;
        }
        writeln!(f, "patients      {}", self.patients.len())?;
        writeln!(f, "studies       {}", self.studies.len())?;
        writeln!(f, "series        {}", self.series.len())?;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "elapsed       {:.2} s ({:.0} files/s, {:.1} MB/s)",
            secs,
            self.inputs as f64 / secs,
            self.bytes_in as f64 / secs / 1e6
        )
    }
}

/// Short content hash of an input, the only way logs refer to it.
pub fn content_hash(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn write_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> BatchError + 'p {
    move |source| BatchError::Write {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Write `bytes` to `path` atomically: temporary file in the same folder, flush to disk, rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

fn quarantine(
    paths: &BatchPaths,
    hash: &str,
    bytes: &[u8],
    reason: &str,
    detail: &str,
) -> Result<(), BatchError> {
    let q = &paths.quarantine;
    fs::create_dir_all(q).map_err(write_err("quarantine", q))?;
    restrict(q, 0o700).map_err(write_err("quarantine", q))?;
    let file = q.join(format!("{hash}.dcm"));
    write_atomically(&file, bytes).map_err(write_err("quarantine", q))?;
    restrict(&file, 0o600).map_err(write_err("quarantine", q))?;
    let note = serde_json::json!({ "content_sha256": hash, "reason": reason, "detail": detail });
    let note_path = q.join(format!("{hash}.reason.json"));
    write_atomically(&note_path, format!("{note}\n").as_bytes())
        .map_err(write_err("quarantine", q))?;
    restrict(&note_path, 0o600).map_err(write_err("quarantine", q))?;
    Ok(())
}

/// All regular files under `root`, in a stable order.
pub fn list_inputs(root: &Path) -> Result<Vec<PathBuf>, BatchError> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.map_err(|e| BatchError::InputFolder {
            root: root.to_owned(),
            kind: e.io_error().map(io::Error::kind),
            depth: e.depth(),
        })?;
        if entry.file_type().is_file() {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

/// De-identify one file's bytes: the pure part of a batch step.
pub fn deidentify_bytes(
    deid: &Deidentifier<'_>,
    bytes: &[u8],
) -> Result<(crate::deid::Deidentified, Vec<u8>), (String, String)> {
    let obj = OpenFileOptions::new()
        .from_reader(bytes)
        .map_err(|e| ("unreadable".to_owned(), e.to_string()))?;
    let out = deid
        .deidentify(&obj)
        .map_err(|f: Finding| (f.code(), f.to_string()))?;
    let mut buf = Vec::new();
    out.object
        .write_all(&mut buf)
        .map_err(|e| ("unwritable".to_owned(), e.to_string()))?;
    Ok((out, buf))
}

/// De-identify every file under `paths.input` into `paths.output`.
pub fn deidentify_folder(
    paths: &BatchPaths,
    deid: &Deidentifier<'_>,
) -> Result<Summary, BatchError> {
    let started = Instant::now();
    if let (Ok(i), Ok(o)) = (paths.input.canonicalize(), paths.output.canonicalize()) {
        if o.starts_with(&i) {
            return Err(BatchError::OutputInsideInput(paths.output.clone()));
        }
    }
    let inputs = list_inputs(&paths.input)?;
    fs::create_dir_all(&paths.output).map_err(write_err("output", &paths.output))?;
    let mut summary = Summary::default();
    let mut written: HashMap<PathBuf, String> = HashMap::new();
    for path in inputs {
        summary.inputs += 1;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                // Unreadable input: nothing to quarantine but the reason.
                let reason = "unreadable-file".to_owned();
                tracing::warn!(reason = %reason, error_kind = ?e.kind(), "input could not be read");
                *summary.quarantined.entry(reason).or_default() += 1;
                continue;
            }
        };
        summary.bytes_in += bytes.len() as u64;
        let hash = content_hash(&bytes);
        let short = &hash[..16];
        match step(paths, deid, &bytes, &hash, &mut written)? {
            (Outcome::Written { patient, path: out }, study, series) => {
                tracing::info!(input = short, patient = %patient, "de-identified");
                summary.written += 1;
                summary.patients.insert(patient);
                summary.studies.insert(study);
                summary.series.insert(series);
                let _ = out;
            }
            (Outcome::Duplicate, ..) => {
                tracing::info!(input = short, "duplicate of an input already written");
                summary.duplicates += 1;
            }
            (Outcome::Quarantined { reason }, ..) => {
                tracing::warn!(input = short, reason = %reason, "quarantined");
                *summary.quarantined.entry(reason).or_default() += 1;
            }
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn step(
    paths: &BatchPaths,
    deid: &Deidentifier<'_>,
    bytes: &[u8],
    hash: &str,
    written: &mut HashMap<PathBuf, String>,
) -> Result<(Outcome, String, String), BatchError> {
    let (out, encoded) = match deidentify_bytes(deid, bytes) {
        Ok(x) => x,
        Err((reason, detail)) => {
            quarantine(paths, hash, bytes, &reason, &detail)?;
            return Ok((
                Outcome::Quarantined { reason },
                String::new(),
                String::new(),
            ));
        }
    };
    let rel = out.relative_path();
    let out_hash = content_hash(&encoded);
    if let Some(previous) = written.get(&rel) {
        if *previous == out_hash {
            return Ok((Outcome::Duplicate, String::new(), String::new()));
        }
        let reason = "uid-conflict".to_owned();
        quarantine(
            paths,
            hash,
            bytes,
            &reason,
            "another input with the same SOP Instance UID and different content was written first",
        )?;
        return Ok((
            Outcome::Quarantined { reason },
            String::new(),
            String::new(),
        ));
    }
    let dest = paths.output.join(&rel);
    write_atomically(&dest, &encoded).map_err(write_err("output", &paths.output))?;
    written.insert(rel.clone(), out_hash);
    Ok((
        Outcome::Written {
            patient: out.patient.clone(),
            path: rel,
        },
        out.study_token,
        out.series_token,
    ))
}
