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
        ("odd-length", "odd-length"),
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
