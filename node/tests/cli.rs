//! Smoke and leak tests of the `fedcurate-node` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dicom_object::OpenFileOptions;
use node::sample::{self, ts};

const PREFIX: &str = "QXCANARY";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedcurate-node"));
    c.env("FEDCURATE_LOG", "debug");
    c
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

fn files_under(root: &Path) -> Vec<PathBuf> {
    walkdir(root)
}

fn walkdir(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Write a config whose data directory is `dir/data` (the site secret is generated there).
fn config(dir: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {:?}\n[deid]\n{extra}", dir.join("data")),
    )
    .expect("config written");
    cfg
}

#[test]
fn canaries_in_every_table_row_leave_no_trace_in_output_paths_or_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The input path itself is identifying.
    let input = dir.path().join(format!("{PREFIX}PATH_DOE_JANE_19470203"));
    std::fs::create_dir_all(&input).expect("input dir");
    let mut needles: Vec<String> = vec![PREFIX.to_owned()];
    for (i, syntax) in [
        ts::EXPLICIT_LE,
        ts::IMPLICIT_LE,
        ts::EXPLICIT_BE,
        ts::DEFLATED_LE,
    ]
    .into_iter()
    .enumerate()
    {
        let (bytes, planted) = sample::canary_file(PREFIX, syntax, i as u32).expect("canary file");
        std::fs::write(input.join(format!("{PREFIX}{i}.dcm")), bytes).expect("write");
        for p in planted {
            // Times are not identifying under the basic profile's removal, but are common
            // values; every other planted needle is unique to the canary.
            if p.vr != dicom_core::VR::TM {
                needles.push(p.needle);
            }
        }
    }
    needles.sort();
    needles.dedup();
    assert!(
        needles.len() > 400,
        "only {} needles planted",
        needles.len()
    );
    let cfg = config(dir.path(), "");
    let out_dir = dir.path().join("out");
    let output = run(bin()
        .arg("--config")
        .arg(&cfg)
        .args(["deid", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out_dir));
    let logs = [output.stdout.as_slice(), output.stderr.as_slice()].concat();
    let outputs = files_under(&out_dir);
    assert_eq!(outputs.len(), 4, "one output per encoding");
    let mut leaks = Vec::new();
    for needle in &needles {
        if contains(&logs, needle) {
            leaks.push(format!("log: {needle}"));
        }
    }
    for f in &outputs {
        let rel = f
            .strip_prefix(&out_dir)
            .expect("under out")
            .to_string_lossy()
            .into_owned();
        let raw = std::fs::read(f).expect("read output");
        // Deflated outputs are compressed: scan their decoded form re-encoded uncompressed.
        let obj = OpenFileOptions::new()
            .from_reader(raw.as_slice())
            .expect("output re-opens");
        let mut plain = Vec::new();
        obj.write_dataset(&mut plain).expect("re-encode");
        let mut meta = Vec::new();
        obj.write_meta(&mut meta).expect("meta");
        assert!(
            raw[..128].iter().all(|b| *b == 0),
            "preamble must be zeroed"
        );
        for needle in &needles {
            if rel.contains(needle.as_str()) {
                leaks.push(format!("path {rel}: {needle}"));
            }
            if contains(&raw, needle) || contains(&plain, needle) || contains(&meta, needle) {
                leaks.push(format!("bytes of {rel}: {needle}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks, first: {:?}",
        leaks.len(),
        &leaks[..leaks.len().min(20)]
    );
    let logs = String::from_utf8_lossy(&logs);
    assert!(
        !logs.contains(&input.display().to_string()),
        "input path in logs"
    );
    assert!(
        logs.contains("de-identified"),
        "logs say what happened:\n{logs}"
    );
}

#[test]
fn profile_info_prints_edition_and_active_options() {
    let out = run(bin().args(["deid", "--profile-info", "--option", "retain-uids"]));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("PS3.15 2026c"), "{s}");
    assert!(s.contains("656 rows"), "{s}");
    assert!(s.contains("12 rows of the node's local supplement"), "{s}");
    assert!(s.contains("[on ] retain-uids"), "{s}");
    assert!(s.contains("113110"), "{s}");
    assert!(s.contains("[off] clean-graphics"), "{s}");
}

#[test]
fn bad_options_and_missing_keys_are_explained() {
    let out = bin()
        .args(["deid", "--profile-info", "--option", "retain-everything"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("retain-everything") && e.contains("known options"),
        "{e}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), "reidentification_map = true\n");
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["deid", "--input"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("vault_key_file") && e.contains("secret generate"),
        "{e}"
    );
}

#[test]
fn demo_runs_end_to_end_and_finds_no_leak() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(bin().arg("demo").arg("--dir").arg(dir.path().join("demo")));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("leak check    0 identifying values"), "{s}");
    // Not DICOM, no SOP Instance UID, and the two ultrasound images (marked NO, which is
    // not trusted for ultrasound) waiting for a masking rule.
    assert!(s.contains("quarantined   4"), "{s}");
    assert!(s.contains("  read past odd-length"), "{s}");
    assert!(s.contains("patients      3"), "{s}");
    assert!(s.contains("curation      8 series"), "{s}");
    assert!(s.contains("volumes as NIfTI"), "{s}");
    assert!(s.contains("nnU-Net dataset"), "{s}");
}

#[test]
fn every_input_is_written_or_quarantined_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = sample::write_sample_archive(&dir.path().join("in")).expect("archive");
    let cfg = config(dir.path(), "");
    let out = run(bin()
        .arg("--config")
        .arg(&cfg)
        .args(["deid", "--anonymise", "--input"])
        .arg(&archive.root)
        .arg("--output")
        .arg(dir.path().join("out")));
    let s = String::from_utf8_lossy(&out.stdout);
    let written = files_under(&dir.path().join("out")).len();
    let quarantined = files_under(&dir.path().join("data/quarantine"));
    assert_eq!(written + quarantined.len(), archive.files.len(), "{s}");
    let list = run(bin().arg("--config").arg(&cfg).args(["quarantine", "list"]));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("not-dicom") && list.contains("missing-sop-instance-uid"),
        "{list}"
    );
    // Odd-length values are read (as dcmtk does) and noted on the written row.
    assert!(list.contains("4 entries"), "{list}");
    assert!(list.contains("burned-in-risk"), "{list}");
    let export = run(bin().arg("--config").arg(&cfg).args(["catalog", "export"]));
    // The parser detail (which may quote the file) stays in the catalog: not in the list,
    // not in the export; `quarantine show` prints it on this machine only.
    let details: Vec<(String, String)> = {
        let db = rusqlite::Connection::open(dir.path().join("data/catalog.sqlite")).expect("db");
        let mut st = db
            .prepare("SELECT id, detail FROM quarantine")
            .expect("query");
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .map(|r| r.expect("row"))
            .collect()
    };
    assert_eq!(details.len(), 4);
    let exported = String::from_utf8_lossy(&export.stdout).into_owned();
    for (id, detail) in &details {
        assert!(detail.len() > 8, "a detail is recorded");
        assert!(!list.contains(detail.as_str()) && !exported.contains(detail.as_str()));
        let shown = run(bin()
            .arg("--config")
            .arg(&cfg)
            .args(["quarantine", "show", &id[..12]]));
        assert!(String::from_utf8_lossy(&shown.stdout).contains(detail.as_str()));
    }
    assert!(
        String::from_utf8_lossy(&export.stdout)
            .lines()
            .any(|l| l.contains("\"outcome\":\"written\"")
                && l.contains("\"reason\":\"odd-length\"")),
        "the odd-length input is written with its finding"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for p in ["data", "data/quarantine", "data/catalog.sqlite"] {
            let mode = std::fs::metadata(dir.path().join(p))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{p} must be owner-only");
        }
    }
    assert!(
        !dir.path().join("data/site.secret").exists(),
        "anonymisation keeps no secret"
    );
}

#[test]
fn nifti_and_analyze_inputs_are_deidentified_with_the_same_guarantees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in");
    let marker = "NIFTIMARKQ";
    let (images, volume) = sample::nifti_fixtures(&input, marker).expect("fixtures");
    let cfg = config(dir.path(), "nifti_subject_folder_depth = 1\n");
    let out_dir = dir.path().join("out");
    let out = run(bin()
        .arg("--config")
        .arg(&cfg)
        .args(["deid", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out_dir));
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        s.contains(&format!("inputs        {}", images.len())),
        "{s}"
    );
    assert!(
        s.contains(&format!("written       {}", images.len())),
        "{s}"
    );
    let logs = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
    let outputs = files_under(&out_dir);
    let niis: Vec<&PathBuf> = outputs
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".nii.gz"))
        .collect();
    let jsons: Vec<&PathBuf> = outputs
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".json"))
        .collect();
    assert_eq!((niis.len(), jsons.len()), (3, 1), "{outputs:?}");
    // One subject (the folder): one pseudonym for all three.
    let patients: std::collections::BTreeSet<String> = niis
        .iter()
        .map(|p| {
            p.strip_prefix(&out_dir)
                .expect("under")
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(patients.len(), 1);
    let needles = [marker, &marker[..8], "Doe^Jane", "2019-03-12"];
    for p in &outputs {
        let raw = std::fs::read(p).expect("read");
        let mut plain = Vec::new();
        if p.to_string_lossy().ends_with(".gz") {
            use std::io::Read;
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut plain)
                .expect("gunzip");
            assert_eq!(raw[3] & 0x08, 0, "no file name in the gzip header");
            assert_eq!(
                &raw[4..8],
                &[0, 0, 0, 0],
                "no time stamp in the gzip header"
            );
        }
        for n in needles {
            assert!(
                !contains(&raw, n) && !contains(&plain, n),
                "{n} in {}",
                p.display()
            );
            assert!(
                !p.to_string_lossy().contains(n),
                "{n} in path {}",
                p.display()
            );
        }
    }
    for n in needles {
        assert!(!contains(&logs, n), "{n} in the logs");
    }
    let export = run(bin().arg("--config").arg(&cfg).args(["catalog", "export"]));
    for n in needles {
        assert!(!contains(&export.stdout, n), "{n} in the catalog export");
    }
    for p in &niis {
        let (h, v) = node::volume::nifti::read(p).expect("our output reads back");
        assert_eq!(h.dims, vec![6, 5, 4]);
        assert_eq!(v.data, volume.data, "voxel values kept");
    }
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(jsons[0]).expect("sidecar")).expect("json");
    assert_eq!(
        sidecar,
        serde_json::json!({"Modality": "MR", "RepetitionTime": 2.3})
    );
}

