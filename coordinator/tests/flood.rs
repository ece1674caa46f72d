//! An authenticated but hostile site floods `fedcurate-coordinator serve` (a real process):
//! more connections than a site may hold, frames declaring 16 MiB, frames that stall half-way,
//! and hellos as fast as it can. The coordinator's memory stays bounded (its peak resident size
//! is read from /proc) and another site keeps being answered within a few seconds.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client;
use coordinator::pki::Pki;
use protocol::{Hello, Message, MessageId, PROTOCOL_VERSION, SiteId};

fn hello_frame(site: &str, id: u64) -> Vec<u8> {
    protocol::encode_frame(&Message::Hello(Hello {
        id: MessageId(id),
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        site: SiteId::new(site).expect("id"),
        schema: None,
    }))
    .expect("encode")
}

/// One request on a connection; its answer.
async fn request(conn: &quinn::Connection, frame: &[u8]) -> Option<Message> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(frame).await.ok()?;
    send.finish().ok()?;
    let bytes = recv.read_to_end(1 << 20).await.ok()?;
    Some(protocol::decode_frame(&bytes).ok()?.0)
}

/// Resident and peak resident memory of a process, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn a_hostile_site_cannot_exhaust_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let coord = pki.issue_coordinator("localhost", 30).expect("coordinator");
    let hostile = pki.issue_site("site-a", 30).expect("site a");
    let honest = pki.issue_site("site-b", 30).expect("site b");
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
        .stderr(Stdio::null())
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
    let pid = child.id();
    let read = |x: &std::path::Path| std::fs::read(x).expect("read");
    let ca = read(&pki.ca_cert_path());
    let cfg_a = client(
        &ca,
        &read(&hostile.certificate),
        &read(hostile.key.as_ref().expect("key")),
    );
    let cfg_b = client(
        &ca,
        &read(&honest.certificate),
        &read(honest.key.as_ref().expect("key")),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (baseline, _) = memory(pid);

    let (latencies, connections_kept, refused_oversize) = rt.block_on(async {
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        // The honest site, answered throughout.
        let b = endpoint
            .connect_with(cfg_b.clone(), addr, "localhost")
            .expect("connect")
            .await
            .expect("site b connects");
        assert!(matches!(
            request(&b, &hello_frame("site-b", 1)).await,
            Some(Message::Welcome(_))
        ));
        // The hostile site: eight connections (at most four are kept).
        let mut conns = Vec::new();
        for _ in 0..8 {
            if let Ok(c) = endpoint
                .connect_with(cfg_a.clone(), addr, "localhost")
                .expect("connect")
                .await
            {
                conns.push(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kept: Vec<quinn::Connection> = conns
            .into_iter()
            .filter(|c| c.close_reason().is_none())
            .collect();
        let connections_kept = kept.len();
        // Before the flood: a frame declaring 16 MiB is answered from its header alone.
        let refused_first = {
            let (mut send, mut recv) = kept[0].open_bi().await.expect("stream");
            let mut head = ((16u32 << 20) + 3).to_be_bytes().to_vec();
            head.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            head.push(0x23);
            let _ = send.write_all(&head).await;
            let _ = send.write_all(&vec![0u8; 64 * 1024]).await;
            let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|b| protocol::decode_frame(&b).ok().map(|(m, _)| m));
            matches!(
                answer,
                Some(Message::Error {
                    code: protocol::ErrorCode::BadFrame,
                    ..
                })
            )
        };
        assert!(
            refused_first,
            "a frame declaring 16 MiB is refused from its header"
        );
        let mut tasks = Vec::new();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for c in &kept {
            // Frames declaring 16 MiB, each followed by 4 MiB of data.
            for _ in 0..24 {
                let c = c.clone();
                let refused = refused.clone();
                tasks.push(tokio::spawn(async move {
                    let Ok((mut send, mut recv)) = c.open_bi().await else {
                        return;
                    };
                    let mut head = ((16u32 << 20) + 3).to_be_bytes().to_vec();
                    head.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
                    head.push(0x23);
                    let _ = send.write_all(&head).await;
                    let chunk = vec![0u8; 64 * 1024];
                    for _ in 0..64 {
                        if send.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    if let Ok(b) = recv.read_to_end(1 << 20).await
                        && matches!(protocol::decode_frame(&b), Ok((Message::Error { .. }, _)))
                    {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
            // Frames that declare 1 MiB (allowed) and stall after a few bytes.
            for _ in 0..8 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let Ok((mut send, _recv)) = c.open_bi().await else {
                        return;
                    };
                    let mut head = ((1u32 << 20) + 3).to_be_bytes().to_vec();
                    head.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
                    head.push(0x23);
                    head.extend_from_slice(&[0u8; 100]);
                    let _ = send.write_all(&head).await;
                    tokio::time::sleep(Duration::from_secs(40)).await;
                }));
            }
            // Hellos as fast as it can.
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..400 {
                    if request(&c, &hello_frame("site-a", i)).await.is_none() {
                        break;
                    }
                }
            }));
        }
        // Meanwhile site b polls every 250 ms for 12 s.
        let mut latencies = Vec::new();
        let started = Instant::now();
        let mut i = 10;
        while started.elapsed() < Duration::from_secs(12) {
            let t = Instant::now();
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                request(&b, &hello_frame("site-b", i)),
            )
            .await;
            assert!(
                matches!(answer, Ok(Some(Message::Welcome(_)))),
                "site b not answered during the flood: {answer:?}"
            );
            latencies.push(t.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for t in tasks {
            t.abort();
        }
        for c in &kept {
            c.close(0u32.into(), b"done");
        }
        b.close(0u32.into(), b"done");
        (
            latencies,
            connections_kept,
            refused.load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    let (_, peak) = memory(pid);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "coordinator memory: {} MiB resident before the flood, {} MiB peak; site b answered {} times, slowest {:?}; hostile connections kept {connections_kept} of 8; oversize frames refused {refused_oversize}",
        baseline / 1024,
        peak / 1024,
        latencies.len(),
        worst
    );
    assert!(
        connections_kept <= coordinator::net::MAX_CONNECTIONS_PER_SITE,
        "{connections_kept} connections kept"
    );
    assert!(
        peak < baseline + 96 * 1024,
        "peak {peak} KiB against {baseline} KiB before the flood"
    );
    assert!(worst < Duration::from_secs(5), "site b waited {worst:?}");
    assert!(latencies.len() >= 20);
}
