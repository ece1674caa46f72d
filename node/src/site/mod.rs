//! The site: the thin layer that composes the stages for the consortium. What the federation
//! session sends is computed here from the stages' public functions — curation's report,
//! the facts read from the de-identified output ([`aggregate`]), the privacy ledgers and
//! noise ([`privacy`]), hospital IT's egress approvals ([`approval`]) — and a published
//! harmonisation model is applied here. The federation client ([`fc_federation`]) only
//! moves the messages.

pub mod aggregate;
pub mod approval;
pub mod privacy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fc_federation::session::{Session, SessionError, SessionState, Stages, SyncOutcome};
use fc_federation::{Link, settings::FederationSettings};
use protocol::aggregate::{ConformanceSummary, ProfileCheck, RefusalReason, SiteAggregates};
use protocol::schema::CurationSchema;
use protocol::{FederatedFit, Welcome};
use serde::{Deserialize, Serialize};

use crate::batch::{content_hash, write_atomically};
use crate::catalog::Catalog;
use crate::config::NodeConfig;
use crate::harmonise::{self as h, Foreground};

/// A release computed and recorded in the ledger, waiting to be acknowledged
/// (`federation/outbox.json`): what a retry sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Outbox {
    schema: String,
    round: u32,
    aggregates: protocol::aggregate::SiteAggregates,
}

/// The populations earlier releases covered: those recorded per statistic, and the whole-site
/// patient set of releases recorded before populations were kept.
fn earlier_populations(ledger: &[crate::catalog::ReleaseRecord]) -> Vec<aggregate::Population> {
    let mut out = Vec::new();
    for r in ledger.iter().filter(|r| r.outcome == "released") {
        if r.populations.is_empty() {
            out.push(aggregate::Population {
                family: "site".into(),
                definition: "every patient".into(),
                statistic: aggregate::Statistic::Site,
                patients: r.patients.clone(),
            });
        }
        for p in &r.populations {
            out.push(aggregate::Population {
                family: p.family.clone(),
                definition: p.definition.clone(),
                statistic: aggregate::Statistic::Site,
                patients: p.patients.clone(),
            });
        }
    }
    out
}

/// The de-identified output as read for a schema, and what it was read under.
#[derive(Debug)]
struct Prepared {
    key: (usize, usize, usize, i64, String),
    facts: Vec<aggregate::SeriesFacts>,
    report: crate::curate::report::CurationReport,
}

/// A site taking part in the consortium: its federation session and the stages that compute
/// what the session sends.
pub struct Site {
    pub settings: FederationSettings,
    session: Session,
    data_dir: PathBuf,
    /// De-identified DICOM the aggregates are computed from.
    deid_dir: PathBuf,
    policy: crate::deid::DeidPolicy,
    catalog: Catalog,
    prepared: std::sync::Mutex<Option<Prepared>>,
    /// Keyed tokens (harmonised file names, curation series keys).
    tokens: crate::deid::keys::Tokens,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("site", &self.settings.site)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Site {
    /// The site configured by `config` (which must have a `[federation]` section);
    /// `deid_dir` is where its de-identified output is.
    pub fn new(config: &NodeConfig, deid_dir: PathBuf) -> Result<Self, SessionError> {
        let settings = config.federation.clone().ok_or_else(|| {
            SessionError::Schema("the node configuration has no [federation] section".into())
        })?;
        let session = Session::new(settings.clone(), &config.data_dir)?;
        let catalog = Catalog::open(&config.data_dir.join("catalog.sqlite"))?;
        let policy = config
            .deid
            .policy()
            .map_err(|e| SessionError::Schema(e.to_string()))?;
        let tokens = crate::deid::keys::Keys::derive(
            &config
                .deid
                .secret(&config.data_dir, false)
                .map_err(|e| SessionError::Schema(e.to_string()))?,
        )
        .tokens();
        Ok(Site {
            settings,
            session,
            data_dir: config.data_dir.clone(),
            deid_dir,
            policy,
            catalog,
            prepared: std::sync::Mutex::new(None),
            tokens,
        })
    }

    /// What the session has done, kept across restarts.
    pub fn state(&self) -> SessionState {
        self.session.state()
    }

    /// The schema the node follows, if it has fetched one.
    pub fn schema(&self) -> Option<CurationSchema> {
        self.session.schema()
    }

    /// Dial the coordinator and say hello (see [`Session::connect`]).
    pub async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
    ) -> Result<(Link, Welcome), SessionError> {
        self.session.connect(endpoint).await
    }

