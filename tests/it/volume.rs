//! Series assembly: analytic geometry for axial-rotated, tilted and multi-frame series,
//! slice sorting by position, rescale, and geometry findings.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use node::sample;
use node::volume::series::{SeriesFinding, assemble};

fn patient() -> (sample::Patient, sample::Study, sample::Series) {
    (
        sample::Patient {
            id: "VOL-1".into(),
            issuer: String::new(),
            name: "Vol^Pat".into(),
            birth_date: "19700101".into(),
            sex: "F".into(),
            charset: None,
        },
        sample::Study {
            uid: format!("{}.2.1", sample::ORIGINAL_UID_ROOT),
            date: "20240101".into(),
            time: "000000".into(),
            accession: "V1".into(),
            description: "vol".into(),
            referring_physician: "R^V".into(),
            institution: "I".into(),
        },
        sample::Series {
            uid: format!("{}.2.1.1", sample::ORIGINAL_UID_ROOT),
            number: 1,
            description: "vol".into(),
            frame_of_reference: format!("{}.2.1.1.0", sample::ORIGINAL_UID_ROOT),
            station: "S".into(),
        },
    )
}

fn ds(values: &[f64]) -> PrimitiveValue {
    PrimitiveValue::from(
        values
            .iter()
            .map(|v| format!("{v:.6}"))
            .collect::<Vec<_>>()
            .join("\\"),
    )
}

fn reopen(o: InMemDicomObject, ts: &str) -> DefaultDicomObject {
    let bytes = sample::encode(o, ts).expect("encode");
    OpenFileOptions::new()
        .from_reader(bytes.as_slice())
        .expect("open")
}

/// Slices with rows along `c`, columns along `r`, positions `origin + k * step`.
fn series(
    r: [f64; 3],
    c: [f64; 3],
    step: [f64; 3],
    n: u16,
    skip: &[u16],
) -> Vec<DefaultDicomObject> {
    let (p, st, se) = patient();
    let origin = [-100.0, 50.0, 20.0];
    let mut out = Vec::new();
    // Reverse order on purpose: assembly must sort by position, not by file order.
    for k in (0..n).rev() {
        if skip.contains(&k) {
            continue;
        }
        let mut o = sample::ct_slice(&p, &st, &se, k + 1);
        let pos = [
            origin[0] + f64::from(k) * step[0],
            origin[1] + f64::from(k) * step[1],
            origin[2] + f64::from(k) * step[2],
        ];
        o.put(DataElement::new(Tag(0x0020, 0x0032), VR::DS, ds(&pos)));
        o.put(DataElement::new(
            Tag(0x0020, 0x0037),
            VR::DS,
            ds(&[r[0], r[1], r[2], c[0], c[1], c[2]]),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x0030),
            VR::DS,
            ds(&[0.5, 0.7]),
        ));
        o.put(DataElement::new(
            Tag(0x0020, 0x0013),
            VR::IS,
            PrimitiveValue::from((n - k).to_string()),
        ));
        out.push(reopen(o, sample::ts::EXPLICIT_LE));
    }
    out
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

