//! The federation end to end, in one process, with a throw-away CA: a coordinator and three
//! site nodes on loopback. The sites de-identify their own generated archives (different
//! vendors, spacings and intensity scales, canaries in every identifying attribute), fetch
//! and acknowledge the schema, report aggregates, and apply the federated Nyúl model.
//!
//! The third site's network drops UDP: it reaches the coordinator over the TCP fallback.
//!
//! Checked: pooled statistics equal those computed on all sites' data at once (no cell is
//! small enough to be suppressed under the first schema); the federated model equals the
//! model fitted on the pooled volumes; under a stricter schema no released cell is below k;
//! no canary and no pseudonym reaches any byte the coordinator received or stored.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use coordinator::Hub;
use coordinator::net::{Service, server_config, site_fingerprints};
use coordinator::pki::Pki;
use coordinator::store::Store;
use node::batch::{self, BatchPaths, RunSettings};
use node::config::NodeConfig;
use node::deid::Deidentifier;
use node::deid::keys::Keys;
use node::federation::aggregate;
use node::federation::session::Site;
use protocol::aggregate::{Cell, add_cells};
use protocol::schema::CurationSchema;
use protocol::summary::NyulSummary;
use protocol::{FederatedFit, SchemaDocument, SiteId};

const PATIENTS: usize = 10;

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(crate) fn schema_text(k: u32, revision: u32) -> String {
    format!(
        r#"schema_version = 1
id = "brain-t1-test"
revision = {revision}

[data_of_interest]
modalities = ["MR"]
body_parts = ["BRAIN"]

[[data_of_interest.constraints]]
attribute = "field-strength"
modality = "MR"
allowed = ["1.5", "3"]

[deidentification]
options = ["retain-patient-characteristics"]

[vocabularies]
modality = ["CT", "MR"]
manufacturer = ["GE MEDICAL SYSTEMS", "SIEMENS", "Philips"]
age_bands = [0, 18, 40, 65, 90]
sex = ["F", "M"]

[statistics]
counts_by = ["modality", "sex", "age_bands", "manufacturer"]
quality_metrics = ["snr", "cnr", "slice-thickness", "pixel-spacing"]

[[statistics.histograms]]
quantity = "intensity"
modality = "MR"
edges = [0.0, 200.0, 550.0, 1300.0, 3000.0, 6000.0]

[harmonisation]
method = "nyul"
contrast = "t1"

[privacy]
min_cell_count = {k}
"#
    )
}

pub(crate) fn node_config(
    data_dir: &Path,
    site: &str,
    pki: &Path,
    coordinator: &str,
) -> NodeConfig {
    let text = format!(
        r#"data_dir = {data:?}
[deid]
options = ["retain-patient-characteristics"]
[federation]
site = "{site}"
coordinator = "{coordinator}"
server_name = "localhost"
ca = {ca:?}
cert = {cert:?}
key = {key:?}
egress_approval = false
"#,
        data = data_dir.display().to_string(),
        ca = pki.join("ca.crt").display().to_string(),
        cert = pki.join(format!("sites/{site}.crt")).display().to_string(),
        key = pki.join(format!("sites/{site}.key")).display().to_string(),
    );
    NodeConfig::parse(&text, Path::new("node.toml")).expect("node config")
}

/// A two-worker runtime for a test's network side.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A throw-away consortium CA in `dir`, the coordinator's certificate (for `localhost`) and
/// one for each site, all valid for 30 days.
pub(crate) fn test_pki(dir: &Path, sites: &[&str]) -> (Pki, coordinator::pki::IssuedFiles) {
    let pki = Pki::at(dir);
    pki.init("test").expect("init");
    let coord = pki.issue_coordinator("localhost", 30).expect("coordinator");
    for s in sites {
        pki.issue_site(s, 30).expect("site");
    }
    (pki, coord)
}

