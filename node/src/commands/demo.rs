//! `demo`: the single-site walk-through on the embedded sample archive.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use node::audit::{self};
use node::batch::{self, BatchPaths, RunSettings};
use node::config::{self};
use node::deid::Deidentifier;
use node::deid::keys::Keys;
use node::deid::table;
use node::sample;
use node::vault;

use super::data::open_data_dir_with;
use super::deid::{options_text, print_profile_info, print_summary};
use super::secrets::generate_secret;

pub(crate) fn demo(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("fedcurate-demo-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder with --dir",
            dir.display()
        );
    }
    let archive = sample::write_sample_archive(&dir.join("archive"))?;
    println!(
        "sample archive: {} files in {}",
        archive.files.len(),
        archive.root.display()
    );
    let root = dir.join("data");
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating the data directory {}", root.display()))?;
    let cfg = config::DeidConfig {
        options: vec![
            "retain-patient-characteristics".into(),
            "retain-longitudinal-modified-dates".into(),
            "clean-descriptors".into(),
        ],
        descriptor_allow_list: vec!["CT CHEST WITH CONTRAST".into()],
        ..config::DeidConfig::default()
    };
    let policy = cfg.policy()?;
    let secret = cfg.secret(&root, false)?;
    let mut dd = open_data_dir_with(&root, audit::AuditKey::from_secret(&secret))?;
    println!(
        "site secret   {} (fingerprint {})",
        cfg.secret_path(&dd.root).display(),
        secret.fingerprint()
    );
    let keys = Keys::derive(&secret);
    let vault_path = dd.root.join("vault.key");
    let vault_key = vault::VaultKey::from_hex(&generate_secret(&vault_path)?.to_hex())?;
    print_profile_info(&policy);
    let paths = BatchPaths {
        input: archive.root.clone(),
        output: dir.join("deid"),
        quarantine: dd.root.join("quarantine"),
    };
    let settings = RunSettings {
        mode: "pseudonymise",
        edition: table::EDITION,
        options: options_text(&policy),
        vault_key: Some(&vault_key),
        batch_size: 8,
        progress: &batch::NoProgress,
        subjects: &node::volume::deid::SubjectRule::default(),
    };
    let deid = Deidentifier::new(&policy, &keys);
    let summary = batch::deidentify_folder(&paths, &deid, &mut dd.catalog, &settings)?;
    print_summary(&summary, &paths);
    // Prove the point: no identifying value of the archive survives in any output byte or path.
    let mut leaks = 0usize;
    for file in batch::list_inputs(&paths.output)? {
        let bytes = std::fs::read(&file)?;
        let rel = file
            .strip_prefix(&paths.output)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        for value in &archive.identifying {
            let found_in_bytes = bytes.windows(value.len()).any(|w| w == value.as_bytes());
            if found_in_bytes || rel.contains(value.as_str()) {
                leaks += 1;
            }
        }
    }
    println!(
        "leak check    {leaks} identifying values found in the output ({} checked in every file)",
        archive.identifying.len()
    );
    // Resuming is a no-op: everything is recorded.
    let again = batch::deidentify_folder(&paths, &deid, &mut dd.catalog, &settings)?;
    println!(
        "re-run        {} of {} inputs already done, nothing rewritten",
        again.done_before, again.inputs
    );
    println!(
        "catalog       {} (re-identification map: {} patients, key {})",
        dd.root.join("catalog.sqlite").display(),
        dd.catalog.vault_len()?,
        vault_path.display()
    );
    let n = audit::verify(
        &dd.catalog.audit_entries()?,
        &dd.catalog.audit_key_in_use()?,
        dd.catalog.audit_head().as_deref(),
    )?
    .entries;
    println!("audit chain   intact, {n} entries");
    if leaks > 0 {
        bail!("the demo found identifying values in the output");
    }
    // Curate against the example consortium schema, export for training code, harmonise.
    let schema_text = include_str!("../../../deploy/schema.toml");
    let schema = protocol::schema::CurationSchema::parse(schema_text)?;
    let hash = node::deid::keys::hex(&protocol::schema::schema_hash(schema_text).0);
    let tokens = keys.tokens();
    let report =
        node::curate::report::curate(&paths.output, Some((&schema, hash)), Vec::new(), &tokens)?;
    let curation = dir.join("curation");
    batch::write_atomically(
        &curation.join("report.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    batch::write_atomically(
        &curation.join("report.html"),
        node::curate::report::html(&report).as_bytes(),
    )?;
    let count = |code: &str| report.counts.get(code).copied().unwrap_or(0);
    println!(
        "curation      {} series: {} in scope, {} deviating, {} out of scope; report {}",
        report.series.len(),
        count("protocol-in-scope"),
        count("protocol-deviating"),
        count("protocol-out-of-scope"),
        curation.join("report.html").display()
    );
    let export_opts = |format| node::export::ExportOptions {
        compress: Default::default(),
        format,
        dataset_id: 500,
        dataset_name: "demo".into(),
        seed: 0,
        fractions: [0.7, 0.15, 0.15],
        stratify: node::export::Stratify::Modality,
        harmonised: None,
        tokens: tokens.clone(),
        labels: None,
    };
    let nifti_dir = dir.join("export-nifti");
    let e = node::export::export(
        &paths.output,
        &nifti_dir,
        &export_opts(node::export::Format::Nifti),
        &|h: &str| dd.catalog.is_own_output(h).unwrap_or(false),
    )?;
    println!(
        "export        {} volumes as NIfTI with manifest in {}",
        e.volumes,
        nifti_dir.display()
    );
    let nn_dir = dir.join("export-nnunet");
    let e = node::export::export(
        &paths.output,
        &nn_dir,
        &export_opts(node::export::Format::NnUnet),
        &|h: &str| dd.catalog.is_own_output(h).unwrap_or(false),
    )?;
    println!(
        "export        nnU-Net dataset in {} (train {} / validation {} / test {} cases, split by patient)",
        nn_dir.display(),
        e.splits[0],
        e.splits[1],
        e.splits[2]
    );
    Ok(())
}
