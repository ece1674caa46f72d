//! `fedcurate-node consortium-demo`: a whole consortium on one machine, driven the way its
//! operators would drive it — separate processes, real certificates, loopback networking. It
//! provisions a CA, starts a coordinator and three site nodes, generates a different archive
//! for each site, feeds one site over the DICOM network and the others from files,
//! de-identifies, federates (schema, approval, aggregates, the Nyúl model), and prints the
//! summary. Every process it starts is stopped when it ends, fails, or is interrupted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The schema the demo consortium publishes.
const SCHEMA: &str = r#"schema_version = 1
id = "demo-brain-t1"
revision = 1

[data_of_interest]
modalities = ["MR"]
body_parts = ["BRAIN"]

[[data_of_interest.constraints]]
attribute = "field-strength"
modality = "MR"
allowed = ["1.5", "3"]

[[data_of_interest.constraints]]
attribute = "slice-thickness"
range = [0.5, 1.3]

[deidentification]
options = ["retain-patient-characteristics"]

[vocabularies]
modality = ["CT", "MR"]
manufacturer = ["GE MEDICAL SYSTEMS", "SIEMENS", "Philips"]
age_bands = [0, 18, 40, 65, 90]
sex = ["F", "M"]

label_classes = ["lesion"]

[statistics]
counts_by = ["modality", "sex", "age_bands", "manufacturer", "label_classes"]
quality_metrics = ["snr", "cnr", "slice-thickness", "annotation-dice"]

[[statistics.histograms]]
quantity = "annotation-dice"
edges = [0.5, 0.7, 0.8, 0.9, 1.0]

[[statistics.histograms]]
quantity = "intensity"
modality = "MR"
edges = [0.0, 200.0, 550.0, 1300.0, 3000.0, 6000.0]

[harmonisation]
method = "nyul"
contrast = "t1"

[privacy]
min_cell_count = 5
"#;

pub(crate) const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// The annotation project every demo site runs.
const PROJECT: &str = r#"id = "lesions"
kinds = ["mask"]
raters_per_case = 2
[cases]
modalities = ["MR"]
[[labels]]
value = 1
name = "lesion"
colour = [230, 60, 40]
"#;

/// A site's clinicians annotate: the project, two readers assigned, each reader's lesion mask
/// on every case (the second reader's drawn `site + 1` voxels off, so agreement differs by
/// site), a STAPLE consensus, and the site's agreement line.
fn annotate_site(
    children: &Children,
    node: &dyn Fn(&Path) -> Command,
    sdir: &Path,
    cfg: &Path,
    site: usize,
) -> Result<String> {
    let definition = sdir.join("annotation-project.toml");
    std::fs::write(&definition, PROJECT)?;
    let annotate = |args: &[&str]| {
        let mut c = node(cfg);
        c.arg("annotate").args(args);
        c
    };
    children.run(
        annotate(&["project", "create"]).arg(&definition),
        "annotate project create",
    )?;
    children.run(
        &mut annotate(&[
            "assign",
            "--project",
            "lesions",
            "--raters",
            "reader-1,reader-2",
        ]),
        "annotate assign",
    )?;
    let cases: serde_json::Value = serde_json::from_str(&children.run(
        &mut annotate(&["cases", "--project", "lesions", "--json"]),
        "annotate cases",
    )?)?;
    let inbox = sdir.join("annotations-in");
    for c in cases.as_array().context("cases")? {
        let case = c["case_id"].as_str().context("case id")?;
        let image = sdir
            .join("data")
            .join(c["image"].as_str().context("image")?);
        let (_, vol) = node::volume::nifti::read(&image)?;
        for (reader, shift) in [("reader-1", 0.0), ("reader-2", site as f64 + 1.0)] {
            let mut map = node::fc_annotate::LabelMap::empty(node::fc_annotate::Grid::of(&vol));
            let [ni, nj, nk] = map.grid.shape;
            let centre = [ni as f64 / 2.0 + shift, nj as f64 / 2.0, nk as f64 / 2.0];
            let radii = [ni as f64 / 5.0, nj as f64 / 5.0, (nk as f64 / 3.0).max(1.0)];
            for ((i, j, k), v) in map.data.indexed_iter_mut() {
                let d: f64 = [i, j, k]
                    .iter()
                    .zip(centre.iter().zip(radii))
                    .map(|(x, (c, r))| ((*x as f64 - c) / r).powi(2))
                    .sum();
                if d <= 1.0 {
                    *v = 1;
                }
            }
            let file = inbox.join(format!("{case}-{reader}.nii.gz"));
            std::fs::create_dir_all(&inbox)?;
            std::fs::write(&file, map.to_nifti_gz()?)?;
            children.run(
                annotate(&[
                    "import",
                    "--project",
                    "lesions",
                    "--rater",
                    reader,
                    "--case",
                    case,
                    "--labelmap",
                ])
                .arg(&file),
                "annotate import",
            )?;
        }
    }
    children.run(
        &mut annotate(&["consensus", "--project", "lesions", "--method", "staple"]),
        "annotate consensus",
    )?;
    let out = children.run(
        &mut annotate(&["agreement", "--project", "lesions"]),
        "annotate agreement",
    )?;
    Ok(format!(
        "{} cases annotated; {}",
        cases.as_array().map_or(0, Vec::len),
        out.lines()
            .find(|l| l.starts_with("lesion:"))
            .unwrap_or("")
            .trim()
    ))
}

