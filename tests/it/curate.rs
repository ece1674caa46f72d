//! Curation checks over generated fixtures built to pass and to fail them.

use std::collections::BTreeSet;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use node::batch;
use node::curate::conformance;
use node::deid::dictionary::Dictionary;
use node::deid::iod::IodTables;
use node::deid::keys::{Keys, Secret};
use node::deid::{DeidPolicy, Deidentifier};
use node::sample;

fn ct() -> InMemDicomObject {
    let p = sample::Patient {
        id: "CUR-1".into(),
        issuer: String::new(),
        name: "Cur^Pat".into(),
        birth_date: "19700101".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: format!("{}.9.7", sample::ORIGINAL_UID_ROOT),
        date: "20240101".into(),
        time: "000000".into(),
        accession: "A".into(),
        description: "d".into(),
        referring_physician: "R^C".into(),
        institution: "I".into(),
    };
    let se = sample::Series {
        uid: format!("{}.9.7.1", sample::ORIGINAL_UID_ROOT),
        number: 1,
        description: "s".into(),
        frame_of_reference: format!("{}.9.7.1.0", sample::ORIGINAL_UID_ROOT),
        station: "S".into(),
    };
    let mut o = sample::ct_slice(&p, &st, &se, 1);
    // Attributes a conformant CT image carries that the minimal builder leaves out.
    for (tag, vr, v) in [
        (Tag(0x0008, 0x0090), VR::PN, "R^C"),
        (Tag(0x0020, 0x0020), VR::CS, "L\\P"),
        (Tag(0x0020, 0x1040), VR::LO, ""),
        (Tag(0x0018, 0x5100), VR::CS, "HFS"),
        (Tag(0x0010, 0x0040), VR::CS, "F"),
        (Tag(0x0020, 0x0012), VR::IS, "1"),
        (Tag(0x0018, 0x0022), VR::CS, ""),
        (Tag(0x0008, 0x0012), VR::DA, "20240101"),
    ] {
        o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }
    o
}

fn codes(o: InMemDicomObject) -> BTreeSet<(String, Option<String>)> {
    let bytes = sample::encode(o, sample::ts::EXPLICIT_LE).expect("encode");
    let file = OpenFileOptions::new()
        .from_reader(bytes.as_slice())
        .expect("open");
    conformance::check(&file, true, IodTables::standard(), Dictionary::standard())
        .into_iter()
        .filter(|f| f.severity != node::curate::Severity::Info)
        .map(|f| (f.code.to_owned(), f.tag))
        .collect()
}

fn has(found: &BTreeSet<(String, Option<String>)>, code: &str, tag: Option<&str>) -> bool {
    found
        .iter()
        .any(|(c, t)| c == code && (tag.is_none() || t.as_deref() == tag))
}

/// An edit that breaks a fixture.
type Edit = Box<dyn Fn(&mut InMemDicomObject)>;

#[test]
fn each_conformance_check_fails_its_fixture_and_passes_the_clean_one() {
    let clean = codes(ct());
    let baseline = clean.clone();
    let mut cases: Vec<(&str, Option<&str>, Edit)> = Vec::new();
    cases.push((
        "missing-type1",
        Some("(0020,000D)"),
        Box::new(|o| {
            o.remove_element(Tag(0x0020, 0x000D));
        }),
    ));
    cases.push((
        "empty-type1",
        Some("(0020,000E)"),
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0020, 0x000E),
                VR::UI,
                PrimitiveValue::Empty,
            ));
        }),
    ));
    cases.push((
        "missing-type2",
        Some("(0010,0010)"),
        Box::new(|o| {
            o.remove_element(Tag(0x0010, 0x0010));
        }),
    ));
    cases.push((
        "invalid-vr",
        Some("(0020,0037)"),
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0020, 0x0037),
                VR::LO,
                PrimitiveValue::from("1\\0\\0\\0\\1\\0"),
            ));
        }),
    ));
    cases.push((
        "invalid-vm",
        Some("(0020,0037)"),
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0020, 0x0037),
                VR::DS,
                PrimitiveValue::from("1\\0\\0\\0\\1"),
            ));
        }),
    ));
    cases.push((
        "samples-photometric-mismatch",
        None,
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0028, 0x0004),
                VR::CS,
                PrimitiveValue::from("RGB"),
            ));
        }),
    ));
    cases.push((
        "bits-stored-exceed-allocated",
        None,
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0028, 0x0101),
                VR::US,
                PrimitiveValue::from(17u16),
            ));
        }),
    ));
    cases.push((
        "high-bit-mismatch",
        None,
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0028, 0x0102),
                VR::US,
                PrimitiveValue::from(15u16),
            ));
        }),
    ));
    cases.push((
        "pixel-data-length",
        None,
        Box::new(|o| {
            o.put(DataElement::new(
                Tag(0x0028, 0x0010),
                VR::US,
                PrimitiveValue::from(9u16),
            ));
        }),
    ));
    cases.push((
        "missing-module",
        None,
        Box::new(|o| {
            // Remove every attribute of the General Series module.
            let modules = IodTables::standard()
                .modules(sample::sop::CT)
                .expect("CT covered");
            let series = modules
                .iter()
                .find(|m| m.key == "general-series")
                .expect("general-series module");
            for (t, _) in &series.attributes {
                o.remove_element(*t);
            }
        }),
    ));
    for (code, tag, edit) in cases {
        assert!(
            !has(&baseline, code, tag),
            "the clean fixture already fails {code}: {baseline:?}"
        );
        let mut o = ct();
        edit(&mut o);
        let found = codes(o);
        assert!(
            has(&found, code, tag),
            "{code} {tag:?} not found in {found:?}"
        );
    }
}

