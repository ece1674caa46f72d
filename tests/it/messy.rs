//! Messy files: each generated case ends as an output or as the expected quarantine reason,
//! and nothing identifying from any of them reaches an output.

use node::batch;
use node::deid::keys::{Keys, Secret};
use node::deid::{DeidPolicy, Deidentifier};
use node::sample;

#[test]
fn every_messy_case_has_its_expected_outcome_and_leaks_nothing() {
    let expected = [
        ("no-preamble", "written"),
        ("bare-implicit-le", "written"),
        ("bare-explicit-le", "written"),
        ("bare-explicit-be", "written"),
        ("meta-without-group-length", "written"),
        ("meta-without-transfer-syntax", "written"),
        ("deflated", "written"),
        ("big-endian", "written"),
        ("truncated-header", "truncated"),
        ("truncated-pixel-data", "truncated"),
        ("short-pixel-data", "truncated-pixel-data"),
        ("odd-length", "written"),
        ("wrong-item-delimiter", "bad-item-delimiter"),
        ("dicomdir", "dicomdir"),
        ("un-sequences", "written"),
    ];
    let files = sample::messy_files("MESSYMARK").expect("fixtures");
    assert_eq!(files.len(), expected.len());
    let policy = DeidPolicy::default();
    let keys = Keys::derive(&Secret::from_bytes(vec![3; 32]).expect("secret"));
    let deid = Deidentifier::new(&policy, &keys);
    for ((name, bytes), (want_name, want)) in files.iter().zip(expected) {
        assert_eq!(*name, want_name);
        let got = match batch::deidentify_bytes(&deid, bytes) {
            Ok((_, out)) => {
                assert!(
                    !out.windows(9).any(|w| w == b"MESSYMARK"),
                    "{name}: identifying value in the output"
                );
                // The output is a proper file that the strict reader accepts as is.
                let o = dicom_object::OpenFileOptions::new()
                    .from_reader(out.as_slice())
                    .expect("re-opens");
                assert!(o.meta().transfer_syntax().len() > 10);
                "written".to_owned()
            }
            Err((reason, detail)) => {
                assert!(!detail.is_empty(), "{name}: a detail for the quarantine");
                reason
            }
        };
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn odd_length_values_are_read_noted_and_written_even() {
    let files = sample::messy_files("MESSYMARK").expect("fixtures");
    let (_, bytes) = files
        .iter()
        .find(|(n, _)| *n == "odd-length")
        .expect("odd-length fixture");
    // The strict reader refuses the input ...
    assert!(
        dicom_object::OpenFileOptions::new()
            .odd_length_strategy(dicom_object::file::OddLengthStrategy::Fail)
            .from_reader(bytes.as_slice())
            .is_err()
    );
    let policy = DeidPolicy::default();
    let keys = Keys::derive(&Secret::from_bytes(vec![3; 32]).expect("secret"));
    let (d, out) =
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), bytes).expect("written");
    assert_eq!(d.input_finding, Some("odd-length"), "noted");
    // ... and accepts the output: every value has an even length.
    let o = dicom_object::OpenFileOptions::new()
        .odd_length_strategy(dicom_object::file::OddLengthStrategy::Fail)
        .from_reader(out.as_slice())
        .expect("even lengths");
    assert_eq!(
        node::read::text(&o, dicom_core::Tag(0x0008, 0x0016)),
        sample::sop::CT
    );
}

fn us_input(frames: u32) -> dicom_object::InMemDicomObject {
    let p = sample::Patient {
        id: "US-1".into(),
        issuer: String::new(),
        name: "Sono^Pat".into(),
        birth_date: "19700101".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: format!("{}.5.1", sample::ORIGINAL_UID_ROOT),
        date: "20230101".into(),
        time: "120000".into(),
        accession: "USACC".into(),
        description: "US".into(),
        referring_physician: "Ref^US".into(),
        institution: "US Hospital".into(),
    };
    let se = sample::Series {
        uid: format!("{}.5.1.1", sample::ORIGINAL_UID_ROOT),
        number: 1,
        description: "US".into(),
        frame_of_reference: format!("{}.5.1.1.0", sample::ORIGINAL_UID_ROOT),
        station: "US1".into(),
    };
    sample::us_multiframe_native(&p, &st, &se, frames)
}