/// Every child process the demo starts, long-running or not: stopped (SIGTERM, then killed)
/// when dropped, and when the demo is interrupted (Ctrl-C or SIGTERM). A child is spawned and
/// listed under one lock, and the interrupt handler exits while holding it, so no child can
/// start unseen or after the handler has stopped the others.
pub(crate) struct Children {
    list: std::sync::Arc<std::sync::Mutex<Vec<(String, Child)>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Children {
    pub(crate) fn new() -> Self {
        let list: std::sync::Arc<std::sync::Mutex<Vec<(String, Child)>>> = Default::default();
        let watched = list.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            });
            eprintln!("\ninterrupted: stopping every process the demo started");
            let held = watched.lock();
            if let Ok(mut l) = held {
                for (_, c) in l.iter_mut() {
                    terminate(c);
                }
                // Exit with the list locked: nothing new starts.
                std::process::exit(130);
            }
            std::process::exit(130);
        });
        Children {
            list,
            next: Default::default(),
        }
    }

    /// Start `cmd` and list it; returns its key and the pipes it was given.
    pub(crate) fn spawn(
        &self,
        name: &str,
        cmd: &mut Command,
    ) -> Result<(String, Option<ChildStdout>, Option<ChildStderr>)> {
        let mut l = self
            .list
            .lock()
            .map_err(|_| anyhow::anyhow!("the process list is unusable after a panic"))?;
        let mut child = cmd
            .env("RUST_BACKTRACE", "0")
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let key = format!(
            "{name}#{}",
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        l.push((key.clone(), child));
        Ok((key, out, err))
    }

    /// Stop every listed child.
    pub(crate) fn stop_all(&self) {
        if let Ok(mut l) = self.list.lock() {
            for (_, c) in l.iter_mut() {
                terminate(c);
            }
            l.clear();
        }
    }

    /// Wait for a listed child to end, and unlist it.
    pub(crate) fn wait(&self, key: &str) -> Result<ExitStatus> {
        loop {
            {
                let mut l = self
                    .list
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the process list is unusable after a panic"))?;
                let i = l
                    .iter()
                    .position(|(n, _)| n == key)
                    .with_context(|| format!("{key} is not running"))?;
                if let Some(status) = l[i].1.try_wait()? {
                    l.remove(i);
                    return Ok(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run a command to its end; its standard output, or an error with its error lines.
    pub(crate) fn run(&self, cmd: &mut Command, what: &str) -> Result<String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (key, out, err) = self.spawn(what, cmd)?;
        let (out, err) = (drain(out), drain(err));
        let status = self.wait(&key)?;
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            bail!(
                "{what} failed ({status}): {}",
                String::from_utf8_lossy(&stderr)
                    .lines()
                    .filter(|l| l.contains("Error") || l.contains("ERROR"))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }

    /// Start a process whose first stdout line starts with `prefix`: its key and the rest of
    /// that line.
    pub(crate) fn spawn_listening(
        &self,
        name: &str,
        cmd: &mut Command,
        prefix: &str,
        log: &Path,
    ) -> Result<(String, String)> {
        let log = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let (key, stdout, _) = self.spawn(name, cmd)?;
        let mut reader = BufReader::new(stdout.context("no stdout")?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Keep reading what it prints later, so that it never writes into a closed pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let rest = line
            .trim()
            .strip_prefix(prefix)
            .map(str::to_owned)
            .with_context(|| format!("unexpected first line {line:?}"))?;
        Ok((key, rest))
    }

    pub(crate) fn stop(&self, key: &str) {
        let child = self.list.lock().ok().and_then(|mut l| {
            let i = l.iter().position(|(n, _)| n == key)?;
            Some(l.remove(i).1)
        });
        if let Some(mut c) = child {
            terminate(&mut c);
        }
    }
}

/// Read a pipe to its end on a thread of its own.
pub(crate) fn drain(
    pipe: Option<impl std::io::Read + Send + 'static>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        bytes
    })
}

fn terminate(c: &mut Child) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    // SIGTERM lets the child stop cleanly; without a `kill` program, stop it outright.
    let sent = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        let _ = c.kill();
        let _ = c.wait();
        return;
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Children {
    fn drop(&mut self) {
        if let Ok(mut l) = self.list.lock() {
            for (_, c) in l.iter_mut() {
                terminate(c);
            }
        }
    }
}

fn step(n: usize, text: &str) {
    println!("\n[{n}/9] {text}");
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// Median foreground (Otsu) intensity of a volume.
fn median_foreground(v: &node::volume::Volume) -> f64 {
    let x: Vec<f32> = v.data.iter().copied().collect();
    let t = node::harmonise::stats::otsu(&x);
    let mut fg: Vec<f32> = x.into_iter().filter(|v| f64::from(*v) > t).collect();
    node::harmonise::stats::percentile(&mut fg, 50.0)
}

/// Relative spread of per-site means: (max − min) / mean.
fn spread(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    (hi - lo) / mean
}

/// Run the demo in `dir` (default: a new folder under the temporary directory).
pub fn run_demo(
    dir: Option<PathBuf>,
    patients: usize,
    annotate: Option<std::net::SocketAddr>,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let coordinator = super::train_demo::coordinator_binary(&exe)?;
    let root = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-consortium-{}", std::process::id()))
    });
    if root.exists() && std::fs::read_dir(&root)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder",
            root.display()
        );
    }
    std::fs::create_dir_all(&root)?;
    let started = Instant::now();
    let children = Children::new();
    println!("fedcurate consortium demo in {}", root.display());
    let p = |x: &Path| x.display().to_string();
    let node = |cfg: &Path| {
        let mut c = Command::new(&exe);
        c.arg("--config").arg(cfg);
        c
    };

    step(
        1,
        "consortium CA, coordinator and site certificates (site keys never leave the site)",
    );
    let pki = super::train_demo::make_pki(&children, &exe, &coordinator, &root)?;
    for s in SITES {
        println!("  {s}: key made at the site, request signed by the CA");
    }

    // The coordinator.
    let cdir = root.join("coordinator");
    std::fs::write(cdir.join("schema.toml"), SCHEMA)?;
    let ccfg = cdir.join("coordinator.toml");
    std::fs::write(
        &ccfg,
        super::train_demo::coordinator_toml(
            &cdir,
            &pki,
            &format!("schema = {:?}\n", p(&cdir.join("schema.toml"))),
        ),
    )?;
    let (coordinator_key, addr) = children.spawn_listening(
        "coordinator",
        Command::new(&coordinator)
            .args(["serve", "--config"])
            .arg(&ccfg),
        "listening on ",
        &cdir.join("coordinator.log"),
    )?;
    println!("  coordinator listening on {addr} (QUIC; TCP fallback on the same port)");

    step(
        2,
        "three hospitals' archives: different vendors, spacings, intensity scales",
    );
    let mut identifying = Vec::new();
    let mut configs = Vec::new();
    for (s, profile) in SITES.iter().zip(node::sample::consortium_sites(patients)) {
        let sdir = root.join(s);
        let archive = sdir.join("archive");
        let a = node::sample::write_site_archive(&archive, &profile)?;
        identifying.extend(a.identifying);
        let mut note = String::new();
        if *s == "site-c" {
            // A file cut short in transfer: it must be quarantined with its reason.
            let bytes = std::fs::read(&a.files[0])?;
            std::fs::write(archive.join("broken.dcm"), &bytes[..bytes.len() / 3])?;
            note = " + 1 truncated file".into();
        }
        println!(
            "  {s}: {} patients, {} ({} T, {:.2} mm pixels, {} mm slices, gain {}){note}",
            profile.patients,
            profile.manufacturer,
            profile.field_strength,
            profile.pixel_spacing,
            profile.slice_thickness,
            profile.scale
        );
        let cfg = sdir.join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[deid]\noptions = [\"retain-patient-characteristics\"]\n[scp]\nae_title = \"{}\"\nbind = \"127.0.0.1:0\"\nallowed = [{{ ae = \"DEMOPACS\", host = \"127.0.0.1\" }}]\n[federation]\nsite = \"{s}\"\ncoordinator = \"{addr}\"\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\npoll_seconds = 2\n",
                p(&sdir.join("data")),
                s.replace('-', "").to_uppercase(),
                p(&pki.join("ca.crt")),
                p(&pki.join(format!("sites/{s}.crt"))),
                p(&sdir.join("pki/site.key")),
            ),
        )?;
        configs.push((s, sdir, cfg, archive));
    }

    step(
        3,
        "ingest and de-identify: site-a over the DICOM network, the others from files",
    );
    for (s, sdir, cfg, archive) in &configs {
        if **s == "site-a" {
            let (serve_key, listen) = children.spawn_listening(
                "serve",
                node(cfg).arg("serve"),
                "listening as ",
                &sdir.join("serve.log"),
            )?;
            let (ae, at) = listen.split_once(" on ").context("listening line")?;
            let files = all_files(archive);
            let peer = node::dimse::scu::RemoteAe {
                ae_title: ae.to_owned(),
                address: at.to_owned(),
            };
            let sent = node::dimse::scu::store_files("DEMOPACS", &peer, &files)
                .map_err(|e| anyhow::anyhow!("C-STORE to {s}: {e}"))?;
            println!(
                "  {s}: C-STORE {} files from the PACS to {ae}@{at} ({} failed)",
                sent.sent, sent.failed
            );
            // Wait until the node has de-identified everything it received.
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                let done = node::catalog::Catalog::open(&sdir.join("data/catalog.sqlite"))
                    .and_then(|c| c.totals())
                    .map(|t| t.written + t.quarantined + t.duplicates)
                    .unwrap_or(0);
                if done >= sent.sent {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{s} did not de-identify what it received in time");
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            children.stop(&serve_key);
        } else {
            children.run(node(cfg).arg("deid").arg("--input").arg(archive), "deid")?;
        }
        let cat = node::catalog::Catalog::open(&sdir.join("data/catalog.sqlite"))?;
        let t = cat.totals()?;
        println!(
            "  {s}: {} instances de-identified, {} quarantined",
            t.written, t.quarantined
        );
        for q in cat.quarantine_entries(false)? {
            println!("        quarantined {}…: {}", &q.id[..12], q.reason);
        }
    }

    step(
        4,
        "clinicians annotate: two readers per case, a STAPLE consensus, agreement measured at each site",
    );
    for (n, (s, sdir, cfg, _)) in configs.iter().enumerate() {
        let agreement = annotate_site(&children, &node, sdir, cfg, n)?;
        println!("  {s}: {agreement}");
    }

    step(
        5,
        "the nodes dial out and fetch the schema; hospital IT approves what will leave; each site curates against it",
    );
    for (s, sdir, cfg, _) in &configs {
        let out = children.run(node(cfg).args(["federate", "--once"]), "federate")?;
        if **s == "site-a" {
            let pending = children.run(node(cfg).args(["egress", "pending"]), "egress pending")?;
            println!(
                "  {s} (before approval): {}",
                out.lines().next().unwrap_or("")
            );
            for l in pending.lines() {
                println!("    {l}");
            }
        }
        children.run(node(cfg).args(["egress", "approve"]), "egress approve")?;
        // Curation against the schema the site just fetched (its own report stays local).
        let curated = children.run(
            node(cfg)
                .arg("curate")
                .arg("--schema")
                .arg(sdir.join("data/federation/schema.toml"))
                .arg("--out")
                .arg(sdir.join("curation")),
            "curate",
        )?;
        let deviating = curated
            .lines()
            .find(|l| l.trim_start().starts_with("protocol-deviating"))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("0");
        println!(
            "  {s}: approved; {} ({deviating} series outside the protocol; report in {})",
            curated
                .lines()
                .next()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or(""),
            sdir.join("curation/report.html").display()
        );
    }

    step(
        6,
        "aggregates with small cells suppressed, then the federated Nyúl model, applied at each site",
    );
    let mut feds = Vec::new();
    for (s, sdir, cfg, _) in &configs {
        let log = std::fs::File::create(sdir.join("federate.log"))?;
        let (key, out, _) = children.spawn(
            "federate",
            node(cfg)
                .args(["federate", "--once", "--wait-model", "180"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log),
        )?;
        feds.push((s, key, drain(out)));
    }
    for (s, key, out) in feds {
        let status = children.wait(&key)?;
        let out = out.join().unwrap_or_default();
        if !status.success() {
            bail!("{s}: federate failed; see its federate.log");
        }
        for l in String::from_utf8_lossy(&out).lines() {
            println!("  {s}: {l}");
        }
    }

    step(7, "the consortium report");
    children.stop(&coordinator_key);
    let report_dir = cdir.join("state/report");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("report.json"))?)?;
    let deviations = report["deviations"].as_array().map_or(0, Vec::len);
    println!("  {}", report_dir.join("report.html").display());

    step(
        8,
        "federated training: the three sites train a digits classifier together through their nodes",
    );
    let training = if super::train_demo::python_ready() {
        let sites: Vec<(String, PathBuf, PathBuf)> = configs
            .iter()
            .map(|(s, sdir, cfg, _)| ((**s).to_owned(), sdir.clone(), cfg.clone()))
            .collect();
        let o = super::train_demo::run_training(
            &children,
            &exe,
            &coordinator,
            &ccfg,
            &sites,
            &root.join("training"),
            20,
            true,
            true,
        )?;
        Some(o)
    } else {
        println!(
            "  skipped: {} lacks numpy, safetensors or scikit-learn (scripts/demo.sh installs them into target/py-train)",
            super::train_demo::python().display()
        );
        None
    };

    step(9, "summary");
    let schema =
        protocol::schema::CurationSchema::parse(SCHEMA).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut instances = 0;
    let mut quarantined = 0;
    for (s, sdir, _, _) in &configs {
        let cat = node::catalog::Catalog::open(&sdir.join("data/catalog.sqlite"))?;
        let t = cat.totals()?;
        instances += t.written;
        quarantined += t.quarantined;
        let facts = node::site::aggregate::collect(&sdir.join("data/deid"), &schema)?;
        let v: Vec<f64> = facts
            .iter()
            .filter_map(|f| {
                f.values
                    .get(&protocol::aggregate::Quantity::Intensity)
                    .copied()
            })
            .collect();
        let h: Vec<f64> = all_files(&sdir.join("data/harmonised"))
            .iter()
            .filter_map(|f| node::volume::nifti::read(f).ok())
            .map(|(_, v)| median_foreground(&v))
            .collect();
        if v.is_empty() || h.is_empty() {
            bail!("{s} has no volumes to compare");
        }
        before.push(v.iter().sum::<f64>() / v.len() as f64);
        after.push(h.iter().sum::<f64>() / h.len() as f64);
    }
    // Nothing identifying outside the sites' private folders.
    let coordinator_files = all_files(&cdir);
    for f in &coordinator_files {
        let bytes = std::fs::read(f)?;
        for needle in &identifying {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                bail!("an identifying value reached {}", f.display());
            }
        }
    }
    println!(
        "  sites joined          {}",
        report["sites"]
            .as_array()
            .map_or(0, |s| s.iter().filter(|x| x["reported"] == true).count())
    );
    println!(
        "  instances             {instances} de-identified, {quarantined} quarantined (reasons above)"
    );
    println!("  findings              {deviations} deviations in the consortium report");
    println!(
        "  intensity spread      {:.2} across sites before harmonisation, {:.3} after (median foreground, per-site means {:?} -> {:?})",
        spread(&before),
        spread(&after),
        before.iter().map(|x| x.round()).collect::<Vec<_>>(),
        after
            .iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    // Agreement per site, as the consortium sees it: the mean over each site's patients of
    // its readers' Dice (released only over at least k patients).
    let dice = report["moments"]
        .as_array()
        .and_then(|m| m.iter().find(|x| x["quantity"] == "annotation-dice"));
    let per_site: Vec<String> = SITES
        .iter()
        .map(|s| {
            dice.and_then(|d| d["per_site"][*s]["mean"].as_f64())
                .map_or(format!("{s} withheld"), |m| format!("{s} {m:.3}"))
        })
        .collect();
    println!(
        "  reader agreement      mean Dice per site in the consortium report: {}",
        per_site.join(", ")
    );
    if let Some(o) = &training {
        super::train_demo::print_outcome(o);
    }
    println!(
        "  leak check            no identifying value in the coordinator's {} files",
        coordinator_files.len()
    );
    println!(
        "  finished in {:.0} s; report: {}",
        started.elapsed().as_secs_f64(),
        report_dir.join("report.html").display()
    );
    if let Some(listen) = annotate {
        // The services of the demo stop; site-a's annotator serves until Ctrl-C.
        children.stop_all();
        serve_annotator(&children, &exe, &root.join("site-a"), listen)?;
    }
    Ok(())
}

