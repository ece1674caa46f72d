//! The node's configuration file (`node.toml`): read into serde structs that refuse unknown
//! fields, then validated into the values the pipeline uses. `deploy/node.toml` documents
//! every field; it is also the embedded default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use fc_federation::settings::{FederationSettings, Transport};

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
        "cannot create the site secret {path}: {source}; check that the data directory is writable by the node's user"
    )]
    SecretCreate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config [deid] reidentification_map = true needs vault_key_file; create a key with `fedcurate-node secret generate --out FILE` and keep it apart from the data directory's backups"
    )]
    NoVaultKey,
    #[error("config [deid] vault_key_file {path}: {message}")]
    VaultKey { path: PathBuf, message: String },
    #[error("config [deid] batch_size must be between 1 and 100000")]
    BatchSize,
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
    /// File holding the site secret as hex (at least 32 random bytes); default
    /// `<data_dir>/site.secret`, generated (owner-only) on first use.
    #[serde(default)]
    pub site_secret_file: Option<PathBuf>,
    /// Keep an encrypted re-identification map (pseudonym → original identifiers) in the
    /// catalog. Never kept when anonymising.
    #[serde(default)]
    pub reidentification_map: bool,
    /// File holding the map's AES-256 key as 64 hex digits; required with the map.
    #[serde(default)]
    pub vault_key_file: Option<PathBuf>,
    /// Inputs per durable batch: their files are flushed together and recorded in one
    /// catalog transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
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
    /// Masking rules for burned-in text (`[[deid.masking_rules]]`).
    #[serde(default)]
    pub masking_rules: Vec<crate::deid::pixels::MaskingRule>,
    /// Text attributes (`"gggg,eeee"`) the standard's table does not list that this site
    /// keeps beyond the shipped allow-list (`node/data/local/text-allow-list.tsv`).
    #[serde(default)]
    pub keep_text_attributes: Vec<String>,
    /// NIfTI sidecar keys this site keeps beyond the shipped BIDS acquisition fields.
    #[serde(default)]
    pub keep_sidecar_keys: Vec<String>,
    /// NIfTI/Analyze inputs: CSV of `relative path (file or folder),subject`.
    #[serde(default)]
    pub nifti_subject_mapping: Option<PathBuf>,
    /// NIfTI/Analyze inputs: the first N folders of the relative path name the subject
    /// (e.g. 1 for `sub-01/anat/t1.nii.gz`). Without mapping or depth, each file is a subject.
    #[serde(default)]
    pub nifti_subject_folder_depth: Option<usize>,
}

fn default_batch_size() -> usize {
    64
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
            reidentification_map: false,
            vault_key_file: None,
            batch_size: default_batch_size(),
            options: Vec::new(),
            descriptor_allow_list: Vec::new(),
            date_shift_min_days: default_shift_min(),
            date_shift_max_days: default_shift_max(),
            age_band_lower_bounds: default_bands(),
            masking_rules: Vec::new(),
            keep_text_attributes: Vec::new(),
            keep_sidecar_keys: Vec::new(),
            nifti_subject_mapping: None,
            nifti_subject_folder_depth: None,
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
    /// The DICOM Storage SCP (`fedcurate-node serve`).
    #[serde(default)]
    pub scp: ScpSettings,
    /// Joining the consortium (`fedcurate-node federate`).
    #[serde(default)]
    pub federation: Option<FederationSettings>,
    /// What `fedcurate-node purge` removes, and after how long.
    #[serde(default)]
    pub retention: Retention,
    /// The audit chain's key file (hex, owner-only; created on first use). Keep it outside
    /// the data directory: whoever can write the catalog must not also hold it. Unset: a
    /// sub-key of the site secret.
    #[serde(default)]
    pub audit_key_file: Option<PathBuf>,
    /// Annotation: the model that writes proposals (`fedcurate-node annotate propose`).
    #[serde(default)]
    pub annotation: Option<AnnotationSettings>,
    /// The web annotator (`fedcurate-node annotator`): address, TLS, the viewer's files.
    #[serde(default)]
    pub annotator: fc_annotator::settings::AnnotatorSettings,
    /// Federated training (`fedcurate-node train`): the trainer's socket and who may use it.
    #[serde(default)]
    pub training: fc_training::TrainingSettings,
}

