//! The consortium PKI, checked by a real third-party verifier: OpenSSL (installed by
//! scripts/test.sh) verifies chains, usages, names and the revocation list we produce.

use std::path::Path;
use std::process::Command;

use coordinator::pki::{Pki, PkiError, Role};

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl (installed by scripts/test.sh): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn ca_sites_and_coordinator_certificates_verify_with_the_right_usages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let ca = pki.ca_cert_path();
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir.path().join("pki/ca.key")), 0o600);
        assert_eq!(mode(&dir.path().join("pki")), 0o700);
    }
    assert!(
        matches!(pki.init("again"), Err(PkiError::CaExists(_))),
        "a second init must not overwrite the CA"
    );
    let (ok, text) = openssl(&[
        "x509",
        "-in",
        s(&ca),
        "-noout",
        "-ext",
        "basicConstraints,keyUsage",
    ]);
    assert!(
        ok && text.contains("CA:TRUE")
            && text.contains("Certificate Sign")
            && text.contains("CRL Sign"),
        "{text}"
    );

    let site = pki.issue_site("site-a", 30).expect("issue site");
    let key = site.key.clone().expect("the CA made the key");
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        s(&ca),
        "-purpose",
        "sslclient",
        s(&site.certificate),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        s(&ca),
        "-purpose",
        "sslserver",
        s(&site.certificate),
    ]);
    assert!(!ok, "a site certificate must not serve as a server: {text}");
    let (_, text) = openssl(&[
        "x509",
        "-in",
        s(&site.certificate),
        "-noout",
        "-subject",
        "-enddate",
        "-fingerprint",
        "-sha256",
    ]);
    assert!(text.contains("CN = site-a"), "{text}");
    let fp: String = text
        .lines()
        .find_map(|l| {
            l.split_once("Fingerprint=")
                .map(|(_, f)| f.replace(':', "").to_lowercase())
        })
        .expect("fingerprint line");
    assert_eq!(
        fp, site.record.fingerprint,
        "registry fingerprint is SHA-256 of the DER"
    );
    // The private key matches the certificate.
    let (_, pub_cert) = openssl(&["x509", "-in", s(&site.certificate), "-noout", "-pubkey"]);
    let (_, pub_key) = openssl(&["pkey", "-in", s(&key), "-pubout"]);
    assert_eq!(pub_cert, pub_key);

    let coord = pki
        .issue_coordinator("coord.example.org", 30)
        .expect("coordinator");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        s(&ca),
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "coord.example.org",
        s(&coord.certificate),
    ]);
    assert!(ok, "{text}");
    let (ok, _) = openssl(&[
        "verify",
        "-CAfile",
        s(&ca),
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "other.example.org",
        s(&coord.certificate),
    ]);
    assert!(!ok, "the coordinator certificate names only its own host");
    assert!(
        matches!(pki.issue_site("site-a", 30), Err(PkiError::Active(_))),
        "a second certificate for an active site needs revoke or renew"
    );
    for bad in ["../etc", "Site-A", "a.b", ""] {
        assert!(
            matches!(pki.issue_site(bad, 30), Err(PkiError::BadName(_))),
            "site names follow the protocol's SiteId: {bad:?}"
        );
    }
    assert!(matches!(
        pki.issue_coordinator("bad..host", 30),
        Err(PkiError::BadName(_))
    ));
    // A certificate from another CA does not verify against ours.
    let other = Pki::at(&dir.path().join("other"));
    other.init("other").expect("other CA");
    let stranger = other.issue_site("site-a", 30).expect("stranger");
    let (ok, _) = openssl(&["verify", "-CAfile", s(&ca), s(&stranger.certificate)]);
    assert!(!ok, "another consortium's certificate must not verify");
}

#[test]
fn a_site_request_is_signed_without_its_key_leaving_the_site() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let site_dir = dir.path().join("hospital");
    let (key, csr) = node::pki::write_site_request("site-b", &site_dir).expect("request");
    #[cfg(unix)]
    assert_eq!(mode(&key), 0o600);
    assert!(
        node::pki::write_site_request("site-b", &site_dir).is_err(),
        "the site's key is never silently replaced"
    );
    let pem = std::fs::read_to_string(&csr).expect("csr");
    assert!(
        matches!(
            pki.sign_request("site-c", &pem, 30),
            Err(PkiError::WrongSubject { .. })
        ),
        "a request for another site's name is refused"
    );
    let issued = pki.sign_request("site-b", &pem, 30).expect("sign");
    assert!(issued.key.is_none() && !issued.record.ca_made_key);
    for f in walk(&dir.path().join("pki")) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(
            !text.contains(&std::fs::read_to_string(&key).expect("key")),
            "{} holds the site key",
            f.display()
        );
    }
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        s(&pki.ca_cert_path()),
        "-purpose",
        "sslclient",
        s(&issued.certificate),
    ]);
    assert!(ok, "{text}");
    let (_, pub_cert) = openssl(&["x509", "-in", s(&issued.certificate), "-noout", "-pubkey"]);
    let (_, pub_key) = openssl(&["pkey", "-in", s(&key), "-pubout"]);
    assert_eq!(
        pub_cert, pub_key,
        "the certificate carries the site's own key"
    );
    // Renewal: same key, new serial and fingerprint; a request is needed because the CA has no key.
    assert!(matches!(
        pki.renew("site-b", Role::Site, None, 30),
        Err(PkiError::NeedsRequest(_))
    ));
    let renewed = pki
        .renew("site-b", Role::Site, Some(&pem), 60)
        .expect("renew");
    assert_ne!(renewed.record.fingerprint, issued.record.fingerprint);
    assert!(renewed.record.not_after > issued.record.not_after);
    let list = pki.issued().expect("issued");
    assert!(
        list.iter()
            .any(|i| i.fingerprint == issued.record.fingerprint && i.superseded)
    );
}