fn rules(toml_text: &str) -> Vec<node::deid::pixels::MaskingRule> {
    let cfg =
        node::config::NodeConfig::parse(toml_text, std::path::Path::new("t.toml")).expect("config");
    cfg.deid.masking_rules
}

#[test]
fn burned_in_risk_is_quarantined_unless_a_rule_masks_it() {
    let keys = Keys::derive(&Secret::from_bytes(vec![4; 32]).expect("secret"));
    let input = sample::encode(us_input(3), sample::ts::EXPLICIT_LE).expect("encode");
    // No rule: quarantined.
    let none = DeidPolicy::default();
    let err =
        batch::deidentify_bytes(&Deidentifier::new(&none, &keys), &input).expect_err("refused");
    assert_eq!(err.0, "burned-in-risk");
    // A rule for another matrix size does not cover it.
    let other = DeidPolicy {
        masking_rules: rules(
            "data_dir = \"/x\"\n[[deid.masking_rules]]\nrows = 9\ncolumns = 8\nrectangles = [{ x = 0, y = 0, width = 8, height = 2 }]\n",
        ),
        ..DeidPolicy::default()
    };
    assert_eq!(
        batch::deidentify_bytes(&Deidentifier::new(&other, &keys), &input)
            .expect_err("refused")
            .0,
        "burned-in-risk"
    );
    // The matching rule masks the top two rows of every frame, and only them.
    let policy = DeidPolicy {
        masking_rules: rules(
            "data_dir = \"/x\"\n[[deid.masking_rules]]\nmanufacturer = \"acme medical\"\nmodel = \"SONO 5\"\nrows = 8\ncolumns = 8\nrectangles = [{ x = 0, y = 0, width = 8, height = 2 }]\n",
        ),
        ..DeidPolicy::default()
    };
    let (_, out) =
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), &input).expect("masked");
    let inp = dicom_object::OpenFileOptions::new()
        .from_reader(input.as_slice())
        .expect("input");
    let obj = dicom_object::OpenFileOptions::new()
        .from_reader(out.as_slice())
        .expect("output");
    let tag = dicom_core::Tag(0x7FE0, 0x0010);
    let before = inp
        .get(tag)
        .expect("pixels")
        .value()
        .to_multi_int::<u16>()
        .expect("words");
    let after = obj
        .get(tag)
        .expect("pixels")
        .value()
        .to_multi_int::<u16>()
        .expect("words");
    assert_eq!(before.len(), 3 * 64);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let row = (i % 64) / 8;
        if row < 2 {
            assert_eq!(*a, 0, "pixel {i} masked");
        } else {
            assert_eq!(a, b, "pixel {i} untouched");
        }
    }
    assert_eq!(
        obj.meta().transfer_syntax().trim_end_matches('\0'),
        sample::ts::EXPLICIT_LE
    );
    let text = |t: dicom_core::Tag| {
        obj.get(t)
            .and_then(|e| e.value().to_str().ok().map(|s| s.trim().to_owned()))
    };
    assert_eq!(text(dicom_core::Tag(0x0028, 0x0301)).as_deref(), Some("NO"));
    let codes = match obj.get(dicom_core::Tag(0x0012, 0x0064)).map(|e| e.value()) {
        Some(dicom_core::value::Value::Sequence(s)) => s
            .items()
            .iter()
            .filter_map(|i| {
                i.get(dicom_core::Tag(0x0008, 0x0100))
                    .and_then(|e| e.value().to_str().ok().map(|s| s.into_owned()))
            })
            .collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    assert!(codes.iter().any(|c| c == "113101"), "{codes:?}");
    // Compressed pixel data under a rule cannot be masked here: quarantined.
    let mut compressed = us_input(1);
    compressed.put(dicom_core::DataElement::new(
        tag,
        dicom_core::VR::OB,
        dicom_core::value::Value::from(dicom_core::value::PixelFragmentSequence::new(
            vec![0u32],
            vec![vec![0xFFu8, 0xD8, 0xFF, 0xD9]],
        )),
    ));
    let bytes = sample::encode(compressed, sample::ts::JPEG_BASELINE).expect("encode");
    assert_eq!(
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), &bytes)
            .expect_err("refused")
            .0,
        "burned-in-compressed"
    );
}

