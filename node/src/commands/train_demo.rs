//! Federated training driven as operators and ML engineers would: the coordinator publishes a
//! job (scikit-learn's digits, a small numpy MLP, split non-IID across the sites), each node
//! runs `train serve`, hospital IT approves the job, and each site's trainer (the Python
//! package in `python/`) trains through its own node. `fedcurate-node train-demo` runs it on
//! its own consortium; the consortium demo's last step runs it on the demo's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::consortium::{Children, SITES, drain};

/// What a training run measured.
#[derive(Debug, serde::Serialize)]
pub(crate) struct TrainingOutcome {
    pub rounds: u32,
    pub secure: bool,
    pub federated: f64,
    pub centralised: f64,
    pub local: Vec<f64>,
    pub seconds: f64,
    /// SHA-256 of the final global model (the same at every site).
    pub model_sha256: String,
    pub chunks_sent: u64,
}

/// The repository's `python/` folder (the client package and the example).
pub(crate) fn python_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("FEDCURATE_PYTHON_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().chain(std::env::current_dir()?.ancestors()) {
        let p = dir.join("python");
        if p.join("examples/digits_mlp.py").is_file() {
            return Ok(p);
        }
    }
    bail!(
        "the Python client and example (python/ in the repository) were not found; set FEDCURATE_PYTHON_DIR"
    )
}

