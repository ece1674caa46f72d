//! Federated training through real processes: the coordinator, three `train serve` nodes on
//! loopback QUIC with the consortium's certificates, and trainers (the Python package on
//! scikit-learn's digits, or `train wait` / `train push` from a shell).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn node_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fedcurate-node"))
}

fn coordinator_bin() -> PathBuf {
    let c = node_bin().with_file_name("fedcurate-coordinator");
    if !c.is_file() {
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
    c
}

/// The interpreter with numpy, safetensors, scikit-learn and dp-accounting
/// (scripts/test.sh installs them into target/py-train and sets this variable).
fn python() -> String {
    std::env::var("FEDCURATE_TRAIN_PYTHON").expect(
        "FEDCURATE_TRAIN_PYTHON: an interpreter with scripts/reference/train-requirements.txt (scripts/test.sh makes target/py-train)",
    )
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_owned()
}

fn train_demo(dir: &Path, secure: bool) -> serde_json::Value {
    let mut c = Command::new(node_bin());
    c.env("FEDCURATE_COORDINATOR", coordinator_bin())
        .env("FEDCURATE_TRAIN_PYTHON", python())
        .env("FEDCURATE_PYTHON_DIR", repo().join("python"))
        .args(["train-demo", "--rounds", "100", "--json", "--dir"])
        .arg(dir);
    if secure {
        c.arg("--secure");
    }
    let out = c.output().expect("train-demo");
    assert!(
        out.status.success(),
        "train-demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).expect("the outcome's JSON")
}

/// The demonstration: scikit-learn's digits split non-IID (Dirichlet label skew)
/// across three sites, a small numpy MLP, 100 rounds of one local epoch, through real nodes
/// and coordinator. Federated ends within 0.02 of centralised and at least 0.05 above the best
/// site alone; the same rounds under secure aggregation give the same global model, bit for
/// bit.
#[test]
fn digits_federated_is_close_to_centralised_and_secure_rounds_give_the_same_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = train_demo(&dir.path().join("plain"), false);
    let secure = train_demo(&dir.path().join("secure"), true);
    let f = plain["federated"].as_f64().expect("federated");
    let c = plain["centralised"].as_f64().expect("centralised");
    let best = plain["local"]
        .as_array()
        .expect("local")
        .iter()
        .filter_map(|x| x.as_f64())
        .fold(0.0, f64::max);
    assert!(c - f <= 0.02, "centralised {c} vs federated {f}");
    assert!(f - best >= 0.05, "federated {f} vs best single site {best}");
    assert_eq!(
        plain["model_sha256"], secure["model_sha256"],
        "plain and secure rounds over the same updates give the same global model"
    );
    assert_eq!(secure["federated"], plain["federated"]);
    // One chunk per site per round: nothing was sent twice.
    assert_eq!(plain["chunks_sent"], 300);
    assert_eq!(secure["chunks_sent"], 300);
    // Every frame that left is in each node's egress log: an offer (the chunk hashes) and its
    // chunk, once per round.
    for s in SITES {
        let cat = node::catalog::Catalog::open(
            &dir.path().join("secure").join(s).join("data/catalog.sqlite"),
        )
        .expect("catalog");
        let log = cat.egress().expect("egress log");
        let count = |k: &str| log.iter().filter(|e| e.kind == k).count();
        assert_eq!(count("update-offer"), 100, "{s}");
        assert_eq!(count("put-chunk"), 100, "{s}");
        assert_eq!(count("train-keys"), 1, "{s}");
    }
}

/// A consortium of processes for the resumption tests: the coordinator on a fixed loopback
/// port (so a restarted one is found again), three nodes serving trainers.
struct Consortium {
    root: PathBuf,
    port: u16,
    job_id: String,
    coordinator: Option<Child>,
    serves: Vec<Option<Child>>,
}

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const PARAMS: usize = 3_000_000;

impl Drop for Consortium {
    fn drop(&mut self) {
        for c in self
            .serves
            .iter_mut()
            .chain(std::iter::once(&mut self.coordinator))
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().expect("command");
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A safetensors file of one F32 tensor `w`.
fn model_file(values: impl Iterator<Item = f32>) -> Vec<u8> {
    let data: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
    let mut json = format!(
        "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[0,{}]}}}}",
        data.len() / 4,
        data.len()
    )
    .into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    out
}

impl Consortium {
    fn start(root: &Path) -> Self {
        Self::start_with(
            root,
            PARAMS,
            "id = \"resume\"\nrounds = 2\nmin_sites = 3\nmax_update_norm = 1000.0\nmax_samples = 1000\nchunk_mib = 1\nmetrics = [\"loss\"]\n",
            ["", "", ""],
        )
    }

    /// A consortium training `job` (TOML) on a model of `params` parameters; `site_extra` is
    /// added to each site's `[federation]`.
    fn start_with(root: &Path, params: usize, job: &str, site_extra: [&str; 3]) -> Self {
        let job_id = job
            .lines()
            .find_map(|l| l.strip_prefix("id = "))
            .expect("the job's id")
            .trim_matches('"')
            .to_owned();
        let coordinator = coordinator_bin();
        let pki = root.join("pki");
        let coord = |args: &[&str]| {
            let mut c = Command::new(&coordinator);
            c.arg("pki").arg("--dir").arg(&pki).args(args);
            c
        };
        run_ok(&mut coord(&["init", "--consortium", "test"]));
        run_ok(&mut coord(&["issue-coordinator", "localhost"]));
        for s in SITES {
            let out = root.join(s).join("pki");
            run_ok(
                Command::new(node_bin())
                    .args(["pki", "request", "--site", s, "--out"])
                    .arg(&out),
            );
            run_ok(&mut coord(&[
                "sign-request",
                s,
                &out.join("site.csr").display().to_string(),
            ]));
        }
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let init = root.join("init.safetensors");
        std::fs::write(
            &init,
            model_file((0..params).map(|i| ((i % 101) as f32 - 50.0) * 1e-3)),
        )
        .expect("init");
        std::fs::write(root.join("job.toml"), job).expect("job");
        let p = |x: &Path| x.display().to_string();
        std::fs::write(
            root.join("coordinator.toml"),
            format!(
                "listen = \"127.0.0.1:{port}\"\ntcp_fallback = false\nstate_dir = {:?}\n{}[tls]\nca = {:?}\ncrl = {:?}\ncert = {:?}\nkey = {:?}\nissued = {:?}\n[training]\njob = {:?}\ninitial_model = {:?}\n",
                p(&root.join("state")),
                SITES
                    .iter()
                    .map(|s| format!("[[sites]]\nid = \"{s}\"\n"))
                    .collect::<String>(),
                p(&pki.join("ca.crt")),
                p(&pki.join("crl.pem")),
                p(&pki.join("coordinators/localhost.crt")),
                p(&pki.join("coordinators/localhost.key")),
                p(&pki.join("issued.json")),
                p(&root.join("job.toml")),
                p(&init),
            ),
        )
        .expect("coordinator.toml");
        for (s, extra) in SITES.iter().zip(site_extra) {
            let sdir = root.join(s);
            std::fs::write(
                sdir.join("node.toml"),
                format!(
                    "data_dir = {:?}\n[federation]\nsite = \"{s}\"\ncoordinator = \"127.0.0.1:{port}\"\ntransport = \"quic\"\nserver_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\npoll_seconds = 1\n{extra}\n",
                    p(&sdir.join("data")),
                    p(&pki.join("ca.crt")),
                    p(&pki.join(format!("sites/{s}.crt"))),
                    p(&sdir.join("pki/site.key")),
                ),
            )
            .expect("node.toml");
        }
        let mut c = Consortium {
            root: root.to_owned(),
            port,
            job_id,
            coordinator: None,
            serves: vec![None, None, None],
        };
        c.start_coordinator();
        for i in 0..3 {
            c.start_serve(i);
        }
        for i in 0..3 {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let out = run_ok(c.node(i).args(["egress", "pending"]));
                if out.contains(&format!("training job {}", c.job_id)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never saw the job: {}\n{}",
                    SITES[i],
                    std::fs::read_to_string(c.root.join(SITES[i]).join("train.log"))
                        .unwrap_or_default(),
                    std::fs::read_to_string(c.root.join("coordinator.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let out = run_ok(c.node(i).args(["egress", "approve"]));
            assert!(out.contains("approved training job"), "{out}");
        }
        c
    }

    fn node(&self, i: usize) -> Command {
        let mut c = Command::new(node_bin());
        c.arg("--config")
            .arg(self.root.join(SITES[i]).join("node.toml"));
        c
    }

    fn start_coordinator(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("coordinator.log"))
            .expect("log");
        let child = Command::new(coordinator_bin())
            .args(["serve", "--config"])
            .arg(self.root.join("coordinator.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("coordinator");
        self.coordinator = Some(child);
        let _ = self.port;
    }

    fn start_serve(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(SITES[i]).join("train.log"))
            .expect("log");
        let socket = self.root.join(SITES[i]).join("data/training/trainer.sock");
        let _ = std::fs::remove_file(&socket);
        let child = self
            .node(i)
            .args(["train", "serve"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("train serve");
        self.serves[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no trainer socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a trainer does for `round` at site `i`: wait for the global model, add its change,
    /// hand it in.
    fn train(&self, i: usize, round: u32) {
        let g = self.root.join(format!("global-{i}.safetensors"));
        let out = run_ok(
            self.node(i)
                .args(["train", "wait", "--timeout", "120", "--after"])
                .arg((round - 1).to_string())
                .arg("--out")
                .arg(&g),
        );
        assert!(out.contains(&format!("\"round\":{round}")), "{out}");
        let mut bytes = std::fs::read(&g).expect("global");
        let start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        for (j, w) in bytes[start..].chunks_exact_mut(4).enumerate() {
            let v = f32::from_le_bytes([w[0], w[1], w[2], w[3]])
                + ((j * (i + 1) + round as usize) % 13) as f32 * 1e-4;
            w.copy_from_slice(&v.to_le_bytes());
        }
        let u = self.root.join(format!("update-{i}.safetensors"));
        std::fs::write(&u, bytes).expect("update");
        run_ok(
            self.node(i)
                .args(["train", "push", "--round"])
                .arg(round.to_string())
                .args(["--samples", &(10 * (i + 1)).to_string(), "--metric", "loss=0.5"])
                .arg(&u),
        );
    }

    fn status(&self, i: usize) -> serde_json::Value {
        let out = run_ok(self.node(i).args(["train", "status", "--json"]));
        serde_json::from_str(out.trim()).expect("status JSON")
    }

    /// Chunk files the coordinator holds for `round` (per site).
    fn held(&self, round: u32) -> Vec<usize> {
        let mut out = vec![0; 3];
        let Ok(jobs) = std::fs::read_dir(self.root.join("state/training")) else {
            return out;
        };
        for j in jobs.flatten() {
            for (i, s) in SITES.iter().enumerate() {
                let d = j.path().join(format!("round-{round}-0")).join(s);
                out[i] += std::fs::read_dir(d)
                    .map(|r| {
                        r.flatten()
                            .filter(|e| e.path().extension().is_some_and(|x| x == "chunk"))
                            .count()
                    })
                    .unwrap_or(0);
            }
        }
        out
    }

    /// The final model, from each site (they must agree).
    fn finish(&self) -> Vec<u8> {
        let mut finals = Vec::new();
        for i in 0..3 {
            let f = self.root.join(format!("final-{i}.safetensors"));
            let out = run_ok(
                self.node(i)
                    .args(["train", "wait", "--timeout", "120", "--after", "2", "--out"])
                    .arg(&f),
            );
            assert!(out.contains("\"finished\":true"), "{out}");
            finals.push(std::fs::read(&f).expect("final"));
        }
        assert!(finals.windows(2).all(|w| w[0] == w[1]), "sites disagree");
        finals.swap_remove(0)
    }
}

/// Chunks per site per round: 3,000,001 words of 8 bytes in 1 MiB chunks.
const CHUNKS: usize = 23;

fn kill(child: &mut Option<Child>) {
    if let Some(c) = child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    *child = None;
}

/// Watch the coordinator's chunk files until `pick` says the upload is half-way, then kill.
fn kill_mid_upload(
    c: &Consortium,
    pick: impl Fn(&[usize]) -> bool,
    victim: &mut Option<Child>,
) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = c.held(1);
        if pick(&h) {
            kill(victim);
            return c.held(1);
        }
        assert!(
            h.iter().sum::<usize>() < 3 * CHUNKS,
            "the round completed before the test could interrupt it ({h:?})"
        );
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Kill the coordinator, and separately a node, in the middle of an upload: the round
/// completes, only the missing chunks are sent again, and the global model is the one an
/// uninterrupted run gives.
#[test]
fn uploads_interrupted_by_a_killed_coordinator_or_node_resume_and_give_the_same_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The uninterrupted run.
    let reference = {
        let c = Consortium::start(&dir.path().join("reference"));
        for round in 1..=2 {
            for i in 0..3 {
                c.train(i, round);
            }
        }
        let m = c.finish();
        for i in 0..3 {
            let s = c.status(i);
            assert_eq!(s["chunks_sent"], 2 * CHUNKS, "{s}");
            assert_eq!(s["chunks_skipped"], 0, "{s}");
        }
        m
    };

    // The coordinator is killed while the sites upload round 1, and started again.
    {
        let mut c = Consortium::start(&dir.path().join("coordinator-killed"));
        for i in 0..3 {
            c.train(i, 1);
        }
        let mut victim = c.coordinator.take();
        let held = kill_mid_upload(&c, |h| h.iter().any(|n| (2..CHUNKS - 4).contains(n)), &mut victim);
        c.start_coordinator();
        for i in 0..3 {
            c.train(i, 2);
        }
        let m = c.finish();
        assert!(m == reference, "the model differs from the uninterrupted run's");
        let (mut sent, mut skipped) = (0, 0);
        for i in 0..3 {
            let s = c.status(i);
            sent += s["chunks_sent"].as_u64().expect("sent") as usize;
            skipped += s["chunks_skipped"].as_u64().expect("skipped") as usize;
        }
        eprintln!(
            "coordinator killed holding {held:?} of {CHUNKS} chunks per site; afterwards {skipped} were not sent again, {sent} sent in all"
        );
        // What an incomplete site's upload had at the coordinator was not sent again.
        let resumable: usize = held.iter().filter(|n| **n < CHUNKS).sum();
        assert!(skipped >= resumable, "{skipped} skipped, {resumable} held");
        // Sites whose upload was incomplete resumed: what the coordinator held was skipped,
        // and at most the chunks in flight at the kill (4 per site) were sent twice.
        assert!(skipped >= 1, "nothing was resumed");
        assert!(sent + skipped >= 6 * CHUNKS);
        assert!(sent <= 6 * CHUNKS - skipped + 3 * 4, "{sent} sent, {skipped} skipped");
    }

    // A node is killed while it uploads round 1, and started again.
    {
        let mut c = Consortium::start(&dir.path().join("node-killed"));
        for i in 0..3 {
            c.train(i, 1);
        }
        let mut victim = c.serves[1].take();
        let held = kill_mid_upload(&c, |h| (2..CHUNKS - 4).contains(&h[1]), &mut victim);
        c.start_serve(1);
        for i in 0..3 {
            c.train(i, 2);
        }
        let m = c.finish();
        assert!(m == reference, "the model differs from the uninterrupted run's");
        let s = c.status(1);
        let (sent, skipped) = (
            s["chunks_sent"].as_u64().expect("sent") as usize,
            s["chunks_skipped"].as_u64().expect("skipped") as usize,
        );
        eprintln!(
            "site-b killed with {} of its {CHUNKS} chunks at the coordinator; after the restart it skipped {skipped} and sent {sent}",
            held[1]
        );
        assert!(skipped >= held[1] && skipped < CHUNKS, "{s}");
        assert_eq!(sent + skipped, 2 * CHUNKS, "each chunk sent once after the restart");
    }
}

/// Differential privacy through the nodes: each round's ε is in the site's privacy ledger
/// before its update leaves (the RDP accountant's increments, summing to the job's ε), and a
/// site whose budget cannot pay for a round sends nothing and says why.
#[test]
fn private_rounds_spend_the_ledger_and_stop_at_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (z, delta) = (2.0, 1e-5);
    let (e1, _) = fc_training::accountant::epsilon(z, 1, delta);
    let (e2, _) = fc_training::accountant::epsilon(z, 2, delta);
    let job = format!(
        "id = \"dp\"\nrounds = 2\nmin_sites = 3\nsecure_aggregation = true\nmax_update_norm = 10.0\nmax_samples = 1000\nmetrics = [\"loss\"]\n[privacy]\nclip_norm = 0.01\nnoise_multiplier = {z}\ndelta = {delta}\n"
    );
    let tight = format!("privacy_budget_epsilon = {}", e1 + (e2 - e1) / 2.0);
    let c = Consortium::start_with(&dir.path().join("dp"), 1000, &job, ["", "", &tight]);
    for i in 0..3 {
        c.train(i, 1);
    }
    for i in 0..3 {
        c.train(i, 2);
    }
    // site-c's round 2 would pass its budget: nothing leaves, and the node says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = c.status(2);
        if s["phase"] == "refused: privacy budget" {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("privacy budget cannot pay for round 2")),
        "{s}"
    );
    assert_eq!(s["uploaded"], 1, "{s}");
    let ledger = |site: &str| {
        node::catalog::Catalog::open(&dir.path().join("dp").join(site).join("data/catalog.sqlite"))
            .expect("catalog")
            .releases()
            .expect("ledger")
    };
    let c_ledger = ledger("site-c");
    let outcomes: Vec<(u32, &str)> = c_ledger
        .iter()
        .map(|r| (r.round, r.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, [(1, "released"), (2, "refused-budget")]);
    assert!((c_ledger[0].epsilon - e1).abs() < 1e-12);
    assert_eq!(c_ledger[0].delta, delta);
    assert_eq!(c_ledger[0].dataset, "training:dp");
    // site-a paid for both rounds: the increments sum to the accountant's ε after two rounds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = ledger("site-a");
        if a.len() == 2 {
            let spent: f64 = a.iter().map(|r| r.epsilon).sum();
            assert!((spent - e2).abs() < 1e-12, "{spent} vs {e2}");
            assert!(a.iter().all(|r| r.outcome == "released"));
            assert_eq!(a[1].delta, 0.0, "δ is paid once for the job's composition");
            break;
        }
        assert!(Instant::now() < deadline, "site-a's round 2 never reached its ledger");
        std::thread::sleep(Duration::from_millis(100));
    }
}
