//! Annotation end to end: agreement and consensus against the references' golden outputs
//! (`tests/golden/annotate-reference.json`, made by `scripts/reference/annotate_reference.py`
//! with statsmodels, krippendorff, SimpleITK and medpy); the formats read and written back by
//! the reference tools (pycocotools, nibabel) for real; and a project on a de-identified
//! archive: three raters, a model's proposal accepted, modified and rejected, agreement,
//! consensus, export, with bad imports refused and every change audited.

use std::collections::BTreeSet;
use std::path::Path;

use ndarray::{Array3, ShapeBuilder};
use node::annotation::{ConsensusMethod, Review};
use node::fc_annotate::agreement::labels::{
    Chance, Level, Weights, cohen_kappa, fleiss_kappa, krippendorff_alpha,
};
use node::fc_annotate::agreement::masks::{MaskAgreement, compare};
use node::fc_annotate::consensus::{majority_vote, multi_label_staple, staple};
use node::fc_annotate::model::{BoundingBox, ClassLabel, Landmark, Level as At, Outline};
use node::fc_annotate::{Content, Grid, LabelMap, Project, Source};
use serde_json::Value;

/// The Python with the annotation references (scripts/test.sh sets it up).
fn reference_python() -> String {
    std::env::var("FEDCURATE_ANNOTATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/annotate-reference.json");
    serde_json::from_slice(&std::fs::read(path).expect("golden file")).expect("golden json")
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + b.abs()),
        "{what}: ours {a}, reference {b}"
    );
}

fn mask_of(indices: &Value, shape: [usize; 3]) -> Array3<bool> {
    let mut m = Array3::from_elem((shape[0], shape[1], shape[2]).f(), false);
    let flat = m.as_slice_memory_order_mut().expect("contiguous");
    for i in indices.as_array().expect("indices") {
        flat[i.as_u64().expect("index") as usize] = true;
    }
    m
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

#[test]
fn label_agreement_matches_statsmodels_and_krippendorff() {
    let g = golden();
    let c = &g["cohen"];
    let (a, b) = (u32s(&c["a"]), u32s(&c["b"]));
    for (w, key) in [
        (Weights::None, "none"),
        (Weights::Linear, "linear"),
        (Weights::Quadratic, "quadratic"),
    ] {
        let ours = cohen_kappa(&a, &b, 4, w).expect("kappa");
        close(ours, c[key].as_f64().expect("ref"), 1e-12, key);
    }
    let counts: Vec<Vec<u32>> = g["fleiss"]["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .map(u32s)
        .collect();
    for (chance, key) in [(Chance::Fleiss, "fleiss"), (Chance::Randolph, "randolph")] {
        let ours = fleiss_kappa(&counts, chance).expect("kappa");
        close(ours, g["fleiss"][key].as_f64().expect("ref"), 1e-12, key);
    }
    let data: Vec<Vec<Option<f64>>> = g["krippendorff"]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(Value::as_f64)
                .collect()
        })
        .collect();
    assert!(
        data.iter().flatten().any(Option::is_none),
        "missing ratings are exercised"
    );
    for (level, key) in [
        (Level::Nominal, "nominal"),
        (Level::Ordinal, "ordinal"),
        (Level::Interval, "interval"),
        (Level::Ratio, "ratio"),
    ] {
        let ours = krippendorff_alpha(&data, level).expect("alpha");
        close(
            ours,
            g["krippendorff"][key].as_f64().expect("ref"),
            1e-9,
            key,
        );
    }
}

