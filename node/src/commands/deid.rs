//! `deid`: de-identify an archive, with progress and the run's summary.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use node::batch::{self, BatchPaths, RunSettings, Summary};
use node::catalog::Catalog;
use node::config::NodeConfig;
use node::deid::keys::Keys;
use node::deid::table::{self, DeidOption, RuleTable};
use node::deid::{DeidPolicy, Deidentifier};
use node::vault;

use super::data::open_data_dir;
use crate::DeidArgs;

pub(crate) fn policy_with(config: &NodeConfig, extra: &[String]) -> Result<DeidPolicy> {
    let mut policy = config.deid.policy()?;
    policy
        .options
        .extend(DeidPolicy::parse_options(extra.iter().map(String::as_str))?);
    policy.validate()?;
    Ok(policy)
}

/// Whether the de-identified outputs meet the consortium's required options: judged from the
/// options the catalog records for the run that wrote each output (a run with `--option`
/// counts), and from the configured profile only when the catalog records no output.
pub(crate) fn deid_requirements(
    config: &NodeConfig,
    needed: &[String],
) -> Result<Vec<node::curate::Finding>> {
    use node::curate::{Finding, Severity};
    let mut runs_of_outputs: std::collections::BTreeMap<i64, usize> = Default::default();
    if config.data_dir.join("catalog.sqlite").exists() {
        let catalog = Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
        for (r, run) in catalog.inputs()? {
            if r.outcome == node::catalog::RecordedOutcome::Written {
                *runs_of_outputs.entry(run).or_default() += 1;
            }
        }
        let total: usize = runs_of_outputs.values().sum();
        if total > 0 {
            let mut profiles = Vec::new();
            for (&run, &n) in &runs_of_outputs {
                let (_, options) = catalog.run_profile(run)?;
                profiles.push((options, n));
            }
            let mut findings = Vec::new();
            for option in needed {
                let without: usize = profiles
                    .iter()
                    .filter(|(options, _)| !options.split(',').any(|o| o == option))
                    .map(|(_, n)| n)
                    .sum();
                if without > 0 {
                    findings.push(Finding::new("deid-requirement-unmet", Severity::Error, None, &format!("the consortium needs de-identification option {option}; {without} of {total} outputs were made without it (see `catalog export`); re-run deid with --option {option} on a new output folder, or set it in node.toml")));
                }
            }
            return Ok(findings);
        }
    }
    let policy = config.deid.policy()?;
    Ok(needed
        .iter()
        .filter(|n| {
            !node::deid::table::DeidOption::from_config_name(n).is_some_and(|o| policy.has(o))
        })
        .map(|n| Finding::new("deid-requirement-unmet", Severity::Error, None, &format!("the consortium needs de-identification option {n}, which this node's profile does not provide; this node cannot join until it does")))
        .collect())
}