#[test]
fn egress_approval_queue_previews_approves_and_audits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let fed = data.join("federation");
    std::fs::create_dir_all(&fed).expect("dir");
    let schema = protocol::schema::CurationSchema::parse(include_str!("../../deploy/schema.toml"))
        .expect("schema");
    let pending = node::federation::approval::Approvals::at(&fed)
        .check(&schema)
        .expect("check");
    assert!(!pending.is_empty());
    let cfg = config(dir.path(), "");
    let out = run(bin().arg("--config").arg(&cfg).args(["egress", "pending"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("patients by sex"), "{text}");
    assert!(text.contains("egress approve"), "{text}");
    let out = run(bin().arg("--config").arg(&cfg).args(["egress", "approve"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("approved {}", pending.len())),
        "{out:?}"
    );
    let out = run(bin().arg("--config").arg(&cfg).args(["egress", "pending"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing waits"));
    let out = run(bin().arg("--config").arg(&cfg).args(["audit", "list"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("egress-approve"),
        "{out:?}"
    );
    let out = run(bin().arg("--config").arg(&cfg).args(["egress"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 messages left this node"));
}

/// The README's first command: a consortium of three sites and a coordinator as separate
/// processes. Checks what it prints and what it leaves behind.
#[test]
fn the_consortium_demo_federates_three_sites_and_leaks_nothing() {
    let node = PathBuf::from(env!("CARGO_BIN_EXE_fedcurate-node"));
    let coordinator = node.with_file_name("fedcurate-coordinator");
    if !coordinator.is_file() {
        // `cargo test -p node` alone does not build the other package's binary.
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "coordinator",
                "--bin",
                "fedcurate-coordinator",
            ])
            .status()
            .expect("cargo");
        assert!(status.success(), "building fedcurate-coordinator");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("demo");
    // With --annotate the demo ends by serving site-a's annotator, with demo logins.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut demo = bin()
        .env("FEDCURATE_COORDINATOR", &coordinator)
        .env(
            "FEDCURATE_WEB_ASSETS",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../web"),
        )
        .env(
            "FEDCURATE_TRAIN_PYTHON",
            std::env::var("FEDCURATE_TRAIN_PYTHON").expect(
                "FEDCURATE_TRAIN_PYTHON: the training step's interpreter (scripts/test.sh makes target/py-train)",
            ),
        )
        .env(
            "FEDCURATE_PYTHON_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../python"),
        )
        .args(["consortium-demo", "--patients", "6", "--annotate"])
        .arg("--annotate-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--dir")
        .arg(&work)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let mut text = String::new();
    {
        use std::io::BufRead;
        let out = std::io::BufReader::new(demo.stdout.take().expect("stdout"));
        for line in out.lines() {
            let line = line.expect("a line");
            text.push_str(&line);
            text.push('\n');
            if line.starts_with("annotator: http://") {
                break;
            }
        }
    }
    assert!(
        text.contains(&format!("annotator: http://127.0.0.1:{port}")),
        "the demo did not leave the annotator running:\n{text}"
    );
    // The last step: the sites trained together, and the summary compares federated with
    // each site alone.
    let line = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("federated training    20 rounds (secure aggregation)")
        })
        .unwrap_or_else(|| panic!("no training line in the summary:\n{text}"));
    let number_before = |tag: &str| -> f64 {
        let i = line.find(tag).unwrap_or_else(|| panic!("{tag} in {line}"));
        line[..i]
            .split_whitespace()
            .last()
            .and_then(|x| x.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("a number before {tag} in {line}"))
    };
    let federated = number_before(" federated,");
    let best: f64 = line
        .rsplit_once("(best ")
        .and_then(|(_, b)| b.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("best single site in {line}"));
    assert!(federated > best + 0.05, "{line}");
    assert!(text.contains("a training job waits for approval"), "{text}");
    let password = |user: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with(user))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no demo login for {user}:\n{text}"))
            .to_owned()
    };
    let ask = |request: String| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(request.as_bytes()).expect("request");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    for user in ["reader-1", "reader-2", "reviewer"] {
        let body = format!(
            "{{\"user\":\"{user}\",\"password\":\"{}\"}}",
            password(user)
        );
        let answer = ask(format!(
            "POST /api/login HTTP/1.1\r\nhost: x\r\norigin: http://127.0.0.1:{port}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ));
        assert!(answer.starts_with("HTTP/1.1 204"), "{user}: {answer}");
        if user == "reviewer" {
            let cookie = answer
                .lines()
                .find_map(|l| l.strip_prefix("set-cookie: "))
                .and_then(|c| c.split(';').next())
                .expect("cookie")
                .to_owned();
            let answer = ask(format!(
                "GET /api/projects/lesions/cases HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\nconnection: close\r\n\r\n"
            ));
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert_eq!(answer.matches("\"case\":").count(), 6, "{answer}");
        }
    }
    // Interrupted, the demo stops the annotator too.
    assert!(
        Command::new("kill")
            .args(["-TERM", &demo.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let _ = demo.wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the annotator outlived the demo"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(text.contains("sites joined          3"), "{text}");
    assert!(text.contains("1 quarantined (reasons above)"), "{text}");
    assert!(
        text.contains("quarantined") && text.contains(": truncated"),
        "{text}"
    );
    assert!(text.contains("C-STORE 72 files"), "{text}");
    // site-c's 1.5 mm slices are outside the protocol's 0.5-1.3 mm: its curation says so.
    assert!(text.contains("(6 series outside the protocol"), "{text}");
    for s in ["site-a", "site-b", "site-c"] {
        assert!(work.join(s).join("curation/report.html").is_file(), "{s}");
    }
    // Each site's readers disagree more than the last (the demo draws them so): the
    // consortium report's per-site Dice says so, released over k patients.
    let agreement = text
        .lines()
        .find(|l| l.contains("reader agreement"))
        .expect("agreement line");
    let dice: Vec<f64> = agreement
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').parse().ok())
        .collect();
    assert!(
        dice.len() == 3 && dice[0] > dice[1] && dice[1] > dice[2] && dice[2] > 0.5,
        "{agreement}"
    );
    assert_eq!(
        text.matches("cases annotated; lesion: 6 pairs").count(),
        3,
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("intensity spread"))
        .expect("spread line");
    let numbers: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').parse().ok())
        .collect();
    assert!(
        numbers.len() >= 2 && numbers[1] < numbers[0] / 10.0,
        "{line}"
    );
    let report = work.join("coordinator/state/report/report.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    assert_eq!(json["sites"].as_array().map(Vec::len), Some(3));
    assert!(json["model"]["standard_scale"].is_array());
    // Every planted identifying value carries its site's prefix: none reaches the coordinator.
    for f in walkdir(&work.join("coordinator")) {
        let bytes = std::fs::read(&f).expect("read");
        for needle in ["ALPHA", "BRAVO", "CHARLIE"] {
            assert!(!contains(&bytes, needle), "{needle} in {}", f.display());
        }
    }
}

/// The example deployment's systemd units pass `systemd-analyze verify` (with the binaries
/// of this build in place of /usr/local/bin).
#[test]
fn systemd_units_verify() {
    let node = PathBuf::from(env!("CARGO_BIN_EXE_fedcurate-node"));
    let coordinator = node.with_file_name("fedcurate-coordinator");
    if !coordinator.is_file() {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "coordinator",
                "--bin",
                "fedcurate-coordinator",
            ])
            .status()
            .expect("cargo");
        assert!(status.success(), "building fedcurate-coordinator");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let mut units = Vec::new();
    for e in std::fs::read_dir(&src).expect("deploy/systemd") {
        let p = e.expect("entry").path();
        let text = std::fs::read_to_string(&p)
            .expect("unit")
            .replace("/usr/local/bin/fedcurate-node", &node.display().to_string())
            .replace(
                "/usr/local/bin/fedcurate-coordinator",
                &coordinator.display().to_string(),
            );
        assert!(
            text.contains("NoNewPrivileges=yes") || p.extension().is_some_and(|x| x == "timer")
        );
        let dst = dir.path().join(p.file_name().expect("name"));
        std::fs::write(&dst, text).expect("write");
        units.push(dst);
    }
    assert!(units.len() >= 6, "{units:?}");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze is installed by scripts/test.sh (package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only complaints about these units count (the host's own units are not ours to fix).
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("fedcurate")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
    // Exposure, as systemd rates it (Debian's Orthanc unit: 9.2 UNSAFE): every unit at most
    // 2.0; those that need no internet (metrics on loopback, purge) at most 1.0.
    for unit in units
        .iter()
        .filter(|u| u.extension().is_some_and(|x| x == "service"))
    {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(unit)
            .output()
            .expect("systemd-analyze security");
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {}: {text}", unit.display()));
        let name = unit
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bound = if name.contains("metrics") || name.contains("purge") {
            1.0
        } else {
            2.0
        };
        assert!(score <= bound, "{name}: exposure {score} above {bound}");
    }
}

fn check(cfg: &Path, extra: &[&str]) -> (bool, String) {
    let out = bin()
        .arg("--config")
        .arg(cfg)
        .arg("check-config")
        .args(extra)
        .output()
        .expect("runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn self_signed(not_after_days: i64) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["site-a".to_owned()]).expect("params");
    let now = time::OffsetDateTime::now_utc();
    p.not_after = now + time::Duration::days(not_after_days);
    p.not_before = p.not_after - time::Duration::days(30);
    p.self_signed(&key).expect("cert").pem()
}

#[test]
fn check_config_names_each_problem_and_its_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir_all(data.join("federation")).expect("dirs");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let secret = d.join("site.secret");
    std::fs::write(&secret, "00".repeat(32)).expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let key = d.join("site.key");
    std::fs::write(&key, "not read by check-config beyond its mode").expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(d.join("ca.crt"), self_signed(365)).expect("ca");
    std::fs::write(d.join("site.crt"), self_signed(365)).expect("cert");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).expect("config");
        p
    };
    let base = format!(
        "data_dir = {data:?}\n[deid]\nsite_secret_file = {secret:?}\noptions = [\"retain-patient-characteristics\"]\n[scp]\nallowed = [{{ ae = \"PACS\" }}]\n[federation]\nsite = \"site-a\"\ncoordinator = \"127.0.0.1:9\"\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {key:?}\n",
        d.join("ca.crt"),
        d.join("site.crt"),
    );
    let (ok, text) = check(&write("good.toml", &base), &[]);
    assert!(ok, "{text}");
    assert!(text.contains("usable"), "{text}");

    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    // Each broken thing, with the code and the fix a user needs.
    // (what, config text, break it, repair it, expected code, expected fix)
    type Case<'a> = (
        &'a str,
        String,
        Box<dyn Fn() + 'a>,
        Box<dyn Fn() + 'a>,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "secret readable by others",
            base.clone(),
            Box::new(|| chmod(&secret, 0o644)),
            Box::new(|| chmod(&secret, 0o600)),
            "key-permissions",
            "chmod 600",
        ),
        (
            "site key readable by others",
            base.clone(),
            Box::new(|| chmod(&key, 0o640)),
            Box::new(|| chmod(&key, 0o600)),
            "key-permissions",
            "chmod 600",
        ),
        (
            "data directory open to others",
            base.clone(),
            Box::new(|| chmod(&data, 0o755)),
            Box::new(|| chmod(&data, 0o700)),
            "data-dir-permissions",
            "chmod 700",
        ),
        (
            "expired certificate",
            base.clone(),
            Box::new(|| std::fs::write(d.join("site.crt"), self_signed(-1)).expect("cert")),
            Box::new(|| std::fs::write(d.join("site.crt"), self_signed(365)).expect("cert")),
            "certificate-expired",
            "renew",
        ),
        (
            "certificate that is not PEM",
            base.clone(),
            Box::new(|| std::fs::write(d.join("site.crt"), "garbage").expect("cert")),
            Box::new(|| std::fs::write(d.join("site.crt"), self_signed(365)).expect("cert")),
            "certificate",
            "PEM file the CA issued",
        ),
        (
            "missing vault key",
            base.replace(
                "[scp]",
                "vault_key_file = \"/nonexistent/vault.key\"\nreidentification_map = true\n[scp]",
            ),
            Box::new(|| {}),
            Box::new(|| {}),
            "missing-file",
            "correct the path",
        ),
        (
            "a schema requirement the profile lacks",
            base.replace(
                "options = [\"retain-patient-characteristics\"]",
                "options = []",
            ),
            Box::new(|| {
                std::fs::write(
                    data.join("federation/schema.toml"),
                    include_str!("../../deploy/schema.toml"),
                )
                .expect("schema")
            }),
            Box::new(|| std::fs::remove_file(data.join("federation/schema.toml")).expect("rm")),
            "schema-deid-requirement",
            "add \"retain-patient-characteristics\" to [deid] options",
        ),
        (
            "missing parent of the data directory",
            base.replace(
                &format!("data_dir = {data:?}"),
                "data_dir = \"/nonexistent/x/data\"",
            ),
            Box::new(|| {}),
            Box::new(|| {}),
            "data-dir",
            "create the parent folder",
        ),
    ];
    for (what, text, break_it, fix_it, code, fix) in cases {
        break_it();
        let (ok, out) = check(&write("case.toml", &text), &[]);
        fix_it();
        assert!(!ok, "{what}: accepted\n{out}");
        assert!(out.contains(code) && out.contains(fix), "{what}: {out}");
    }
    // Warnings do not fail the check, but are shown.
    let (ok, out) = check(
        &write(
            "warn.toml",
            &base.replace("allowed = [{ ae = \"PACS\" }]", "allowed = []"),
        ),
        &[],
    );
    assert!(ok && out.contains("scp-nobody-allowed"), "{out}");
    // The secret outside the data directory (as in the base config): no warning about the
    // audit key. Inside it: a warning.
    assert!(!out.contains("audit-key-in-data-dir"), "{out}");
    let inside = base.replace(&format!("site_secret_file = {secret:?}\n"), "");
    assert_ne!(inside, base);
    let (ok, out) = check(&write("inside.toml", &inside), &[]);
    assert!(ok && out.contains("audit-key-in-data-dir"), "{out}");
    // Online: nobody listens at the coordinator's address.
    let (ok, out) = check(&write("good.toml", &base), &["--online"]);
    assert!(!ok && out.contains("coordinator-unreachable"), "{out}");
}

#[test]
fn status_and_metrics_report_the_node() {
    use std::io::{BufRead, Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = node::sample::write_sample_archive(&dir.path().join("in")).expect("archive");
    let cfg = config(dir.path(), "");
    run(bin()
        .arg("--config")
        .arg(&cfg)
        .args(["deid", "--input"])
        .arg(&archive.root));
    let out = run(bin().arg("--config").arg(&cfg).args(["status", "--json"]));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(s["written"].as_u64().unwrap_or(0) > 0, "{s}");
    let quarantined = s["quarantined"].as_u64().unwrap_or(0);
    assert!(
        quarantined > 0 && s["quarantine_open"].as_u64() == Some(quarantined),
        "{s}"
    );
    assert!(s["deid_rate"].as_f64().is_some(), "{s}");
    // Metrics over HTTP on loopback only.
    let refused = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["metrics", "--listen", "0.0.0.0:0"])
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loopback"));
    let mut child = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("metrics");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    let url = line.trim().strip_prefix("metrics on http://").expect("url");
    let addr = url.trim_end_matches("/metrics");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("response");
    let _ = child.kill();
    let _ = child.wait();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(&format!(
            "fedcurate_inputs_total{{outcome=\"quarantined\"}} {quarantined}\n"
        )),
        "{body}"
    );
    assert!(body.contains("fedcurate_inbox_depth 0"), "{body}");
}

/// Interrupting the demo stops every process it started.
#[test]
fn the_consortium_demo_stops_its_processes_when_interrupted() {
    let node = PathBuf::from(env!("CARGO_BIN_EXE_fedcurate-node"));
    let coordinator = node.with_file_name("fedcurate-coordinator");
    if !coordinator.is_file() {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "coordinator",
                "--bin",
                "fedcurate-coordinator",
            ])
            .status()
            .expect("cargo");
        assert!(status.success(), "building fedcurate-coordinator");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("demo-interrupted");
    let mut child = bin()
        .env("FEDCURATE_COORDINATOR", &coordinator)
        .args(["consortium-demo", "--patients", "6", "--dir"])
        .arg(&work)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("demo");
    // Wait until the coordinator runs, then interrupt the demo alone (not its children).
    let started = std::time::Instant::now();
    while !work.join("coordinator/coordinator.log").exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no coordinator"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(
        !exit.success(),
        "an interrupted demo does not report success"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("stopping every process"), "{err}");
    // Nothing the demo started is still running.
    let left = Command::new("pgrep")
        .args(["-f", &work.display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn annotate_commands_run_a_project_from_creation_to_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), "");
    let input = dir.path().join("in");
    run(bin().arg("sample").arg("--out").arg(&input).args([
        "--patients",
        "2",
        "--slices",
        "6",
        "--matrix",
        "24",
    ]));
    run(bin()
        .arg("--config")
        .arg(&cfg)
        .arg("deid")
        .arg("--input")
        .arg(&input));
    let project = dir.path().join("project.toml");
    std::fs::write(
        &project,
        r#"id = "cli-project"
kinds = ["mask"]
raters_per_case = 2
[[labels]]
value = 1
name = "lesion"
colour = [255, 0, 0]
"#,
    )
    .expect("project");
    let annotate = |args: &[&str]| {
        let mut c = bin();
        c.arg("--config").arg(&cfg).arg("annotate").args(args);
        c
    };
    let out = run(annotate(&["project", "create"]).arg(&project));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created with 2 cases"));
    let out = run(&mut annotate(&[
        "cases",
        "--project",
        "cli-project",
        "--json",
    ]));
    let cases: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cases json");
    let cases = cases.as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    run(&mut annotate(&[
        "assign",
        "--project",
        "cli-project",
        "--raters",
        "ann,ben",
    ]));
    // Each rater marks a block of each case image, ben's shifted by one voxel.
    for c in cases {
        let case = c["case_id"].as_str().expect("case id");
        let image = dir
            .path()
            .join("data")
            .join(c["image"].as_str().expect("image"));
        let (_, vol) = node::volume::nifti::read(&image).expect("case image");
        for (rater, shift) in [("ann", 0usize), ("ben", 1)] {
            let mut map = node::fc_annotate::LabelMap::empty(node::fc_annotate::Grid::of(&vol));
            for i in 4 + shift..12 + shift {
                for j in 4..12 {
                    map.data[[i, j, 2]] = 1;
                }
            }
            let file = dir.path().join(format!("{case}-{rater}.nii.gz"));
            std::fs::write(&file, map.to_nifti_gz().expect("nifti")).expect("write");
            run(annotate(&[
                "import",
                "--project",
                "cli-project",
                "--rater",
                rater,
                "--case",
                case,
                "--labelmap",
            ])
            .arg(&file));
        }
    }
    let out = run(&mut annotate(&[
        "agreement",
        "--project",
        "cli-project",
        "--json",
    ]));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("agreement json");
    let lesion = &r["mask_summary"]["lesion"];
    assert_eq!(lesion["pairs"], 2);
    // 8x8 blocks shifted by one column: 56 of 64 voxels shared.
    assert!(
        (lesion["mean_dice"].as_f64().expect("dice") - 56.0 / 64.0).abs() < 1e-12,
        "{r}"
    );
    let out = run(&mut annotate(&["agreement", "--project", "cli-project"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("lesion: 2 pairs"));
    run(&mut annotate(&[
        "consensus",
        "--project",
        "cli-project",
        "--method",
        "majority",
    ]));
    let export = dir.path().join("export");
    run(annotate(&[
        "export",
        "--project",
        "cli-project",
        "--consensus",
        "--seg",
        "labelmap",
        "--out",
    ])
    .arg(&export));
    assert_eq!(files_under(&export.join("seg")).len(), 2);
    assert!(export.join("cvat.xml").is_file() && export.join("via.json").is_file());
    let out = run(&mut annotate(&[
        "status",
        "--project",
        "cli-project",
        "--json",
    ]));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(
        (s["submitted"].as_u64(), s["consensus_cases"].as_u64()),
        (Some(4), Some(2))
    );
    // A label map on another grid is refused with the reason, and nothing is saved.
    let wrong = dir.path().join("wrong.nii.gz");
    let grid = node::fc_annotate::Grid {
        shape: [5, 5, 5],
        affine: node::volume::diagonal([1.0, 1.0, 1.0]),
    };
    std::fs::write(
        &wrong,
        node::fc_annotate::LabelMap::empty(grid)
            .to_nifti_gz()
            .expect("nifti"),
    )
    .expect("write");
    let case = cases[0]["case_id"].as_str().expect("case");
    let out = annotate(&[
        "import",
        "--project",
        "cli-project",
        "--rater",
        "ann",
        "--case",
        case,
        "--labelmap",
    ])
    .arg(&wrong)
    .output()
    .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("voxels"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn users_are_added_listed_disabled_and_their_passwords_never_shown() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), "");
    let with_password = |args: &[&str], password: &str| {
        let mut child = bin()
            .arg("--config")
            .arg(&cfg)
            .arg("users")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        writeln!(child.stdin.take().expect("stdin"), "{password}").expect("password");
        child.wait_with_output().expect("runs")
    };
    let out = with_password(
        &["add", "alice", "--role", "reviewer"],
        "a long enough secret",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_password(&["add", "bob", "--role", "annotator"], "short");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12 characters"));
    let out = with_password(&["add", "alice", "--role", "admin"], "another long secret");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    run(bin()
        .arg("--config")
        .arg(&cfg)
        .args(["users", "disable", "alice"]));
    let out = run(bin()
        .arg("--config")
        .arg(&cfg)
        .args(["users", "list", "--json"]));
    let users: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(users[0]["name"], "alice");
    assert_eq!(users[0]["role"], "reviewer");
    assert_eq!(users[0]["disabled"], true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("argon2") && !text.contains("password"),
        "{text}"
    );
    // The hash is argon2id in the catalog, and no output or log carries the password.
    let catalog =
        node::catalog::Catalog::open(&dir.path().join("data/catalog.sqlite")).expect("catalog");
    assert!(
        catalog
            .user("alice")
            .expect("user")
            .expect("alice")
            .password
            .starts_with("$argon2id$")
    );
    for f in files_under(&dir.path().join("data")) {
        let bytes = std::fs::read(&f).expect("file");
        assert!(!contains(&bytes, "a long enough secret"), "{}", f.display());
    }
}

/// `bench --anchors` runs every job beside its anchor (gdcmanon, dcm2niix, storescp, all
/// installed by scripts/test.sh) on a small archive and prints a ratio for each row; an
/// unknown job is refused.
#[test]
fn bench_anchors_prints_a_ratio_for_every_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args([
            "bench",
            "--anchors",
            "--files",
            "24",
            "--slices",
            "6",
            "--runs",
            "1",
            "--dir",
        ])
        .arg(dir.path().join("bench"))
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("fedcurate "))
        .collect();
    assert_eq!(
        rows.len(),
        8,
        "deid, three NIfTI rows, four C-STORE rows:\n{stdout}"
    );
    for (row, anchor) in rows.iter().zip([
        "gdcmanon", "dcm2niix", "dcm2niix", "dcm2niix", "storescp", "storescp", "storescp",
        "storescp",
    ]) {
        assert!(row.contains(anchor), "{row}");
        let ratio: f64 = row
            .trim_end()
            .rsplit(' ')
            .next()
            .and_then(|r| r.strip_suffix('x'))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no ratio in {row}"));
        assert!(ratio > 0.0 && ratio.is_finite(), "{row}");
    }
    assert!(
        !dir.path().join("bench").exists(),
        "the work folder is removed"
    );
    let refused = bin()
        .args(["bench", "--anchors", "--only", "fft"])
        .output()
        .expect("bench runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--only takes"));
}
