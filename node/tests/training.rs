//! Federated training through real processes: the coordinator, three `train serve` nodes on
//! loopback QUIC with the consortium's certificates, and trainers (the Python package on
//! scikit-learn's digits, or `train wait` / `train push` from a shell).

#[allow(dead_code)]
mod consortium;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use consortium::*;

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
            &dir.path()
                .join("secure")
                .join(s)
                .join("data/catalog.sqlite"),
        )
        .expect("catalog");
        let log = cat.egress().expect("egress log");
        let count = |k: &str| log.iter().filter(|e| e.kind == k).count();
        assert_eq!(count("update-offer"), 100, "{s}");
        assert_eq!(count("put-chunk"), 100, "{s}");
        assert_eq!(count("train-keys"), 1, "{s}");
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
        // site-c's update is made before it is handed in, so its upload starts at once and is
        // watched from its first chunk.
        c.train(0, 1);
        c.train(1, 1);
        let u = c.prepare(2, 1);
        c.push(2, 1, &u);
        let mut victim = c.coordinator.take();
        let held = kill_mid_upload(
            &c,
            |h| h.iter().any(|n| (2..CHUNKS - 4).contains(n)),
            &mut victim,
        );
        c.start_coordinator();
        for i in 0..3 {
            c.train(i, 2);
        }
        let m = c.finish();
        assert!(
            m == reference,
            "the model differs from the uninterrupted run's"
        );
        let (sent, skipped) = (0..3)
            .map(|i| c.chunk_counts(i))
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
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
        assert!(
            sent <= 6 * CHUNKS - skipped + 3 * 4,
            "{sent} sent, {skipped} skipped"
        );
    }

    // A node is killed while it uploads round 1, and started again.
    {
        let mut c = Consortium::start(&dir.path().join("node-killed"));
        c.train(0, 1);
        c.train(2, 1);
        let u = c.prepare(1, 1);
        c.push(1, 1, &u);
        let mut victim = c.serves[1].take();
        let held = kill_mid_upload(&c, |h| (2..CHUNKS - 4).contains(&h[1]), &mut victim);
        c.start_serve(1);
        for i in 0..3 {
            c.train(i, 2);
        }
        let m = c.finish();
        assert!(
            m == reference,
            "the model differs from the uninterrupted run's"
        );
        let (sent, skipped) = c.chunk_counts(1);
        eprintln!(
            "site-b killed with {} of its {CHUNKS} chunks at the coordinator; after the restart it skipped {skipped} and sent {sent}",
            held[1]
        );
        assert!(
            skipped >= held[1] && skipped < CHUNKS,
            "{sent} sent, {skipped} skipped"
        );
        assert_eq!(
            sent + skipped,
            2 * CHUNKS,
            "each chunk sent once after the restart"
        );
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
    // Updates that do not fit the job are refused with the reason, and nothing is kept.
    let g = c.prepare(0, 1);
    let good = std::fs::read(&g).expect("update");
    let start = 8 + u64::from_le_bytes(good[..8].try_into().expect("8")) as usize;
    let mut nan = good.clone();
    nan[start + 40..start + 44].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut meta = b"{\"__metadata__\":{\"who\":\"x\"},\"w\":{\"dtype\":\"F32\",\"shape\":[1000],\"data_offsets\":[0,4000]}}".to_vec();
    while !meta.len().is_multiple_of(8) {
        meta.push(b' ');
    }
    let mut with_meta = (meta.len() as u64).to_le_bytes().to_vec();
    with_meta.extend(meta);
    with_meta.extend_from_slice(&good[start..]);
    for (bytes, why) in [
        (nan, "not finite (NaN or infinity) in tensor \"w\""),
        (with_meta, "__metadata__"),
        (
            model_file((0..999).map(|_| 0.0)),
            "differ from the job's layout",
        ),
    ] {
        let f = dir.path().join("bad.safetensors");
        std::fs::write(&f, bytes).expect("write");
        let out = c
            .node(0)
            .args(["train", "push", "--round", "1", "--samples", "10"])
            .arg(&f)
            .output()
            .expect("push");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{why}: {err}");
    }
    assert_eq!(c.status(0)["submitted"], 0, "nothing was accepted");
    c.push(0, 1, &g);
    for i in 1..3 {
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
        assert!(
            Instant::now() < deadline,
            "site-a's round 2 never reached its ledger"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A site behind a firewall that blocks UDP trains over the coordinator's TCP fallback, in
/// the same rounds as the others, with the same result as an all-QUIC run.
#[test]
fn a_site_on_the_tcp_fallback_trains_in_the_same_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = "id = \"tcp\"\nrounds = 2\nmin_sites = 3\nsecure_aggregation = true\nmax_update_norm = 1000.0\nmax_samples = 1000\nchunk_mib = 1\nmetrics = [\"loss\"]\n";
    let run = |name: &str, extra: [&str; 3]| {
        let c = Consortium::start_with(&dir.path().join(name), 400_000, job, extra);
        for round in 1..=2 {
            for i in 0..3 {
                c.train(i, round);
            }
        }
        let m = c.finish();
        (m, c.status(1))
    };
    let (quic, _) = run("quic", ["", "", ""]);
    let (tcp, status) = run("tcp", ["", "transport = \"tcp\"", ""]);
    assert!(quic == tcp, "the model differs over the TCP fallback");
    // 400,001 words in 1 MiB chunks: 4 a round.
    assert_eq!(status["chunks_sent"], 8, "{status}");
    let cat = node::catalog::Catalog::open(&dir.path().join("tcp/site-b/data/catalog.sqlite"))
        .expect("catalog");
    let hellos: Vec<String> = cat
        .egress()
        .expect("egress")
        .into_iter()
        .filter(|e| e.kind == "hello")
        .map(|e| e.answer)
        .collect();
    assert!(
        !hellos.is_empty() && hellos.iter().all(|a| a == "welcome (tcp)"),
        "{hellos:?}"
    );
}
