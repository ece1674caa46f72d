//! What a site computes for the consortium, and the privacy policy applied before anything
//! leaves: per-series facts read from the de-identified output (they stay on the node), then
//! aggregates over patients with the minimum cell count `k` and complementary suppression
//! ([`protocol::aggregate`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use dicom_core::Tag;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use protocol::aggregate::{
    Cell, ConformanceSummary, CountTable, CtRelease, Moments, NyulRelease, ProfileCheck, Quantity,
    SiteAggregates, bin_of, primary, suppress,
};
use protocol::schema::CurationSchema;
use protocol::summary::{CT_HU_BINS, CT_HU_MIN, CtSummary, NyulSummary, to_fixed};

use crate::curate::report::{CurationReport, ProtocolStatus};
use crate::curate::{Severity, quality::measure};
use crate::harmonise::{Foreground, fit_ct, fit_nyul, stats::percentile};
use crate::read::text;
use crate::volume::series::assemble;

/// What the node knows of one series (never leaves the node).
#[derive(Clone, Debug, Default)]
pub struct SeriesFacts {
    /// Patient pseudonym.
    pub patient: String,
    pub modality: String,
    pub manufacturer: String,
    pub sex: String,
    pub age_years: Option<f64>,
    pub field_strength: Option<f64>,
    pub values: BTreeMap<Quantity, f64>,
    pub nyul: Option<NyulSummary>,
    pub ct: Option<CtSummary>,
    /// Curation finding codes of the series.
    pub finding_codes: BTreeSet<String>,
    /// The series instance UID (to join annotation and curation facts; never released).
    pub series_uid: String,
    /// Classes the series' final annotations contain (by class name).
    pub label_classes: BTreeSet<String>,
}

pub use fc_annotation::SeriesAnnotation;

/// Join the annotation facts (by keyed series token) to the series facts: label classes, and
/// the series' agreement values (median over its cases).
pub fn add_annotations(
    facts: &mut [SeriesFacts],
    annotations: &BTreeMap<String, SeriesAnnotation>,
    token: impl Fn(&str) -> String,
) {
    for f in facts {
        let Some(a) = annotations.get(&token(&f.series_uid)) else {
            continue;
        };
        f.label_classes.extend(a.classes.iter().cloned());
        if let Some(d) = median(a.dice.clone()) {
            f.values.insert(Quantity::AnnotationDice, d);
        }
        if let Some(k) = median(a.kappa.clone()) {
            f.values.insert(Quantity::AnnotationKappa, k);
        }
    }
}

fn number(o: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    text(o, tag)
        .split('\\')
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .reduce(f64::min)
}

/// `045Y`, `018M`, `003W`, `010D` → years.
pub fn age_years(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.len() != 4 {
        return None;
    }
    let n: f64 = s[..3].parse().ok()?;
    match &s[3..] {
        "Y" => Some(n),
        "M" => Some(n / 12.0),
        "W" => Some(n * 7.0 / 365.25),
        "D" => Some(n / 365.25),
        _ => None,
    }
}

