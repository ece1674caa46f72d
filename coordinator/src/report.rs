//! The consortium report: per-site and pooled statistics side by side, histograms overlaid
//! per site, and where sites deviate from the schema or from each other. JSON with stable
//! field names, and a self-contained HTML page (inline SVG, no external resources).
//!
//! Everything in it comes from what sites released: suppressed cells stay suppressed, and a
//! pooled cell that includes a suppressed site cell is marked as a lower bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use protocol::aggregate::{Cell, Moments, add_cells, histogram_quantile};
use protocol::schema::CurationSchema;
use protocol::summary::from_fixed;
use protocol::{FederatedFit, SiteId};
use serde::Serialize;

use crate::Hub;
use crate::store::{StoreError, hash_hex};

/// Version of the report format.
pub const REPORT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
pub struct SiteStatus {
    pub site: String,
    pub last_contact: Option<i64>,
    pub acknowledged: bool,
    pub profile_satisfied: Option<bool>,
    /// Names of the schema's de-identification options the site lacks.
    pub missing_options: Vec<String>,
    pub reported: bool,
    pub patients: Option<u64>,
    pub series: Option<u64>,
    /// Patients with a series in scope, out of scope, deviating (None: suppressed).
    pub patient_status: Option<[Option<u64>; 3]>,
    /// Patients with a series violating each protocol constraint.
    pub deviations: Vec<Option<u64>>,
    pub quarantined: Option<u64>,
    /// Why the site declined to release this round, if it did.
    pub refused: Option<String>,
    /// Differential privacy the site's report spent (ε), if any.
    pub dp_epsilon: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CountsReport {
    pub vocabulary: String,
    pub categories: Vec<String>,
    pub per_site: BTreeMap<String, Vec<Option<u64>>>,
    /// Sum over sites; None where a site's cell is suppressed (not recoverable).
    pub pooled: Vec<Option<u64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HistogramReport {
    pub quantity: String,
    pub modality: Option<String>,
    pub edges: Vec<f64>,
    pub per_site: BTreeMap<String, Vec<Option<u64>>>,
    pub pooled: Vec<Option<u64>>,
    /// Quartiles and 5/95 % read from the pooled histogram (only when no cell is suppressed).
    pub pooled_quantiles: Option<[f64; 5]>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MomentsSummary {
    pub patients: u64,
    pub mean: f64,
    pub std: f64,
    /// k-th smallest and largest per-patient values (withheld below 2k − 1 patients).
    pub low: Option<f64>,
    pub high: Option<f64>,
}

impl MomentsSummary {
    fn of(m: &Moments) -> Self {
        MomentsSummary {
            patients: m.patients,
            mean: m.mean(),
            std: m.std(),
            low: m.low.map(from_fixed),
            high: m.high.map(from_fixed),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MomentsReport {
    pub quantity: String,
    pub per_site: BTreeMap<String, Option<MomentsSummary>>,
    pub pooled: Option<MomentsSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    pub revision: u32,
    pub round: u32,
    pub sites: Vec<String>,
    pub method: String,
    /// Nyúl: the standard scale (landmarks 1, 10…90, 99 %).
    pub standard_scale: Option<Vec<f64>>,
    /// CT: foreground mean, standard deviation, 0.5 and 99.5 percentiles (HU).
    pub ct: Option<[f64; 4]>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Deviation {
    pub site: String,
    pub code: &'static str,
    pub message: String,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct ConsortiumReport {
    pub report_version: u32,
    pub schema_id: Option<String>,
    pub schema_revision: Option<u32>,
    pub schema_hash: Option<String>,
    pub round: u32,
    pub k: Option<u32>,
    pub sites: Vec<SiteStatus>,
    pub counts: Vec<CountsReport>,
    pub histograms: Vec<HistogramReport>,
    pub moments: Vec<MomentsReport>,
    pub model: Option<ModelReport>,
    pub deviations: Vec<Deviation>,
    /// Sites summed by secure aggregation (per-site values are unknown to the coordinator).
    pub secure_sites: Option<Vec<String>>,
    /// The published training job and its rounds so far.
    #[serde(default)]
    pub training: Option<TrainingReport>,
}

/// A training job as the report shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainingReport {
    pub job: String,
    pub rounds: u32,
    pub finished: bool,
    pub secure_aggregation: bool,
    pub metrics: Vec<String>,
    pub history: Vec<crate::training::RoundRecord>,
}

fn training_report(hub: &Hub) -> Option<TrainingReport> {
    hub.training().map(|t| TrainingReport {
        job: t.job().id.clone(),
        rounds: t.job().rounds,
        finished: t.finished(),
        secure_aggregation: t.job().secure_aggregation,
        metrics: t.job().metrics.clone(),
        history: t.history().to_vec(),
    })
}

fn cells(c: &[Cell]) -> Vec<Option<u64>> {
    c.iter().map(|c| c.value()).collect()
}

fn categories(schema: &CurationSchema, vocabulary: &str) -> Vec<String> {
    let v = &schema.vocabularies;
    let bands = |edges: Vec<String>| {
        edges
            .iter()
            .enumerate()
            .map(|(i, e)| match edges.get(i + 1) {
                Some(n) => format!("[{e}, {n})"),
                None => format!(">= {e}"),
            })
            .collect::<Vec<_>>()
    };
    let mut out = match vocabulary {
        "field_strength_bands" => bands(
            v.field_strength_bands
                .iter()
                .map(|x| format!("{x} T"))
                .collect(),
        ),
        "age_bands" => bands(v.age_bands.iter().map(|x| format!("{x} y")).collect()),
        other => schema
            .vocabulary(other)
            .map(<[String]>::to_vec)
            .unwrap_or_default(),
    };
    out.push("other or missing".into());
    out
}

/// Build the report from the coordinator's state.
pub fn build(hub: &Hub) -> Result<ConsortiumReport, StoreError> {
    let store = hub.store();
    let round = hub.round();
    let Some((doc, schema)) = hub.schema() else {
        return Ok(ConsortiumReport {
            report_version: REPORT_VERSION,
            schema_id: None,
            schema_revision: None,
            schema_hash: None,
            round,
            k: None,
            sites: Vec::new(),
            counts: Vec::new(),
            histograms: Vec::new(),
            moments: Vec::new(),
            model: None,
            deviations: Vec::new(),
            secure_sites: None,
            training: training_report(hub),
        });
    };
    let hash = doc.hash();
    let hex = hash_hex(&hash);
    let reports: BTreeMap<SiteId, _> = store.reports(&hash, round)?.into_iter().collect();
    // Under secure aggregation only the total over its sites is known.
    let secure = store.secure_total(&hash, round)?;
    let mut deviations = Vec::new();
    let mut sites = Vec::new();
    for site in hub.members() {
        let rec = store.site(site)?;
        let acknowledged = rec.acked_schema.as_deref() == Some(hex.as_str());
        let a = reports.get(site);
        let missing: Vec<String> = rec
            .profile
            .as_ref()
            .map(|p| {
                p.missing
                    .iter()
                    .filter_map(|i| schema.deidentification.options.get(usize::from(*i)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let conf = rec.conformance.as_ref().filter(|_| acknowledged);
        let status = SiteStatus {
            site: site.to_string(),
            last_contact: rec.last_contact,
            acknowledged,
            profile_satisfied: rec.profile.as_ref().map(|p| p.satisfied()),
            missing_options: missing.clone(),
            reported: a.is_some()
                || secure
                    .as_ref()
                    .is_some_and(|(sites, _)| sites.contains(site)),
            patients: a.and_then(|a| a.patients.value()),
            series: a.and_then(|a| a.series.value()),
            patient_status: conf.map(|c| {
                [
                    c.status[0].value(),
                    c.status[1].value(),
                    c.status[2].value(),
                ]
            }),
            deviations: conf.map(|c| cells(&c.deviations)).unwrap_or_default(),
            quarantined: conf.and_then(|c| c.quarantined.value()),
            refused: store
                .refusal(site, &hash, round)?
                .filter(|_| a.is_none())
                .map(|r| format!("{r:?}")),
            dp_epsilon: a
                .and_then(|a| a.noise)
                .map(|n| n.epsilon_micro as f64 / 1e6),
        };
        if let Some(r) = &status.refused {
            deviations.push(Deviation {
                site: site.to_string(),
                code: "release-declined",
                message: format!("declined to release round {round}: {r}"),
            });
        }
        if !acknowledged {
            deviations.push(Deviation {
                site: site.to_string(),
                code: "schema-not-acknowledged",
                message: "has not acknowledged the current schema".into(),
            });
        }
        if !missing.is_empty() {
            deviations.push(Deviation {
                site: site.to_string(),
                code: "deid-profile-insufficient",
                message: format!("de-identification profile lacks {}", missing.join(", ")),
            });
        }
        if acknowledged && !status.reported && status.refused.is_none() {
            deviations.push(Deviation {
                site: site.to_string(),
                code: "no-report",
                message: format!("has not reported round {round}"),
            });
        }
        if let Some(c) = conf {
            for (i, cell) in c.deviations.iter().enumerate() {
                let name = schema
                    .data_of_interest
                    .constraints
                    .get(i)
                    .map(|c| format!("{:?}", c.attribute).to_lowercase())
                    .unwrap_or_default();
                match cell {
                    Cell::Value(0) => {}
                    Cell::Value(n) => deviations.push(Deviation {
                        site: site.to_string(),
                        code: "protocol-deviation",
                        message: format!("{n} patients with a series outside the protocol on {name}"),
                    }),
                    Cell::Suppressed => deviations.push(Deviation {
                        site: site.to_string(),
                        code: "protocol-deviation",
                        message: format!(
                            "fewer than k patients (suppressed) with a series outside the protocol on {name}"
                        ),
                    }),
                }
            }
        }
        sites.push(status);
    }

    let mut counts = Vec::new();
    for (i, vocabulary) in schema.statistics.counts_by.iter().enumerate() {
        let mut per_site = BTreeMap::new();
        let mut pooled = vec![Some(0); schema.count_table_len(vocabulary)];
        for (site, a) in &reports {
            if let Some(t) = a.counts.get(i) {
                per_site.insert(site.to_string(), cells(&t.cells));
                add_cells(&mut pooled, &t.cells);
            }
        }
        if let Some(t) = secure
            .as_ref()
            .and_then(|(_, t)| t.aggregates.counts.get(i))
        {
            pooled = t.cells.iter().map(|c| c.value()).collect();
        }
        counts.push(CountsReport {
            vocabulary: vocabulary.clone(),
            categories: categories(schema, vocabulary),
            per_site,
            pooled,
        });
    }

    let mut histograms = Vec::new();
    for (i, spec) in schema.statistics.histograms.iter().enumerate() {
        let mut per_site = BTreeMap::new();
        let mut pooled = vec![Some(0); spec.edges.len() + 1];
        for (site, a) in &reports {
            if let Some(h) = a.histograms.get(i) {
                per_site.insert(site.to_string(), cells(h));
                add_cells(&mut pooled, h);
            }
        }
        if let Some(h) = secure
            .as_ref()
            .and_then(|(_, t)| t.aggregates.histograms.get(i))
        {
            pooled = h.iter().map(|c| c.value()).collect();
        }
        let exact: Option<Vec<u64>> = pooled.iter().copied().collect();
        let pooled_quantiles = exact.and_then(|c| {
            let q = |p| histogram_quantile(&c, &spec.edges, p);
            Some([q(0.05)?, q(0.25)?, q(0.5)?, q(0.75)?, q(0.95)?])
        });
        histograms.push(HistogramReport {
            quantity: spec.quantity.clone(),
            modality: spec.modality.clone(),
            edges: spec.edges.clone(),
            per_site,
            pooled,
            pooled_quantiles,
        });
    }

    let mut moments = Vec::new();
    for q in schema.moment_quantities() {
        let mut per_site = BTreeMap::new();
        let mut pooled: Option<Moments> = None;
        for (site, a) in &reports {
            let m = a
                .moments
                .iter()
                .find(|(x, _)| *x == q)
                .and_then(|(_, m)| *m);
            if let Some(m) = &m {
                match &mut pooled {
                    Some(p) => p.merge(m),
                    None => pooled = Some(*m),
                }
            }
            per_site.insert(site.to_string(), m.as_ref().map(MomentsSummary::of));
        }
        if let Some((_, t)) = &secure {
            pooled = t
                .aggregates
                .moments
                .iter()
                .find(|(x, _)| *x == q)
                .and_then(|(_, m)| *m);
        }
        let pooled = pooled.as_ref().map(MomentsSummary::of);
        // A site whose mean lies more than two pooled standard deviations from the pooled
        // mean differs from the consortium.
        if let Some(p) = &pooled
            && p.std.is_finite()
            && p.std > 0.0
        {
            for (site, m) in &per_site {
                if let Some(m) = m
                    && (m.mean - p.mean).abs() > 2.0 * p.std
                {
                    deviations.push(Deviation {
                        site: site.clone(),
                        code: "differs-from-consortium",
                        message: format!(
                            "mean {} {:.3} is more than two standard deviations from the consortium's {:.3}",
                            q.name(),
                            m.mean,
                            p.mean
                        ),
                    });
                }
            }
        }
        moments.push(MomentsReport {
            quantity: q.name().to_owned(),
            per_site,
            pooled,
        });
    }

    let model = store.latest_model()?.filter(|m| m.schema == hex).map(|m| {
        let (method, standard_scale, ct) = match &m.fit {
            FederatedFit::Nyul(s) => ("nyul", s.standard_scale().map(|s| s.to_vec()), None),
            FederatedFit::Ct(s) => (
                "ct-nnunet",
                None,
                match (s.mean(), s.std(), s.percentile(0.5), s.percentile(99.5)) {
                    (Some(a), Some(b), Some(c), Some(d)) => Some([a, b, c, d]),
                    _ => None,
                },
            ),
        };
        ModelReport {
            revision: m.revision,
            round: m.round,
            sites: m.sites.iter().map(|s| s.to_string()).collect(),
            method: method.to_owned(),
            standard_scale,
            ct,
        }
    });

    Ok(ConsortiumReport {
        report_version: REPORT_VERSION,
        schema_id: Some(schema.id.clone()),
        schema_revision: Some(schema.revision),
        schema_hash: Some(hex),
        round,
        k: Some(schema.privacy.min_cell_count),
        sites,
        counts,
        histograms,
        moments,
        model,
        deviations,
        secure_sites: secure.map(|(sites, _)| sites.iter().map(|s| s.to_string()).collect()),
        training: training_report(hub),
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn cell_text(c: Option<u64>) -> String {
    c.map_or_else(|| "&lt;k".to_owned(), |v| v.to_string())
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

/// Overlaid per-site histograms, each normalised to its released total.
fn svg_histogram(h: &HistogramReport) -> String {
    let (w, ht, pad) = (520.0, 180.0, 30.0);
    let bins = h.pooled.len();
    let bw = (w - 2.0 * pad) / bins as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" role=\"img\">",
        ht + 40.0
    );
    let _ = write!(
        out,
        "<line x1=\"{pad}\" y1=\"{ht}\" x2=\"{}\" y2=\"{ht}\" stroke=\"#444\"/>",
        w - pad
    );
    for (i, (site, c)) in h.per_site.iter().enumerate() {
        let total: u64 = c.iter().flatten().sum();
        if total == 0 {
            continue;
        }
        let colour = COLOURS[i % COLOURS.len()];
        let mut points = String::new();
        for (b, v) in c.iter().enumerate() {
            let frac = v.map_or(0.0, |v| v as f64 / total as f64);
            let x = pad + bw * (b as f64 + 0.5);
            let y = ht - frac * (ht - 10.0);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{points}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{colour}\">{}</text>",
            pad + 90.0 * i as f64,
            ht + 32.0,
            esc(site)
        );
    }
    for (b, e) in h.edges.iter().enumerate() {
        let x = pad + bw * (b as f64 + 1.0);
        let _ = write!(
            out,
            "<text x=\"{x:.1}\" y=\"{}\" font-size=\"9\" text-anchor=\"middle\">{e}</text>",
            ht + 12.0
        );
    }
    out.push_str("</svg>");
    out
}

/// A self-contained HTML page of the report.
pub fn html(r: &ConsortiumReport) -> String {
    let mut o = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>fedcurate consortium report</title>\
         <style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}\
         td:first-child,th:first-child{text-align:left}.bad{color:#b00}</style></head><body>",
    );
    let _ = write!(
        o,
        "<h1>Consortium report</h1><p>Schema <b>{}</b> revision {}, round {}, minimum cell count k = {}. \
         Cells marked &lt;k were suppressed by the site; pooled cells that include one are shown as &lt;k.</p>",
        esc(r.schema_id.as_deref().unwrap_or("(none)")),
        r.schema_revision.unwrap_or(0),
        r.round,
        r.k.unwrap_or(0)
    );
    if let Some(sites) = &r.secure_sites {
        let _ = write!(
            o,
            "<p><b>Secure aggregation:</b> the coordinator learnt only the total over {} sites ({}); per-site values never reached it.</p>",
            sites.len(),
            esc(&sites.join(", "))
        );
    }
    o.push_str("<h2>Sites</h2><table><tr><th>site</th><th>acknowledged</th><th>profile</th><th>reported</th><th>patients</th><th>series</th><th>patients in scope</th><th>out of scope</th><th>deviating</th><th>quarantined</th></tr>");
    for s in &r.sites {
        let st = s.patient_status.unwrap_or([None, None, None]);
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.site),
            if s.acknowledged {
                "yes"
            } else {
                "<span class=bad>no</span>"
            },
            match s.profile_satisfied {
                Some(true) => "satisfies".to_owned(),
                Some(false) => format!(
                    "<span class=bad>lacks {}</span>",
                    esc(&s.missing_options.join(", "))
                ),
                None => "-".to_owned(),
            },
            if s.reported { "yes" } else { "no" },
            cell_text(s.patients),
            cell_text(s.series),
            cell_text(st[0]),
            cell_text(st[1]),
            cell_text(st[2]),
            cell_text(s.quarantined),
        );
    }
    o.push_str("</table>");
    if !r.deviations.is_empty() {
        o.push_str("<h2>Where sites deviate</h2><ul>");
        for d in &r.deviations {
            let _ = write!(
                o,
                "<li><b>{}</b> <code>{}</code>: {}</li>",
                esc(&d.site),
                d.code,
                esc(&d.message)
            );
        }
        o.push_str("</ul>");
    }
    for c in &r.counts {
        let _ = write!(
            o,
            "<h2>Patients by {}</h2><table><tr><th>category</th>",
            esc(&c.vocabulary)
        );
        for s in c.per_site.keys() {
            let _ = write!(o, "<th>{}</th>", esc(s));
        }
        o.push_str("<th>pooled</th></tr>");
        for (i, cat) in c.categories.iter().enumerate() {
            let _ = write!(o, "<tr><td>{}</td>", esc(cat));
            for v in c.per_site.values() {
                let _ = write!(o, "<td>{}</td>", cell_text(v.get(i).copied().flatten()));
            }
            let _ = write!(
                o,
                "<td>{}</td></tr>",
                cell_text(c.pooled.get(i).copied().flatten())
            );
        }
        o.push_str("</table>");
    }
    if !r.moments.is_empty() {
        o.push_str("<h2>Per-patient quantities</h2><table><tr><th>quantity</th><th>site</th><th>patients</th><th>mean</th><th>sd</th><th>k-th lowest</th><th>k-th highest</th></tr>");
        for m in &r.moments {
            let rows = m
                .per_site
                .iter()
                .map(|(s, v)| (s.as_str(), v.as_ref()))
                .chain(std::iter::once(("pooled", m.pooled.as_ref())));
            for (s, v) in rows {
                match v {
                    Some(v) => {
                        let _ = write!(
                            o,
                            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
                            esc(&m.quantity),
                            esc(s),
                            v.patients,
                            v.mean,
                            v.std,
                            v.low.map_or("&lt;2k−1".into(), |x| format!("{x:.3}")),
                            v.high.map_or("&lt;2k−1".into(), |x| format!("{x:.3}"))
                        );
                    }
                    None => {
                        let _ = write!(
                            o,
                            "<tr><td>{}</td><td>{}</td><td>&lt;k</td><td colspan=4></td></tr>",
                            esc(&m.quantity),
                            esc(s)
                        );
                    }
                }
            }
        }
        o.push_str("</table>");
    }
    for h in &r.histograms {
        let _ = write!(
            o,
            "<h2>Histogram of {}{}</h2><p>Patients per bin, each site normalised to its released total.</p>{}",
            esc(&h.quantity),
            h.modality
                .as_ref()
                .map(|m| format!(" ({})", esc(m)))
                .unwrap_or_default(),
            svg_histogram(h)
        );
        if let Some(q) = h.pooled_quantiles {
            let _ = write!(
                o,
                "<p>Pooled 5/25/50/75/95 %: {:.2} / {:.2} / {:.2} / {:.2} / {:.2}</p>",
                q[0], q[1], q[2], q[3], q[4]
            );
        }
    }
    if let Some(m) = &r.model {
        let _ = write!(
            o,
            "<h2>Federated harmonisation model</h2><p>{} revision {}, round {}, from {} sites ({}).</p>",
            esc(&m.method),
            m.revision,
            m.round,
            m.sites.len(),
            esc(&m.sites.join(", "))
        );
        if let Some(s) = &m.standard_scale {
            let v: Vec<String> = s.iter().map(|x| format!("{x:.2}")).collect();
            let _ = write!(o, "<p>Standard scale: {}</p>", v.join(", "));
        }
        if let Some([mean, std, lo, hi]) = m.ct {
            let _ = write!(
                o,
                "<p>Foreground mean {mean:.1} HU, sd {std:.1} HU, 0.5 % {lo} HU, 99.5 % {hi} HU</p>"
            );
        }
    }
    if let Some(t) = &r.training {
        let _ = write!(
            o,
            "<h2>Training job {}</h2><p>{} of {} rounds{}{}.</p><table><tr><th>round</th><th>sites</th><th>seconds</th><th>update norm</th>",
            esc(&t.job),
            t.history.len(),
            t.rounds,
            if t.finished { ", finished" } else { "" },
            if t.secure_aggregation {
                "; secure aggregation (only sums are known here)"
            } else {
                ""
            },
        );
        for m in &t.metrics {
            let _ = write!(o, "<th>{} per site</th>", esc(m));
        }
        o.push_str("</tr>");
        for h in t.history.iter().rev().take(50) {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.4}</td>",
                h.round,
                h.sites.len(),
                h.seconds,
                h.update_norm
            );
            for (i, _) in t.metrics.iter().enumerate() {
                let per: Vec<String> = h
                    .metrics
                    .iter()
                    .map(|(s, v)| {
                        format!(
                            "{}: {:.3}",
                            esc(s.as_str()),
                            v.get(i).copied().unwrap_or(f64::NAN)
                        )
                    })
                    .collect();
                let _ = write!(o, "<td>{}</td>", per.join(", "));
            }
            o.push_str("</tr>");
        }
        o.push_str("</table>");
    }
    o.push_str("</body></html>");
    o
}
