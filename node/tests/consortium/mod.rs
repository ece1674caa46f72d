//! A consortium of processes for the training tests and benchmark: the coordinator on a fixed
//! loopback port (so a restarted one is found again), three nodes serving trainers, and the
//! trainers' side through `train wait` and `train push`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn node_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fedcurate-node"))
}

pub fn coordinator_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // Built (or found up to date) once per process: `cargo test -p node` alone does
            // not build the other package's binary, and an older one may lack what is tested.
            // The benchmark runs the release build.
            let release = node_bin().parent().is_some_and(|d| d.ends_with("release"));
            let mut args = vec![
                "build",
                "-p",
                "coordinator",
                "--bin",
                "fedcurate-coordinator",
            ];
            if release {
                args.push("--release");
            }
            let status = Command::new(env!("CARGO"))
                .args(args)
                .status()
                .expect("cargo");
            assert!(status.success(), "building fedcurate-coordinator");
            node_bin().with_file_name("fedcurate-coordinator")
        })
        .clone()
}

/// The interpreter with numpy, safetensors, scikit-learn and dp-accounting
/// (scripts/test.sh installs them into target/py-train and sets this variable).
pub fn python() -> String {
    std::env::var("FEDCURATE_TRAIN_PYTHON").expect(
        "FEDCURATE_TRAIN_PYTHON: an interpreter with scripts/reference/train-requirements.txt (scripts/test.sh makes target/py-train)",
    )
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_owned()
}

/// A consortium of processes for the resumption tests: the coordinator on a fixed loopback
/// port (so a restarted one is found again), three nodes serving trainers.
pub struct Consortium {
    pub root: PathBuf,
    pub job_id: String,
    pub coordinator: Option<Child>,
    pub serves: Vec<Option<Child>>,
    /// The coordinator's resident memory (KiB) just after it started, before any site came.
    pub idle_kib: u64,
}

pub const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
pub const PARAMS: usize = 3_000_000;

/// Chunks per site per round of the default job: 3,000,001 words of 8 bytes in 1 MiB chunks.
pub const CHUNKS: usize = 23;

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

pub fn run_ok(c: &mut Command) -> String {
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
pub fn model_file(values: impl Iterator<Item = f32>) -> Vec<u8> {
    let data: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
    let mut json = format!(
        "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[0,{}]}}}}",
        data.len() / 4,
        data.len()
    )
    .into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    out
}

impl Consortium {
    pub fn start(root: &Path) -> Self {
        Self::start_with(
            root,
            PARAMS,
            "id = \"resume\"\nrounds = 2\nmin_sites = 3\nmax_update_norm = 1000.0\nmax_samples = 1000\nchunk_mib = 1\nmetrics = [\"loss\"]\n",
            ["", "", ""],
        )
    }

    /// A consortium training `job` (TOML) on a model of `params` parameters; `site_extra` is
    /// added to each site's `[federation]`.
    pub fn start_with(root: &Path, params: usize, job: &str, site_extra: [&str; 3]) -> Self {
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
        // A site that asks for TCP reaches the coordinator's TCP fallback on the same port.
        let tcp = site_extra.iter().any(|e| e.contains("transport = \"tcp\""));
        let port = loop {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            if !tcp || std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
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
                "listen = \"127.0.0.1:{port}\"\ntcp_fallback = {tcp}\nstate_dir = {:?}\n{}[tls]\nca = {:?}\ncrl = {:?}\ncert = {:?}\nkey = {:?}\nissued = {:?}\n[training]\njob = {:?}\ninitial_model = {:?}\n",
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
            let transport = if extra.contains("transport") {
                ""
            } else {
                "transport = \"quic\"\n"
            };
            std::fs::write(
                sdir.join("node.toml"),
                format!(
                    "data_dir = {:?}\n[federation]\nsite = \"{s}\"\ncoordinator = \"127.0.0.1:{port}\"\n{transport}server_name = \"localhost\"\nca = {:?}\ncert = {:?}\nkey = {:?}\npoll_seconds = 1\n{extra}\n",
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
            job_id,
            coordinator: None,
            serves: vec![None, None, None],
            idle_kib: 0,
        };
        c.start_coordinator();
        c.idle_kib = c.coordinator_kib("VmRSS");
        for i in 0..3 {
            c.start_serve(i);
        }
        for (i, site) in SITES.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let out = run_ok(c.node(i).args(["egress", "pending"]));
                if out.contains(&format!("training job {}", c.job_id)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{site} never saw the job: {}\n{}",
                    std::fs::read_to_string(c.root.join(site).join("train.log"))
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

    /// A line of the coordinator's /proc status (`VmRSS`, `VmHWM`), in KiB.
    pub fn coordinator_kib(&self, field: &str) -> u64 {
        let Some(pid) = self.coordinator.as_ref().map(Child::id) else {
            return 0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.root.join(SITES[i]).join("data/training/trainer.sock")
    }

    pub fn node(&self, i: usize) -> Command {
        let mut c = Command::new(node_bin());
        c.arg("--config")
            .arg(self.root.join(SITES[i]).join("node.toml"));
        c
    }

    pub fn start_coordinator(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("coordinator.log"))
            .expect("log");
        let mut child = Command::new(coordinator_bin())
            .args(["serve", "--config"])
            .arg(self.root.join("coordinator.toml"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("coordinator");
        // Ready once it says where it listens (the job and its initial model are loaded).
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("the coordinator's first line");
        assert!(line.starts_with("listening on"), "{line}");
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        self.coordinator = Some(child);
    }

    pub fn start_serve(&mut self, i: usize) {
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
    pub fn train(&self, i: usize, round: u32) {
        let u = self.prepare(i, round);
        self.push(i, round, &u);
    }

    /// The trainer's update for `round` at site `i`, made from the round's global model.
    pub fn prepare(&self, i: usize, round: u32) -> PathBuf {
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
        u
    }

    /// Hand in the update at `u`.
    pub fn push(&self, i: usize, round: u32, u: &Path) {
        run_ok(
            self.node(i)
                .args(["train", "push", "--round"])
                .arg(round.to_string())
                .args([
                    "--samples",
                    &(10 * (i + 1)).to_string(),
                    "--metric",
                    "loss=0.5",
                ])
                .arg(u),
        );
    }

    pub fn status(&self, i: usize) -> serde_json::Value {
        let out = run_ok(self.node(i).args(["train", "status", "--json"]));
        serde_json::from_str(out.trim()).expect("status JSON")
    }

    /// (chunks sent, chunks skipped because the coordinator held them) by site `i`'s node.
    pub fn chunk_counts(&self, i: usize) -> (usize, usize) {
        let s = self.status(i);
        let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}")) as usize;
        (n("chunks_sent"), n("chunks_skipped"))
    }

    /// Chunk files the coordinator holds for `round` (per site).
    pub fn held(&self, round: u32) -> Vec<usize> {
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
    pub fn finish(&self) -> Vec<u8> {
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

pub fn kill(child: &mut Option<Child>) {
    if let Some(c) = child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    *child = None;
}

/// Watch the coordinator's chunk files until `pick` says the upload is half-way, then kill.
pub fn kill_mid_upload(
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
