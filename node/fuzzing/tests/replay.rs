//! The fuzz targets' bodies on plain `cargo test`: every committed regression input
//! (`node/fuzz/regressions/<target>/`, findings of earlier campaigns) and every seed our fixture
//! builder makes replay through the same code the fuzzer runs, and must not panic.

use std::path::Path;

#[test]
fn committed_regression_inputs_replay_without_a_finding() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for (target, _) in fc_fuzzing::TARGETS {
        let dir = root.join(target);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        for entry in std::fs::read_dir(&dir).expect("regressions") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|n| n == ".gitkeep") {
                continue;
            }
            let data = std::fs::read(&path).expect("input");
            assert!(fc_fuzzing::run(target, &data));
            replayed += 1;
        }
    }
    eprintln!("{replayed} regression inputs replayed");
    // Every directory under regressions/ is a known target (a renamed target would otherwise
    // silently stop replaying its inputs).
    for entry in std::fs::read_dir(&root).expect("regressions") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            fc_fuzzing::TARGETS.iter().any(|(t, _)| *t == name),
            "regressions/{name} is not a fuzz target"
        );
    }
}

#[test]
fn every_seed_holds_the_harness_invariants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = node::sample::write_fuzz_seeds(dir.path()).expect("seeds");
    assert!(n > 50, "{n} seeds");
    let mut per_target = 0;
    for (target, body) in fc_fuzzing::TARGETS {
        let seeds = dir.path().join(target);
        let files: Vec<_> = std::fs::read_dir(&seeds)
            .unwrap_or_else(|_| panic!("no seeds for {target}"))
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(!files.is_empty(), "no seeds for {target}");
        for f in files {
            body(&std::fs::read(&f).expect("seed"));
            per_target += 1;
        }
    }
    assert_eq!(per_target, n);
}

#[test]
fn the_dicom_invariants_catch_a_leak() {
    // The ingest harness's checks are not vacuous: an object that kept a private attribute and
    // a person name fails them.
    let result = std::panic::catch_unwind(|| {
        let (file, _) = node::sample::un_encoded_file().expect("fixture");
        // Not de-identified: read and check directly.
        fc_fuzzing::check_for_test(&file);
    });
    assert!(
        result.is_err(),
        "an identified object passes the invariants"
    );
}

#[test]
fn a_pixel_description_under_another_vr_is_refused_with_its_reason() {
    // A campaign's finding: Samples per Pixel encoded as DA was "shifted" to a date by the
    // de-identifier, and the output then described more pixel data than it held. Such input
    // is refused when read, with the attribute named.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/dicom_ingest/crash-a249b3b00a29b95e296077b242633209af2fa149");
    let data = std::fs::read(path).expect("regression input");
    let refusal = node::read::read_object(&data).expect_err("refused");
    assert_eq!(refusal.reason, "bad-value-representation");
    assert!(
        refusal.detail.contains("Samples per Pixel"),
        "{}",
        refusal.detail
    );
}
