//! `bench`: de-identification, volumes, harmonisation and curation timed on generated data.

mod anchors;
mod workloads;

pub(crate) use anchors::bench_anchors;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub(crate) fn bench(
    dir: Option<PathBuf>,
    files: usize,
    batch_size: usize,
    keep: bool,
) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-bench-{}", std::process::id()))
    });
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder with --dir",
            dir.display()
        );
    }
    let threads = rayon::current_num_threads();
    println!(
        "generating {files} CT files (512x512, 16 bit) in {} ...",
        dir.display()
    );
    let inputs = workloads::generate(&dir.join("in"), files)?;
    let base = workloads::baseline(&inputs, &dir.join("baseline"), batch_size)?;
    let deid = workloads::deidentify(&dir.join("in"), &dir.join("work"), batch_size)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{threads} threads, batch size {batch_size}, fsync per batch");
    println!(
        "{:<42} {:>8} {:>10} {:>10} {:>12}",
        "phase", "files", "files/s", "MB/s", "peak RSS MB"
    );
    for p in [&base, &deid] {
        println!(
            "{:<42} {:>8} {:>10.0} {:>10.1} {:>12}",
            p.name,
            p.files,
            p.files_per_s(),
            p.mb_per_s(),
            p.peak_rss
                .map(|b| format!("{:.0}", b as f64 / 1e6))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "ratio de-identify / baseline: {:.2}",
        deid.files_per_s() / base.files_per_s()
    );
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

pub(crate) fn bench_volume(dir: Option<PathBuf>, slices: usize, keep: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-vbench-{}", std::process::id()))
    });
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder with --dir",
            dir.display()
        );
    }
    println!(
        "generating a 512x512x{slices} int16 CT series in {} ...",
        dir.display()
    );
    let b = workloads::volume(&dir, slices).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mb = b.voxel_bytes as f64 / 1e6;
    let row = |name: &str, d: Duration| {
        println!(
            "{name:<44} {:>8.3} s {:>9.1} MB/s",
            d.as_secs_f64(),
            mb / d.as_secs_f64().max(1e-9)
        );
    };
    println!(
        "{} slices, {:.0} MB of voxels, {} threads",
        b.slices,
        mb,
        rayon::current_num_threads()
    );
    row("read and parse the files only", b.read);
    row("read, parse, decode and assemble", b.assemble);
    row("write .nii (uncompressed)", b.write_nii);
    row("write .nii.gz (gzip level 1)", b.write_nii_gz);
    println!(
        "assembly + .nii: {:.2} s; assembly + .nii.gz: {:.2} s ({:.0} MB compressed)",
        (b.assemble + b.write_nii).as_secs_f64(),
        (b.assemble + b.write_nii_gz).as_secs_f64(),
        b.nii_gz_bytes as f64 / 1e6
    );
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// The reference's timings on this machine: runs the embedded script with `python3`.
pub(crate) fn reference_timings(n: usize) -> Result<Vec<(String, f64)>> {
    const SCRIPT: &str = include_str!("../../../../scripts/reference/bench_reference.py");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(n.to_string())
        .env("OMP_NUM_THREADS", "1")
        .output()
        .context("running python3 (install intensity-normalization==2.2.4 with pip)")?;
    if !out.status.success() {
        bail!(
            "the reference did not run: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_at(l.len().min(24));
            let secs = rest.trim().strip_suffix(" s")?.trim().parse().ok()?;
            Some((name.trim().to_owned(), secs))
        })
        .collect())
}

