//! `bench --anchors`: our jobs timed beside the tools a hospital would otherwise run, on the
//! same files in the same run, where those tools are installed: gdcmanon (GDCM's PS3.15
//! basic profile) for de-identification, dcm2niix for DICOM → NIfTI, dcmtk's storescp for
//! receiving C-STORE. Each side runs as a new user would run it (our side through the
//! `fedcurate-node` binary's own commands where one exists), alternating, best of the runs.

use std::fs;
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::workloads;

/// One timed run of a command: wall time and, under GNU time, its peak memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timed {
    pub(crate) elapsed: Duration,
    pub(crate) peak_kib: Option<u64>,
}

pub(crate) fn installed(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const GNU_TIME: &str = "/usr/bin/time";

/// Write back what earlier runs left dirty in the page cache, so that one side's writes are
/// not flushed on the other side's time.
pub(crate) fn settle() {
    let _ = Command::new("sync").status();
}

/// Run `cmd` (under GNU time when it is there, for the peak memory) and time it.
pub(crate) fn timed(program: &Path, args: &[&std::ffi::OsStr], what: &str) -> Result<Timed> {
    settle();
    let with_time = Path::new(GNU_TIME).exists();
    let stats = std::env::temp_dir().join(format!("fedcurate-bench-time-{}", std::process::id()));
    let mut cmd = if with_time {
        let mut c = Command::new(GNU_TIME);
        c.arg("-f").arg("%M").arg("-o").arg(&stats).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let peak_kib: Option<u64> = if with_time {
        fs::read_to_string(&stats)
            .ok()
            .and_then(|s| s.lines().last().and_then(|l| l.trim().parse().ok()))
    } else {
        None
    };
    let _ = fs::remove_file(&stats);
    Ok(Timed { elapsed, peak_kib })
}

fn count_files(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .count()
}

pub(crate) fn fresh(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    Ok(dir.to_owned())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

fn mb(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.0} MB", k as f64 * 1024.0 / 1e6))
        .unwrap_or_else(|| "-".into())
}

/// Print one line: ours against the anchor, and the ratio (anchor time / our time).
pub(crate) fn line(job: &str, ours: Timed, anchor: Option<(&str, Timed)>) {
    match anchor {
        Some((name, a)) => println!(
            "{job:<46} fedcurate {:>7.2} s {:>8}   {name} {:>7.2} s {:>8}   {:>5.2}x",
            secs(ours.elapsed),
            mb(ours.peak_kib),
            secs(a.elapsed),
            mb(a.peak_kib),
            secs(a.elapsed) / secs(ours.elapsed)
        ),
        None => println!(
            "{job:<46} fedcurate {:>7.2} s {:>8}   (anchor not installed)",
            secs(ours.elapsed),
            mb(ours.peak_kib)
        ),
    }
}

pub(crate) fn best(a: Option<Timed>, b: Timed) -> Timed {
    match a {
        Some(a) if a.elapsed <= b.elapsed => a,
        _ => b,
    }
}

/// Write a node.toml for a data directory under the bench folder.
pub(crate) fn node_config(dir: &Path) -> Result<PathBuf> {
    let data = dir.join("data");
    fs::create_dir_all(&data)?;
    fc_files::restrict(&data, 0o700)?;
    let path = dir.join("node.toml");
    fs::write(&path, format!("data_dir = \"{}\"\n", data.display()))?;
    Ok(path)
}

pub(crate) fn bench_anchors(
    dir: Option<PathBuf>,
    files: usize,
    slices: usize,
    runs: usize,
    only: &[String],
    keep: bool,
) -> Result<()> {
    const JOBS: [&str; 3] = ["deid", "nifti", "store"];
    if let Some(unknown) = only.iter().find(|j| !JOBS.contains(&j.as_str())) {
        bail!("--only takes deid, nifti or store, not {unknown}");
    }
    let wanted = |job: &str| only.is_empty() || only.iter().any(|j| j == job);
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-abench-{}", std::process::id()))
    });
    if dir.exists() && fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder with --dir",
            dir.display()
        );
    }
    let runs = runs.max(1);
    let exe = std::env::current_exe().context("locating the fedcurate-node binary")?;
    println!(
        "{files} CT files (512x512, 16 bit) and a {slices}-slice series in {}; best of {runs} alternating runs; {} cores",
        dir.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("ratio = the anchor's time / ours (above 1: we are faster)");
    let archive = dir.join("archive");
    if wanted("deid") || wanted("store") {
        workloads::generate(&archive, files)?;
    }
    if wanted("deid") {
        deidentification(&dir, &exe, &archive, files, runs)?;
    }
    if wanted("nifti") {
        nifti(&dir, &exe, slices, runs)?;
    }
    if wanted("store") {
        store(&dir, &archive, files, runs)?;
    }
    if !keep {
        fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// `fedcurate-node deid --anonymise` (every option, the catalog, flushed per batch) against
/// `gdcmanon -e` (the basic profile, encrypting the originals into the output).
fn deidentification(
    dir: &Path,
    exe: &Path,
    archive: &Path,
    files: usize,
    runs: usize,
) -> Result<()> {
    let anchor = installed("gdcmanon") && installed("openssl");
    let (cert, key) = (dir.join("gdcm-cert.pem"), dir.join("gdcm-key.pem"));
    if anchor {
        let ok = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=fedcurate-bench", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("openssl could not make gdcmanon's certificate");
        }
    }
    let options: Vec<&str> = node::deid::table::DeidOption::ALL
        .into_iter()
        .filter(|o| *o != node::deid::table::DeidOption::RetainLongitudinalFullDates)
        .map(|o| o.config_name())
        .collect();
    let (mut ours, mut theirs) = (None, None);
    for _ in 0..runs {
        if anchor {
            let out = fresh(&dir.join("gdcm-out"))?;
            let t = timed(
                Path::new("gdcmanon"),
                &[
                    "-e".as_ref(),
                    "-c".as_ref(),
                    cert.as_os_str(),
                    "-r".as_ref(),
                    "--continue".as_ref(),
                    "-i".as_ref(),
                    archive.as_os_str(),
                    "-o".as_ref(),
                    out.as_os_str(),
                ],
                "gdcmanon",
            )?;
            let n = count_files(&out);
            if n != files {
                bail!("gdcmanon wrote {n} of {files} files");
            }
            theirs = Some(best(theirs, t));
        }
        let work = fresh(&dir.join("deid-run"))?;
        let config = node_config(&work)?;
        let out = work.join("out");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--config".into(),
            config.clone().into(),
            "deid".into(),
            "--anonymise".into(),
            "--input".into(),
            archive.into(),
            "--output".into(),
            out.clone().into(),
        ];
        for o in &options {
            args.push("--option".into());
            args.push((*o).into());
        }
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let t = timed(exe, &refs, "fedcurate-node deid")?;
        let n = count_files(&out);
        if n != files {
            bail!("fedcurate-node deid wrote {n} of {files} files");
        }
        ours = Some(best(ours, t));
    }
    let ours = ours.context("no run")?;
    line(
        &format!("de-identify {files} files (every option, flushed)"),
        ours,
        theirs.map(|t| ("gdcmanon", t)),
    );
    Ok(())
}