/// Leave site-a's web annotator running, with demo logins for its two readers and a reviewer
/// (fresh random passwords, printed once).
fn serve_annotator(
    children: &Children,
    exe: &Path,
    site: &Path,
    listen: std::net::SocketAddr,
) -> Result<()> {
    use ring::rand::SecureRandom;
    use std::io::Write;
    let cfg = site.join("node.toml");
    let rng = ring::rand::SystemRandom::new();
    let mut logins = Vec::new();
    for (user, role) in [
        ("reader-1", "annotator"),
        ("reader-2", "annotator"),
        ("reviewer", "reviewer"),
    ] {
        let mut bytes = [0u8; 12];
        rng.fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("the random generator failed"))?;
        let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new(exe)
            .arg("--config")
            .arg(&cfg)
            .args(["users", "add", user, "--role", role])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("adding the demo logins")?;
        child
            .stdin
            .take()
            .context("users add: no standard input")?
            .write_all(format!("{password}\n").as_bytes())?;
        if !child.wait()?.success() {
            bail!("adding the demo login {user} failed");
        }
        logins.push((user, role, password));
    }
    println!("\n[annotate] site-a's web annotator, until Ctrl-C");
    for (user, role, password) in &logins {
        println!("  {user:<10} {password}   ({role})");
    }
    let (key, _, _) = children.spawn(
        "annotator",
        Command::new(exe)
            .arg("--config")
            .arg(&cfg)
            .arg("annotator")
            .arg("--listen")
            .arg(listen.to_string()),
    )?;
    let status = children.wait(&key)?;
    if !status.success() && status.code().is_some() {
        bail!("the annotator stopped: {status}");
    }
    Ok(())
}
