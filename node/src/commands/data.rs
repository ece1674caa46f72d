//! The data directory a command works in: locked for the process, with its catalog and audit chain.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use node::audit::{self};
use node::catalog::Catalog;
use node::config::NodeConfig;
use node::deid::keys::Keys;

/// The data directory, locked for this process, and its catalog.
pub(crate) struct DataDir {
    pub(crate) root: PathBuf,
    pub(crate) catalog: Catalog,
    pub(crate) _lock: File,
}

pub(crate) fn open_data_dir(config: &NodeConfig) -> Result<DataDir> {
    open_data_dir_with(&config.data_dir, config.audit_key()?)
}

/// A catalog of this node, its audit chain MACed with the configured key.
pub(crate) fn open_catalog(config: &NodeConfig) -> Result<Catalog> {
    let mut c = Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
    c.set_audit_key(config.audit_key()?);
    Ok(c)
}

pub(crate) fn open_data_dir_with(root: &Path, audit_key: audit::AuditKey) -> Result<DataDir> {
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating the data directory {}", root.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {} to its owner", root.display()))?;
    }
    let lock_path = root.join("node.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another fedcurate-node process is using the data directory {}; wait for it to finish",
            root.display()
        );
    }
    let mut catalog = Catalog::open(&root.join("catalog.sqlite"))?;
    catalog.set_audit_key(audit_key);
    Ok(DataDir {
        root: root.to_owned(),
        catalog,
        _lock: lock,
    })
}

/// Keyed tokens for reports and exports, under a sub-key of the site secret (a fresh one per
/// run when the node only anonymises: nothing is linked across runs then).
pub(crate) fn site_tokens(config: &NodeConfig) -> Result<node::deid::keys::Tokens> {
    Ok(Keys::derive(&config.deid.secret(&config.data_dir, false)?).tokens())
}
