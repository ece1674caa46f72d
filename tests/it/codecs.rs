//! Compressed transfer syntaxes made by dcmtk at test time: de-identification passes the
//! compressed pixel data through untouched, and series assembly decodes it (or reports a
//! finding, never a crash) through dicom-pixeldata.

use std::path::Path;
use std::process::Command;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use node::batch;
use node::deid::keys::{Keys, Secret};
use node::deid::{DeidPolicy, Deidentifier};
use node::sample;
use node::volume::series::{SeriesFinding, assemble};

fn dcmtk(tool: &str, args: &[&str], input: &Path, output: &Path) {
    let out = Command::new(tool)
        .args(args)
        .arg(input)
        .arg(output)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (dcmtk, installed by scripts/test.sh): {e}"));
    assert!(
        out.status.success(),
        "{tool} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open(path: &Path) -> DefaultDicomObject {
    OpenFileOptions::new().open_file(path).expect("open")
}

fn deidentified(path: &Path) -> (DefaultDicomObject, Vec<u8>) {
    let keys = Keys::derive(&Secret::from_bytes(vec![9; 32]).expect("secret"));
    let policy = DeidPolicy::default();
    let bytes = std::fs::read(path).expect("read");
    let (_, out) =
        batch::deidentify_bytes(&Deidentifier::new(&policy, &keys), &bytes).expect("de-identified");
    (
        OpenFileOptions::new()
            .from_reader(out.as_slice())
            .expect("re-opens"),
        bytes,
    )
}

fn ct(eight_bit: bool) -> dicom_object::InMemDicomObject {
    let p = sample::Patient {
        id: "CODEC".into(),
        issuer: String::new(),
        name: "Codec^Pat".into(),
        birth_date: "19700101".into(),
        sex: "M".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: format!("{}.1.9", sample::ORIGINAL_UID_ROOT),
        date: "20240101".into(),
        time: "000000".into(),
        accession: "C".into(),
        description: "c".into(),
        referring_physician: "R^C".into(),
        institution: "I".into(),
    };
    let se = sample::Series {
        uid: format!("{}.1.9.1", sample::ORIGINAL_UID_ROOT),
        number: 1,
        description: "c".into(),
        frame_of_reference: format!("{}.1.9.1.0", sample::ORIGINAL_UID_ROOT),
        station: "S".into(),
    };
    let mut o = sample::ct_slice_sized(&p, &st, &se, 1, 32, 32);
    if eight_bit {
        for (tag, v) in [(0x0100u16, 8u16), (0x0101, 8), (0x0102, 7)] {
            o.put(DataElement::new(
                Tag(0x0028, tag),
                VR::US,
                PrimitiveValue::from(v),
            ));
        }
        let pixels: Vec<u8> = (0..32 * 32).map(|i| ((i * 13) % 251) as u8).collect();
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OB,
            PrimitiveValue::U8(pixels.into()),
        ));
        o.put(DataElement::new(
            Tag(0x0028, 0x1052),
            VR::DS,
            PrimitiveValue::from("0"),
        ));
    }
    o
}

