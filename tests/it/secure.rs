//! Secure aggregation over the wire: four sites join a session, one disappears after sending
//! its keys, the coordinator aborts the session when it times out and restarts it with the
//! three that took their step; they send fresh masked vectors. Checked: each masked vector
//! the coordinator received looks like uniform noise (χ² on its words), the unmasked total
//! equals the plain sum of the three sites' aggregates, and the model is fitted from it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator::Hub;
use coordinator::store::Store;
use node::federation::aggregate;
use node::federation::session::Site;
use protocol::aggregate::{Cell, ConformanceSummary, ProfileCheck};
use protocol::{Message, MessageId, SchemaDocument, SiteId};

use crate::federation::{deidentify, node_config, runtime, schema_text, start_service, test_pki};

fn crl_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).expect("crl");
    CertificateRevocationListDer::pem_slice_iter(&pem)
        .next()
        .expect("a crl")
        .expect("valid")
        .as_ref()
        .to_vec()
}

/// χ² of the top four bits of each word against the uniform distribution (15 df).
fn chi_square_top_bits(words: &[u64]) -> f64 {
    let mut bins = [0f64; 16];
    for w in words {
        bins[(w >> 60) as usize] += 1.0;
    }
    let e = words.len() as f64 / 16.0;
    bins.iter().map(|o| (o - e) * (o - e) / e).sum()
}