pub(crate) fn bench_harmonise(dir: Option<PathBuf>, n: usize, reference: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-hbench-{}", std::process::id()))
    });
    println!(
        "{n}^3 float32 volume ({:.0} MB), {} threads",
        (n * n * n * 4) as f64 / 1e6,
        rayon::current_num_threads()
    );
    let (baseline, timings) = workloads::harmonise(&dir, n).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{:<32} {:>9.3} s",
        "read + write the volume (NIfTI)",
        baseline.as_secs_f64()
    );
    let refs = if reference {
        reference_timings(n)?
    } else {
        Vec::new()
    };
    for t in &timings {
        let ours = t.elapsed.as_secs_f64();
        let vs = refs
            .iter()
            .find(|(name, _)| *name == t.name)
            .map(|(_, r)| {
                format!(
                    "   reference {r:>7.3} s: {:>5.1}x faster",
                    r / ours.max(1e-9)
                )
            })
            .unwrap_or_default();
        println!(
            "{:<32} {:>9.3} s  (new output {:>6.3} s)   {:>5.2}x the read+write pass{vs}",
            t.name,
            ours,
            t.fresh.as_secs_f64(),
            ours / baseline.as_secs_f64().max(1e-9)
        );
    }
    if reference {
        file_to_file(&dir, n)?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// File to file, as a user runs each: `fedcurate-node harmonise` on uncompressed NIfTI
/// against the reference's own commands (`zscore-normalize`, `kde-normalize`,
/// `ws-normalize`, `nyul-normalize`) on the same files.
fn file_to_file(dir: &std::path::Path, n: usize) -> Result<()> {
    use anchors::{best, fresh, installed, line, node_config, timed};
    let exe = std::env::current_exe().context("locating the fedcurate-node binary")?;
    let f2f = dir.join("file-to-file");
    let (one, three) = (f2f.join("one"), f2f.join("three"));
    std::fs::create_dir_all(&one)?;
    std::fs::create_dir_all(&three)?;
    for (i, (scale, seed)) in [(1.0, 1u64), (1.2, 2), (0.9, 3)].into_iter().enumerate() {
        let bytes = node::volume::nifti::encode(&workloads::synthetic_volume(n, scale, seed));
        if i == 0 {
            std::fs::write(one.join("v0.nii"), &bytes)?;
        }
        std::fs::write(three.join(format!("v{i}.nii")), &bytes)?;
    }
    let work = fresh(&f2f.join("node"))?;
    let config = node_config(&work)?;
    println!("file to file ({n}^3 float32 .nii in and out, as each is run from the shell):");
    for (name, method, ours_in, command) in [
        ("z-score", "zscore", &one, "zscore-normalize"),
        ("KDE (T1)", "kde", &one, "kde-normalize"),
        ("WhiteStripe (T1)", "whitestripe", &one, "ws-normalize"),
        ("Nyul fit on 3 + apply", "nyul", &three, "nyul-normalize"),
    ] {
        let (mut ours, mut theirs) = (None, None);
        let anchor = installed(command);
        for _ in 0..2 {
            let out = fresh(&f2f.join("ours-out"))?;
            let t = timed(
                &exe,
                &[
                    "--config".as_ref(),
                    config.as_os_str(),
                    "harmonise".as_ref(),
                    "--input".as_ref(),
                    ours_in.as_os_str(),
                    "--out".as_ref(),
                    out.as_os_str(),
                    "--method".as_ref(),
                    method.as_ref(),
                    "--foreground".as_ref(),
                    "positive".as_ref(),
                    "--compress".as_ref(),
                    "none".as_ref(),
                ],
                "fedcurate-node harmonise",
            )?;
            ours = Some(best(ours, t));
            if anchor {
                let out = fresh(&f2f.join("ref-out"))?;
                let mut args: Vec<std::ffi::OsString> = Vec::new();
                if method == "nyul" {
                    args.push(three.clone().into());
                    args.push("-o".into());
                    args.push(out.clone().into());
                } else {
                    args.push(one.join("v0.nii").into());
                    args.push("-o".into());
                    args.push(out.join("v0.nii").into());
                }
                let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
                let t = timed(std::path::Path::new(command), &refs, command)?;
                theirs = Some(best(theirs, t));
            }
        }
        line(
            name,
            ours.context("no run")?,
            theirs.map(|t| ("intensity-normalization", t)),
        );
    }
    Ok(())
}

/// `bench --curate N`: header-only conformance checks against full curation, on N generated
/// CT instances.
pub(crate) fn bench_curate(dir: Option<PathBuf>, n: usize, keep: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-cbench-{}", std::process::id()))
    });
    let (count, header, full) =
        workloads::curate(&dir, n.div_ceil(100), 100).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{count} instances (128x128 CT), {} threads",
        rayon::current_num_threads()
    );
    println!(
        "header-only conformance checks   {:>8.3} s  {:>8.0} instances/s",
        header.as_secs_f64(),
        count as f64 / header.as_secs_f64()
    );
    println!(
        "full curation (pixels, volumes)  {:>8.3} s  {:>8.0} instances/s",
        full.as_secs_f64(),
        count as f64 / full.as_secs_f64()
    );
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
