//! `fedcurate-node bench`: de-identification throughput against a read-and-write-back
//! baseline, measured in the same run on the same generated archive, with the same batching,
//! parallelism and fsync policy. Not a test and not run in CI.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use node::batch::{self, BatchPaths, DurableBatch, NoProgress, RunSettings};
use node::catalog::Catalog;
use node::deid::keys::{Keys, Secret};
use node::deid::table::{DeidOption, EDITION};
use node::deid::{DeidPolicy, Deidentifier};
use node::sample::{self, ts};
use node::vault::VaultKey;
use rayon::prelude::*;

/// One measured phase.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: &'static str,
    pub files: usize,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Peak resident memory during the phase, in bytes (Linux `VmHWM`), if known.
    pub peak_rss: Option<u64>,
}

impl Phase {
    pub fn files_per_s(&self) -> f64 {
        self.files as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Reset the kernel's peak-RSS counter for this process (Linux); harmless elsewhere.
fn reset_peak() {
    let _ = fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since the last reset, from `/proc/self/status`.
pub(crate) use node::batch::peak_rss;

/// Generate `files` 512×512 16-bit CT slices (100 per series) under `dir`.
pub fn generate(dir: &Path, files: usize) -> io::Result<Vec<PathBuf>> {
    let per_series = 100usize;
    let mut out = Vec::with_capacity(files);
    let patients = files.div_ceil(per_series);
    let work: Vec<(usize, usize)> = (0..patients)
        .flat_map(|p| (0..per_series).map(move |i| (p, i)))
        .take(files)
        .collect();
    let written: Vec<io::Result<PathBuf>> = work
        .par_iter()
        .map(|&(pi, i)| {
            let p = sample::Patient {
                id: format!("BENCH-{pi:05}"),
                issuer: "HOSP-BENCH".into(),
                name: format!("Bench^Patient{pi}"),
                birth_date: "19600101".into(),
                sex: "F".into(),
                charset: None,
            };
            let st = sample::Study {
                uid: format!("{}.7.{pi}", sample::ORIGINAL_UID_ROOT),
                date: "20240101".into(),
                time: "080000".into(),
                accession: format!("BA{pi:06}"),
                description: "CT CHEST WITH CONTRAST".into(),
                referring_physician: "Ref^Bench".into(),
                institution: "Bench Hospital".into(),
            };
            let se = sample::Series {
                uid: format!("{}.1", st.uid),
                number: 1,
                description: "Thorax 1mm".into(),
                frame_of_reference: format!("{}.1.0", st.uid),
                station: "CTBENCH".into(),
            };
            let obj = sample::ct_slice_sized(&p, &st, &se, (i + 1) as u16, 512, 512);
            let path = dir.join(format!("p{pi:05}/{i:04}.dcm"));
            if let Some(d) = path.parent() {
                fs::create_dir_all(d)?;
            }
            fs::write(&path, sample::encode(obj, ts::EXPLICIT_LE)?)?;
            Ok(path)
        })
        .collect();
    for w in written {
        out.push(w?);
    }
    Ok(out)
}

/// The baseline: read each file, parse it, encode it again and write it back, in the same
/// batches (parallel within a batch, flushed together) as the de-identifier.
pub fn baseline(files: &[PathBuf], out: &Path, batch_size: usize) -> io::Result<Phase> {
    reset_peak();
    let started = Instant::now();
    let mut bytes_total = 0u64;
    for chunk in files.chunks(batch_size.max(1)) {
        let encoded: Vec<io::Result<(u64, Vec<u8>)>> = chunk
            .par_iter()
            .map(|f| {
                let bytes = fs::read(f)?;
                let obj = dicom_object::OpenFileOptions::new()
                    .from_reader(bytes.as_slice())
                    .map_err(io::Error::other)?;
                let mut buf = Vec::with_capacity(bytes.len());
                obj.write_all(&mut buf).map_err(io::Error::other)?;
                Ok((bytes.len() as u64, buf))
            })
            .collect();
        let mut durable = DurableBatch::default();
        for (i, e) in encoded.into_iter().enumerate() {
            let (n, buf) = e?;
            bytes_total += n;
            let name = chunk[i]
                .strip_prefix(chunk[i].ancestors().nth(2).unwrap_or(Path::new("")))
                .unwrap_or(&chunk[i]);
            durable.stage(&out.join(name), &buf)?;
        }
        durable.commit()?;
    }
    Ok(Phase {
        name: "baseline: read, parse, write back",
        files: files.len(),
        bytes: bytes_total,
        elapsed: started.elapsed(),
        peak_rss: peak_rss(),
    })
}

/// De-identification with every option (Modified Dates rather than Full Dates: the two
/// exclude each other), the re-identification map and the catalog.
pub fn deidentify(
    input: &Path,
    work: &Path,
    batch_size: usize,
) -> Result<Phase, Box<dyn std::error::Error>> {
    let mut policy = DeidPolicy::default();
    policy.options.extend(
        DeidOption::ALL
            .into_iter()
            .filter(|o| *o != DeidOption::RetainLongitudinalFullDates),
    );
    policy.descriptor_allow_list = vec!["CT CHEST WITH CONTRAST".into()];
    policy.validate()?;
    let keys = Keys::derive(&Secret::random()?);
    let vault_key = VaultKey::from_hex(&Secret::random()?.to_hex())?;
    fs::create_dir_all(work)?;
    let mut catalog = Catalog::open(&work.join("catalog.sqlite"))?;
    let paths = BatchPaths {
        input: input.to_owned(),
        output: work.join("deid"),
        quarantine: work.join("quarantine"),
    };
    let options = policy
        .options
        .iter()
        .map(|o| o.config_name())
        .collect::<Vec<_>>()
        .join(",");
    let settings = RunSettings {
        mode: "pseudonymise",
        edition: EDITION,
        options,
        vault_key: Some(&vault_key),
        batch_size,
        progress: &NoProgress,
        subjects: &node::volume::deid::SubjectRule::default(),
    };
    reset_peak();
    let deid = Deidentifier::new(&policy, &keys);
    let summary = batch::deidentify_folder(&paths, &deid, &mut catalog, &settings)?;
    if summary.written != summary.inputs {
        return Err(format!(
            "bench archive: only {} of {} inputs written",
            summary.written, summary.inputs
        )
        .into());
    }
    Ok(Phase {
        name: "de-identify: every option, catalog, map",
        files: summary.inputs,
        bytes: summary.bytes_in,
        elapsed: summary.elapsed,
        peak_rss: peak_rss(),
    })
}

/// Timings of the volume benchmark.
#[derive(Clone, Debug)]
pub struct VolumeBench {
    pub slices: usize,
    pub voxel_bytes: u64,
    pub read: Duration,
    pub assemble: Duration,
    pub write_nii: Duration,
    pub write_nii_gz: Duration,
    pub nii_gz_bytes: u64,
}

/// Generate one 512×512 CT series of `slices` slices, then time: reading and parsing the
/// files alone; reading, parsing and assembling the volume; writing it as `.nii`; and as
/// `.nii.gz`.
pub fn volume(dir: &Path, slices: usize) -> Result<VolumeBench, Box<dyn std::error::Error>> {
    let files = generate_series(&dir.join("series"), slices)?;
    let read_all = || -> io::Result<Vec<dicom_object::DefaultDicomObject>> {
        files
            .par_iter()
            .map(|f| {
                let bytes = fs::read(f)?;
                dicom_object::OpenFileOptions::new()
                    .from_reader(bytes.as_slice())
                    .map_err(io::Error::other)
            })
            .collect()
    };
    let t = Instant::now();
    let objects = read_all()?;
    let read = t.elapsed();
    drop(objects);
    let t = Instant::now();
    let objects = read_all()?;
    let vols = node::volume::series::assemble(&objects);
    let assemble = t.elapsed();
    let vol = vols
        .first()
        .and_then(|v| v.volume.as_ref())
        .ok_or("the benchmark series did not assemble")?;
    let t = Instant::now();
    let nii = node::volume::nifti::encode(vol);
    batch::write_atomically(&dir.join("v.nii"), &nii)?;
    let write_nii = t.elapsed();
    let t = Instant::now();
    let gz = node::volume::nifti::gzip(&nii, 1)?;
    batch::write_atomically(&dir.join("v.nii.gz"), &gz)?;
    let write_nii_gz = t.elapsed();
    Ok(VolumeBench {
        slices,
        voxel_bytes: (512 * 512 * 2 * slices) as u64,
        read,
        assemble,
        write_nii,
        write_nii_gz,
        nii_gz_bytes: gz.len() as u64,
    })
}

pub(crate) fn generate_series(dir: &Path, slices: usize) -> io::Result<Vec<PathBuf>> {
    let p = sample::Patient {
        id: "VB".into(),
        issuer: String::new(),
        name: "Volume^Bench".into(),
        birth_date: "19600101".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: format!("{}.7.9", sample::ORIGINAL_UID_ROOT),
        date: "20240101".into(),
        time: "080000".into(),
        accession: "VB".into(),
        description: "vb".into(),
        referring_physician: "R^B".into(),
        institution: "B".into(),
    };
    let se = sample::Series {
        uid: format!("{}.1", st.uid),
        number: 1,
        description: "vb".into(),
        frame_of_reference: format!("{}.1.0", st.uid),
        station: "B".into(),
    };
    fs::create_dir_all(dir)?;
    (0..slices)
        .into_par_iter()
        .map(|i| {
            let obj = sample::ct_slice_sized(&p, &st, &se, (i + 1) as u16, 512, 512);
            let path = dir.join(format!("{i:04}.dcm"));
            fs::write(&path, sample::encode(obj, ts::EXPLICIT_LE)?)?;
            Ok(path)
        })
        .collect()
}

/// One harmonisation timing.
#[derive(Clone, Debug)]
pub struct MethodTiming {
    pub name: String,
    /// Applied to a volume the caller hands over, rewritten in place (what `harmonise` does).
    pub elapsed: Duration,
    /// Applied to a borrowed volume, writing a new one.
    pub fresh: Duration,
}

/// A synthetic brain-like float32 volume of `n`³ voxels: a sphere of three tissue shells
/// with deterministic noise (the same construction as the reference tests, scaled up).
pub fn synthetic_volume(n: usize, scale: f64, seed: u64) -> node::volume::Volume {
    use ndarray::{Array4, ShapeBuilder};
    let mut data = Array4::<f32>::zeros((n, n, n, 1).f());
    let c = (n as f64 - 1.0) / 2.0;
    let r = n as f64 * 0.45;
    let mut state = seed;
    for k in 0..n {
        for j in 0..n {
            for i in 0..n {
                let r2 = (i as f64 - c).powi(2) + (j as f64 - c).powi(2) + (k as f64 - c).powi(2);
                if r2 >= r * r {
                    continue;
                }
                let base = if r2 < (r * 0.43).powi(2) {
                    900.0
                } else if r2 < (r * 0.71).powi(2) {
                    600.0
                } else {
                    300.0
                };
                let mut noise = 0.0;
                for _ in 0..2 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    noise += ((state >> 33) % 1001) as f64 / 10.0 - 50.0;
                }
                data[[i, j, k, 0]] = ((base + noise) * scale) as f32;
            }
        }
    }
    node::volume::Volume {
        data,
        affine: node::volume::diagonal([1.0, 1.0, 1.0]),
        stored: node::volume::StoredType::F32,
    }
}

/// Time every method on an `n`³ float32 volume, and a read-and-write pass of the same
/// volume as NIfTI as the memory-bound baseline.
pub fn harmonise(
    dir: &Path,
    n: usize,
) -> Result<(Duration, Vec<MethodTiming>), Box<dyn std::error::Error>> {
    use node::harmonise::stats::Contrast;
    use node::harmonise::{
        self as h, Discretisation, Fitted, Foreground, Method, Model, WindowFunction,
    };
    fs::create_dir_all(dir)?;
    let vols: Vec<node::volume::Volume> = [(1.0, 1u64), (1.2, 2), (0.9, 3)]
        .iter()
        .map(|(s, seed)| synthetic_volume(n, *s, *seed))
        .collect();
    let path = dir.join("v.nii");
    fs::write(&path, node::volume::nifti::encode(&vols[0]))?;
    let t = Instant::now();
    let (_, v) = node::volume::nifti::read(&path)?;
    fs::write(dir.join("copy.nii"), node::volume::nifti::encode(&v))?;
    let baseline = t.elapsed();
    let rule = Foreground::Positive;
    let per = |m: Method| Model {
        version: h::MODEL_VERSION,
        method: m,
        fitted: Fitted::None,
    };
    let mut out = Vec::new();
    // The best of three runs (the machine's noise only ever adds time). A run in place gets a
    // copy of the volume made before its clock starts, as `harmonise` hands over what it read.
    fn best(
        mut f: impl FnMut() -> Result<Duration, h::HarmoniseError>,
    ) -> Result<Duration, h::HarmoniseError> {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            best = best.min(f()?);
        }
        Ok(best)
    }
    let v0 = &vols[0];
    for (name, m) in [
        ("z-score", Method::ZScore),
        ("min-max", Method::MinMax),
        (
            "percentile 1-99",
            Method::Percentile {
                low: 1.0,
                high: 99.0,
            },
        ),
        (
            "mu+-3sigma (pyradiomics)",
            Method::MuSigmaPyradiomics { n: 3.0 },
        ),
        (
            "KDE (T1)",
            Method::Kde {
                contrast: Contrast::T1,
            },
        ),
        (
            "WhiteStripe (T1)",
            Method::WhiteStripe {
                contrast: Contrast::T1,
                width: 0.05,
            },
        ),
        ("FCM", Method::Fcm),
        (
            "CT window",
            Method::CtWindow {
                center: 40.0,
                width: 400.0,
                function: WindowFunction::Linear,
            },
        ),
        (
            "IBSI FBN 32",
            Method::Discretise(Discretisation::FixedBinNumber { bins: 32 }),
        ),
    ] {
        let model = per(m);
        let elapsed = best(|| {
            let owned = v0.clone();
            let t = Instant::now();
            h::apply_owned(&model, owned, &rule)?;
            Ok(t.elapsed())
        })?;
        let fresh = best(|| {
            let t = Instant::now();
            h::apply(&model, v0, &rule)?;
            Ok(t.elapsed())
        })?;
        out.push(MethodTiming {
            name: name.to_owned(),
            elapsed,
            fresh,
        });
    }
    for (name, method, target) in [
        ("Nyul fit on 3 + apply", Method::Nyul, 0),
        ("LSQ fit + apply", Method::Lsq, 1),
    ] {
        let run = |owned: Option<node::volume::Volume>| {
            let t = Instant::now();
            let model = h::fit(&method, &vols, &rule)?;
            match owned {
                Some(v) => h::apply_owned(&model, v, &rule)?,
                None => h::apply(&model, &vols[target], &rule)?,
            };
            Ok(t.elapsed())
        };
        let elapsed = best(|| run(Some(vols[target].clone())))?;
        let fresh = best(|| run(None))?;
        out.push(MethodTiming {
            name: name.to_owned(),
            elapsed,
            fresh,
        });
    }
    Ok((baseline, out))
}

/// Curation throughput: header-only conformance checks, then the full curation (pixels,
/// duplicates, volumes, quality), over `patients` × `slices` generated 128×128 CT instances.
pub fn curate(
    dir: &Path,
    patients: usize,
    slices: u16,
) -> Result<(usize, Duration, Duration), Box<dyn std::error::Error>> {
    let folder = dir.join("in");
    let mut files = Vec::new();
    for pi in 0..patients {
        let p = sample::Patient {
            id: format!("CB-{pi}"),
            issuer: String::new(),
            name: "Curate^Bench".into(),
            birth_date: "19600101".into(),
            sex: "F".into(),
            charset: None,
        };
        let st = sample::Study {
            uid: format!("{}.6.{pi}", sample::ORIGINAL_UID_ROOT),
            date: "20240101".into(),
            time: "080000".into(),
            accession: "CB".into(),
            description: "cb".into(),
            referring_physician: "R^B".into(),
            institution: "B".into(),
        };
        let se = sample::Series {
            uid: format!("{}.1", st.uid),
            number: 1,
            description: "cb".into(),
            frame_of_reference: format!("{}.1.0", st.uid),
            station: "B".into(),
        };
        let written: Vec<io::Result<PathBuf>> = (1..=slices)
            .into_par_iter()
            .map(|i| {
                let path = folder.join(format!("p{pi:04}/{i:04}.dcm"));
                if let Some(d) = path.parent() {
                    fs::create_dir_all(d)?;
                }
                fs::write(
                    &path,
                    sample::encode(
                        sample::ct_slice_sized(&p, &st, &se, i, 128, 128),
                        ts::EXPLICIT_LE,
                    )?,
                )?;
                Ok(path)
            })
            .collect();
        for w in written {
            files.push(w?);
        }
    }
    let iods = node::deid::iod::IodTables::standard();
    let dict = node::deid::dictionary::Dictionary::standard();
    let t = Instant::now();
    let findings: usize = files
        .par_iter()
        .map(|f| {
            let obj = dicom_object::OpenFileOptions::new()
                .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
                .open_file(f);
            obj.map(|o| node::curate::conformance::check(&o, true, iods, dict).len())
                .unwrap_or(0)
        })
        .sum();
    let header = t.elapsed();
    let _ = findings;
    let t = Instant::now();
    node::curate::report::curate(
        &folder,
        None,
        Vec::new(),
        &node::deid::keys::Tokens::ephemeral(),
    )?;
    let full = t.elapsed();
    Ok((files.len(), header, full))
}
