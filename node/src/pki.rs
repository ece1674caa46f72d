//! The site's side of the consortium PKI: a key pair that never leaves the hospital and a
//! certificate signing request for the consortium's CA (`fedcurate-coordinator pki
//! sign-request`).

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, KeyPair};

/// Make a key pair and a request naming `site`. Returns (private key PEM, request PEM).
pub fn site_request(site: &str) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, site);
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Write `site.key` (0600, refusing to overwrite one) and `site.csr` into `dir`.
pub fn write_site_request(site: &str, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use anyhow::Context;
    if let Err(e) = protocol::SiteId::new(site) {
        anyhow::bail!("{site:?}: {e}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join("site.key");
    let csr_path = dir.join("site.csr");
    if key_path.exists() {
        anyhow::bail!(
            "{} already exists; move it away first if you really mean to replace the site's key",
            key_path.display()
        );
    }
    let (key, csr) = site_request(site).context("making the key and request")?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&key_path)
        .with_context(|| format!("creating {}", key_path.display()))?;
    f.write_all(key.as_bytes())?;
    f.sync_all()?;
    std::fs::write(&csr_path, csr.as_bytes())
        .with_context(|| format!("writing {}", csr_path.display()))?;
    Ok((key_path, csr_path))
}