    /// Say hello again on a live connection.
    pub async fn poll(&self, conn: &Link) -> Result<Welcome, SessionError> {
        self.session.poll(conn).await
    }

    /// Do everything the welcome says is due.
    pub async fn sync(&self, conn: &Link, welcome: &Welcome) -> Result<SyncOutcome, SessionError> {
        self.session.sync(conn, welcome, self).await
    }

    /// Connect and synchronise (see [`Session::run_once`]).
    pub async fn run_once(
        &self,
        endpoint: &quinn::Endpoint,
        wait_model: Option<Duration>,
    ) -> Result<SyncOutcome, SessionError> {
        self.session.run_once(endpoint, wait_model, self).await
    }

    /// Run as a service until `stop` resolves (see [`Session::run`]).
    pub async fn run(
        &self,
        endpoint: &quinn::Endpoint,
        stop: impl std::future::Future<Output = ()>,
    ) {
        self.session.run(endpoint, stop, self).await
    }

    fn outbox_path(&self) -> PathBuf {
        self.data_dir.join("federation").join("outbox.json")
    }

    /// The release computed for (schema, round) and not yet acknowledged, if any.
    fn outbox(&self, schema: &str, round: u32) -> Option<Outbox> {
        let o: Outbox = serde_json::from_slice(&std::fs::read(self.outbox_path()).ok()?).ok()?;
        (o.schema == schema && o.round == round).then_some(o)
    }

    /// The round's release under `schema` (hex hash `hash`): the one computed earlier and not
    /// yet acknowledged, as it was, or a new one (ledger checks, noise, ledger entry), or the
    /// reason it is refused.
    pub fn release(
        &self,
        schema: &CurationSchema,
        hash: &str,
        round: u32,
        k: u32,
    ) -> Result<Result<SiteAggregates, RefusalReason>, SessionError> {
        if let Some(o) = self.outbox(hash, round) {
            return Ok(Ok(o.aggregates));
        }
        Ok(self
            .prepare_release(schema, hash, round, k)?
            .map(|o| o.aggregates))
    }

    fn clear_outbox(&self) {
        let _ = std::fs::remove_file(self.outbox_path());
    }

