//! The consortium's certificate authority: one CA, site certificates (clientAuth), coordinator
//! certificates (serverAuth with a DNS name), signing of site requests so a site's private key
//! never leaves the hospital, revocation (a signed CRL) and renewal.
//!
//! Layout of a PKI folder (owner-only):
//! - `ca.key` (0600), `ca.crt`;
//! - `issued.json`: every certificate issued, with serial, SHA-256 fingerprint of its DER,
//!   expiry and revocation (the coordinator's fingerprint registry is built from it);
//! - `crl.pem`: the revocation list, re-signed on every revocation;
//! - `sites/NAME.crt` (and `sites/NAME.key` when the CA made the key),
//!   `coordinators/HOST.crt` and `.key`.
//!
//! Every file is written to a temporary name, flushed and renamed, so a killed command leaves
//! either the old state or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate operation failed: {0}")]
    Cert(#[from] rcgen::Error),
    #[error(
        "{0} already holds a consortium CA; refusing to overwrite it (use another folder, or remove it deliberately)"
    )]
    CaExists(PathBuf),
    #[error("{0} holds no consortium CA: run `fedcurate-coordinator pki init --dir {0}` first")]
    NoCa(PathBuf),
    #[error(
        "{0:?} is not a valid name: a site is 1 to 32 characters of a-z, 0-9 and '-'; a coordinator is a DNS host name"
    )]
    BadName(String),
    #[error(
        "the request names {found:?}, not {expected:?}: ask the site for a request made with `fedcurate-node pki request --site {expected}`"
    )]
    WrongSubject { expected: String, found: String },
    #[error("no certificate was issued to {0:?}")]
    Unknown(String),
    #[error("{0:?} has an active certificate; revoke it first, or renew it with `pki renew`")]
    Active(String),
    #[error(
        "{0:?} was issued from a request, so the CA does not hold its key: renew with `pki renew {0} --csr FILE`"
    )]
    NeedsRequest(String),
    #[error("issued.json is damaged ({0}); restore it from the PKI backup")]
    Registry(String),
}

type Result<T> = std::result::Result<T, PkiError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A site node: TLS client authentication.
    Site,
    /// The coordinator: TLS server authentication for its DNS name.
    Coordinator,
}

/// One issued certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub name: String,
    pub role: Role,
    /// Serial number, hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, hex: the coordinator's registry key.
    pub fingerprint: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether the CA holds the subject's key (false when issued from a request).
    pub ca_made_key: bool,
    /// Revocation time, seconds since the Unix epoch.
    #[serde(default)]
    pub revoked: Option<i64>,
    /// Replaced by a renewal. A renewal for the same key leaves it valid until it expires;
    /// a renewal with a new key revokes it (reason superseded), so a superseded key no
    /// longer authenticates.
    #[serde(default)]
    pub superseded: bool,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex (empty in registers written
    /// before it was recorded).
    #[serde(default)]
    pub public_key: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    crl_number: u64,
    issued: Vec<Issued>,
}

/// A consortium PKI folder.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
}

/// Files written by an issuing command.
#[derive(Debug)]
pub struct IssuedFiles {
    pub certificate: PathBuf,
    pub key: Option<PathBuf>,
    pub record: Issued,
}

/// Validity of the CA, in days.
pub const CA_DAYS: i64 = 3650;
/// Default validity of site and coordinator certificates, in days.
pub const LEAF_DAYS: i64 = 365;
/// Validity of each CRL, in days (re-signed on every revocation and by `pki crl`).
pub const CRL_DAYS: i64 = 30;

/// Site names follow the protocol's [`protocol::SiteId`] rules; coordinator names are DNS
/// host names.
fn check_name(name: &str, role: Role) -> Result<()> {
    let ok = match role {
        Role::Site => protocol::SiteId::new(name).is_ok(),
        Role::Coordinator => {
            !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        }
    };
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

/// Write `bytes` to `path` atomically; `private` makes it 0600.
fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(
        ".tmp-{}",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn random_serial() -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Cert(rcgen::Error::RingUnspecified))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 fingerprint (hex) of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// SHA-256 (hex) of a DER certificate's SubjectPublicKeyInfo.
pub fn public_key_fingerprint(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex(ring::digest::digest(
        &ring::digest::SHA256,
        cert.public_key().raw,
    )
    .as_ref()))
}