/// `fedcurate-node export --format nifti` of a de-identified series against dcm2niix on the
/// same series, compressed and not.
fn nifti(dir: &Path, exe: &Path, slices: usize, runs: usize) -> Result<()> {
    let series = dir.join("series");
    workloads::generate_series(&series.join("in"), slices)?;
    // Our export reads only de-identified output: de-identify the series first (not timed).
    let work = fresh(&dir.join("nifti-node"))?;
    let config = node_config(&work)?;
    let deid = work.join("deid");
    let status = Command::new(exe)
        .arg("--config")
        .arg(&config)
        .args(["deid", "--input"])
        .arg(series.join("in"))
        .arg("--output")
        .arg(&deid)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("de-identifying the series failed");
    }
    let anchor = installed("dcm2niix");
    let voxel_mb = (512 * 512 * 2 * slices) as f64 / 1e6;
    for (compress, z, what) in [
        ("default", "y", ".nii.gz"),
        ("fast", "y", ".nii.gz (ours: level 1)"),
        ("none", "n", ".nii"),
    ] {
        let (mut ours, mut theirs) = (None, None);
        for _ in 0..runs {
            if anchor {
                let out = fresh(&dir.join("dcm2niix-out"))?;
                let t = timed(
                    Path::new("dcm2niix"),
                    &[
                        "-z".as_ref(),
                        z.as_ref(),
                        "-b".as_ref(),
                        "n".as_ref(),
                        "-o".as_ref(),
                        out.as_os_str(),
                        series.join("in").as_os_str(),
                    ],
                    "dcm2niix",
                )?;
                theirs = Some(best(theirs, t));
            }
            let out = dir.join("export-out");
            if out.exists() {
                fs::remove_dir_all(&out)?;
            }
            let t = timed(
                exe,
                &[
                    "--config".as_ref(),
                    config.as_os_str(),
                    "export".as_ref(),
                    "--format".as_ref(),
                    "nifti".as_ref(),
                    "--compress".as_ref(),
                    compress.as_ref(),
                    "--input".as_ref(),
                    deid.as_os_str(),
                    "--out".as_ref(),
                    out.as_os_str(),
                ],
                "fedcurate-node export",
            )?;
            ours = Some(best(ours, t));
        }
        let ours = ours.context("no run")?;
        line(
            &format!("{slices}-slice CT ({voxel_mb:.0} MB) to {what}"),
            ours,
            theirs.map(|t| ("dcm2niix", t)),
        );
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(port: u16) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listened on port {port}")
}