    /// Compute the round's release: the query ledger per population (a statistic whose
    /// patients differ from an earlier release of its family by 1..k-1 is withheld; the
    /// whole site differing refuses the round), the site's privacy budget (one budget for
    /// the site, whatever schema id the coordinator chooses), noise, and the ledger entry,
    /// written with the release to the outbox before anything leaves.
    fn prepare_release(
        &self,
        schema: &CurationSchema,
        hash: &str,
        round: u32,
        k: u32,
    ) -> Result<Result<Outbox, RefusalReason>, SessionError> {
        let (facts, _) = self.prepared(schema, hash)?;
        let pops = aggregate::populations(&facts, schema);
        let site_patients = pops.first().map(|p| p.patients.clone()).unwrap_or_default();
        let ledger = self.catalog.releases()?;
        let earlier = earlier_populations(&ledger);
        let withheld = aggregate::screen(&pops, &earlier, k as usize);
        let dp = schema.privacy.differential_privacy.clone();
        let (eps, delta) = dp.as_ref().map_or((0.0, 0.0), |d| (d.epsilon, d.delta));
        let (spent_eps, spent_delta) = ledger
            .iter()
            .filter(|r| r.outcome == "released")
            .fold((0.0, 0.0), |(e, d), r| (e + r.epsilon, d + r.delta));
        let refusal = if withheld.first() == Some(&true) {
            Some(RefusalReason::Differencing)
        } else if dp.is_some()
            && (spent_eps + eps > self.settings.privacy_budget_epsilon + 1e-12
                || spent_delta + delta > self.settings.privacy_budget_delta + 1e-18)
        {
            Some(RefusalReason::BudgetExhausted)
        } else {
            None
        };
        let record = |outcome: &str, populations: Vec<crate::catalog::LedgerPopulation>| {
            crate::catalog::ReleaseRecord {
                at: crate::audit::utc_now(),
                dataset: schema.id.clone(),
                schema: hash.to_owned(),
                round,
                epsilon: if outcome == "released" { eps } else { 0.0 },
                delta: if outcome == "released" { delta } else { 0.0 },
                patients: site_patients.clone(),
                outcome: outcome.to_owned(),
                populations,
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(
                ?reason,
                round,
                spent_epsilon = spent_eps,
                "the round's aggregates are not released"
            );
            let state = self.session.state();
            if state
                .refused
                .as_ref()
                .map(|r| (r.0.as_str(), r.1, r.2.as_str()))
                != Some((hash, round, format!("{reason:?}").as_str()))
            {
                self.catalog.record_release(&record(
                    match reason {
                        RefusalReason::Differencing => "refused-differencing",
                        _ => "refused-budget",
                    },
                    Vec::new(),
                ))?;
            }
            return Ok(Err(reason));
        }
        let mut noise = dp
            .as_ref()
            .map(|d| privacy::Noise::new(d, aggregate::dp_statistics(schema)));
        let mut aggregates = aggregate::aggregates_with(&facts, schema, k, noise.as_mut());
        let mut released = Vec::new();
        let mut held_back = Vec::new();
        for (p, w) in pops.into_iter().zip(withheld) {
            if w {
                tracing::warn!(
                    statistic = %p.definition,
                    "withheld: its patients differ from an earlier release of the same quantity by fewer than k"
                );
                held_back.push(p.statistic);
            } else if !p.patients.is_empty() {
                released.push(crate::catalog::LedgerPopulation {
                    family: p.family,
                    definition: p.definition,
                    patients: p.patients,
                });
            }
        }
        aggregate::withhold(&mut aggregates, &held_back);
        // Recorded before it leaves: a crash after sending still counts as spent.
        self.catalog.record_release(&record("released", released))?;
        let o = Outbox {
            schema: hash.to_owned(),
            round,
            aggregates,
        };
        write_atomically(
            &self.outbox_path(),
            &serde_json::to_vec(&o).map_err(std::io::Error::other)?,
        )?;
        Ok(Ok(o))
    }

    /// The facts and the curation report of the de-identified output under `schema`, read
    /// once and kept while the catalog's totals and the schema stay the same (a sync needs
    /// them for the acknowledgement and the report, and a secure round polls several times).
    fn prepared(
        &self,
        schema: &CurationSchema,
        hash: &str,
    ) -> Result<
        (
            Vec<aggregate::SeriesFacts>,
            crate::curate::report::CurationReport,
        ),
        SessionError,
    > {
        let t = self.catalog.totals()?;
        let annotated = self.catalog.annotation_versions_total()?;
        let key = (
            t.written,
            t.duplicates,
            t.quarantined,
            annotated,
            hash.to_owned(),
        );
        if let Ok(cache) = self.prepared.lock()
            && let Some(p) = cache.as_ref()
            && p.key == key
        {
            return Ok((p.facts.clone(), p.report.clone()));
        }
        let report = crate::curate::report::curate(
            &self.deid_dir,
            Some((schema, hash.to_owned())),
            Vec::new(),
            &self.tokens,
        )?;
        let mut facts = aggregate::collect(&self.deid_dir, schema)?;
        aggregate::add_findings(&mut facts, &report);
        // What the site's annotation projects say of each series (classes, agreement).
        let annotations = crate::annotation::Annotations::from_parts(
            Catalog::open(&self.data_dir.join("catalog.sqlite"))?,
            self.data_dir.clone(),
            self.deid_dir.clone(),
            self.tokens.clone(),
        )
        .site_facts()
        .map_err(|e| SessionError::Schema(format!("annotation facts: {e}")))?;
        aggregate::add_annotations(&mut facts, &annotations, |uid| self.tokens.token(uid));
        if let Ok(mut cache) = self.prepared.lock() {
            *cache = Some(Prepared {
                key,
                facts: facts.clone(),
                report: report.clone(),
            });
        }
        Ok((facts, report))
    }

    /// Save the federated model and harmonise the de-identified volumes it applies to
    /// (`harmonised/` in the data directory, provenance in the catalog).
    pub fn apply_model(&self, fit: &FederatedFit, revision: u32) -> Result<usize, SessionError> {
        let (method, fitted, modality) = match fit {
            FederatedFit::Nyul(s) => (
                h::Method::Nyul,
                h::Fitted::Nyul { summary: s.clone() },
                "MR",
            ),
            FederatedFit::Ct(s) => (
                h::Method::CtNnunet,
                h::Fitted::Ct { summary: s.clone() },
                "CT",
            ),
        };
        let model = h::Model {
            version: h::MODEL_VERSION,
            method,
            fitted,
        };
        let json = serde_json::to_vec_pretty(&model).map_err(std::io::Error::other)?;
        let model_hash = content_hash(&json);
        write_atomically(&self.data_dir.join("federation").join("model.json"), &json)?;
        let volumes = crate::volume::series::assemble(&read_objects(&self.deid_dir)?);
        let out_dir = self.data_dir.join("harmonised");
        let method_json = serde_json::to_string(&model.method).map_err(std::io::Error::other)?;
        let mut n = 0;
        for v in volumes.into_iter().filter(|v| v.modality == modality) {
            let Some(vol) = v.volume else { continue };
            let harmonised = h::apply_owned(&model, vol, &Foreground::Otsu)
                .map_err(|e| SessionError::Harmonise(e.to_string()))?;
            let key = self.tokens.token(&v.series_uid);
            let rel = format!("{}/{key}-{}.nii.gz", v.patient, v.part);
            let bytes = crate::volume::nifti::encode_gz(&harmonised.volume)?;
            write_atomically(&out_dir.join(&rel), &bytes)?;
            self.catalog
                .record_harmonised(&crate::catalog::HarmonisedRecord {
                    output_path: rel,
                    output_hash: content_hash(&bytes),
                    source_hash: self.tokens.token(&v.series_uid),
                    method: method_json.clone(),
                    model_version: revision,
                    model_hash: model_hash.clone(),
                    at: crate::audit::utc_now(),
                })?;
            n += 1;
        }
        tracing::info!(
            revision,
            volumes = n,
            "applied the federated harmonisation model"
        );
        Ok(n)
    }
}

impl Stages for Site {
    fn approval_pending(&self, schema: &CurationSchema) -> Result<usize, SessionError> {
        if !self.settings.egress_approval {
            return Ok(0);
        }
        Ok(approval::Approvals::at(&self.data_dir.join("federation"))
            .check(schema)?
            .len())
    }

