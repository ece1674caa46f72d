//! Nothing lost: the catalog, resume after kills, conflicts, quarantine, the re-identification
//! map and the audit chain, driven through the `fedcurate-node` binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use node::sample::{self, ts};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "command failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("binary runs");
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn sha256(bytes: &[u8]) -> String {
    node::batch::content_hash(bytes)
}

struct Site {
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

impl Site {
    fn new(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!("data_dir = {:?}\n[deid]\n{extra}", dir.path().join("data")),
        )
        .expect("config");
        Site { dir, cfg }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn cmd(&self) -> Command {
        let mut c = bin();
        c.arg("--config").arg(&self.cfg);
        c
    }

    fn deid(&self, input: &Path, output: &Path) -> Command {
        let mut c = self.cmd();
        c.args(["deid", "--input"])
            .arg(input)
            .arg("--output")
            .arg(output);
        c
    }

    fn export(&self) -> Vec<serde_json::Value> {
        let out = run(self.cmd().args(["catalog", "export"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(|x| x.as_str())
}

/// A tiny deterministic generator for kill delays.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[test]
fn killed_runs_resume_and_account_for_every_input_exactly_once() {
    let site = Site::new("batch_size = 7\n");
    let input = site.path("in");
    let mut files = sample::write_bulk_archive(&input, 40, 12).expect("bulk archive");
    files.extend(
        sample::write_sample_archive(&input.join("mixed"))
            .expect("sample")
            .files,
    );
    // An identical copy and a conflicting instance (same SOP Instance UID, other content).
    std::fs::copy(&files[0], input.join("copy_of_first.dcm")).expect("copy");
    let mut conflicting = std::fs::read(&files[1]).expect("read");
    let n = conflicting.len();
    conflicting[n - 1] ^= 0xFF; // last pixel byte
    std::fs::write(input.join("conflict.dcm"), conflicting).expect("write");
    let total = files_under(&input).len();
    let output = site.path("out");

    let mut rng = Lcg(0x5EED);
    let mut kills = 0;
    let mut partial_counts = Vec::new();
    let written = |output: &std::path::Path| {
        files_under(output)
            .iter()
            .filter(|p| !p.to_string_lossy().contains(".fc-tmp-"))
            .count()
    };
    for i in 0..14 {
        let before = written(&output);
        let mut child = site
            .deid(&input, &output)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        // Even runs are killed at a random time from the start; odd runs once this run has
        // written something (so some kills land mid-way however loaded the machine is).
        let delay = Duration::from_millis(5 + rng.next(150));
        let started = Instant::now();
        loop {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            let due = if i % 2 == 0 {
                started.elapsed() >= delay
            } else {
                written(&output) > before || started.elapsed() > Duration::from_secs(20)
            };
            if due {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().expect("wait").is_none() {
            child.kill().expect("kill");
            kills += 1;
        }
        child.wait().expect("reaped");
        let n = files_under(&output)
            .iter()
            .filter(|p| !p.to_string_lossy().contains(".fc-tmp-"))
            .count();
        partial_counts.push(n);
    }
    assert!(kills >= 5, "only {kills} runs were killed mid-way");
    let out = run(&mut site.deid(&input, &output));
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();

    // Every input has exactly one record; outcomes add up to the inputs.
    let rows = site.export();
    assert_eq!(rows.len(), total, "{summary}");
    let keys: BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                field(r, "path_key").unwrap_or("").to_owned(),
                field(r, "input_marker").unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(keys.len(), total, "no input recorded twice");
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        *by_outcome
            .entry(field(r, "outcome").unwrap_or("").to_owned())
            .or_default() += 1;
    }
    assert!(
        summary.contains(&format!("inputs        {total}")),
        "{summary}"
    );
    for (outcome, label) in [
        ("written", "written"),
        ("duplicate", "duplicates"),
        ("quarantined", "quarantined"),
    ] {
        let n = by_outcome.get(outcome).copied().unwrap_or(0);
        assert!(
            summary.contains(&format!("{label:<14}{n}")),
            "{outcome} {n} in:\n{summary}"
        );
    }
    assert_eq!(by_outcome.get("duplicate"), Some(&1), "{by_outcome:?}");
    // Every written output exists, is complete and matches its recorded hash.
    let written: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| field(r, "outcome") == Some("written"))
        .collect();
    let on_disk = files_under(&output);
    assert_eq!(
        on_disk.len(),
        written.len(),
        "one file per written input, nothing else"
    );
    for r in &written {
        let path = output.join(field(r, "output_path").expect("path"));
        let bytes = std::fs::read(&path).expect("output exists");
        assert_eq!(Some(sha256(&bytes).as_str()), field(r, "output_sha256"));
        dicom_object::OpenFileOptions::new()
            .from_reader(bytes.as_slice())
            .expect("complete DICOM");
    }
    // The quarantine holds exactly the quarantined originals; no temporary file anywhere.
    let quarantined: BTreeSet<&str> = rows
        .iter()
        .filter(|r| field(r, "outcome") == Some("quarantined"))
        .filter_map(|r| field(r, "input_marker"))
        .collect();
    let q_files: BTreeSet<String> = files_under(&site.path("data/quarantine"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(q_files, quarantined.iter().map(|s| s.to_string()).collect());
    assert!(
        rows.iter()
            .any(|r| field(r, "reason") == Some("uid-conflict")),
        "the conflicting instance is quarantined"
    );
    for root in [&output, &site.path("data")] {
        assert!(
            files_under(root)
                .iter()
                .all(|p| !p.to_string_lossy().contains(".fc-tmp-")),
            "temporary files left"
        );
    }
    assert!(
        partial_counts.iter().any(|&n| n > 0 && n < written.len()),
        "some kill must land after outputs were written and before the end: {partial_counts:?}"
    );
    // A last run changes nothing.
    let before: Vec<Vec<u8>> = on_disk
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    let again = run(&mut site.deid(&input, &output));
    assert!(String::from_utf8_lossy(&again.stdout).contains(&format!("done before {total}")));
    let after: Vec<Vec<u8>> = files_under(&output)
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert!(before == after);
    run(site.cmd().args(["audit", "verify"]));
}

#[test]
fn conflicts_keep_the_catalogued_instance_and_copies_are_written_once() {
    let site = Site::new("");
    let input = site.path("in");
    let files = sample::write_bulk_archive(&input, 1, 3).expect("archive");
    let output = site.path("out");
    run(&mut site.deid(&input, &output));
    // Later: a copy under another name, and another object with the first slice's UID.
    let later = site.path("later");
    std::fs::create_dir_all(&later).expect("dir");
    std::fs::copy(&files[0], later.join("copy.dcm")).expect("copy");
    let mut other = std::fs::read(&files[0]).expect("read");
    let n = other.len();
    other[n - 2] ^= 0x55;
    std::fs::write(later.join("other.dcm"), &other).expect("write");
    let before = files_under(&output);
    let before_bytes: Vec<Vec<u8>> = before
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    run(&mut site.deid(&later, &output));
    assert_eq!(files_under(&output), before, "nothing new written");
    let after_bytes: Vec<Vec<u8>> = before
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert!(
        before_bytes == after_bytes,
        "the catalogued instance is kept"
    );
    let rows = site.export();
    let outcomes: Vec<(&str, Option<&str>)> = rows
        .iter()
        .skip(3)
        .map(|r| (field(r, "outcome").unwrap_or(""), field(r, "reason")))
        .collect();
    assert!(outcomes.contains(&("duplicate", None)), "{outcomes:?}");
    assert!(
        outcomes.contains(&("quarantined", Some("uid-conflict"))),
        "{outcomes:?}"
    );
    let list = run(site.cmd().args(["quarantine", "list"]));
    assert!(String::from_utf8_lossy(&list.stdout).contains("uid-conflict"));
}

#[test]
fn running_over_the_output_changes_nothing() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive(&input, 2, 3).expect("archive");
    let output = site.path("out");
    run(&mut site.deid(&input, &output));
    let second = site.path("out2");
    let out = run(&mut site.deid(&output, &second));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("own output    6"), "{s}");
    assert!(s.contains("written       0"), "{s}");
    assert!(
        files_under(&second).is_empty(),
        "nothing de-identified twice"
    );
}

#[test]
fn quarantine_release_retries_and_is_audited() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_sample_archive(&input).expect("archive");
    let output = site.path("out");
    run(&mut site.deid(&input, &output));
    let list =
        String::from_utf8_lossy(&run(site.cmd().args(["quarantine", "list"])).stdout).into_owned();
    let missing = list
        .lines()
        .find(|l| l.contains("missing-sop-instance-uid"))
        .and_then(|l| l.split_whitespace().next())
        .expect("entry")
        .to_owned();
    // Still refused: the reason has not gone away; nothing changes.
    let e = fails(site.cmd().args(["quarantine", "release", &missing]));
    assert!(e.contains("still refused: missing-sop-instance-uid"), "{e}");
    let e = fails(site.cmd().args(["quarantine", "release", "ffffffffffff"]));
    assert!(e.contains("no quarantined input"), "{e}");
    // Fix the file in place, as a reviewer would after adding a rule, and release it.
    let qdir = site.path("data/quarantine");
    let original = files_under(&qdir)
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&missing))
        .expect("original");
    let bytes = std::fs::read(&original).expect("read");
    let mut obj = dicom_object::OpenFileOptions::new()
        .from_reader(bytes.as_slice())
        .expect("dicom");
    sample::put_text(
        &mut obj,
        dicom_core::Tag(0x0008, 0x0018),
        dicom_core::VR::UI,
        "1.2.826.0.1.3680043.10.543.77.1",
    );
    let mut fixed = Vec::new();
    obj.write_all(&mut fixed).expect("encode");
    std::fs::write(&original, fixed).expect("write");
    let before = files_under(&output).len();
    let out = run(site
        .cmd()
        .args(["quarantine", "release", &missing[..10], "--output"])
        .arg(&output));
    assert!(String::from_utf8_lossy(&out.stdout).contains("released"));
    assert_eq!(files_under(&output).len(), before + 1);
    assert!(
        !original.exists(),
        "released original removed from quarantine"
    );
    let all =
        String::from_utf8_lossy(&run(site.cmd().args(["quarantine", "list", "--all"])).stdout)
            .into_owned();
    assert!(
        all.lines()
            .any(|l| l.starts_with(&missing[..16]) && !l.trim_end().ends_with('-')),
        "{all}"
    );
    let audit =
        String::from_utf8_lossy(&run(site.cmd().args(["audit", "list"])).stdout).into_owned();
    assert!(audit.contains("quarantine-release"), "{audit}");
    let rows = site.export();
    assert!(
        rows.iter()
            .any(|r| field(r, "input_marker") == Some(&missing[..])
                || field(r, "input_marker").is_some_and(|h| h.starts_with(&missing))
                    && field(r, "outcome") == Some("written"))
    );
}

#[test]
fn reidentification_needs_the_right_key_and_is_audited() {
    let keydir = tempfile::tempdir().expect("tempdir");
    let key = keydir.path().join("vault.key");
    let wrong = keydir.path().join("wrong.key");
    run(bin().args(["secret", "generate", "--out"]).arg(&key));
    run(bin().args(["secret", "generate", "--out"]).arg(&wrong));
    let site = Site::new(&format!(
        "reidentification_map = true\nvault_key_file = {key:?}\n"
    ));
    let input = site.path("in");
    sample::write_sample_archive(&input).expect("archive");
    run(&mut site.deid(&input, &site.path("out")));
    let rows = site.export();
    let pseudonyms: BTreeSet<&str> = rows.iter().filter_map(|r| field(r, "patient")).collect();
    assert_eq!(pseudonyms.len(), 3);
    let mut ids = BTreeSet::new();
    for p in &pseudonyms {
        let out = run(site.cmd().args(["reidentify", p]));
        ids.insert(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let expected: BTreeSet<String> = ["MRN-100234", "MRN-100577", "MRN-200001"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(ids, expected);
    let first = pseudonyms.iter().next().expect("one");
    let name = run(site
        .cmd()
        .args(["reidentify", first, "--field", "birth-date"]));
    assert_eq!(
        String::from_utf8_lossy(&name.stdout).trim().len(),
        8,
        "only the birth date is printed"
    );
    // The catalog holds no readable identifier; a wrong key cannot open it.
    let catalog = std::fs::read(site.path("data/catalog.sqlite")).expect("catalog");
    for id in &expected {
        assert!(
            !catalog.windows(id.len()).any(|w| w == id.as_bytes()),
            "{id} readable in the catalog"
        );
    }
    let wrong_site = std::fs::read_to_string(&site.cfg)
        .expect("cfg")
        .replace(&format!("{key:?}"), &format!("{wrong:?}"));
    std::fs::write(&site.cfg, wrong_site).expect("cfg");
    let e = fails(site.cmd().args(["reidentify", first]));
    assert!(e.contains("does not decrypt"), "{e}");
    let audit =
        String::from_utf8_lossy(&run(site.cmd().args(["audit", "list"])).stdout).into_owned();
    assert_eq!(audit.matches("reidentify").count(), 4, "{audit}");
    // Key rotation: the map is re-encrypted under a new key; pseudonyms and linkage stay.
    let restored = std::fs::read_to_string(&site.cfg)
        .expect("cfg")
        .replace(&format!("{wrong:?}"), &format!("{key:?}"));
    std::fs::write(&site.cfg, restored).expect("cfg");
    let rotated = keydir.path().join("rotated.key");
    run(bin().args(["secret", "generate", "--out"]).arg(&rotated));
    let old_ciphertexts: Vec<Vec<u8>> = {
        let db = rusqlite::Connection::open(site.path("data/catalog.sqlite")).expect("catalog");
        let mut st = db.prepare("SELECT ciphertext FROM vault").expect("query");
        st.query_map([], |r| r.get::<_, Vec<u8>>(0))
            .expect("rows")
            .map(|r| r.expect("row"))
            .collect()
    };
    assert_eq!(old_ciphertexts.len(), 3);
    let out = run(site
        .cmd()
        .args(["secret", "rotate-vault", "--new-key"])
        .arg(&rotated));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("re-encrypted 3 entries"),
        "{out:?}"
    );
    // No old ciphertext is left in the database file, its free pages or its log: whoever
    // holds the old key and a copy of the data directory cannot open the old map.
    for file in ["catalog.sqlite", "catalog.sqlite-wal"] {
        let bytes = std::fs::read(site.path("data").join(file)).unwrap_or_default();
        for c in &old_ciphertexts {
            assert!(
                !bytes.windows(c.len()).any(|w| w == c.as_slice()),
                "an old ciphertext survives in {file}"
            );
        }
    }
    let e = fails(site.cmd().args(["reidentify", first]));
    assert!(
        e.contains("does not decrypt"),
        "the old key no longer opens the map: {e}"
    );
    let new_cfg = std::fs::read_to_string(&site.cfg)
        .expect("cfg")
        .replace(&format!("{key:?}"), &format!("{rotated:?}"));
    std::fs::write(&site.cfg, new_cfg).expect("cfg");
    let mut after = BTreeSet::new();
    for p in &pseudonyms {
        let out = run(site.cmd().args(["reidentify", p]));
        after.insert(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    assert_eq!(after, expected, "the same identities under the new key");
    // Anonymisation keeps no map.
    let anon = Site::new(&format!(
        "reidentification_map = true\nvault_key_file = {key:?}\n"
    ));
    run(anon.deid(&input, &anon.path("out")).arg("--anonymise"));
    let p = anon
        .export()
        .iter()
        .find_map(|r| field(r, "patient").map(str::to_owned))
        .expect("pseudonym");
    let e = fails(anon.cmd().args(["reidentify", &p]));
    assert!(e.contains("no re-identification map entry"), "{e}");
}

#[test]
fn the_audit_chain_detects_an_edited_entry() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive(&input, 1, 2).expect("archive");
    run(&mut site.deid(&input, &site.path("out")));
    run(&mut site.deid(&input, &site.path("out")));
    let ok = run(site.cmd().args(["audit", "verify"]));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact: 2 entries"));
    let db = rusqlite::Connection::open(site.path("data/catalog.sqlite")).expect("open");
    db.execute(
        "UPDATE audit SET detail = replace(detail, '\"written\":2', '\"written\":0') WHERE seq = 1",
        [],
    )
    .expect("tamper");
    drop(db);
    let e = fails(site.cmd().args(["audit", "verify"]));
    assert!(
        e.contains("broken at entry 1") && e.contains("changed"),
        "{e}"
    );
}

#[test]
fn secret_backup_and_restore_keep_pseudonyms_stable() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive(&input, 1, 1).expect("archive");
    run(&mut site.deid(&input, &site.path("out")));
    let backup = site.path("backup.secret");
    run(site.cmd().args(["secret", "backup", "--out"]).arg(&backup));
    let e = fails(
        site.cmd()
            .args(["secret", "restore", "--from"])
            .arg(site.path("missing")),
    );
    assert!(e.contains("missing"), "{e}");
    // Lose the secret and the catalog; restore the secret: the same pseudonym comes back.
    let first = site.export()[0]["patient"].clone();
    std::fs::remove_dir_all(site.path("data")).expect("lose data");
    run(site
        .cmd()
        .args(["secret", "restore", "--from"])
        .arg(&backup));
    run(&mut site.deid(&input, &site.path("out2")));
    assert_eq!(site.export()[0]["patient"], first);
    // A different secret in place is never overwritten.
    let other = site.path("other.secret");
    run(bin().args(["secret", "generate", "--out"]).arg(&other));
    let e = fails(site.cmd().args(["secret", "restore", "--from"]).arg(&other));
    assert!(e.contains("different secret"), "{e}");
    let _ = ts::EXPLICIT_LE;
}

#[test]
fn a_large_multi_frame_file_is_processed_within_a_memory_bound() {
    let site = Site::new("");
    let input = site.path("in");
    std::fs::create_dir_all(&input).expect("dir");
    let frames = 320; // 512 x 512 x 2 bytes x 320 = 168 MB of pixel data
    let bytes = sample::encode(sample::large_multiframe(frames), ts::EXPLICIT_LE).expect("encode");
    let size = bytes.len() as u64;
    let pixel_len = 512 * 512 * 2 * frames as usize;
    let input_tail = sha256(&bytes[bytes.len() - pixel_len..]);
    std::fs::write(input.join("large.dcm"), &bytes).expect("write");
    drop(bytes);
    let out = run(&mut site.deid(&input, &site.path("out")));
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(s.contains("written       1"), "{s}");
    let peak_mb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("peak memory"))
        .and_then(|v| v.trim().trim_end_matches(" MB").parse().ok())
        .expect("peak memory reported");
    assert!(
        peak_mb * 1_000_000 < size / 2,
        "peak {peak_mb} MB for a {} MB file",
        size / 1_000_000
    );
    let written = files_under(&site.path("out"));
    let out_bytes = std::fs::read(&written[0]).expect("output");
    assert_eq!(
        sha256(&out_bytes[out_bytes.len() - pixel_len..]),
        input_tail,
        "pixel data copied byte for byte"
    );
    let obj = dicom_object::OpenFileOptions::new()
        .from_reader(out_bytes.as_slice())
        .expect("a complete file");
    let text = |t| {
        obj.get(t).and_then(|e: &dicom_object::mem::InMemElement| {
            e.value().to_str().ok().map(|s| s.into_owned())
        })
    };
    assert_eq!(
        text(dicom_core::Tag(0x0012, 0x0062)).as_deref(),
        Some("YES")
    );
    assert!(!out_bytes.windows(13).any(|w| w == b"Large^Patient"));
    let rows = site.export();
    assert_eq!(
        field(&rows[0], "output_sha256"),
        Some(sha256(&out_bytes).as_str()),
        "catalog hash of the streamed output"
    );
}

/// `export --compress none|fast|default` writes `.nii`, or `.nii.gz` compressed on every core:
/// the same voxels and geometry each way, the sizes in the expected order, to a relative
/// output folder the command creates.
#[test]
fn export_compression_choices_write_the_same_volumes() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive_sized(&input, 3, 4, 64).expect("archive");
    run(&mut site.deid(&input, &site.path("data/deid")));
    /// Per choice: its name, the bytes written, and each volume (series, voxels, affine).
    type Written = (String, u64, Vec<(String, Vec<f32>, [[f64; 4]; 4])>);
    let mut seen: Vec<Written> = Vec::new();
    for choice in ["none", "fast", "default"] {
        let rel = format!("export-{choice}");
        run(site
            .cmd()
            .current_dir(site.dir.path())
            .args(["export", "--format", "nifti", "--compress", choice, "--out"])
            .arg(&rel));
        let dir = site.path(&rel);
        let manifest = std::fs::read_to_string(dir.join("manifest.jsonl")).expect("manifest");
        let mut volumes = Vec::new();
        let mut bytes = 0;
        for line in manifest.lines() {
            let l: serde_json::Value = serde_json::from_str(line).expect("json");
            let file = field(&l, "file").expect("file").to_owned();
            let suffix = if choice == "none" { ".nii" } else { ".nii.gz" };
            assert!(file.ends_with(suffix), "{choice}: {file}");
            let path = dir.join(&file);
            bytes += std::fs::metadata(&path).expect("file").len();
            let (_, v) = node::volume::nifti::read(&path).expect("our reader reads it");
            let series = field(&l, "series").expect("series").to_owned();
            volumes.push((series, v.data.iter().copied().collect(), v.affine));
        }
        volumes.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(volumes.len(), 3, "{choice}: one volume per patient");
        seen.push((choice.to_owned(), bytes, volumes));
    }
    assert_eq!(seen[0].2, seen[1].2, "fast: the same volumes as none");
    assert_eq!(seen[0].2, seen[2].2, "default: the same volumes as none");
    assert!(
        seen[0].1 > seen[1].1 && seen[1].1 >= seen[2].1,
        "sizes none > fast >= default: {} {} {}",
        seen[0].1,
        seen[1].1,
        seen[2].1
    );
    let refused = bin()
        .arg("--config")
        .arg(&site.cfg)
        .args([
            "export",
            "--format",
            "nnunet",
            "--compress",
            "none",
            "--out",
        ])
        .arg(site.path("nn"))
        .output()
        .expect("run");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("nnU-Net's layout is .nii.gz"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn export_writes_nifti_volumes_and_an_nnunet_dataset_split_by_patient() {
    use ::nifti::{NiftiObject, ReaderOptions};
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive(&input, 7, 4).expect("archive");
    sample::write_sample_archive(&input.join("mixed")).expect("sample");
    run(&mut site.deid(&input, &site.path("data/deid")));
    let nifti_dir = site.path("nifti");
    let out = run(site
        .cmd()
        .args(["export", "--format", "nifti", "--out"])
        .arg(&nifti_dir));
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(s.contains("exported"), "{s}");
    let manifest = std::fs::read_to_string(nifti_dir.join("manifest.jsonl")).expect("manifest");
    let lines: Vec<serde_json::Value> = manifest
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(lines.len() >= 10, "{} volumes", lines.len());
    for l in &lines {
        let file = nifti_dir.join(field(l, "file").expect("file"));
        let obj = ReaderOptions::new()
            .read_file(&file)
            .expect("the nifti crate reads our export");
        let shape: Vec<u64> = l["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        let dims: Vec<u64> = obj.header().dim[1..4].iter().map(|d| *d as u64).collect();
        assert_eq!(dims, shape);
    }
    let bulk: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["shape"] == serde_json::json!([8, 8, 4]))
        .collect();
    assert_eq!(bulk.len(), 7, "one 8x8x4 volume per bulk patient");
    for needle in ["BULK-", "Bulk^", "MRN-", "Doe"] {
        assert!(!manifest.contains(needle), "{needle} in the manifest");
        for f in files_under(&nifti_dir) {
            assert!(!f.to_string_lossy().contains(needle));
        }
    }
    let nn = site.path("nn");
    run(site
        .cmd()
        .args(["export", "--format", "nnunet", "--seed", "3", "--out"])
        .arg(&nn));
    let root = nn.join("Dataset500_fedcurate");
    let dataset: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("dataset.json")).expect("dataset"))
            .expect("json");
    assert_eq!(dataset["file_ending"], ".nii.gz");
    let images = files_under(&root.join("imagesTr"));
    assert_eq!(dataset["numTraining"].as_u64(), Some(images.len() as u64));
    assert!(
        images
            .iter()
            .all(|p| p.to_string_lossy().ends_with("_0000.nii.gz"))
    );
    let splits: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("splits.json")).expect("splits"))
            .expect("json");
    let patient_of = |case: &serde_json::Value| {
        case.as_str()
            .unwrap_or("")
            .split('_')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut total = 0;
    for set in ["train", "validation", "test"] {
        for case in splits[set].as_array().expect("list") {
            total += 1;
            let p = patient_of(case);
            if let Some(prev) = seen.insert(p.clone(), set) {
                assert_eq!(prev, set, "patient {p} in two sets");
            }
        }
    }
    assert_eq!(total, images.len());
    let again = site.path("nn2");
    run(site
        .cmd()
        .args(["export", "--format", "nnunet", "--seed", "3", "--out"])
        .arg(&again));
    assert_eq!(
        std::fs::read(root.join("splits.json")).expect("a"),
        std::fs::read(again.join("Dataset500_fedcurate/splits.json")).expect("b"),
        "deterministic from the seed"
    );
}

#[test]
fn harmonise_fits_saves_reapplies_and_feeds_the_export() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive(&input, 4, 5).expect("archive");
    run(&mut site.deid(&input, &site.path("data/deid")));
    let nifti_dir = site.path("nifti");
    run(site
        .cmd()
        .args(["export", "--format", "nifti", "--out"])
        .arg(&nifti_dir));
    let harm = site.path("harm");
    let out = run(site
        .cmd()
        .args([
            "harmonise",
            "--method",
            "nyul",
            "--foreground",
            "positive",
            "--input",
        ])
        .arg(&nifti_dir)
        .arg("--out")
        .arg(&harm));
    assert!(String::from_utf8_lossy(&out.stdout).contains("harmonised 4 volumes"));
    let model = harm.join("model.json");
    let fitted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&model).expect("model")).expect("json");
    assert_eq!(fitted["version"], 1);
    assert_eq!(fitted["fitted"]["summary"]["volumes"], 4);
    // Applying the saved model again gives the same volumes, byte for byte.
    let again = site.path("harm2");
    run(site
        .cmd()
        .args([
            "harmonise",
            "--method",
            "nyul",
            "--foreground",
            "positive",
            "--input",
        ])
        .arg(&nifti_dir)
        .arg("--out")
        .arg(&again)
        .arg("--model")
        .arg(&model));
    let a: Vec<PathBuf> = files_under(&harm)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".nii.gz"))
        .collect();
    assert_eq!(a.len(), 4);
    for p in &a {
        let twin = again.join(p.strip_prefix(&harm).expect("under"));
        assert_eq!(
            std::fs::read(p).expect("a"),
            std::fs::read(&twin).expect("b"),
            "{}",
            p.display()
        );
        let (h, v) = node::volume::nifti::read(p).expect("float32 NIfTI");
        assert_eq!(h.datatype, node::volume::StoredType::F32);
        let max = v.data.iter().copied().fold(f32::MIN, f32::max);
        assert!(
            max > 90.0 && max < 110.0,
            "Nyul output range ~1..100, max {max}"
        );
    }
    // A model for another method is refused.
    let e = fails(
        site.cmd()
            .args(["harmonise", "--method", "zscore", "--input"])
            .arg(&nifti_dir)
            .arg("--out")
            .arg(site.path("x"))
            .arg("--model")
            .arg(&model),
    );
    assert!(e.contains("is for"), "{e}");
    // Provenance is in the catalog; the export takes the harmonised volumes.
    let db = rusqlite::Connection::open(site.path("data/catalog.sqlite")).expect("catalog");
    let n: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM harmonised WHERE method LIKE '%nyul%'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 8);
    drop(db);
    let nn = site.path("nn");
    run(site
        .cmd()
        .args(["export", "--format", "nnunet", "--out"])
        .arg(&nn)
        .arg("--harmonised")
        .arg(&harm));
    let manifest =
        std::fs::read_to_string(nn.join("Dataset500_fedcurate/manifest.jsonl")).expect("manifest");
    assert_eq!(
        manifest.matches("\"harmonised\":true").count(),
        4,
        "{manifest}"
    );
    let images = files_under(&nn.join("Dataset500_fedcurate/imagesTr"));
    let (h, _) = node::volume::nifti::read(&images[0]).expect("image");
    assert_eq!(
        h.datatype,
        node::volume::StoredType::F32,
        "the harmonised float32 volume was exported"
    );
}

