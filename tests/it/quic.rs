//! The coordinator's QUIC service and a node's dial-out, with a throw-away consortium CA:
//! mutual TLS 1.3, the fingerprint registry, revocation, and the refusals, each leaving the
//! coordinator serving the others.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator::Hub;
use coordinator::net::{Service, server_config, site_fingerprints};
use coordinator::pki::Pki;
use coordinator::store::Store;
use node::federation::{ConnectError, client_config, connect};
use protocol::{HandshakeReject, Hello, MessageId, PROTOCOL_VERSION, SiteId};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn hello(site: &str) -> Hello {
    Hello {
        id: MessageId(7),
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        site: SiteId::new(site).expect("site id"),
        schema: None,
    }
}

struct Site {
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn site(pki: &Pki, name: &str) -> Site {
    let f = pki.issue_site(name, 30).expect("issue site");
    Site {
        cert: read(&f.certificate),
        key: read(&f.key.expect("key")),
    }
}

async fn dial(
    addr: SocketAddr,
    ca: &[u8],
    s: &Site,
    server_name: &str,
    claim: &str,
) -> Result<(), ConnectError> {
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    let cfg = client_config(ca, &s.cert, &s.key)?;
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        connect(&endpoint, cfg, addr, server_name, hello(claim)),
    )
    .await
    .map_err(|_| ConnectError::NotWelcomed("timed out".into()))?;
    result.map(|(conn, w)| {
        assert_eq!(w.reply_to, MessageId(7));
        conn.close(0u32.into(), b"done");
    })
}

/// Client TLS that presents no certificate at all.
fn no_certificate_tls(ca: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c.expect("CA pem")).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![protocol::ALPN.to_vec()];
    tls
}

/// A client that presents no certificate at all.
async fn dial_without_certificate(addr: SocketAddr, ca: &[u8]) -> Result<(), ConnectError> {
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(no_certificate_tls(ca)).expect("quic");
    let cfg = quinn::ClientConfig::new(Arc::new(quic));
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    tokio::time::timeout(
        Duration::from_secs(10),
        connect(&endpoint, cfg, addr, "localhost", hello("site-a")),
    )
    .await
    .map_err(|_| ConnectError::NotWelcomed("timed out".into()))?
    .map(|_| ())
}

/// Dial the TCP fallback with `tls` and say hello as `claim`.
async fn dial_tcp(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    server_name: &str,
    claim: &str,
) -> Result<node::federation::Link, ConnectError> {
    tokio::time::timeout(
        Duration::from_secs(10),
        node::federation::connect_tcp(Arc::new(tls), addr, server_name, hello(claim)),
    )
    .await
    .map_err(|_| ConnectError::NotWelcomed("timed out".into()))?
    .map(|(link, w)| {
        assert_eq!(w.reply_to, MessageId(7));
        link
    })
}