#[test]
fn deidentified_output_is_never_less_conformant_than_its_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = sample::write_sample_archive(dir.path()).expect("archive");
    let policy = DeidPolicy::default();
    let keys = Keys::derive(&Secret::from_bytes(vec![2; 32]).expect("secret"));
    let deid = Deidentifier::new(&policy, &keys);
    let mut checked = 0;
    for f in &archive.files {
        let bytes = std::fs::read(f).expect("read");
        let Ok((_, out)) = batch::deidentify_bytes(&deid, &bytes) else {
            continue;
        };
        let input: DefaultDicomObject = OpenFileOptions::new()
            .from_reader(bytes.as_slice())
            .expect("input");
        let output: DefaultDicomObject = OpenFileOptions::new()
            .from_reader(out.as_slice())
            .expect("output");
        let explicit =
            input.meta().transfer_syntax().trim_end_matches('\0') != sample::ts::IMPLICIT_LE;
        let key = |o: &DefaultDicomObject| -> BTreeSet<(String, Option<String>)> {
            conformance::check(o, explicit, IodTables::standard(), Dictionary::standard())
                .into_iter()
                .map(|f| (f.code.to_owned(), f.tag))
                .collect()
        };
        let (before, after) = (key(&input), key(&output));
        let new: Vec<_> = after.difference(&before).collect();
        assert!(
            new.is_empty(),
            "{}: de-identification added {new:?}",
            f.display()
        );
        checked += 1;
    }
    assert!(checked >= 20);
}

#[test]
fn duplicates_and_series_inconsistency_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("deid");
    std::fs::create_dir_all(&folder).expect("dir");
    // Two slices of one series, then a third with other rows and another frame of reference,
    // and a copy of the first slice's pixels under a new SOP Instance UID.
    let mut objects = Vec::new();
    for i in 1..=2u16 {
        let mut o = ct();
        o.put(DataElement::new(
            Tag(0x0008, 0x0018),
            VR::UI,
            PrimitiveValue::from(format!("2.25.100{i}")),
        ));
        o.put(DataElement::new(
            Tag(0x0020, 0x0032),
            VR::DS,
            PrimitiveValue::from(format!("0\\0\\{}", f32::from(i) * 2.5)),
        ));
        o.put(DataElement::new(
            Tag(0x0020, 0x0037),
            VR::DS,
            PrimitiveValue::from("1\\0\\0\\0\\1\\0"),
        ));
        objects.push(o);
    }
    let mut odd = ct();
    odd.put(DataElement::new(
        Tag(0x0008, 0x0018),
        VR::UI,
        PrimitiveValue::from("2.25.1003"),
    ));
    odd.put(DataElement::new(
        Tag(0x0020, 0x0052),
        VR::UI,
        PrimitiveValue::from("2.25.999"),
    ));
    objects.push(odd);
    for (i, o) in objects.into_iter().enumerate() {
        std::fs::write(
            folder.join(format!("{i}.dcm")),
            sample::encode(o, sample::ts::EXPLICIT_LE).expect("encode"),
        )
        .expect("write");
    }
    let report = node::curate::report::curate(
        &folder,
        None,
        Vec::new(),
        &node::deid::keys::Tokens::ephemeral(),
    )
    .expect("curate");
    assert_eq!(report.series.len(), 1);
    let codes: BTreeSet<(&str, Option<&str>)> = report.series[0]
        .findings
        .iter()
        .map(|f| (f.code, f.tag.as_deref()))
        .collect();
    assert!(
        codes.contains(&("series-inconsistent", Some("(0020,0052)"))),
        "{codes:?}"
    );
    assert!(
        codes.contains(&("duplicate-pixels", None)),
        "slices 1 and 3 share pixels: {codes:?}"
    );
    assert!(
        !codes.contains(&("series-inconsistent", Some("(0028,0010)"))),
        "{codes:?}"
    );
    // Distinct pixels everywhere: no duplicate finding.
    let clean = dir.path().join("clean");
    std::fs::create_dir_all(&clean).expect("dir");
    for i in 1..=2u16 {
        let mut o = ct();
        o.put(DataElement::new(
            Tag(0x0008, 0x0018),
            VR::UI,
            PrimitiveValue::from(format!("2.25.200{i}")),
        ));
        let pixels: Vec<u16> = (0..64).map(|p| p * i).collect();
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OW,
            PrimitiveValue::U16(pixels.into()),
        ));
        std::fs::write(
            clean.join(format!("{i}.dcm")),
            sample::encode(o, sample::ts::EXPLICIT_LE).expect("encode"),
        )
        .expect("write");
    }
    let report = node::curate::report::curate(
        &clean,
        None,
        Vec::new(),
        &node::deid::keys::Tokens::ephemeral(),
    )
    .expect("curate");
    assert!(
        report.series[0]
            .findings
            .iter()
            .all(|f| f.code != "duplicate-pixels" && f.code != "series-inconsistent"),
        "{:?}",
        report.series[0].findings
    );
}

#[test]
fn every_covered_iod_is_checked_without_failure() {
    let iods = IodTables::standard();
    for class in [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.4.1",
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.128",
        "1.2.840.10008.5.1.4.1.1.20",
        "1.2.840.10008.5.1.4.1.1.12.1",
        "1.2.840.10008.5.1.4.1.1.66.4",
    ] {
        assert!(iods.modules(class).is_some(), "{class} covered");
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            Tag(0x0008, 0x0016),
            VR::UI,
            PrimitiveValue::from(class),
        ));
        o.put(DataElement::new(
            Tag(0x0008, 0x0018),
            VR::UI,
            PrimitiveValue::from("2.25.1"),
        ));
        let found = codes(o);
        assert!(
            has(&found, "missing-module", None),
            "{class}: a near-empty object misses mandatory modules"
        );
    }
}
