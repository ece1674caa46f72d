//! De-identify a folder of DICOM files: the I/O edge around [`crate::deid`], with the
//! [`Catalog`] as the source of truth.
//!
//! Every input ends as exactly one output file, one duplicate record, one quarantine entry, or
//! (for a file this node wrote itself) an own-output record. Work is done in batches: outputs
//! are written to temporary files in their destination folders, then flushed to disk, renamed,
//! their folders flushed, and only then does the batch's catalog transaction commit. A kill at
//! any instant leaves no half-written output and no catalog row without its file; re-running
//! the same command skips what is recorded and finishes the rest.
//!
//! Logs name content hashes and pseudonyms, never a path or a value from the input.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::audit::{AuditRecord, utc_now};
use crate::catalog::{
    BatchRecords, Catalog, CatalogError, InputRecord, QuarantineEntry, RecordedOutcome, RunProfile,
};
use crate::deid::keys::{Pseudonym, hex};
use crate::deid::{Deidentified, Deidentifier, Finding};
use crate::vault::{self, VaultKey};
use crate::volume::deid::SubjectRule;

pub use fc_files::{
    DurableBatch, TEMP_PREFIX, content_hash, restrict, sweep_temporaries, write_atomically,
};

/// Errors that stop a batch (I/O on the node's own folders, the catalog); content problems
/// are not errors.
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
    #[error("the quarantine folder must not be inside the output folder {0}")]
    QuarantineInsideOutput(PathBuf),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("re-identification map: {0}")]
    Vault(#[from] vault::VaultError),
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

/// Where a run reports its progress (a progress bar, periodic log lines, nothing).
pub trait Progress: Sync + std::fmt::Debug {
    /// The run found `total` inputs, of which `done` were already recorded.
    fn start(&self, total: u64, done: u64) {
        let _ = (total, done);
    }
    /// `n` more inputs have an outcome.
    fn advance(&self, n: u64) {
        let _ = n;
    }
    /// The run is over.
    fn finish(&self) {}
}

/// No progress reporting.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Upper bound of the bytes read into memory for one batch, whatever `batch_size` says.
pub const MAX_BATCH_BYTES: u64 = 256 * 1024 * 1024;

/// How a run is made.
#[derive(Debug)]
pub struct RunSettings<'a> {
    /// `pseudonymise` or `anonymise`, as recorded in the catalog.
    pub mode: &'a str,
    /// Edition of the rules.
    pub edition: &'a str,
    /// Options in force, comma-separated (`basic` when none).
    pub options: String,
    /// Key of the re-identification map; `None`: no map is kept (always so when anonymising).
    pub vault_key: Option<&'a VaultKey>,
    /// Inputs per durable batch (files flushed together, one catalog transaction).
    pub batch_size: usize,
    /// Progress reporting.
    pub progress: &'a dyn Progress,
    /// How NIfTI/Analyze inputs map to subjects.
    pub subjects: &'a SubjectRule,
}

/// Counts of a run over one input folder. Outcome counts cover every input of the folder,
/// including those recorded by earlier (possibly interrupted) runs, so that
/// `inputs == written + duplicates + quarantined + own_outputs`.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub inputs: usize,
    /// Inputs whose outcome was already recorded before this run.
    pub done_before: usize,
    pub written: usize,
    pub duplicates: usize,
    pub own_outputs: usize,
    pub quarantined: BTreeMap<String, usize>,
    /// Written inputs that were read past a conformance problem (e.g. `odd-length`).
    pub read_with_findings: BTreeMap<String, usize>,
    pub patients: BTreeSet<Pseudonym>,
    pub bytes_in: u64,
    pub elapsed: Duration,
    /// Peak resident memory of the process (Linux), if known.
    pub peak_rss: Option<u64>,
}

impl Summary {
    /// Total quarantined inputs.
    pub fn quarantined_total(&self) -> usize {
        self.quarantined.values().sum()
    }

