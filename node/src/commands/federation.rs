//! `federate` and `egress`: the session with the coordinator, and hospital IT's approvals.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use node::audit::{self};
use node::config::NodeConfig;

use super::data::open_catalog;
use crate::EgressCommand;

pub(crate) fn federate(
    config: &NodeConfig,
    once: bool,
    wait_model: u64,
    input: Option<PathBuf>,
) -> Result<()> {
    use node::site::Site;
    if config.federation.is_none() {
        bail!(
            "add a [federation] section to the node configuration (see deploy/node.toml) to join a consortium"
        );
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let site = Site::new(
        config,
        input.unwrap_or_else(|| config.data_dir.join("deid")),
    )?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let endpoint = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
            .context("opening a UDP socket for QUIC")?;
        if once {
            let wait = (wait_model > 0).then(|| std::time::Duration::from_secs(wait_model));
            let out = site.run_once(&endpoint, wait).await?;
            if let Some((round, model)) = out.welcome {
                println!("welcomed: round {round}, model revision {model}");
            }
            if out.fetched_schema {
                println!("fetched the consortium schema");
            }
            if out.acknowledged {
                println!("acknowledged the schema");
            }
            if let Some(r) = out.reported {
                println!("reported the aggregates of round {r}");
            }
            if let Some(m) = out.applied_model {
                println!(
                    "applied harmonisation model revision {m} to {} volumes ({})",
                    out.harmonised,
                    config.data_dir.join("harmonised").display()
                );
            }
        } else {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            let stop = async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            site.run(&endpoint, stop).await;
            println!("stopped");
        }
        endpoint.close(0u32.into(), b"node stopping");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        Ok(())
    })
}

pub(crate) fn egress(
    config: &NodeConfig,
    json: bool,
    command: Option<EgressCommand>,
) -> Result<()> {
    let approvals = node::site::approval::Approvals::at(&config.data_dir.join("federation"));
    let jobs = fc_training::approval::JobApprovals::at(&config.data_dir.join("training"));
    match command {
        Some(EgressCommand::Pending) => {
            if let Some(j) = jobs.pending() {
                if json {
                    println!("{}", serde_json::to_string(&j)?);
                } else {
                    println!("a training job waits for approval; each round would send:");
                    for i in &j.items {
                        println!("  + {i}");
                    }
                }
            }
            match approvals.pending() {
                None if jobs.pending().is_some() => {
                    println!("approve with `fedcurate-node egress approve`")
                }
                None => println!("nothing waits for approval"),
                Some(p) if json => println!("{}", serde_json::to_string(&p)?),
                Some(p) => {
                    println!(
                        "schema {} revision {} (digest {}) differs from what was approved:",
                        p.schema_id,
                        p.schema_revision,
                        &p.digest[..16.min(p.digest.len())]
                    );
                    for i in &p.removed {
                        println!("  - {i}");
                    }
                    for i in &p.items {
                        println!("  + {i}");
                    }
                    println!(
                        "'+' would leave this site for the first time, or more loosely than approved; '-' was approved and no longer leaves"
                    );
                    println!("approve with `fedcurate-node egress approve`");
                }
            }
            return Ok(());
        }
        Some(EgressCommand::Approve) => {
            let job = jobs.approve()?;
            if let Some(j) = &job {
                let mut catalog = open_catalog(config)?;
                catalog.audit(&audit::AuditRecord::now(
                    "egress-approve",
                    serde_json::json!({ "training_job": j.job, "hash": j.hash, "approved": j.items }),
                ))?;
                println!(
                    "approved training job {}; the node joins it at its next contact",
                    j.job
                );
            }
            let items = approvals.approve()?;
            if items.is_empty() {
                if job.is_none() {
                    println!("nothing waits for approval");
                }
                return Ok(());
            }
            let mut catalog = open_catalog(config)?;
            catalog.audit(&audit::AuditRecord::now(
                "egress-approve",
                serde_json::json!({ "approved": items }),
            ))?;
            println!(
                "approved {} kinds of release; they leave at the next synchronisation",
                items.len()
            );
            return Ok(());
        }
        Some(EgressCommand::Ledger) => {
            let catalog = node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
            let rows = catalog.releases()?;
            let mut spent: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
            for r in &rows {
                if json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    println!(
                        "{:<20} {:<20} round {:<3} {:<22} eps {:.3} delta {:.1e} ({} patients)",
                        r.at,
                        r.dataset,
                        r.round,
                        r.outcome,
                        r.epsilon,
                        r.delta,
                        r.patients.len()
                    );
                }
                if r.outcome == "released" {
                    let e = spent.entry(r.dataset.as_str()).or_default();
                    e.0 += r.epsilon;
                    e.1 += r.delta;
                }
            }
            if !json {
                for (d, (e, dl)) in spent {
                    println!("spent on {d}: eps {e:.3}, delta {dl:.1e}");
                }
            }
            return Ok(());
        }
        None => {}
    }
    let catalog = node::catalog::Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
    let rows = catalog.egress()?;
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{:<20} {:<13} {:>8} {:<16} answer",
        "at", "kind", "bytes", "sha256"
    );
    for r in &rows {
        println!(
            "{:<20} {:<13} {:>8} {:<16} {}",
            r.at,
            r.kind,
            r.bytes,
            &r.sha256[..16.min(r.sha256.len())],
            r.answer
        );
    }
    println!("{} messages left this node", rows.len());
    if let Some(p) = approvals.pending() {
        println!(
            "{} new kinds of release wait for approval: `fedcurate-node egress pending`",
            p.items.len()
        );
    }
    Ok(())
}
