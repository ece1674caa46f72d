//! `catalog export`, `quarantine`, `audit`: what the node recorded, and the quarantine's triage.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use node::audit::{self};
use node::batch::{self, BatchPaths};
use node::config::NodeConfig;
use node::deid::Deidentifier;

use super::data::open_data_dir;
use super::deid::deidentifier_parts;
use crate::{AuditCommand, QuarantineCommand};

pub(crate) fn export(config: &NodeConfig, out: Option<&Path>) -> Result<()> {
    let dd = open_data_dir(config)?;
    let mut w: Box<dyn Write> = match out {
        Some(p) => Box::new(File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut profiles = std::collections::HashMap::new();
    for (r, run) in dd.catalog.inputs()? {
        let (edition, options) = match profiles.entry(run) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(dd.catalog.run_profile(run)?),
        };
        let line = serde_json::json!({
            "path_key": r.path_key,
            "input_marker": r.content_hash,
            "outcome": r.outcome.as_str(),
            "reason": r.reason,
            "output_path": r.output_path,
            "output_sha256": r.output_hash,
            "patient": r.patient,
            "study": r.study,
            "series": r.series,
            "instance": r.instance,
            "edition": edition,
            "options": options,
            "run": run,
        });
        writeln!(w, "{line}")?;
    }
    w.flush()?;
    Ok(())
}

pub(crate) fn quarantine(config: &NodeConfig, command: QuarantineCommand) -> Result<()> {
    let mut dd = open_data_dir(config)?;
    match command {
        QuarantineCommand::List { all } => {
            let entries = dd.catalog.quarantine_entries(all)?;
            println!(
                "{:<16}  {:<28}  {:<20}  released",
                "id", "reason", "quarantined at"
            );
            for e in &entries {
                println!(
                    "{:<16}  {:<28}  {:<20}  {}",
                    &e.id[..e.id.len().min(16)],
                    e.reason,
                    e.quarantined_at,
                    e.released_at.as_deref().unwrap_or("-")
                );
            }
            println!(
                "{} entries in {}",
                entries.len(),
                dd.root.join("quarantine").display()
            );
            Ok(())
        }
        QuarantineCommand::Show { id } => {
            let entries: Vec<_> = dd
                .catalog
                .quarantine_entries(true)?
                .into_iter()
                .filter(|e| e.id.starts_with(&id))
                .collect();
            let [e] = entries.as_slice() else {
                bail!(
                    "{} entries match {id:?}; give more characters of the id (see `quarantine list`)",
                    entries.len()
                );
            };
            println!("id        {}", e.id);
            println!("reason    {}", e.reason);
            println!("at        {}", e.quarantined_at);
            println!(
                "original  {}",
                dd.root
                    .join("quarantine")
                    .join(format!("{}.dcm", e.id))
                    .display()
            );
            println!(
                "detail    (may quote the original file: identifying, keep it on this machine)"
            );
            println!("          {}", e.detail);
            Ok(())
        }
        QuarantineCommand::Release { id, output } => {
            let (policy, keys, vault_key) = deidentifier_parts(config, &dd.root)?;
            let paths = BatchPaths {
                input: PathBuf::new(),
                output: output.unwrap_or_else(|| dd.root.join("deid")),
                quarantine: dd.root.join("quarantine"),
            };
            let deid = Deidentifier::new(&policy, &keys);
            match batch::release(&id, &paths, &deid, &mut dd.catalog, vault_key.as_ref())? {
                Ok(rel) => {
                    println!("released: written to {}", paths.output.join(rel).display());
                    Ok(())
                }
                Err(why) => bail!("{why}"),
            }
        }
    }
}

pub(crate) fn audit_cmd(config: &NodeConfig, command: AuditCommand) -> Result<()> {
    let dd = open_data_dir(config)?;
    let entries = dd.catalog.audit_entries()?;
    match command {
        AuditCommand::Verify => {
            let v = audit::verify(
                &entries,
                &config.audit_key()?,
                dd.catalog.audit_head().as_deref(),
            )?;
            println!("audit chain intact: {} entries", v.entries);
            if v.legacy > 0 {
                println!(
                    "  the first {} were written before the chain was keyed: anyone who could write the catalog could have recomputed them",
                    v.legacy
                );
            }
        }
        AuditCommand::List => {
            for e in &entries {
                println!(
                    "{:>6}  {}  {:<10} {:<20} {}",
                    e.seq, e.record.at, e.record.actor, e.record.action, e.record.detail
                );
            }
        }
    }
    Ok(())
}