#[test]
fn every_refusal_holds_over_the_tcp_fallback() {
    let rt = crate::federation::runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, coord) = crate::federation::test_pki(&dir.path().join("pki"), &[]);
        let a = site(&pki, "site-a");
        let b = site(&pki, "site-b");
        let c = site(&pki, "site-c");
        pki.revoke("site-c").expect("revoke");
        let old = pki.issue_site("site-x", -1).expect("expired");
        let expired = Site {
            cert: read(&old.certificate),
            key: read(&old.key.expect("key")),
        };
        let ca = read(&pki.ca_cert_path());
        let hub = Hub::new(
            ["site-a", "site-b", "site-c", "site-x"].map(|s| SiteId::new(s).expect("id")),
            Store::in_memory().expect("store"),
            None,
            None,
        )
        .expect("hub");
        let hub = Arc::new(Mutex::new(hub));
        let sites = Arc::new(std::sync::RwLock::new(site_fingerprints(
            &pki.issued().expect("issued"),
            now(),
        )));
        let tls = coordinator::net::server_tls(
            &ca,
            &read(&pki.crl_path()),
            &read(&coord.certificate),
            &read(&coord.key.clone().expect("key")),
        )
        .expect("server tls");
        let service = coordinator::net::TcpService::start(
            tls,
            "127.0.0.1:0".parse().expect("addr"),
            hub.clone(),
            sites,
        )
        .await
        .expect("tcp service");
        let addr = service.local_addr();
        let tls_of = |s: &Site| node::federation::client_tls(&ca, &s.cert, &s.key).expect("tls");

        let link = dial_tcp(addr, tls_of(&a), "localhost", "site-a")
            .await
            .expect("site-a is welcomed over TCP");
        // An oversize frame on the welcomed connection gets a typed error; it still answers.
        let mut huge = protocol::encode_frame(&protocol::Message::FetchSchema { id: MessageId(9) })
            .expect("encode");
        huge.truncate(7);
        huge[..4].copy_from_slice(&(3u32 + 5000).to_be_bytes());
        huge.extend_from_slice(&[0u8; 5000]);
        let bad = link.request_frame(&huge).await.expect("answered");
        let (m, _) = protocol::decode_frame(&bad).expect("a typed answer");
        assert!(
            matches!(
                m,
                protocol::Message::Error {
                    code: protocol::ErrorCode::BadFrame,
                    ..
                }
            ),
            "{m:?}"
        );
        let answer = link
            .request(&protocol::Message::FetchSchema { id: MessageId(10) })
            .await
            .expect("answer");
        assert!(
            matches!(
                answer,
                protocol::Message::Error {
                    code: protocol::ErrorCode::NotReady,
                    ..
                }
            ),
            "no schema published: {answer:?}"
        );
        link.close().await;
        for (what, result) in [
            (
                "revoked",
                dial_tcp(addr, tls_of(&c), "localhost", "site-c").await,
            ),
            (
                "expired",
                dial_tcp(addr, tls_of(&expired), "localhost", "site-x").await,
            ),
            (
                "another site's name",
                dial_tcp(addr, tls_of(&b), "localhost", "site-a").await,
            ),
            (
                "no certificate",
                dial_tcp(addr, no_certificate_tls(&ca), "localhost", "site-a").await,
            ),
            (
                "wrong server name",
                dial_tcp(addr, tls_of(&b), "coordinator.example.org", "site-b").await,
            ),
        ] {
            assert!(result.is_err(), "{what}: welcomed over TCP");
        }
        let other = Pki::at(&dir.path().join("other"));
        other.init("other").expect("other");
        let stranger = site(&other, "site-b");
        assert!(
            dial_tcp(addr, tls_of(&stranger), "localhost", "site-b")
                .await
                .is_err(),
            "another CA: welcomed over TCP"
        );
        dial_tcp(addr, tls_of(&b), "localhost", "site-b")
            .await
            .expect("after all that, site-b is welcomed");
        service.close();
    });
}

