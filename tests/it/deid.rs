//! De-identification of generated archives, end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::{Tag, VR};
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use node::batch::{self, BatchPaths, RunSettings};
use node::catalog::Catalog;
use node::deid::iod::IodTables;
use node::deid::keys::{Keys, Secret};
use node::deid::table::{DeidOption, OptionAction, RuleTable};
use node::deid::{DeidPolicy, Deidentified, Deidentifier, dates};
use node::sample::{self, ts};

fn keys(seed: u8) -> Keys {
    Keys::derive(&Secret::from_bytes(vec![seed; 32]).expect("secret"))
}

fn policy(options: &[DeidOption]) -> DeidPolicy {
    let mut p = DeidPolicy::default();
    p.options.extend(options.iter().copied());
    p.validate().expect("valid policy");
    p
}

fn open(bytes: &[u8]) -> DefaultDicomObject {
    OpenFileOptions::new()
        .from_reader(bytes)
        .expect("re-opens with dicom-object")
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.value().to_str().ok())
        .map(|s| s.trim_matches([' ', '\0']).to_owned())
}

fn items(obj: &InMemDicomObject, tag: Tag) -> Vec<InMemDicomObject> {
    match obj.get(tag).map(|e| e.value()) {
        Some(Value::Sequence(s)) => s.items().to_vec(),
        _ => Vec::new(),
    }
}

/// Every file of the sample archive, de-identified in process: (input, output, output bytes).
fn deid_sample(
    policy: &DeidPolicy,
    keys: &Keys,
) -> Vec<(DefaultDicomObject, Deidentified, Vec<u8>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = sample::write_sample_archive(dir.path()).expect("archive");
    let deid = Deidentifier::new(policy, keys);
    let mut out = Vec::new();
    let mut burned_in = 0;
    for f in &archive.files {
        let bytes = std::fs::read(f).expect("read");
        match batch::deidentify_bytes(&deid, &bytes) {
            Ok((d, encoded)) => out.push((open(&bytes), d, encoded)),
            Err((reason, _)) if reason == "burned-in-risk" => burned_in += 1,
            Err(_) => {}
        }
    }
    assert_eq!(
        burned_in, 2,
        "the two ultrasound images (marked NO, which is not trusted for US) wait for a masking rule"
    );
    assert_eq!(
        out.len(),
        archive.files.len() - 4,
        "all but the two refused files (not DICOM, no SOP Instance UID) and the two ultrasound images; odd lengths are read"
    );
    out
}