#[test]
fn curate_reports_findings_protocol_status_and_leaks_nothing() {
    let site = Site::new(
        "options = [\"retain-patient-characteristics\", \"retain-longitudinal-modified-dates\"]\n",
    );
    let input = site.path("in");
    let archive = sample::write_sample_archive(&input.join("sample")).expect("sample");
    sample::write_bulk_archive(&input.join("bulk"), 2, 3).expect("bulk");
    run(&mut site.deid(&input, &site.path("data/deid")));
    let schema_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/schema.toml"
    ))
    .expect("schema");
    // A protocol whose kVp range excludes the CT series (120 kV).
    let strict = schema_text.replace("range = [80.0, 140.0]", "range = [80.0, 100.0]");
    let schema = site.path("schema.toml");
    std::fs::write(&schema, &strict).expect("schema");
    let out = site.path("report");
    let printed = run(site
        .cmd()
        .args(["curate", "--schema"])
        .arg(&schema)
        .arg("--out")
        .arg(&out));
    let s = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(s.contains("curated"), "{s}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("json"))
            .expect("json");
    assert_eq!(report["report_version"], 1);
    assert_eq!(report["schema"].as_str().map(str::len), Some(64));
    let series = report["series"].as_array().expect("series");
    assert!(series.len() >= 8, "{} series", series.len());
    let statuses: Vec<String> = series.iter().map(|s| s["protocol"].to_string()).collect();
    assert!(
        statuses
            .iter()
            .any(|p| p.contains("deviating") && p.contains("kvp outside the protocol")),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|p| p.contains("out-of-scope")),
        "SEG/SR/US are out of scope: {statuses:?}"
    );
    assert!(
        series
            .iter()
            .all(|s| s["series"].as_str().is_some_and(|k| k.len() == 12))
    );
    assert!(
        report["site_findings"].as_array().expect("site").is_empty(),
        "the profile meets the schema: {}",
        report["site_findings"]
    );
    let with_quality = series
        .iter()
        .filter(|s| !s["quality"].as_array().expect("quality").is_empty())
        .count();
    assert!(with_quality >= 4);
    let q = series
        .iter()
        .find_map(|s| s["quality"].as_array().and_then(|q| q.first()))
        .expect("a quality report");
    for metric in [
        "snr", "cnr", "cjv", "efc", "fber", "cv", "mean", "range", "variance",
    ] {
        assert!(q.get(metric).is_some(), "{metric}");
    }
    // The report and the page name no identifying value, and the page loads nothing.
    let html = std::fs::read_to_string(out.join("report.html")).expect("html");
    let json = std::fs::read_to_string(out.join("report.json")).expect("json");
    for v in &archive.identifying {
        assert!(
            !json.contains(v.as_str()) && !html.contains(v.as_str()),
            "{v} in the report"
        );
    }
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script"),
        "self-contained"
    );
    assert!(html.contains("<svg"), "plots");
    // A node whose profile lacks a required option is told so.
    // The codes of a site's site-level findings after `curate` against the schema.
    let site_codes = |site: &Site| -> Vec<String> {
        run(site
            .cmd()
            .args(["curate", "--schema"])
            .arg(&schema)
            .arg("--out")
            .arg(site.path("r")));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(site.path("r/report.json")).expect("json"))
                .expect("json");
        r["site_findings"]
            .as_array()
            .expect("site")
            .iter()
            .filter_map(|f| f["code"].as_str().map(str::to_owned))
            .collect()
    };
    let lacking = Site::new("");
    run(&mut lacking.deid(&input.join("bulk"), &lacking.path("data/deid")));
    assert_eq!(
        site_codes(&lacking),
        ["deid-requirement-unmet", "deid-requirement-unmet"]
    );
    // The same configuration, but the outputs were made with the options on the command
    // line: the catalog's record of each output's run is what counts.
    let by_option = Site::new("");
    run(by_option
        .deid(&input.join("bulk"), &by_option.path("data/deid"))
        .args([
            "--option",
            "retain-patient-characteristics",
            "--option",
            "retain-longitudinal-modified-dates",
        ]));
    let codes = site_codes(&by_option);
    assert!(
        !codes.iter().any(|c| c == "deid-requirement-unmet"),
        "{codes:?}"
    );
    // A schema that does not validate is refused with the field named.
    std::fs::write(
        &schema,
        schema_text.replace("min_cell_count = 10", "min_cell_count = 2"),
    )
    .expect("schema");
    let e = fails(
        site.cmd()
            .args(["curate", "--schema"])
            .arg(&schema)
            .arg("--out")
            .arg(site.path("r2")),
    );
    assert!(e.contains("privacy.min_cell_count"), "{e}");
}

