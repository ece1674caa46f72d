//! Federation benchmark: `cargo bench -p tests --bench federation`.
//!
//! On loopback, with a throw-away CA:
//! - handshakes per second: QUIC connect + mutual TLS 1.3 + hello/welcome, against the bare
//!   TLS 1.3 handshake with the same certificates in memory (rustls, no network) as baseline;
//! - aggregate reports per second from 100 simulated sites reporting at once (each with the
//!   example schema's statistics and a full 4096-bin CT histogram), against the coordinator's
//!   logic handling the same reports in process (no network) as baseline;
//! - the process's resident memory after 10 and after 100 sites, to show it stays bounded.
//!
//! Under `cargo test` (no `--bench` argument) it runs a small version as a smoke test.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator::Hub;
use coordinator::net::{server_config, server_tls, site_fingerprints};
use coordinator::pki::Pki;
use coordinator::store::Store;
use node::federation::{client_config, client_tls, connect, request};
use protocol::aggregate::{
    Cell, ConformanceSummary, CountTable, CtRelease, Moments, NyulRelease, ProfileCheck,
    SiteAggregates, add_cells,
};
use protocol::schema::CurationSchema;
use protocol::summary::{CT_HU_BINS, CtSummary, NyulSummary};
use protocol::{
    AggregateReport, Hello, Message, MessageId, PROTOCOL_VERSION, SchemaAck, SchemaDocument, SiteId,
};

const SCHEMA: &str = include_str!("../../deploy/schema.toml");

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Peak and current resident set size of this process, in MiB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn hello(site: &SiteId) -> Hello {
    Hello {
        id: MessageId(1),
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        site: site.clone(),
        schema: None,
    }
}

/// A site's aggregates in the shape the schema asks for, with a full CT histogram.
fn aggregates(schema: &CurationSchema, seed: u64) -> SiteAggregates {
    let mut ct = CtSummary::default();
    for (i, b) in ct.histogram.iter_mut().enumerate() {
        *b = (i as u64 * 2654435761 + seed) % 5000;
    }
    ct.count = ct.histogram.iter().sum();
    ct.sum = 123_456_789 + seed as i64;
    ct.sum_squares = 987_654_321;
    assert_eq!(ct.histogram.len(), CT_HU_BINS);
    let m = Moments::of(
        &(0..40)
            .map(|i| f64::from(i) + seed as f64)
            .collect::<Vec<_>>(),
        10,
    );
    SiteAggregates {
        k: schema.privacy.min_cell_count,
        patients: Cell::Value(40),
        series: Cell::Value(80),
        counts: schema
            .statistics
            .counts_by
            .iter()
            .map(|v| {
                let mut cells = vec![Cell::Value(0); schema.count_table_len(v)];
                cells[0] = Cell::Value(40);
                CountTable { cells }
            })
            .collect(),
        histograms: schema
            .statistics
            .histograms
            .iter()
            .map(|h| {
                let mut c = vec![Cell::Value(0); h.edges.len() + 1];
                c[1] = Cell::Value(40);
                c
            })
            .collect(),
        moments: schema
            .moment_quantities()
            .into_iter()
            .map(|q| (q, m))
            .collect(),
        nyul: Some(NyulRelease {
            patients: 40,
            summary: NyulSummary {
                // 40 volumes whose mean landmarks rise from 1 to 99 (plausible), shifted by the
                // seed in micro-units so that sites differ.
                landmark_sums: std::array::from_fn(|i| {
                    protocol::summary::to_fixed(40.0 * (1.0 + 9.8 * i as f64))
                        + (seed % 1000) as i64
                }),
                volumes: 40,
            },
        }),
        ct: Some(CtRelease {
            patients: 40,
            trimmed: false,
            summary: ct,
        }),
        noise: None,
    }
}

