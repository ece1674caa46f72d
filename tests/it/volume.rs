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
