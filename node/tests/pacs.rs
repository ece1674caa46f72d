//! The node against a real PACS: an Orthanc server on loopback (installed by scripts/test.sh),
//! queried and retrieved from with C-FIND/C-MOVE, and pushing to the node's SCP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node::sample;

/// A free port below the kernel's ephemeral range (32768 and up on Linux): a port the kernel
/// handed out for listening may be handed out again as the source port of the test's own
/// HTTP requests to Orthanc before the node binds it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u16).wrapping_mul(7919);
    loop {
        let p = 20000
            + (seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(97))) % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
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
    out
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl (installed by scripts/test.sh)");
    assert!(out.status.success(), "curl {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(root: &Path, n: usize) -> usize {
    let started = Instant::now();
    loop {
        let count = files_under(root).len();
        if count >= n || started.elapsed() > Duration::from_secs(30) {
            return count;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pull_from_and_push_by_orthanc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (http, dicom, pull_port, serve_port) = (free_port(), free_port(), free_port(), free_port());
    std::fs::create_dir_all(dir.path().join("orthanc/db")).expect("dir");
    let cfg = dir.path().join("orthanc/orthanc.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "Name": "test-pacs", "StorageDirectory": "db", "IndexDirectory": "db",
            "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
            "DicomAlwaysAllowStore": false, "DicomCheckModalityHost": true, "Plugins": [],
            "DicomModalities": {
                "fedpull": ["FEDCURATE", "127.0.0.1", pull_port],
                "fedserve": ["FEDSERVE", "127.0.0.1", serve_port]
            }
        })
        .to_string(),
    )
    .expect("config");
    let _orthanc = Killed(
        Command::new("Orthanc")
            .env("TCP_NODELAY", "1")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Orthanc (Debian package, installed by scripts/test.sh)"),
    );
    let base = format!("http://127.0.0.1:{http}");
    let started = Instant::now();
    while Command::new("curl")
        .args(["-sf", &format!("{base}/system")])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "Orthanc did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let files = sample::write_bulk_archive(&dir.path().join("in"), 3, 4).expect("archive");
    for f in &files {
        curl(&[
            "-X",
            "POST",
            &format!("{base}/instances"),
            "--data-binary",
            &format!("@{}", f.display()),
        ]);
    }
    // Pull two studies by accession number.
    let node_cfg = dir.path().join("node.toml");
    std::fs::write(
        &node_cfg,
        format!(
            "data_dir = {:?}\n[scp]\nbind = \"127.0.0.1:{pull_port}\"\n",
            dir.path().join("data")
        ),
    )
    .expect("config");
    let pull = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
            .arg("--config")
            .arg(&node_cfg)
            .args(["pull", "--from", &format!("ORTHANC@127.0.0.1:{dicom}")])
            .args(extra)
            .output()
            .expect("pull");
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pull failed: {s}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    };
    let first = pull(&["--accession", "BACC00000", "--accession", "BACC00002"]);
    assert!(
        first.contains("2 studies found, 0 already retrieved, 2 to retrieve"),
        "{first}"
    );
    assert!(
        first.contains("retrieved 8 instances (0 failed)"),
        "{first}"
    );
    let out_dir = dir.path().join("data/deid");
    assert_eq!(files_under(&out_dir).len(), 8);
    for f in files_under(&out_dir) {
        let bytes = std::fs::read(&f).expect("read");
        for v in ["BULK-", "Bulk^Patient", "BACC0000"] {
            assert!(
                !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
                "{v} in output"
            );
        }
    }
    // Resume: nothing is retrieved twice; the third study follows from a CSV.
    let again = pull(&["--accession", "BACC00000", "--accession", "BACC00002"]);
    assert!(
        again.contains("2 already retrieved, 0 to retrieve"),
        "{again}"
    );
    // The cohort comes on standard input (`--csv -`): the identifier is in no argv, and no
    // log line names it, even at debug level.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
        .env("FEDCURATE_LOG", "debug")
        .arg("--config")
        .arg(&node_cfg)
        .args([
            "pull",
            "--from",
            &format!("ORTHANC@127.0.0.1:{dicom}"),
            "--csv",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pull");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"accession_number\nBACC00001\n")
            .expect("csv on stdin");
    }
    let out = child.wait_with_output().expect("pull ends");
    let third = String::from_utf8_lossy(&out.stdout).into_owned();
    let logs = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{third}\n{logs}");
    assert!(third.contains("retrieved 4 instances"), "{third}");
    assert!(
        !third.contains("BACC00001") && !logs.contains("BACC00001") && !logs.is_empty(),
        "the accession number is never printed or logged"
    );
    assert_eq!(files_under(&out_dir).len(), 12);
    // Orthanc pushes a study to the node's SCP (modality store).
    let serve_dir = dir.path().join("serve");
    let serve_cfg = dir.path().join("serve.toml");
    std::fs::write(&serve_cfg, format!("data_dir = {:?}\n[scp]\nae_title = \"FEDSERVE\"\nbind = \"127.0.0.1:{serve_port}\"\nallowed = [{{ ae = \"ORTHANC\", host = \"127.0.0.1\" }}]\n", serve_dir.join("data"))).expect("config");
    let _serve = Killed(
        Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
            .arg("--config")
            .arg(&serve_cfg)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    );
    std::thread::sleep(Duration::from_millis(800));
    let studies: Vec<String> =
        serde_json::from_str(&curl(&[&format!("{base}/studies")])).expect("study ids");
    assert_eq!(studies.len(), 3);
    let body = serde_json::json!(studies).to_string();
    curl(&[
        "-X",
        "POST",
        &format!("{base}/modalities/fedserve/store"),
        "-d",
        &body,
    ]);
    assert_eq!(
        wait_for(&serve_dir.join("data/deid"), 12),
        12,
        "Orthanc's push de-identified"
    );
}
