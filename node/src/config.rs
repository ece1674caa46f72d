//! The node's configuration file (`node.toml`): read into serde structs that refuse unknown
//! fields, then validated into the values the pipeline uses. `deploy/node.toml` documents
//! every field; it is also the embedded default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::deid::keys::{Secret, SecretError};
use crate::deid::{DeidPolicy, PolicyError};

/// The documented example configuration, used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/node.toml");

/// Configuration errors: each names the file or field and what to change.
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
    #[error("config [deid]: {0}")]
    Policy(#[from] PolicyError),
    #[error("config [deid] site_secret_file {path}: {source}")]
    Secret {
        path: PathBuf,
        #[source]
        source: SecretError,
    },
    #[error(
        "config [deid] site_secret_file {path} cannot be read: {source}; create it with `fedcurate-node secret generate --out {path}`"
    )]
    SecretRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config [deid] mode is \"pseudonymise\" but no site_secret_file is set; set it, or use --anonymise"
    )]
    NoSecret,
}

/// How patients are made unrecognisable.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeidMode {
    /// Keyed by the site secret: the same patient gets the same pseudonym in every batch.
    #[default]
    Pseudonymise,
    /// A fresh random secret per run, discarded at the end: nobody can re-link the output.
    Anonymise,
}

/// The `[deid]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidConfig {
    /// `pseudonymise` (default) or `anonymise`.
    #[serde(default)]
    pub mode: DeidMode,
    /// File holding the site secret as hex (at least 32 random bytes). Required to pseudonymise.
    #[serde(default)]
    pub site_secret_file: Option<PathBuf>,
    /// Options of the Basic Application Level Confidentiality Profile, by name.
    #[serde(default)]
    pub options: Vec<String>,
    /// Clean Descriptors keeps a description only if it is one of these phrases.
    #[serde(default)]
    pub descriptor_allow_list: Vec<String>,
    /// Modified Dates: the smallest shift back, in days (at least 1).
    #[serde(default = "default_shift_min")]
    pub date_shift_min_days: u32,
    /// Modified Dates: the largest shift back, in days.
    #[serde(default = "default_shift_max")]
    pub date_shift_max_days: u32,
    /// Retain Patient Characteristics: lower bounds of the age bands, in years, from 0.
    #[serde(default = "default_bands")]
    pub age_band_lower_bounds: Vec<u32>,
}

fn default_shift_min() -> u32 {
    1
}
fn default_shift_max() -> u32 {
    3650
}
fn default_bands() -> Vec<u32> {
    (0..=85).step_by(5).collect()
}

impl Default for DeidConfig {
    fn default() -> Self {
        DeidConfig {
            mode: DeidMode::default(),
            site_secret_file: None,
            options: Vec::new(),
            descriptor_allow_list: Vec::new(),
            date_shift_min_days: default_shift_min(),
            date_shift_max_days: default_shift_max(),
            age_band_lower_bounds: default_bands(),
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's data directory (outputs, quarantine; later the catalog and the vault).
    pub data_dir: PathBuf,
    /// De-identification.
    #[serde(default)]
    pub deid: DeidConfig,
}

impl NodeConfig {
    /// Parse TOML text; `path` names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.deid.policy()?;
        Ok(cfg)
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG, Path::new("<embedded deploy/node.toml>"))
    }
}

impl DeidConfig {
    /// The validated policy.
    pub fn policy(&self) -> Result<DeidPolicy, ConfigError> {
        let policy = DeidPolicy {
            options: DeidPolicy::parse_options(self.options.iter().map(String::as_str))?,
            descriptor_allow_list: self.descriptor_allow_list.clone(),
            date_shift_days: self.date_shift_min_days..=self.date_shift_max_days,
            age_band_lower_bounds: self.age_band_lower_bounds.clone(),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// The secret for this run: the site secret, or a fresh one when anonymising.
    pub fn secret(&self, anonymise: bool) -> Result<Secret, ConfigError> {
        if anonymise || self.mode == DeidMode::Anonymise {
            return Secret::random().map_err(|source| ConfigError::Secret {
                path: PathBuf::from("<random>"),
                source,
            });
        }
        let path = self
            .site_secret_file
            .as_ref()
            .ok_or(ConfigError::NoSecret)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretRead {
            path: path.clone(),
            source,
        })?;
        Secret::from_hex(&text).map_err(|source| ConfigError::Secret {
            path: path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deid::table::DeidOption;

    #[test]
    fn the_embedded_default_parses() {
        let cfg = NodeConfig::embedded().expect("embedded config");
        assert!(cfg.deid.policy().expect("policy").options.is_empty());
    }

    #[test]
    fn unknown_fields_and_options_are_named() {
        let p = Path::new("t.toml");
        let e = NodeConfig::parse("data_dir = \"/x\"\nbogus = 1\n", p).expect_err("unknown field");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = NodeConfig::parse(
            "data_dir = \"/x\"\n[deid]\noptions = [\"retain-everything\"]\n",
            p,
        )
        .expect_err("unknown option");
        assert!(e.to_string().contains("retain-everything"), "{e}");
        let e = NodeConfig::parse(
            "data_dir = \"/x\"\n[deid]\noptions = [\"retain-longitudinal-full-dates\", \"retain-longitudinal-modified-dates\"]\n",
            p,
        )
        .expect_err("exclusive options");
        assert!(e.to_string().contains("exclude each other"), "{e}");
        let cfg = NodeConfig::parse(
            "data_dir = \"/x\"\n[deid]\noptions = [\"clean-descriptors\"]\ndescriptor_allow_list = [\"CT CHEST\"]\n",
            p,
        )
        .expect("valid");
        assert!(
            cfg.deid
                .policy()
                .expect("policy")
                .has(DeidOption::CleanDescriptors)
        );
        assert!(matches!(cfg.deid.secret(false), Err(ConfigError::NoSecret)));
        assert!(cfg.deid.secret(true).is_ok());
    }
}