/// The interpreter with numpy, safetensors and scikit-learn (`FEDCURATE_TRAIN_PYTHON`, else
/// `python3`).
pub(crate) fn python() -> PathBuf {
    std::env::var_os("FEDCURATE_TRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// `fedcurate-coordinator`: `FEDCURATE_COORDINATOR`, else next to this binary.
pub(crate) fn coordinator_binary(exe: &Path) -> Result<PathBuf> {
    let bin = exe.parent().context("no binary folder")?;
    let coordinator = std::env::var_os("FEDCURATE_COORDINATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin.join("fedcurate-coordinator"));
    if !coordinator.is_file() {
        bail!(
            "{} not found: build both binaries (`cargo build --release`) or set FEDCURATE_COORDINATOR",
            coordinator.display()
        );
    }
    Ok(coordinator)
}

/// Whether the training interpreter has what the example needs.
pub(crate) fn python_ready() -> bool {
    Command::new(python())
        .args(["-c", "import numpy, safetensors, sklearn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && python_dir().is_ok()
}

/// The consortium's PKI for `SITES`: a CA, the coordinator's certificate for `localhost`, and
/// each site's key (made at the site, `root/<site>/pki/site.key`) and signed certificate.
pub(crate) fn make_pki(
    children: &Children,
    exe: &Path,
    coordinator: &Path,
    root: &Path,
) -> Result<PathBuf> {
    let pki = root.join("coordinator/pki");
    let coord = |args: &[&str]| {
        let mut c = Command::new(coordinator);
        c.arg("pki").arg("--dir").arg(&pki).args(args);
        c
    };
    children.run(&mut coord(&["init", "--consortium", "demo"]), "pki init")?;
    children.run(
        &mut coord(&["issue-coordinator", "localhost"]),
        "pki issue-coordinator",
    )?;
    for s in SITES {
        let site_pki = root.join(s).join("pki");
        children.run(
            Command::new(exe)
                .args(["pki", "request", "--site", s, "--out"])
                .arg(&site_pki),
            "pki request",
        )?;
        children.run(
            &mut coord(&[
                "sign-request",
                s,
                &site_pki.join("site.csr").display().to_string(),
            ]),
            "pki sign-request",
        )?;
    }
    Ok(pki)
}

/// `coordinator.toml` for the demo's consortium.
pub(crate) fn coordinator_toml(cdir: &Path, pki: &Path, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n{extra}{}[tls]\nca = {:?}\ncrl = {:?}\ncert = {:?}\nkey = {:?}\nissued = {:?}\n",
        cdir.join("state").display().to_string(),
        SITES
            .iter()
            .map(|s| format!("[[sites]]\nid = \"{s}\"\n"))
            .collect::<String>(),
        pki.join("ca.crt").display().to_string(),
        pki.join("crl.pem").display().to_string(),
        pki.join("coordinators/localhost.crt").display().to_string(),
        pki.join("coordinators/localhost.key").display().to_string(),
        pki.join("issued.json").display().to_string(),
    )
}

/// Run the digits job on the sites in `sites` (site, its folder, its node.toml), with the
/// coordinator configured by `base` (its `[training]` is added here).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_training(
    children: &Children,
    exe: &Path,
    coordinator: &Path,
    base: &Path,
    sites: &[(String, PathBuf, PathBuf)],
    work: &Path,
    rounds: u32,
    secure: bool,
    verbose: bool,
) -> Result<TrainingOutcome> {
    std::fs::create_dir_all(work)?;
    let py = python();
    let pydir = python_dir()?;
    let script = pydir.join("examples/digits_mlp.py");
    let pyrun = |args: &[&str]| {
        let mut c = Command::new(&py);
        c.env("PYTHONPATH", &pydir).arg(&script).args(args);
        c
    };
    let init = work.join("init.safetensors");
    children
        .run(
            &mut pyrun(&["init", "--out", &init.display().to_string()]),
            "the initial model",
        )
        .with_context(|| {
            format!(
                "running {} (it needs numpy, safetensors and scikit-learn: pip install -r scripts/reference/train-requirements.txt, or set FEDCURATE_TRAIN_PYTHON)",
                py.display()
            )
        })?;
    let r = rounds.to_string();
    let mut job_args = vec!["job", "--rounds", &r];
    if secure {
        job_args.push("--secure");
    }
    let job = children.run(&mut pyrun(&job_args), "the job")?;
    let job_path = work.join("job.toml");
    std::fs::write(&job_path, job)?;
    let base_text = std::fs::read_to_string(base)?;
    let ccfg = work.join("coordinator-training.toml");
    std::fs::write(
        &ccfg,
        format!(
            "{base_text}\n[training]\njob = {:?}\ninitial_model = {:?}\n",
            job_path.display().to_string(),
            init.display().to_string()
        ),
    )?;
    let (coordinator_key, addr) = children.spawn_listening(
        "coordinator",
        Command::new(coordinator)
            .args(["serve", "--config"])
            .arg(&ccfg),
        "listening on ",
        &work.join("coordinator.log"),
    )?;
    let started = Instant::now();
    let mut serves = Vec::new();
    let mut sockets = Vec::new();
    for (s, sdir, cfg) in sites {
        // The node's configuration, pointed at the coordinator as it listens now.
        let text = std::fs::read_to_string(cfg)?;
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("coordinator = ") {
                    format!("coordinator = \"{addr}\"\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let tcfg = sdir.join("node-training.toml");
        std::fs::write(&tcfg, text)?;
        let (key, socket) = children.spawn_listening(
            "train serve",
            Command::new(exe)
                .arg("--config")
                .arg(&tcfg)
                .args(["train", "serve"]),
            "trainer API on ",
            &sdir.join("train.log"),
        )?;
        serves.push((s.clone(), key, tcfg));
        sockets.push(PathBuf::from(socket));
    }
    // Hospital IT at each site reads what would leave and approves the job.
    for (i, (s, _, tcfg)) in serves.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pending = loop {
            let out = children.run(
                Command::new(exe)
                    .arg("--config")
                    .arg(tcfg)
                    .args(["egress", "pending"]),
                "egress pending",
            )?;
            if out.contains("training job") {
                break out;
            }
            if Instant::now() > deadline {
                bail!("{s} did not fetch the training job in time; see its train.log");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if verbose && i == 0 {
            println!("  {s} (before approval):");
            for l in pending.lines() {
                println!("    {l}");
            }
        }
        children.run(
            Command::new(exe)
                .arg("--config")
                .arg(tcfg)
                .args(["egress", "approve"]),
            "egress approve",
        )?;
    }
    if verbose {
        println!("  approved at every site; each site's trainer now trains through its own node");
    }
    let mut trainers = Vec::new();
    for (i, ((s, sdir, _), socket)) in sites.iter().zip(&sockets).enumerate() {
        let out = work.join(format!("final-{s}.safetensors"));
        let log = std::fs::File::create(sdir.join("trainer.log"))?;
        // The last site's trainer is written for NVFlare's Client API (fedcurate.flare).
        let api = if i + 1 == sites.len() {
            "flare"
        } else {
            "fedcurate"
        };
        let (key, stdout, _) = children.spawn(
            "trainer",
            pyrun(&[
                "train",
                "--api",
                api,
                "--site-index",
                &i.to_string(),
                "--socket",
                &socket.display().to_string(),
                "--out",
                &out.display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
        )?;
        trainers.push((s.clone(), key, drain(stdout), out));
    }
    let mut finals = Vec::new();
    for (s, key, stdout, out) in trainers {
        let status = children.wait(&key)?;
        let _ = stdout.join();
        if !status.success() {
            bail!("{s}'s trainer failed; see its trainer.log");
        }
        finals.push(std::fs::read(&out)?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut chunks_sent = 0;
    for (_, _, tcfg) in &serves {
        let st = children.run(
            Command::new(exe)
                .arg("--config")
                .arg(tcfg)
                .args(["train", "status", "--json"]),
            "train status",
        )?;
        let v: serde_json::Value = serde_json::from_str(st.trim()).unwrap_or_default();
        chunks_sent += v["chunks_sent"].as_u64().unwrap_or(0);
    }
    for (_, key, _) in &serves {
        children.stop(key);
    }
    children.stop(&coordinator_key);
    if finals.windows(2).any(|w| w[0] != w[1]) {
        bail!("the sites ended with different global models");
    }
    let final_path = work.join("final.safetensors");
    std::fs::write(&final_path, &finals[0])?;
    let eval = children.run(
        &mut pyrun(&[
            "evaluate",
            "--model",
            &final_path.display().to_string(),
            "--rounds",
            &r,
        ]),
        "evaluation",
    )?;
    let v: serde_json::Value =
        serde_json::from_str(eval.trim()).context("the evaluation's JSON")?;
    Ok(TrainingOutcome {
        rounds,
        secure,
        federated: v["federated"].as_f64().unwrap_or(0.0),
        centralised: v["centralised"].as_f64().unwrap_or(0.0),
        local: v["local"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default(),
        seconds,
        model_sha256: node::batch::content_hash(&finals[0]),
        chunks_sent,
    })
}

/// `fedcurate-node train-demo`: three sites and a coordinator train the digits job.
pub(crate) fn train_demo(
    dir: Option<PathBuf>,
    rounds: u32,
    secure: bool,
    json: bool,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let coordinator = coordinator_binary(&exe)?;
    let root = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-training-{}", std::process::id()))
    });
    std::fs::create_dir_all(&root)?;
    let children = Children::new();
    let pki = make_pki(&children, &exe, &coordinator, &root)?;
    let cdir = root.join("coordinator");
    let base = cdir.join("coordinator.toml");
    std::fs::write(&base, coordinator_toml(&cdir, &pki, ""))?;
    let mut sites = Vec::new();
    for s in SITES {
        let sdir = root.join(s);
        let cfg = sdir.join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[federation]\nsite = \"{s}\"\ncoordinator = \"127.0.0.1:9\"\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\npoll_seconds = 1\n",
                sdir.join("data").display().to_string(),
                pki.join("ca.crt").display().to_string(),
                pki.join(format!("sites/{s}.crt")).display().to_string(),
                sdir.join("pki/site.key").display().to_string(),
            ),
        )?;
        sites.push((s.to_owned(), sdir, cfg));
    }
    let out = run_training(
        &children,
        &exe,
        &coordinator,
        &base,
        &sites,
        &root.join("training"),
        rounds,
        secure,
        !json,
    )?;
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print_outcome(&out);
    }
    Ok(())
}

pub(crate) fn print_outcome(o: &TrainingOutcome) {
    let best = o.local.iter().copied().fold(0.0, f64::max);
    println!(
        "  federated training    {} rounds{} in {:.1} s: test accuracy {:.3} federated, {:.3} centralised, {} each site alone (best {:.3})",
        o.rounds,
        if o.secure {
            " (secure aggregation)"
        } else {
            ""
        },
        o.seconds,
        o.federated,
        o.centralised,
        o.local
            .iter()
            .map(|a| format!("{a:.3}"))
            .collect::<Vec<_>>()
            .join(" / "),
        best
    );
}
