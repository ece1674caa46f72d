//! `fedcurate-node`: the site node's command line.

mod commands;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use node::config::NodeConfig;
use node::sample;

use commands::annotate::{AnnotateCommand, annotate};
use commands::annotator::annotator;
use commands::bench::{bench, bench_anchors, bench_curate, bench_harmonise, bench_volume};
use commands::consortium;
use commands::curate::curate;
use commands::deid::deid;
use commands::demo::demo;
use commands::export::export_dataset;
use commands::federation::{egress, federate};
use commands::harmonise::harmonise;
use commands::network::{pull, serve};
use commands::operate::{check_config, purge, status};
use commands::records::{audit_cmd, export, quarantine};
use commands::secrets::{reidentify, secret};
use commands::train::{TrainCommand, train};
use commands::users::{UsersCommand, users};

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
        /// At the end, leave site-a's web annotator running (with demo logins for two readers
        /// and a reviewer) until Ctrl-C.
        #[arg(long)]
        annotate: bool,
        /// Where the annotator listens with --annotate.
        #[arg(long, default_value = "127.0.0.1:8750", requires = "annotate")]
        annotate_listen: std::net::SocketAddr,
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
        /// Time our jobs beside the tools they replace, on the same files in the same run,
        /// where installed: gdcmanon (de-identification of --files files), dcm2niix (a
        /// --slices series to NIfTI), dcmtk's storescp (C-STORE of --files files); prints
        /// the ratios.
        #[arg(long, conflicts_with_all = ["volume", "harmonise", "curate"])]
        anchors: bool,
        /// With --anchors: slices of the series converted to NIfTI.
        #[arg(long, default_value_t = 200, requires = "anchors")]
        slices: usize,
        /// With --anchors: runs of each side (alternating); the best is reported.
        #[arg(long, default_value_t = 2, requires = "anchors")]
        runs: usize,
        /// With --anchors: only these jobs (deid, nifti, store; repeatable).
        #[arg(long, value_delimiter = ',', requires = "anchors")]
        only: Vec<String>,
    },
    /// Export de-identified series for training code (NIfTI volumes, or nnU-Net v2 layout).
    Export(ExportArgs),
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
    /// Annotation projects on the de-identified output: raters, versions, proposals,
    /// agreement, consensus, exports.
    Annotate {
        #[command(subcommand)]
        command: AnnotateCommand,
    },
    /// Serve the web annotator ([annotator] in the config): loopback by default, TLS when a
    /// certificate is configured. Runs until SIGTERM.
    Annotator {
        /// Listen here instead of [annotator] listen.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The viewer's installed files (the folder where `npm ci` ran).
        #[arg(long)]
        web_assets: Option<PathBuf>,
    },
    /// Federated training ([training] in the config): `serve` takes part in the coordinator's
    /// job; `wait`, `push` and `status` are a trainer's calls from a shell.
    Train {
        #[command(subcommand)]
        command: TrainCommand,
    },
    /// Three sites and a coordinator train a small model on scikit-learn's digits, split
    /// non-IID, through their nodes (needs Python with numpy, safetensors, scikit-learn).
    TrainDemo {
        /// Folder for the run (default: a new one under the temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        rounds: u32,
        /// Secure aggregation: the coordinator sees only the sum of the updates.
        #[arg(long)]
        secure: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The web annotator's local accounts.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
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

#[derive(clap::Args, Debug)]
struct ExportArgs {
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
    /// nnU-Net `labelsTr` from this annotation project's consensus label maps (only labelled
    /// cases are exported).
    #[arg(long)]
    labels: Option<String>,
    /// Take the label maps of this rater instead of the consensus.
    #[arg(long, requires = "labels")]
    labels_rater: Option<String>,
    /// How volumes are written: none (`.nii`), fast (`.nii.gz`, deflate level 1) or
    /// default (`.nii.gz`, level 6). Compression runs on every core.
    #[arg(long, value_enum, default_value = "default")]
    compress: CompressArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CompressArg {
    None,
    Fast,
    Default,
}

impl From<CompressArg> for node::volume::gz::NiftiCompression {
    fn from(c: CompressArg) -> Self {
        match c {
            CompressArg::None => Self::None,
            CompressArg::Fast => Self::Fast,
            CompressArg::Default => Self::Default,
        }
    }
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
    /// How volumes are written: none (`.nii`), fast (`.nii.gz`, level 1) or default
    /// (`.nii.gz`, level 6).
    #[arg(long, value_enum, default_value = "default")]
    compress: CompressArg,
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
        Command::ConsortiumDemo {
            dir,
            patients,
            annotate,
            annotate_listen,
        } => consortium::run_demo(dir, patients, annotate.then_some(annotate_listen)),
        Command::Export(args) => export_dataset(&config, args),
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
            anchors,
            slices,
            runs,
            only,
        } => match (volume, harmonise, curate) {
            _ if anchors => bench_anchors(dir, files, slices, runs, &only, keep),
            (Some(slices), _, _) => bench_volume(dir, slices, keep),
            (None, Some(n), _) => bench_harmonise(dir, n, reference),
            (None, None, Some(n)) => bench_curate(dir, n, keep),
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
        Command::CheckConfig { online } => check_config(&config, cli.config.as_deref(), online),
        Command::Status { json } => status(&config, json),
        Command::Metrics { listen } => Ok(node::health::serve_metrics(&config, listen)?),
        Command::Purge { dry_run, output } => purge(&config, dry_run, output),
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
        Command::Annotate { command } => annotate(&config, command),
        Command::Users { command } => users(&config, command),
        Command::Train { command } => train(&config, command),
        Command::TrainDemo {
            dir,
            rounds,
            secure,
            json,
        } => commands::train_demo::train_demo(dir, rounds, secure, json),
        Command::Annotator { listen, web_assets } => annotator(&config, listen, web_assets),
    }
}