#[test]
fn compressed_pixel_data_passes_through_and_decodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain16 = dir.path().join("plain16.dcm");
    std::fs::write(
        &plain16,
        sample::encode(ct(false), sample::ts::EXPLICIT_LE).expect("encode"),
    )
    .expect("write");
    let plain8 = dir.path().join("plain8.dcm");
    std::fs::write(
        &plain8,
        sample::encode(ct(true), sample::ts::EXPLICIT_LE).expect("encode"),
    )
    .expect("write");
    let reference16 = assemble(&[deidentified(&plain16).0]);
    let reference16 = reference16[0]
        .volume
        .as_ref()
        .expect("reference")
        .data
        .clone();
    let reference8 = assemble(&[deidentified(&plain8).0]);
    let reference8 = reference8[0]
        .volume
        .as_ref()
        .expect("reference")
        .data
        .clone();
    // (tool, args, source, lossless?, expected transfer syntax)
    let cases: [(&str, &[&str], &Path, bool, &str); 4] = [
        ("dcmcrle", &[], &plain16, true, "1.2.840.10008.1.2.5"),
        (
            "dcmcjpeg",
            &["--encode-lossless-sv1"],
            &plain16,
            true,
            "1.2.840.10008.1.2.4.70",
        ),
        (
            "dcmcjpeg",
            &["--encode-baseline"],
            &plain8,
            false,
            "1.2.840.10008.1.2.4.50",
        ),
        (
            "dcmcjpls",
            &["--encode-lossless"],
            &plain16,
            true,
            "1.2.840.10008.1.2.4.80",
        ),
    ];
    for (i, (tool, args, source, lossless, syntax)) in cases.into_iter().enumerate() {
        let compressed = dir.path().join(format!("c{i}.dcm"));
        dcmtk(tool, args, source, &compressed);
        let input = open(&compressed);
        assert_eq!(
            input.meta().transfer_syntax().trim_end_matches('\0'),
            syntax
        );
        let (out, _) = deidentified(&compressed);
        assert_eq!(
            out.meta().transfer_syntax().trim_end_matches('\0'),
            syntax,
            "{tool}: syntax kept"
        );
        let frag = |o: &DefaultDicomObject| match o.get(Tag(0x7FE0, 0x0010)).map(|e| e.value()) {
            Some(dicom_core::value::Value::PixelSequence(s)) => s.fragments().concat(),
            _ => Vec::new(),
        };
        assert!(
            !frag(&input).is_empty() && frag(&input) == frag(&out),
            "{tool}: compressed bytes pass through"
        );
        let vols = assemble(&[out]);
        let jpegls = syntax == "1.2.840.10008.1.2.4.80";
        if jpegls && !cfg!(feature = "jpegls") {
            assert!(
                matches!(
                    vols[0].findings.first(),
                    Some(SeriesFinding::Undecodable { .. })
                ),
                "{:?}",
                vols[0].findings
            );
            continue;
        }
        let v = vols[0]
            .volume
            .as_ref()
            .unwrap_or_else(|| panic!("{tool}: decoded ({:?})", vols[0].findings));
        let reference = if source == plain8 {
            &reference8
        } else {
            &reference16
        };
        if lossless {
            assert_eq!(
                &v.data, reference,
                "{tool}: lossless decode equals the original"
            );
        } else {
            let mean: f32 = v
                .data
                .iter()
                .zip(reference.iter())
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / v.data.len() as f32;
            assert!(
                mean < 8.0,
                "{tool}: lossy decode close to the original (mean error {mean})"
            );
        }
    }
    // JPEG 2000 lossless, encoded by OpenJPEG's opj_compress and wrapped in code.
    let raw_path = dir.path().join("slice.rawl");
    let plain = open(&plain16);
    let pixels = plain
        .get(Tag(0x7FE0, 0x0010))
        .expect("pixels")
        .value()
        .to_bytes()
        .expect("bytes")
        .into_owned();
    std::fs::write(&raw_path, &pixels).expect("raw");
    let j2k = dir.path().join("slice.j2k");
    let out = Command::new("opj_compress")
        .arg("-i")
        .arg(&raw_path)
        .arg("-o")
        .arg(&j2k)
        .args(["-F", "32,32,1,16,u"])
        .output()
        .expect("opj_compress (libopenjp2-tools, installed by scripts/test.sh)");
    assert!(
        out.status.success(),
        "opj_compress: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stream = std::fs::read(&j2k).expect("codestream");
    if stream.len() % 2 == 1 {
        stream.push(0);
    }
    let mut obj = ct(false);
    obj.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OB,
        dicom_core::value::Value::from(dicom_core::value::PixelFragmentSequence::new(
            Vec::<u32>::new(),
            vec![stream],
        )),
    ));
    let j2k_dcm = dir.path().join("j2k.dcm");
    std::fs::write(
        &j2k_dcm,
        sample::encode(obj, "1.2.840.10008.1.2.4.90").expect("encode"),
    )
    .expect("write");
    let vols = assemble(&[deidentified(&j2k_dcm).0]);
    let v = vols[0]
        .volume
        .as_ref()
        .unwrap_or_else(|| panic!("JPEG 2000 decoded ({:?})", vols[0].findings));
    assert_eq!(
        v.data, reference16,
        "JPEG 2000 lossless decode equals the original"
    );
    // 12-bit lossy JPEG (process 4) is not supported by the decoder: a finding, not a crash.
    let twelve = dir.path().join("c12.dcm");
    dcmtk("dcmcjpeg", &["--encode-extended"], &plain16, &twelve);
    let vols = assemble(&[deidentified(&twelve).0]);
    assert!(vols[0].volume.is_none());
    assert!(
        matches!(vols[0].findings.first(), Some(SeriesFinding::Undecodable { transfer_syntax, .. }) if transfer_syntax == "1.2.840.10008.1.2.4.51"),
        "{:?}",
        vols[0].findings
    );
}

/// An archive that keeps the same instance uncompressed, RLE-compressed and in implicit VR:
/// one output, the other two recorded as duplicates in another encoding, no `uid-conflict`.
/// A copy whose pixels differ stays a conflict.
#[test]
fn the_same_instance_in_two_encodings_is_a_duplicate_not_a_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("dir");
    let plain = input.join("plain.dcm");
    std::fs::write(
        &plain,
        sample::encode(ct(false), sample::ts::EXPLICIT_LE).expect("encode"),
    )
    .expect("write");
    dcmtk("dcmcrle", &[], &plain, &input.join("rle.dcm"));
    std::fs::write(
        input.join("implicit.dcm"),
        sample::encode(ct(false), sample::ts::IMPLICIT_LE).expect("encode"),
    )
    .expect("write");
    let mut other = ct(false);
    other.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OW,
        PrimitiveValue::U16(vec![7u16; 32 * 32].into()),
    ));
    let other = sample::encode(other, sample::ts::EXPLICIT_LE).expect("encode");
    let paths = batch::BatchPaths {
        input: input.clone(),
        output: dir.path().join("out"),
        quarantine: dir.path().join("q"),
    };
    let keys = Keys::derive(&Secret::from_bytes(vec![9; 32]).expect("secret"));
    let policy = DeidPolicy::default();
    let mut catalog =
        node::catalog::Catalog::open(&dir.path().join("catalog.sqlite")).expect("catalog");
    let settings = batch::RunSettings {
        mode: "pseudonymise",
        edition: "2026c",
        options: "basic".into(),
        vault_key: None,
        batch_size: 2,
        progress: &batch::NoProgress,
        subjects: &node::volume::deid::SubjectRule::default(),
    };
    let summary = batch::deidentify_folder(
        &paths,
        &Deidentifier::new(&policy, &keys),
        &mut catalog,
        &settings,
    )
    .expect("batch");
    assert_eq!(summary.written, 1, "{summary}");
    assert_eq!(summary.duplicates, 2, "{summary}");
    assert_eq!(summary.quarantined_total(), 0, "{summary}");
    // A later copy with other pixels under the same UIDs is a conflict.
    std::fs::write(input.join("other-pixels.dcm"), other).expect("write");
    let summary = batch::deidentify_folder(
        &paths,
        &Deidentifier::new(&policy, &keys),
        &mut catalog,
        &settings,
    )
    .expect("batch");
    assert_eq!(
        summary.quarantined.get("uid-conflict"),
        Some(&1),
        "different pixels under the same UIDs: {summary}"
    );
}