#[test]
fn an_oblique_series_has_its_analytic_affine_and_values() {
    let t = 0.4f64;
    let r = [t.cos(), t.sin(), 0.0];
    let c = [-t.sin() * 0.8, t.cos() * 0.8, 0.6];
    let n = cross(r, c);
    let objects = series(r, c, [n[0] * 2.5, n[1] * 2.5, n[2] * 2.5], 6, &[]);
    let vols = assemble(&objects);
    assert_eq!(vols.len(), 1);
    let v = vols[0].volume.as_ref().expect("volume");
    assert!(vols[0].findings.is_empty(), "{:?}", vols[0].findings);
    assert_eq!(v.shape(), (8, 8, 6));
    let spacing = v.spacing();
    assert!(
        (spacing[0] - 0.7).abs() < 1e-6
            && (spacing[1] - 0.5).abs() < 1e-6
            && (spacing[2] - 2.5).abs() < 1e-4,
        "{spacing:?}"
    );
    for (i, j, k) in [
        (0.0, 0.0, 0.0),
        (7.0, 0.0, 0.0),
        (3.0, 5.0, 4.0),
        (7.0, 7.0, 5.0),
    ] {
        let lps = [
            -100.0 + i * 0.7 * r[0] + j * 0.5 * c[0] + k * 2.5 * n[0],
            50.0 + i * 0.7 * r[1] + j * 0.5 * c[1] + k * 2.5 * n[1],
            20.0 + i * 0.7 * r[2] + j * 0.5 * c[2] + k * 2.5 * n[2],
        ];
        let w = v.world(i, j, k);
        let expect = [-lps[0], -lps[1], lps[2]];
        for a in 0..3 {
            assert!(
                (w[a] - expect[a]).abs() < 1e-3,
                "voxel ({i},{j},{k}): {w:?} vs {expect:?}"
            );
        }
    }
    // Values: the builder's pixel pattern with the CT rescale (-1024) applied, slice k = index k.
    for k in 0..6usize {
        let seed = (k + 1) as u32;
        for (row, col) in [(0usize, 0usize), (3, 5), (7, 7)] {
            let idx = (row * 8 + col) as u32;
            let raw = (idx * 7 + seed * 131) % 4096;
            assert_eq!(
                v.data[[col, row, k, 0]],
                raw as f32 - 1024.0,
                "slice {k} ({row},{col})"
            );
        }
    }
}

#[test]
fn missing_slices_tilt_and_mixed_sizes_are_findings() {
    let r = [1.0, 0.0, 0.0];
    let c = [0.0, 1.0, 0.0];
    let missing = assemble(&series(r, c, [0.0, 0.0, 2.0], 8, &[3]));
    assert!(
        missing[0]
            .findings
            .contains(&SeriesFinding::MissingSlices { gaps: 1 }),
        "{:?}",
        missing[0].findings
    );
    let tilted = assemble(&series(r, c, [0.0, 0.4, 2.0], 5, &[]));
    let tilt = tilted[0].findings.iter().find_map(|f| match f {
        SeriesFinding::GantryTilt { degrees } => Some(*degrees),
        _ => None,
    });
    let expected = (0.4f64 / 2.0).atan().to_degrees();
    assert!(
        tilt.is_some_and(|d| (d - expected).abs() < 0.01),
        "{tilt:?}"
    );
    let v = tilted[0].volume.as_ref().expect("volume");
    let w = v.world(0.0, 0.0, 4.0);
    assert!(
        (w[1] - (-(50.0 + 1.6))).abs() < 1e-3 && (w[2] - 28.0).abs() < 1e-3,
        "slices follow the tilt: {w:?}"
    );
    let mut objects = series(r, c, [0.0, 0.0, 2.0], 3, &[]);
    let (p, st, se) = patient();
    let mut big = sample::ct_slice_sized(&p, &st, &se, 9, 16, 16);
    big.put(DataElement::new(
        Tag(0x0020, 0x0032),
        VR::DS,
        ds(&[0.0, 0.0, 99.0]),
    ));
    objects.push(reopen(big, sample::ts::EXPLICIT_LE));
    let mixed = assemble(&objects);
    assert_eq!(mixed.len(), 2);
    assert!(
        mixed
            .iter()
            .all(|m| m.findings.contains(&SeriesFinding::MixedSize))
    );
    let dup = assemble(
        &[
            series(r, c, [0.0, 0.0, 2.0], 3, &[]),
            series(r, c, [0.0, 0.0, 2.0], 1, &[]),
        ]
        .concat(),
    );
    assert!(
        dup[0]
            .findings
            .contains(&SeriesFinding::DuplicatePositions { count: 1 }),
        "{:?}",
        dup[0].findings
    );
}