#[test]
fn a_renewal_with_a_new_key_stops_the_old_certificate_authenticating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let first_dir = dir.path().join("hospital-1");
    let (_, csr) = node::pki::write_site_request("site-b", &first_dir).expect("request");
    let old = pki
        .sign_request("site-b", &std::fs::read_to_string(&csr).expect("csr"), 30)
        .expect("sign");
    let old_copy = dir.path().join("old.crt");
    std::fs::copy(&old.certificate, &old_copy).expect("copy");
    // Same key: the old certificate stays valid until it expires (no outage at renewal).
    let same = pki
        .renew(
            "site-b",
            Role::Site,
            Some(&std::fs::read_to_string(&csr).expect("csr")),
            30,
        )
        .expect("renew, same key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let fps = coordinator::net::site_fingerprints(&pki.issued().expect("issued"), now);
    assert!(
        fps.contains_key(&old.record.fingerprint) && fps.contains_key(&same.record.fingerprint)
    );
    // A new key (the old one may be compromised): every earlier certificate is revoked.
    let second_dir = dir.path().join("hospital-2");
    let (_, csr2) = node::pki::write_site_request("site-b", &second_dir).expect("request");
    let new = pki
        .renew(
            "site-b",
            Role::Site,
            Some(&std::fs::read_to_string(&csr2).expect("csr")),
            30,
        )
        .expect("renew, new key");
    let fps = coordinator::net::site_fingerprints(&pki.issued().expect("issued"), now);
    assert!(fps.contains_key(&new.record.fingerprint));
    for superseded in [&old, &same] {
        assert!(
            !fps.contains_key(&superseded.record.fingerprint),
            "a certificate for the replaced key must not authenticate"
        );
    }
    // The TLS layer refuses it too: the re-signed CRL lists it.
    let verify = |cert: &Path| {
        openssl(&[
            "verify",
            "-crl_check",
            "-CRLfile",
            s(&pki.crl_path()),
            "-CAfile",
            s(&pki.ca_cert_path()),
            s(cert),
        ])
    };
    let (ok, text) = verify(&old_copy);
    assert!(!ok && text.contains("revoked"), "{text}");
    let (ok, text) = verify(&new.certificate);
    assert!(ok, "{text}");
}

#[test]
fn revocation_is_enforced_by_the_crl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::at(&dir.path().join("pki"));
    pki.init("test").expect("init");
    let a = pki.issue_site("site-a", 30).expect("a");
    let b = pki.issue_site("site-b", 30).expect("b");
    let ca = pki.ca_cert_path();
    let crl = pki.crl_path();
    let check = |cert: &Path| {
        openssl(&[
            "verify",
            "-crl_check",
            "-CRLfile",
            s(&crl),
            "-CAfile",
            s(&ca),
            s(cert),
        ])
    };
    assert!(check(&a.certificate).0, "{}", check(&a.certificate).1);
    assert_eq!(pki.revoke("site-a").expect("revoke"), 1);
    let (ok, text) = check(&a.certificate);
    assert!(!ok && text.contains("revoked"), "{text}");
    assert!(check(&b.certificate).0, "other sites unaffected");
    let (ok, text) = openssl(&["crl", "-in", s(&crl), "-CAfile", s(&ca), "-noout"]);
    assert!(
        ok && text.contains("verify OK"),
        "the CRL is signed by the CA: {text}"
    );
    assert!(matches!(pki.revoke("nobody"), Err(PkiError::Unknown(_))));
    // Keep the revoked certificate aside, then re-issue the site (new key): the new certificate
    // verifies and the old one stays revoked.
    let old = dir.path().join("revoked.crt");
    std::fs::copy(&a.certificate, &old).expect("copy");
    let a2 = pki
        .issue_site("site-a", 30)
        .expect("re-issue after revocation");
    assert!(check(&a2.certificate).0, "{}", check(&a2.certificate).1);
    assert!(!check(&old).0, "the old certificate stays revoked");
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root).into_iter().flatten() {
        if e.file_type().is_file() {
            out.push(e.path().to_owned());
        }
    }
    out
}