/// Not-after of a PEM certificate, in seconds since the epoch.
pub fn not_after(pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn leaf_params(name: &str, role: Role, days: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "fedcurate consortium");
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![match role {
        Role::Site => ExtendedKeyUsagePurpose::ClientAuth,
        Role::Coordinator => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    p.subject_alt_names = match role {
        Role::Site => Vec::new(),
        Role::Coordinator => vec![SanType::DnsName(name.try_into()?)],
    };
    let now = OffsetDateTime::now_utc();
    p.not_after = now + Duration::days(days);
    // (A non-positive validity makes an already expired certificate, for tests of refusal.)
    p.not_before = (now - Duration::minutes(5)).min(p.not_after - Duration::days(1));
    p.serial_number = Some(random_serial()?);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl Pki {
    /// The PKI folder at `dir` (not created).
    pub fn at(dir: &Path) -> Self {
        Pki {
            dir: dir.to_owned(),
        }
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// Create the consortium CA (`pki init`): refuses to overwrite an existing one.
    pub fn init(&self, consortium: &str) -> Result<()> {
        if self.dir.join("ca.key").exists() || self.dir.join("ca.crt").exists() {
            return Err(PkiError::CaExists(self.dir.clone()));
        }
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(&self.dir))?;
        }
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("{consortium} consortium CA"));
        p.distinguished_name
            .push(DnType::OrganizationName, "fedcurate consortium");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(CA_DAYS);
        p.serial_number = Some(random_serial()?);
        let cert = p.self_signed(&key)?;
        write_atomic(
            &self.dir.join("ca.key"),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_atomic(&self.ca_cert_path(), cert.pem().as_bytes(), false)?;
        self.save(&Registry::default())?;
        self.write_crl(&mut Registry::default())?;
        Ok(())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key_path = self.dir.join("ca.key");
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PkiError::NoCa(self.dir.clone())
            } else {
                PkiError::Io {
                    path: key_path.clone(),
                    source: e,
                }
            }
        })?;
        let cert_path = self.ca_cert_path();
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&cert_pem, key)?)
    }

    fn load(&self) -> Result<Registry> {
        let path = self.dir.join("issued.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PkiError::NoCa(self.dir.clone())
            } else {
                PkiError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        parse_registry(&text)
    }

    fn save(&self, r: &Registry) -> Result<()> {
        let text =
            serde_json::to_string_pretty(r).map_err(|e| PkiError::Registry(e.to_string()))?;
        write_atomic(&self.dir.join("issued.json"), text.as_bytes(), false)
    }

    /// The certificates recorded in an `issued.json` (a copy kept next to the coordinator).
    pub fn load_issued(path: &Path) -> Result<Vec<Issued>> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Ok(parse_registry(&text)?.issued)
    }

    /// Every certificate issued so far.
    pub fn issued(&self) -> Result<Vec<Issued>> {
        Ok(self.load()?.issued)
    }

    fn folder(role: Role) -> &'static str {
        match role {
            Role::Site => "sites",
            Role::Coordinator => "coordinators",
        }
    }

    fn active(r: &Registry, name: &str, role: Role) -> bool {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        r.issued.iter().any(|i| {
            i.name == name
                && i.role == role
                && i.revoked.is_none()
                && !i.superseded
                && i.not_after > now
        })
    }

    fn record(
        &self,
        r: &mut Registry,
        name: &str,
        role: Role,
        params: &CertificateParams,
        der: &[u8],
        ca_made_key: bool,
    ) -> Issued {
        let public_key = public_key_fingerprint(der).unwrap_or_default();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        for old in r
            .issued
            .iter_mut()
            .filter(|i| i.name == name && i.role == role)
        {
            old.superseded = true;
            // A certificate for another key must stop authenticating at once: revoke it
            // (an old register without key fingerprints counts as another key).
            if old.revoked.is_none() && (old.public_key.is_empty() || old.public_key != public_key)
            {
                old.revoked = Some(now);
            }
        }
        let rec = Issued {
            name: name.to_owned(),
            role,
            serial: params
                .serial_number
                .as_ref()
                .map_or_else(String::new, |s| hex(&s.to_bytes())),
            fingerprint: fingerprint(der),
            not_after: params.not_after.unix_timestamp(),
            ca_made_key,
            revoked: None,
            superseded: false,
            public_key,
        };
        r.issued.push(rec.clone());
        rec
    }

    fn issue_with_key(
        &self,
        name: &str,
        role: Role,
        days: i64,
        renew: bool,
    ) -> Result<IssuedFiles> {
        check_name(name, role)?;
        let issuer = self.issuer()?;
        let mut r = self.load()?;
        if !renew && Self::active(&r, name, role) {
            return Err(PkiError::Active(name.to_owned()));
        }
        let folder = self.dir.join(Self::folder(role));
        let key_path = folder.join(format!("{name}.key"));
        let key = if renew {
            let pem = std::fs::read_to_string(&key_path)
                .map_err(|_| PkiError::NeedsRequest(name.to_owned()))?;
            KeyPair::from_pem(&pem)?
        } else {
            KeyPair::generate()?
        };
        let params = leaf_params(name, role, days)?;
        let cert = params.signed_by(&key, &issuer)?;
        let rec = self.record(&mut r, name, role, &params, cert.der(), true);
        let cert_path = folder.join(format!("{name}.crt"));
        if !renew {
            write_atomic(&key_path, key.serialize_pem().as_bytes(), true)?;
        }
        write_atomic(&cert_path, cert.pem().as_bytes(), false)?;
        if renew {
            self.write_crl(&mut r)?;
        }
        self.save(&r)?;
        Ok(IssuedFiles {
            certificate: cert_path,
            key: Some(key_path),
            record: rec,
        })
    }

    /// `pki issue-site SITE`: a key and a clientAuth certificate made by the CA.
    pub fn issue_site(&self, site: &str, days: i64) -> Result<IssuedFiles> {
        self.issue_with_key(site, Role::Site, days, false)
    }

    /// `pki issue-coordinator HOST`: a key and a serverAuth certificate for the DNS name HOST.
    pub fn issue_coordinator(&self, host: &str, days: i64) -> Result<IssuedFiles> {
        self.issue_with_key(host, Role::Coordinator, days, false)
    }

    /// `pki sign-request SITE CSR`: a clientAuth certificate for the key in a site's request.
    /// Only the public key and the subject name are taken from the request; usages, validity
    /// and serial are the CA's.
    pub fn sign_request(&self, site: &str, csr_pem: &str, days: i64) -> Result<IssuedFiles> {
        self.sign(site, csr_pem, days, false)
    }

    fn sign(&self, site: &str, csr_pem: &str, days: i64, renew: bool) -> Result<IssuedFiles> {
        check_name(site, Role::Site)?;
        let issuer = self.issuer()?;
        let mut r = self.load()?;
        if !renew && Self::active(&r, site, Role::Site) {
            return Err(PkiError::Active(site.to_owned()));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let found = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .map(dn_text)
            .unwrap_or_default();
        if found != site {
            return Err(PkiError::WrongSubject {
                expected: site.to_owned(),
                found,
            });
        }
        csr.params = leaf_params(site, Role::Site, days)?;
        let cert = csr.signed_by(&issuer)?;
        let rec = self.record(&mut r, site, Role::Site, &csr.params, cert.der(), false);
        let cert_path = self
            .dir
            .join(Self::folder(Role::Site))
            .join(format!("{site}.crt"));
        write_atomic(&cert_path, cert.pem().as_bytes(), false)?;
        if renew {
            // A new key revokes the superseded certificates: the CRL says so at once.
            self.write_crl(&mut r)?;
        }
        self.save(&r)?;
        Ok(IssuedFiles {
            certificate: cert_path,
            key: None,
            record: rec,
        })
    }

    /// `pki renew NAME`: a new certificate (new serial, new expiry) for the same key; the old
    /// one is marked superseded. Sites whose key the CA does not hold send a new request.
    pub fn renew(
        &self,
        name: &str,
        role: Role,
        csr_pem: Option<&str>,
        days: i64,
    ) -> Result<IssuedFiles> {
        let r = self.load()?;
        let last = r
            .issued
            .iter()
            .rev()
            .find(|i| i.name == name && i.role == role)
            .ok_or_else(|| PkiError::Unknown(name.to_owned()))?;
        match (last.ca_made_key, csr_pem) {
            (_, Some(csr)) if role == Role::Site => self.sign(name, csr, days, true),
            (true, _) => self.issue_with_key(name, role, days, true),
            (false, _) => Err(PkiError::NeedsRequest(name.to_owned())),
        }
    }

    /// `pki revoke NAME`: revoke every certificate of NAME and re-sign the CRL. Returns how
    /// many certificates were revoked.
    pub fn revoke(&self, name: &str) -> Result<usize> {
        let mut r = self.load()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut n = 0;
        for i in r.issued.iter_mut().filter(|i| i.name == name) {
            if i.revoked.is_none() {
                i.revoked = Some(now);
                n += 1;
            }
        }
        if !r.issued.iter().any(|i| i.name == name) {
            return Err(PkiError::Unknown(name.to_owned()));
        }
        self.write_crl(&mut r)?;
        self.save(&r)?;
        Ok(n)
    }

    /// Re-sign the CRL with a fresh validity (`pki crl`, and after every revocation).
    pub fn refresh_crl(&self) -> Result<()> {
        let mut r = self.load()?;
        self.write_crl(&mut r)?;
        self.save(&r)
    }

    fn write_crl(&self, r: &mut Registry) -> Result<()> {
        let issuer = self.issuer()?;
        r.crl_number += 1;
        let now = OffsetDateTime::now_utc();
        let mut revoked = Vec::new();
        for i in &r.issued {
            if let Some(t) = i.revoked {
                let serial = unhex(&i.serial)
                    .ok_or_else(|| PkiError::Registry(format!("bad serial {:?}", i.serial)))?;
                revoked.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: OffsetDateTime::from_unix_timestamp(t)
                        .map_err(|e| PkiError::Registry(e.to_string()))?,
                    reason_code: Some(if i.superseded {
                        RevocationReason::Superseded
                    } else {
                        RevocationReason::CessationOfOperation
                    }),
                    invalidity_date: None,
                });
            }
        }
        let crl = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(r.crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)?;
        write_atomic(&self.crl_path(), crl.pem()?.as_bytes(), false)
    }
}

fn parse_registry(text: &str) -> Result<Registry> {
    serde_json::from_str(text).map_err(|e| PkiError::Registry(e.to_string()))
}

fn dn_text(v: &rcgen::DnValue) -> String {
    match v {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