#[test]
fn enhanced_multi_frame_and_big_endian_series_assemble() {
    let (p, st, se) = patient();
    let mf = reopen(
        sample::enhanced_ct(&p, &st, &se, 4),
        sample::ts::EXPLICIT_LE,
    );
    let vols = assemble(&[mf]);
    let v = vols[0].volume.as_ref().expect("volume");
    assert_eq!(v.shape(), (4, 4, 4));
    let s = v.spacing();
    assert!(
        (s[0] - 0.7).abs() < 1e-6 && (s[2] - 1.25).abs() < 1e-6,
        "{s:?}"
    );
    let r = [1.0, 0.0, 0.0];
    let c = [0.0, 1.0, 0.0];
    let (p, st, se) = patient();
    let be: Vec<DefaultDicomObject> = (1..=3u16)
        .map(|k| {
            let mut o = sample::ct_slice(&p, &st, &se, k);
            o.put(DataElement::new(
                Tag(0x0020, 0x0032),
                VR::DS,
                ds(&[0.0, 0.0, f64::from(k) * 3.0]),
            ));
            o.put(DataElement::new(
                Tag(0x0020, 0x0037),
                VR::DS,
                ds(&[r[0], r[1], r[2], c[0], c[1], c[2]]),
            ));
            reopen(o, sample::ts::EXPLICIT_BE)
        })
        .collect();
    let le: Vec<DefaultDicomObject> = be
        .iter()
        .map(|o| {
            let mut buf = Vec::new();
            o.write_all(&mut buf).expect("write");
            let obj = OpenFileOptions::new()
                .from_reader(buf.as_slice())
                .expect("open");
            reopen(obj.into_inner(), sample::ts::EXPLICIT_LE)
        })
        .collect();
    let (vb, vl) = (assemble(&be), assemble(&le));
    assert_eq!(
        vb[0].volume.as_ref().expect("be").data,
        vl[0].volume.as_ref().expect("le").data,
        "big and little endian decode alike"
    );
}

/// The inverse of an affine's 3x3 part applied to a point minus its translation.
fn to_voxel(a: &node::volume::Affine, w: [f64; 3]) -> [f64; 3] {
    let m = [
        [a[0][0], a[0][1], a[0][2]],
        [a[1][0], a[1][1], a[1][2]],
        [a[2][0], a[2][1], a[2][2]],
    ];
    let d = [w[0] - a[0][3], w[1] - a[1][3], w[2] - a[2][3]];
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let inv = |r: usize, c: usize| {
        let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
        let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
        (m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1]) / det
    };
    [
        inv(0, 0) * d[0] + inv(0, 1) * d[1] + inv(0, 2) * d[2],
        inv(1, 0) * d[0] + inv(1, 1) * d[1] + inv(1, 2) * d[2],
        inv(2, 0) * d[0] + inv(2, 1) * d[1] + inv(2, 2) * d[2],
    ]
}

#[test]
fn our_volume_overlays_the_one_dcm2niix_writes() {
    let t = 0.35f64;
    let r = [t.cos(), t.sin(), 0.0];
    let c = [-t.sin() * 0.8, t.cos() * 0.8, 0.6];
    let n = cross(r, c);
    let objects = series(r, c, [n[0] * 2.5, n[1] * 2.5, n[2] * 2.5], 6, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let dicom = dir.path().join("dicom");
    std::fs::create_dir_all(&dicom).expect("dir");
    for (i, o) in objects.iter().enumerate() {
        o.write_to_file(dicom.join(format!("{i}.dcm")))
            .expect("write");
    }
    let out = std::process::Command::new("dcm2niix")
        .args(["-z", "n", "-b", "n", "-f", "ref", "-o"])
        .arg(dir.path())
        .arg(&dicom)
        .output()
        .expect("dcm2niix (Debian package, installed by scripts/test.sh)");
    assert!(
        out.status.success(),
        "dcm2niix: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, theirs) =
        node::volume::nifti::read(&dir.path().join("ref.nii")).expect("dcm2niix output");
    let ours = assemble(&objects).remove(0).volume.expect("volume");
    assert_eq!(
        {
            let mut a = [ours.shape().0, ours.shape().1, ours.shape().2];
            a.sort();
            a
        },
        {
            let mut b = [theirs.shape().0, theirs.shape().1, theirs.shape().2];
            b.sort();
            b
        }
    );
    // Every voxel centre of ours lands on a voxel centre of theirs with the same value.
    let (ni, nj, nk) = ours.shape();
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                let w = ours.world(i as f64, j as f64, k as f64);
                let v = to_voxel(&theirs.affine, w);
                let idx = v.map(|x| x.round());
                for a in 0..3 {
                    assert!(
                        (v[a] - idx[a]).abs() < 1e-2,
                        "voxel ({i},{j},{k}) maps to {v:?}"
                    );
                }
                let their = theirs.data[[idx[0] as usize, idx[1] as usize, idx[2] as usize, 0]];
                assert_eq!(ours.data[[i, j, k, 0]], their, "voxel ({i},{j},{k})");
            }
        }
    }
}