    fn profile(&self, schema: &CurationSchema) -> ProfileCheck {
        aggregate::profile_check(schema, &self.policy)
    }

    fn conformance(
        &self,
        schema: &CurationSchema,
        hash: &str,
        k: u32,
    ) -> Result<ConformanceSummary, SessionError> {
        let (_, report) = self.prepared(schema, hash)?;
        let quarantined = self.catalog.totals()?.quarantined as u64;
        let mut conformance = aggregate::conformance(&report, schema, quarantined, k);
        // The acknowledgement counts patients: its population goes in the query ledger
        // with the site's, and is withheld when it would isolate a few of them.
        let pop = aggregate::Population {
            family: "site".into(),
            definition: "conformance counts of the schema acknowledgement".into(),
            statistic: aggregate::Statistic::Conformance,
            patients: {
                let mut p: Vec<String> = report
                    .series
                    .iter()
                    .map(|s| aggregate::patient_key(&s.patient))
                    .collect();
                p.sort();
                p.dedup();
                p
            },
        };
        let earlier = earlier_populations(&self.catalog.releases()?);
        if aggregate::screen(std::slice::from_ref(&pop), &earlier, k as usize)[0] {
            tracing::warn!(
                "conformance counts withheld: their patients differ from an earlier release by fewer than k"
            );
            aggregate::withhold_conformance(&mut conformance);
        } else if !pop.patients.is_empty() {
            self.catalog
                .record_release(&crate::catalog::ReleaseRecord {
                    at: crate::audit::utc_now(),
                    dataset: schema.id.clone(),
                    schema: hash.to_owned(),
                    round: 0,
                    epsilon: 0.0,
                    delta: 0.0,
                    patients: pop.patients.clone(),
                    outcome: "released".into(),
                    populations: vec![crate::catalog::LedgerPopulation {
                        family: pop.family,
                        definition: pop.definition,
                        patients: pop.patients,
                    }],
                })?;
        }
        Ok(conformance)
    }

    fn release(
        &self,
        schema: &CurationSchema,
        hash: &str,
        round: u32,
        k: u32,
    ) -> Result<Result<SiteAggregates, RefusalReason>, SessionError> {
        Site::release(self, schema, hash, round, k)
    }

    fn sent(&self) {
        self.clear_outbox();
    }

    fn apply_model(&self, fit: &FederatedFit, revision: u32) -> Result<usize, SessionError> {
        Site::apply_model(self, fit, revision)
    }
}

fn read_objects(dir: &Path) -> std::io::Result<Vec<dicom_object::DefaultDicomObject>> {
    let files = crate::batch::list_inputs(dir).map_err(std::io::Error::other)?;
    Ok(files
        .iter()
        .filter_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            dicom_object::OpenFileOptions::new()
                .from_reader(bytes.as_slice())
                .ok()
        })
        .collect())
}