/// The `[annotation]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationSettings {
    /// The model's command, run once per case without a shell: `{image}` (the case image,
    /// NIfTI), `{output}` (the label map to write) and `{case}` are replaced.
    pub proposal_command: Vec<String>,
    /// The model's name and version, recorded with every proposal.
    pub proposal_model: String,
    pub proposal_model_version: String,
    /// How long one case may take.
    #[serde(default = "default_proposal_timeout")]
    pub proposal_timeout_seconds: u64,
}

fn default_proposal_timeout() -> u64 {
    600
}

/// The `[retention]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Quarantined originals older than this many days are removed (their catalog record
    /// and reason stay). 0: keep them.
    #[serde(default = "default_quarantine_days")]
    pub quarantine_days: u32,
    /// Temporary files left by interrupted transfers in the inbox older than this many days
    /// are removed.
    #[serde(default = "default_temp_days")]
    pub temporary_days: u32,
    /// De-identified outputs older than this many days are removed. 0 (default): keep them.
    #[serde(default)]
    pub outputs_days: u32,
}

fn default_quarantine_days() -> u32 {
    90
}

fn default_temp_days() -> u32 {
    2
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            quarantine_days: default_quarantine_days(),
            temporary_days: default_temp_days(),
            outputs_days: 0,
        }
    }
}

/// The `[scp]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScpSettings {
    /// The node's AE title.
    #[serde(default = "default_ae")]
    pub ae_title: String,
    /// Address and port to listen on.
    #[serde(default = "default_bind")]
    pub bind: std::net::SocketAddr,
    /// Calling AE titles (optionally with the host they must come from) allowed to send.
    #[serde(default)]
    pub allowed: Vec<crate::dimse::scp::AllowedPeer>,
    /// The largest object accepted in one C-STORE, in MiB (a peer sending more is aborted).
    #[serde(default = "default_max_object_mib")]
    pub max_object_mib: u64,
    /// When a received object counts as stored: "flush" (on disk, the default) or "os"
    /// (held by the operating system: survives a killed node, not a power cut).
    #[serde(default)]
    pub durability: crate::dimse::scp::Durability,
}

fn default_max_object_mib() -> u64 {
    2048
}

fn default_ae() -> String {
    "FEDCURATE".into()
}

fn default_bind() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 11112))
}

impl Default for ScpSettings {
    fn default() -> Self {
        ScpSettings {
            ae_title: default_ae(),
            bind: default_bind(),
            allowed: Vec::new(),
            max_object_mib: default_max_object_mib(),
            durability: Default::default(),
        }
    }
}

impl NodeConfig {
    /// Parse TOML text; `path` names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.deid.policy()?;
        if !(1..=100_000).contains(&cfg.deid.batch_size) {
            return Err(ConfigError::BatchSize);
        }
        if cfg.deid.reidentification_map && cfg.deid.vault_key_file.is_none() {
            return Err(ConfigError::NoVaultKey);
        }
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

    /// Where the audit chain's key comes from: `audit_key_file`; else `<data_dir>/audit.key`
    /// if it exists; else the site secret if it exists; else a new `<data_dir>/audit.key`
    /// (an anonymising node keeps no site secret). Once chosen, it stays.
    pub fn audit_key_source(&self) -> (PathBuf, bool) {
        if let Some(p) = &self.audit_key_file {
            return (p.clone(), false);
        }
        let own = self.data_dir.join("audit.key");
        let secret = self.deid.secret_path(&self.data_dir);
        if !own.exists() && secret.exists() {
            (secret, true)
        } else {
            (own, false)
        }
    }

