//! The coordinator's configuration file (`coordinator.toml`, documented in `deploy/`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use protocol::SiteId;
use serde::Deserialize;

/// Configuration errors, naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: site {site} is listed twice in [[sites]]")]
    DuplicateSite { path: PathBuf, site: SiteId },
    #[error("config file {path}: no [[sites]] listed; add one entry per hospital node")]
    NoSites { path: PathBuf },
}

/// One registered site.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    /// The site's name, as in its certificate (a-z, 0-9, '-').
    pub id: SiteId,
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// UDP address the coordinator will listen on for QUIC.
    pub listen: SocketAddr,
    /// TCP address of the fallback for sites whose network blocks UDP (the same protocol
    /// over TLS 1.3 on TCP). Default: the same address as `listen`. Set `tcp_fallback = false`
    /// to serve QUIC only.
    #[serde(default)]
    pub listen_tcp: Option<SocketAddr>,
    #[serde(default = "default_true")]
    pub tcp_fallback: bool,
    /// The consortium's sites.
    pub sites: Vec<SiteEntry>,
    /// Certificates for `serve` (made with `fedcurate-coordinator pki`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Directory of the coordinator's state (`coordinator.sqlite`) and the consortium report.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The consortium curation schema to publish (TOML; see `deploy/schema.toml`).
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// Sites whose reports are needed before the federated harmonisation model is fitted
    /// (default: every listed site).
    #[serde(default)]
    pub min_sites_for_model: Option<usize>,
    /// Secure aggregation: seconds a session may wait for its sites before it is aborted
    /// and restarted without those that did not take their step.
    #[serde(default = "default_secure_timeout")]
    pub secure_timeout_seconds: i64,
    /// What one site may use: connections at once, requests per second, burst.
    #[serde(default)]
    pub limits: crate::net::Limits,
    /// A federated training job to publish.
    #[serde(default)]
    pub training: Option<TrainingConfig>,
}

/// `[training]`: the job file (its settings; the layout is read from the initial model) and
/// the initial model (safetensors).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub job: PathBuf,
    pub initial_model: PathBuf,
}

fn default_secure_timeout() -> i64 {
    120
}

fn default_true() -> bool {
    true
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("coordinator-state")
}

/// The coordinator's certificates and the consortium's trust material.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The consortium CA certificate (`pki/ca.crt`).
    pub ca: PathBuf,
    /// The CA's revocation list (`pki/crl.pem`), enforced at every handshake.
    pub crl: PathBuf,
    /// This coordinator's certificate (`pki issue-coordinator HOST`).
    pub cert: PathBuf,
    /// This coordinator's private key (0600).
    pub key: PathBuf,
    /// The CA's register of issued certificates (`pki/issued.json`): connections are mapped
    /// to sites by certificate fingerprint.
    pub issued: PathBuf,
}

impl CoordinatorConfig {
    /// Parse and validate TOML text; `path` names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: CoordinatorConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if cfg.sites.is_empty() {
            return Err(ConfigError::NoSites {
                path: path.to_owned(),
            });
        }
        if cfg
            .min_sites_for_model
            .is_some_and(|n| n < crate::hub::MODEL_MIN_SITES || n > cfg.sites.len())
        {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "min_sites_for_model must be between {} (a model over fewer sites exposes a site's summary) and the number of sites ({})",
                    crate::hub::MODEL_MIN_SITES,
                    cfg.sites.len()
                ),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &cfg.sites {
            if !seen.insert(s.id.clone()) {
                return Err(ConfigError::DuplicateSite {
                    path: path.to_owned(),
                    site: s.id.clone(),
                });
            }
        }
        Ok(cfg)
    }

    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_errors_name_the_problem() {
        let example = include_str!("../../deploy/coordinator.toml");
        let cfg =
            CoordinatorConfig::parse(example, Path::new("coordinator.toml")).expect("example");
        assert!(!cfg.sites.is_empty());
        let p = Path::new("c.toml");
        let dup = "listen = \"127.0.0.1:4433\"\n[[sites]]\nid = \"a\"\n[[sites]]\nid = \"a\"\n";
        assert!(matches!(
            CoordinatorConfig::parse(dup, p),
            Err(ConfigError::DuplicateSite { .. })
        ));
        let bad = "listen = \"127.0.0.1:4433\"\n[[sites]]\nid = \"Bad Name\"\n";
        let e = CoordinatorConfig::parse(bad, p).expect_err("bad site id");
        assert!(e.to_string().contains("site id"), "{e}");
        let none = "listen = \"127.0.0.1:4433\"\nsites = []\n";
        assert!(matches!(
            CoordinatorConfig::parse(none, p),
            Err(ConfigError::NoSites { .. })
        ));
    }
}