#[test]
fn sites_are_welcomed_over_mutual_tls_and_every_refusal_leaves_the_coordinator_serving() {
    let rt = crate::federation::runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, coord) = crate::federation::test_pki(&dir.path().join("pki"), &[]);
        let a = site(&pki, "site-a");
        let b = site(&pki, "site-b");
        let c = site(&pki, "site-c");
        let site_e = site(&pki, "site-e");
        pki.revoke("site-c").expect("revoke");
        let ca = read(&pki.ca_cert_path());
        let issued = pki.issued().expect("issued");
        let sites = site_fingerprints(&issued, now());
        assert_eq!(sites.len(), 3, "the revoked site is not in the registry");
        let old = pki
            .issue_site("site-x", -1)
            .expect("an expired certificate");
        let expired = Site {
            cert: read(&old.certificate),
            key: read(&old.key.expect("key")),
        };
        let hub = Hub::new(
            ["site-a", "site-b", "site-c", "site-e", "site-x"].map(|s| SiteId::new(s).expect("id")),
            Store::in_memory().expect("store"),
            None,
            None,
        )
        .expect("hub");
        let registry = Arc::new(Mutex::new(hub));
        let config = server_config(
            &ca,
            &read(&pki.crl_path()),
            &read(&coord.certificate),
            &read(&coord.key.clone().expect("key")),
        )
        .expect("server config");
        let service = Service::start(
            config,
            "127.0.0.1:0".parse().expect("addr"),
            registry.clone(),
            sites,
        )
        .expect("service");
        let addr = service.local_addr().expect("addr");

        dial(addr, &ca, &a, "localhost", "site-a")
            .await
            .expect("site-a is welcomed");
        let contact = |name: &str| {
            registry
                .lock()
                .expect("registry")
                .registry()
                .site(&SiteId::new(name).expect("id"))
                .and_then(|s| s.last_contact)
        };
        assert!(
            contact("site-a").is_some(),
            "the registry saw site-a's hello"
        );
        // Revoked: the CRL refuses the certificate during the handshake.
        let e = dial(addr, &ca, &c, "localhost", "site-c").await;
        assert!(matches!(e, Err(ConnectError::NotWelcomed(_))), "{e:?}");
        // A site claiming another's identity.
        let e = dial(addr, &ca, &b, "localhost", "site-a").await;
        assert!(
            matches!(e, Err(ConnectError::Rejected(HandshakeReject::UnknownSite))),
            "{e:?}"
        );
        // Expired: refused during the handshake.
        let e = dial(addr, &ca, &expired, "localhost", "site-x").await;
        assert!(matches!(e, Err(ConnectError::NotWelcomed(_))), "{e:?}");
        // On a welcomed connection: an oversize frame and a frame of an unknown protocol
        // version get a typed error, and the same connection still answers.
        {
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr"))
                .expect("client endpoint");
            let cfg = client_config(&ca, &site_e.cert, &site_e.key).expect("client config");
            let (conn, _) = connect(&endpoint, cfg, addr, "localhost", hello("site-e"))
                .await
                .expect("welcomed");
            let mut oversize = Vec::new();
            oversize.extend_from_slice(&(3u32 + 4096).to_be_bytes());
            oversize.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            oversize.push(0x01);
            oversize.extend_from_slice(&[0u8; 4096]);
            let mut wrong_version =
                protocol::encode_frame(&protocol::Message::Hello(hello("site-e"))).expect("encode");
            wrong_version[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
            for frame in [oversize, wrong_version] {
                let (mut send, mut recv) = conn.open_bi().await.expect("stream");
                send.write_all(&frame).await.expect("write");
                send.finish().expect("finish");
                let answer =
                    tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
                        .await
                        .expect("answered in time")
                        .expect("stream ends");
                let (m, _) = protocol::decode_frame(&answer).expect("a typed answer");
                assert!(
                    matches!(
                        m,
                        protocol::Message::Error {
                            code: protocol::ErrorCode::BadFrame,
                            reply_to: None,
                            ..
                        }
                    ),
                    "{m:?}"
                );
            }
            let again =
                node::federation::request(&conn, &protocol::Message::Hello(hello("site-e")))
                    .await
                    .expect("the connection survives");
            assert!(matches!(again, protocol::Message::Welcome(_)), "{again:?}");
            // A hello that asks for protocol versions the coordinator does not speak.
            let mut future = hello("site-e");
            future.id = MessageId(8);
            future.min_version = PROTOCOL_VERSION + 1;
            future.max_version = PROTOCOL_VERSION + 1;
            let answer = node::federation::request(&conn, &protocol::Message::Hello(future))
                .await
                .expect("answered");
            assert!(
                matches!(
                    answer,
                    protocol::Message::Reject {
                        reason: HandshakeReject::UnsupportedVersion { .. },
                        ..
                    }
                ),
                "{answer:?}"
            );
            conn.close(0u32.into(), b"done");
        }
        // No client certificate at all.
        let e = dial_without_certificate(addr, &ca).await;
        assert!(matches!(e, Err(ConnectError::NotWelcomed(_))), "{e:?}");
        // A certificate from another consortium's CA.
        let other = Pki::at(&dir.path().join("other"));
        other.init("other").expect("other");
        let stranger = site(&other, "site-b");
        let e = dial(addr, &ca, &stranger, "localhost", "site-b").await;
        assert!(matches!(e, Err(ConnectError::NotWelcomed(_))), "{e:?}");
        // The wrong server name.
        let e = dial(addr, &ca, &b, "coordinator.example.org", "site-b").await;
        assert!(matches!(e, Err(ConnectError::NotWelcomed(_))), "{e:?}");
        assert!(
            contact("site-c").is_none() && contact("site-x").is_none(),
            "the revoked and the expired site never reached the registry"
        );
        // After all of that, the coordinator still serves the others.
        dial(addr, &ca, &b, "localhost", "site-b")
            .await
            .expect("site-b is welcomed");
        assert!(contact("site-b").is_some());

        // A site certificate cannot act as the coordinator: nodes refuse it.
        let imposter = pki.issue_site("site-d", 30).expect("site-d");
        let config = server_config(
            &ca,
            &read(&pki.crl_path()),
            &read(&imposter.certificate),
            &read(&imposter.key.expect("key")),
        )
        .expect("server config");
        let fake = Service::start(
            config,
            "127.0.0.1:0".parse().expect("addr"),
            registry.clone(),
            site_fingerprints(&pki.issued().expect("issued"), now()),
        )
        .expect("fake service");
        let e = dial(
            fake.local_addr().expect("addr"),
            &ca,
            &a,
            "site-d",
            "site-a",
        )
        .await;
        assert!(matches!(e, Err(ConnectError::NotWelcomed(_))), "{e:?}");
        service.endpoint.close(0u32.into(), b"test over");
        fake.endpoint.close(0u32.into(), b"test over");
    });
}