#[test]
fn text_in_iso_2022_is_kept_byte_for_byte_and_identifying_text_goes() {
    let (file, manufacturer) = sample::iso2022_file();
    let keys = Keys::derive(&Secret::from_bytes(vec![5; 32]).expect("secret"));
    let policy = DeidPolicy::default();
    let (d, out) =
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), &file).expect("written");
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(find(&out, &manufacturer), "kept text byte-identical");
    assert!(find(&out, b"\\ISO 2022 IR 87 "), "character set restored");
    assert!(!find(&out, b"Yamada"), "identifying text removed");
    assert!(
        !find(&out, &[0x42, 0x40, 0x4F, 0x3A]),
        "identifying ideographic text removed"
    );
    assert!(find(&out, d.patient.as_str().as_bytes()));
    let o = dicom_object::OpenFileOptions::new()
        .from_reader(out.as_slice())
        .expect("re-opens");
    let cs = o
        .get(dicom_core::Tag(0x0008, 0x0005))
        .expect("charset")
        .value()
        .to_str()
        .expect("text")
        .into_owned();
    assert!(cs.contains("ISO 2022 IR 87"), "{cs}");
}

#[test]
fn text_in_an_unsupported_character_set_is_kept_byte_for_byte() {
    // A set dicom-rs does not know, with bytes above 0x7F in the kept text.
    let kept = [0xC4u8, 0xE9, 0xFC, 0xB5];
    let (file, manufacturer) = sample::charset_file(b"ISO_IR 999  ", &kept);
    let keys = Keys::derive(&Secret::from_bytes(vec![6; 32]).expect("secret"));
    let policy = DeidPolicy::default();
    let (_, out) =
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), &file).expect("written");
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(find(&out, &manufacturer), "kept text byte-identical");
    assert!(find(&out, b"ISO_IR 999  "), "character set restored");
    assert!(!find(&out, b"Yamada"), "identifying text removed");
}

#[test]
fn korean_with_code_extensions_is_kept_byte_for_byte() {
    // ISO 2022 IR 149: the escape sequence designating KS X 1001 into G1, then two characters.
    let kept = [0x1Bu8, 0x24, 0x29, 0x43, 0xC8, 0xAB, 0xB1, 0xE6];
    let (file, manufacturer) = sample::charset_file(b"\\ISO 2022 IR 149", &kept);
    let keys = Keys::derive(&Secret::from_bytes(vec![7; 32]).expect("secret"));
    let policy = DeidPolicy::default();
    let (_, out) =
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), &file).expect("written");
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(find(&out, &manufacturer), "kept text byte-identical");
    assert!(find(&out, b"\\ISO 2022 IR 149"), "character set restored");
    assert!(!find(&out, b"Yamada"), "identifying text removed");
}