/// A 4D MR series written slice by slice: `volumes` repeats of `slices` positions on an oblique
/// plane; `per_volume` sets what tells the volumes apart (diffusion, temporal position, echo).
fn mr_4d(
    volumes: usize,
    slices: usize,
    per_volume: &dyn Fn(&mut InMemDicomObject, usize),
) -> Vec<DefaultDicomObject> {
    let (p, st, mut se) = patient();
    se.uid = format!("{}.4.1", sample::ORIGINAL_UID_ROOT);
    let t = 0.3f64;
    let r = [t.cos(), t.sin(), 0.0];
    let c = [-t.sin() * 0.6, t.cos() * 0.6, -0.8];
    let n = cross(r, c);
    let mut out = Vec::new();
    for v in 0..volumes {
        for k in 0..slices {
            let index = (v * slices + k + 1) as u16;
            let mut o = sample::mr_slice(&p, &st, &se, index);
            let pos = [
                -60.0 + k as f64 * 3.0 * n[0],
                20.0 + k as f64 * 3.0 * n[1],
                10.0 + k as f64 * 3.0 * n[2],
            ];
            o.put(DataElement::new(Tag(0x0020, 0x0032), VR::DS, ds(&pos)));
            o.put(DataElement::new(
                Tag(0x0020, 0x0037),
                VR::DS,
                ds(&[r[0], r[1], r[2], c[0], c[1], c[2]]),
            ));
            o.put(DataElement::new(
                Tag(0x0020, 0x0012),
                VR::IS,
                PrimitiveValue::from((v + 1).to_string()),
            ));
            per_volume(&mut o, v);
            out.push(reopen(o, sample::ts::EXPLICIT_LE));
        }
    }
    // File order scrambled: assembly sorts.
    out.reverse();
    out
}