#[test]
fn export_refuses_a_folder_that_is_not_this_nodes_deidentified_output() {
    let site = Site::new("");
    let raw = site.path("raw");
    sample::write_bulk_archive(&raw, 2, 3).expect("archive");
    // A raw archive given by mistake: refused, nothing written, no identifier in the message.
    let out = site
        .cmd()
        .args(["export", "--format", "nifti", "--input"])
        .arg(&raw)
        .arg("--out")
        .arg(site.path("leak"))
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a raw archive is refused");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("not de-identified output") && e.contains("fedcurate-node deid"),
        "{e}"
    );
    assert!(!site.path("leak").exists(), "nothing exported");
    // The node's own output exports; a copy elsewhere too (the marks are on the objects),
    // but one raw file slipped in among them refuses the lot.
    run(&mut site.deid(&raw, &site.path("data/deid")));
    run(site
        .cmd()
        .args(["export", "--format", "nifti", "--out"])
        .arg(site.path("ok")));
    let copy = site.path("copy");
    for (i, f) in files_under(&site.path("data/deid")).iter().enumerate() {
        std::fs::create_dir_all(&copy).expect("dir");
        std::fs::copy(f, copy.join(format!("{i}.dcm"))).expect("copy");
    }
    run(site
        .cmd()
        .args(["export", "--format", "nifti", "--input"])
        .arg(&copy)
        .arg("--out")
        .arg(site.path("ok-copy")));
    let first_raw = files_under(&raw).into_iter().next().expect("a raw file");
    std::fs::copy(&first_raw, copy.join("slipped-in.dcm")).expect("copy");
    let out = site
        .cmd()
        .args(["export", "--format", "nifti", "--input"])
        .arg(&copy)
        .arg("--out")
        .arg(site.path("mixed"))
        .output()
        .expect("runs");
    assert!(!out.status.success(), "one raw file refuses the export");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 DICOM file(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_degenerate_volume_is_left_out_of_a_fit_with_a_finding() {
    use node::volume::{StoredType, Volume, diagonal, nifti};
    let site = Site::new("");
    let volume = |seed: u32, constant: bool| {
        let mut data = ndarray::Array4::<f32>::zeros((12, 12, 12, 1));
        let mut state = seed;
        for v in data.iter_mut() {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *v = if constant {
                300.0
            } else {
                1.0 + ((state >> 8) % 1000) as f32 * (1.0 + seed as f32 / 10.0)
            };
        }
        nifti::encode_gz(&Volume {
            data,
            affine: diagonal([1.0, 1.0, 1.0]),
            stored: StoredType::F32,
        })
        .expect("encode")
    };
    let good = site.path("good");
    let all = site.path("all");
    for dir in [&good, &all] {
        std::fs::create_dir_all(dir).expect("dir");
        for seed in 1..=3 {
            std::fs::write(dir.join(format!("v{seed}.nii.gz")), volume(seed, false)).expect("w");
        }
    }
    std::fs::write(all.join("flat.nii.gz"), volume(9, true)).expect("w");
    let fit = |input: &Path, out: &str| {
        let o = run(site
            .cmd()
            .args([
                "harmonise",
                "--method",
                "nyul",
                "--foreground",
                "positive",
                "--input",
            ])
            .arg(input)
            .arg("--out")
            .arg(site.path(out)));
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            std::fs::read(site.path(out).join("model.json")).expect("model"),
        )
    };
    let (_, clean) = fit(&good, "h-good");
    let (text, with_flat) = fit(&all, "h-all");
    assert!(
        text.contains("harmonise-degenerate-input  flat.nii.gz: left out of the fit"),
        "{text}"
    );
    assert!(text.contains("harmonised 3 volumes"), "{text}");
    assert_eq!(
        clean, with_flat,
        "the fit goes on as if the volume were not there"
    );
}