/// A child that is killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dcmtk as Debian builds it leaves Nagle's algorithm on unless `TCP_NODELAY=1` is in the
/// environment: every object then waits ~40 ms for a delayed acknowledgement, on either
/// side. Both dcmtk tools run with it set (our SCP sets TCP_NODELAY on its sockets itself).
///
/// Send the archive with `parallel` storescu processes (one association each, the patient
/// folders split between them) and time until the last one ends.
fn send(archive: &Path, port: u16, parallel: usize) -> Result<Duration> {
    let mut folders: Vec<PathBuf> = fs::read_dir(archive)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    let per = folders.len().div_ceil(parallel.max(1)).max(1);
    settle();
    let started = Instant::now();
    let children: Vec<std::process::Child> = folders
        .chunks(per)
        .map(|part| {
            Command::new("storescu")
                .env("TCP_NODELAY", "1")
                .args(["-aet", "BENCH", "-aec", "FEDCURATE", "+sd", "+r"])
                .arg("127.0.0.1")
                .arg(port.to_string())
                .args(part)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<io::Result<_>>()?;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "storescu failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
    }
    Ok(started.elapsed())
}

/// The Storage SCP `fedcurate-node serve` runs (receiving into its inbox, in this process:
/// the de-identification behind it is the first row's job) against `storescp --fork`, both
/// receiving from storescu.
fn store(dir: &Path, archive: &Path, files: usize, runs: usize) -> Result<()> {
    if !installed("storescu") {
        println!("C-STORE: storescu (dcmtk) is not installed; skipped");
        return Ok(());
    }
    let anchor = installed("storescp");
    let mut anchor_best: [Option<Timed>; 2] = [None, None];
    use node::dimse::scp::Durability;
    for durability in [Durability::Flush, Durability::Os] {
        let mut ours_best: [Option<Timed>; 2] = [None, None];
        for _ in 0..runs {
            for (slot, parallel) in [1usize, 4].into_iter().enumerate() {
                if anchor && durability == Durability::Flush {
                    let out = fresh(&dir.join("storescp-out"))?;
                    let port = free_port()?;
                    let _scp = Child(
                        Command::new("storescp")
                            .env("TCP_NODELAY", "1")
                            .args(["--fork", "-od"])
                            .arg(&out)
                            .arg(port.to_string())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .context("starting storescp")?,
                    );
                    wait_listening(port)?;
                    let elapsed = send(archive, port, parallel)?;
                    let n = count_files(&out);
                    if n != files {
                        bail!("storescp stored {n} of {files} objects");
                    }
                    anchor_best[slot] = Some(best(
                        anchor_best[slot],
                        Timed {
                            elapsed,
                            peak_kib: None,
                        },
                    ));
                }
                let work = fresh(&dir.join("scp-node"))?;
                let inbox = work.join("inbox");
                let (tx, rx) = std::sync::mpsc::channel();
                let scp = node::dimse::scp::bind(
                    node::dimse::scp::ScpConfig {
                        ae_title: "FEDCURATE".into(),
                        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                        allowed: vec![node::dimse::scp::AllowedPeer {
                            ae: "BENCH".into(),
                            host: None,
                        }],
                        inbox: inbox.clone(),
                        max_object_bytes: 2048 * 1024 * 1024,
                        durability,
                    },
                    tx,
                )?;
                let port = scp.local_addr.port();
                let elapsed = send(archive, port, parallel)?;
                scp.shutdown();
                let n = rx.try_iter().count();
                let on_disk = fs::read_dir(&inbox)?
                    .flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count();
                if on_disk != n {
                    bail!("our SCP acknowledged {n} objects but {on_disk} are in the inbox");
                }
                if n != files {
                    bail!("our SCP stored {n} of {files} objects");
                }
                ours_best[slot] = Some(best(
                    ours_best[slot],
                    Timed {
                        elapsed,
                        peak_kib: None,
                    },
                ));
            }
        }
        for (slot, parallel) in [1usize, 4].into_iter().enumerate() {
            let ours = ours_best[slot].context("no run")?;
            line(
                &format!(
                    "C-STORE {files} objects, {parallel} association{}, {}",
                    if parallel > 1 { "s" } else { "" },
                    match durability {
                        Durability::Flush => "flush",
                        Durability::Os => "os",
                    }
                ),
                ours,
                anchor_best[slot].map(|t| ("storescp", t)),
            );
        }
    }
    io::stdout().flush()?;
    Ok(())
}
