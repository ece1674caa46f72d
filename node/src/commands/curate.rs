//! `curate`: the curation report of a folder, against the consortium's schema.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use node::batch::{self};
use node::config::NodeConfig;

use super::data::{open_data_dir, site_tokens};
use super::deid::deid_requirements;

pub(crate) fn curate(
    config: &NodeConfig,
    input: Option<PathBuf>,
    schema_path: Option<PathBuf>,
    out: &Path,
) -> Result<()> {
    use node::curate::{Finding, Severity};
    let input = input.unwrap_or_else(|| config.data_dir.join("deid"));
    let schema = match &schema_path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let s = protocol::schema::CurationSchema::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let h = protocol::schema::schema_hash(&text);
            Some((s, node::deid::keys::hex(&h.0)))
        }
        None => None,
    };
    let mut site = Vec::new();
    if let Some((s, _)) = &schema {
        site.extend(deid_requirements(config, &s.deidentification.options)?);
    }
    // What the catalog knows: conflicts and duplicates the de-identifier resolved.
    if config.data_dir.join("catalog.sqlite").exists() {
        let dd = open_data_dir(config)?;
        let rows = dd.catalog.inputs()?;
        let conflicts = rows
            .iter()
            .filter(|(r, _)| r.reason.as_deref() == Some("uid-conflict"))
            .count();
        if conflicts > 0 {
            site.push(Finding::new("uid-conflict", Severity::Warning, None, &format!("{conflicts} inputs had the SOP Instance UID of another instance with different content; the first was kept, the others quarantined")));
        }
        let duplicates = rows
            .iter()
            .filter(|(r, _)| r.outcome == node::catalog::RecordedOutcome::Duplicate)
            .count();
        if duplicates > 0 {
            site.push(Finding::new(
                "duplicate-instances",
                Severity::Info,
                None,
                &format!(
                    "{duplicates} inputs were identical copies of instances already de-identified"
                ),
            ));
        }
        let mut per_study: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        for (r, _) in &rows {
            if let Some(study) = &r.study {
                let e = per_study.entry(study.clone()).or_default();
                match r.outcome {
                    node::catalog::RecordedOutcome::Written => e.0 += 1,
                    node::catalog::RecordedOutcome::Duplicate => e.1 += 1,
                    _ => {}
                }
            }
        }
        let twice = per_study.values().filter(|(w, d)| *w > 0 && d >= w).count();
        if twice > 0 {
            site.push(Finding::new(
                "study-imported-twice",
                Severity::Warning,
                None,
                &format!("{twice} studies were imported again in full"),
            ));
        }
    }
    let report = node::curate::report::curate(
        &input,
        schema.as_ref().map(|(s, h)| (s, h.clone())),
        site,
        &site_tokens(config)?,
    )?;
    std::fs::create_dir_all(out)?;
    batch::write_atomically(
        &out.join("report.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    batch::write_atomically(
        &out.join("report.html"),
        node::curate::report::html(&report).as_bytes(),
    )?;
    println!(
        "curated {} instances in {} series; report in {}",
        report.instances,
        report.series.len(),
        out.display()
    );
    for (code, n) in &report.counts {
        println!("  {code:<32} {n}");
    }
    Ok(())
}