/// Read the de-identified DICOM under `folder` and compute each series' facts: attributes,
/// quality metrics, median foreground intensity, and the harmonisation summaries the schema's
/// recipe needs (Nyúl for MR, CT statistics for CT; foreground by Otsu).
pub fn collect(folder: &Path, schema: &CurationSchema) -> std::io::Result<Vec<SeriesFacts>> {
    let files = crate::batch::list_inputs(folder).map_err(std::io::Error::other)?;
    let objects: Vec<DefaultDicomObject> = files
        .iter()
        .filter_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            OpenFileOptions::new().from_reader(bytes.as_slice()).ok()
        })
        .collect();
    let mut first: BTreeMap<String, usize> = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        first.entry(text(o, Tag(0x0020, 0x000E))).or_insert(i);
    }
    let recipe = schema.harmonisation.as_ref().map(|h| h.method.as_str());
    let volumes = assemble(&objects);
    let mut out = Vec::new();
    for (series, &i) in &first {
        let o = &objects[i];
        let modality = text(o, Tag(0x0008, 0x0060));
        let mut f = SeriesFacts {
            series_uid: series.clone(),
            patient: text(o, Tag(0x0010, 0x0020)),
            manufacturer: text(o, Tag(0x0008, 0x0070)),
            sex: text(o, Tag(0x0010, 0x0040)),
            age_years: age_years(&text(o, Tag(0x0010, 0x1010))),
            field_strength: number(o, Tag(0x0018, 0x0087)),
            modality: modality.clone(),
            ..SeriesFacts::default()
        };
        if let Some(v) = number(o, Tag(0x0028, 0x0030)) {
            f.values.insert(Quantity::PixelSpacing, v);
        }
        if let Some(v) = number(o, Tag(0x0018, 0x0050)) {
            f.values.insert(Quantity::SliceThickness, v);
        }
        let vol = volumes
            .iter()
            .find(|v| &v.series_uid == series && v.volume.is_some())
            .and_then(|v| v.volume.as_ref());
        if let Some(vol) = vol {
            let ct = modality == "CT";
            let q = measure(vol, ct);
            for (k, v) in [
                (Quantity::Snr, q.snr),
                (Quantity::SnrDietrich, q.snr_dietrich),
                (Quantity::Cnr, q.cnr),
                (Quantity::Cjv, q.cjv),
                (Quantity::Efc, q.efc),
                (Quantity::Fber, q.fber),
                (Quantity::Cv, q.cv),
                (Quantity::ForegroundFraction, q.foreground_fraction),
            ] {
                if v.is_finite() {
                    f.values.insert(k, v);
                }
            }
            f.values
                .entry(Quantity::SliceThickness)
                .or_insert_with(|| vol.spacing()[2]);
            let x: Vec<f32> = vol.data.iter().copied().collect();
            let mask = crate::harmonise::foreground(&x, &Foreground::Otsu).ok();
            if let Some(mask) = mask {
                let mut fg: Vec<f32> = x
                    .iter()
                    .zip(&mask)
                    .filter(|(_, m)| **m)
                    .map(|(v, _)| *v)
                    .collect();
                if !fg.is_empty() {
                    f.values
                        .insert(Quantity::Intensity, percentile(&mut fg, 50.0));
                }
            }
            match (recipe, modality.as_str()) {
                (Some("nyul"), "MR") => f.nyul = fit_nyul(vol, &Foreground::Otsu).ok(),
                (Some("ct-nnunet"), "CT") => f.ct = fit_ct(vol, &Foreground::Otsu).ok(),
                _ => {}
            }
        }
        out.push(f);
    }
    Ok(out)
}

/// Attach the curation run's finding codes to the facts (by patient and modality).
pub fn add_findings(facts: &mut [SeriesFacts], report: &CurationReport) {
    for s in &report.series {
        for f in facts
            .iter_mut()
            .filter(|f| f.patient == s.patient && f.modality == s.modality)
        {
            f.finding_codes
                .extend(s.findings.iter().map(|x| x.code.to_owned()));
        }
    }
}

fn band(value: f64, lower_bounds: &[f64]) -> Option<usize> {
    let i = lower_bounds.partition_point(|b| *b <= value);
    (i > 0).then(|| i - 1)
}