pub(crate) fn options_text(policy: &DeidPolicy) -> String {
    if policy.options.is_empty() {
        "basic".to_owned()
    } else {
        policy
            .options
            .iter()
            .map(|o| o.config_name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub(crate) fn print_profile_info(policy: &DeidPolicy) {
    let t = RuleTable::standard();
    let local = t.rules().iter().filter(|r| r.local).count();
    println!(
        "DICOM PS3.15 {} Table E.1-1, {} rows, and {local} rows of the node's local supplement",
        table::EDITION,
        t.rules().len() - local
    );
    println!(
        "text outside the table: removed unless on the shipped allow-list ({} attributes) or kept by this site ({})",
        node::deid::allow::TextAllowList::standard().len(),
        policy.keep_text_attributes.len()
    );
    let basic = table::basic_profile_code();
    println!(
        "profile   {} {} ({})",
        basic.scheme, basic.value, basic.meaning
    );
    if policy.options.is_empty() {
        println!("options   none (basic profile only)");
    }
    for o in DeidOption::ALL {
        let c = o.method_code();
        let mark = if policy.has(o) { "on " } else { "off" };
        println!(
            "  [{mark}] {:<36} {} {} ({})",
            o.config_name(),
            c.scheme,
            c.value,
            c.meaning
        );
    }
    println!(
        "date shift {}..={} days; age bands {:?}; descriptor allow-list {} phrases",
        policy.date_shift_days.start(),
        policy.date_shift_days.end(),
        policy.age_band_lower_bounds,
        policy.descriptor_allow_list.len()
    );
}

pub(crate) fn deid(config: &NodeConfig, args: DeidArgs) -> Result<()> {
    let policy = policy_with(config, &args.options)?;
    if args.profile_info {
        print_profile_info(&policy);
        return Ok(());
    }
    let Some(input) = args.input else {
        bail!("--input is required");
    };
    let mut dd = open_data_dir(config)?;
    let anonymise = config.deid.anonymises(args.anonymise);
    let secret = config.deid.secret(&dd.root, anonymise)?;
    let keys = Keys::derive(&secret);
    drop(secret);
    let vault_key = config.deid.vault_key(anonymise)?;
    let paths = BatchPaths {
        input,
        output: args.output.unwrap_or_else(|| dd.root.join("deid")),
        quarantine: dd.root.join("quarantine"),
    };
    let progress = progress_reporter();
    let subjects = config.deid.subject_rule()?;
    let settings = RunSettings {
        mode: if anonymise {
            "anonymise"
        } else {
            "pseudonymise"
        },
        edition: table::EDITION,
        options: options_text(&policy),
        vault_key: vault_key.as_ref(),
        batch_size: config.deid.batch_size,
        progress: progress.as_ref(),
        subjects: &subjects,
    };
    tracing::info!(
        edition = table::EDITION,
        options = %settings.options,
        mode = settings.mode,
        key = keys.fingerprint(),
        "de-identification started"
    );
    let deid = Deidentifier::new(&policy, &keys);
    let summary = batch::deidentify_folder(&paths, &deid, &mut dd.catalog, &settings)?;
    print_summary(&summary, &paths);
    Ok(())
}

/// A progress bar on a terminal.
#[derive(Debug)]
pub(crate) struct BarProgress(indicatif::ProgressBar);

impl batch::Progress for BarProgress {
    fn start(&self, total: u64, done: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Plain progress lines (for journald and pipes), at most every ten seconds.
#[derive(Debug)]
pub(crate) struct LogProgress {
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    last: Mutex<Instant>,
}

impl batch::Progress for LogProgress {
    fn start(&self, total: u64, done: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
        tracing::info!(total, already_done = done, "inputs found");
    }
    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last.elapsed() >= Duration::from_secs(10) {
            *last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                done,
                total = self.total.load(Ordering::Relaxed),
                files_per_s = (done as f64 / secs).round(),
                "progress"
            );
        }
    }
}

pub(crate) fn progress_reporter() -> Box<dyn batch::Progress> {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} inputs  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Box::new(BarProgress(bar))
    } else {
        Box::new(LogProgress {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
            last: Mutex::new(Instant::now()),
        })
    }
}

pub(crate) fn print_summary(summary: &Summary, paths: &BatchPaths) {
    println!("{summary}");
    println!("output        {}", paths.output.display());
    if summary.quarantined_total() > 0 {
        println!(
            "quarantine    {} (see `fedcurate-node quarantine list`)",
            paths.quarantine.display()
        );
    }
}

pub(crate) fn deidentifier_parts(
    config: &NodeConfig,
    root: &Path,
) -> Result<(DeidPolicy, Keys, Option<vault::VaultKey>)> {
    let policy = policy_with(config, &[])?;
    if config.deid.anonymises(false) {
        bail!("quarantine release needs the site secret: it is not available in anonymise mode");
    }
    let secret = config.deid.secret(root, false)?;
    Ok((policy, Keys::derive(&secret), config.deid.vault_key(false)?))
}
