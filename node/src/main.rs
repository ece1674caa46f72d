//! `fedcurate-node`: the site node's command line.

mod consortium;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use node::audit::{self, AuditRecord};
use node::batch::{self, BatchPaths, RunSettings, Summary};
use node::catalog::Catalog;
use node::config::{self, NodeConfig};
use node::deid::keys::{Keys, Secret};
use node::deid::table::{self, DeidOption, RuleTable};
use node::deid::{DeidPolicy, Deidentifier};
use node::sample;
use node::vault;

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
    /// Override the config's data directory.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
    /// Make the site's key pair and a certificate signing request for the consortium's CA.
    Request {
        /// The site's name in the consortium (the certificate's subject).
        #[arg(long)]
        site: String,
        /// Folder for site.key (0600) and site.csr.
        #[arg(long, default_value = "pki")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// De-identify a folder of DICOM files (PS3.15 Annex E); re-running resumes.
    Deid(DeidArgs),
    /// Generate a sample archive and de-identify it: the node's job end to end.
    Demo {
        /// Work folder (default: a new folder under the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A whole consortium on this machine: CA, coordinator and three site nodes as separate
    /// processes; ingest (one site over DICOM), de-identification, approval, aggregates, the
    /// federated Nyúl model, the report. Needs `fedcurate-coordinator` next to this binary.
    ConsortiumDemo {
        /// Work folder (default: a new folder under the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Patients per site.
        #[arg(long, default_value_t = 8)]
        patients: usize,
    },
    /// Write a synthetic archive (for trying the node, and for measuring it).
    Sample {
        /// Folder to write (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Patients, one CT series each.
        #[arg(long, default_value_t = 20)]
        patients: usize,
        /// Slices per series.
        #[arg(long, default_value_t = 50)]
        slices: u16,
        /// Rows and columns of each slice.
        #[arg(long, default_value_t = 8)]
        matrix: u16,
    },
    /// Measure de-identification against a read-and-write-back baseline (not a test).
    Bench {
        /// Work folder (default: a new folder under the system's temporary directory; removed
        /// afterwards unless --keep).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Number of 512×512 16-bit CT files to generate.
        #[arg(long, default_value_t = 2000)]
        files: usize,
        /// Inputs per durable batch, for both phases.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Keep the generated archive and outputs.
        #[arg(long)]
        keep: bool,
        /// Measure series assembly and NIfTI writing instead (a 512x512 series of this many slices).
        #[arg(long)]
        volume: Option<usize>,
        /// Measure every harmonisation method on a volume of this many voxels per side instead.
        #[arg(long)]
        harmonise: Option<usize>,
        /// With --harmonise: also time the Python reference (intensity-normalization 2.2.4,
        /// one thread) on the same machine and print the ratios.
        #[arg(long)]
        reference: bool,
        /// Measure curation over this many generated instances instead (100 per series).
        #[arg(long)]
        curate: Option<usize>,
    },
    /// Export de-identified series for training code (NIfTI volumes, or nnU-Net v2 layout).
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Export folder.
        #[arg(long)]
        out: PathBuf,
        /// Folder of de-identified DICOM (default: <data_dir>/deid).
        #[arg(long)]
        input: Option<PathBuf>,
        /// nnU-Net dataset id.
        #[arg(long, default_value_t = 500)]
        dataset_id: u16,
        /// nnU-Net dataset name.
        #[arg(long, default_value = "fedcurate")]
        dataset_name: String,
        /// Seed of the train/validation/test assignment.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fractions of patients in train, validation, test.
        #[arg(long, value_delimiter = ',', default_values_t = [0.7, 0.15, 0.15])]
        split: Vec<f64>,
        /// Category the splits are stratified by.
        #[arg(long, value_enum, default_value = "modality")]
        stratify: StratifyBy,
        /// Use the harmonised volumes in this folder (made by `harmonise` from a NIfTI export).
        #[arg(long)]
        harmonised: Option<PathBuf>,
    },
    /// Harmonise the intensities of NIfTI volumes (e.g. an `export --format nifti` folder).
    Harmonise(HarmoniseArgs),
    /// The site's certificate for the consortium (the key never leaves this machine).
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Receive DICOM over the network (Storage SCP: C-ECHO, C-STORE) and de-identify what
    /// arrives, with the same guarantees as `deid`.
    Serve {
        /// Folder for the de-identified output (default: <data_dir>/deid).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Retrieve studies from a PACS (C-FIND at study level, C-MOVE to this node's SCP) and
    /// de-identify them; a partial retrieval resumes where it stopped.
    Pull {
        /// The PACS as AE@host:port.
        #[arg(long)]
        from: String,
        /// Accession numbers (repeatable). Identifiers on the command line are visible in
        /// `ps`, shell history and the journal: prefer `--csv FILE` or `--csv -` (stdin).
        #[arg(long = "accession")]
        accessions: Vec<String>,
        /// Patient IDs (repeatable); the same caution as `--accession`.
        #[arg(long = "patient-id")]
        patient_ids: Vec<String>,
        /// Study date range YYYYMMDD-YYYYMMDD.
        #[arg(long)]
        date_range: Option<String>,
        /// CSV with a header naming `accession_number` and/or `patient_id` columns; `-` reads
        /// it from standard input (keeps identifiers out of argv and shell history).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Folder for the de-identified output (default: <data_dir>/deid).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Curate the de-identified data: conformance, duplicates, series consistency, geometry,
    /// protocol conformance against the consortium schema, quality metrics.
    Curate {
        /// Folder of de-identified DICOM (default: <data_dir>/deid).
        #[arg(long)]
        input: Option<PathBuf>,
        /// The consortium curation schema (TOML).
        #[arg(long)]
        schema: Option<PathBuf>,
        /// Folder for report.json and report.html.
        #[arg(long)]
        out: PathBuf,
    },
    /// The catalog of everything done.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Inputs the node refused.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Manage the site secret.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Look up the original identifiers behind a pseudonym (needs the vault key; audited).
    Reidentify {
        pseudonym: String,
        /// Which identifier to print.
        #[arg(long, value_enum, default_value = "patient-id")]
        field: Field,
    },
    /// The audit chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Join the consortium ([federation] in the config): fetch and acknowledge the schema,
    /// report aggregates, apply the federated harmonisation model. Runs as a service until
    /// SIGTERM, or once with --once.
    Federate {
        /// Synchronise once and exit.
        #[arg(long)]
        once: bool,
        /// With --once: wait up to this many seconds for the harmonisation model.
        #[arg(long, default_value_t = 0)]
        wait_model: u64,
        /// De-identified DICOM to compute aggregates from (default: <data_dir>/deid).
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Check the configuration (paths, permissions of secrets and keys, certificates and
    /// their expiry, the schema's de-identification requirements) and say what to fix.
    CheckConfig {
        /// Also connect to the coordinator.
        #[arg(long)]
        online: bool,
    },
    /// Queue depths, outcomes, last contact with the coordinator, certificate expiry.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the status as Prometheus metrics on a loopback address (GET /metrics).
    Metrics {
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: std::net::SocketAddr,
    },
    /// Remove what [retention] allows (quarantined originals, temporary files, optionally
    /// outputs); recorded in the audit chain.
    Purge {
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Folder of de-identified output (default: <data_dir>/deid).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// The egress log: every message that left for the coordinator (kind, size, SHA-256,
    /// answer); the approval queue; the privacy ledger.
    Egress {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<EgressCommand>,
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
    /// Anonymise: a fresh random secret for this run only; the output cannot be re-linked.
    #[arg(long)]
    anonymise: bool,
    /// Add a profile option to those in the config (repeatable), e.g. retain-patient-characteristics.
    #[arg(long = "option", value_name = "NAME")]
    options: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum EgressCommand {
    /// Show what a new schema would make leave, waiting for approval.
    Pending,
    /// Approve what is pending (recorded in the audit chain).
    Approve,
    /// The privacy ledger: every release or refusal, the ε and δ it spent, per dataset.
    Ledger,
}

#[derive(Subcommand, Debug)]
enum CatalogCommand {
    /// Write the catalog as JSON lines (pseudonymous keys, hashes, outcomes, reasons).
    Export {
        /// File to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum QuarantineCommand {
    /// List quarantined inputs with their reasons.
    List {
        /// Include entries already released.
        #[arg(long)]
        all: bool,
    },
    /// Show one entry's parser detail, for review on this machine. The detail may quote bytes
    /// of the original file (identifying): it is never logged, exported or sent anywhere.
    Show {
        /// The entry's id (a prefix of its content hash is enough).
        id: String,
    },
    /// Retry a quarantined input with the current configuration (after review).
    Release {
        /// The entry's id (a prefix of its content hash is enough).
        id: String,
        /// Output folder (default: <data_dir>/deid).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
    /// Re-encrypt the re-identification map under a new key (pseudonyms and linkage do not
    /// change); then point vault_key_file at the new key.
    RotateVault {
        /// The new key (make one with `secret generate`).
        #[arg(long)]
        new_key: PathBuf,
    },
    /// Write a new random secret (hex) to a file readable by its owner only.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Copy the site secret to a backup file (owner-only).
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a backed-up site secret in place (refuses to replace a different one).
    Restore {
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check that no audit entry was edited, removed or reordered.
    Verify,
    /// Print the audit entries.
    List,
}

#[derive(clap::Args, Debug)]
struct HarmoniseArgs {
    /// Folder of NIfTI volumes.
    #[arg(long)]
    input: PathBuf,
    /// Output folder (mirrors the input's names, float32 NIfTI, plus model.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum)]
    method: MethodName,
    /// MR contrast for KDE and WhiteStripe (from the protocol, not from image descriptions).
    #[arg(long, value_enum, default_value = "t1")]
    contrast: ContrastName,
    /// WhiteStripe width.
    #[arg(long, default_value_t = 0.05)]
    stripe_width: f64,
    /// Percentile clipping bounds.
    #[arg(long, default_value_t = 1.0)]
    low: f64,
    #[arg(long, default_value_t = 99.0)]
    high: f64,
    /// μ ± nσ.
    #[arg(long, default_value_t = 3.0)]
    n_sigma: f64,
    /// Discretisation: number of bins (IBSI FBN).
    #[arg(long, default_value_t = 32)]
    bins: u32,
    /// Discretisation: bin width (IBSI FBS, pyradiomics binWidth).
    #[arg(long, default_value_t = 25.0)]
    bin_width: f64,
    /// Discretisation: lower bound of the re-segmentation range (IBSI FBS).
    #[arg(long)]
    lower: Option<f64>,
    /// CT window centre and width (HU), and function.
    #[arg(long, default_value_t = 40.0)]
    window_center: f64,
    #[arg(long, default_value_t = 400.0)]
    window_width: f64,
    #[arg(long, value_enum, default_value = "linear")]
    window_function: WindowName,
    /// Foreground: Otsu (default) or the reference's > 0 convention.
    #[arg(long, value_enum, default_value = "otsu")]
    foreground: ForegroundName,
    /// Folder of label maps mirroring the input names; voxels > 0 are the foreground.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// CT: exclude voxels at or below this padding value (e.g. -2000) from the statistics.
    #[arg(long, allow_hyphen_values = true)]
    padding_value: Option<f64>,
    /// Apply this saved model instead of fitting one.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MethodName {
    MinMax,
    Percentile,
    MuSigmaIbsi,
    MuSigmaPyradiomics,
    Zscore,
    Kde,
    Whitestripe,
    Fcm,
    Nyul,
    Lsq,
    CtWindow,
    CtNnunet,
    Fbn,
    Fbs,
    PyradiomicsBinWidth,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ContrastName {
    T1,
    T2,
    Flair,
    Pd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WindowName {
    Linear,
    LinearExact,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ForegroundName {
    Otsu,
    Positive,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StratifyBy {
    None,
    Modality,
    Sex,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExportFormat {
    Nifti,
    Nnunet,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Field {
    PatientId,
    Issuer,
    Name,
    BirthDate,
    All,
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
    let mut config = match &cli.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::embedded()?,
    };
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    match cli.command {
        Command::Deid(args) => deid(&config, args),
        Command::Demo { dir } => demo(dir),
        Command::ConsortiumDemo { dir, patients } => consortium::run_demo(dir, patients),
        Command::Export {
            format,
            out,
            input,
            dataset_id,
            dataset_name,
            seed,
            split,
            stratify,
            harmonised,
        } => {
            let input = input.unwrap_or_else(|| config.data_dir.join("deid"));
            let fractions = match split.as_slice() {
                [a, b, c] => [*a, *b, *c],
                _ => bail!("--split takes three fractions: train,validation,test"),
            };
            let opts = node::export::ExportOptions {
                format: match format {
                    ExportFormat::Nifti => node::export::Format::Nifti,
                    ExportFormat::Nnunet => node::export::Format::NnUnet,
                },
                dataset_id,
                dataset_name,
                seed,
                fractions,
                stratify: match stratify {
                    StratifyBy::None => node::export::Stratify::None,
                    StratifyBy::Modality => node::export::Stratify::Modality,
                    StratifyBy::Sex => node::export::Stratify::Sex,
                },
                harmonised,
                tokens: site_tokens(&config)?,
            };
            // Only the catalog is opened (SQLite serialises access), so export can run while
            // the node ingests.
            let catalog_path = config.data_dir.join("catalog.sqlite");
            let catalog = if catalog_path.exists() {
                Some(Catalog::open(&catalog_path)?)
            } else {
                None
            };
            let recorded = |h: &str| {
                catalog
                    .as_ref()
                    .is_some_and(|c| c.is_own_output(h).unwrap_or(false))
            };
            let s = node::export::export(&input, &out, &opts, &recorded)?;
            println!(
                "exported {} volumes of {} patients to {} ({} series skipped: no geometry or undecodable)",
                s.volumes,
                s.patients,
                out.display(),
                s.skipped
            );
            if matches!(format, ExportFormat::Nnunet) {
                println!(
                    "splits by patient: train {} / validation {} / test {} cases",
                    s.splits[0], s.splits[1], s.splits[2]
                );
            }
            Ok(())
        }
        Command::Pki {
            command: PkiCommand::Request { site, out },
        } => {
            let (key, csr) = node::pki::write_site_request(&site, &out)?;
            println!("key     {} (0600: stays on this machine)", key.display());
            println!("request {}", csr.display());
            println!(
                "send the request to the consortium; it runs `fedcurate-coordinator pki sign-request {site} site.csr`"
            );
            Ok(())
        }
        Command::Bench {
            dir,
            files,
            batch_size,
            keep,
            volume,
            harmonise,
            reference,
            curate,
        } => match (volume, harmonise, curate) {
            (Some(slices), _, _) => bench_volume(dir, slices, keep),
            (None, Some(n), _) => bench_harmonise(dir, n, reference),
            (None, None, Some(n)) => {
                let dir = dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("fedcurate-cbench-{}", std::process::id()))
                });
                let (count, header, full) = node::bench::curate(&dir, n.div_ceil(100), 100)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!(
                    "{count} instances (128x128 CT), {} threads",
                    rayon::current_num_threads()
                );
                println!(
                    "header-only conformance checks   {:>8.3} s  {:>8.0} instances/s",
                    header.as_secs_f64(),
                    count as f64 / header.as_secs_f64()
                );
                println!(
                    "full curation (pixels, volumes)  {:>8.3} s  {:>8.0} instances/s",
                    full.as_secs_f64(),
                    count as f64 / full.as_secs_f64()
                );
                if !keep {
                    std::fs::remove_dir_all(&dir)?;
                }
                Ok(())
            }
            (None, None, None) => bench(dir, files, batch_size, keep),
        },
        Command::Sample {
            out,
            patients,
            slices,
            matrix,
        } => {
            if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
                bail!("{} is not empty", out.display());
            }
            let files = sample::write_bulk_archive_sized(&out, patients, slices, matrix)?;
            println!("{} files written to {}", files.len(), out.display());
            Ok(())
        }
        Command::Catalog {
            command: CatalogCommand::Export { out },
        } => export(&config, out.as_deref()),
        Command::Quarantine { command } => quarantine(&config, command),
        Command::Secret { command } => secret(&config, command),
        Command::Harmonise(args) => harmonise(&config, args),
        Command::Serve { output } => serve(&config, output),
        Command::Federate {
            once,
            wait_model,
            input,
        } => federate(&config, once, wait_model, input),
        Command::Egress { json, command } => egress(&config, json, command),
        Command::CheckConfig { online } => {
            let problems = node::health::check_config(&config, online);
            let source = cli
                .config
                .as_ref()
                .map_or("the embedded default".to_owned(), |p| {
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
        Command::Status { json } => {
            let s = node::health::status(&config)?;
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
        Command::Metrics { listen } => Ok(node::health::serve_metrics(&config, listen)?),
        Command::Purge { dry_run, output } => {
            let out = output.unwrap_or_else(|| config.data_dir.join("deid"));
            let p = node::purge::purge(&config, &out, dry_run)?;
            if !dry_run && p != node::purge::Purged::default() {
                let mut catalog = open_catalog(&config)?;
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
        Command::Pull {
            from,
            accessions,
            patient_ids,
            date_range,
            csv,
            output,
        } => pull(
            &config,
            &from,
            accessions,
            patient_ids,
            date_range,
            csv,
            output,
        ),
        Command::Curate { input, schema, out } => curate(&config, input, schema, &out),
        Command::Reidentify { pseudonym, field } => reidentify(&config, &pseudonym, field),
        Command::Audit { command } => audit_cmd(&config, command),
    }
}

/// The data directory, locked for this process, and its catalog.
struct DataDir {
    root: PathBuf,
    catalog: Catalog,
    _lock: File,
}

fn open_data_dir(config: &NodeConfig) -> Result<DataDir> {
    open_data_dir_with(&config.data_dir, config.audit_key()?)
}

/// A catalog of this node, its audit chain MACed with the configured key.
fn open_catalog(config: &NodeConfig) -> Result<Catalog> {
    let mut c = Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
    c.set_audit_key(config.audit_key()?);
    Ok(c)
}

fn open_data_dir_with(root: &Path, audit_key: audit::AuditKey) -> Result<DataDir> {
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

fn policy_with(config: &NodeConfig, extra: &[String]) -> Result<DeidPolicy> {
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
fn deid_requirements(config: &NodeConfig, needed: &[String]) -> Result<Vec<node::curate::Finding>> {
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

fn options_text(policy: &DeidPolicy) -> String {
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

fn print_profile_info(policy: &DeidPolicy) {
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

fn deid(config: &NodeConfig, args: DeidArgs) -> Result<()> {
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
struct BarProgress(indicatif::ProgressBar);

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
struct LogProgress {
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

fn progress_reporter() -> Box<dyn batch::Progress> {
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

fn print_summary(summary: &Summary, paths: &BatchPaths) {
    println!("{summary}");
    println!("output        {}", paths.output.display());
    if summary.quarantined_total() > 0 {
        println!(
            "quarantine    {} (see `fedcurate-node quarantine list`)",
            paths.quarantine.display()
        );
    }
}

fn export(config: &NodeConfig, out: Option<&Path>) -> Result<()> {
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

fn deidentifier_parts(
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

fn quarantine(config: &NodeConfig, command: QuarantineCommand) -> Result<()> {
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

fn generate_secret(out: &Path) -> Result<Secret> {
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

fn secret(config: &NodeConfig, command: SecretCommand) -> Result<()> {
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

fn reidentify(config: &NodeConfig, pseudonym: &str, field: Field) -> Result<()> {
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

fn audit_cmd(config: &NodeConfig, command: AuditCommand) -> Result<()> {
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

/// Keyed tokens for reports and exports, under a sub-key of the site secret (a fresh one per
/// run when the node only anonymises: nothing is linked across runs then).
fn site_tokens(config: &NodeConfig) -> Result<node::deid::keys::Tokens> {
    Ok(Keys::derive(&config.deid.secret(&config.data_dir, false)?).tokens())
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
    let schema_text = include_str!("../../deploy/schema.toml");
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
        format,
        dataset_id: 500,
        dataset_name: "demo".into(),
        seed: 0,
        fractions: [0.7, 0.15, 0.15],
        stratify: node::export::Stratify::Modality,
        harmonised: None,
        tokens: tokens.clone(),
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

fn bench(dir: Option<PathBuf>, files: usize, batch_size: usize, keep: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-bench-{}", std::process::id()))
    });
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder with --dir",
            dir.display()
        );
    }
    let threads = rayon::current_num_threads();
    println!(
        "generating {files} CT files (512x512, 16 bit) in {} ...",
        dir.display()
    );
    let inputs = node::bench::generate(&dir.join("in"), files)?;
    let base = node::bench::baseline(&inputs, &dir.join("baseline"), batch_size)?;
    let deid = node::bench::deidentify(&dir.join("in"), &dir.join("work"), batch_size)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{threads} threads, batch size {batch_size}, fsync per batch");
    println!(
        "{:<42} {:>8} {:>10} {:>10} {:>12}",
        "phase", "files", "files/s", "MB/s", "peak RSS MB"
    );
    for p in [&base, &deid] {
        println!(
            "{:<42} {:>8} {:>10.0} {:>10.1} {:>12}",
            p.name,
            p.files,
            p.files_per_s(),
            p.mb_per_s(),
            p.peak_rss
                .map(|b| format!("{:.0}", b as f64 / 1e6))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "ratio de-identify / baseline: {:.2}",
        deid.files_per_s() / base.files_per_s()
    );
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn bench_volume(dir: Option<PathBuf>, slices: usize, keep: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-vbench-{}", std::process::id()))
    });
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new folder with --dir",
            dir.display()
        );
    }
    println!(
        "generating a 512x512x{slices} int16 CT series in {} ...",
        dir.display()
    );
    let b = node::bench::volume(&dir, slices).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mb = b.voxel_bytes as f64 / 1e6;
    let row = |name: &str, d: Duration| {
        println!(
            "{name:<44} {:>8.3} s {:>9.1} MB/s",
            d.as_secs_f64(),
            mb / d.as_secs_f64().max(1e-9)
        );
    };
    println!(
        "{} slices, {:.0} MB of voxels, {} threads",
        b.slices,
        mb,
        rayon::current_num_threads()
    );
    row("read and parse the files only", b.read);
    row("read, parse, decode and assemble", b.assemble);
    row("write .nii (uncompressed)", b.write_nii);
    row("write .nii.gz (gzip level 1)", b.write_nii_gz);
    println!(
        "assembly + .nii: {:.2} s; assembly + .nii.gz: {:.2} s ({:.0} MB compressed)",
        (b.assemble + b.write_nii).as_secs_f64(),
        (b.assemble + b.write_nii_gz).as_secs_f64(),
        b.nii_gz_bytes as f64 / 1e6
    );
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn harmonise(config: &NodeConfig, a: HarmoniseArgs) -> Result<()> {
    use node::harmonise::stats::Contrast;
    use node::harmonise::{self as h, Discretisation, Foreground, Method, WindowFunction};
    let contrast = match a.contrast {
        ContrastName::T1 => Contrast::T1,
        ContrastName::T2 => Contrast::T2,
        ContrastName::Flair => Contrast::Flair,
        ContrastName::Pd => Contrast::Pd,
    };
    let method = match a.method {
        MethodName::MinMax => Method::MinMax,
        MethodName::Percentile => Method::Percentile {
            low: a.low,
            high: a.high,
        },
        MethodName::MuSigmaIbsi => Method::MuSigmaIbsi { n: a.n_sigma },
        MethodName::MuSigmaPyradiomics => Method::MuSigmaPyradiomics { n: a.n_sigma },
        MethodName::Zscore => Method::ZScore,
        MethodName::Kde => Method::Kde { contrast },
        MethodName::Whitestripe => Method::WhiteStripe {
            contrast,
            width: a.stripe_width,
        },
        MethodName::Fcm => Method::Fcm,
        MethodName::Nyul => Method::Nyul,
        MethodName::Lsq => Method::Lsq,
        MethodName::CtWindow => Method::CtWindow {
            center: a.window_center,
            width: a.window_width,
            function: match a.window_function {
                WindowName::Linear => WindowFunction::Linear,
                WindowName::LinearExact => WindowFunction::LinearExact,
                WindowName::Sigmoid => WindowFunction::Sigmoid,
            },
        },
        MethodName::CtNnunet => Method::CtNnunet,
        MethodName::Fbn => Method::Discretise(Discretisation::FixedBinNumber { bins: a.bins }),
        MethodName::Fbs => Method::Discretise(Discretisation::FixedBinSize {
            width: a.bin_width,
            lower: a.lower,
        }),
        MethodName::PyradiomicsBinWidth => {
            Method::Discretise(Discretisation::PyradiomicsBinWidth { width: a.bin_width })
        }
    };
    let files: Vec<PathBuf> = batch::list_inputs(&a.input)?
        .into_iter()
        .filter(|p| node::volume::nifti::is_nifti_path(p))
        .collect();
    if files.is_empty() {
        bail!("no NIfTI volumes under {}", a.input.display());
    }
    let mut volumes = Vec::new();
    let mut rules = Vec::new();
    for f in &files {
        let (_, v) =
            node::volume::nifti::read(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let rel = f.strip_prefix(&a.input).unwrap_or(f).to_owned();
        let rule = match &a.masks {
            Some(dir) => {
                let (_, m) = node::volume::nifti::read(&dir.join(&rel))
                    .map_err(|e| anyhow::anyhow!("mask for {}: {e}", rel.display()))?;
                Foreground::Mask(m.data.iter().map(|x| *x > 0.0).collect())
            }
            None => match (a.padding_value, a.foreground) {
                (Some(p), _) => Foreground::AbovePadding(p),
                (None, ForegroundName::Otsu) => Foreground::Otsu,
                (None, ForegroundName::Positive) => Foreground::Positive,
            },
        };
        volumes.push((rel, v, node::batch::hash_file(f)?.0));
        rules.push(rule);
    }
    let model = match &a.model {
        Some(p) => {
            let m: h::Model = serde_json::from_slice(&std::fs::read(p)?)
                .with_context(|| format!("reading model {}", p.display()))?;
            if m.method != method {
                bail!(
                    "model {} is for {:?}, not {:?}",
                    p.display(),
                    m.method,
                    method
                );
            }
            m
        }
        None => {
            // Fitting: a summary per volume with its own mask, merged (equal to pooled fitting).
            // A degenerate volume (constant or empty foreground, infinite voxels) is left out
            // of the fit with a finding, and the fit goes on without it.
            let mut per: Vec<h::Model> = Vec::new();
            for ((rel, v, _), r) in volumes.iter().zip(&rules) {
                match h::fit(&method, std::slice::from_ref(v), r) {
                    Ok(m) => per.push(m),
                    Err(
                        e @ (h::HarmoniseError::Degenerate | h::HarmoniseError::EmptyForeground),
                    ) => {
                        println!(
                            "finding  harmonise-degenerate-input  {}: left out of the fit ({e})",
                            rel.display()
                        );
                    }
                    Err(e) => bail!("{}: {e}", rel.display()),
                }
            }
            if matches!(method, Method::Lsq) {
                per.into_iter().next().context("no volume to fit on")?
            } else {
                h::merge(&per).context("no volume to fit on")?
            }
        }
    };
    let model_json = serde_json::to_vec_pretty(&model)?;
    let model_hash = batch::content_hash(&model_json);
    batch::write_atomically(&a.out.join("model.json"), &model_json)?;
    let dd = open_data_dir(config)?;
    let method_json = serde_json::to_string(&model.method)?;
    let count = volumes.len();
    let mut refused = 0;
    for ((rel, v, source_hash), rule) in volumes.into_iter().zip(&rules) {
        // The volume is not needed afterwards: rewritten in place, no second buffer.
        let out = match h::apply_owned(&model, v, rule) {
            Ok(o) => o,
            Err(e @ (h::HarmoniseError::Degenerate | h::HarmoniseError::EmptyForeground)) => {
                println!(
                    "finding  harmonise-degenerate-input  {}: not harmonised ({e})",
                    rel.display()
                );
                refused += 1;
                continue;
            }
            Err(e) => bail!("{}: {e}", rel.display()),
        };
        let name = rel
            .to_string_lossy()
            .replace(".nii.gz", "")
            .replace(".nii", "")
            .replace(".hdr", "");
        let rel_out = format!("{name}.nii.gz");
        let bytes = node::volume::nifti::encode_gz(&out.volume)?;
        batch::write_atomically(&a.out.join(&rel_out), &bytes)?;
        dd.catalog
            .record_harmonised(&node::catalog::HarmonisedRecord {
                output_path: rel_out,
                output_hash: batch::content_hash(&bytes),
                source_hash: source_hash.clone(),
                method: method_json.clone(),
                model_version: model.version,
                model_hash: model_hash.clone(),
                at: audit::utc_now(),
            })?;
    }
    println!(
        "harmonised {} volumes with {method_json} (model {} in {})",
        count - refused,
        &model_hash[..12],
        a.out.join("model.json").display()
    );
    Ok(())
}

/// The reference's timings on this machine: runs the embedded script with `python3`.
fn reference_timings(n: usize) -> Result<Vec<(String, f64)>> {
    const SCRIPT: &str = include_str!("../../scripts/reference/bench_reference.py");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(n.to_string())
        .env("OMP_NUM_THREADS", "1")
        .output()
        .context("running python3 (install intensity-normalization==2.2.4 with pip)")?;
    if !out.status.success() {
        bail!(
            "the reference did not run: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_at(l.len().min(24));
            let secs = rest.trim().strip_suffix(" s")?.trim().parse().ok()?;
            Some((name.trim().to_owned(), secs))
        })
        .collect())
}

fn bench_harmonise(dir: Option<PathBuf>, n: usize, reference: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fedcurate-hbench-{}", std::process::id()))
    });
    println!(
        "{n}^3 float32 volume ({:.0} MB), {} threads",
        (n * n * n * 4) as f64 / 1e6,
        rayon::current_num_threads()
    );
    let (baseline, timings) =
        node::bench::harmonise(&dir, n).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{:<32} {:>9.3} s",
        "read + write the volume (NIfTI)",
        baseline.as_secs_f64()
    );
    let refs = if reference {
        reference_timings(n)?
    } else {
        Vec::new()
    };
    for t in &timings {
        let ours = t.elapsed.as_secs_f64();
        let vs = refs
            .iter()
            .find(|(name, _)| *name == t.name)
            .map(|(_, r)| {
                format!(
                    "   reference {r:>7.3} s: {:>5.1}x faster",
                    r / ours.max(1e-9)
                )
            })
            .unwrap_or_default();
        println!(
            "{:<32} {:>9.3} s  (new output {:>6.3} s)   {:>5.2}x the read+write pass{vs}",
            t.name,
            ours,
            t.fresh.as_secs_f64(),
            ours / baseline.as_secs_f64().max(1e-9)
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn curate(
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

fn federate(
    config: &NodeConfig,
    once: bool,
    wait_model: u64,
    input: Option<PathBuf>,
) -> Result<()> {
    use node::federation::session::Site;
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

fn egress(config: &NodeConfig, json: bool, command: Option<EgressCommand>) -> Result<()> {
    let approvals = node::federation::approval::Approvals::at(&config.data_dir.join("federation"));
    match command {
        Some(EgressCommand::Pending) => {
            match approvals.pending() {
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
            let items = approvals.approve()?;
            if items.is_empty() {
                println!("nothing waits for approval");
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

/// Move everything in the inbox to the processing folder, de-identify it, and empty it.
fn process_inbox(
    inbox: &Path,
    processing: &Path,
    paths: &BatchPaths,
    deid: &Deidentifier<'_>,
    catalog: &mut Catalog,
    settings: &RunSettings<'_>,
) -> Result<usize> {
    std::fs::create_dir_all(processing)?;
    for entry in std::fs::read_dir(inbox)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && !name.to_string_lossy().starts_with(batch::TEMP_PREFIX) {
            std::fs::rename(entry.path(), processing.join(name))?;
        }
    }
    let pending = batch::list_inputs(processing)?;
    if pending.is_empty() {
        return Ok(0);
    }
    let summary = batch::deidentify_folder(paths, deid, catalog, settings)?;
    for f in pending {
        std::fs::remove_file(f)?;
    }
    tracing::info!(
        written = summary.written,
        quarantined = summary.quarantined_total(),
        duplicates = summary.duplicates,
        "inbox processed"
    );
    Ok(summary.inputs)
}

/// What `serve` and `pull` share: the de-identification set-up and the received-object
/// folders (inbox, processing folder), with half-written objects of a killed run swept.
struct InboxRun {
    policy: DeidPolicy,
    keys: Keys,
    vault_key: Option<vault::VaultKey>,
    subjects: node::volume::deid::SubjectRule,
    anonymise: bool,
    batch_size: usize,
    inbox: PathBuf,
    processing: PathBuf,
    paths: BatchPaths,
}

impl InboxRun {
    fn open(config: &NodeConfig, output: Option<PathBuf>) -> Result<(DataDir, Self)> {
        let dd = open_data_dir(config)?;
        let policy = policy_with(config, &[])?;
        let anonymise = config.deid.anonymises(false);
        let secret = config.deid.secret(&dd.root, anonymise)?;
        let keys = Keys::derive(&secret);
        drop(secret);
        let inbox = dd.root.join("inbox");
        let processing = dd.root.join("inbox-processing");
        // Half-written objects of a killed run go before anyone can send again.
        std::fs::create_dir_all(&inbox)?;
        batch::sweep_temporaries(&inbox)?;
        let paths = BatchPaths {
            input: processing.clone(),
            output: output.unwrap_or_else(|| dd.root.join("deid")),
            quarantine: dd.root.join("quarantine"),
        };
        let run = InboxRun {
            vault_key: config.deid.vault_key(anonymise)?,
            subjects: config.deid.subject_rule()?,
            batch_size: config.deid.batch_size,
            policy,
            keys,
            anonymise,
            inbox,
            processing,
            paths,
        };
        Ok((dd, run))
    }

    fn settings(&self) -> RunSettings<'_> {
        RunSettings {
            mode: if self.anonymise {
                "anonymise"
            } else {
                "pseudonymise"
            },
            edition: table::EDITION,
            options: options_text(&self.policy),
            vault_key: self.vault_key.as_ref(),
            batch_size: self.batch_size,
            progress: &batch::NoProgress,
            subjects: &self.subjects,
        }
    }

    /// Move what the inbox holds to the processing folder and de-identify it.
    fn process(&self, deid: &Deidentifier<'_>, catalog: &mut Catalog) -> Result<usize> {
        process_inbox(
            &self.inbox,
            &self.processing,
            &self.paths,
            deid,
            catalog,
            &self.settings(),
        )
    }
}

fn serve(config: &NodeConfig, output: Option<PathBuf>) -> Result<()> {
    use std::io::Write as _;
    let (mut dd, run) = InboxRun::open(config, output)?;
    let deid = Deidentifier::new(&run.policy, &run.keys);
    if config.scp.allowed.is_empty() {
        tracing::warn!("[scp] allowed is empty: every association will be refused");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = node::dimse::scp::bind(
        node::dimse::scp::ScpConfig {
            ae_title: config.scp.ae_title.clone(),
            bind: config.scp.bind,
            allowed: config.scp.allowed.clone(),
            inbox: run.inbox.clone(),
            max_object_bytes: config.scp.max_object_mib.saturating_mul(1024 * 1024),
        },
        tx,
    )?;
    println!(
        "listening as {} on {}",
        config.scp.ae_title, handle.local_addr
    );
    std::io::stdout().flush()?;
    // Replay what a previous run left (received but not processed).
    let replayed = run.process(&deid, &mut dd.catalog)?;
    if replayed > 0 {
        tracing::info!(inputs = replayed, "replayed the inbox of an earlier run");
    }
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => {
                // Let a burst finish, then process it together.
                std::thread::sleep(Duration::from_millis(300));
                while rx.try_recv().is_ok() {}
                run.process(&deid, &mut dd.catalog)?;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                run.process(&deid, &mut dd.catalog)?;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    handle.shutdown();
    Ok(())
}

fn read_query_csv(path: &Path) -> Result<Vec<node::dimse::scu::StudyQuery>> {
    let text = if path == Path::new("-") {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .context("reading the query CSV from standard input")?;
        t
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .context("the CSV is empty")?
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (acc, pid) = (col("accession_number"), col("patient_id"));
    if acc.is_none() && pid.is_none() {
        bail!(
            "{}: the header must name accession_number and/or patient_id",
            path.display()
        );
    }
    Ok(lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').map(str::trim).collect();
            let get = |i: Option<usize>| {
                i.and_then(|i| cells.get(i))
                    .filter(|v| !v.is_empty())
                    .map(|v| (*v).to_owned())
            };
            node::dimse::scu::StudyQuery {
                accession_number: get(acc),
                patient_id: get(pid),
                study_date: None,
            }
        })
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn pull(
    config: &NodeConfig,
    from: &str,
    accessions: Vec<String>,
    patient_ids: Vec<String>,
    date_range: Option<String>,
    csv: Option<PathBuf>,
    output: Option<PathBuf>,
) -> Result<()> {
    use node::dimse::scu::{self, RemoteAe, StudyQuery};
    use std::io::Write as _;
    let peer =
        RemoteAe::parse(from).with_context(|| format!("--from {from:?}: expected AE@host:port"))?;
    let mut queries: Vec<StudyQuery> = Vec::new();
    queries.extend(accessions.into_iter().map(|a| StudyQuery {
        accession_number: Some(a),
        ..Default::default()
    }));
    queries.extend(patient_ids.into_iter().map(|p| StudyQuery {
        patient_id: Some(p),
        ..Default::default()
    }));
    if let Some(p) = &csv {
        queries.extend(read_query_csv(p)?);
    }
    if let Some(d) = &date_range {
        if queries.is_empty() {
            queries.push(StudyQuery::default());
        }
        for q in &mut queries {
            q.study_date = Some(d.clone());
        }
    }
    if queries.is_empty() {
        bail!("say what to retrieve: --accession, --patient-id, --date-range or --csv");
    }
    let (mut dd, run) = InboxRun::open(config, output)?;
    let deid = Deidentifier::new(&run.policy, &run.keys);
    // Our SCP receives the C-MOVE sub-operations; the PACS is allowed to store to it.
    let mut allowed = config.scp.allowed.clone();
    allowed.push(node::dimse::scp::AllowedPeer {
        ae: peer.ae_title.clone(),
        host: None,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = node::dimse::scp::bind(
        node::dimse::scp::ScpConfig {
            ae_title: config.scp.ae_title.clone(),
            bind: config.scp.bind,
            allowed,
            inbox: run.inbox.clone(),
            max_object_bytes: config.scp.max_object_mib.saturating_mul(1024 * 1024),
        },
        tx,
    )?;
    let calling = config.scp.ae_title.clone();
    let mut studies = std::collections::BTreeSet::new();
    for q in &queries {
        studies.extend(scu::find_studies(&calling, &peer, q)?);
    }
    // Resume: studies already retrieved are recorded by keyed hash only.
    let state_path = dd.root.join("pull-state.txt");
    let done: std::collections::BTreeSet<String> = std::fs::read_to_string(&state_path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let todo: Vec<&String> = studies
        .iter()
        .filter(|s| !done.contains(&run.keys.path_token("pull-study", s)))
        .collect();
    println!(
        "{} studies found, {} already retrieved, {} to retrieve",
        studies.len(),
        studies.len() - todo.len(),
        todo.len()
    );
    let mut total = scu::MoveCounts::default();
    for (i, study) in todo.iter().enumerate() {
        let counts = scu::move_study(&calling, &peer, study, &config.scp.ae_title)?;
        // Wait until the received objects are in the inbox, then de-identify them.
        std::thread::sleep(Duration::from_millis(200));
        while rx.try_recv().is_ok() {}
        run.process(&deid, &mut dd.catalog)?;
        if counts.failed == 0 {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&state_path)?;
            writeln!(f, "{}", run.keys.path_token("pull-study", study))?;
            f.sync_all()?;
        }
        total.completed += counts.completed;
        total.failed += counts.failed;
        println!(
            "study {}/{}: {} instances retrieved, {} failed",
            i + 1,
            todo.len(),
            counts.completed,
            counts.failed
        );
        std::io::stdout().flush()?;
    }
    handle.shutdown();
    println!(
        "retrieved {} instances ({} failed); output in {}",
        total.completed,
        total.failed,
        run.paths.output.display()
    );
    if total.failed > 0 {
        bail!(
            "{} instances failed to arrive; run the same command again to retry",
            total.failed
        );
    }
    Ok(())
}