/// The coordinator's QUIC service on a free loopback port, over the CA's current register.
pub(crate) fn start_service(
    pki: &Pki,
    coord: &coordinator::pki::IssuedFiles,
    hub: Arc<Mutex<Hub>>,
) -> Service {
    let read = |p: &Path| std::fs::read(p).expect("read");
    Service::start(
        server_config(
            &read(&pki.ca_cert_path()),
            &read(&pki.crl_path()),
            &read(&coord.certificate),
            &read(coord.key.as_ref().expect("key")),
        )
        .expect("server"),
        "127.0.0.1:0".parse().expect("addr"),
        hub,
        site_fingerprints(&pki.issued().expect("issued"), now()),
    )
    .expect("service")
}

/// De-identify a site's archive into `<data_dir>/deid`.
pub(crate) fn deidentify(config: &NodeConfig, input: &Path) -> PathBuf {
    let out = config.data_dir.join("deid");
    let paths = BatchPaths {
        input: input.to_owned(),
        output: out.clone(),
        quarantine: config.data_dir.join("quarantine"),
    };
    let policy = config.deid.policy().expect("policy");
    let secret = config.deid.secret(&config.data_dir, false).expect("secret");
    let keys = Keys::derive(&secret);
    let mut catalog =
        node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite")).expect("catalog");
    let settings = RunSettings {
        mode: "pseudonymise",
        edition: "2026c",
        options: "retain-patient-characteristics".into(),
        vault_key: None,
        batch_size: 64,
        progress: &batch::NoProgress,
        subjects: &node::volume::deid::SubjectRule::default(),
    };
    let summary = batch::deidentify_folder(
        &paths,
        &Deidentifier::new(&policy, &keys),
        &mut catalog,
        &settings,
    )
    .expect("de-identification");
    assert_eq!(summary.quarantined_total(), 0, "every sample file is valid");
    out
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn three_sites_federate_statistics_and_a_nyul_model_without_leaking() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let names = ["site-a", "site-b", "site-c"];
    let (pki, coord) = test_pki(&pki_dir, &names);
    let read = |p: &Path| std::fs::read(p).expect("read");
    let members: Vec<SiteId> = names.iter().map(|n| SiteId::new(n).expect("id")).collect();
    let state = dir.path().join("coordinator");
    std::fs::create_dir_all(&state).expect("state dir");
    let store_path = state.join("coordinator.sqlite");
    let schema_a = SchemaDocument::new(&schema_text(5, 1)).expect("schema A");
    let mut hub = Hub::new(
        members.clone(),
        Store::open(&store_path).expect("store"),
        Some(schema_a.clone()),
        None,
    )
    .expect("hub");
    let tap_a = hub.tap();
    let hub = Arc::new(Mutex::new(hub));

    // Three sites with their own archives, de-identified locally.
    let mut identifying = Vec::new();
    let mut configs = Vec::new();
    for (name, profile) in names.iter().zip(node::sample::consortium_sites(PATIENTS)) {
        let input = dir.path().join(format!("{name}-archive"));
        let archive = node::sample::write_site_archive(&input, &profile).expect("archive");
        identifying.extend(archive.identifying);
        let config = node_config(&dir.path().join(name), name, &pki_dir, "127.0.0.1:1");
        deidentify(&config, &input);
        configs.push(config);
    }
    // Pseudonyms are patient identifiers too: they must not leave either.
    let mut pseudonyms = Vec::new();
    let schema_a_parsed = CurationSchema::parse(schema_a.text()).expect("parse");
    let mut site_facts = Vec::new();
    for c in &configs {
        let facts = aggregate::collect(&c.data_dir.join("deid"), &schema_a_parsed).expect("facts");
        assert_eq!(facts.len(), PATIENTS, "one series per patient");
        pseudonyms.extend(facts.iter().map(|f| f.patient.clone()));
        site_facts.push(facts);
    }

    rt.block_on(async {
        let server = server_config(
            &read(&pki.ca_cert_path()),
            &read(&pki.crl_path()),
            &read(&coord.certificate),
            &read(coord.key.as_ref().expect("key")),
        )
        .expect("server config");
        let service = Service::start(
            server,
            "127.0.0.1:0".parse().expect("addr"),
            hub.clone(),
            site_fingerprints(&pki.issued().expect("issued"), now()),
        )
        .expect("service");
        let addr = service.local_addr().expect("addr").to_string();
        let tcp = coordinator::net::TcpService::start(
            coordinator::net::server_tls(
                &read(&pki.ca_cert_path()),
                &read(&pki.crl_path()),
                &read(&coord.certificate),
                &read(coord.key.as_ref().expect("key")),
            )
            .expect("server tls"),
            "127.0.0.1:0".parse().expect("addr"),
            hub.clone(),
            service.sites(),
        )
        .await
        .expect("tcp fallback");
        // The third hospital's firewall drops UDP: its QUIC address leads nowhere, and it
        // falls back to TLS on TCP by itself.
        let blocked = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        for (i, c) in configs.iter_mut().enumerate() {
            if let Some(f) = c.federation.as_mut() {
                if i == 2 {
                    f.coordinator = blocked.local_addr().expect("addr").to_string();
                    f.coordinator_tcp = Some(tcp.local_addr().to_string());
                } else {
                    f.coordinator = addr.clone();
                }
            }
        }
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let sites: Vec<Site> = configs
            .iter()
            .map(|c| Site::new(c, c.data_dir.join("deid")).expect("site"))
            .collect();

        // Pass 1: every site fetches, acknowledges and reports; the model is fitted once
        // the last one has reported.
        for (i, s) in sites.iter().enumerate() {
            let out = s.run_once(&endpoint, None).await.expect("sync");
            assert!(out.fetched_schema && out.acknowledged, "{out:?}");
            assert_eq!(out.reported, Some(1));
            assert_eq!(
                out.welcome,
                Some((1, 0)),
                "no model before every site reported"
            );
            assert_eq!(out.applied_model, None, "site {i}");
        }
        // Pass 2: the model is published; nothing is reported twice.
        for s in &sites {
            let out = s.run_once(&endpoint, None).await.expect("sync");
            assert_eq!(out.welcome, Some((1, 1)));
            assert_eq!(out.reported, None, "a reported round is not reported again");
            assert_eq!(out.applied_model, Some(1));
            assert_eq!(out.harmonised, PATIENTS);
        }

        // Pooled statistics equal those of all sites' data at once.
        let pooled_facts: Vec<_> = site_facts.iter().flatten().cloned().collect();
        let at_once = aggregate::aggregates(&pooled_facts, &schema_a_parsed, 5);
        let reports = {
            let h = hub.lock().expect("hub");
            h.store().reports(&schema_a.hash(), 1).expect("reports")
        };
        assert_eq!(reports.len(), 3);
        for (i, vocabulary) in schema_a_parsed.statistics.counts_by.iter().enumerate() {
            let mut pooled = Vec::new();
            for (_, a) in &reports {
                add_cells(&mut pooled, &a.counts[i].cells);
            }
            let expect: Vec<Option<u64>> =
                at_once.counts[i].cells.iter().map(|c| c.value()).collect();
            assert_eq!(pooled, expect, "counts by {vocabulary}");
            assert!(pooled.iter().all(Option::is_some), "nothing suppressed");
        }
        let mut hist = Vec::new();
        for (_, a) in &reports {
            add_cells(&mut hist, &a.histograms[0]);
        }
        assert_eq!(
            hist,
            at_once.histograms[0]
                .iter()
                .map(|c| c.value())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            hist.iter().filter(|c| c.unwrap_or(0) > 0).count(),
            3,
            "the sites' intensity scales put each site in its own bin"
        );
        for (q, m) in &at_once.moments {
            let m = m.expect("enough patients");
            let mut merged: Option<protocol::aggregate::Moments> = None;
            for (_, a) in &reports {
                let s = a.moments.iter().find(|(x, _)| x == q).and_then(|(_, m)| *m);
                let s = s.expect("site moments");
                match &mut merged {
                    Some(x) => x.merge(&s),
                    None => merged = Some(s),
                }
            }
            let merged = merged.expect("merged");
            assert_eq!(
                (merged.patients, merged.sum, merged.sum_squares),
                (m.patients, m.sum, m.sum_squares),
                "{q:?}"
            );
        }

        // The federated model is the pooled fit, exactly.
        let mut pooled_nyul = NyulSummary::default();
        for f in &pooled_facts {
            pooled_nyul.merge(f.nyul.as_ref().expect("MR volumes have a Nyúl summary"));
        }
        let model = hub
            .lock()
            .expect("hub")
            .store()
            .latest_model()
            .expect("model")
            .expect("published");
        assert_eq!(model.fit, FederatedFit::Nyul(pooled_nyul.clone()));
        assert_eq!(pooled_nyul.volumes, 3 * PATIENTS as u64);
        // Each node applied it: the spread of median foreground intensity across sites is
        // far smaller after harmonisation than before.
        let median_of = |v: &node::volume::Volume| {
            let x: Vec<f32> = v.data.iter().copied().collect();
            let t = node::harmonise::stats::otsu(&x);
            let mut fg: Vec<f32> = x.into_iter().filter(|v| f64::from(*v) > t).collect();
            node::harmonise::stats::percentile(&mut fg, 50.0)
        };
        let spread = |v: &[f64]| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
            (hi - lo) / mean
        };
        let mut before = Vec::new();
        let mut after = Vec::new();
        for (c, facts) in configs.iter().zip(&site_facts) {
            let v: Vec<f64> = facts
                .iter()
                .filter_map(|f| {
                    f.values
                        .get(&protocol::aggregate::Quantity::Intensity)
                        .copied()
                })
                .collect();
            before.push(v.iter().sum::<f64>() / v.len() as f64);
            let outs: Vec<PathBuf> = all_files(&c.data_dir.join("harmonised"));
            assert_eq!(outs.len(), PATIENTS);
            let m: Vec<f64> = outs
                .iter()
                .map(|p| median_of(&node::volume::nifti::read(p).expect("nifti").1))
                .collect();
            after.push(m.iter().sum::<f64>() / m.len() as f64);
        }
        assert!(
            spread(&after) < spread(&before) / 5.0,
            "spread before {before:?}, after {after:?}"
        );

        // A stricter schema: a new round in which small cells are suppressed.
        let schema_b = SchemaDocument::new(&schema_text(7, 2)).expect("schema B");
        let tap_b = {
            let mut h = hub.lock().expect("hub");
            *h = Hub::new(
                members.clone(),
                Store::open(&store_path).expect("store"),
                Some(schema_b.clone()),
                None,
            )
            .expect("hub");
            h.tap()
        };
        for s in &sites {
            let out = s.run_once(&endpoint, None).await.expect("sync");
            assert!(out.fetched_schema && out.acknowledged);
            assert_eq!(out.reported, Some(2));
        }
        let reports = hub
            .lock()
            .expect("hub")
            .store()
            .reports(&schema_b.hash(), 2)
            .expect("reports");
        assert_eq!(reports.len(), 3);
        let mut suppressed = 0;
        for (_, a) in &reports {
            let cells = a
                .counts
                .iter()
                .flat_map(|t| t.cells.iter())
                .chain(a.histograms.iter().flatten());
            for c in cells {
                match c {
                    Cell::Value(v) => assert!(*v == 0 || *v >= 7, "released {v} < k"),
                    Cell::Suppressed => suppressed += 1,
                }
            }
            protocol::aggregate::check_aggregates(a, 7).expect("coordinator's check");
        }
        // Five women and five men per site are both below k = 7.
        assert!(suppressed >= 6, "{suppressed} cells suppressed");

        // The egress log lists every frame that left, with its hash.
        for (i, c) in configs.iter().enumerate() {
            let cat =
                node::catalog::Catalog::open(&c.data_dir.join("catalog.sqlite")).expect("catalog");
            let log = cat.egress().expect("egress");
            let over_tcp = log
                .iter()
                .filter(|e| e.kind == "hello" && e.answer == "welcome (tcp)")
                .count();
            if i == 2 {
                assert!(over_tcp >= 3, "the UDP-blocked site used the TCP fallback");
                assert!(
                    log.iter()
                        .any(|e| e.kind == "hello" && e.answer.starts_with("not welcomed")),
                    "its QUIC attempt failed first"
                );
            } else {
                assert_eq!(over_tcp, 0, "the others speak QUIC");
            }
            let reports = log.iter().filter(|e| e.kind == "report").count();
            assert_eq!(reports, 2, "one report per round");
            assert!(
                log.iter()
                    .all(|e| e.sha256.len() == 64 && e.answer != "sent")
            );
        }

        // Leak test: no canary, original UID or pseudonym in anything the coordinator
        // received (every frame) or stored (its database and the report).
        let report = {
            let h = hub.lock().expect("hub");
            coordinator::report::build(&h).expect("report")
        };
        std::fs::write(
            state.join("report.json"),
            serde_json::to_vec(&report).expect("json"),
        )
        .expect("write report");
        std::fs::write(
            state.join("report.html"),
            coordinator::report::html(&report),
        )
        .expect("write html");
        assert_eq!(report.sites.len(), 3);
        assert!(report.sites.iter().all(|s| s.acknowledged && s.reported));
        service.endpoint.close(0u32.into(), b"test over");
        tcp.close();
        let mut haystacks: Vec<Vec<u8>> = Vec::new();
        haystacks.extend(tap_a.lock().expect("tap").iter().cloned());
        haystacks.extend(tap_b.lock().expect("tap").iter().cloned());
        assert!(haystacks.len() >= 20, "{} frames", haystacks.len());
        for f in all_files(&state) {
            haystacks.push(std::fs::read(&f).expect("read"));
        }
        for needle in identifying.iter().chain(&pseudonyms) {
            for h in &haystacks {
                assert!(
                    !contains(h, needle.as_bytes()),
                    "{needle:?} reached the coordinator"
                );
            }
        }
    });
}

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A node running as a service survives the coordinator going away: it backs off, retries,
/// reconnects when the coordinator is back on the same address, and resumes where it left off
/// (the round it reported is not reported again; the model fitted after the restart is applied).
#[test]
fn a_node_service_reconnects_when_the_coordinator_comes_back() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let (pki, coord) = test_pki(&pki_dir, &["site-a"]);
    let read = |p: &Path| std::fs::read(p).expect("read");
    let input = dir.path().join("archive");
    let mut profile = node::sample::consortium_sites(5)[0].clone();
    profile.patients = 5;
    node::sample::write_site_archive(&input, &profile).expect("archive");
    let store_path = dir.path().join("coordinator.sqlite");
    let members = [
        SiteId::new("site-a").expect("id"),
        SiteId::new("site-b").expect("id"),
        SiteId::new("site-c").expect("id"),
    ];
    let doc = SchemaDocument::new(&schema_text(5, 1)).expect("schema");
    let server = || {
        server_config(
            &read(&pki.ca_cert_path()),
            &read(&pki.crl_path()),
            &read(&coord.certificate),
            &read(coord.key.as_ref().expect("key")),
        )
        .expect("server")
    };
    let fingerprints = || site_fingerprints(&pki.issued().expect("issued"), now());
    rt.block_on(async {
        // First coordinator: waits for both sites before fitting, so no model yet.
        let hub = Hub::new(
            members.clone(),
            Store::open(&store_path).expect("store"),
            Some(doc.clone()),
            None,
        )
        .expect("hub");
        let first = Service::start(
            server(),
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(Mutex::new(hub)),
            fingerprints(),
        )
        .expect("service");
        let addr = first.local_addr().expect("addr");
        let mut config = node_config(
            &dir.path().join("site-a"),
            "site-a",
            &pki_dir,
            &addr.to_string(),
        );
        if let Some(f) = config.federation.as_mut() {
            f.poll_seconds = 1;
        }
        deidentify(&config, &input);
        let site = Site::new(&config, config.data_dir.join("deid")).expect("site");
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = async {
            site.run(&endpoint, async {
                let _ = stop_rx.await;
            })
            .await;
        };
        let drive = async {
            wait_for("first report", || site.state().reported.is_some()).await;
            // The coordinator goes away for a while.
            first.endpoint.close(0u32.into(), b"maintenance");
            first.endpoint.wait_idle().await;
            drop(first);
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            // It comes back on the same address with its state; meanwhile the two other
            // sites reported (their reports are played into the hub: site-a's aggregates, under
            // their names), so a model over three sites can be fitted.
            let mut hub = Hub::new(
                members.clone(),
                Store::open(&store_path).expect("store"),
                Some(doc.clone()),
                Some(3),
            )
            .expect("hub");
            let round = hub.round();
            let reported = hub.store().reports(&doc.hash(), round).expect("reports");
            let (_, a) = reported.first().expect("site-a's report");
            let schema = doc.schema().expect("schema");
            for (i, other) in members[1..].iter().enumerate() {
                let id = 100 + 10 * i as u64;
                let hello = protocol::Message::Hello(protocol::Hello {
                    id: protocol::MessageId(id),
                    min_version: protocol::PROTOCOL_VERSION,
                    max_version: protocol::PROTOCOL_VERSION,
                    site: other.clone(),
                    schema: None,
                });
                hub.handle(other, hello, now(), false);
                let ack = protocol::Message::SchemaAck(Box::new(protocol::SchemaAck {
                    id: protocol::MessageId(id + 1),
                    schema: doc.hash(),
                    profile: protocol::aggregate::ProfileCheck {
                        missing: Vec::new(),
                    },
                    conformance: protocol::aggregate::ConformanceSummary {
                        patients: Cell::Value(5),
                        status: [Cell::Value(5), Cell::Value(0), Cell::Value(0)],
                        deviations: vec![Cell::Value(0); schema.data_of_interest.constraints.len()],
                        findings: [Cell::Value(0); 3],
                        quarantined: Cell::Value(0),
                    },
                }));
                hub.handle(other, ack, now(), true);
                let report = protocol::Message::Report(Box::new(protocol::AggregateReport {
                    id: protocol::MessageId(id + 2),
                    schema: doc.hash(),
                    round,
                    aggregates: a.clone(),
                }));
                hub.handle(other, report, now(), true);
            }
            assert_eq!(
                hub.store()
                    .reports(&doc.hash(), round)
                    .expect("reports")
                    .len(),
                3
            );
            let hub = Arc::new(Mutex::new(hub));
            let second = loop {
                match Service::start(server(), addr, hub.clone(), fingerprints()) {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            };
            wait_for("model applied", || site.state().model == 1).await;
            second.endpoint.close(0u32.into(), b"test over");
            let _ = stop_tx.send(());
        };
        tokio::join!(running, drive);
        let log = node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))
            .expect("catalog")
            .egress()
            .expect("egress");
        assert!(
            log.iter()
                .any(|e| e.answer.starts_with("no answer") || e.answer.starts_with("not welcomed")),
            "the failed attempts are in the egress log too: {log:?}"
        );
        assert_eq!(
            log.iter().filter(|e| e.kind == "report").count(),
            1,
            "the round is not reported again after the reconnect"
        );
        assert!(log.iter().filter(|e| e.kind == "hello").count() >= 3);
    });
}

