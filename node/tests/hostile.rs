//! Hostile and damaged inputs cost at most their size plus a fixed budget: the binary runs as
//! a child process under GNU time (installed by scripts/test.sh), which reports its peak RSS.

use std::path::Path;
use std::process::Command;

use node::sample::{self, HostileInput};

/// The fixed budget the issue sets: any input costs at most its size plus this.
const BUDGET: u64 = 64 * 1024 * 1024;

/// Run `fedcurate-node deid` over `input`; returns (peak RSS in bytes, catalog export lines).
fn deid(dir: &Path, input: &Path) -> (u64, Vec<serde_json::Value>) {
    let cfg = dir.join("node.toml");
    std::fs::write(&cfg, format!("data_dir = {:?}\n", dir.join("data"))).expect("config");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kb %M"])
        .arg(env!("CARGO_BIN_EXE_fedcurate-node"))
        .arg("--config")
        .arg(&cfg)
        .arg("deid")
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(dir.join("out"))
        .output()
        .expect("GNU time (package `time`, installed by scripts/test.sh) runs the node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deid fails instead of quarantining: {stderr}"
    );
    let peak = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("peak-rss-kb "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stderr}"))
        * 1024;
    let export = Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
        .arg("--config")
        .arg(&cfg)
        .args(["catalog", "export"])
        .output()
        .expect("catalog export");
    assert!(export.status.success());
    let rows = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    (peak, rows)
}

fn inputs() -> Vec<HostileInput> {
    let mut all = sample::hostile_files().expect("dicom fixtures");
    all.extend(sample::hostile_nifti().expect("nifti fixtures"));
    all
}

#[test]
fn each_hostile_input_is_refused_with_its_reason_within_its_size_plus_the_budget() {
    for input in inputs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("in");
        std::fs::create_dir_all(&folder).expect("input folder");
        std::fs::write(folder.join(input.name), &input.bytes).expect("fixture");
        let (peak, rows) = deid(dir.path(), &folder);
        let bound = input.bytes.len() as u64 + BUDGET;
        eprintln!("{}: peak RSS {} KiB", input.name, peak >> 10);
        assert!(
            peak <= bound,
            "{}: peak RSS {} MiB exceeds its size plus 64 MiB ({} MiB)",
            input.name,
            peak >> 20,
            bound >> 20
        );
        assert_eq!(rows.len(), 1, "{}: one catalog row", input.name);
        let row = &rows[0];
        match input.reason {
            Some(reason) => {
                assert_eq!(row["outcome"], "quarantined", "{}: {row}", input.name);
                assert_eq!(row["reason"], reason, "{}: {row}", input.name);
            }
            None => assert_eq!(row["outcome"], "written", "{}: {row}", input.name),
        }
    }
}

#[test]
fn a_folder_of_hostile_inputs_costs_at_most_the_batch_bound_plus_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("in");
    std::fs::create_dir_all(&folder).expect("input folder");
    let all = inputs();
    let total: u64 = all.iter().map(|i| i.bytes.len() as u64).sum();
    for input in &all {
        std::fs::write(folder.join(input.name), &input.bytes).expect("fixture");
    }
    let (peak, rows) = deid(dir.path(), &folder);
    assert_eq!(rows.len(), all.len(), "every input accounted for");
    // The batch bound (256 MiB) is far above these inputs: what they hold is the bound here.
    assert!(
        peak <= total + BUDGET,
        "peak RSS {} MiB for {} KiB of hostile input",
        peak >> 20,
        total >> 10
    );
}

#[test]
fn fuzzing_findings_cost_at_most_their_size_plus_the_budget() {
    // Every committed regression input of the file targets, run through the binary.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for target in ["dicom_ingest", "pixel_decode"] {
        for entry in std::fs::read_dir(root.join(target)).expect("regressions") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|f| f == ".gitkeep") {
                continue;
            }
            let bytes = std::fs::read(&path).expect("input");
            let dir = tempfile::tempdir().expect("tempdir");
            let folder = dir.path().join("in");
            std::fs::create_dir_all(&folder).expect("input folder");
            std::fs::write(folder.join("input.dcm"), &bytes).expect("copy");
            let (peak, rows) = deid(dir.path(), &folder);
            assert_eq!(rows.len(), 1, "{}", path.display());
            assert!(
                peak <= bytes.len() as u64 + BUDGET,
                "{}: peak RSS {} MiB",
                path.display(),
                peak >> 20
            );
            n += 1;
        }
    }
    assert!(n >= 3, "{n} regression inputs");
}