/// Native pixel data holds exactly what its geometry needs, whatever the photometric
/// interpretation: YBR_FULL_422 two samples per pixel, bits allocated 1 packed across frames.
#[test]
fn pixel_data_length_is_checked_per_photometric_interpretation() {
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    let image = |photometric: &str, samples: u16, bits: u16, frames: u32, bytes: usize| {
        let mut o = dicom_object::InMemDicomObject::new_empty();
        sample::put_text(&mut o, Tag(0x0008, 0x0016), VR::UI, sample::sop::CT);
        sample::put_text(&mut o, Tag(0x0008, 0x0018), VR::UI, "2.25.77");
        sample::put_text(&mut o, Tag(0x0028, 0x0004), VR::CS, photometric);
        sample::put_text(&mut o, Tag(0x0028, 0x0008), VR::IS, &frames.to_string());
        for (tag, v) in [
            (Tag(0x0028, 0x0002), samples),
            (Tag(0x0028, 0x0010), 8),
            (Tag(0x0028, 0x0011), 8),
            (Tag(0x0028, 0x0100), bits),
            (Tag(0x0028, 0x0101), bits),
        ] {
            o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
        }
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OB,
            PrimitiveValue::from(vec![0u8; bytes]),
        ));
        let file = sample::encode(o, sample::ts::EXPLICIT_LE).expect("encode");
        node::read::read_object(&file)
            .map(|_| ())
            .map_err(|r| r.reason)
    };
    // 8 x 8 YBR_FULL_422, 8 bits: 2 bytes per pixel (not 3).
    assert_eq!(image("YBR_FULL_422", 3, 8, 1, 128), Ok(()));
    assert_eq!(
        image("YBR_FULL_422", 3, 8, 1, 126),
        Err("truncated-pixel-data")
    );
    assert_eq!(image("RGB", 3, 8, 1, 192), Ok(()));
    assert_eq!(image("RGB", 3, 8, 1, 128), Err("truncated-pixel-data"));
    // Bits allocated 1: 3 frames of 64 pixels in 24 bytes.
    assert_eq!(image("MONOCHROME2", 1, 1, 3, 24), Ok(()));
    assert_eq!(
        image("MONOCHROME2", 1, 1, 3, 22),
        Err("truncated-pixel-data")
    );
}

/// Every refusal names what could not be handled; none is a bare "unreadable".
#[test]
fn refusals_name_what_could_not_be_handled() {
    let policy = DeidPolicy::default();
    let keys = Keys::derive(&Secret::from_bytes(vec![3; 32]).expect("secret"));
    let deid = Deidentifier::new(&policy, &keys);
    let mut inputs: Vec<(String, Vec<u8>)> = sample::messy_files("MESSYMARK")
        .expect("fixtures")
        .into_iter()
        .map(|(n, b)| (n.to_owned(), b))
        .collect();
    for h in sample::hostile_files().expect("hostile") {
        inputs.push((h.name.to_owned(), h.bytes));
    }
    // A magic code with nothing usable after it, and a meta group that ends mid-element.
    let mut garbage = vec![0u8; 128];
    garbage.extend_from_slice(b"DICM\x02\x00\x10\x00UI\x40\x00short");
    inputs.push(("meta-cut".into(), garbage));
    inputs.push(("magic-only".into(), b"DICM".to_vec()));
    let known = [
        "truncated",
        "truncated-pixel-data",
        "bad-item-delimiter",
        "bad-value-representation",
        "bad-value-length",
        "nesting-too-deep",
        "deflated-too-large",
        "unsupported-transfer-syntax",
        "bad-file-meta",
        "unknown-encoding",
        "undecodable-data-set",
        "dicomdir",
        "not-dicom",
        "burned-in-risk",
        "missing-sop-instance-uid",
        "invalid-sop-class-uid",
        "invalid-sop-instance-uid",
        "nested-un-sequence",
    ];
    for (name, bytes) in &inputs {
        if let Err((reason, detail)) = batch::deidentify_bytes(&deid, bytes) {
            assert!(
                known.contains(&reason.as_str()),
                "{name}: reason {reason:?} ({detail})"
            );
            assert!(!detail.is_empty(), "{name}: a detail");
        }
    }
}
