//! Power loss, not only kill -9. A kill keeps the page cache, so a missing flush goes unseen;
//! here the data directory lives on a loop-mounted ext4 or XFS image, and the file system is
//! shut down without flushing its log (`xfs_io -x -c shutdown`, FS_IOC_SHUTDOWN, which works
//! on ext4 too) at a random moment during `deid` and during C-STORE receipt. After a remount:
//! every catalogued output is on disk with its hash, SQLite's integrity check passes, and
//! every acknowledged C-STORE is in the inbox or the catalog; then the same command resumes,
//! the counts add up, `audit verify` passes and no temporary file is left. The harness is
//! calibrated: with the node's flushes switched off (`FEDCURATE_TEST_SKIP_FLUSH=1`) it must
//! find lost outputs. Needs root, loop devices, e2fsprogs and xfsprogs (scripts/test.sh).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node::sample;

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (installed by scripts/test.sh): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file system on a loop-mounted image, unmounted when dropped.
struct Volume {
    image: PathBuf,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Volume {
    fn new(fstype: &str) -> Volume {
        let tmp = tempfile::tempdir().expect("tempdir");
        let image = tmp.path().join("disk.img");
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(320 << 20).expect("size");
        drop(f);
        let image_s = image.to_str().expect("utf-8");
        match fstype {
            "xfs" => sh("mkfs.xfs", &["-q", "-f", image_s]),
            _ => sh("mkfs.ext4", &["-q", "-F", image_s]),
        }
        let dir = tmp.path().join("mnt");
        std::fs::create_dir_all(&dir).expect("mount point");
        let v = Volume {
            image,
            dir,
            _tmp: tmp,
        };
        v.mount();
        v
    }

    fn mount(&self) {
        sh(
            "mount",
            &[
                "-o",
                "loop",
                self.image.to_str().expect("utf-8"),
                self.dir.to_str().expect("utf-8"),
            ],
        );
    }

    /// The power cut: the file system stops, nothing more reaches the disk.
    fn cut(&self) {
        sh(
            "xfs_io",
            &["-x", "-c", "shutdown", self.dir.to_str().expect("utf-8")],
        );
    }

    /// Back from the cut: unmount the dead file system and mount it again (journal replay).
    fn remount(&self) {
        sh("umount", &[self.dir.to_str().expect("utf-8")]);
        self.mount();
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

fn node(cfg: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedcurate-node"));
    c.arg("--config").arg(cfg);
    c
}

/// The node's configuration (beside the image, not on it: only the data directory and the
/// output are on the file system that loses power).
fn config(vol: &Path, skip_flush: bool) -> (PathBuf, Option<(&'static str, &'static str)>) {
    let cfg = vol.with_file_name("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[deid]\nbatch_size = 4\n[scp]\nbind = \"127.0.0.1:0\"\nallowed = [{{ ae = \"STORESCU\" }}]\n",
            vol.join("data")
        ),
    )
    .expect("config");
    (
        cfg,
        skip_flush.then_some(("FEDCURATE_TEST_SKIP_FLUSH", "1")),
    )
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every catalogued output on disk with its hash, and SQLite's integrity check: the list of
/// problems (empty when the node kept its promise).
fn lost_outputs(data: &Path, output: &Path) -> Vec<String> {
    let db = rusqlite::Connection::open_with_flags(
        data.join("catalog.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    )
    .expect("catalog opens after the cut");
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    let mut problems = Vec::new();
    if integrity != "ok" {
        problems.push(format!("integrity: {integrity}"));
    }
    let mut st = db
        .prepare("SELECT output_path, output_hash FROM inputs WHERE outcome = 'written'")
        .expect("query");
    let rows: Vec<(String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("rows")
        .map(|r| r.expect("row"))
        .collect();
    for (rel, hash) in rows {
        match std::fs::read(output.join(&rel)) {
            Ok(bytes) if sha256(&bytes) == hash => {}
            Ok(_) => problems.push(format!("{rel}: content differs from the catalog")),
            Err(e) => problems.push(format!("{rel}: {e}")),
        }
    }
    problems
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A pseudo-random delay from the clock (no RNG crate needed).
fn jitter(max_ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    Duration::from_millis(nanos % max_ms.max(1))
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One `deid` run cut at a random moment. Returns the problems found after the remount and
/// whether the cut landed mid-run (some outputs catalogued, not all).
fn deid_trial(
    fstype: &str,
    trial: u64,
    skip_flush: bool,
    input: &Path,
    inputs: usize,
) -> (Vec<String>, bool) {
    let vol = Volume::new(fstype);
    let (cfg, env) = config(&vol.dir, skip_flush);
    let output = vol.dir.join("out");
    let mut cmd = node(&cfg);
    cmd.args(["deid", "--input"])
        .arg(input)
        .arg("--output")
        .arg(&output)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("deid starts");
    // Half the cuts wait for the first output, half land at a random time from the start.
    let started = Instant::now();
    if trial.is_multiple_of(2) {
        while files_under(&output).is_empty() && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(jitter(200));
    } else {
        std::thread::sleep(jitter(600));
    }
    vol.cut();
    stop(child);
    vol.remount();
    let data = vol.dir.join("data");
    if !data.join("catalog.sqlite").exists() {
        return (Vec::new(), false);
    }
    let problems = lost_outputs(&data, &output);
    let written = files_under(&output)
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .count();
    let mid_run = written > 0 && written < inputs;
    if skip_flush {
        return (problems, mid_run);
    }
    // Resume: the same command finishes the rest.
    let out = node(&cfg)
        .args(["deid", "--input"])
        .arg(input)
        .arg("--output")
        .arg(&output)
        .output()
        .expect("resume");
    assert!(
        out.status.success(),
        "{fstype}: resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = node(&cfg)
        .args(["catalog", "export"])
        .output()
        .expect("export");
    assert_eq!(
        String::from_utf8_lossy(&export.stdout).lines().count(),
        inputs,
        "{fstype}: every input accounted for once"
    );
    let audit = node(&cfg)
        .args(["audit", "verify"])
        .output()
        .expect("audit");
    assert!(audit.status.success(), "{fstype}: audit verify");
    let temporaries: Vec<PathBuf> = files_under(&vol.dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".fc-tmp-"))
        })
        .collect();
    assert!(
        temporaries.is_empty(),
        "{fstype}: temporaries left: {temporaries:?}"
    );
    let mut after = problems;
    after.extend(lost_outputs(&data, &output));
    (after, mid_run)
}

fn archive() -> (tempfile::TempDir, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = sample::write_bulk_archive_sized(dir.path(), 12, 12, 128).expect("archive");
    (dir, files.len())
}

#[test]
fn deid_survives_a_power_cut_on_ext4_and_xfs() {
    let (input, inputs) = archive();
    let mut mid_runs = 0;
    for fstype in ["ext4", "xfs"] {
        for trial in 0..3 {
            let (problems, mid_run) = deid_trial(fstype, trial, false, input.path(), inputs);
            assert!(problems.is_empty(), "{fstype} trial {trial}: {problems:?}");
            mid_runs += usize::from(mid_run);
        }
    }
    assert!(mid_runs >= 2, "only {mid_runs} cuts landed mid-run");
}

#[test]
fn the_harness_finds_lost_outputs_when_flushes_are_skipped() {
    let (input, inputs) = archive();
    let mut caught = 0;
    let mut trials = 0;
    while trials < 6 && caught == 0 {
        let (problems, _) = deid_trial("xfs", trials, true, input.path(), inputs);
        caught += usize::from(!problems.is_empty());
        trials += 1;
    }
    assert!(
        caught > 0,
        "{trials} power cuts with every flush skipped lost nothing: the harness cannot see a missing flush"
    );
}

#[test]
fn acknowledged_c_stores_survive_a_power_cut() {
    let input = tempfile::tempdir().expect("tempdir");
    let files = sample::write_bulk_archive_sized(input.path(), 6, 20, 128).expect("archive");
    for fstype in ["ext4", "xfs"] {
        let vol = Volume::new(fstype);
        let (cfg, _) = config(&vol.dir, false);
        let mut serve = node(&cfg)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve");
        let mut first = [0u8; 256];
        let n = serve
            .stdout
            .as_mut()
            .expect("stdout")
            .read(&mut first)
            .expect("port line");
        let line = String::from_utf8_lossy(&first[..n]).into_owned();
        let port = line
            .lines()
            .next()
            .and_then(|l| l.trim().rsplit(':').next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        let storescu = Command::new("storescu")
            .args([
                "-v",
                "-aet",
                "STORESCU",
                "-aec",
                "FEDCURATE",
                "+sd",
                "+r",
                "127.0.0.1",
            ])
            .arg(&port)
            .arg(input.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("storescu (dcmtk)");
        std::thread::sleep(Duration::from_millis(150) + jitter(400));
        vol.cut();
        let out = storescu.wait_with_output().expect("storescu ends");
        stop(serve);
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let acknowledged = log.matches("Received Store Response (Success)").count();
        vol.remount();
        let data = vol.dir.join("data");
        let held = files_under(&data.join("inbox")).len()
            + files_under(&data.join("inbox-processing")).len();
        let catalogued: usize = if data.join("catalog.sqlite").exists() {
            assert!(
                lost_outputs(&data, &data.join("deid")).is_empty(),
                "{fstype}"
            );
            rusqlite::Connection::open(data.join("catalog.sqlite"))
                .expect("catalog")
                .query_row("SELECT COUNT(*) FROM inputs", [], |r| r.get::<_, i64>(0))
                .expect("count") as usize
        } else {
            0
        };
        assert!(
            held + catalogued >= acknowledged,
            "{fstype}: {acknowledged} acknowledged, {held} in the inbox and {catalogued} catalogued"
        );
        // Resume: the inbox is replayed; every acknowledged instance ends in the catalog.
        let mut serve = node(&cfg)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve again");
        let started = Instant::now();
        loop {
            let pending = files_under(&data.join("inbox")).len()
                + files_under(&data.join("inbox-processing")).len();
            if pending == 0 || started.elapsed() > Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = serve.kill();
        let _ = serve.wait();
        let written = files_under(&data.join("deid")).len();
        assert!(
            written >= acknowledged && written <= files.len(),
            "{fstype}: {acknowledged} acknowledged, {written} de-identified after the restart"
        );
    }
}
