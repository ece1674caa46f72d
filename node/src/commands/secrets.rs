//! `secret` and `reidentify`: the site secret, its shares, and the re-identification map.

use std::path::Path;

use anyhow::{Context, Result, bail};
use node::audit::{self, AuditRecord};
use node::config::{self, NodeConfig};
use node::deid::keys::Secret;
use node::vault;

use super::data::open_data_dir;
use crate::{Field, SecretCommand};

pub(crate) fn generate_secret(out: &Path) -> Result<Secret> {
    if out.exists() {
        bail!(
            "{} already exists; refusing to overwrite a secret (it would break linkage with earlier batches)",
            out.display()
        );
    }
    let secret = Secret::random()?;
    config::write_secret_file(out, &secret)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(secret)
}

pub(crate) fn secret(config: &NodeConfig, command: SecretCommand) -> Result<()> {
    match command {
        SecretCommand::RotateVault { new_key } => {
            let old = config
                .deid
                .vault_key(false)?
                .context("no vault_key_file in [deid]: there is no map to rotate")?;
            let new = node::config::read_vault_key(&new_key)?;
            let mut dd = open_data_dir(config)?;
            let entries = dd.catalog.vault_entries()?;
            let mut resealed = Vec::with_capacity(entries.len());
            for (pseudonym, nonce, ciphertext) in &entries {
                let identity = vault::open(&old, pseudonym, nonce, ciphertext).map_err(|_| {
                    anyhow::anyhow!(
                        "an entry does not open with the current vault key; nothing was changed"
                    )
                })?;
                let (n, c) =
                    vault::seal(&new, pseudonym, &identity).map_err(|e| anyhow::anyhow!("{e}"))?;
                resealed.push((pseudonym.clone(), n, c));
            }
            dd.catalog.replace_vault(&resealed)?;
            dd.catalog.audit(&audit::AuditRecord::now(
                "vault-rotate",
                serde_json::json!({ "entries": resealed.len() }),
            ))?;
            println!(
                "re-encrypted {} entries under {}; now set vault_key_file = {:?} in [deid], and keep the old key until the new one is backed up",
                resealed.len(),
                new_key.display(),
                new_key.display().to_string()
            );
        }
        SecretCommand::Generate { out } => {
            let s = generate_secret(&out)?;
            println!(
                "secret written to {} (fingerprint {})",
                out.display(),
                s.fingerprint()
            );
        }
        SecretCommand::Backup { out } => {
            let mut dd = open_data_dir(config)?;
            let s = config.deid.secret(&dd.root, false)?;
            if out.exists() {
                bail!("{} already exists; choose a new backup file", out.display());
            }
            config::write_secret_file(&out, &s)
                .with_context(|| format!("writing {}", out.display()))?;
            dd.catalog.audit(&AuditRecord::now(
                "secret-backup",
                serde_json::json!({ "fingerprint": s.fingerprint() }),
            ))?;
            println!(
                "site secret (fingerprint {}) backed up to {}",
                s.fingerprint(),
                out.display()
            );
            println!(
                "keep the backup offline and owner-readable only: whoever has it can recompute pseudonyms"
            );
        }
        SecretCommand::Restore { from } => {
            // The data directory is opened after the secret is in place: the audit key may
            // derive from it.
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating the data directory {}", config.data_dir.display())
            })?;
            let text = std::fs::read_to_string(&from)
                .with_context(|| format!("reading {}", from.display()))?;
            let restored = Secret::from_hex(&text)?;
            let target = config.deid.secret_path(&config.data_dir);
            if target.exists() {
                let current = Secret::from_hex(&std::fs::read_to_string(&target)?)?;
                if current.to_hex() == restored.to_hex() {
                    println!(
                        "the site secret in place already is this one (fingerprint {})",
                        restored.fingerprint()
                    );
                    return Ok(());
                }
                bail!(
                    "{} holds a different secret (fingerprint {}); move it away first if you really mean to replace it",
                    target.display(),
                    current.fingerprint()
                );
            }
            config::write_secret_file(&target, &restored)
                .with_context(|| format!("writing {}", target.display()))?;
            let mut dd = open_data_dir(config)?;
            dd.catalog.audit(&AuditRecord::now(
                "secret-restore",
                serde_json::json!({ "fingerprint": restored.fingerprint() }),
            ))?;
            println!(
                "site secret restored to {} (fingerprint {})",
                target.display(),
                restored.fingerprint()
            );
        }
    }
    Ok(())
}

pub(crate) fn reidentify(config: &NodeConfig, pseudonym: &str, field: Field) -> Result<()> {
    let mut dd = open_data_dir(config)?;
    let key_path = config.deid.vault_key_file.clone().context(
        "config [deid] vault_key_file is not set: re-identification needs the vault key",
    )?;
    let key = config::read_vault_key(&key_path)?;
    let Some((nonce, ct)) = dd.catalog.vault_entry(pseudonym)? else {
        bail!("no re-identification map entry for {pseudonym}");
    };
    let id = vault::open(&key, pseudonym, &nonce, &ct)?;
    let field_name = format!("{field:?}");
    dd.catalog.audit(&AuditRecord::now(
        "reidentify",
        serde_json::json!({ "pseudonym": pseudonym, "field": field_name }),
    ))?;
    match field {
        Field::PatientId => println!("{}", id.patient_id),
        Field::Issuer => println!("{}", id.issuer),
        Field::Name => println!("{}", id.name),
        Field::BirthDate => println!("{}", id.birth_date),
        Field::All => {
            println!("patient id  {}", id.patient_id);
            println!("issuer      {}", id.issuer);
            println!("name        {}", id.name);
            println!("birth date  {}", id.birth_date);
        }
    }
    Ok(())
}
