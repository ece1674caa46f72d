//! `check-config`, `status`, `purge`: what hospital IT runs to operate a node.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use node::audit;
use node::config::NodeConfig;

use super::data::open_catalog;

/// `check-config`: every problem with the configuration, each with its fix.
pub(crate) fn check_config(config: &NodeConfig, path: Option<&Path>, online: bool) -> Result<()> {
    let problems = node::health::check_config(config, online);
    let source = path.map_or("the embedded default".to_owned(), |p| {
        p.display().to_string()
    });
    for p in &problems {
        let tag = match p.level {
            node::health::Level::Error => "error",
            node::health::Level::Warning => "warning",
        };
        println!(
            "{tag:<8} {:<26} {}
         {:<26} fix: {}",
            p.code, p.what, "", p.fix
        );
    }
    let errors = problems
        .iter()
        .filter(|p| p.level == node::health::Level::Error)
        .count();
    if errors > 0 {
        bail!("{source}: {errors} problem(s) to fix before the node can run");
    }
    println!(
        "{source}: the configuration is usable ({} warning(s))",
        problems.len()
    );
    Ok(())
}

/// `status`: what the node has done, for hospital IT.
pub(crate) fn status(config: &NodeConfig, json: bool) -> Result<()> {
    let s = node::health::status(config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        let when = |t: Option<i64>| t.map_or("never".to_owned(), audit::format_utc);
        println!("data directory        {}", config.data_dir.display());
        println!("de-identified         {}", s.written);
        println!("duplicates            {}", s.duplicates);
        println!(
            "quarantined           {} ({} not released)",
            s.quarantined, s.quarantine_open
        );
        println!("inbox depth           {}", s.inbox_depth);
        println!("harmonised volumes    {}", s.harmonised);
        println!("messages to the coordinator {}", s.messages_sent);
        println!(
            "last coordinator contact {}",
            when(s.last_federation_contact)
        );
        println!("certificate expires   {}", when(s.certificate_expiry));
        if let Some(r) = s.deid_rate {
            println!("last run rate         {r:.1} inputs/s");
        }
    }
    Ok(())
}

/// `purge`: remove what the retention settings say has expired.
pub(crate) fn purge(config: &NodeConfig, dry_run: bool, output: Option<PathBuf>) -> Result<()> {
    let out = output.unwrap_or_else(|| config.data_dir.join("deid"));
    let p = node::purge::purge(config, &out, dry_run)?;
    if !dry_run && p != node::purge::Purged::default() {
        let mut catalog = open_catalog(config)?;
        catalog.audit(&audit::AuditRecord::now("purge", serde_json::to_value(&p)?))?;
    }
    println!(
        "{} {} quarantined originals, {} temporary files, {} outputs ({} bytes)",
        if dry_run { "would remove" } else { "removed" },
        p.quarantined,
        p.temporaries,
        p.outputs,
        p.bytes
    );
    Ok(())
}