/// For every option, exactly the table rows whose option column says K keep their planted
/// value; every other planted value is gone.
#[test]
fn per_option_exactly_the_kept_attributes_survive() {
    let (canary, planted) = sample::canary_object("OPTX");
    let bytes = sample::encode(canary, ts::EXPLICIT_LE).expect("encode");
    let table = RuleTable::standard();
    let mut options: Vec<Option<DeidOption>> = vec![None];
    options.extend(DeidOption::ALL.into_iter().map(Some));
    let mut failures = Vec::new();
    for option in options {
        let p = policy(option.as_slice());
        let k = keys(1);
        let (_, out) =
            batch::deidentify_bytes(&Deidentifier::new(&p, &k), &bytes).expect("de-identified");
        let obj = open(&out);
        let mut kept = 0;
        for pl in planted.iter() {
            let Some(row) = pl.row else { continue };
            let rule = &table.rules()[row];
            let expect = option.is_some_and(|o| rule.option(o) == Some(OptionAction::K));
            let value = if pl.vr == VR::SQ {
                items(&obj, pl.tag)
                    .first()
                    .and_then(|i| text(i, Tag(0x0008, 0x0104)))
            } else if matches!(pl.vr, VR::OB | VR::UN) {
                obj.get(pl.tag)
                    .and_then(|e| e.value().to_bytes().ok())
                    .map(|b| {
                        String::from_utf8_lossy(&b)
                            .trim_end_matches('\0')
                            .to_owned()
                    })
            } else {
                text(&obj, pl.tag)
            };
            let survived = value.as_deref() == Some(pl.needle.as_str());
            if pl.vr == VR::TM && !expect {
                continue; // times are kept by both date options and carry a common value
            }
            if survived != expect {
                failures.push(format!(
                    "{option:?} {} {}: survived={survived}",
                    rule.pattern, rule.keyword
                ));
            }
            kept += usize::from(survived);
            if option == Some(DeidOption::RetainLongitudinalModifiedDates)
                && pl.vr == VR::DA
                && rule.option(DeidOption::RetainLongitudinalModifiedDates) == Some(OptionAction::C)
            {
                let v = value.as_deref().unwrap_or_default();
                let d = dates::Date::parse_da(v).unwrap_or_else(|| {
                    panic!("{} kept as a valid shifted date, got {v:?}", rule.keyword)
                });
                assert!(
                    d < dates::Date::parse_da(&pl.needle).expect("planted"),
                    "{} shifted back",
                    rule.keyword
                );
            }
        }
        if !failures.is_empty() {
            break;
        }
        if let Some(o) = option {
            let k_rows = planted
                .iter()
                .filter(|pl| {
                    pl.row
                        .is_some_and(|r| table.rules()[r].option(o) == Some(OptionAction::K))
                })
                .count();
            assert_eq!(kept, k_rows, "{o}: kept {kept} of {k_rows} planted K rows");
        } else {
            assert_eq!(kept, 0, "basic profile keeps nothing planted");
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn clean_descriptors_keeps_only_allow_listed_phrases() {
    let (canary, planted) = sample::canary_object("DESC");
    let bytes = sample::encode(canary, ts::EXPLICIT_LE).expect("encode");
    let study_desc = planted
        .iter()
        .find(|p| p.tag == Tag(0x0008, 0x1030))
        .expect("planted")
        .needle
        .clone();
    let mut p = policy(&[DeidOption::CleanDescriptors]);
    p.descriptor_allow_list = vec![format!("  {}  ", study_desc.to_lowercase())];
    let k = keys(1);
    let (_, out) =
        batch::deidentify_bytes(&Deidentifier::new(&p, &k), &bytes).expect("de-identified");
    let obj = open(&out);
    assert_eq!(
        text(&obj, Tag(0x0008, 0x1030)).as_deref(),
        Some(study_desc.as_str())
    );
    assert_eq!(
        text(&obj, Tag(0x0008, 0x103E)).as_deref(),
        Some(""),
        "series description emptied"
    );
}

#[test]
fn same_inputs_and_secret_give_byte_identical_outputs() {
    let p = policy(&[
        DeidOption::RetainLongitudinalModifiedDates,
        DeidOption::RetainPatientCharacteristics,
    ]);
    let a = deid_sample(&p, &keys(9));
    let b = deid_sample(&p, &keys(9));
    assert_eq!(a.len(), b.len());
    for ((_, da, ba), (_, db, bb)) in a.iter().zip(&b) {
        assert_eq!(da.relative_path(), db.relative_path());
        assert!(
            ba == bb,
            "outputs differ for {}",
            da.relative_path().display()
        );
    }
    let c = deid_sample(&p, &keys(10));
    assert!(
        a.iter()
            .zip(&c)
            .all(|((_, x, _), (_, y, _))| x.patient != y.patient),
        "another secret, other pseudonyms"
    );
}

fn uids_and_pseudonyms(
    outputs: &[(DefaultDicomObject, Deidentified, Vec<u8>)],
) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for (_, d, bytes) in outputs {
        set.insert(d.patient.to_string());
        let s = String::from_utf8_lossy(bytes);
        for part in s.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
            if part.starts_with("2.25.")
                && part.len() > 20
                && part != node::deid::IMPLEMENTATION_CLASS_UID
            {
                set.insert(part.to_owned());
            }
        }
    }
    set
}

#[test]
fn anonymisation_runs_share_no_uid_or_pseudonym() {
    let p = policy(&[]);
    let run = || {
        let secret = Secret::random().expect("rng");
        let k = Keys::derive(&secret);
        uids_and_pseudonyms(&deid_sample(&p, &k))
    };
    let (a, b) = (run(), run());
    assert!(a.len() > 30, "collected {} values", a.len());
    let shared: Vec<_> = a.intersection(&b).collect();
    assert!(shared.is_empty(), "shared between runs: {shared:?}");
}

#[test]
fn references_across_series_resolve_after_deidentification() {
    let p = policy(&[DeidOption::CleanStructuredContent]);
    let outputs = deid_sample(&p, &keys(3));
    let sop = |o: &DefaultDicomObject| text(o, Tag(0x0008, 0x0016)).unwrap_or_default();
    let ct_instances: BTreeSet<String> = outputs
        .iter()
        .filter(|(i, _, _)| sop(i) == sample::sop::CT)
        .map(|(_, _, b)| text(&open(b), Tag(0x0008, 0x0018)).unwrap_or_default())
        .collect();
    let ct_series: BTreeSet<String> = outputs
        .iter()
        .filter(|(i, _, _)| sop(i) == sample::sop::CT)
        .map(|(_, _, b)| text(&open(b), Tag(0x0020, 0x000E)).unwrap_or_default())
        .collect();
    let (_, _, seg) = outputs
        .iter()
        .find(|(i, _, _)| sop(i) == sample::sop::SEG)
        .expect("seg");
    let seg = open(seg);
    let series_items = items(&seg, Tag(0x0008, 0x1115));
    let refs = items(&series_items[0], Tag(0x0008, 0x114A));
    assert_eq!(refs.len(), 6);
    for r in &refs {
        let uid = text(r, Tag(0x0008, 0x1155)).expect("referenced uid");
        assert!(ct_instances.contains(&uid), "SEG reference {uid} resolves");
        assert_eq!(
            text(r, Tag(0x0008, 0x1150)).as_deref(),
            Some(sample::sop::CT),
            "class UID kept"
        );
    }
    assert!(ct_series.contains(&text(&series_items[0], Tag(0x0020, 0x000E)).expect("series ref")));
    // The SR keeps its coded finding and image reference, not its text, name or date.
    let (_, _, sr) = outputs
        .iter()
        .find(|(i, _, _)| sop(i) == sample::sop::BASIC_TEXT_SR)
        .expect("sr");
    let sr = open(sr);
    let top = items(&sr, Tag(0x0040, 0xA730));
    let types: Vec<String> = top
        .iter()
        .filter_map(|i| text(i, Tag(0x0040, 0xA040)))
        .collect();
    assert_eq!(types, ["CONTAINER"], "TEXT and PNAME items removed");
    let inner = items(&top[0], Tag(0x0040, 0xA730));
    let inner_types: Vec<String> = inner
        .iter()
        .filter_map(|i| text(i, Tag(0x0040, 0xA040)))
        .collect();
    assert_eq!(inner_types, ["IMAGE", "CODE"], "DATE item removed");
    let img = items(&inner[0], Tag(0x0008, 0x1199));
    let uid = text(&img[0], Tag(0x0008, 0x1155)).expect("image ref");
    assert!(ct_instances.contains(&uid), "SR image reference resolves");
}

#[test]
fn outputs_keep_the_type1_attributes_their_iod_requires_and_the_transfer_syntax() {
    let outputs = deid_sample(&policy(&[]), &keys(4));
    let iods = IodTables::standard();
    let mut checked = 0;
    for (input, d, bytes) in &outputs {
        let out = open(bytes);
        assert_eq!(out.meta().transfer_syntax(), input.meta().transfer_syntax());
        assert_eq!(
            out.meta().media_storage_sop_instance_uid(),
            text(&out, Tag(0x0008, 0x0018)).unwrap_or_default(),
            "meta header names the new SOP instance"
        );
        let class = text(input, Tag(0x0008, 0x0016)).unwrap_or_default();
        for &tag in iods.mandatory_type1(&class) {
            let had = text(input, tag).is_some_and(|v| !v.is_empty())
                || matches!(
                    input.get(tag).map(|e| e.value()),
                    Some(Value::Sequence(_) | Value::PixelSequence(_))
                );
            if !had {
                continue;
            }
            let present = out.get(tag).is_some_and(|e| {
                !matches!(
                    e.value(),
                    Value::Primitive(dicom_core::PrimitiveValue::Empty)
                )
            });
            assert!(present, "{} lost Type 1 {tag}", d.relative_path().display());
            checked += 1;
        }
        assert_eq!(text(&out, Tag(0x0012, 0x0062)).as_deref(), Some("YES"));
        assert_eq!(text(&out, Tag(0x0028, 0x0303)).as_deref(), Some("REMOVED"));
        let codes: Vec<String> = items(&out, Tag(0x0012, 0x0064))
            .iter()
            .filter_map(|i| text(i, Tag(0x0008, 0x0100)))
            .collect();
        assert_eq!(codes, ["113100"]);
    }
    assert!(checked > 100, "checked {checked} Type 1 attributes");
}

fn pixel_bytes(o: &DefaultDicomObject) -> Vec<u8> {
    match o.get(Tag(0x7FE0, 0x0010)).map(|e| e.value()) {
        Some(Value::Primitive(p)) => p.to_bytes().into_owned(),
        Some(Value::PixelSequence(s)) => s.fragments().concat(),
        _ => Vec::new(),
    }
}

#[test]
fn pixel_data_passes_through_byte_for_byte() {
    let outputs = deid_sample(&policy(&[]), &keys(5));
    let mut with_pixels = 0;
    for (input, d, bytes) in &outputs {
        let out = open(bytes);
        let (a, b) = (pixel_bytes(input), pixel_bytes(&out));
        assert_eq!(a, b, "{}", d.relative_path().display());
        with_pixels += usize::from(!a.is_empty());
        // Uncompressed little endian: the raw encoded value is the file's tail in both.
        if input.meta().transfer_syntax().trim_end_matches('\0') == ts::EXPLICIT_LE && !a.is_empty()
        {
            assert!(
                bytes.ends_with(&a),
                "raw pixel bytes at the end of the output"
            );
        }
    }
    assert!(with_pixels >= 18, "{with_pixels} objects with pixel data");
}

#[test]
fn modified_dates_shift_every_date_of_a_patient_by_the_same_days_and_ages_are_banded() {
    let p = policy(&[
        DeidOption::RetainLongitudinalModifiedDates,
        DeidOption::RetainPatientCharacteristics,
    ]);
    let outputs = deid_sample(&p, &keys(6));
    let mut shifts: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let shift_between = |a: &str, b: &str| {
        let (a, b) = (
            dates::Date::parse_da(a).expect("date"),
            dates::Date::parse_da(b).expect("date"),
        );
        (0..=4000u32)
            .find(|n| a.minus_days(*n) == b)
            .map(i64::from)
            .unwrap_or(-1)
    };
    for (input, d, bytes) in &outputs {
        let out = open(bytes);
        let (Some(a), Some(b)) = (
            text(input, Tag(0x0008, 0x0020)),
            text(&out, Tag(0x0008, 0x0020)),
        ) else {
            continue;
        };
        shifts
            .entry(d.patient.to_string())
            .or_default()
            .insert(shift_between(&a, &b));
        assert_eq!(text(&out, Tag(0x0028, 0x0303)).as_deref(), Some("MODIFIED"));
        let Some(age) = text(&out, Tag(0x0010, 0x1010)) else {
            assert!(
                text(input, Tag(0x0010, 0x0030)).is_none(),
                "age computed when the birth date is known"
            );
            continue;
        };
        assert!(
            age.ends_with('Y') && age[..3].parse::<u32>().is_ok_and(|y| y % 5 == 0 || y == 90),
            "{age}"
        );
        assert_eq!(
            text(&out, Tag(0x0010, 0x0040)),
            text(input, Tag(0x0010, 0x0040)),
            "sex kept"
        );
    }
    assert_eq!(shifts.len(), 3);
    for (patient, s) in &shifts {
        assert_eq!(
            s.len(),
            1,
            "{patient}: one shift for all objects, got {s:?}"
        );
        let n = *s.iter().next().unwrap_or(&0);
        assert!((1..=3650).contains(&n), "{patient}: shift {n}");
    }
    // Born 1930-01-01, studied 2019: 89 years old -> band 85; the others by their bands.
    let ages: BTreeSet<String> = outputs
        .iter()
        .filter_map(|(_, _, b)| text(&open(b), Tag(0x0010, 0x1010)))
        .collect();
    assert_eq!(
        ages,
        ["035Y", "060Y", "085Y"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

#[test]
fn overlays_go_under_the_basic_profile_and_are_zeroed_under_clean_graphics() {
    let find_overlay = |p: &DeidPolicy| {
        let outputs = deid_sample(p, &keys(7));
        outputs
            .into_iter()
            .find(|(i, _, _)| i.get(Tag(0x6000, 0x3000)).is_some())
            .map(|(_, _, b)| open(&b))
            .expect("an input with an overlay")
    };
    let basic = find_overlay(&policy(&[]));
    assert!(
        basic.iter().all(|e| e.tag().group() != 0x6000),
        "whole overlay group removed"
    );
    let cleaned = find_overlay(&policy(&[DeidOption::CleanGraphics]));
    let data = cleaned
        .get(Tag(0x6000, 0x3000))
        .expect("overlay data kept")
        .value()
        .to_bytes()
        .expect("bytes")
        .into_owned();
    assert!(
        !data.is_empty() && data.iter().all(|b| *b == 0),
        "overlay plane zero-filled"
    );
    assert_eq!(
        text(&cleaned, Tag(0x6000, 0x0022)).as_deref(),
        Some(""),
        "overlay description emptied"
    );
    assert_eq!(
        text(&cleaned, Tag(0x6000, 0x4000)).as_deref(),
        Some(""),
        "overlay comments emptied"
    );
    assert!(
        cleaned.get(Tag(0x6000, 0x0010)).is_some(),
        "overlay geometry kept"
    );
}

#[test]
fn safe_private_attributes_survive_only_with_their_option_and_creator() {
    let mr = |p: &DeidPolicy| {
        deid_sample(p, &keys(8))
            .into_iter()
            .find(|(i, _, _)| text(i, Tag(0x0008, 0x0016)).as_deref() == Some(sample::sop::MR))
            .map(|(_, _, b)| open(&b))
            .expect("an MR")
    };
    let basic = mr(&policy(&[]));
    assert!(
        basic.iter().all(|e| e.tag().group() % 2 == 0),
        "no private element under the basic profile"
    );
    let safe = mr(&policy(&[DeidOption::RetainSafePrivate]));
    let private: Vec<Tag> = safe
        .iter()
        .map(|e| e.tag())
        .filter(|t| t.group() % 2 == 1)
        .collect();
    assert_eq!(
        private,
        [Tag(0x0019, 0x0010), Tag(0x0019, 0x100C)],
        "only the safe B-value and its creator"
    );
    let b_value = safe
        .get(Tag(0x0019, 0x100C))
        .expect("kept")
        .value()
        .to_bytes()
        .expect("bytes")
        .into_owned();
    assert_eq!(b_value, b"1000", "value byte for byte");
}

#[test]
fn dcmtk_reads_every_output_and_sees_no_identifying_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = sample::write_sample_archive(&dir.path().join("in")).expect("archive");
    let paths = BatchPaths {
        input: archive.root.clone(),
        output: dir.path().join("out"),
        quarantine: dir.path().join("q"),
    };
    let p = policy(&[]);
    let k = keys(11);
    let mut catalog = Catalog::open(&dir.path().join("catalog.sqlite")).expect("catalog");
    let settings = RunSettings {
        mode: "pseudonymise",
        edition: "2026c",
        options: "basic".into(),
        vault_key: None,
        batch_size: 4,
        progress: &batch::NoProgress,
        subjects: &node::volume::deid::SubjectRule::default(),
    };
    let summary =
        batch::deidentify_folder(&paths, &Deidentifier::new(&p, &k), &mut catalog, &settings)
            .expect("batch");
    assert_eq!(
        summary.written + summary.quarantined_total(),
        archive.files.len()
    );
    let outputs = batch::list_inputs(&paths.output).expect("outputs");
    assert_eq!(outputs.len(), summary.written);
    for f in outputs {
        let out = Command::new("dcmdump")
            .args(["-q", "+L"])
            .arg(&f)
            .output()
            .expect("dcmdump is installed by scripts/test.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("E:"),
            "dcmdump refused {}: {stderr}",
            f.display()
        );
        assert!(stdout.contains("(0012,0062) CS [YES]"), "{stdout}");
        for value in &archive.identifying {
            assert!(
                !stdout.contains(value.as_str()),
                "{value} visible to dcmdump in {}",
                rel(&paths.output, &f)
            );
        }
    }
}

fn rel(root: &Path, f: &Path) -> String {
    f.strip_prefix(root).unwrap_or(f).display().to_string()
}

#[test]
fn attributes_encoded_as_un_are_read_with_their_dictionary_vr() {
    let (input, originals) = sample::un_encoded_file().expect("fixture");
    // The input really holds them as UN.
    let raw = open(&input);
    assert_eq!(raw.get(Tag(0x0008, 0x0016)).expect("class").vr(), VR::UN);
    let (_, out) = batch::deidentify_bytes(&Deidentifier::new(&policy(&[]), &keys(9)), &input)
        .expect("de-identified");
    let o = open(&out);
    assert_eq!(
        text(&o, Tag(0x0008, 0x0016)).as_deref(),
        Some(sample::sop::CT),
        "SOP Class UID read and kept"
    );
    assert_eq!(
        o.meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0'),
        sample::sop::CT,
        "file meta SOP Class UID is the class, not a list of bytes"
    );
    for tag in [
        Tag(0x0008, 0x0018),
        Tag(0x0020, 0x000D),
        Tag(0x0020, 0x000E),
    ] {
        let v = text(&o, tag).unwrap_or_default();
        assert!(v.starts_with("2.25."), "{tag} remapped, got {v:?}");
    }
    assert_eq!(
        text(&o, Tag(0x0008, 0x0018)).as_deref(),
        Some(
            o.meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0')
        ),
        "meta and data set agree"
    );
    let refs = items(&o, Tag(0x0008, 0x2218));
    assert_eq!(refs.len(), 1, "the UN sequence is walked, not dropped");
    assert_eq!(
        text(&refs[0], Tag(0x0008, 0x0104)).as_deref(),
        Some("Brain")
    );
    assert!(
        text(&refs[0], Tag(0x0008, 0x1155))
            .unwrap_or_default()
            .starts_with("2.25."),
        "a UID inside the UN sequence is remapped"
    );
    assert!(
        o.iter()
            .all(|e| e.vr() != VR::UN || e.tag().group() % 2 == 1),
        "no standard attribute left as UN"
    );
    for v in &originals {
        assert!(
            !out.windows(v.len()).any(|w| w == v.as_bytes()),
            "{v} survives"
        );
    }
}

#[test]
fn only_registered_uids_are_kept_and_meta_agrees_with_the_data_set() {
    let p = sample::Patient {
        id: "REG-1".into(),
        issuer: String::new(),
        name: "Reg^Pat".into(),
        birth_date: "19800101".into(),
        sex: "M".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: format!("{}.88.1", sample::ORIGINAL_UID_ROOT),
        date: "20200101".into(),
        time: "100000".into(),
        accession: "REGACC".into(),
        description: "reg".into(),
        referring_physician: "Ref^Reg".into(),
        institution: "Reg Hospital".into(),
    };
    let se = sample::Series {
        uid: format!("{}.88.1.1", sample::ORIGINAL_UID_ROOT),
        number: 1,
        description: "reg".into(),
        frame_of_reference: format!("{}.88.1.1.0", sample::ORIGINAL_UID_ROOT),
        station: "REG".into(),
    };
    let deid = |instance: &str| {
        let mut o = sample::ct_slice(&p, &st, &se, 1);
        sample::put_text(&mut o, Tag(0x0008, 0x0018), VR::UI, instance);
        let bytes = sample::encode(o, ts::EXPLICIT_LE).expect("encode");
        let (_, out) = batch::deidentify_bytes(&Deidentifier::new(&policy(&[]), &keys(4)), &bytes)
            .expect("de-identified");
        let o = open(&out);
        let data_set = text(&o, Tag(0x0008, 0x0018)).unwrap_or_default();
        let meta = o
            .meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .to_owned();
        assert_eq!(data_set, meta, "meta and data set agree for {instance}");
        data_set
    };
    // A well-known SOP instance of the registry (the Hot Iron palette) is kept.
    assert_eq!(deid("1.2.840.10008.1.5.1"), "1.2.840.10008.1.5.1");
    // An instance UID that misuses the registry root is remapped.
    let misused = deid("1.2.840.10008.5.1.4.1.1.2.4711");
    assert!(misused.starts_with("2.25."), "{misused}");
}

#[test]
fn undefined_length_un_sequences_are_walked_too() {
    // The same file with its Anatomic Region Sequence written as CP-246 has it: UN with
    // undefined length, closed by a sequence delimiter.
    let (defined, originals) = sample::un_encoded_file().expect("fixture");
    let header = [0x08, 0x00, 0x18, 0x22, b'U', b'N', 0, 0];
    let at = defined
        .windows(8)
        .position(|w| w == header)
        .expect("the UN sequence");
    let len = u32::from_le_bytes([
        defined[at + 8],
        defined[at + 9],
        defined[at + 10],
        defined[at + 11],
    ]) as usize;
    let mut input = defined[..at + 8].to_vec();
    input.extend_from_slice(&[0xFF; 4]);
    input.extend_from_slice(&defined[at + 12..at + 12 + len]);
    input.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    input.extend_from_slice(&defined[at + 12 + len..]);
    let (_, out) = batch::deidentify_bytes(&Deidentifier::new(&policy(&[]), &keys(9)), &input)
        .expect("de-identified");
    let o = open(&out);
    let region = items(&o, Tag(0x0008, 0x2218));
    assert_eq!(region.len(), 1, "put back and walked");
    assert_eq!(
        text(&region[0], Tag(0x0008, 0x0104)).as_deref(),
        Some("Brain")
    );
    assert!(
        text(&region[0], Tag(0x0008, 0x1155))
            .unwrap_or_default()
            .starts_with("2.25.")
    );
    for v in &originals {
        assert!(
            !out.windows(v.len()).any(|w| w == v.as_bytes()),
            "{v} survives"
        );
    }
}

/// Text outside the standard's table: dates in another calendar, text content items outside
/// the cleaned containers, encrypted originals at any depth, URLs with the original host and
/// UIDs, document titles and descriptions, and any unlisted free-text attribute. Technical
/// descriptors on the shipped allow-list stay, and a site can keep more.
#[test]
fn free_text_outside_the_table_does_not_survive() {
    let p = sample::Patient {
        id: "TXT-1".into(),
        issuer: String::new(),
        name: "Text^Pat".into(),
        birth_date: "19800101".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: format!("{}.77.1", sample::ORIGINAL_UID_ROOT),
        date: "20200101".into(),
        time: "100000".into(),
        accession: "TXTACC".into(),
        description: "txt".into(),
        referring_physician: "Ref^Txt".into(),
        institution: "Txt Hospital".into(),
    };
    let se = sample::Series {
        uid: format!("{}.77.1.1", sample::ORIGINAL_UID_ROOT),
        number: 1,
        description: "txt".into(),
        frame_of_reference: format!("{}.77.1.1.0", sample::ORIGINAL_UID_ROOT),
        station: "TXT".into(),
    };
    let mut o = sample::ct_slice(&p, &st, &se, 1);
    let put = |o: &mut InMemDicomObject, g: u16, e: u16, vr: VR, v: &str| {
        sample::put_text(o, Tag(g, e), vr, v)
    };
    put(&mut o, 0x0010, 0x0033, VR::LO, "CANARY-ALTBIRTH 1400/07/12");
    put(&mut o, 0x0010, 0x0034, VR::LO, "CANARY-ALTDEATH 1440/01/02");
    put(&mut o, 0x0010, 0x0035, VR::CS, "ISLAMIC");
    put(
        &mut o,
        0x0008,
        0x1190,
        VR::UR,
        "https://pacs.canary-host.example/studies/1.2.826.0.1.3680043.77.1",
    );
    put(
        &mut o,
        0x0028,
        0x7FE0,
        VR::UR,
        "https://jpip.canary-host.example/1.2.826.0.1.3680043.77.1",
    );
    put(&mut o, 0x0040, 0xE001, VR::ST, "CANARY-HL7-ORDER-4711");
    put(
        &mut o,
        0x0042,
        0x0010,
        VR::ST,
        "CANARY-TITLE report of Jane Doe",
    );
    put(
        &mut o,
        0x0062,
        0x0006,
        VR::ST,
        "CANARY-SEGDESC lesion seen by Dr Who",
    );
    put(&mut o, 0x0070, 0x0081, VR::LO, "CANARY-CONTENT");
    // An unlisted free-text attribute, and one a site chooses to keep.
    put(&mut o, 0x0018, 0x9423, VR::LO, "CANARY-ACQPROTOCOL");
    put(&mut o, 0x0018, 0x9433, VR::LO, "KEPT-FOV-DESC");
    // Allow-listed technical descriptors.
    put(&mut o, 0x0018, 0x1210, VR::SH, "B30f");
    put(&mut o, 0x0018, 0x1250, VR::SH, "Head_32");
    // A text content item inside Performed Protocol Code Sequence > Protocol Context.
    let code = |value: &str, meaning: &str| {
        let mut c = InMemDicomObject::new_empty();
        put(&mut c, 0x0008, 0x0100, VR::SH, value);
        put(&mut c, 0x0008, 0x0102, VR::SH, "DCM");
        put(&mut c, 0x0008, 0x0104, VR::LO, meaning);
        c
    };
    let mut text_item = InMemDicomObject::new_empty();
    put(&mut text_item, 0x0040, 0xA040, VR::CS, "TEXT");
    text_item.put(sample::seq(
        Tag(0x0040, 0xA043),
        vec![code("121106", "Comment")],
    ));
    put(
        &mut text_item,
        0x0040,
        0xA160,
        VR::UT,
        "CANARY-PROTOCOL-CONTEXT patient Jane Doe",
    );
    let mut code_item = InMemDicomObject::new_empty();
    put(&mut code_item, 0x0040, 0xA040, VR::CS, "CODE");
    code_item.put(sample::seq(
        Tag(0x0040, 0xA043),
        vec![code("G-C0E8", "Contrast")],
    ));
    code_item.put(sample::seq(
        Tag(0x0040, 0xA168),
        vec![code("R-40775", "None")],
    ));
    let mut protocol = code("P5-0600", "CT head");
    protocol.put(sample::seq(Tag(0x0040, 0x0440), vec![text_item, code_item]));
    o.put(sample::seq(Tag(0x0040, 0x0260), vec![protocol]));
    // Encrypted originals at the top and inside an item.
    let mut encrypted = InMemDicomObject::new_empty();
    put(&mut encrypted, 0x0400, 0x0510, VR::UI, "1.2.840.10008.1.2");
    encrypted.put(dicom_core::DataElement::new(
        Tag(0x0400, 0x0520),
        VR::OB,
        dicom_core::value::PrimitiveValue::from(b"CANARY-ENCRYPTED".to_vec()),
    ));
    o.put(sample::seq(Tag(0x0400, 0x0500), vec![encrypted.clone()]));
    let mut source = InMemDicomObject::new_empty();
    put(&mut source, 0x0008, 0x1150, VR::UI, sample::sop::CT);
    put(
        &mut source,
        0x0008,
        0x1155,
        VR::UI,
        &format!("{}.77.9", sample::ORIGINAL_UID_ROOT),
    );
    source.put(sample::seq(Tag(0x0400, 0x0500), vec![encrypted]));
    o.put(sample::seq(Tag(0x0008, 0x2112), vec![source]));
    let bytes = sample::encode(o, ts::EXPLICIT_LE).expect("encode");

    let mut kept_by_site = policy(&[]);
    kept_by_site
        .keep_text_attributes
        .insert(Tag(0x0018, 0x9433));
    let (_, out) = batch::deidentify_bytes(&Deidentifier::new(&kept_by_site, &keys(5)), &bytes)
        .expect("de-identified");
    for needle in [
        "CANARY",
        "canary-host",
        "1400/07/12",
        "ISLAMIC",
        "Jane Doe",
        "3680043.77.1",
    ] {
        assert!(
            !out.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} survives"
        );
    }
    let o = open(&out);
    assert_eq!(text(&o, Tag(0x0018, 0x1210)).as_deref(), Some("B30f"));
    assert_eq!(text(&o, Tag(0x0018, 0x1250)).as_deref(), Some("Head_32"));
    assert_eq!(
        text(&o, Tag(0x0018, 0x9433)).as_deref(),
        Some("KEPT-FOV-DESC"),
        "kept by the site's configuration"
    );
    assert!(o.get(Tag(0x0400, 0x0500)).is_none());
    // The coded context item stays; the text item goes with its text.
    let protocol = items(&o, Tag(0x0040, 0x0260));
    assert_eq!(protocol.len(), 1);
    let context = items(&protocol[0], Tag(0x0040, 0x0440));
    assert_eq!(context.len(), 1, "only the CODE item is left");
    assert_eq!(
        text(&context[0], Tag(0x0040, 0xA040)).as_deref(),
        Some("CODE")
    );
    // Without the site's entry the unlisted attribute goes too.
    let (_, plain) = batch::deidentify_bytes(&Deidentifier::new(&policy(&[]), &keys(5)), &bytes)
        .expect("de-identified");
    assert!(open(&plain).get(Tag(0x0018, 0x9433)).is_none());
}

/// A file ending with native pixel data is de-identified from its header alone, its pixel data
/// copied as bytes: the output must be byte for byte what de-identifying the whole parsed
/// object writes, for every file of the sample archive, the three consortium sites' archives
/// (their vendors' encodings) and the hostile inputs, under no option and under every option.
#[test]
fn pixel_data_copied_as_bytes_writes_what_the_whole_object_path_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    let archive = sample::write_sample_archive(&dir.path().join("sample")).expect("archive");
    for f in &archive.files {
        inputs.push((f.display().to_string(), std::fs::read(f).expect("read")));
    }
    for site in sample::consortium_sites(2) {
        let a = sample::write_site_archive(&dir.path().join(&site.prefix), &site).expect("site");
        for f in &a.files {
            inputs.push((f.display().to_string(), std::fs::read(f).expect("read")));
        }
    }
    for h in sample::hostile_files().expect("hostile") {
        inputs.push((h.name.to_owned(), h.bytes));
    }
    let all: Vec<DeidOption> = DeidOption::ALL
        .into_iter()
        .filter(|o| *o != DeidOption::RetainLongitudinalFullDates)
        .collect();
    let mut taken = 0;
    for options in [Vec::new(), all] {
        let p = policy(&options);
        let k = keys(4);
        let deid = Deidentifier::new(&p, &k);
        for (name, bytes) in &inputs {
            let fast = batch::deidentify_bytes(&deid, bytes);
            let whole = batch::deidentify_whole(&deid, bytes);
            match (&fast, &whole) {
                (Ok((a, x)), Ok((b, y))) => {
                    assert!(x == y, "{name}: the outputs differ ({options:?})");
                    assert_eq!(a.relative_path(), b.relative_path(), "{name}");
                }
                (Err((r1, _)), Err((r2, _))) => assert_eq!(r1, r2, "{name}"),
                _ => panic!(
                    "{name}: one path refused what the other wrote: {:?} vs {:?}",
                    fast.as_ref().err(),
                    whole.as_ref().err()
                ),
            }
            if fast.is_ok() && node::read::native_pixel_data(bytes).is_some() {
                taken += 1;
            }
        }
    }
    assert!(
        taken >= 40,
        "the header-only path must be taken for native files (taken {taken} times)"
    );
}

/// Overlay planes in the unused high bits of native 16-bit pixel data are cleared on the
/// header-only path as on the whole-object path, in every uncompressed encoding, for
/// unsigned and signed samples.
#[test]
fn bits_above_high_bit_are_cleared_when_pixel_data_is_copied_as_bytes() {
    use dicom_core::{DataElement, PrimitiveValue};
    let p = policy(&[]);
    let k = keys(5);
    let deid = Deidentifier::new(&p, &k);
    let patient = sample::Patient {
        id: "OVL-1".into(),
        issuer: String::new(),
        name: "Overlay^Test".into(),
        birth_date: "19700101".into(),
        sex: "M".into(),
        charset: None,
    };
    let study = sample::Study {
        uid: format!("{}.77.1", sample::ORIGINAL_UID_ROOT),
        date: "20240101".into(),
        time: "080000".into(),
        accession: "OVL".into(),
        description: "d".into(),
        referring_physician: "R^P".into(),
        institution: "I".into(),
    };
    let series = sample::Series {
        uid: format!("{}.77.1.1", sample::ORIGINAL_UID_ROOT),
        number: 1,
        description: "s".into(),
        frame_of_reference: format!("{}.77.1.0", sample::ORIGINAL_UID_ROOT),
        station: "S".into(),
    };
    // 13 words: three u64 lanes of four and one left over; overlay bits in some of them.
    let words: Vec<u16> = (0..13u16)
        .map(|i| {
            let v = (i * 300) & 0x0FFF;
            if i % 3 == 0 { v | 0x8000 } else { v }
        })
        .collect();
    let mut checked = 0;
    for signed in [0u16, 1] {
        for syntax in [ts::EXPLICIT_LE, ts::IMPLICIT_LE, ts::EXPLICIT_BE] {
            let mut o = sample::ct_slice_sized(&patient, &study, &series, 1, 1, 13);
            for (tag, v) in [
                (Tag(0x0028, 0x0100), 16u16),
                (Tag(0x0028, 0x0101), 12),
                (Tag(0x0028, 0x0102), 11),
                (Tag(0x0028, 0x0103), signed),
            ] {
                o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
            }
            o.put(DataElement::new(
                Tag(0x7FE0, 0x0010),
                VR::OW,
                PrimitiveValue::U16(words.clone().into()),
            ));
            let bytes = sample::encode(o, syntax).expect("encode");
            assert!(
                node::read::native_pixel_data(&bytes).is_some(),
                "{syntax}: the header-only path applies"
            );
            let (_, fast) = batch::deidentify_bytes(&deid, &bytes).expect("fast");
            let (_, whole) = batch::deidentify_whole(&deid, &bytes).expect("whole");
            assert!(fast == whole, "{syntax}, signed {signed}: outputs differ");
            let out = open(&fast);
            let px = out
                .get(Tag(0x7FE0, 0x0010))
                .expect("pixel data")
                .value()
                .to_bytes()
                .expect("bytes")
                .into_owned();
            let got: Vec<u16> = px
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let want: Vec<u16> = words
                .iter()
                .map(|w| {
                    let low = w & 0x0FFF;
                    if signed == 1 && low & 0x0800 != 0 {
                        low | 0xF000
                    } else {
                        low
                    }
                })
                .collect();
            assert_eq!(got, want, "{syntax}, signed {signed}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}