/// Run dcm2niix on objects; returns the output folder.
fn dcm2niix(objects: &[DefaultDicomObject], dir: &std::path::Path) -> std::path::PathBuf {
    let dicom = dir.join("dicom");
    std::fs::create_dir_all(&dicom).expect("dir");
    for (i, o) in objects.iter().enumerate() {
        o.write_to_file(dicom.join(format!("{i}.dcm")))
            .expect("write");
    }
    let out = dir.join("ref");
    std::fs::create_dir_all(&out).expect("dir");
    let run = std::process::Command::new("dcm2niix")
        .args(["-z", "n", "-b", "n", "-f", "ref", "-o"])
        .arg(&out)
        .arg(&dicom)
        .output()
        .expect("dcm2niix (Debian package, installed by scripts/test.sh)");
    assert!(
        run.status.success(),
        "dcm2niix: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

/// Every voxel of every volume of ours lands on a voxel of the same volume of theirs, with
/// the same value.
fn overlays(ours: &[node::volume::Volume], theirs: &[node::volume::Volume]) {
    assert_eq!(ours.len(), theirs.len(), "number of volumes");
    for (t, (o, th)) in ours.iter().zip(theirs).enumerate() {
        let (ni, nj, nk) = o.shape();
        for k in 0..nk {
            for j in 0..nj {
                for i in 0..ni {
                    let v = to_voxel(&th.affine, o.world(i as f64, j as f64, k as f64));
                    let idx = v.map(|x| x.round());
                    for a in 0..3 {
                        assert!((v[a] - idx[a]).abs() < 1e-2, "t {t} ({i},{j},{k}) -> {v:?}");
                    }
                    assert_eq!(
                        o.data[[i, j, k, 0]],
                        th.data[[idx[0] as usize, idx[1] as usize, idx[2] as usize, 0]],
                        "t {t} voxel ({i},{j},{k})"
                    );
                }
            }
        }
    }
}

/// A `.bvec` direction back in DICOM patient coordinates (LPS), through the image's affine
/// and FSL's convention.
fn bvec_to_lps(affine: &node::volume::Affine, b: [f64; 3]) -> [f64; 3] {
    let mut r = [[0.0; 3]; 3];
    for col in 0..3 {
        let n = (0..3)
            .map(|row| affine[row][col].powi(2))
            .sum::<f64>()
            .sqrt();
        for row in 0..3 {
            r[row][col] = affine[row][col] / n;
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let v = if det > 0.0 { [-b[0], b[1], b[2]] } else { b };
    let ras: Vec<f64> = (0..3)
        .map(|row| (0..3).map(|col| r[row][col] * v[col]).sum())
        .collect();
    [-ras[0], -ras[1], ras[2]]
}

fn read_fsl(dir: &std::path::Path, stem: &str) -> (Vec<f64>, Vec<[f64; 3]>) {
    let nums = |s: &str| -> Vec<f64> {
        s.split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect()
    };
    let bval = nums(&std::fs::read_to_string(dir.join(format!("{stem}.bval"))).expect("bval"));
    let rows: Vec<Vec<f64>> = std::fs::read_to_string(dir.join(format!("{stem}.bvec")))
        .expect("bvec")
        .lines()
        .map(nums)
        .collect();
    assert_eq!(rows.len(), 3, "three rows");
    let bvec = (0..bval.len())
        .map(|i| [rows[0][i], rows[1][i], rows[2][i]])
        .collect();
    (bval, bvec)
}

#[test]
fn a_diffusion_series_exports_like_dcm2niix_with_fsl_bvals_and_bvecs() {
    // b = 0, then three directions at b = 1000 (one with a negative component).
    let gradients = [
        (0.0, [0.0, 0.0, 0.0]),
        (1000.0, [1.0, 0.0, 0.0]),
        (
            1000.0,
            [
                0.0,
                std::f64::consts::FRAC_1_SQRT_2,
                std::f64::consts::FRAC_1_SQRT_2,
            ],
        ),
        (1000.0, [-0.6, 0.8, 0.0]),
    ];
    let objects = mr_4d(4, 3, &|o, v| {
        let (b, g) = gradients[v];
        o.put(DataElement::new(
            Tag(0x0018, 0x9087),
            VR::FD,
            PrimitiveValue::F64(vec![b].into()),
        ));
        o.put(DataElement::new(
            Tag(0x0018, 0x9089),
            VR::FD,
            PrimitiveValue::F64(g.to_vec().into()),
        ));
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let refdir = dcm2niix(&objects, dir.path());
    let (_, theirs) =
        node::volume::nifti::read_series(&refdir.join("ref.nii")).expect("dcm2niix output");
    let assembled = assemble(&objects);
    assert_eq!(assembled.len(), 1, "one 4D series, not four parts");
    let a = &assembled[0];
    let first = a.volume.clone().expect("volume");
    assert_eq!(a.more.len(), 3);
    assert!(a.findings.is_empty(), "{:?}", a.findings);
    // Ours as written: one 4D NIfTI and FSL text files.
    let ours_path = dir.path().join("ours.nii");
    std::fs::write(
        &ours_path,
        node::volume::nifti::encode_series(&first, &a.more, 1.0),
    )
    .expect("write");
    let (header, ours) = node::volume::nifti::read_series(&ours_path).expect("ours");
    assert_eq!(
        header.dims,
        vec![first.shape().0 as i64, first.shape().1 as i64, 3, 4]
    );
    overlays(&ours, &theirs);
    let (bval, bvec) = node::volume::fsl_text(&first.affine, &a.diffusion);
    std::fs::write(dir.path().join("ours.bval"), bval).expect("bval");
    std::fs::write(dir.path().join("ours.bvec"), bvec).expect("bvec");
    // The export writes the 4D image with its .bval and .bvec beside it.
    let src = dir.path().join("dicom");
    let exported = dir.path().join("export");
    let opts = node::export::ExportOptions {
        compress: Default::default(),
        format: node::export::Format::Nifti,
        dataset_id: 1,
        dataset_name: "dwi".into(),
        seed: 0,
        fractions: [1.0, 0.0, 0.0],
        stratify: node::export::Stratify::None,
        harmonised: None,
        tokens: node::deid::keys::Tokens::ephemeral(),
        labels: None,
    };
    let summary = node::export::export(&src, &exported, &opts, &|_| true).expect("export");
    assert_eq!(summary.volumes, 1);
    let manifest = std::fs::read_to_string(exported.join("manifest.jsonl")).expect("manifest");
    let line: serde_json::Value = serde_json::from_str(manifest.trim()).expect("json");
    assert_eq!(line["volumes"], 4);
    assert_eq!(line["diffusion"], true);
    let file = exported.join(line["file"].as_str().expect("file"));
    let (_, written) = node::volume::nifti::read_series(&file).expect("exported image");
    overlays(&written, &theirs);
    let stem = file
        .to_string_lossy()
        .trim_end_matches(".nii.gz")
        .to_owned();
    let (exp_b, _) = read_fsl(
        std::path::Path::new(&stem).parent().expect("dir"),
        std::path::Path::new(&stem)
            .file_name()
            .expect("name")
            .to_str()
            .expect("utf-8"),
    );
    assert_eq!(exp_b, vec![0.0, 1000.0, 1000.0, 1000.0]);
    let (our_b, our_g) = read_fsl(dir.path(), "ours");
    let (their_b, their_g) = read_fsl(&refdir, "ref");
    assert_eq!(our_b, their_b, "b-values in the same order");
    for (t, (o, th)) in our_g.iter().zip(&their_g).enumerate() {
        // The same direction in the patient's space, through each file's own axes.
        let ol = bvec_to_lps(&first.affine, *o);
        let tl = bvec_to_lps(&theirs[0].affine, *th);
        let dicom = gradients[t].1;
        for a in 0..3 {
            assert!(
                (ol[a] - dicom[a]).abs() < 1e-4,
                "ours t {t}: {ol:?} vs {dicom:?}"
            );
            assert!(
                (tl[a] - dicom[a]).abs() < 1e-3,
                "dcm2niix t {t}: {tl:?} vs {dicom:?}"
            );
        }
    }
}

#[test]
fn fmri_stacks_by_temporal_position_and_echoes_split_like_dcm2niix() {
    // fMRI: five time points of three slices, TR 2 s.
    let objects = mr_4d(5, 3, &|o, v| {
        o.put(DataElement::new(
            Tag(0x0020, 0x0100),
            VR::IS,
            PrimitiveValue::from((v + 1).to_string()),
        ));
        o.put(DataElement::new(
            Tag(0x0018, 0x0080),
            VR::DS,
            PrimitiveValue::from("2000"),
        ));
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let refdir = dcm2niix(&objects, dir.path());
    let (theirs_header, theirs) =
        node::volume::nifti::read_series(&refdir.join("ref.nii")).expect("dcm2niix output");
    let assembled = assemble(&objects);
    assert_eq!(assembled.len(), 1);
    let a = &assembled[0];
    assert_eq!(a.repetition_s, Some(2.0));
    assert!(a.diffusion.is_empty());
    let first = a.volume.clone().expect("volume");
    let mut ours = vec![first];
    ours.extend(a.more.iter().cloned());
    assert_eq!(theirs_header.dims.get(3), Some(&5));
    overlays(&ours, &theirs);

    // Multi-echo: two echoes of two time points each; one 4D file per echo, as dcm2niix
    // writes `_e1` and `_e2`.
    let objects = mr_4d(4, 3, &|o, v| {
        let (echo, time) = (v % 2 + 1, v / 2 + 1);
        o.put(DataElement::new(
            Tag(0x0018, 0x0086),
            VR::IS,
            PrimitiveValue::from(echo.to_string()),
        ));
        o.put(DataElement::new(
            Tag(0x0018, 0x0081),
            VR::DS,
            PrimitiveValue::from(format!("{}", 10 * echo)),
        ));
        o.put(DataElement::new(
            Tag(0x0020, 0x0100),
            VR::IS,
            PrimitiveValue::from(time.to_string()),
        ));
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let refdir = dcm2niix(&objects, dir.path());
    let assembled = assemble(&objects);
    assert_eq!(assembled.len(), 2, "one 4D volume per echo");
    for (e, a) in assembled.iter().enumerate() {
        let (_, theirs) =
            node::volume::nifti::read_series(&refdir.join(format!("ref_e{}.nii", e + 1)))
                .expect("dcm2niix echo output");
        let mut ours = vec![a.volume.clone().expect("volume")];
        ours.extend(a.more.iter().cloned());
        assert_eq!(ours.len(), 2, "two time points per echo");
        overlays(&ours, &theirs);
    }
}
