//! Federated training's figures: `cargo bench -p node --bench training`.
//!
//! Real processes on loopback: the coordinator and three `train serve` nodes (QUIC with the
//! consortium's certificates); the bench is the three trainers, talking to their nodes' Unix
//! sockets in-process. One round = from the three updates handed in to every node holding the
//! next global model: the nodes check, encode and upload their updates (chunks of fixed-point
//! words), the coordinator sums them as they arrive and takes the server step, the nodes
//! download the new model. In the same run, a raw single-stream quinn transfer of one site's
//! upload on loopback is the baseline for throughput; the coordinator's resident memory
//! before any site connected and its peak are read from /proc.
//!
//! Models of 1,000, 25 M and 100 M float32 parameters (the 25 M one also under secure
//! aggregation). Under `cargo test` (no `--bench` argument) it runs 1,000 and 200,000
//! parameters once, as a smoke test of the measuring itself.

#[path = "../tests/consortium/mod.rs"]
#[allow(dead_code)]
mod consortium;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use consortium::{Consortium, SITES};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Figures {
    params: usize,
    secure: bool,
    round_s: Vec<f64>,
    idle_mib: f64,
    peak_mib: f64,
}

/// The trainers' updates for `round`: each site's global model plus a small change.
async fn updates(c: &Consortium, round: u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..3 {
        let socket = c.socket(i);
        let a = fc_training::client::call(
            &socket,
            "GET",
            &format!("/v1/round?after={}&timeout=600", round - 1),
            &[],
        )
        .await
        .expect("round");
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let rev = a.json()["revision"].as_u64().expect("revision");
        let m = fc_training::client::call(&socket, "GET", &format!("/v1/model/{rev}"), &[])
            .await
            .expect("model");
        let mut bytes = m.body;
        let start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        for (j, w) in bytes[start..].chunks_exact_mut(4).enumerate() {
            let v = f32::from_le_bytes([w[0], w[1], w[2], w[3]])
                + ((j * (i + 1) + round as usize) % 13) as f32 * 1e-5;
            w.copy_from_slice(&v.to_le_bytes());
        }
        out.push(bytes);
    }
    out
}

fn rounds(root: PathBuf, params: usize, secure: bool, n: u32) -> Figures {
    let job = format!(
        "id = \"bench\"\nrounds = {n}\nmin_sites = 3\nsecure_aggregation = {secure}\nmax_update_norm = 10000.0\nmax_samples = 1000\nchunk_mib = 4\n"
    );
    let c = Consortium::start_with(&root, params, &job, ["", "", ""]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut times = Vec::new();
    for round in 1..=n {
        let ups = rt.block_on(updates(&c, round));
        let c = &c;
        let t0 = Instant::now();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, body) in ups.into_iter().enumerate() {
                let socket = c.socket(i);
                set.spawn(async move {
                    let a = fc_training::client::call(
                        &socket,
                        "POST",
                        &format!("/v1/update?round={round}&samples={}", 10 * (i + 1)),
                        &body,
                    )
                    .await
                    .expect("push");
                    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
                    // The round is over for this site once it holds the next model.
                    loop {
                        let a = fc_training::client::call(
                            &socket,
                            "GET",
                            &format!("/v1/round?after={round}&timeout=600"),
                            &[],
                        )
                        .await
                        .expect("wait");
                        if a.status == 200 {
                            break;
                        }
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("a trainer");
            }
        });
        times.push(t0.elapsed().as_secs_f64());
    }
    let figures = Figures {
        params,
        secure,
        round_s: times,
        idle_mib: c.idle_kib as f64 / 1024.0,
        peak_mib: c.coordinator_kib("VmHWM") as f64 / 1024.0,
    };
    drop(c);
    if std::env::var_os("FEDCURATE_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    figures
}

/// MB/s of one quinn stream on loopback carrying `bytes` (no fedcurate code involved).
fn raw_quinn(bytes: usize) -> f64 {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let der = rustls::pki_types::CertificateDer::from(cert.cert.der().to_vec());
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("server tls");
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic"),
        ));
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
            .expect("server");
        let addr = server.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0usize;
            while let Some(n) = recv.read(&mut buf).await.expect("read") {
                got += n;
            }
            send.write_all(&[1]).await.expect("ack");
            send.finish().expect("finish");
            let _ = send.stopped().await;
            got
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic"),
        ));
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(client_config);
        let conn = client
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("conn");
        let block = vec![7u8; 4 << 20];
        let t0 = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len());
            send.write_all(&block[..n]).await.expect("write");
            left -= n;
        }
        send.finish().expect("finish");
        let _ = recv.read_to_end(16).await.expect("ack");
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(accept.await.expect("server"), bytes);
        bytes as f64 / 1e6 / secs
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // FEDCURATE_BENCH_RUNS="25000000:plain:3,1000:secure:6" picks the runs.
    let picked: Option<Vec<(usize, bool, u32)>> =
        std::env::var("FEDCURATE_BENCH_RUNS").ok().map(|v| {
            v.split(',')
                .filter_map(|r| {
                    let mut it = r.split(':');
                    Some((
                        it.next()?.parse().ok()?,
                        it.next()? == "secure",
                        it.next()?.parse().ok()?,
                    ))
                })
                .collect()
        });
    let runs: Vec<(usize, bool, u32)> = if let Some(p) = picked {
        p
    } else if full {
        vec![
            (1_000, false, 6),
            (1_000, true, 6),
            (25_000_000, false, 3),
            (25_000_000, true, 3),
            (100_000_000, false, 2),
        ]
    } else {
        vec![(1_000, false, 2), (200_000, true, 2)]
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = match std::env::var_os("FEDCURATE_BENCH_KEEP") {
        Some(k) => PathBuf::from(k),
        None => tmp.path().to_owned(),
    };
    println!(
        "federated training, {} sites on loopback (QUIC, mutual TLS), float32 models",
        SITES.len()
    );
    for (params, secure, n) in runs {
        let f = rounds(dir.join(format!("{params}-{secure}")), params, secure, n);
        // Each round moves every site's update up (8 bytes a parameter: fixed-point words)
        // and the next model down (4 bytes a parameter).
        let moved = 3.0 * 12.0 * f.params as f64;
        let t = median(f.round_s[1..].to_vec());
        let raw = if params >= 1_000_000 {
            raw_quinn(8 * params)
        } else {
            f64::NAN
        };
        let model_mib = 4.0 * f.params as f64 / (1024.0 * 1024.0);
        println!(
            "  {:>11} params{}: round {:.3} s (median of {}; first {:.3} s), {:.0} MB/s moved{}; coordinator idle {:.1} MiB, peak {:.1} MiB = idle + {:.2}× the model",
            f.params,
            if f.secure { " secure" } else { " plain " },
            t,
            f.round_s.len() - 1,
            f.round_s[0],
            moved / 1e6 / t,
            if raw.is_nan() {
                String::new()
            } else {
                format!(
                    " ({:.0}% of one raw quinn stream's {:.0} MB/s, measured just after)",
                    100.0 * moved / 1e6 / t / raw,
                    raw
                )
            },
            f.idle_mib,
            f.peak_mib,
            (f.peak_mib - f.idle_mib) / model_mib,
        );
    }
    println!(
        "  Flower 1.42 on this kind of machine (the issue's anchors): 6.1 s a round for 1,000 parameters (deployment runtime); 28.6 s (legacy API 16.6 s) for 100 M parameters across 3 clients, 6.8-8 GB server memory (about 20× the model)"
    );
}