fn ack(schema: &CurationSchema, doc: &SchemaDocument) -> Message {
    Message::SchemaAck(Box::new(SchemaAck {
        id: MessageId(2),
        schema: doc.hash(),
        profile: ProfileCheck { missing: vec![] },
        conformance: ConformanceSummary {
            patients: Cell::Value(80),
            status: [Cell::Value(80), Cell::Value(0), Cell::Value(0)],
            deviations: vec![Cell::Value(0); schema.data_of_interest.constraints.len()],
            findings: [Cell::Value(0); 3],
            quarantined: Cell::Value(0),
        },
    }))
}

fn report(schema: &CurationSchema, doc: &SchemaDocument, seed: u64) -> Message {
    Message::Report(Box::new(AggregateReport {
        id: MessageId(3),
        schema: doc.hash(),
        round: 1,
        aggregates: aggregates(schema, seed),
    }))
}

/// One bare TLS 1.3 handshake with client authentication, in memory.
fn memory_handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut c = rustls::ClientConnection::new(client.clone(), name).expect("client");
    let mut s = rustls::ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client write");
        }
        let mut r = &buf[..];
        while !r.is_empty() {
            s.read_tls(&mut r).expect("server read");
        }
        s.process_new_packets().expect("server process");
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server write");
        }
        let mut r = &buf[..];
        while !r.is_empty() {
            c.read_tls(&mut r).expect("client read");
        }
        c.process_new_packets().expect("client process");
    }
}

/// A schema with about `cells` histogram cells: intensity histograms of the largest size a
/// schema may ask for, repeated.
fn wide_schema(cells: usize) -> String {
    let per = protocol::aggregate::MAX_HISTOGRAM_CELLS;
    let edges: Vec<String> = (0..per - 1).map(|i| format!("{}.0", i * 10)).collect();
    let one = format!(
        "\n[[statistics.histograms]]\nquantity = \"intensity\"\nedges = [{}]\n",
        edges.join(", ")
    );
    let mut text = SCHEMA.to_owned();
    for _ in 0..cells.div_ceil(per) {
        text.push_str(&one);
    }
    text
}

