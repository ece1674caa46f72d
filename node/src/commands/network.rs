//! `serve` and `pull`: the DICOM network (the storage SCP's inbox, C-MOVE from the PACS).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use node::batch::{self, BatchPaths, RunSettings};
use node::catalog::Catalog;
use node::config::NodeConfig;
use node::deid::keys::Keys;
use node::deid::table;
use node::deid::{DeidPolicy, Deidentifier};
use node::vault;

use super::data::{DataDir, open_data_dir};
use super::deid::{options_text, policy_with};

/// Move everything in the inbox to the processing folder, de-identify it, and empty it.
pub(crate) fn process_inbox(
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
pub(crate) struct InboxRun {
    pub(crate) policy: DeidPolicy,
    pub(crate) keys: Keys,
    pub(crate) vault_key: Option<vault::VaultKey>,
    pub(crate) subjects: node::volume::deid::SubjectRule,
    pub(crate) anonymise: bool,
    pub(crate) batch_size: usize,
    pub(crate) inbox: PathBuf,
    pub(crate) processing: PathBuf,
    pub(crate) paths: BatchPaths,
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

pub(crate) fn serve(config: &NodeConfig, output: Option<PathBuf>) -> Result<()> {
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
            durability: config.scp.durability,
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

pub(crate) fn read_query_csv(path: &Path) -> Result<Vec<node::dimse::scu::StudyQuery>> {
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
pub(crate) fn pull(
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
            durability: config.scp.durability,
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