    fn count(&mut self, outcome: RecordedOutcome, reason: Option<&str>) {
        match outcome {
            RecordedOutcome::Written => {
                self.written += 1;
                if let Some(r) = reason {
                    *self.read_with_findings.entry(r.to_owned()).or_default() += 1;
                }
            }
            RecordedOutcome::Duplicate => self.duplicates += 1,
            RecordedOutcome::OwnOutput => self.own_outputs += 1,
            RecordedOutcome::Quarantined => {
                *self
                    .quarantined
                    .entry(reason.unwrap_or("unknown").to_owned())
                    .or_default() += 1
            }
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "inputs        {}", self.inputs)?;
        writeln!(f, "  done before {}", self.done_before)?;
        writeln!(f, "written       {}", self.written)?;
        for (finding, n) in &self.read_with_findings {
            writeln!(f, "  read past {finding:<18} {n}")?;
        }
        writeln!(f, "duplicates    {}", self.duplicates)?;
        writeln!(f, "own output    {}", self.own_outputs)?;
        writeln!(f, "quarantined   {}", self.quarantined_total())?;
        for (reason, n) in &self.quarantined {
            writeln!(f, "  {reason:<28} {n}")?;
        }
        writeln!(f, "patients      {} (new in this run)", self.patients.len())?;
        if let Some(p) = self.peak_rss {
            writeln!(f, "peak memory   {} MB", p / 1_000_000)?;
        }
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

fn write_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> BatchError + 'p {
    move |source| BatchError::Write {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Create the quarantine folder with owner-only permissions.
pub fn ensure_quarantine(q: &Path) -> Result<(), BatchError> {
    fs::create_dir_all(q).map_err(write_err("quarantine", q))?;
    restrict(q, 0o700).map_err(write_err("quarantine", q))
}

/// All regular files under `root`, in a stable order, skipping the node's temporaries.
pub fn list_inputs(root: &Path) -> Result<Vec<PathBuf>, BatchError> {
    fc_files::list_files(root).map_err(|e| BatchError::InputFolder {
        root: root.to_owned(),
        kind: e.kind,
        depth: e.depth,
    })
}

/// The de-identified object and its encoding, or (reason, detail) of a refusal.
pub type DeidOutcome = Result<(Deidentified, Vec<u8>), (String, String)>;

/// De-identify one file's bytes: the pure part of a batch step. A file ending with native
/// pixel data has only its header parsed and de-identified; the pixel data is copied as bytes
/// (bits above High Bit cleared on the way, as for a parsed object), which gives the same
/// output as de-identifying the whole object ([`deidentify_whole`]; tested on every fixture).
pub fn deidentify_bytes(deid: &Deidentifier<'_>, bytes: &[u8]) -> DeidOutcome {
    match deidentify_native(deid, bytes) {
        Some(done) => done,
        None => deidentify_whole(deid, bytes),
    }
}

/// The header-only path of [`deidentify_bytes`]; `None` when the file is not one it takes
/// (no native pixel data at the end, a header the whole-object path would treat otherwise, a
/// pixel data length other than the header describes, a masking rule to apply).
fn deidentify_native(deid: &Deidentifier<'_>, bytes: &[u8]) -> Option<DeidOutcome> {
    let native = crate::read::native_pixel_data(bytes)?;
    if native.ob && native.big_endian {
        return None;
    }
    let header = bytes.get(..native.start)?;
    let element = bytes.get(native.start..)?;
    let value = element.get(native.header..)?;
    let (d, mut out) = deidentify_whole(deid, header).ok()?;
    let expected = crate::read::native_pixel_bytes(&d.object)?;
    if expected != value.len() as u64 || !value.len().is_multiple_of(2) {
        return None;
    }
    let base = out.len() + native.header;
    out.extend_from_slice(element);
    if let Some(fix) = OverlayFix::for_header(&d.object, native.header as u64, native.big_endian) {
        fix.apply(&mut out[base..]);
    }
    Some(Ok((d, out)))
}

/// Clear the bits above High Bit of 16-bit words in place (`high` < 15): zeroed for unsigned
/// samples, the sign extension of High Bit for signed ones (as `pixels::clear_bits_above_high_bit`
/// does on a parsed object). Branch-free, so the loop runs on vector lanes.
fn clear_above_high_bit(words: &mut [u8], high: u32, signed: bool, big_endian: bool) {
    let mask: u16 = (1u16 << (high + 1)) - 1;
    let signed = u16::from(signed);
    let fix = |w: u16| -> u16 {
        let sign = (w >> high) & signed;
        (w & mask) | (0u16.wrapping_sub(sign) & !mask)
    };
    // Four words at a time in a u64, each 16-bit lane one word in the file's byte order:
    // shifting by High Bit brings each lane's High Bit to the lane's bit 0, and multiplying
    // those bits by the cleared bits spreads the sign into each lane without carries.
    let lanes = |v: u16| u64::from(v) * 0x0001_0001_0001_0001;
    let (keep, ones, above) = (lanes(mask), lanes(signed), u64::from(!mask));
    let fix4 = |x: u64| -> u64 { (x & keep) | (((x >> high) & ones).wrapping_mul(above)) };
    let mut quads = words.chunks_exact_mut(8);
    for q in &mut quads {
        let mut b = [0u8; 8];
        b.copy_from_slice(q);
        let x = if big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        };
        let y = fix4(x);
        q.copy_from_slice(&if big_endian {
            y.to_be_bytes()
        } else {
            y.to_le_bytes()
        });
    }
    for p in quads.into_remainder().chunks_exact_mut(2) {
        let w = if big_endian {
            u16::from_be_bytes([p[0], p[1]])
        } else {
            u16::from_le_bytes([p[0], p[1]])
        };
        let f = fix(w);
        p.copy_from_slice(&if big_endian {
            f.to_be_bytes()
        } else {
            f.to_le_bytes()
        });
    }
}

/// De-identify one file's bytes as a whole parsed object.
pub fn deidentify_whole(deid: &Deidentifier<'_>, bytes: &[u8]) -> DeidOutcome {
    let read =
        crate::read::read_object_preserving(bytes).map_err(|r| (r.reason.to_owned(), r.detail))?;
    let obj = read.object;
    let mut out = deid
        .deidentify(&obj)
        .map_err(|f: Finding| (f.code(), f.to_string()))?;
    out.input_finding = read.finding;
    if let Some(original) = &read.restore_charset {
        // A placeholder of the original's length, replaced by the original bytes below.
        let placeholder = format!("{:<width$}", "ISO_IR 100", width = original.len());
        out.object.put(dicom_core::DataElement::new(
            dicom_core::Tag(0x0008, 0x0005),
            dicom_core::VR::CS,
            dicom_core::PrimitiveValue::from(placeholder),
        ));
    }
    let mut buf = Vec::new();
    out.object
        .write_all(&mut buf)
        .map_err(|e| ("unwritable".to_owned(), e.to_string()))?;
    if let Some(original) = &read.restore_charset {
        let big_endian = out.object.meta().transfer_syntax().trim_end_matches('\0')
            == crate::read::ts::EXPLICIT_BE;
        if !crate::read::restore_charset(&mut buf, original, big_endian) {
            return Err((
                "unwritable".to_owned(),
                "the original Specific Character Set could not be restored".to_owned(),
            ));
        }
    }
    Ok((out, buf))
}

/// An input found in phase one.
struct Found {
    path: PathBuf,
    /// Keyed marker of the path (what the catalog stores).
    path_key: String,
    /// Keyed marker of the content (what the catalog, the quarantine and the logs use).
    content_hash: String,
    /// Plain SHA-256 of the content: compared with our outputs' hashes, never stored.
    sha256: String,
    size: u64,
    /// The file's identity and times when it was hashed, if they can vouch for its content
    /// later (see [`Stamp`]).
    stamp: Option<Stamp>,
}

/// What the file system says about a file: when it is the same before it was hashed and
/// after it was read again, the content read is the content hashed (any write changes the
/// change time, which no caller can set back), and the second hash is saved. A file changed
/// in the last seconds before it was hashed has no stamp (a time stamp's granularity could
/// hide a second write within it): it is hashed again when read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    #[cfg(unix)]
    fn of(meta: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of a file about to be hashed, unless it changed too recently to vouch.
    #[cfg(unix)]
    fn settled(meta: &fs::Metadata) -> Option<Stamp> {
        let s = Stamp::of(meta);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs() as i64;
        (now - s.ctime.0.max(s.mtime.0) >= 2).then_some(s)
    }

    #[cfg(not(unix))]
    fn settled(_meta: &fs::Metadata) -> Option<Stamp> {
        None
    }

    /// Whether `path` still has this stamp.
    #[cfg(unix)]
    fn holds(&self, path: &Path) -> bool {
        fs::metadata(path).is_ok_and(|m| Stamp::of(&m) == *self)
    }

    #[cfg(not(unix))]
    fn holds(&self, _path: &Path) -> bool {
        false
    }
}

/// Whether `bytes`, just read from `found.path`, are the content hashed in phase one.
fn unchanged(found: &Found, bytes: &[u8]) -> bool {
    match &found.stamp {
        Some(stamp) if bytes.len() as u64 == stamp.len && stamp.holds(&found.path) => true,
        _ => content_hash(bytes) == found.sha256,
    }
}

/// Files at least this large are not read into memory: their header is de-identified and
/// their pixel data copied as bytes from the input to the output.
pub const LARGE_FILE: u64 = 64 * 1024 * 1024;
/// How much of a large file is read to find its header.
const HEAD_LIMIT: u64 = 32 * 1024 * 1024;

/// An input's bytes: in memory, or (large files) left in the file.
enum Input {
    Bytes(Vec<u8>),
    File { path: PathBuf, len: u64 },
}

impl Input {
    fn len(&self) -> u64 {
        match self {
            Input::Bytes(b) => b.len() as u64,
            Input::File { len, .. } => *len,
        }
    }

    fn stage(&self, files: &mut DurableBatch, dest: &Path) -> io::Result<()> {
        match self {
            Input::Bytes(b) => files.stage(dest, b),
            Input::File { path, .. } => files.stage_copy(dest, path),
        }
    }
}

/// A de-identified output: in memory, or a new header followed by a byte range of the input,
/// with companion files (a NIfTI sidecar) written next to it.
enum Output {
    Bytes(Vec<u8>),
    WithCompanions(Vec<u8>, Vec<(String, Vec<u8>)>),
    Parts {
        header: Vec<u8>,
        path: PathBuf,
        start: u64,
        end: u64,
        /// Overlay bits cleared on the way, for native 16-bit pixel data.
        fix: Option<OverlayFix>,
    },
}

impl Output {
    /// Stage the output for `dest`: bytes in memory are written at the batch's commit, in
    /// parallel with its other files.
    fn stage(self, files: &mut DurableBatch, dest: &Path) -> io::Result<()> {
        match self {
            Output::Bytes(b) => files.stage_owned(dest, b),
            Output::WithCompanions(b, companions) => {
                files.stage_owned(dest, b)?;
                for (suffix, bytes) in companions {
                    let name = dest
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let stem = name.split('.').next().unwrap_or_default();
                    files.stage_owned(&dest.with_file_name(format!("{stem}{suffix}")), bytes)?;
                }
                Ok(())
            }
            Output::Parts {
                header,
                path,
                start,
                end,
                fix,
            } => files.stage_parts(
                dest,
                &header,
                &path,
                start,
                end,
                fix.map_or(end - start, |f| f.skip),
                &|b| {
                    if let Some(f) = &fix {
                        f.apply(b)
                    }
                },
            ),
        }
    }
}

/// Where a de-identified input goes and under which pseudonymous keys.
struct Placed {
    patient: Pseudonym,
    study: Option<String>,
    series: Option<String>,
    instance: String,
    /// Output path relative to the output folder.
    rel: String,
    original: vault::OriginalIdentity,
    /// A conformance problem of the input read past, recorded as the row's reason.
    finding: Option<&'static str>,
}

impl From<Deidentified> for Placed {
    fn from(d: Deidentified) -> Self {
        Placed {
            rel: d.relative_path().to_string_lossy().into_owned(),
            patient: d.patient,
            study: Some(d.study_token),
            series: Some(d.series_token),
            instance: d.instance_token,
            original: d.original,
            finding: d.input_finding,
        }
    }
}

/// The placement, the output and the output's hash, or (reason, detail).
type Processed = Result<(Placed, Output, String), (String, String)>;

/// The parallel, pure part of one input's processing.
enum Prepared {
    /// Unreadable, or changed since it was hashed.
    Unreadable,
    Read {
        input: Input,
        result: Box<Processed>,
    },
}

fn prepare(
    deid: &Deidentifier<'_>,
    found: &Found,
    input_root: &Path,
    subjects: &SubjectRule,
) -> Prepared {
    if crate::volume::nifti::is_nifti_path(&found.path) {
        let rel = found.path.strip_prefix(input_root).unwrap_or(&found.path);
        let result =
            crate::volume::deid::deidentify(&found.path, rel, deid.keys(), deid.policy(), subjects)
                .map(|n| {
                    let h = content_hash(&n.image);
                    let placed = Placed {
                        rel: format!("{}/nifti/{}.nii.gz", n.patient, n.token),
                        patient: n.patient,
                        study: None,
                        series: None,
                        instance: n.token,
                        original: n.original,
                        finding: None,
                    };
                    let output = match n.sidecar {
                        Some(s) => Output::WithCompanions(n.image, vec![(".json".to_owned(), s)]),
                        None => Output::Bytes(n.image),
                    };
                    (placed, output, h)
                });
        return Prepared::Read {
            input: Input::File {
                path: found.path.clone(),
                len: found.size,
            },
            result: Box::new(result),
        };
    }
    if found.size >= LARGE_FILE
        && let Some(p) = prepare_large(deid, found)
    {
        return p;
    }
    match fs::read(&found.path) {
        Ok(bytes) if unchanged(found, &bytes) => {
            let result = deidentify_bytes(deid, &bytes).map(|(d, out)| {
                let h = content_hash(&out);
                (Placed::from(d), Output::Bytes(out), h)
            });
            Prepared::Read {
                input: Input::Bytes(bytes),
                result: Box::new(result),
            }
        }
        _ => Prepared::Unreadable,
    }
}

/// Large files: parse and de-identify only the header; the pixel data is copied as bytes.
/// `None` falls back to reading the whole file (deflated data, a masking rule to apply, an
/// unusual layout).
fn prepare_large(deid: &Deidentifier<'_>, found: &Found) -> Option<Prepared> {
    use std::io::Read;
    let mut f = fs::File::open(&found.path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = vec![0u8; len.min(HEAD_LIMIT) as usize];
    f.read_exact(&mut head).ok()?;
    let (start, end) = crate::read::locate_pixel_data(&head, &mut f, len)?;
    let input = Input::File {
        path: found.path.clone(),
        len,
    };
    let result = match deidentify_bytes(deid, &head[..start]) {
        Err((reason, _)) if reason == "unmaskable-pixel-data" => return None,
        Err(e) => Err(e),
        Ok((d, header)) => {
            let fix = OverlayFix::of(&d, &head, start);
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(&header);
            let mapped_from = start as u64 + fix.map_or(end - start as u64, |f| f.skip);
            hash_range(&mut f, start as u64, mapped_from, None, &mut ctx).ok()?;
            hash_range(&mut f, mapped_from, end, fix.as_ref(), &mut ctx).ok()?;
            let h = hex(ctx.finish().as_ref());
            Ok((
                Placed::from(d),
                Output::Parts {
                    header,
                    path: found.path.clone(),
                    start: start as u64,
                    end,
                    fix,
                },
                h,
            ))
        }
    };
    Some(Prepared::Read {
        input,
        result: Box::new(result),
    })
}

/// Overlay planes to clear from a large file's native 16-bit pixel data while it is copied
/// (what the whole-object path does on a parsed object).
#[derive(Clone, Copy, Debug)]
struct OverlayFix {
    /// Bytes of the Pixel Data element's header, copied as they are.
    skip: u64,
    high: u32,
    signed: bool,
    big_endian: bool,
}

impl OverlayFix {
    /// The fix a de-identified header asks for, when its pixel data (at `start` in `head`) is
    /// native 16-bit words with bits above High Bit.
    /// The fix a header asks for: native 16-bit words with bits above High Bit. `skip` is the
    /// Pixel Data element's header length.
    fn for_header(
        obj: &dicom_object::InMemDicomObject,
        skip: u64,
        big_endian: bool,
    ) -> Option<OverlayFix> {
        use crate::read::number;
        use dicom_core::Tag;
        let high = number(obj, Tag(0x0028, 0x0102))?;
        if number(obj, Tag(0x0028, 0x0100))? != 16 || high >= 15 {
            return None;
        }
        Some(OverlayFix {
            skip,
            high: high as u32,
            signed: number(obj, Tag(0x0028, 0x0103)) == Some(1),
            big_endian,
        })
    }

    /// The fix for a large file whose de-identified header is `d` and whose Pixel Data
    /// element starts at `start` in `head`, when that pixel data is native.
    fn of(d: &Deidentified, head: &[u8], start: usize) -> Option<OverlayFix> {
        let ts = d.object.meta().transfer_syntax().trim_end_matches('\0');
        let (skip, big_endian) = match ts {
            crate::read::ts::IMPLICIT_LE => (8u64, false),
            crate::read::ts::EXPLICIT_BE => (12, true),
            crate::read::ts::EXPLICIT_LE => (12, false),
            _ => return None,
        };
        let len_at = start + skip as usize - 4;
        let len = head.get(len_at..len_at + 4)?;
        let len = if big_endian {
            u32::from_be_bytes([len[0], len[1], len[2], len[3]])
        } else {
            u32::from_le_bytes([len[0], len[1], len[2], len[3]])
        };
        if len == u32::MAX {
            return None;
        }
        OverlayFix::for_header(&d.object, skip, big_endian)
    }

    fn apply(&self, words: &mut [u8]) {
        clear_above_high_bit(words, self.high, self.signed, self.big_endian);
    }
}

/// Hash bytes `start..end` of `f`, as `fix` rewrites them when given.
fn hash_range(
    f: &mut fs::File,
    start: u64,
    end: u64,
    fix: Option<&OverlayFix>,
    ctx: &mut ring::digest::Context,
) -> io::Result<()> {
    use std::io::{Read, Seek};
    f.seek(io::SeekFrom::Start(start))?;
    let mut remaining = end - start;
    let mut buf = vec![0u8; 1 << 20];
    while remaining > 0 {
        let n = (remaining as usize).min(buf.len());
        f.read_exact(&mut buf[..n])?;
        if let Some(fix) = fix {
            fix.apply(&mut buf[..n]);
        }
        ctx.update(&buf[..n]);
        remaining -= n as u64;
    }
    Ok(())
}

/// SHA-256 of a file, streamed, its length, and its stamp taken before it was read.
fn hash_file_stamped(path: &Path) -> io::Result<(String, u64, Option<Stamp>)> {
    let mut f = fs::File::open(path)?;
    let meta = f.metadata()?;
    let stamp = Stamp::settled(&meta);
    let len = meta.len();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    hash_range(&mut f, 0, len, None, &mut ctx)?;
    Ok((hex(ctx.finish().as_ref()), len, stamp))
}

/// SHA-256 of a file, streamed, and its length.
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    hash_range(&mut f, 0, len, None, &mut ctx)?;
    Ok((hex(ctx.finish().as_ref()), len))
}

/// Split work into batches of at most `count` inputs and about `max_bytes` bytes.
fn batches(todo: &[Found], count: usize, max_bytes: u64) -> Vec<&[Found]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, f) in todo.iter().enumerate() {
        if i > start && (i - start >= count || bytes + f.size > max_bytes) {
            out.push(&todo[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += f.size.min(LARGE_FILE);
    }
    if start < todo.len() {
        out.push(&todo[start..]);
    }
    out
}

/// Files and records of one batch, made durable and committed together.
#[derive(Default)]
struct Pending {
    files: DurableBatch,
    records: BatchRecords,
}

/// De-identify every file under `paths.input` into `paths.output`, recording everything in
/// `catalog`.
pub fn deidentify_folder(
    paths: &BatchPaths,
    deid: &Deidentifier<'_>,
    catalog: &mut Catalog,
    settings: &RunSettings<'_>,
) -> Result<Summary, BatchError> {
    let started = Instant::now();
    fs::create_dir_all(&paths.output).map_err(write_err("output", &paths.output))?;
    ensure_quarantine(&paths.quarantine)?;
    if let (Ok(i), Ok(o), Ok(q)) = (
        paths.input.canonicalize(),
        paths.output.canonicalize(),
        paths.quarantine.canonicalize(),
    ) {
        if o.starts_with(&i) && o != i {
            return Err(BatchError::OutputInsideInput(paths.output.clone()));
        }
        if q.starts_with(&o) {
            return Err(BatchError::QuarantineInsideOutput(paths.output.clone()));
        }
    }
    let swept = sweep_temporaries(&paths.output).map_err(write_err("output", &paths.output))?
        + sweep_temporaries(&paths.quarantine)
            .map_err(write_err("quarantine", &paths.quarantine))?;
    if swept > 0 {
        tracing::info!(
            files = swept,
            "removed temporary files of an interrupted run"
        );
    }
    let run = catalog.start_run(
        &utc_now(),
        settings.mode,
        settings.edition,
        &settings.options,
    )?;
    let profile = RunProfile {
        id: run,
        edition: settings.edition,
        options: &settings.options,
    };
    let keys = deid.keys();

    // Phase one: find inputs, hash them (in parallel), set aside what is already recorded.
    let mut summary = Summary::default();
    let found: Vec<Found> = list_inputs(&paths.input)?
        .into_iter()
        .filter(|p| !crate::volume::deid::is_companion(p))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|path| {
            let rel = path.strip_prefix(&paths.input).unwrap_or(&path);
            let path_key = keys.path_marker(&rel.to_string_lossy());
            let (sha256, size, stamp) =
                hash_file_stamped(&path).unwrap_or_else(|_| ("unreadable".to_owned(), 0, None));
            Found {
                path,
                path_key,
                content_hash: keys.input_marker(&sha256),
                sha256,
                size,
                stamp,
            }
        })
        .collect();
    let mut todo = Vec::new();
    for f in found {
        summary.inputs += 1;
        if let Some((outcome, reason)) = catalog.recorded(&f.path_key, &f.content_hash)? {
            summary.done_before += 1;
            summary.count(outcome, reason.as_deref());
            continue;
        }
        todo.push(f);
    }
    settings
        .progress
        .start(summary.inputs as u64, summary.done_before as u64);
    // Within a run, the smallest keyed input marker wins a UID conflict: process in its order.
    todo.sort_by(|a, b| {
        a.content_hash
            .cmp(&b.content_hash)
            .then(a.path.cmp(&b.path))
    });

    let mut written_this_run: HashMap<String, String> = HashMap::new();
    let mut output_hashes: HashSet<String> = HashSet::new();
    let mut vaulted: HashMap<String, vault::OriginalIdentity> = HashMap::new();
    let batch_size = settings.batch_size.max(1);
    let chunks = batches(&todo, batch_size, MAX_BATCH_BYTES);
    let prepare_all = |chunk: &[Found]| -> Vec<Prepared> {
        chunk
            .par_iter()
            .map(|f| prepare(deid, f, &paths.input, settings.subjects))
            .collect()
    };
    // De-identification in parallel; outcomes, conflicts and writes in hash order. While a
    // batch's files are written, flushed and recorded, the next batch is de-identified (pure
    // work, nothing written): at most two batches are in memory.
    let mut next = chunks.first().map(|c| prepare_all(c));
    for (i, chunk) in chunks.iter().enumerate() {
        let prepared = next.take().unwrap_or_default();
        let mut pending = Pending::default();
        for (found, prepared) in chunk.iter().zip(prepared) {
            let record = step(
                paths,
                catalog,
                settings,
                found,
                prepared,
                &mut pending,
                &mut written_this_run,
                &mut output_hashes,
                &mut vaulted,
                &mut summary,
            )?;
            summary.count(record.outcome, record.reason.as_deref());
            pending.records.inputs.push(record);
        }
        let catalog = &mut *catalog;
        let profile = &profile;
        let committed = std::thread::scope(|scope| {
            let commit = scope.spawn(move || -> Result<(), BatchError> {
                pending
                    .files
                    .commit()
                    .map_err(write_err("output", &paths.output))?;
                catalog.commit_batch(profile, &pending.records)?;
                Ok(())
            });
            next = chunks.get(i + 1).map(|c| prepare_all(c));
            commit.join().unwrap_or_else(|_| {
                Err(BatchError::Write {
                    what: "output",
                    path: paths.output.clone(),
                    source: io::Error::other("the batch's commit thread panicked"),
                })
            })
        });
        committed?;
        settings.progress.advance(chunk.len() as u64);
    }
    settings.progress.finish();
    summary.elapsed = started.elapsed();
    summary.peak_rss = peak_rss();
    let audit = AuditRecord::now(
        "run",
        serde_json::json!({
            "run": run,
            "mode": settings.mode,
            "edition": settings.edition,
            "options": settings.options,
            "inputs": summary.inputs,
            "done_before": summary.done_before,
            "written": summary.written,
            "duplicates": summary.duplicates,
            "own_outputs": summary.own_outputs,
            "quarantined": summary.quarantined_total(),
        }),
    );
    catalog.commit_batch(
        &profile,
        &BatchRecords {
            audit: vec![audit],
            ..BatchRecords::default()
        },
    )?;
    catalog.finish_run(run, &utc_now())?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn step(
    paths: &BatchPaths,
    catalog: &Catalog,
    settings: &RunSettings<'_>,
    found: &Found,
    prepared: Prepared,
    pending: &mut Pending,
    written_this_run: &mut HashMap<String, String>,
    output_hashes: &mut HashSet<String>,
    vaulted: &mut HashMap<String, vault::OriginalIdentity>,
    summary: &mut Summary,
) -> Result<InputRecord, BatchError> {
    let mut record = InputRecord {
        path_key: found.path_key.clone(),
        content_hash: found.content_hash.clone(),
        outcome: RecordedOutcome::Quarantined,
        reason: None,
        output_path: None,
        output_hash: None,
        patient: None,
        study: None,
        series: None,
        instance: None,
    };
    let short = found
        .content_hash
        .get(..16)
        .unwrap_or(&found.content_hash)
        .to_owned();
    let (input, result) = match prepared {
        Prepared::Read { input, result } => (input, result),
        // Unreadable, or changed since it was hashed: recorded as such; the next run sees the
        // new content as a new input.
        Prepared::Unreadable => {
            tracing::warn!(input = %short, "input could not be read, or changed while the run was going on");
            record.reason = Some("unreadable-file".into());
            return Ok(record);
        }
    };
    summary.bytes_in += input.len();
    if output_hashes.contains(&found.sha256) || catalog.is_own_output(&found.sha256)? {
        tracing::debug!(input = %short, "own output: not de-identified again");
        record.outcome = RecordedOutcome::OwnOutput;
        return Ok(record);
    }
    let quarantine =
        |reason: String, detail: String, pending: &mut Pending| -> Result<(), BatchError> {
            let q = &paths.quarantine;
            input
                .stage(
                    &mut pending.files,
                    &q.join(format!("{}.dcm", found.content_hash)),
                )
                .map_err(write_err("quarantine", q))?;
            tracing::warn!(input = %short, reason = %reason, "quarantined");
            pending.records.quarantine.push(QuarantineEntry {
                id: found.content_hash.clone(),
                reason,
                detail,
                quarantined_at: utc_now(),
                released_at: None,
            });
            Ok(())
        };
    let (out, encoded, out_hash) = match *result {
        Ok(x) => x,
        Err((reason, detail)) => {
            quarantine(reason.clone(), detail, pending)?;
            record.reason = Some(reason);
            return Ok(record);
        }
    };
    let rel = out.rel.clone();
    record.patient = Some(out.patient.to_string());
    record.study = out.study.clone();
    record.series = out.series.clone();
    record.instance = Some(out.instance.clone());
    let existing = match written_this_run.get(&rel) {
        Some(h) => Some(h.clone()),
        None => catalog.output_hash_at(&rel)?,
    };
    match existing {
        Some(h) if h == out_hash => {
            tracing::debug!(input = %short, "duplicate of an input already written");
            record.outcome = RecordedOutcome::Duplicate;
            record.output_path = Some(rel);
            record.output_hash = Some(out_hash);
        }
        Some(_)
            if same_instance_other_encoding(
                match pending.files.staged_content(&paths.output.join(&rel)) {
                    Some(staged) => staged.ok(),
                    None => fs::read(paths.output.join(&rel)).ok(),
                },
                &encoded,
            ) =>
        {
            tracing::debug!(input = %short, "the same instance in another encoding");
            record.outcome = RecordedOutcome::Duplicate;
            record.reason = Some("other-encoding".into());
            record.output_path = Some(rel);
            record.output_hash = existing;
        }
        Some(_) => {
            let reason = "uid-conflict".to_owned();
            quarantine(
                reason.clone(),
                "another input with the same SOP Instance UID and different content was recorded first".into(),
                pending,
            )?;
            record.reason = Some(reason);
        }
        None => {
            encoded
                .stage(&mut pending.files, &paths.output.join(&rel))
                .map_err(write_err("output", &paths.output))?;
            if let Some(key) = settings.vault_key {
                let p = out.patient.to_string();
                let known = match vaulted.get(&p) {
                    Some(k) => Some(k.clone()),
                    None => match catalog.vault_entry(&p)? {
                        Some((n, c)) => Some(vault::open(key, &p, &n, &c)?),
                        None => None,
                    },
                };
                let merged = vault::merge(known.as_ref(), &out.original);
                if known.as_ref() != Some(&merged) {
                    let (nonce, ct) = vault::seal(key, &p, &merged)?;
                    pending.records.vault.push((p.clone(), nonce, ct));
                }
                vaulted.insert(p, merged);
            }
            tracing::debug!(input = %short, patient = %out.patient, "de-identified");
            summary.patients.insert(out.patient.clone());
            written_this_run.insert(rel.clone(), out_hash.clone());
            output_hashes.insert(out_hash.clone());
            record.outcome = RecordedOutcome::Written;
            record.reason = out.finding.map(str::to_owned);
            record.output_path = Some(rel);
            record.output_hash = Some(out_hash);
        }
    }
    Ok(record)
}

/// Decoded pixel data may exceed the encoded bytes by at most this factor, plus a fixed
/// allowance, before it is decoded to compare two encodings.
const DECODE_RATIO: u64 = 64;
const DECODE_ALLOWANCE: u64 = 64 * 1024 * 1024;

/// Whether an output already written (at `earlier`) and a new one are the same instance in
/// two encodings: same UIDs (they share an output path, which is derived from them) and
/// identical decoded pixels (e.g. an archive keeping a compressed and an uncompressed copy).
fn same_instance_other_encoding(earlier: Option<Vec<u8>>, new: &Output) -> bool {
    let Output::Bytes(new) = new else {
        return false;
    };
    let Some(old) = earlier else {
        return false;
    };
    match (decoded_pixels(&old), decoded_pixels(new)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// The decoded pixel data of an encoded object with its geometry, when its declared decoded
/// size is backed by the bytes it holds.
fn decoded_pixels(bytes: &[u8]) -> Option<(u32, u32, u32, u16, Vec<u8>)> {
    use dicom_pixeldata::PixelDecoder;
    let obj = crate::read::read_object(bytes).ok()?;
    let number = |t: dicom_core::Tag| -> Option<u64> {
        let e = obj.get(t)?;
        e.value()
            .to_int::<u64>()
            .ok()
            .or_else(|| e.value().to_str().ok()?.trim().parse().ok())
    };
    let declared = [
        number(dicom_core::Tag(0x0028, 0x0010))?,
        number(dicom_core::Tag(0x0028, 0x0011))?,
        number(dicom_core::Tag(0x0028, 0x0002)).unwrap_or(1),
        number(dicom_core::Tag(0x0028, 0x0100))?.div_ceil(8),
        number(dicom_core::Tag(0x0028, 0x0008)).unwrap_or(1).max(1),
    ]
    .into_iter()
    .try_fold(1u64, u64::checked_mul)?;
    if declared > (bytes.len() as u64).saturating_mul(DECODE_RATIO) + DECODE_ALLOWANCE {
        return None;
    }
    let d = obj.decode_pixel_data().ok()?;
    Some((
        d.rows(),
        d.columns(),
        d.number_of_frames(),
        d.bits_allocated(),
        d.data().to_vec(),
    ))
}

/// Retry a quarantined original with the current configuration; on success its output is
/// written, the catalog updated, the original removed from quarantine. Returns the new
/// output's relative path, or the reason it still fails.
pub fn release(
    id: &str,
    paths: &BatchPaths,
    deid: &Deidentifier<'_>,
    catalog: &mut Catalog,
    vault_key: Option<&VaultKey>,
) -> Result<Result<String, String>, BatchError> {
    let entries = catalog.quarantine_entries(false)?;
    let matches: Vec<&QuarantineEntry> = entries.iter().filter(|e| e.id.starts_with(id)).collect();
    let entry = match matches.as_slice() {
        [one] => *one,
        [] => {
            return Ok(Err(format!(
                "no quarantined input with id {id}; see `fedcurate-node quarantine list`"
            )));
        }
        _ => return Ok(Err(format!("id {id} is ambiguous; give more characters"))),
    };
    let original = paths.quarantine.join(format!("{}.dcm", entry.id));
    let bytes = fs::read(&original).map_err(write_err("quarantine", &paths.quarantine))?;
    let (out, encoded) = match deidentify_bytes(deid, &bytes) {
        Ok(x) => x,
        Err((reason, _)) => return Ok(Err(format!("still refused: {reason}"))),
    };
    let rel = out.relative_path().to_string_lossy().into_owned();
    let out_hash = content_hash(&encoded);
    if let Some(h) = catalog.output_hash_at(&rel)?
        && h != out_hash
    {
        {
            return Ok(Err("still refused: uid-conflict (another instance with this SOP Instance UID is in the output)".into()));
        }
    }
    write_atomically(&paths.output.join(&rel), &encoded)
        .map_err(write_err("output", &paths.output))?;
    let mut sealed = Vec::new();
    if let Some(key) = vault_key {
        let p = out.patient.to_string();
        if catalog.vault_entry(&p)?.is_none() {
            let (n, c) = vault::seal(key, &p, &out.original)?;
            sealed.push((p, n, c));
        }
    }
    let record = InputRecord {
        path_key: String::new(),
        content_hash: entry.id.clone(),
        outcome: RecordedOutcome::Written,
        reason: out.input_finding.map(str::to_owned),
        output_path: Some(rel.clone()),
        output_hash: Some(out_hash),
        patient: Some(out.patient.to_string()),
        study: Some(out.study_token),
        series: Some(out.series_token),
        instance: Some(out.instance_token),
    };
    let audit = AuditRecord::now(
        "quarantine-release",
        serde_json::json!({ "input": entry.id, "reason_was": entry.reason, "patient": out.patient.to_string() }),
    );
    catalog.release(&entry.id, &utc_now(), &record, &sealed, &audit)?;
    fs::remove_file(&original).map_err(write_err("quarantine", &paths.quarantine))?;
    Ok(Ok(rel))
}

/// Peak resident memory of this process (VmHWM), in bytes (Linux).
pub fn peak_rss() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