/// Per-site and coordinator cost of one round, plain and secure, in process.
fn secure_cost(n_sites: usize, cells: usize) -> (f64, f64, f64, f64, usize, usize) {
    use node::federation::secure::{MaskContext, SessionKeys};
    let text = wide_schema(cells);
    let doc = SchemaDocument::new(&text).expect("wide schema");
    let schema = doc.schema().expect("schema");
    let sites: Vec<SiteId> = (0..n_sites)
        .map(|i| SiteId::new(&format!("s{i:03}")).expect("id"))
        .collect();
    let aggs: Vec<SiteAggregates> = (0..n_sites)
        .map(|i| {
            let mut a = aggregates(&schema, i as u64);
            for c in a.histograms.iter_mut().flatten() {
                *c = Cell::Value(10 + i as u64);
            }
            a
        })
        .collect();
    // Plain: each site encodes its report; the coordinator decodes and adds them.
    let t = Instant::now();
    let frames: Vec<Vec<u8>> = aggs
        .iter()
        .map(|a| {
            protocol::encode_frame(&Message::Report(Box::new(AggregateReport {
                id: MessageId(1),
                schema: doc.hash(),
                round: 1,
                aggregates: a.clone(),
            })))
            .expect("frame")
        })
        .collect();
    let plain_site = t.elapsed().as_secs_f64() / n_sites as f64;
    let plain_bytes = frames[0].len();
    let t = Instant::now();
    let mut pooled: Vec<Vec<Option<u64>>> = vec![Vec::new(); schema.statistics.histograms.len()];
    for f in &frames {
        if let Ok((Message::Report(r), _)) = protocol::decode_frame(f) {
            for (p, h) in pooled.iter_mut().zip(&r.aggregates.histograms) {
                add_cells(p, h);
            }
        }
    }
    let plain_coord = t.elapsed().as_secs_f64();
    assert!(pooled.iter().map(Vec::len).sum::<usize>() >= cells);
    // Secure: keys per peer, agreements, PRG, masking; the coordinator sums and decodes.
    let ctx = MaskContext {
        schema: doc.hash(),
        round: 1,
        session: 1,
    };
    let mut keys = Vec::new();
    let mut publics = Vec::new();
    let t = Instant::now();
    for s in &sites {
        let (k, p) = SessionKeys::generate(s, &sites).expect("keys");
        keys.push(k);
        publics.push(p);
    }
    let mut masked_frames = Vec::new();
    for (i, (s, k)) in sites.iter().zip(keys).enumerate() {
        let peers: Vec<protocol::secure::PeerKey> = sites
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, other)| protocol::secure::PeerKey {
                peer: other.clone(),
                public: publics[j]
                    .iter()
                    .find(|p| &p.peer == s)
                    .expect("key")
                    .public,
            })
            .collect();
        let vector = protocol::secure::encode(&aggs[i], &schema);
        let masked = k.mask(s, &peers, &ctx, &vector).expect("mask");
        masked_frames.push(
            protocol::encode_frame(&Message::MaskedReport(Box::new(protocol::MaskedReport {
                id: MessageId(1),
                schema: doc.hash(),
                round: 1,
                session: 1,
                k: 10,
                noise: None,
                vector: masked,
            })))
            .expect("frame"),
        );
    }
    let secure_site = t.elapsed().as_secs_f64() / n_sites as f64;
    let secure_bytes = masked_frames[0].len();
    let t = Instant::now();
    let mut sum = vec![0u64; protocol::secure::vector_len(&schema)];
    for f in &masked_frames {
        if let Ok((Message::MaskedReport(m), _)) = protocol::decode_frame(f) {
            protocol::secure::add_into(&mut sum, &m.vector);
        }
    }
    let total = protocol::secure::decode(&sum, &schema, n_sites as u32, 10).expect("decode");
    let secure_coord = t.elapsed().as_secs_f64();
    let expect: u64 = (0..n_sites as u64).map(|i| 10 + i).sum();
    assert_eq!(
        total.aggregates.histograms[0][5],
        Cell::Value(expect),
        "masks cancel"
    );
    (
        plain_site,
        secure_site,
        plain_coord,
        secure_coord,
        plain_bytes,
        secure_bytes,
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (n_sites, n_handshakes) = if full { (100, 300) } else { (4, 6) };
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("bench").expect("init");
    let coord = pki.issue_coordinator("localhost", 30).expect("coordinator");
    let sites: Vec<(SiteId, Vec<u8>, Vec<u8>)> = (0..n_sites)
        .map(|i| {
            let name = format!("site-{i:03}");
            let f = pki.issue_site(&name, 30).expect("site");
            (
                SiteId::new(&name).expect("id"),
                read(&f.certificate),
                read(f.key.as_ref().expect("key")),
            )
        })
        .collect();
    let ca = read(&pki.ca_cert_path());
    let crl = read(&pki.crl_path());
    let (cert, key) = (
        read(&coord.certificate),
        read(coord.key.as_ref().expect("key")),
    );
    let doc = SchemaDocument::new(SCHEMA).expect("schema");
    let schema = doc.schema().expect("schema");
    let members: Vec<SiteId> = sites.iter().map(|s| s.0.clone()).collect();

    // Baseline 1: bare TLS handshakes in memory.
    let client_mem = Arc::new(client_tls(&ca, &sites[0].1, &sites[0].2).expect("client tls"));
    let server_mem = Arc::new(server_tls(&ca, &crl, &cert, &key).expect("server tls"));
    let started = Instant::now();
    for _ in 0..n_handshakes {
        memory_handshake(&client_mem, &server_mem);
    }
    let tls_rate = n_handshakes as f64 / started.elapsed().as_secs_f64();

    // Baseline 2: the coordinator's logic on the same reports, no network.
    let mut hub = Hub::new(
        members.clone(),
        Store::open(&dir.path().join("baseline.sqlite")).expect("store"),
        Some(doc.clone()),
        None,
    )
    .expect("hub");
    let frames: Vec<(Vec<u8>, Vec<u8>)> = (0..n_sites)
        .map(|i| {
            (
                protocol::encode_frame(&ack(&schema, &doc)).expect("ack"),
                protocol::encode_frame(&report(&schema, &doc, i as u64)).expect("report"),
            )
        })
        .collect();
    let report_bytes = frames[0].1.len();
    let started = Instant::now();
    for ((site, _, _), (a, r)) in sites.iter().zip(&frames) {
        hub.handle(site, Message::Hello(hello(site)), now(), false);
        for f in [a, r] {
            let (m, _) = protocol::decode_frame(f).expect("decode");
            let answer = hub.handle_frame(site, f, m, now(), true);
            assert!(
                matches!(
                    answer.first(),
                    Some(coordinator::Action::Reply(Message::Ack { .. }))
                ),
                "{answer:?}"
            );
        }
    }
    let local_rate = n_sites as f64 / started.elapsed().as_secs_f64();
    drop(hub);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (quic_rate, report_rate, mem_10, mem_all, model, round_times) = rt.block_on(async {
        let hub = Hub::new(
            members.clone(),
            Store::open(&dir.path().join("coordinator.sqlite")).expect("store"),
            Some(doc.clone()),
            None,
        )
        .expect("hub");
        let hub = Arc::new(Mutex::new(hub));
        // The protocol's own cost: no per-site pacing or connection cap (a deployment's
        // `[limits]` would slow one site's burst of requests on purpose).
        let unlimited = coordinator::net::Limits {
            connections_per_site: usize::MAX,
            requests_per_second: 0.0,
            burst: f64::MAX,
        };
        let service = coordinator::net::Service::start_with(
            server_config(&ca, &crl, &cert, &key).expect("server"),
            "127.0.0.1:0".parse().expect("addr"),
            hub.clone(),
            site_fingerprints(&pki.issued().expect("issued"), now()),
            unlimited,
        )
        .expect("service");
        let addr = service.local_addr().expect("addr");
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");

        // Handshakes: connect, mutual TLS, hello/welcome; eight at a time.
        let started = Instant::now();
        let cfg = client_config(&ca, &sites[0].1, &sites[0].2).expect("client");
        let mut done = 0;
        while done < n_handshakes {
            let batch = (n_handshakes - done).min(8);
            let mut tasks = Vec::new();
            for _ in 0..batch {
                let (endpoint, cfg, site) = (endpoint.clone(), cfg.clone(), sites[0].0.clone());
                tasks.push(tokio::spawn(async move {
                    let (conn, _) = connect(&endpoint, cfg, addr, "localhost", hello(&site))
                        .await
                        .expect("welcomed");
                    conn.close(0u32.into(), b"done");
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
            done += batch;
        }
        let quic_rate = n_handshakes as f64 / started.elapsed().as_secs_f64();

        // One request/answer round on an established connection: QUIC vs the TCP fallback.
        let tcp = coordinator::net::TcpService::start_with(
            server_tls(&ca, &crl, &cert, &key).expect("tls"),
            "127.0.0.1:0".parse().expect("addr"),
            hub.clone(),
            service.sites(),
            unlimited,
        )
        .await
        .expect("tcp");
        let rounds = if full { 2000 } else { 20 };
        let (quic_link, _) = connect(
            &endpoint,
            client_config(&ca, &sites[0].1, &sites[0].2).expect("client"),
            addr,
            "localhost",
            hello(&sites[0].0),
        )
        .await
        .expect("quic");
        let quic_link = node::federation::Link::Quic(quic_link);
        let (tcp_link, _) = node::federation::connect_tcp(
            Arc::new(client_tls(&ca, &sites[0].1, &sites[0].2).expect("tls")),
            tcp.local_addr(),
            "localhost",
            hello(&sites[0].0),
        )
        .await
        .expect("tcp link");
        let mut round_times = Vec::new();
        for link in [&quic_link, &tcp_link] {
            let started = Instant::now();
            for i in 0..rounds {
                let a = link
                    .request(&Message::FetchSchema {
                        id: MessageId(100 + i),
                    })
                    .await
                    .expect("round");
                assert!(matches!(a, Message::Schema { .. }));
            }
            round_times.push(started.elapsed().as_secs_f64() / f64::from(rounds as u32) * 1e6);
            link.close().await;
        }
        tcp.close();

        // Every site connects first, then all report at once.
        let mut conns = Vec::new();
        for (site, c, k) in &sites {
            let cfg = client_config(&ca, c, k).expect("client");
            let (conn, _) = connect(&endpoint, cfg, addr, "localhost", hello(site))
                .await
                .expect("welcomed");
            let a = request(&conn, &ack(&schema, &doc)).await.expect("ack");
            assert!(matches!(a, Message::Ack { .. }), "{a:?}");
            conns.push(conn);
        }
        let reports: Vec<Message> = (0..n_sites)
            .map(|i| report(&schema, &doc, i as u64))
            .collect();
        let mut mem_10 = f64::NAN;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (i, (conn, m)) in conns.iter().zip(reports).enumerate() {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let a = request(&conn, &m).await.expect("report");
                assert!(matches!(a, Message::Ack { .. }), "site {i}: {a:?}");
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            t.await.expect("task");
            if i + 1 == 10.min(n_sites) {
                mem_10 = rss().1;
            }
        }
        let report_rate = n_sites as f64 / started.elapsed().as_secs_f64();
        let mem_all = rss().1;
        let model = hub
            .lock()
            .expect("hub")
            .store()
            .latest_model()
            .expect("model")
            .map(|m| m.sites.len());
        for c in conns {
            c.close(0u32.into(), b"done");
        }
        service.endpoint.close(0u32.into(), b"done");
        tokio::time::sleep(Duration::from_millis(50)).await;
        (quic_rate, report_rate, mem_10, mem_all, model, round_times)
    });
    assert_eq!(model, Some(n_sites), "the model merges every site");
    println!("federation benchmark ({n_sites} sites, {n_handshakes} handshakes, loopback)");
    println!(
        "handshakes/s  QUIC + mutual TLS 1.3 + hello/welcome {quic_rate:>9.0}   bare TLS 1.3 in memory {tls_rate:>9.0}   ratio {:.2}",
        quic_rate / tls_rate
    );
    println!(
        "reports/s     {n_sites} sites at once over QUIC         {report_rate:>9.0}   in-process handling  {local_rate:>9.0}   ratio {:.2}",
        report_rate / local_rate
    );
    println!("report size   {report_bytes} bytes on the wire (4096-bin CT histogram included)");
    println!(
        "memory        RSS after 10 sites {mem_10:.1} MiB, after {n_sites} sites {mem_all:.1} MiB, peak {:.1} MiB",
        rss().0
    );
    println!(
        "round time    one request/answer: QUIC {:.0} us, TCP fallback {:.0} us, ratio TCP/QUIC {:.2}",
        round_times[0],
        round_times[1],
        round_times[1] / round_times[0]
    );
    let cells = if full { 10_000 } else { 100 };
    for n in [3, if full { 30 } else { 4 }] {
        let (ps, ss, pc, sc, pb, sb) = secure_cost(n, cells);
        println!(
            "secure sum    {n:>2} sites, {cells}-cell histogram: per site {:.2} ms vs plain {:.3} ms ({:.0}x); coordinator {:.2} ms vs plain {:.2} ms ({:.1}x); {sb} vs {pb} bytes per site",
            ss * 1e3,
            ps * 1e3,
            ss / ps,
            sc * 1e3,
            pc * 1e3,
            sc / pc
        );
    }
}
