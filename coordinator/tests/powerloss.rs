//! Acknowledged means durable at the coordinator too: its state directory lives on a
//! loop-mounted ext4 or XFS image, a site's report is acknowledged, and the file system is
//! shut down at once without flushing its log (`xfs_io -x -c shutdown`, a power cut). After a
//! remount the report is in `coordinator.sqlite` and SQLite's integrity check passes. The
//! harness is calibrated: with the store's flushes switched off (`FEDCURATE_TEST_SKIP_FLUSH=1`,
//! synchronous = OFF) the acknowledged report must be missing. Needs root, loop devices,
//! e2fsprogs and xfsprogs (scripts/test.sh installs them).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::client;
use coordinator::pki::Pki;
use protocol::aggregate::{
    Cell, ConformanceSummary, CountTable, NyulRelease, ProfileCheck, SiteAggregates,
};
use protocol::schema::CurationSchema;
use protocol::summary::NyulSummary;
use protocol::{
    AggregateReport, Hello, Message, MessageId, PROTOCOL_VERSION, SchemaAck, SchemaDocument, SiteId,
};

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
struct Disk {
    image: PathBuf,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Disk {
    fn new(fstype: &str) -> Disk {
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
        let d = Disk {
            image,
            dir,
            _tmp: tmp,
        };
        d.mount();
        d
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

    fn cut(&self) {
        sh(
            "xfs_io",
            &["-x", "-c", "shutdown", self.dir.to_str().expect("utf-8")],
        );
    }

    fn remount(&self) {
        sh("umount", &[self.dir.to_str().expect("utf-8")]);
        self.mount();
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

async fn request(conn: &quinn::Connection, m: &Message) -> Message {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&protocol::encode_frame(m).expect("encode"))
        .await
        .expect("send");
    send.finish().expect("finish");
    let bytes = recv.read_to_end(1 << 20).await.expect("answer");
    protocol::decode_frame(&bytes).expect("decode").0
}

/// A plausible report of 20 patients for the example schema.
fn aggregates(schema: &CurationSchema) -> SiteAggregates {
    SiteAggregates {
        k: schema.privacy.min_cell_count,
        patients: Cell::Value(20),
        series: Cell::Value(20),
        counts: schema
            .statistics
            .counts_by
            .iter()
            .map(|v| {
                let mut cells = vec![Cell::Value(0); schema.count_table_len(v)];
                cells[0] = Cell::Value(20);
                CountTable { cells }
            })
            .collect(),
        histograms: schema
            .statistics
            .histograms
            .iter()
            .map(|h| vec![Cell::Value(0); h.edges.len() + 1])
            .collect(),
        moments: schema
            .moment_quantities()
            .into_iter()
            .map(|q| (q, None))
            .collect(),
        nyul: Some(NyulRelease {
            patients: 20,
            summary: NyulSummary {
                landmark_sums: std::array::from_fn(|i| 20_000_000 + i as i64 * 150_000_000),
                volumes: 20,
            },
        }),
        ct: None,
        noise: None,
    }
}

/// Serve from a state directory on `disk`, acknowledge a report, cut the power; returns
/// whether the report survived, and the integrity check's answer.
fn acknowledged_then_cut(fstype: &str, skip_flush: bool) -> (bool, String) {
    let disk = Disk::new(fstype);
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let coord = pki.issue_coordinator("localhost", 30).expect("coordinator");
    let site = pki.issue_site("site-a", 30).expect("site");
    let p = |x: &Path| x.display().to_string();
    let state = disk.dir.join("state");
    let schema_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/schema.toml");
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\nschema = {:?}\n[[sites]]\nid = \"site-a\"\n[[sites]]\nid = \"site-b\"\n[[sites]]\nid = \"site-c\"\n[tls]\nca = {:?}\ncrl = {:?}\ncert = {:?}\nkey = {:?}\nissued = {:?}\n",
            p(&state),
            schema_path,
            p(&pki.ca_cert_path()),
            p(&pki.crl_path()),
            p(&coord.certificate),
            p(coord.key.as_ref().expect("key")),
            p(&dir.path().join("pki/issued.json")),
        ),
    )
    .expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedcurate-coordinator"));
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if skip_flush {
        cmd.env("FEDCURATE_TEST_SKIP_FLUSH", "1");
    }
    let mut child = cmd.spawn().expect("serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let text = std::fs::read_to_string(schema_path).expect("schema");
    let doc = SchemaDocument::new(&text).expect("schema");
    let schema = doc.schema().expect("parse");
    let read = |x: &Path| std::fs::read(x).expect("read");
    let cfg_a = client(
        &read(&pki.ca_cert_path()),
        &read(&site.certificate),
        &read(site.key.as_ref().expect("key")),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let round = rt.block_on(async {
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let conn = endpoint
            .connect_with(cfg_a, addr, "localhost")
            .expect("connect")
            .await
            .expect("connected");
        let Message::Welcome(w) = request(
            &conn,
            &Message::Hello(Hello {
                id: MessageId(1),
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                site: SiteId::new("site-a").expect("id"),
                schema: None,
            }),
        )
        .await
        else {
            panic!("not welcomed")
        };
        let ack = Message::SchemaAck(Box::new(SchemaAck {
            id: MessageId(2),
            schema: doc.hash(),
            profile: ProfileCheck { missing: vec![] },
            conformance: ConformanceSummary {
                patients: Cell::Value(20),
                status: [Cell::Value(20), Cell::Value(0), Cell::Value(0)],
                deviations: vec![Cell::Value(0); schema.data_of_interest.constraints.len()],
                findings: [Cell::Value(0); 3],
                quarantined: Cell::Value(0),
            },
        }));
        assert!(matches!(request(&conn, &ack).await, Message::Ack { .. }));
        let report = Message::Report(Box::new(AggregateReport {
            id: MessageId(3),
            schema: doc.hash(),
            round: w.round,
            aggregates: aggregates(&schema),
        }));
        let answer = request(&conn, &report).await;
        assert!(
            matches!(
                answer,
                Message::Ack {
                    duplicate: false,
                    ..
                }
            ),
            "{answer:?}"
        );
        // The acknowledgement is in: the power goes at once.
        disk.cut();
        w.round
    });
    let _ = child.kill();
    let _ = child.wait();
    disk.remount();
    let store = coordinator::store::Store::open(&state.join("coordinator.sqlite"))
        .expect("the store opens after the cut");
    let survived = store
        .reports(&doc.hash(), round)
        .map(|r| r.iter().any(|(s, _)| s.as_str() == "site-a"))
        .unwrap_or(false);
    let integrity = store.integrity_check().unwrap_or_else(|e| e.to_string());
    (survived, integrity)
}

#[test]
fn an_acknowledged_report_survives_a_power_cut() {
    for fs in ["ext4", "xfs"] {
        let (survived, integrity) = acknowledged_then_cut(fs, false);
        assert!(survived, "{fs}: the acknowledged report was lost");
        assert_eq!(integrity, "ok", "{fs}");
    }
    // Calibration: without the flushes the same harness loses it.
    let lost = ["ext4", "xfs"]
        .iter()
        .filter(|fs| {
            let (survived, _) = acknowledged_then_cut(fs, true);
            println!(
                "calibration on {fs}: report {}",
                if survived { "kept" } else { "lost" }
            );
            !survived
        })
        .count();
    assert!(
        lost > 0,
        "with synchronous = OFF no report was lost: the harness cannot see a missing flush"
    );
}
