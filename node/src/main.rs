//! `fedcurate-node`: the site node's command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use node::batch::{self, BatchPaths, Summary};
use node::config::NodeConfig;
use node::deid::keys::{Keys, Secret};
use node::deid::table::{self, DeidOption, RuleTable};
use node::deid::{DeidPolicy, Deidentifier};
use node::sample;

#[derive(Parser, Debug)]
#[command(
    name = "fedcurate-node",
    version,
    about = "fedcurate site node: de-identify, curate and export medical images without them leaving the hospital"
)]
struct Cli {
    /// Configuration file (default: the embedded deploy/node.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// De-identify a folder of DICOM files (PS3.15 Annex E).
    Deid(DeidArgs),
    /// Generate a sample archive and de-identify it: the node's job end to end.
    Demo {
        /// Work folder (default: a new folder under the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Manage the site secret.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
}

#[derive(clap::Args, Debug)]
struct DeidArgs {
    /// Print the standard's edition, the active options and their CID 7050 codes, then exit.
    #[arg(long)]
    profile_info: bool,
    /// Folder of original DICOM files.
    #[arg(long, required_unless_present = "profile_info")]
    input: Option<PathBuf>,
    /// Folder for the de-identified output (default: <data_dir>/deid).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Folder for refused originals (default: <data_dir>/quarantine).
    #[arg(long)]
    quarantine: Option<PathBuf>,
    /// Anonymise: a fresh random secret for this run only; the output cannot be re-linked.
    #[arg(long)]
    anonymise: bool,
    /// Add a profile option to those in the config (repeatable), e.g. retain-patient-characteristics.
    #[arg(long = "option", value_name = "NAME")]
    options: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
    /// Write a new random site secret (hex) to a file readable by its owner only.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FEDCURATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::embedded()?,
    };
    match cli.command {
        Command::Deid(args) => deid(&config, args),
        Command::Demo { dir } => demo(dir),
        Command::Secret {
            command: SecretCommand::Generate { out },
        } => generate_secret(&out),
    }
}

fn policy_with(config: &NodeConfig, extra: &[String]) -> Result<DeidPolicy> {
    let mut policy = config.deid.policy()?;
    policy
        .options
        .extend(DeidPolicy::parse_options(extra.iter().map(String::as_str))?);
    policy.validate()?;
    Ok(policy)
}

fn print_profile_info(policy: &DeidPolicy) {
    let t = RuleTable::standard();
    println!(
        "DICOM PS3.15 {} Table E.1-1, {} rows",
        table::EDITION,
        t.rules().len()
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

fn deid(config: &NodeConfig, args: DeidArgs) -> Result<()> {
    let policy = policy_with(config, &args.options)?;
    if args.profile_info {
        print_profile_info(&policy);
        return Ok(());
    }
    let Some(input) = args.input else {
        bail!("--input is required");
    };
    let secret = config.deid.secret(args.anonymise)?;
    let keys = Keys::derive(&secret);
    drop(secret);
    let paths = BatchPaths {
        input,
        output: args.output.unwrap_or_else(|| config.data_dir.join("deid")),
        quarantine: args
            .quarantine
            .unwrap_or_else(|| config.data_dir.join("quarantine")),
    };
    let anonymised = args.anonymise || config.deid.mode == node::config::DeidMode::Anonymise;
    tracing::info!(
        edition = table::EDITION,
        options = policy.options.len(),
        mode = if anonymised {
            "anonymise"
        } else {
            "pseudonymise"
        },
        key = keys.fingerprint(),
        "de-identification started"
    );
    let deid = Deidentifier::new(&policy, &keys);
    let summary = batch::deidentify_folder(&paths, &deid)?;
    print_summary(&summary, &paths);
    Ok(())
}

fn print_summary(summary: &Summary, paths: &BatchPaths) {
    println!("{summary}");
    println!("output        {}", paths.output.display());
    if summary.quarantined_total() > 0 {
        println!(
            "quarantine    {} (reasons in *.reason.json)",
            paths.quarantine.display()
        );
    }
}

fn generate_secret(out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; refusing to overwrite a site secret (it would break linkage with earlier batches)",
            out.display()
        );
    }
    let secret = Secret::random()?;
    batch::write_atomically(out, format!("{}\n", secret.to_hex()).as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))?;
    }
    println!(
        "site secret written to {} (fingerprint {})",
        out.display(),
        secret.fingerprint()
    );
    Ok(())
}

fn demo(dir: Option<PathBuf>) -> Result<()> {
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
    let secret_path = dir.join("site.secret");
    generate_secret(&secret_path)?;
    let secret = Secret::from_hex(&std::fs::read_to_string(&secret_path)?)?;
    let keys = Keys::derive(&secret);
    let mut policy = DeidPolicy::default();
    policy
        .options
        .insert(DeidOption::RetainPatientCharacteristics);
    policy
        .options
        .insert(DeidOption::RetainLongitudinalModifiedDates);
    policy.options.insert(DeidOption::CleanDescriptors);
    policy.descriptor_allow_list = vec!["CT CHEST WITH CONTRAST".into()];
    policy.validate()?;
    print_profile_info(&policy);
    let paths = BatchPaths {
        input: archive.root.clone(),
        output: dir.join("deid"),
        quarantine: dir.join("quarantine"),
    };
    let summary = batch::deidentify_folder(&paths, &Deidentifier::new(&policy, &keys))?;
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
    if leaks > 0 {
        bail!("the demo found identifying values in the output");
    }
    Ok(())
}