#[test]
fn secure_sum_survives_a_dropout_and_reveals_only_the_total() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let names = ["site-a", "site-b", "site-c", "site-d"];
    let (pki, coord) = test_pki(&pki_dir, &names);
    let read = |p: &Path| std::fs::read(p).expect("read");
    let text = schema_text(5, 1).replace(
        "min_cell_count = 5",
        "min_cell_count = 5\nsecure_aggregation = true",
    );
    let doc = SchemaDocument::new(&text).expect("schema");
    let schema = doc.schema().expect("parse");
    let members: Vec<SiteId> = names.iter().map(|n| SiteId::new(n).expect("id")).collect();
    let mut hub = Hub::new(
        members,
        Store::in_memory().expect("store"),
        Some(doc.clone()),
        None,
    )
    .expect("hub");
    hub.set_secure_timeout(3);
    // The coordinator relays the consortium's revocation list with the peer keys.
    hub.set_crl(crl_der(&pki.crl_path()));
    let tap = hub.tap();
    let hub = Arc::new(Mutex::new(hub));
    rt.block_on(async {
        let service = start_service(&pki, &coord, hub.clone());
        let addr = service.local_addr().expect("addr");
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");

        // Site d joins, acknowledges, sends its keys for the session, and disappears.
        let d = SiteId::new("site-d").expect("id");
        let cfg = node::federation::client_config(
            &read(&pki.ca_cert_path()),
            &read(&pki_dir.join("sites/site-d.crt")),
            &read(&pki_dir.join("sites/site-d.key")),
        )
        .expect("client");
        let hello = protocol::Hello {
            id: MessageId(1),
            min_version: protocol::PROTOCOL_VERSION,
            max_version: protocol::PROTOCOL_VERSION,
            site: d.clone(),
            schema: None,
        };
        let (conn, _) = node::federation::connect(&endpoint, cfg, addr, "localhost", hello)
            .await
            .expect("welcomed");
        let ack = Message::SchemaAck(Box::new(protocol::SchemaAck {
            id: MessageId(2),
            schema: doc.hash(),
            profile: ProfileCheck { missing: vec![] },
            conformance: ConformanceSummary {
                patients: Cell::Value(0),
                status: [Cell::Value(0); 3],
                deviations: vec![Cell::Value(0); schema.data_of_interest.constraints.len()],
                findings: [Cell::Value(0); 3],
                quarantined: Cell::Value(0),
            },
        }));
        let r = node::federation::request(&conn, &ack).await.expect("ack");
        assert!(matches!(r, Message::Ack { .. }), "{r:?}");

        // The three real sites run as services.
        let mut sites = Vec::new();
        let mut facts = Vec::new();
        for (name, profile) in names[..3].iter().zip(node::sample::consortium_sites(6)) {
            let input = dir.path().join(format!("{name}-in"));
            node::sample::write_site_archive(&input, &profile).expect("archive");
            let mut config = node_config(&dir.path().join(name), name, &pki_dir, &addr.to_string());
            if let Some(f) = config.federation.as_mut() {
                f.poll_seconds = 1;
            }
            deidentify(&config, &input);
            facts.push(aggregate::collect(&config.data_dir.join("deid"), &schema).expect("facts"));
            sites.push(Site::new(&config, config.data_dir.join("deid")).expect("site"));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let service_of = |i: usize| {
            let mut rx = stop_rx.clone();
            let endpoint = endpoint.clone();
            let site = &sites[i];
            async move {
                site.run(&endpoint, async move {
                    let _ = rx.changed().await;
                })
                .await
            }
        };
        let drive = async {
            // d: join the first session and send keys once it opens, then vanish.
            let session = loop {
                let r = node::federation::request(
                    &conn,
                    &Message::SecureJoin {
                        id: MessageId(3),
                        schema: doc.hash(),
                        round: 1,
                    },
                )
                .await
                .expect("join");
                match r {
                    Message::SecureSession(s) => break s,
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            assert_eq!(session.participants.len(), 4);
            let (_keys, publics) =
                node::federation::secure::SessionKeys::generate(&d, &session.participants)
                    .expect("keys");
            let signer = node::federation::secure::Signer::from_pem(
                &read(&pki_dir.join("sites/site-d.crt")),
                &read(&pki_dir.join("sites/site-d.key")),
            )
            .expect("signer");
            let statement = protocol::secure::key_statement(
                &doc.hash(),
                1,
                session.session,
                &session.participants,
                &d,
                &publics,
            );
            let r = node::federation::request(
                &conn,
                &Message::SecureKeys(Box::new(protocol::SecureKeys {
                    id: MessageId(4),
                    schema: doc.hash(),
                    round: 1,
                    session: session.session,
                    keys: publics,
                    certificate: signer.certificate().to_vec(),
                    signature: signer.sign(&statement).expect("sign"),
                })),
            )
            .await
            .expect("keys sent");
            assert!(matches!(r, Message::Ack { .. }), "{r:?}");
            conn.close(0u32.into(), b"gone");
            // The others finish without it once the session is restarted.
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                let done = hub
                    .lock()
                    .expect("hub")
                    .store()
                    .latest_model()
                    .expect("model")
                    .is_some();
                if done && sites.iter().all(|s| s.state().model == 1) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the secure round did not complete"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = stop_tx.send(true);
            session.session
        };
        let (first_session, (), (), ()) =
            tokio::join!(drive, service_of(0), service_of(1), service_of(2));

        // The total: exactly the plain sum of the three sites' aggregates.
        let (summed, total) = hub
            .lock()
            .expect("hub")
            .store()
            .secure_total(&doc.hash(), 1)
            .expect("total")
            .expect("a secure total");
        assert_eq!(
            summed,
            vec![
                SiteId::new("site-a").expect("id"),
                SiteId::new("site-b").expect("id"),
                SiteId::new("site-c").expect("id"),
            ]
        );
        let mut plain = vec![0u64; protocol::secure::vector_len(&schema)];
        for f in &facts {
            let a = aggregate::aggregates(f, &schema, 5);
            protocol::secure::add_into(&mut plain, &protocol::secure::encode(&a, &schema));
        }
        let expected = protocol::secure::decode(&plain, &schema, 3, 5).expect("decode");
        assert_eq!(total.aggregates.counts, expected.aggregates.counts);
        assert_eq!(total.aggregates.histograms, expected.aggregates.histograms);
        assert_eq!(total.aggregates.nyul, expected.aggregates.nyul);
        assert_eq!(total.aggregates.patients, Cell::Value(18));
        let model = hub
            .lock()
            .expect("hub")
            .store()
            .latest_model()
            .expect("m")
            .expect("model");
        assert_eq!(model.sites.len(), 3);

        // What the coordinator saw of each site: masked vectors that look uniform. Two
        // sessions' worth from a, b and c (the first aborted, the second summed).
        let frames = tap.lock().expect("tap").clone();
        let vectors: Vec<(u32, Vec<u64>)> = frames
            .iter()
            .filter_map(|f| match protocol::decode_frame(f) {
                Ok((Message::MaskedReport(m), _)) => Some((m.session, m.vector)),
                _ => None,
            })
            .collect();
        assert!(vectors.iter().any(|(s, _)| *s == first_session));
        assert!(vectors.iter().any(|(s, _)| *s > first_session), "restarted");
        assert!(vectors.len() >= 6, "{} masked vectors", vectors.len());
        for (_, v) in &vectors {
            // χ² with 15 df: the 99.9th percentile is 37.7.
            let chi = chi_square_top_bits(v);
            assert!(chi < 37.7, "a masked vector is not uniform: χ² = {chi}");
        }
        // The same test tells an unmasked vector apart.
        assert!(chi_square_top_bits(&plain) > 37.7);
        service.endpoint.close(0u32.into(), b"test over");
    });
}

/// A coordinator that lies cannot make a site mask for keys it chose: an empty or short
/// participant list, a substituted key, a key set signed for another participant list, a
/// certificate of another consortium, a revoked certificate or one naming another site are
/// all refused before anything is masked.
#[test]
fn a_site_masks_only_for_verified_peers() {
    use node::federation::secure::{MaskContext, PeerKeyError, SessionKeys, Signer, verify_peers};
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let names = ["site-a", "site-b", "site-c", "site-d"];
    let (pki, _) = test_pki(&pki_dir, &names);
    let read = |p: &Path| std::fs::read(p).expect("read");
    let id = |n: &str| SiteId::new(n).expect("id");
    let participants: Vec<SiteId> = names[..3].iter().map(|n| id(n)).collect();
    let context = MaskContext {
        schema: protocol::SchemaHash([7; 32]),
        round: 1,
        session: 2,
    };
    let signer = |n: &str| {
        Signer::from_pem(
            &read(&pki_dir.join(format!("sites/{n}.crt"))),
            &read(&pki_dir.join(format!("sites/{n}.key"))),
        )
        .expect("signer")
    };
    let signed_by = |n: &str, as_site: &str, list: &[SiteId]| {
        let (_, publics) = SessionKeys::generate(&id(as_site), list).expect("keys");
        let s = signer(n);
        let statement = protocol::secure::key_statement(
            &context.schema,
            context.round,
            context.session,
            list,
            &id(as_site),
            &publics,
        );
        protocol::secure::SignedKeys {
            site: id(as_site),
            certificate: s.certificate().to_vec(),
            keys: publics,
            signature: s.sign(&statement).expect("sign"),
        }
    };
    let ca = read(&pki.ca_cert_path());
    let crl = vec![crl_der(&pki.crl_path())];
    let me = id("site-a");
    let honest = vec![
        signed_by("site-b", "site-b", &participants),
        signed_by("site-c", "site-c", &participants),
    ];
    let keys = verify_peers(&ca, &crl, &me, &participants, &context, &honest).expect("honest");
    assert_eq!(keys.len(), 2);
    let check = |list: &[SiteId], signed: &[protocol::secure::SignedKeys], crl: &[Vec<u8>]| {
        verify_peers(&ca, crl, &me, list, &context, signed)
    };
    // Empty and two-site participant lists.
    assert!(matches!(
        check(&[], &[], &crl),
        Err(PeerKeyError::TooFew(0))
    ));
    assert!(matches!(
        check(&participants[..2], &honest[..1], &crl),
        Err(PeerKeyError::TooFew(2))
    ));
    // This site left out.
    let others: Vec<SiteId> = names[1..].iter().map(|n| id(n)).collect();
    assert!(matches!(
        check(&others, &honest, &crl),
        Err(PeerKeyError::NotAParticipant)
    ));
    // A participant's keys missing.
    assert!(matches!(
        check(&participants, &honest[..1], &crl),
        Err(PeerKeyError::Missing(_))
    ));
    // The coordinator substitutes its own key for site-b's.
    let mut substituted = honest.clone();
    substituted[0].keys[0].public = [9; 32];
    assert!(matches!(
        check(&participants, &substituted, &crl),
        Err(PeerKeyError::Signature(_))
    ));
    // site-b signed for another participant list (a partition of the consortium).
    let with_d: Vec<SiteId> = names.iter().map(|n| id(n)).collect();
    let partitioned = vec![
        signed_by("site-b", "site-b", &with_d),
        signed_by("site-c", "site-c", &participants),
    ];
    assert!(matches!(
        check(&participants, &partitioned, &crl),
        Err(PeerKeyError::Signature(_))
    ));
    // site-d's certificate presented as site-b's.
    let impostor = vec![
        signed_by("site-d", "site-b", &participants),
        signed_by("site-c", "site-c", &participants),
    ];
    assert!(matches!(
        check(&participants, &impostor, &crl),
        Err(PeerKeyError::WrongName(_))
    ));
    // A certificate of another consortium.
    let other = coordinator::pki::Pki::at(&dir.path().join("other"));
    other.init("other").expect("init");
    let stranger = other.issue_site("site-b", 30).expect("issue");
    let s = Signer::from_pem(
        &read(&stranger.certificate),
        &read(stranger.key.as_ref().expect("key")),
    )
    .expect("signer");
    let mut foreign = honest.clone();
    foreign[0].certificate = s.certificate().to_vec();
    assert!(matches!(
        check(&participants, &foreign, &crl),
        Err(PeerKeyError::Certificate(..))
    ));
    // No revocation list at all: refused rather than unchecked.
    assert!(matches!(
        check(&participants, &honest, &[]),
        Err(PeerKeyError::NoCrl)
    ));
    // site-c revoked: its keys are refused once the new CRL is known.
    pki.revoke("site-c").expect("revoke");
    let fresh = vec![crl_der(&pki.crl_path())];
    assert!(matches!(
        check(&participants, &honest, &fresh),
        Err(PeerKeyError::Certificate(..))
    ));
}