    /// The key the audit chain is MACed with (see [`NodeConfig::audit_key_source`]).
    pub fn audit_key(&self) -> Result<crate::audit::AuditKey, ConfigError> {
        let (path, _) = self.audit_key_source();
        if !path.exists() {
            let secret = Secret::random().map_err(|source| ConfigError::Secret {
                path: path.clone(),
                source,
            })?;
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            write_secret_file(&path, &secret).map_err(|source| ConfigError::SecretCreate {
                path: path.clone(),
                source,
            })?;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretRead {
            path: path.clone(),
            source,
        })?;
        Secret::from_hex(&text)
            .map(|s| crate::audit::AuditKey::from_secret(&s))
            .map_err(|source| ConfigError::Secret { path, source })
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
            masking_rules: self.masking_rules.clone(),
            keep_text_attributes: self
                .keep_text_attributes
                .iter()
                .map(|t| {
                    crate::deid::allow::parse_tag(t).ok_or_else(|| ConfigError::Parse {
                        path: "[deid] keep_text_attributes".into(),
                        message: format!("{t:?} is not a tag: write it as \"gggg,eeee\" (hex)"),
                    })
                })
                .collect::<Result<_, _>>()?,
            sidecar_keys: self.keep_sidecar_keys.clone(),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// How NIfTI/Analyze inputs map to subjects.
    pub fn subject_rule(&self) -> Result<crate::volume::deid::SubjectRule, ConfigError> {
        let mapping = match &self.nifti_subject_mapping {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Parse {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
                crate::volume::deid::SubjectRule::parse_mapping(&text).map_err(|message| {
                    ConfigError::Parse {
                        path: p.clone(),
                        message,
                    }
                })?
            }
            None => Default::default(),
        };
        Ok(crate::volume::deid::SubjectRule {
            mapping,
            folder_depth: self.nifti_subject_folder_depth,
        })
    }

    /// Whether this run anonymises.
    pub fn anonymises(&self, flag: bool) -> bool {
        flag || self.mode == DeidMode::Anonymise
    }

    /// Where the site secret lives.
    pub fn secret_path(&self, data_dir: &Path) -> PathBuf {
        self.site_secret_file
            .clone()
            .unwrap_or_else(|| data_dir.join("site.secret"))
    }

    /// The secret for this run: the site secret (generated, owner-only, on first use), or a
    /// fresh one held only in memory when anonymising.
    pub fn secret(&self, data_dir: &Path, anonymise: bool) -> Result<Secret, ConfigError> {
        if self.anonymises(anonymise) {
            return Secret::random().map_err(|source| ConfigError::Secret {
                path: PathBuf::from("<random>"),
                source,
            });
        }
        let path = self.secret_path(data_dir);
        if !path.exists() {
            let secret = Secret::random().map_err(|source| ConfigError::Secret {
                path: path.clone(),
                source,
            })?;
            write_secret_file(&path, &secret).map_err(|source| ConfigError::SecretCreate {
                path: path.clone(),
                source,
            })?;
            tracing::info!(fingerprint = %secret.fingerprint(), "generated a new site secret; back it up with `fedcurate-node secret backup`");
            return Ok(secret);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::SecretRead {
            path: path.clone(),
            source,
        })?;
        Secret::from_hex(&text).map_err(|source| ConfigError::Secret { path, source })
    }

    /// The vault key, if a map is kept in this run.
    pub fn vault_key(
        &self,
        anonymise: bool,
    ) -> Result<Option<crate::vault::VaultKey>, ConfigError> {
        if !self.reidentification_map || self.anonymises(anonymise) {
            return Ok(None);
        }
        let path = self.vault_key_file.clone().ok_or(ConfigError::NoVaultKey)?;
        read_vault_key(&path).map(Some)
    }
}

/// Read a vault key file.
pub fn read_vault_key(path: &Path) -> Result<crate::vault::VaultKey, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::VaultKey {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    crate::vault::VaultKey::from_hex(&text).map_err(|e| ConfigError::VaultKey {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

pub use crate::vault::write_secret_file;

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
        let dir = tempfile::tempdir().expect("tempdir");
        let first = cfg
            .deid
            .secret(dir.path(), false)
            .expect("generated on first use");
        let again = cfg.deid.secret(dir.path(), false).expect("read back");
        assert_eq!(first.to_hex(), again.to_hex());
        let anon = cfg.deid.secret(dir.path(), true).expect("random");
        assert_ne!(anon.to_hex(), first.to_hex());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("site.secret"))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let e = NodeConfig::parse(
            "data_dir = \"/x\"\n[deid]\nreidentification_map = true\n",
            p,
        )
        .expect_err("no key");
        assert!(matches!(e, ConfigError::NoVaultKey));
    }
}
