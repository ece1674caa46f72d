//! `fedcurate-coordinator serve` as a process: it welcomes a site over QUIC with mutual TLS,
//! enforces a revocation made while it runs (no restart), writes its state and report, and
//! stops cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client;
use coordinator::pki::Pki;
use protocol::{Hello, Message, MessageId, PROTOCOL_VERSION, SiteId};

async fn hello(addr: SocketAddr, cfg: quinn::ClientConfig) -> Option<Message> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = endpoint
        .connect_with(cfg, addr, "localhost")
        .expect("connect")
        .await
        .ok()?;
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    let frame = protocol::encode_frame(&Message::Hello(Hello {
        id: MessageId(1),
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        site: SiteId::new("site-a").expect("id"),
        schema: None,
    }))
    .expect("encode");
    send.write_all(&frame).await.ok()?;
    send.finish().ok()?;
    let bytes = recv.read_to_end(1 << 20).await.ok()?;
    conn.close(0u32.into(), b"done");
    Some(protocol::decode_frame(&bytes).ok()?.0)
}

#[test]
fn serve_welcomes_a_site_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let coord = pki.issue_coordinator("localhost", 30).expect("coordinator");
    let site = pki.issue_site("site-a", 30).expect("site");
    let p = |x: &std::path::Path| x.display().to_string();
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\nschema = {:?}\n[[sites]]\nid = \"site-a\"\n[[sites]]\nid = \"site-b\"\n[tls]\nca = {:?}\ncrl = {:?}\ncert = {:?}\nkey = {:?}\nissued = {:?}\n",
            p(&dir.path().join("state")),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/schema.toml"),
            p(&pki.ca_cert_path()),
            p(&pki.crl_path()),
            p(&coord.certificate),
            p(coord.key.as_ref().expect("key")),
            p(&dir.path().join("pki/issued.json")),
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedcurate-coordinator"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let read = |x: &std::path::Path| std::fs::read(x).expect("read");
    let cfg_a = client(
        &read(&pki.ca_cert_path()),
        &read(&site.certificate),
        &read(site.key.as_ref().expect("key")),
    );
    let answer = rt.block_on(hello(addr, cfg_a.clone()));
    assert!(
        matches!(answer, Some(Message::Welcome(ref w)) if w.reply_to == MessageId(1) && w.round == 1 && w.schema.is_some()),
        "{answer:?}"
    );
    // Revoked while the coordinator runs: refused at the next handshake, no restart.
    pki.revoke("site-a").expect("revoke");
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        match rt.block_on(hello(addr, cfg_a.clone())) {
            None => break,
            Some(m) => assert!(
                started.elapsed() < Duration::from_secs(15),
                "still welcomed 15 s after revocation: {m:?}"
            ),
        }
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "clean exit: {exit:?}");
    let state = dir.path().join("state");
    assert!(state.join("coordinator.sqlite").is_file());
    let report = std::fs::read_to_string(state.join("report/report.json")).expect("report");
    assert!(
        report.contains("\"schema_id\": \"brain-mri-2027\""),
        "{report}"
    );
    assert!(state.join("report/report.html").is_file());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("rest");
    assert!(rest.contains("stopped"), "{rest:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(
        err.contains("site-b") && err.contains("no valid certificate"),
        "a listed site without a certificate is reported: {err}"
    );
    assert!(
        err.contains("reloaded the certificates"),
        "the revocation list was reloaded: {err}"
    );
}

#[test]
fn check_config_finds_broken_tls_material() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let coord = pki.issue_coordinator("localhost", 30).expect("coordinator");
    let key = coord.key.clone().expect("key");
    let p = |x: &std::path::Path| x.display().to_string();
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\n[[sites]]\nid = \"site-a\"\n[tls]\nca = {:?}\ncrl = {:?}\ncert = {:?}\nkey = {:?}\nissued = {:?}\n",
            p(&pki.ca_cert_path()),
            p(&pki.crl_path()),
            p(&coord.certificate),
            p(&key),
            p(&dir.path().join("pki/issued.json")),
        ),
    )
    .expect("config");
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_fedcurate-coordinator"))
            .args(["check-config", "--config"])
            .arg(&cfg)
            .output()
            .expect("runs")
    };
    let ok = check();
    assert!(ok.status.success(), "{ok:?}");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("expires in 29 days") || text.contains("expires in 30 days"),
        "{text}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let bad = check();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("chmod 600"),
        "{bad:?}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&coord.certificate, "garbage").expect("write");
    let bad = check();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("not a PEM certificate"),
        "{bad:?}"
    );
}