/// The node's privacy ledgers over the wire: a first schema waits for hospital IT's approval;
/// differential privacy spends the site's budget until a release is refused; a release that
/// differs from an earlier one by fewer than k patients is refused. Each refusal reaches the
/// coordinator and the egress log.
#[test]
fn approval_budget_and_differencing_refusals() {
    use protocol::aggregate::RefusalReason;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let (pki, coord) = test_pki(&pki_dir, &["site-a"]);
    let mut profile = node::sample::consortium_sites(5)[0].clone();
    profile.patients = 10;
    let input = dir.path().join("archive");
    node::sample::write_site_archive(&input, &profile).expect("archive");
    // The site starts with 5 of its 10 patients; the others arrive later.
    let first = dir.path().join("first");
    for p in 0..5 {
        let name = format!("{}_{p:03}", profile.prefix);
        std::fs::rename(input.join(&name), first.join(&name))
            .or_else(|_| {
                std::fs::create_dir_all(&first)?;
                std::fs::rename(input.join(&name), first.join(&name))
            })
            .expect("move");
    }
    let dp_schema = schema_text(5, 1).replace(
        "min_cell_count = 5",
        "min_cell_count = 5\n\n[privacy.differential_privacy]\nepsilon = 1.0\ndelta = 0.0",
    );
    let doc = SchemaDocument::new(&dp_schema).expect("dp schema");
    let hub = Hub::new(
        [SiteId::new("site-a").expect("id")],
        Store::in_memory().expect("store"),
        Some(doc.clone()),
        None,
    )
    .expect("hub");
    let hub = Arc::new(Mutex::new(hub));
    rt.block_on(async {
        let service = start_service(&pki, &coord, hub.clone());
        let addr = service.local_addr().expect("addr").to_string();
        let mut config = node_config(&dir.path().join("site-a"), "site-a", &pki_dir, &addr);
        if let Some(f) = config.federation.as_mut() {
            f.egress_approval = true;
            f.privacy_budget_epsilon = 2.5;
        }
        deidentify(&config, &first);
        let site = Site::new(&config, config.data_dir.join("deid")).expect("site");
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let refusal = |round: u32| {
            hub.lock()
                .expect("hub")
                .store()
                .refusal(&SiteId::new("site-a").expect("id"), &doc.hash(), round)
                .expect("refusal")
        };

        // A first schema waits for approval; the coordinator hears why.
        let out = site.run_once(&endpoint, None).await.expect("sync");
        assert_eq!(out.refused, Some(RefusalReason::AwaitingApproval));
        assert_eq!(refusal(1), Some(RefusalReason::AwaitingApproval));
        let approvals =
            node::federation::approval::Approvals::at(&config.data_dir.join("federation"));
        let pending = approvals.pending().expect("a preview");
        assert!(
            pending
                .items
                .iter()
                .any(|i| i.starts_with("patients by sex"))
        );
        approvals.approve().expect("approve");

        // Released with noise: ε = 1 of a budget of 2.5.
        let out = site.run_once(&endpoint, None).await.expect("sync");
        assert_eq!(out.reported, Some(1));
        let stored = hub
            .lock()
            .expect("hub")
            .store()
            .reports(&doc.hash(), 1)
            .expect("reports");
        let noise = stored[0].1.noise.expect("noise applied");
        assert_eq!(noise.epsilon_micro, 1_000_000);
        // Round 2: 2 of 2.5 spent. Round 3 would spend 3: refused.
        hub.lock().expect("hub").next_round().expect("round");
        assert_eq!(
            site.run_once(&endpoint, None).await.expect("sync").reported,
            Some(2)
        );
        hub.lock().expect("hub").next_round().expect("round");
        let out = site.run_once(&endpoint, None).await.expect("sync");
        assert_eq!(out.refused, Some(RefusalReason::BudgetExhausted));
        assert_eq!(refusal(3), Some(RefusalReason::BudgetExhausted));

        // A new schema id does not open a new budget: the budget is the site's.
        let renamed = SchemaDocument::new(&dp_schema.replace("brain-t1-test", "brain-t1-renamed"))
            .expect("renamed");
        *hub.lock().expect("hub") = Hub::new(
            [SiteId::new("site-a").expect("id")],
            Store::in_memory().expect("store"),
            Some(renamed.clone()),
            None,
        )
        .expect("hub");
        approvals
            .check(&renamed.schema().expect("schema"))
            .expect("check");
        approvals.approve().expect("approve");
        let out = site.run_once(&endpoint, None).await.expect("sync");
        assert_eq!(out.refused, Some(RefusalReason::BudgetExhausted));
        let spent: f64 = node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))
            .expect("catalog")
            .releases()
            .expect("ledger")
            .iter()
            .map(|r| r.epsilon)
            .sum();
        assert!(
            (spent - 2.0).abs() < 1e-9,
            "two releases of epsilon 1: {spent}"
        );

        // A schema without noise (another dataset): one new patient is refused (it would be
        // isolated by the difference with the earlier releases), five new ones are released.
        let plain =
            SchemaDocument::new(&schema_text(5, 1).replace("brain-t1-test", "brain-t1-plain"))
                .expect("plain");
        *hub.lock().expect("hub") = Hub::new(
            [SiteId::new("site-a").expect("id")],
            Store::in_memory().expect("store"),
            Some(plain.clone()),
            None,
        )
        .expect("hub");
        approvals
            .check(&plain.schema().expect("schema"))
            .expect("check");
        approvals.approve().expect("approve");
        let one = dir.path().join("one");
        let name = format!("{}_{:03}", profile.prefix, 5);
        std::fs::create_dir_all(&one).expect("dir");
        std::fs::rename(input.join(&name), one.join(&name)).expect("move");
        deidentify(&config, &one);
        let out = site.run_once(&endpoint, None).await.expect("sync");
        assert_eq!(out.refused, Some(RefusalReason::Differencing));
        deidentify(&config, &input);
        let out = site.run_once(&endpoint, None).await.expect("sync");
        assert_eq!(
            out.reported,
            Some(1),
            "ten patients: five more than released before"
        );
        service.endpoint.close(0u32.into(), b"test over");
    });
    let cat =
        node::catalog::Catalog::open(&config_path(&dir).join("catalog.sqlite")).expect("catalog");
    let log = cat.egress().expect("egress");
    assert_eq!(
        log.iter().filter(|e| e.kind == "refusal").count(),
        4,
        "approval, budget (twice: a new schema id has no budget of its own) and differencing refusals left as messages"
    );
    let ledger = cat.releases().expect("ledger");
    let spent: f64 = ledger
        .iter()
        .filter(|r| r.dataset == "brain-t1-test" && r.outcome == "released")
        .map(|r| r.epsilon)
        .sum();
    assert_eq!(spent, 2.0);
    assert!(ledger.iter().any(|r| r.outcome == "refused-budget"));
    assert!(ledger.iter().any(|r| r.outcome == "refused-differencing"));
}