/// Whoever holds a copy of an original (the patient's CD) cannot find its pseudonym: the
/// catalog, its export, the quarantine and the debug log carry keyed markers of inputs and
/// paths, never their plain SHA-256. An anonymisation run's markers are keyed by its discarded
/// secret: two runs over the same input share none.
#[test]
fn originals_cannot_be_looked_up_by_their_hash() {
    let site = Site::new("");
    let input = site.path("in");
    let archive = sample::write_sample_archive(&input).expect("archive");
    let out = site
        .deid(&input, &site.path("out"))
        .env("RUST_LOG", "debug")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let logs = String::from_utf8_lossy(&out.stderr).into_owned();
    let export = serde_json::to_string(&site.export()).expect("json");
    let db = std::fs::read(site.path("data/catalog.sqlite")).expect("db");
    let quarantined: Vec<String> = files_under(&site.path("data/quarantine"))
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(!quarantined.is_empty());
    for f in &archive.files {
        let h = sha256(&std::fs::read(f).expect("read"));
        let short = &h[..16];
        assert!(!export.contains(short), "export pairs {h} with its row");
        assert!(!logs.contains(short), "the debug log names {h}");
        assert!(
            !db.windows(short.len()).any(|w| w == short.as_bytes()),
            "catalog holds {h}"
        );
        assert!(
            quarantined.iter().all(|q| !q.contains(short)),
            "quarantine names {h}"
        );
        let rel = f
            .strip_prefix(&input)
            .expect("rel")
            .to_string_lossy()
            .into_owned();
        let plain_path = sha256(rel.as_bytes());
        assert!(!db.windows(16).any(|w| w == &plain_path.as_bytes()[..16]));
    }
    // Anonymisation: two runs over the same inputs share no marker.
    let anon = Site::new("");
    let markers = |n: usize| -> BTreeSet<String> {
        run(anon
            .cmd()
            .args(["deid", "--anonymise", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(anon.path(&format!("out{n}"))));
        anon.export()
            .iter()
            .filter_map(|r| field(r, "input_marker").map(str::to_owned))
            .collect()
    };
    let first = markers(1);
    assert!(!first.is_empty());
    let both = markers(2);
    assert!(
        both.len() >= 2 * first.len(),
        "the second run recognised nothing: {} {}",
        first.len(),
        both.len()
    );
}

/// The chain is MACed under a key outside the catalog: an entry recomputed by someone who
/// can write the catalog (as the unkeyed chain allowed) and a chain cut short both fail
/// verification; the actor is the kernel's uid, not just `$USER`.
#[test]
fn the_audit_chain_resists_recomputation_and_truncation() {
    let site = Site::new("");
    let input = site.path("in");
    sample::write_bulk_archive(&input, 1, 2).expect("archive");
    for _ in 0..3 {
        run(&mut site.deid(&input, &site.path("out")));
    }
    let ok = run(site.cmd().args(["audit", "verify"]));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact: 3 entries"));
    let list =
        String::from_utf8_lossy(&run(site.cmd().args(["audit", "list"])).stdout).into_owned();
    assert!(
        list.contains("(uid ") && list.contains("login uid"),
        "{list}"
    );
    let db_path = site.path("data/catalog.sqlite");
    let backup = std::fs::read(&db_path).expect("db");
    // Rewrite entry 3 the way a writer of the catalog could before: plain SHA-256 chaining.
    {
        let db = rusqlite::Connection::open(&db_path).expect("open");
        let (seq, at, _actor, action, detail, prev): (i64, String, String, String, String, String) =
            db.query_row(
                "SELECT seq, at, actor, action, detail, prev_hash FROM audit WHERE seq = 3",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .expect("entry");
        let record = node::audit::AuditRecord {
            at,
            actor: "someone-else".into(),
            action,
            detail,
        };
        let forged = node::audit::legacy_hash(seq, &prev, &record);
        db.execute(
            "UPDATE audit SET actor = ?1, hash = ?2 WHERE seq = 3",
            rusqlite::params![record.actor, forged],
        )
        .expect("forge");
    }
    let e = fails(site.cmd().args(["audit", "verify"]));
    assert!(e.contains("broken at entry 3"), "{e}");
    // Cut the last entry off.
    std::fs::write(&db_path, &backup).expect("restore");
    let _ = std::fs::remove_file(site.path("data/catalog.sqlite-wal"));
    {
        let db = rusqlite::Connection::open(&db_path).expect("open");
        db.execute("DELETE FROM audit WHERE seq = 3", [])
            .expect("truncate");
    }
    let e = fails(site.cmd().args(["audit", "verify"]));
    assert!(e.contains("cut off"), "{e}");
}

/// A file large enough to be copied rather than read into memory, with overlay planes in the
/// unused high bits of its 16-bit words: the copy clears them as the whole-object path does,
/// and the catalog's hash is the hash of what was written.
#[test]
fn a_large_file_loses_its_overlay_bits_on_the_way() {
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    let site = Site::new("");
    let input = site.path("in");
    std::fs::create_dir_all(&input).expect("dir");
    let frames = 140u32; // 512 x 512 x 2 bytes x 140 = 73 MB, beyond the 64 MiB threshold
    let mut obj = sample::large_multiframe(frames);
    for (tag, v) in [
        (Tag(0x0028, 0x0100), 16u16),
        (Tag(0x0028, 0x0101), 12),
        (Tag(0x0028, 0x0102), 11),
        (Tag(0x0028, 0x0103), 0),
    ] {
        obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    let words = 512 * 512 * frames as usize;
    let values: Vec<u16> = (0..words)
        .map(|i| (i % 4096) as u16 | if i % 7 == 0 { 0x8000 } else { 0 })
        .collect();
    obj.put(DataElement::new(
        Tag(0x7FE0, 0x0010),
        VR::OW,
        PrimitiveValue::U16(values.into()),
    ));
    let bytes = sample::encode(obj, ts::EXPLICIT_LE).expect("encode");
    assert!(bytes.len() as u64 >= node::batch::LARGE_FILE);
    std::fs::write(input.join("large.dcm"), &bytes).expect("write");
    drop(bytes);
    run(&mut site.deid(&input, &site.path("out")));
    let written = files_under(&site.path("out"));
    let out_bytes = std::fs::read(&written[0]).expect("output");
    let pixels = &out_bytes[out_bytes.len() - 2 * words..];
    let mut bad = 0usize;
    for (i, w) in pixels.chunks_exact(2).enumerate() {
        let w = u16::from_le_bytes([w[0], w[1]]);
        if w != (i % 4096) as u16 {
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "words with overlay bits left, or changed otherwise");
    assert_eq!(
        field(&site.export()[0], "output_sha256"),
        Some(sha256(&out_bytes).as_str()),
        "the catalog's hash is the written file's"
    );
}