#[test]
fn mask_agreement_matches_simpleitk_and_medpy() {
    let g = golden();
    let m = &g["masks"];
    let shape: Vec<usize> = m["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|x| x.as_u64().expect("n") as usize)
        .collect();
    let shape = [shape[0], shape[1], shape[2]];
    let spacing: Vec<f64> = m["spacing"]
        .as_array()
        .expect("spacing")
        .iter()
        .map(|x| x.as_f64().expect("s"))
        .collect();
    let spacing = [spacing[0], spacing[1], spacing[2]];
    let pairs = m["pairs"].as_array().expect("pairs");
    assert!(pairs.len() >= 5);
    for (n, p) in pairs.iter().enumerate() {
        let a = mask_of(&p["a"], shape);
        let b = mask_of(&p["b"], shape);
        let MaskAgreement::Both(o) = compare(a.view(), b.view(), spacing) else {
            panic!("pair {n} has two non-empty masks");
        };
        for (ours, key) in [
            (o.dice, "dice"),
            (o.iou, "iou"),
            (o.hausdorff, "hausdorff"),
            (o.hd95, "hd95"),
            (o.assd, "assd"),
        ] {
            close(
                ours,
                p[key].as_f64().expect("ref"),
                1e-9,
                &format!("pair {n} {key}"),
            );
        }
    }
}

#[test]
fn consensus_matches_simpleitk() {
    let g = golden();
    let c = &g["consensus"];
    let shape = [26, 22, 12];
    let masks: Vec<Vec<bool>> = c["binary"]
        .as_array()
        .expect("binary")
        .iter()
        .map(|m| {
            mask_of(m, shape)
                .as_slice_memory_order()
                .expect("flat")
                .to_vec()
        })
        .collect();
    let views: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
    let s = staple(&views, u32::MAX);
    let reference: Vec<f64> = c["staple_probability"]
        .as_array()
        .expect("probability")
        .iter()
        .map(|x| x.as_f64().expect("p"))
        .collect();
    assert_eq!(s.probability.len(), reference.len());
    for (i, (a, b)) in s.probability.iter().zip(&reference).enumerate() {
        assert!(
            (a - b).abs() < 1e-6,
            "STAPLE voxel {i}: ours {a}, SimpleITK {b}"
        );
    }
    for (key, ours) in [
        ("staple_sensitivity", &s.sensitivity),
        ("staple_specificity", &s.specificity),
    ] {
        for (a, b) in ours.iter().zip(c[key].as_array().expect("rates")) {
            close(*a, b.as_f64().expect("rate"), 1e-6, key);
        }
    }
    let maps: Vec<Vec<u16>> = c["labelmaps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| u32s(m).into_iter().map(|x| x as u16).collect())
        .collect();
    let views: Vec<&[u16]> = maps.iter().map(Vec::as_slice).collect();
    let voting: Vec<u16> = u32s(&c["voting"]).into_iter().map(|x| x as u16).collect();
    assert_eq!(majority_vote(&views, None), voting);
    assert!(voting.contains(&3), "the fixture has undecided voxels");
    let reference: Vec<u16> = u32s(&c["multi_label_staple"])
        .into_iter()
        .map(|x| x as u16)
        .collect();
    let (ours, _) = multi_label_staple(&views, None, 1e-5, None);
    let differ = ours.iter().zip(&reference).filter(|(a, b)| a != b).count();
    assert_eq!(
        differ, 0,
        "multi-label STAPLE differs from SimpleITK on {differ} voxels"
    );
}

/// A small project: lesion (1) and oedema (2), every kind.
fn project(id: &str) -> Project {
    let text = format!(
        r#"id = "{id}"
kinds = ["mask", "label", "box2d", "polygon", "landmark"]
raters_per_case = 3
[cases]
modalities = ["MR"]
[[labels]]
value = 1
name = "lesion"
colour = [230, 60, 40]
[[labels]]
value = 2
name = "oedema"
colour = [60, 120, 230]
"#
    );
    toml::from_str(&text).expect("project")
}

/// A label map: an ellipsoid of lesion inside a larger one of oedema, shifted by `shift`
/// voxels along i.
fn blob(grid: &Grid, shift: f64) -> LabelMap {
    let mut m = LabelMap::empty(grid.clone());
    let [ni, nj, nk] = grid.shape;
    let c = [ni as f64 / 2.0 + shift, nj as f64 / 2.0, nk as f64 / 2.0];
    for ((i, j, k), v) in m.data.indexed_iter_mut() {
        let d = |r: [f64; 3]| {
            ((i as f64 - c[0]) / r[0]).powi(2)
                + ((j as f64 - c[1]) / r[1]).powi(2)
                + ((k as f64 - c[2]) / r[2]).powi(2)
        };
        if d([ni as f64 / 8.0, nj as f64 / 8.0, (nk as f64 / 4.0).max(1.0)]) <= 1.0 {
            *v = 1;
        } else if d([ni as f64 / 4.0, nj as f64 / 4.0, (nk as f64 / 2.0).max(1.5)]) <= 1.0 {
            *v = 2;
        }
    }
    m
}

#[test]
fn formats_round_trip_through_pycocotools_and_nibabel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = project("formats");
    let grid = Grid {
        shape: [40, 32, 6],
        affine: [
            [-0.9, 0.0, 0.0, 18.0],
            [0.0, 0.9, 0.1, -14.0],
            [0.0, 0.0, 3.0, 22.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    let map = blob(&grid, 1.5);
    let content = Content {
        labels: vec![ClassLabel {
            level: At::Case,
            slice: None,
            classes: vec![1],
        }],
        boxes: vec![BoundingBox {
            class: 1,
            slice: Some(2),
            min: [10.5, 8.5, 2.0],
            max: [20.5, 14.5, 2.0],
        }],
        outlines: vec![Outline {
            class: 2,
            slice: 3,
            closed: true,
            points: vec![[5.0, 5.0], [25.0, 5.0], [25.0, 15.0], [5.0, 15.0]],
        }],
        landmarks: vec![Landmark {
            name: "centre".into(),
            voxel: [20.0, 16.0, 3.0],
        }],
    };
    content.check(&p, grid.shape).expect("valid content");
    let coco = node::fc_annotate::coco::export(
        &p,
        &[node::fc_annotate::coco::CaseAnnotations {
            case: "case-a",
            grid: &grid,
            content: &content,
            mask: Some(&map),
            rater: "alice",
            version: 1,
        }],
    );
    std::fs::write(
        dir.path().join("coco.json"),
        serde_json::to_vec(&coco).expect("json"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("labels.nii.gz"),
        map.to_nifti_gz().expect("nifti"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("labels.json"),
        serde_json::to_vec(&node::fc_annotate::labelmap::sidecar(&p)).expect("json"),
    )
    .expect("write");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/annotate_check.py");
    let out = std::process::Command::new(reference_python())
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("python3 runs (scripts/test.sh installs pycocotools and nibabel)");
    assert!(
        out.status.success(),
        "annotate_check.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("report");
    // nibabel reads our label map: shape, integer type, geometry and counts.
    assert_eq!(r["nifti"]["shape"], serde_json::json!([40, 32, 6]));
    assert_eq!(r["nifti"]["dtype"], "uint8");
    for (row, ours) in grid.affine.iter().take(3).enumerate() {
        for (col, v) in ours.iter().enumerate() {
            close(
                r["nifti"]["affine"][row][col].as_f64().expect("affine"),
                *v,
                1e-5,
                "affine",
            );
        }
    }
    for (label, n) in map.counts() {
        assert_eq!(r["nifti"]["counts"][label.to_string()].as_u64(), Some(n));
    }
    // pycocotools decodes every RLE to exactly the label map's slice.
    let masks_per_slice: usize = (0..6)
        .map(|k| {
            let s = map.data.index_axis(ndarray::Axis(2), k);
            [1u16, 2]
                .iter()
                .filter(|v| s.iter().any(|x| x == *v))
                .count()
        })
        .sum();
    assert_eq!(r["rle"]["equal"].as_u64(), Some(masks_per_slice as u64));
    assert_eq!(r["rle"]["different"].as_u64(), Some(0));
    // Polygon area: pycocotools rasterises, so it is close to, not equal to, the geometric area.
    let poly_area = r["polygons"]
        .as_object()
        .expect("polygons")
        .values()
        .next()
        .expect("one");
    close(
        poly_area.as_f64().expect("area"),
        200.0,
        0.15,
        "polygon area",
    );
    assert_eq!(r["boxes"].as_object().expect("boxes").len(), 1);
    let bbox = r["boxes"]
        .as_object()
        .expect("boxes")
        .values()
        .next()
        .expect("one");
    assert_eq!(bbox, &serde_json::json!([11.0, 9.0, 10.0, 6.0]));
    // And back: masks pycocotools encoded from what nibabel read import to the same map.
    let theirs: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("pycocotools.json")).expect("pycocotools.json"),
    )
    .expect("json");
    let grids = [("case-a".to_owned(), grid.clone())].into_iter().collect();
    let imported = node::fc_annotate::coco::import(&theirs, &p, &grids).expect("import");
    assert_eq!(
        imported["case-a"].mask.as_ref().expect("mask").data,
        map.data
    );
    // VIA 2 and CVAT 1.1: what we write reads back to the same vector annotations (and, for
    // CVAT, the same masks and case labels).
    let cases = [node::fc_annotate::coco::CaseAnnotations {
        case: "case-a",
        grid: &grid,
        content: &content,
        mask: Some(&map),
        rater: "alice",
        version: 1,
    }];
    let via = node::fc_annotate::via::export(&p, &cases);
    assert_eq!(via["_via_data_format_version"], "2.0.10");
    let back = node::fc_annotate::via::import(&via, &p, &grids).expect("via");
    assert_eq!(back["case-a"].content.boxes, content.boxes);
    assert_eq!(back["case-a"].content.outlines, content.outlines);
    assert_eq!(back["case-a"].content.landmarks, content.landmarks);
    let xml = node::fc_annotate::cvat::export(&p, &cases, false);
    assert!(xml.contains("<version>1.1</version>"));
    let back = node::fc_annotate::cvat::import(&xml, &p, &grids).expect("cvat");
    let back = &back["case-a"];
    assert_eq!(back.content.boxes, content.boxes);
    assert_eq!(back.content.outlines, content.outlines);
    assert_eq!(back.content.landmarks, content.landmarks);
    assert_eq!(back.content.labels, content.labels);
    assert_eq!(back.mask.as_ref().expect("cvat mask").data, map.data);
    // A class the project lacks is refused with its name.
    let bad = xml.replace("label=\"oedema\"", "label=\"tumour\"");
    let e = node::fc_annotate::cvat::import(&bad, &p, &grids).expect_err("unknown label");
    assert!(e.contains("tumour"), "{e}");

    // Our own COCO file imports back to the same content (box, polygon, landmark) and mask.
    let ours = node::fc_annotate::coco::import(&coco, &p, &grids).expect("import ours");
    let back = &ours["case-a"];
    assert_eq!(back.mask.as_ref().expect("mask").data, map.data);
    assert_eq!(back.content.boxes, content.boxes);
    assert_eq!(back.content.outlines, content.outlines);
    assert_eq!(back.content.landmarks, content.landmarks);
}

#[test]
fn a_project_with_three_raters_a_proposal_agreement_and_consensus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("archive");
    let profile = node::sample::consortium_sites(3)[0].clone();
    node::sample::write_site_archive(&input, &profile).expect("archive");
    let config = crate::federation::node_config(
        &dir.path().join("node"),
        "site-a",
        &dir.path().join("pki"),
        "127.0.0.1:1",
    );
    let deid = crate::federation::deidentify(&config, &input);
    let mut a = node::annotation::open(&config, deid).expect("workspace");
    let p = project("lesions");
    let cases = a.create_project(&p).expect("project");
    assert!(cases >= 3, "{cases} MR cases");
    assert!(a.create_project(&p).is_err(), "a project id is used once");
    let raters: Vec<String> = ["alice", "bob", "carol"].map(String::from).to_vec();
    assert!(
        a.assign("lesions", &raters[..2]).is_err(),
        "three raters per case are needed"
    );
    assert_eq!(a.assign("lesions", &raters).expect("assign"), 3 * cases);
    assert_eq!(
        a.assign("lesions", &raters).expect("again"),
        0,
        "assigning again adds nothing"
    );
    let listed = a.cases("lesions").expect("cases");
    // Case ids are keyed tokens, never UIDs; case images are on disk with their hash.
    for c in &listed {
        assert!(!c.case_id.contains('.'), "{}", c.case_id);
        let bytes = std::fs::read(a.image_path(c)).expect("case image");
        assert_eq!(node::batch::content_hash(&bytes), c.image_hash);
    }
    let case = listed[0].case_id.clone();
    let (_, grid) = a.case("lesions", &case).expect("case");

    // A model's proposal, imported from a NIfTI file; alice accepts it, bob modifies it
    // (shifted by two voxels), carol rejects it and draws her own (shifted the other way).
    let proposal_file = dir.path().join("proposal.nii.gz");
    std::fs::write(
        &proposal_file,
        blob(&grid, 0.0).to_nifti_gz().expect("nifti"),
    )
    .expect("write");
    let proposal = a
        .import_labelmap(
            "lesions",
            &case,
            "segmenter",
            &proposal_file,
            Source::Proposal,
            Some(("segmenter", "2.1")),
        )
        .expect("proposal");
    let accepted = a
        .review(proposal, "alice", 1, Review::Accept)
        .expect("accept");
    let modified = a
        .review(
            proposal,
            "bob",
            1,
            Review::Modify(Box::default(), Some(Box::new(blob(&grid, 2.0)))),
        )
        .expect("modify");
    let rejected = a
        .review(proposal, "carol", 1, Review::Reject)
        .expect("reject");
    let carol = a
        .save(
            "lesions",
            &case,
            "carol",
            1,
            &Content::default(),
            Some(&blob(&grid, -1.0)),
            Source::Manual,
            Some(rejected),
            None,
        )
        .expect("carol's own");
    let v = a.load(modified).expect("load");
    assert_eq!(v.version.parent, Some(proposal));
    assert_eq!(v.version.source, "proposal-modified");
    assert_eq!(v.version.model.as_deref(), Some("segmenter"));
    assert_eq!(a.load(accepted).expect("load").mask, Some(blob(&grid, 0.0)));
    assert!(
        a.review(accepted, "bob", 1, Review::Accept).is_err(),
        "only proposals are reviewed"
    );

    // Boxes, landmarks and case labels on every case from every rater, with controlled
    // disagreement: carol calls every case oedema, the others lesion.
    for c in &listed {
        let (_, g) = a.case("lesions", &c.case_id).expect("case");
        for (n, r) in raters.iter().enumerate() {
            let dx = n as f64;
            let mut labels = vec![ClassLabel {
                level: At::Case,
                slice: None,
                classes: vec![if r == "carol" { 2 } else { 1 }],
            }];
            // Slice labels on four slices: carol disagrees on the first.
            labels.extend((0..4).map(|k| ClassLabel {
                level: At::Slice,
                slice: Some(k),
                classes: vec![if r == "carol" && k == 0 { 2 } else { 1 }],
            }));
            let content = Content {
                labels,
                boxes: vec![BoundingBox {
                    class: 1,
                    slice: Some(0),
                    min: [2.0 + dx, 2.0, 0.0],
                    max: [12.0 + dx, 10.0, 0.0],
                }],
                outlines: Vec::new(),
                landmarks: vec![Landmark {
                    name: "centre".into(),
                    voxel: [g.shape[0] as f64 / 2.0 + dx, g.shape[1] as f64 / 2.0, 0.0],
                }],
            };
            let mask = (c.case_id == case).then(|| blob(&g, [0.0, 2.0, -1.0][n]));
            a.save(
                "lesions",
                &c.case_id,
                r,
                1,
                &content,
                mask.as_ref(),
                Source::Manual,
                None,
                None,
            )
            .expect("save");
        }
    }
    let _ = carol;

    // Bad inputs are refused with a reason and change nothing.
    let before = a.status("lesions").expect("status").versions;
    let mut wrong = grid.clone();
    wrong.shape[0] += 1;
    let bad = dir.path().join("bad.nii.gz");
    std::fs::write(&bad, LabelMap::empty(wrong).to_nifti_gz().expect("nifti")).expect("write");
    let e = a
        .import_labelmap("lesions", &case, "alice", &bad, Source::Import, None)
        .expect_err("wrong grid");
    assert!(e.to_string().contains("voxels"), "{e}");
    let mut stray = blob(&grid, 0.0);
    stray.data[[0, 0, 0]] = 7;
    let e = a
        .save(
            "lesions",
            &case,
            "alice",
            1,
            &Content::default(),
            Some(&stray),
            Source::Manual,
            None,
            None,
        )
        .expect_err("unknown label");
    assert!(e.to_string().contains("label value 7"), "{e}");
    let outside = Content {
        landmarks: vec![Landmark {
            name: "x".into(),
            voxel: [-3.0, 0.0, 0.0],
        }],
        ..Content::default()
    };
    assert!(
        a.save(
            "lesions",
            &case,
            "alice",
            1,
            &outside,
            None,
            Source::Manual,
            None,
            None
        )
        .is_err()
    );
    assert_eq!(a.status("lesions").expect("status").versions, before);

    // Agreement: the masks' Dice per pair is what the pure function computes on the maps;
    // case labels: carol disagrees everywhere.
    let r = a.agreement("lesions").expect("agreement");
    let expect = |x: f64, y: f64| match compare(
        blob(&grid, x).mask(1).view(),
        blob(&grid, y).mask(1).view(),
        grid.spacing(),
    ) {
        MaskAgreement::Both(o) => o.dice,
        other => panic!("{other:?}"),
    };
    let lesion_pairs: Vec<&node::fc_annotate::agreement::project::PairMask> =
        r.masks.iter().filter(|m| m.class == "lesion").collect();
    assert_eq!(lesion_pairs.len(), 3);
    let dices: BTreeSet<String> = lesion_pairs
        .iter()
        .map(|m| format!("{:.9}", m.agreement.dice().expect("dice")))
        .collect();
    let wanted: BTreeSet<String> = [expect(0.0, 2.0), expect(0.0, -1.0), expect(2.0, -1.0)]
        .iter()
        .map(|d| format!("{d:.9}"))
        .collect();
    assert_eq!(dices, wanted);
    let labels = r
        .labels
        .iter()
        .find(|l| l.level == "case")
        .expect("case labels");
    assert_eq!((labels.cases, labels.raters), (cases, 3));
    assert!(labels.fleiss_kappa.expect("kappa") < 0.0, "{labels:?}");
    let slices = r
        .labels
        .iter()
        .find(|l| l.level == "slice")
        .expect("slice labels");
    assert_eq!(slices.cases, 4 * cases, "every labelled slice is a unit");
    let alpha = slices.krippendorff_alpha.expect("alpha");
    assert!(
        alpha > labels.krippendorff_alpha.expect("case alpha") && alpha < 1.0,
        "{slices:?}"
    );
    assert_eq!(r.boxes.len(), 3 * cases);
    assert!(r.landmarks.iter().all(|l| l.errors_mm.len() == 1));

    // Consensus: STAPLE of the three masks is saved as a new version, the raters' stay.
    assert_eq!(
        a.consensus("lesions", ConsensusMethod::Staple)
            .expect("consensus"),
        1
    );
    let c = a.consensus_versions("lesions").expect("consensus versions");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].version.source, "consensus");
    let s = a.status("lesions").expect("status");
    assert_eq!(s.consensus_cases, 1);
    assert_eq!(s.submitted, 3 * cases);
    assert!(s.by_source["proposal"] == 1 && s.by_source["proposal-rejected"] == 1);

    // Export: label maps with sidecars and one COCO file.
    let out = dir.path().join("export");
    let n = a
        .export(
            "lesions",
            &out,
            false,
            Some(node::annotation::SegKind::Binary),
        )
        .expect("export");
    assert_eq!(n, 3 * cases);
    assert!(
        out.join("labels")
            .join(format!("{case}_bob.nii.gz"))
            .is_file()
    );
    let coco: Value =
        serde_json::from_slice(&std::fs::read(out.join("coco.json")).expect("coco")).expect("json");
    assert!(coco["annotations"].as_array().expect("annotations").len() > 3 * cases);

    // nnU-Net: the consensus label map goes to labelsTr beside its image, on the same grid,
    // and only labelled cases are exported.
    let nn = dir.path().join("nnunet");
    let opts = node::export::ExportOptions {
        compress: Default::default(),
        format: node::export::Format::NnUnet,
        dataset_id: 7,
        dataset_name: "lesions".into(),
        seed: 0,
        fractions: [1.0, 0.0, 0.0],
        stratify: node::export::Stratify::None,
        harmonised: None,
        tokens: node::deid::keys::Keys::derive(
            &config.deid.secret(&config.data_dir, false).expect("secret"),
        )
        .tokens(),
        labels: Some(a.nnunet_labels("lesions", None).expect("labels")),
    };
    let summary = node::export::export(&config.data_dir.join("deid"), &nn, &opts, &|_| true)
        .expect("nnunet export");
    assert_eq!(summary.volumes, 1, "only the labelled case");
    let root = nn.join("Dataset007_lesions");
    let label_files: Vec<_> = std::fs::read_dir(root.join("labelsTr"))
        .expect("labelsTr")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(label_files.len(), 1);
    let stem = label_files[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .replace(".nii.gz", "");
    let image =
        std::fs::read(root.join("imagesTr").join(format!("{stem}_0000.nii.gz"))).expect("image");
    let (_, image) = node::volume::nifti::read_bytes(&image).expect("image nifti");
    let labels =
        LabelMap::from_nifti(&std::fs::read(&label_files[0]).expect("labels")).expect("map");
    Grid::of(&image)
        .matches(&labels.grid, 1e-6)
        .expect("same grid");
    assert_eq!(
        labels.data,
        c[0].mask.as_ref().expect("consensus mask").data
    );
    let dataset: Value =
        serde_json::from_slice(&std::fs::read(root.join("dataset.json")).expect("dataset"))
            .expect("json");
    assert_eq!(
        dataset["labels"],
        serde_json::json!({"background": 0, "lesion": 1, "oedema": 2})
    );

    // DICOM SEG of bob's modified proposal: highdicom and dcmqi read it back, and every
    // segment's voxels are where the label map has them, in world coordinates.
    let seg = out.join("seg").join(format!("{case}_bob.dcm"));
    assert!(seg.is_file());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/annotate_seg_check.py");
    let check = std::process::Command::new(reference_python())
        .arg(&script)
        .arg(&seg)
        .arg(out.join("labels").join(format!("{case}_bob.nii.gz")))
        .arg(dir.path().join("seg-check"))
        .output()
        .expect("python3 runs (scripts/test.sh installs highdicom and dcmqi)");
    assert!(
        check.status.success(),
        "annotate_seg_check.py failed: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let r: Value = serde_json::from_slice(&check.stdout).expect("report");
    eprintln!("SEG check: {r}");
    assert_eq!(r["sop_class"], "1.2.840.10008.5.1.4.1.1.66.4");
    let segments = r["segments"].as_object().expect("segments");
    assert_eq!(segments.len(), 2, "{r}");
    for (label, s) in segments {
        assert!(s["ours"].as_u64().expect("count") > 0, "{label}");
        assert_eq!(s["highdicom"], s["ours"], "{label}: {s}");
        assert_eq!(s["dcmqi"], s["ours"], "{label}: {s}");
        assert_eq!(s["highdicom_same_positions"], true, "{label}: {s}");
        assert_eq!(s["dcmqi_same_positions"], true, "{label}: {s}");
    }
    // The consensus as a label-map SEG (Label Map Segmentation Storage): highdicom and dcmqi
    // read it back to the same voxels.
    let consensus = a.consensus_versions("lesions").expect("consensus");
    let lm_dir = dir.path().join("labelmap-seg");
    let lm_seg = lm_dir.join("consensus.dcm");
    a.export_seg(
        consensus[0].version.id,
        &lm_seg,
        node::annotation::SegKind::LabelMap,
    )
    .expect("label-map SEG");
    let map = consensus[0].mask.as_ref().expect("consensus mask");
    std::fs::write(
        lm_dir.join("consensus.nii.gz"),
        map.to_nifti_gz().expect("nifti"),
    )
    .expect("write");
    std::fs::write(
        lm_dir.join("consensus.json"),
        serde_json::to_vec(&node::fc_annotate::labelmap::sidecar(&p)).expect("json"),
    )
    .expect("write");
    let check = std::process::Command::new(reference_python())
        .arg(&script)
        .arg(&lm_seg)
        .arg(lm_dir.join("consensus.nii.gz"))
        .arg(dir.path().join("labelmap-check"))
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "annotate_seg_check.py failed on the label-map SEG: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let r: Value = serde_json::from_slice(&check.stdout).expect("report");
    eprintln!("label-map SEG check: {r}");
    assert_eq!(r["sop_class"], "1.2.840.10008.5.1.4.1.1.66.7");
    for (label, s) in r["segments"].as_object().expect("segments") {
        assert!(s["ours"].as_u64().expect("count") > 0, "{label}");
        assert_eq!(s["highdicom"], s["ours"], "{label}: {s}");
        assert_eq!(s["highdicom_same_positions"], true, "{label}: {s}");
        assert_eq!(s["dcmqi"], s["ours"], "{label}: {s}");
        assert_eq!(s["dcmqi_same_positions"], true, "{label}: {s}");
    }

    // The SEG is the node's own de-identified output: it carries the source's pseudonym.
    let seg_obj = node::read::read_object(&std::fs::read(&seg).expect("seg")).expect("dicom");
    assert_eq!(
        node::read::text(&seg_obj, dicom_core::Tag(0x0010, 0x0020)),
        listed[0].patient
    );

    // Every change is in the audit chain, and the chain verifies.
    let catalog =
        node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite")).expect("catalog");
    let entries = catalog.audit_entries().expect("audit");
    let saves = entries
        .iter()
        .filter(|e| e.record.action == "annotation-save")
        .count();
    assert_eq!(saves, a.status("lesions").expect("status").versions);
}

#[test]
fn a_model_proposes_through_a_command_and_its_outcomes_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("archive");
    let profile = node::sample::consortium_sites(3)[1].clone();
    node::sample::write_site_archive(&input, &profile).expect("archive");
    let config = crate::federation::node_config(
        &dir.path().join("node"),
        "site-b",
        &dir.path().join("pki"),
        "127.0.0.1:1",
    );
    let deid = crate::federation::deidentify(&config, &input);
    let mut a = node::annotation::open(&config, deid).expect("workspace");
    let mut p = project("proposed");
    p.raters_per_case = 1;
    p.without_proposal = 0.5;
    let cases = a.create_project(&p).expect("project");
    a.assign("proposed", &["ann".to_owned(), "ben".to_owned()])
        .expect("assign");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/threshold.py");
    let command = vec![
        reference_python(),
        model.display().to_string(),
        "{image}".to_owned(),
        "{output}".to_owned(),
    ];
    let r = a
        .propose(
            "proposed",
            ("threshold", "1.0"),
            &command,
            std::time::Duration::from_secs(60),
        )
        .expect("propose");
    assert_eq!((r.imported.len(), r.failed.len()), (cases, 0), "{r:?}");
    // Run again: every case has this model version's proposal already.
    let again = a
        .propose(
            "proposed",
            ("threshold", "1.0"),
            &command,
            std::time::Duration::from_secs(60),
        )
        .expect("again");
    assert_eq!((again.imported.len(), again.skipped), (0, cases));
    // A command that fails, and one that runs past its time, are reported per case.
    let failing = a
        .propose(
            "proposed",
            ("broken", "0"),
            &["false".to_owned()],
            std::time::Duration::from_secs(5),
        )
        .expect("failing");
    assert_eq!(failing.failed.len(), cases);
    assert!(failing.failed[0].1.contains("exited"), "{failing:?}");
    let slow = a
        .propose(
            "proposed",
            ("slow", "0"),
            &["sleep".to_owned(), "5".to_owned()],
            std::time::Duration::from_millis(300),
        )
        .expect("slow");
    assert!(
        slow.failed
            .iter()
            .all(|(_, why)| why.contains("no result within")),
        "{slow:?}"
    );
    // Each assigned rater acts on the case's proposal: ann accepts, ben shrinks it.
    for asg in a.assignments("proposed").expect("assignments") {
        let id = r
            .imported
            .iter()
            .find(|(c, _)| *c == asg.case_id)
            .expect("a proposal per case")
            .1;
        if asg.rater == "ann" {
            a.review(id, "ann", 1, Review::Accept).expect("accept");
        } else {
            let mut m = a.load(id).expect("proposal").mask.expect("mask");
            let [ni, _, _] = m.grid.shape;
            for ((i, _, _), v) in m.data.indexed_iter_mut() {
                if i < ni / 2 {
                    *v = 0;
                }
            }
            a.review(
                id,
                "ben",
                1,
                Review::Modify(Box::default(), Some(Box::new(m))),
            )
            .expect("modify");
        }
    }
    let s = a.status("proposed").expect("status");
    assert_eq!(s.proposals.len(), 1, "failed commands leave no proposals");
    let p = &s.proposals[0];
    assert_eq!((p.model.as_str(), p.version.as_str()), ("threshold", "1.0"));
    assert_eq!(p.proposals, cases);
    assert_eq!(p.accepted + p.modified, cases);
    assert!(p.accepted > 0 && p.modified > 0, "{p:?}");
    let median = p.median_edit_dice.expect("edit dice");
    assert!(median > 0.0 && median <= 1.0);
    let anchoring = s.anchoring.expect("anchoring");
    assert_eq!(anchoring.shown + anchoring.hidden, cases);
}
