//! Harness bodies for fuzzing what a stranger controls: DICOM files through read, de-identify
//! and write (the output re-read and checked against the de-identification invariants), DIMSE
//! command sets and PDU streams, pixel decoding, NIfTI/Analyze headers and gzip, the schema,
//! `node.toml`, and the sidecar scrubber. The fuzz crate (`node/fuzz`) only calls these, so a
//! plain `cargo test` replays every committed regression input through the same code
//! (`node/fuzzing/tests/replay.rs`). Each body must never panic on any input; a panic is a finding.
//! The wire decoder's body is `protocol::fuzzing::decode_frame` (the floor has its own).

use std::sync::OnceLock;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::{Tag, VR};
use dicom_object::InMemDicomObject;

use node::deid::keys::{Keys, Secret};
use node::deid::registry::UidRegistry;
use node::deid::{DeidPolicy, Deidentifier};

/// A harness body: arbitrary bytes in, a panic on a finding.
pub type Body = fn(&[u8]);

/// Every target by name: the fuzz crate's binaries and the regression replay use this list.
pub const TARGETS: &[(&str, Body)] = &[
    ("dicom_ingest", dicom_ingest),
    ("dimse_command", dimse_command),
    ("pdu_stream", pdu_stream),
    ("pixel_decode", pixel_decode),
    ("nifti_input", nifti_input),
    ("schema_text", schema_text),
    ("node_config", node_config),
    ("sidecar", sidecar),
    ("wire_frame", protocol::fuzzing::decode_frame),
];

/// Run the named target on `data`; `false` when there is no such target.
pub fn run(target: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(name, _)| *name == target) {
        Some((_, body)) => {
            body(data);
            true
        }
        None => false,
    }
}

fn deidentifier() -> Deidentifier<'static> {
    static POLICY: OnceLock<DeidPolicy> = OnceLock::new();
    static KEYS: OnceLock<Keys> = OnceLock::new();
    let policy = POLICY.get_or_init(DeidPolicy::default);
    let keys = KEYS.get_or_init(|| {
        Keys::derive(
            &Secret::from_bytes(vec![0x5A; 32])
                .unwrap_or_else(|_| unreachable!("a 32-byte secret is valid")),
        )
    });
    Deidentifier::new(policy, keys)
}

/// A DICOM file through read, de-identification and write; whatever is written must read back
/// and hold the basic profile's invariants.
pub fn dicom_ingest(data: &[u8]) {
    let deid = deidentifier();
    let Ok((d, out)) = node::batch::deidentify_bytes(&deid, data) else {
        return;
    };
    let back = match node::read::read_object(&out) {
        Ok(o) => o,
        Err(r) => panic!("a de-identified output does not read back: {}", r.reason),
    };
    let pseudonym = d.patient.as_str();
    assert_eq!(
        node::read::text(&back, Tag(0x0010, 0x0020)),
        pseudonym,
        "Patient ID is the pseudonym"
    );
    assert_eq!(
        node::read::text(&back, Tag(0x0008, 0x0018)),
        back.meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0'),
        "meta and data set agree"
    );
    // In implicit VR the reader can only say UN for an attribute its dictionary lacks (retired
    // ones): the check of VRs applies to explicit VR outputs.
    let explicit = back.meta().transfer_syntax().trim_end_matches('\0') != "1.2.840.10008.1.2";
    check_deidentified(&back, pseudonym, explicit);
}

/// The ingest invariants applied to a file as it is (not de-identified first), so a test can
/// show they catch an identified object.
#[doc(hidden)]
pub fn check_for_test(data: &[u8]) {
    if let Ok(obj) = node::read::read_object(data) {
        let pseudonym = node::read::text(&obj, Tag(0x0010, 0x0020));
        check_deidentified(&obj, &pseudonym, true);
    }
}

/// The basic profile's invariants over a data set at every depth: no private attribute, no
/// standard attribute left as UN, every person name the pseudonym or a dummy, every UID
/// registered or remapped.
fn check_deidentified(obj: &InMemDicomObject, pseudonym: &str, explicit: bool) {
    for e in obj.iter() {
        let tag = e.tag();
        assert!(
            tag.group().is_multiple_of(2),
            "private attribute {tag} survives the basic profile"
        );
        assert!(!explicit || e.vr() != VR::UN, "{tag} left as UN");
        match e.value() {
            Value::Sequence(s) => {
                for item in s.items() {
                    check_deidentified(item, pseudonym, explicit);
                }
            }
            Value::Primitive(p) if e.vr() == VR::PN => {
                for v in p.to_multi_str().iter() {
                    let v = v.trim_matches([' ', '\0']);
                    assert!(
                        v.is_empty() || v == pseudonym || v == "DEIDENTIFIED",
                        "a person name survives in {tag}"
                    );
                }
            }
            Value::Primitive(p) if e.vr() == VR::UI => {
                for v in p.to_multi_str().iter() {
                    let v = v.trim_matches([' ', '\0']);
                    assert!(
                        v.is_empty()
                            || v.starts_with("2.25.")
                            || UidRegistry::standard().is_registered(v),
                        "an original UID survives in {tag}"
                    );
                }
            }
            _ => {}
        }
    }
}

/// A DIMSE command set as it arrives in P-DATA fragments.
pub fn dimse_command(data: &[u8]) {
    let _ = node::dimse::decode_command(data);
}

/// A stream of PDUs as a peer sends them: each parsed with the SCP's limits, every command
/// fragment decoded.
pub fn pdu_stream(data: &[u8]) {
    use dicom_ul::pdu::{PDataValueType, Pdu};
    let mut rest = data;
    for _ in 0..64 {
        match dicom_ul::pdu::read_pdu(&mut rest, 65536, true) {
            Ok(Some(Pdu::PData { data })) => {
                for pdv in data {
                    if pdv.value_type == PDataValueType::Command {
                        dimse_command(&pdv.data);
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

/// A DICOM file's pixel data through series assembly (native frames and every codec behind
/// dicom-pixeldata), after the reader's checks.
pub fn pixel_decode(data: &[u8]) {
    if let Ok(obj) = node::read::read_object(data) {
        let _ = node::volume::series::assemble(std::slice::from_ref(&obj));
    }
}

/// NIfTI-1/2 or Analyze bytes, plain or gzip.
pub fn nifti_input(data: &[u8]) {
    if let Ok((_, v)) = node::volume::nifti::read_bytes(data) {
        // What was read can be written.
        let _ = node::volume::nifti::encode(&v);
    }
}

/// The consortium schema's text.
pub fn schema_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = protocol::schema::CurationSchema::parse(text);
    }
}

/// `node.toml`.
pub fn node_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = node::config::NodeConfig::parse(text, std::path::Path::new("fuzz.toml"));
    }
}

/// A converter's JSON sidecar through the scrubber: nothing dated, no UID, no identifier key
/// survives.
pub fn sidecar(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let scrubbed = node::volume::deid::scrub_sidecar(&value, &DeidPolicy::default());
    if let serde_json::Value::Object(map) = scrubbed {
        for k in map.keys() {
            assert!(
                !(k.ends_with("UID") || k.ends_with("Date") || k.ends_with("DateTime")),
                "{k} survives the sidecar scrubber"
            );
        }
    }
}