fn config_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("site-a")
}

/// A release is computed once: its noise is drawn and its budget spent when it is first
/// prepared, and a retry (after a lost answer, a crash or a restart) sends exactly the same
/// values. Fresh noise on every retry would let a coordinator average it away.
#[test]
fn a_release_is_noised_once_and_resent_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let _ = test_pki(&pki_dir, &["site-a"]);
    let mut profile = node::sample::consortium_sites(12)[0].clone();
    profile.patients = 12;
    let input = dir.path().join("archive");
    node::sample::write_site_archive(&input, &profile).expect("archive");
    let config = node_config(
        &dir.path().join("site-a"),
        "site-a",
        &pki_dir,
        "127.0.0.1:9",
    );
    deidentify(&config, &input);
    let text = schema_text(5, 1).replace(
        "min_cell_count = 5",
        "min_cell_count = 5\n\n[privacy.differential_privacy]\nepsilon = 0.5\ndelta = 0.0",
    );
    let doc = SchemaDocument::new(&text).expect("schema");
    let schema = doc.schema().expect("schema");
    let hash: String = doc.hash().0.iter().map(|b| format!("{b:02x}")).collect();
    let released = |site: &Site, round: u32| {
        site.release(&schema, &hash, round, 5)
            .expect("release")
            .expect("not refused")
    };
    let site = Site::new(&config, config.data_dir.join("deid")).expect("site");
    let first = released(&site, 1);
    assert!(first.noise.is_some());
    // A retry, and a restarted node: the same values, and no second entry in the ledger.
    assert_eq!(released(&site, 1), first);
    let restarted = Site::new(&config, config.data_dir.join("deid")).expect("site");
    assert_eq!(released(&restarted, 1), first);
    let ledger = || {
        node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))
            .expect("catalog")
            .releases()
            .expect("ledger")
    };
    assert_eq!(ledger().len(), 1, "spent once");
    assert!((ledger()[0].epsilon - 0.5).abs() < 1e-12);
    // The next round is a new release: new noise, spent again.
    let second = released(&restarted, 2);
    assert_eq!(released(&restarted, 2), second);
    assert_eq!(ledger().len(), 2);
}