/// The categories (cell indices) of one patient's series for a vocabulary.
fn categories(
    schema: &CurationSchema,
    vocabulary: &str,
    series: &[&SeriesFacts],
) -> BTreeSet<usize> {
    let v = &schema.vocabularies;
    let mut out = BTreeSet::new();
    let single = |s: &SeriesFacts| -> usize {
        match vocabulary {
            "modality" | "manufacturer" | "sex" => {
                let value = match vocabulary {
                    "modality" => &s.modality,
                    "manufacturer" => &s.manufacturer,
                    _ => &s.sex,
                };
                schema
                    .vocabulary_index(vocabulary, value)
                    .map_or(schema.vocabulary_len(vocabulary), |i| i as usize)
            }
            "field_strength_bands" => s
                .field_strength
                .and_then(|x| band(x, &v.field_strength_bands))
                .unwrap_or(v.field_strength_bands.len()),
            "age_bands" => {
                let b: Vec<f64> = v.age_bands.iter().map(|x| f64::from(*x)).collect();
                s.age_years.and_then(|x| band(x, &b)).unwrap_or(b.len())
            }
            _ => 0,
        }
    };
    match vocabulary {
        // Patient characteristics: one category per patient (the first series').
        "sex" | "age_bands" => {
            if let Some(s) = series.first() {
                out.insert(single(s));
            }
        }
        "finding_codes" | "label_classes" => {
            let list = schema.vocabulary(vocabulary).unwrap_or_default();
            for s in series {
                let have = if vocabulary == "label_classes" {
                    &s.label_classes
                } else {
                    &s.finding_codes
                };
                for (i, code) in list.iter().enumerate() {
                    if have.contains(code) {
                        out.insert(i);
                    }
                }
            }
        }
        _ => {
            for s in series {
                out.insert(single(s));
            }
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One value per patient: the median over the patient's series (of `modality`, if given).
fn per_patient(
    by_patient: &BTreeMap<&str, Vec<&SeriesFacts>>,
    q: Quantity,
    modality: Option<&str>,
) -> Vec<f64> {
    by_patient
        .values()
        .filter_map(|series| {
            median(
                series
                    .iter()
                    .filter(|s| modality.is_none_or(|m| s.modality.eq_ignore_ascii_case(m)))
                    .filter_map(|s| s.values.get(&q).copied())
                    .collect(),
            )
        })
        .collect()
}

/// The site's aggregates for a schema under minimum cell count `k` (the larger of the
/// schema's and the site's, never below 5).
pub fn aggregates(facts: &[SeriesFacts], schema: &CurationSchema, k: u32) -> SiteAggregates {
    aggregates_with(facts, schema, k, None)
}

/// Vocabularies in which a patient has exactly one category (sensitivity 1 under DP).
const PARTITIONS: [&str; 2] = ["sex", "age_bands"];

/// Series per patient counted under differential privacy (bounds the sensitivity).
pub const DP_SERIES_CAP: usize = 4;

/// The clipping range of a quantity under differential privacy: its first histogram's
/// outer edges (a quantity without a histogram has no public range: its moments are withheld).
fn clip_range(schema: &CurationSchema, q: Quantity) -> Option<(f64, f64)> {
    schema
        .statistics
        .histograms
        .iter()
        .find(|h| Quantity::from_name(&h.quantity) == Some(q))
        .and_then(|h| Some((*h.edges.first()?, *h.edges.last()?)))
}

/// How many statistics a release noises (ε and δ are split evenly over them).
pub fn dp_statistics(schema: &CurationSchema) -> usize {
    let moments = schema
        .moment_quantities()
        .into_iter()
        .filter(|q| clip_range(schema, *q).is_some())
        .count();
    2 + schema.statistics.counts_by.len() + schema.statistics.histograms.len() + 3 * moments
}

/// [`aggregates`], with differential-privacy noise on the counts and sums when `noise` is
/// given: noise first, then the k rules on the noisy counts (post-processing).
pub fn aggregates_with(
    facts: &[SeriesFacts],
    schema: &CurationSchema,
    k: u32,
    mut noise: Option<&mut super::privacy::Noise>,
) -> SiteAggregates {
    let k = k
        .max(schema.privacy.min_cell_count)
        .max(protocol::schema::MIN_CELL_COUNT_FLOOR);
    let k64 = u64::from(k);
    let mut by_patient: BTreeMap<&str, Vec<&SeriesFacts>> = BTreeMap::new();
    for f in facts {
        by_patient.entry(f.patient.as_str()).or_default().push(f);
    }
    fn noisy(noise: &mut Option<&mut super::privacy::Noise>, c: u64, sensitivity: f64) -> u64 {
        match noise.as_deref_mut() {
            Some(n) => n.count(c, sensitivity),
            None => c,
        }
    }
    let patients = noisy(&mut noise, by_patient.len() as u64, 1.0);
    let series = if noise.is_some() {
        let capped: usize = by_patient
            .values()
            .map(|s| s.len().min(DP_SERIES_CAP))
            .sum();
        noisy(&mut noise, capped as u64, DP_SERIES_CAP as f64)
    } else {
        facts.len() as u64
    };
    let counts = schema
        .statistics
        .counts_by
        .iter()
        .map(|vocabulary| {
            let len = schema.count_table_len(vocabulary);
            let mut c = vec![0u64; len];
            for series in by_patient.values() {
                for i in categories(schema, vocabulary, series) {
                    if let Some(x) = c.get_mut(i) {
                        *x += 1;
                    }
                }
            }
            let sensitivity = if PARTITIONS.contains(&vocabulary.as_str()) {
                1.0
            } else {
                len as f64
            };
            let c: Vec<u64> = c
                .into_iter()
                .map(|x| noisy(&mut noise, x, sensitivity))
                .collect();
            CountTable {
                cells: suppress(&c, k64),
            }
        })
        .collect();
    let histograms = schema
        .statistics
        .histograms
        .iter()
        .map(|spec| {
            let mut c = vec![0u64; spec.edges.len() + 1];
            if let Some(q) = Quantity::from_name(&spec.quantity) {
                for v in per_patient(&by_patient, q, spec.modality.as_deref()) {
                    c[bin_of(v, &spec.edges)] += 1;
                }
            }
            let c: Vec<u64> = c.into_iter().map(|x| noisy(&mut noise, x, 1.0)).collect();
            suppress(&c, k64)
        })
        .collect();
    let moments = schema
        .moment_quantities()
        .into_iter()
        .map(|q| {
            let values = per_patient(&by_patient, q, None);
            let m = match (noise.as_deref_mut(), clip_range(schema, q)) {
                (None, _) => Moments::of(&values, k64),
                (Some(_), None) => None,
                (Some(n), Some((lo, hi))) => {
                    let clipped: Vec<f64> = values.iter().map(|v| v.clamp(lo, hi)).collect();
                    let bound = lo.abs().max(hi.abs());
                    let count = n.count(clipped.len() as u64, 1.0);
                    let sum = n.real(clipped.iter().sum(), bound);
                    let squares = n.real(clipped.iter().map(|v| v * v).sum(), bound * bound);
                    (count >= k64).then(|| Moments {
                        patients: count,
                        sum: to_fixed(sum),
                        sum_squares: to_fixed(squares),
                        // The public clipping range, not order statistics.
                        low: Some(to_fixed(lo)),
                        high: Some(to_fixed(hi)),
                    })
                }
            };
            (q, m)
        })
        .collect();
    // Nyúl: sums over volumes, released when at least k patients contribute.
    let nyul_patients: Vec<&str> = by_patient
        .iter()
        .filter(|(_, s)| s.iter().any(|f| f.nyul.is_some()))
        .map(|(p, _)| *p)
        .collect();
    let nyul = (nyul_patients.len() as u64 >= k64).then(|| {
        let mut s = NyulSummary::default();
        for f in facts.iter().filter_map(|f| f.nyul.as_ref()) {
            s.merge(f);
        }
        NyulRelease {
            patients: nyul_patients.len() as u64,
            summary: s,
        }
    });
    let ct = ct_release(&by_patient, k64);
    SiteAggregates {
        k,
        patients: primary(patients, k64),
        series: primary(series, k64),
        counts,
        histograms,
        moments,
        nyul,
        ct,
        noise: noise.map(|n| n.applied()),
    }
}

/// CT statistics released only where every 1-HU bin holds voxels of at least k patients; bins
/// that do not are removed and the sums recomputed from the bins (`trimmed`).
fn ct_release(by_patient: &BTreeMap<&str, Vec<&SeriesFacts>>, k: u64) -> Option<CtRelease> {
    let per: Vec<CtSummary> = by_patient
        .values()
        .filter_map(|series| {
            let mut s: Option<CtSummary> = None;
            for c in series.iter().filter_map(|f| f.ct.as_ref()) {
                match &mut s {
                    Some(x) => x.merge(c),
                    None => s = Some(c.clone()),
                }
            }
            s
        })
        .collect();
    if (per.len() as u64) < k {
        return None;
    }
    let mut patients_per_bin = vec![0u64; CT_HU_BINS];
    let mut pooled = CtSummary::default();
    for p in &per {
        pooled.merge(p);
        for (n, c) in patients_per_bin.iter_mut().zip(&p.histogram) {
            if *c > 0 {
                *n += 1;
            }
        }
    }
    let thin = |i: usize| patients_per_bin[i] > 0 && patients_per_bin[i] < k;
    if !(0..CT_HU_BINS).any(thin) {
        return Some(CtRelease {
            patients: per.len() as u64,
            trimmed: false,
            summary: pooled,
        });
    }
    let mut s = CtSummary::default();
    for (i, c) in pooled.histogram.iter().enumerate() {
        if *c == 0 || thin(i) {
            continue;
        }
        let hu = f64::from(CT_HU_MIN) + i as f64;
        s.histogram[i] = *c;
        s.count += c;
        s.sum = s.sum.wrapping_add(to_fixed(hu).wrapping_mul(*c as i64));
        s.sum_squares = s
            .sum_squares
            .wrapping_add(to_fixed(hu * hu / 1000.0).wrapping_mul(*c as i64));
    }
    Some(CtRelease {
        patients: per.len() as u64,
        trimmed: true,
        summary: s,
    })
}

/// What a released statistic stands behind.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Statistic {
    /// Totals and count tables: every patient.
    Site,
    /// `statistics.histograms[i]`.
    Histogram(usize),
    Moments(Quantity),
    Nyul,
    Ct,
    /// The conformance counts of a schema acknowledgement.
    Conformance,
}

/// The patients one released statistic covers, for the query ledger. Populations of one
/// `family` (one quantity, whatever the statistic, modality filter or bins; `site` for
/// everything over every patient; `nyul`; `ct`) are compared with each other: two releases
/// of one family whose patients differ by 1..k-1 would give those patients' values by
/// subtraction.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Population {
    pub family: String,
    /// What defines it, in words (statistic, quantity, modality, edges).
    pub definition: String,
    pub statistic: Statistic,
    /// Hashes of the patients' pseudonyms, sorted.
    pub patients: Vec<String>,
}

/// The key the ledger stores for a patient.
pub fn patient_key(pseudonym: &str) -> String {
    crate::batch::content_hash(pseudonym.as_bytes())[..16].to_owned()
}

fn population(
    family: &str,
    definition: String,
    statistic: Statistic,
    patients: impl IntoIterator<Item = String>,
) -> Population {
    let mut patients: Vec<String> = patients.into_iter().collect();
    patients.sort();
    patients.dedup();
    Population {
        family: family.to_owned(),
        definition,
        statistic,
        patients,
    }
}

/// The population behind every statistic a release of `schema` over `facts` holds.
pub fn populations(facts: &[SeriesFacts], schema: &CurationSchema) -> Vec<Population> {
    let mut by_patient: BTreeMap<&str, Vec<&SeriesFacts>> = BTreeMap::new();
    for f in facts {
        by_patient.entry(f.patient.as_str()).or_default().push(f);
    }
    let with = |pred: &dyn Fn(&SeriesFacts) -> bool| -> Vec<String> {
        by_patient
            .iter()
            .filter(|(_, s)| s.iter().any(|f| pred(f)))
            .map(|(p, _)| patient_key(p))
            .collect()
    };
    let mut out = vec![population(
        "site",
        "every patient (totals and count tables)".into(),
        Statistic::Site,
        by_patient.keys().map(|p| patient_key(p)),
    )];
    for (i, h) in schema.statistics.histograms.iter().enumerate() {
        let Some(q) = Quantity::from_name(&h.quantity) else {
            continue;
        };
        let m = h.modality.as_deref();
        out.push(population(
            q.name(),
            format!(
                "histogram of {} in {} with edges {:?}",
                q.name(),
                m.unwrap_or("any modality"),
                h.edges
            ),
            Statistic::Histogram(i),
            with(&|f: &SeriesFacts| {
                m.is_none_or(|m| f.modality.eq_ignore_ascii_case(m)) && f.values.contains_key(&q)
            }),
        ));
    }
    for q in schema.moment_quantities() {
        out.push(population(
            q.name(),
            format!("moments of {}", q.name()),
            Statistic::Moments(q),
            with(&|f: &SeriesFacts| f.values.contains_key(&q)),
        ));
    }
    out.push(population(
        "nyul",
        "Nyúl summary of MR volumes".into(),
        Statistic::Nyul,
        with(&|f: &SeriesFacts| f.nyul.is_some()),
    ));
    out.push(population(
        "ct",
        "CT summary".into(),
        Statistic::Ct,
        with(&|f: &SeriesFacts| f.ct.is_some()),
    ));
    out
}

/// Which of `new` must be withheld: a population that differs by 1..k-1 patients from an
/// earlier released one of its family, or from one of its family released beside it (a
/// filtered and an unfiltered histogram of one quantity). Empty populations release nothing
/// and are never withheld.
pub fn screen(new: &[Population], earlier: &[Population], k: usize) -> Vec<bool> {
    let mut withheld = vec![false; new.len()];
    for (i, p) in new.iter().enumerate() {
        if p.patients.is_empty() {
            continue;
        }
        let beside = new[..i]
            .iter()
            .zip(&withheld)
            .filter(|(_, w)| !**w)
            .map(|(q, _)| q);
        let others: Vec<Vec<String>> = earlier
            .iter()
            .chain(beside)
            .filter(|q| q.family == p.family && !q.patients.is_empty())
            .map(|q| q.patients.clone())
            .collect();
        withheld[i] = super::privacy::isolates_few(&p.patients, &others, k);
    }
    withheld
}

/// Withhold the statistics screened out: histograms become all-suppressed, summaries absent.
pub fn withhold(a: &mut SiteAggregates, statistics: &[Statistic]) {
    for s in statistics {
        match s {
            Statistic::Histogram(i) => {
                if let Some(h) = a.histograms.get_mut(*i) {
                    h.iter_mut().for_each(|c| *c = Cell::Suppressed);
                }
            }
            Statistic::Moments(q) => {
                for (x, m) in a.moments.iter_mut() {
                    if x == q {
                        *m = None;
                    }
                }
            }
            Statistic::Nyul => a.nyul = None,
            Statistic::Ct => a.ct = None,
            Statistic::Site | Statistic::Conformance => {}
        }
    }
}

/// Every cell of a conformance summary withheld (its population would isolate patients).
pub fn withhold_conformance(c: &mut ConformanceSummary) {
    c.patients = Cell::Suppressed;
    c.status = [Cell::Suppressed; 3];
    c.deviations.iter_mut().for_each(|x| *x = Cell::Suppressed);
    c.findings = [Cell::Suppressed; 3];
    c.quarantined = Cell::Suppressed;
}

/// The site's conformance summary from a curation run against the schema.
pub fn conformance(
    report: &CurationReport,
    schema: &CurationSchema,
    quarantined: u64,
    k: u32,
) -> ConformanceSummary {
    use std::collections::BTreeSet;
    let k = u64::from(k.max(schema.privacy.min_cell_count));
    // Patients, never series: a patient with several series counts once per cell.
    let mut all: BTreeSet<&str> = BTreeSet::new();
    let mut status: [BTreeSet<&str>; 3] = Default::default();
    let mut deviations: Vec<BTreeSet<&str>> =
        vec![BTreeSet::new(); schema.data_of_interest.constraints.len()];
    let mut findings: [BTreeSet<&str>; 3] = Default::default();
    for s in &report.series {
        let p = s.patient.as_str();
        all.insert(p);
        match &s.protocol {
            ProtocolStatus::InScope | ProtocolStatus::NoSchema => {
                status[0].insert(p);
            }
            ProtocolStatus::OutOfScope { .. } => {
                status[1].insert(p);
            }
            ProtocolStatus::Deviating { constraints, .. } => {
                status[2].insert(p);
                for &i in constraints {
                    if let Some(d) = deviations.get_mut(i) {
                        d.insert(p);
                    }
                }
            }
        }
        for f in &s.findings {
            findings[match f.severity {
                Severity::Info => 0,
                Severity::Warning => 1,
                Severity::Error => 2,
            }]
            .insert(p);
        }
    }
    let count = |set: &BTreeSet<&str>| set.len() as u64;
    let st = suppress(&status.each_ref().map(count), k);
    ConformanceSummary {
        patients: primary(count(&all), k),
        status: [st[0], st[1], st[2]],
        deviations: deviations.iter().map(|d| primary(count(d), k)).collect(),
        findings: findings.each_ref().map(|f| primary(count(f), k)),
        quarantined: primary(quarantined, k),
    }
}

/// Which of the schema's required de-identification options this node's profile lacks.
pub fn profile_check(schema: &CurationSchema, policy: &crate::deid::DeidPolicy) -> ProfileCheck {
    let missing = schema
        .deidentification
        .options
        .iter()
        .enumerate()
        .filter(|(_, name)| {
            !crate::deid::table::DeidOption::from_config_name(name).is_some_and(|o| policy.has(o))
        })
        .map(|(i, _)| i as u16)
        .collect();
    ProfileCheck { missing }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../deploy/schema.toml");

    fn facts(patient: &str, modality: &str, sex: &str, snr: f64) -> SeriesFacts {
        let mut f = SeriesFacts {
            patient: patient.into(),
            modality: modality.into(),
            sex: sex.into(),
            age_years: Some(50.0),
            ..SeriesFacts::default()
        };
        f.values.insert(Quantity::Snr, snr);
        f
    }

    #[test]
    fn label_classes_and_agreement_come_from_annotations_not_findings() {
        let text = SCHEMA
            .replace(
                "label_classes = []",
                "label_classes = [\"lesion\", \"oedema\"]",
            )
            .replace(
                "counts_by = [\"modality\", \"sex\"]",
                "counts_by = [\"modality\", \"sex\", \"label_classes\"]",
            )
            .replace(
                "quality_metrics = [\"snr\",",
                "quality_metrics = [\"annotation-dice\", \"snr\",",
            );
        let schema = CurationSchema::parse(&text).expect("schema");
        let mut all: Vec<SeriesFacts> = (0..12)
            .map(|i| {
                let mut f = facts(&format!("P{i:02}"), "MR", "F", 10.0);
                f.series_uid = format!("1.2.3.{i}");
                // A curation finding that happens to share a class name is not a label.
                f.finding_codes.insert("oedema".into());
                f
            })
            .collect();
        let token = |uid: &str| format!("t{uid}");
        let annotations: BTreeMap<String, SeriesAnnotation> = (0..10)
            .map(|i| {
                (
                    format!("t1.2.3.{i}"),
                    SeriesAnnotation {
                        classes: ["lesion".to_owned()].into(),
                        dice: vec![0.5 + 0.04 * f64::from(i), 0.9],
                        kappa: Vec::new(),
                    },
                )
            })
            .collect();
        add_annotations(&mut all, &annotations, token);
        assert_eq!(all[0].values.get(&Quantity::AnnotationDice), Some(&0.7));
        assert!(all[11].label_classes.is_empty());
        let a = aggregates(&all, &schema, 5);
        let labels = &a.counts[2].cells;
        // Ten patients with a lesion, none with oedema (the finding code does not count),
        // and two with no annotated class.
        assert_eq!(labels[0], Cell::Value(10));
        assert_ne!(labels[1], Cell::Value(12));
        let (q, m) = &a.moments[0];
        assert_eq!(*q, Quantity::AnnotationDice);
        let m = m.expect("moments over ten patients");
        assert_eq!(m.patients, 10);
    }

    #[test]
    fn conformance_counts_patients_and_matches_constraints_by_position() {
        use crate::curate::report::{CurationReport, SeriesReport};
        // Two constraints on one attribute (slice thickness for any modality, and a tighter
        // one for MR): each is counted on its own.
        let text = SCHEMA.replace(
            "[[data_of_interest.constraints]]\nattribute = \"field-strength\"",
            "[[data_of_interest.constraints]]\nattribute = \"slice-thickness\"\nmodality = \"MR\"\nrange = [0.5, 2.0]\n\n[[data_of_interest.constraints]]\nattribute = \"field-strength\"",
        );
        let schema = CurationSchema::parse(&text).expect("schema");
        assert_eq!(
            schema.data_of_interest.constraints[0].attribute,
            schema.data_of_interest.constraints[1].attribute
        );
        let series = |patient: &str, constraints: Vec<usize>| SeriesReport {
            series: format!("{patient}-{constraints:?}"),
            patient: patient.to_owned(),
            modality: "MR".into(),
            instances: 1,
            protocol: if constraints.is_empty() {
                ProtocolStatus::InScope
            } else {
                ProtocolStatus::Deviating {
                    rules: vec!["slice-thickness outside the protocol".into()],
                    constraints,
                }
            },
            findings: Vec::new(),
            quality: Vec::new(),
        };
        let mut all = Vec::new();
        // 12 patients, each with three series violating only the MR constraint (1) and one
        // in scope; no series violates constraint 0.
        for i in 0..12 {
            for _ in 0..3 {
                all.push(series(&format!("p{i}"), vec![1]));
            }
            all.push(series(&format!("p{i}"), vec![]));
        }
        let report = CurationReport {
            report_version: 1,
            schema: None,
            instances: all.len(),
            series: all,
            site_findings: Vec::new(),
            counts: Default::default(),
        };
        let c = conformance(&report, &schema, 0, 10);
        assert_eq!(c.patients, Cell::Value(12), "patients, not 48 series");
        assert_eq!(c.status[0], Cell::Value(12));
        assert_eq!(
            c.status[2],
            Cell::Value(12),
            "patients with a deviating series"
        );
        assert_eq!(
            c.deviations[0],
            Cell::Value(0),
            "not credited by attribute name"
        );
        assert_eq!(c.deviations[1], Cell::Value(12));
    }

    #[test]
    fn counts_are_per_patient_and_suppressed() {
        let schema = CurationSchema::parse(SCHEMA).expect("schema");
        let mut all = Vec::new();
        // 12 women with two MR series each, 3 men with one: men are below k = 10.
        for i in 0..12 {
            all.push(facts(&format!("w{i}"), "MR", "F", 10.0 + f64::from(i)));
            all.push(facts(&format!("w{i}"), "MR", "F", 10.0 + f64::from(i)));
        }
        for i in 0..3 {
            all.push(facts(&format!("m{i}"), "CT", "M", 1.0));
        }
        let a = aggregates(&all, &schema, 0);
        assert_eq!(a.k, 10);
        assert_eq!(a.patients, Cell::Value(15));
        let sex = &a.counts[schema
            .statistics
            .counts_by
            .iter()
            .position(|v| v == "sex")
            .expect("sex")];
        // F = 12 released; M = 3 suppressed; complementary suppression withholds F too
        // (the only other non-zero cell), and the empty O and other are withheld with them.
        assert_eq!(sex.cells, vec![Cell::Suppressed; 4]);
        protocol::aggregate::check_aggregates(&a, 10).expect("passes the coordinator's check");
        let snr = a
            .moments
            .iter()
            .find(|(q, _)| *q == Quantity::Snr)
            .and_then(|(_, m)| *m);
        assert_eq!(snr.map(|m| m.patients), Some(15), "one value per patient");
    }

    fn ct_patient(name: &str, values: &[i32]) -> SeriesFacts {
        let mut s = CtSummary::default();
        for hu in values {
            let v = f64::from(*hu);
            s.count += 1;
            s.sum += to_fixed(v);
            s.sum_squares += to_fixed(v * v / 1000.0);
            s.histogram[(hu - CT_HU_MIN) as usize] += 1;
        }
        SeriesFacts {
            patient: name.into(),
            modality: "CT".into(),
            ct: Some(s),
            ..SeriesFacts::default()
        }
    }

    #[test]
    fn ct_bins_with_fewer_than_k_patients_are_trimmed() {
        // Five patients share HU 0..=9; one of them also has a voxel at 1000 HU.
        let mut facts: Vec<SeriesFacts> = (0..5)
            .map(|i| ct_patient(&format!("p{i}"), &(0..10).collect::<Vec<_>>()))
            .collect();
        let mut by: BTreeMap<&str, Vec<&SeriesFacts>> = BTreeMap::new();
        for f in &facts {
            by.entry(f.patient.as_str()).or_default().push(f);
        }
        let exact = ct_release(&by, 5).expect("5 patients");
        assert!(!exact.trimmed);
        assert_eq!(exact.summary.count, 50);
        assert!(
            ct_release(&by, 6).is_none(),
            "fewer than k patients: nothing"
        );
        facts[0] = ct_patient("p0", &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1000]);
        let mut by: BTreeMap<&str, Vec<&SeriesFacts>> = BTreeMap::new();
        for f in &facts {
            by.entry(f.patient.as_str()).or_default().push(f);
        }
        let r = ct_release(&by, 5).expect("5 patients");
        assert!(r.trimmed);
        assert_eq!(
            r.summary.count, 50,
            "the lone 1000 HU voxel is not released"
        );
        assert_eq!(r.summary.histogram[(1000 - CT_HU_MIN) as usize], 0);
        assert_eq!(r.summary.mean(), Some(4.5));
    }

    fn mr_with_nyul(patient: &str) -> SeriesFacts {
        let mut f = facts(patient, "MR", "F", 12.0);
        f.values.insert(Quantity::Intensity, 300.0);
        f.nyul = Some(NyulSummary {
            volumes: 1,
            ..NyulSummary::default()
        });
        f
    }

    #[test]
    fn differencing_is_checked_per_population() {
        let schema = CurationSchema::parse(SCHEMA).expect("schema");
        let k = 10;
        // Round 1: 20 patients, 10 of them MR with a Nyúl summary.
        let mut round1: Vec<SeriesFacts> =
            (0..10).map(|i| mr_with_nyul(&format!("m{i}"))).collect();
        round1.extend((0..10).map(|i| facts(&format!("c{i}"), "CT", "M", 3.0)));
        let first = populations(&round1, &schema);
        let w = screen(&first, &[], k);
        assert!(
            w.iter().all(|x| !x),
            "nothing earlier, nothing beside: {w:?}"
        );
        // Round 2: ten new patients, one of whom has an MR. The site differs by 10 (fine);
        // the Nyúl population by one patient: that summary minus round 1's is theirs.
        let mut round2 = round1.clone();
        round2.push(mr_with_nyul("m-new"));
        round2.extend((0..9).map(|i| facts(&format!("c-new{i}"), "CT", "M", 3.0)));
        let second = populations(&round2, &schema);
        let w = screen(&second, &first, k);
        let withheld: Vec<&str> = second
            .iter()
            .zip(&w)
            .filter(|(_, w)| **w)
            .map(|(p, _)| p.family.as_str())
            .collect();
        assert!(!w[0], "the whole site is released");
        assert!(withheld.contains(&"nyul"), "{withheld:?}");
        assert!(
            withheld.contains(&"intensity"),
            "the MR intensity histogram too: {withheld:?}"
        );
        assert!(
            !withheld.contains(&"snr"),
            "ten new patients have an SNR: {withheld:?}"
        );
        // Withholding removes exactly those statistics from the aggregates.
        let mut a = aggregates(&round2, &schema, k as u32);
        assert!(a.nyul.is_some());
        let statistics: Vec<Statistic> = second
            .iter()
            .zip(&w)
            .filter(|(_, w)| **w)
            .map(|(p, _)| p.statistic.clone())
            .collect();
        withhold(&mut a, &statistics);
        assert!(a.nyul.is_none());
        let intensity = schema
            .statistics
            .histograms
            .iter()
            .position(|h| h.quantity == "intensity")
            .expect("intensity histogram");
        assert!(
            a.histograms[intensity]
                .iter()
                .all(|c| *c == Cell::Suppressed)
        );
        // Beside each other in one release: the MR-only intensity histogram (10 patients)
        // and the intensity moments over every modality (12) would give the two CT patients'
        // values by subtraction: the later one is withheld.
        let mut mixed: Vec<SeriesFacts> = (0..10).map(|i| mr_with_nyul(&format!("m{i}"))).collect();
        for i in 0..2 {
            let mut c = facts(&format!("c{i}"), "CT", "M", 3.0);
            c.values.insert(Quantity::Intensity, 40.0);
            mixed.push(c);
        }
        let pops = populations(&mixed, &schema);
        let w = screen(&pops, &[], k);
        let moments = pops
            .iter()
            .position(|p| p.statistic == Statistic::Moments(Quantity::Intensity));
        let histogram = pops
            .iter()
            .position(|p| p.statistic == Statistic::Histogram(intensity));
        assert_eq!(histogram.map(|i| w[i]), Some(false));
        assert_eq!(moments.map(|i| w[i]), Some(true));
    }

    #[test]
    fn ages_parse() {
        assert_eq!(age_years("045Y"), Some(45.0));
        assert_eq!(age_years("018M"), Some(1.5));
        assert_eq!(age_years("45"), None);
    }
}
