//! Aggregates a site releases, and the rules that make them safe to release.
//!
//! The counting unit is the patient: every count is a number of patients, every histogram
//! counts patients per bin (one value per patient, e.g. the median of their series), and a
//! quantity's moments are over per-patient values. A count below the minimum cell count `k`
//! leaves a site only as [`Cell::Suppressed`], and complementary suppression
//! ([`suppress`]) withholds further cells until the withheld cells together hold at least `k`
//! patients, so no withheld cell can be recovered from the total or the other cells.
//!
//! Real values are fixed-point integers (see [`crate::summary::FIXED_SCALE`]); merging adds
//! them with wrapping arithmetic, so merges are exact, associative and commutative, and can
//! later run under secure aggregation modulo 2^64.

use serde::{Deserialize, Serialize};

use crate::summary::{CtSummary, NyulSummary, from_fixed, to_fixed};

/// One released count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cell {
    Value(u64),
    /// Withheld: below the minimum cell count, or withheld so that one below it cannot be
    /// recovered.
    Suppressed,
}

impl Cell {
    pub fn value(self) -> Option<u64> {
        match self {
            Cell::Value(v) => Some(v),
            Cell::Suppressed => None,
        }
    }
}

/// One count on its own: withheld if in `1..k` (primary suppression only).
pub fn primary(count: u64, k: u64) -> Cell {
    if count > 0 && count < k {
        Cell::Suppressed
    } else {
        Cell::Value(count)
    }
}

/// Whether a released cell shows a count in `1..k`.
pub fn is_small(cell: Cell, k: u64) -> bool {
    cell.value().is_some_and(|v| v > 0 && v < k)
}

/// Suppress a table of counts whose total is released: primary suppression of every count in
/// `1..k`, then complementary suppression of the smallest remaining counts until the withheld
/// cells hold at least `k` together (or every cell is withheld).
pub fn suppress(counts: &[u64], k: u64) -> Vec<Cell> {
    let mut out: Vec<Cell> = counts.iter().map(|&c| primary(c, k)).collect();
    let mut withheld: u64 = counts
        .iter()
        .zip(&out)
        .filter(|(_, c)| **c == Cell::Suppressed)
        .map(|(v, _)| *v)
        .sum();
    if withheld == 0 && !out.contains(&Cell::Suppressed) {
        return out;
    }
    // A table with withheld cells withholds its zeros too: an empty cell shown beside a
    // withheld one tells where the few patients are not (in a sparse histogram, where
    // they are).
    for (c, v) in out.iter_mut().zip(counts) {
        if *v == 0 {
            *c = Cell::Suppressed;
        }
    }
    while withheld < k {
        // The smallest released non-zero count, else the smallest released count.
        let next = out
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.value().map(|v| (v == 0, v, i)))
            .min();
        let Some((_, v, i)) = next else { break };
        out[i] = Cell::Suppressed;
        withheld += v;
    }
    out
}

/// Why the coordinator refuses an aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PrivacyViolation {
    #[error("a released count is below the minimum cell count")]
    SmallCell,
    #[error("a single withheld cell can be recovered from the total")]
    SingleSuppression,
    #[error("a summary covers fewer patients than the minimum cell count")]
    TooFewPatients,
    #[error("the aggregate does not have the shape the schema asks for")]
    Shape,
}

/// What the coordinator can verify of a suppressed table: no released count in `1..k`, and
/// never exactly one withheld cell.
pub fn check_cells(cells: &[Cell], k: u64) -> Result<(), PrivacyViolation> {
    if cells.iter().any(|c| is_small(*c, k)) {
        return Err(PrivacyViolation::SmallCell);
    }
    if cells.len() > 1 && cells.iter().filter(|c| **c == Cell::Suppressed).count() == 1 {
        return Err(PrivacyViolation::SingleSuppression);
    }
    Ok(())
}

/// A quantity measured once per patient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Quantity {
    /// Median foreground intensity, in the volume's units (HU for CT).
    Intensity,
    /// In-plane pixel spacing (mm, the smaller of the two).
    PixelSpacing,
    /// Slice spacing (mm).
    SliceThickness,
    Snr,
    SnrDietrich,
    Cnr,
    Cjv,
    Efc,
    Fber,
    Cv,
    ForegroundFraction,
    /// Agreement of the raters of the patient's annotated cases: the median over cases of the
    /// mean pairwise Dice (classes either rater marked).
    AnnotationDice,
    /// The median over the patient's cases of Fleiss' κ of the raters' slice labels.
    AnnotationKappa,
}

impl Quantity {
    pub const ALL: [Quantity; 13] = [
        Quantity::Intensity,
        Quantity::PixelSpacing,
        Quantity::SliceThickness,
        Quantity::Snr,
        Quantity::SnrDietrich,
        Quantity::Cnr,
        Quantity::Cjv,
        Quantity::Efc,
        Quantity::Fber,
        Quantity::Cv,
        Quantity::ForegroundFraction,
        Quantity::AnnotationDice,
        Quantity::AnnotationKappa,
    ];

    /// The name a schema uses.
    pub fn name(self) -> &'static str {
        match self {
            Quantity::Intensity => "intensity",
            Quantity::PixelSpacing => "pixel-spacing",
            Quantity::SliceThickness => "slice-thickness",
            Quantity::Snr => "snr",
            Quantity::SnrDietrich => "snr-dietrich",
            Quantity::Cnr => "cnr",
            Quantity::Cjv => "cjv",
            Quantity::Efc => "efc",
            Quantity::Fber => "fber",
            Quantity::Cv => "cv",
            Quantity::ForegroundFraction => "foreground-fraction",
            Quantity::AnnotationDice => "annotation-dice",
            Quantity::AnnotationKappa => "annotation-kappa",
        }
    }

    pub fn from_name(name: &str) -> Option<Quantity> {
        Quantity::ALL.into_iter().find(|q| q.name() == name)
    }

    /// The narrowest histogram bin a schema may ask for: finer bins locate single patients'
    /// values (a 0.01-wide bin beside empty ones is one patient's value to 0.01). Chosen at
    /// about the quantity's measurement resolution across scanners.
    pub fn min_bin_width(self) -> f64 {
        match self {
            // Arbitrary units for MR, HU for CT.
            Quantity::Intensity => 10.0,
            Quantity::PixelSpacing => 0.1,
            Quantity::SliceThickness => 0.5,
            Quantity::Snr | Quantity::SnrDietrich | Quantity::Fber => 1.0,
            Quantity::Cnr => 0.5,
            Quantity::Cjv | Quantity::Efc | Quantity::Cv | Quantity::ForegroundFraction => 0.05,
            Quantity::AnnotationDice | Quantity::AnnotationKappa => 0.05,
        }
    }
}

/// Most cells a histogram may have (its edges plus one).
pub const MAX_HISTOGRAM_CELLS: usize = 64;

/// Moments of a per-patient quantity. `low` and `high` are the k-th smallest and k-th largest
/// values (a range that no single patient determines), not the extremes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moments {
    pub patients: u64,
    /// Σ value, fixed point.
    pub sum: i64,
    /// Σ value², fixed point.
    pub sum_squares: i64,
    /// The k-th lowest and highest values, released only over at least 2k − 1 patients:
    /// below that the k-th lowest is at or above the k-th highest, and with n = k they are
    /// exactly one patient's maximum and another's minimum.
    pub low: Option<i64>,
    pub high: Option<i64>,
}

impl Moments {
    /// Moments of per-patient values, or `None` if fewer than `k` patients.
    pub fn of(values: &[f64], k: u64) -> Option<Moments> {
        let n = values.len();
        let k_us = usize::try_from(k.max(1)).ok()?;
        if n < k_us || n == 0 {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Moments {
            patients: n as u64,
            sum: values
                .iter()
                .map(|v| to_fixed(*v))
                .fold(0, i64::wrapping_add),
            sum_squares: values
                .iter()
                .map(|v| to_fixed(v * v))
                .fold(0, i64::wrapping_add),
            low: (n >= 2 * k_us - 1).then(|| to_fixed(sorted[k_us - 1])),
            high: (n >= 2 * k_us - 1).then(|| to_fixed(sorted[n - k_us])),
        })
    }

    pub fn merge(&mut self, o: &Moments) {
        self.patients = self.patients.wrapping_add(o.patients);
        self.sum = self.sum.wrapping_add(o.sum);
        self.sum_squares = self.sum_squares.wrapping_add(o.sum_squares);
        self.low = match (self.low, o.low) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.high = match (self.high, o.high) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    pub fn mean(&self) -> f64 {
        if self.patients == 0 {
            return f64::NAN;
        }
        from_fixed(self.sum) / self.patients as f64
    }

    /// Sample standard deviation (n − 1).
    pub fn std(&self) -> f64 {
        if self.patients < 2 {
            return f64::NAN;
        }
        let n = self.patients as f64;
        let m = self.mean();
        ((from_fixed(self.sum_squares) - n * m * m) / (n - 1.0))
            .max(0.0)
            .sqrt()
    }
}

/// Counts of patients by the categories of one vocabulary: one cell per vocabulary entry (per
/// band for banded vocabularies), then one for values not listed or missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountTable {
    pub cells: Vec<Cell>,
}

/// A released Nyúl summary with the number of patients it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NyulRelease {
    pub patients: u64,
    pub summary: NyulSummary,
}

/// A released CT summary. Every 1-HU bin holds voxels of at least `k` patients; bins that did
/// not were removed before release (`trimmed`), and the sums then come from the bins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtRelease {
    pub patients: u64,
    pub trimmed: bool,
    pub summary: CtSummary,
}

/// Everything a site releases for one round, in the schema's order: `counts[i]` answers
/// `statistics.counts_by[i]`, `histograms[i]` answers `statistics.histograms[i]` (cells: below
/// the first edge, each bin, at or above the last edge).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteAggregates {
    /// The minimum cell count the site applied.
    pub k: u32,
    pub patients: Cell,
    pub series: Cell,
    pub counts: Vec<CountTable>,
    pub histograms: Vec<Vec<Cell>>,
    /// Moments of each quantity the schema names, `None` when fewer than `k` patients.
    pub moments: Vec<(Quantity, Option<Moments>)>,
    pub nyul: Option<NyulRelease>,
    pub ct: Option<CtRelease>,
    /// Differential-privacy noise the site added to counts and sums, if the schema asks.
    pub noise: Option<NoiseApplied>,
}

/// The noise mechanism a site applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mechanism {
    /// Two-sided geometric noise (δ = 0).
    DiscreteLaplace,
    /// Discrete Gaussian noise (δ > 0).
    DiscreteGaussian,
}

/// What differential privacy a release spent: ε in millionths, δ in 10^-12 units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseApplied {
    pub mechanism: Mechanism,
    pub epsilon_micro: u64,
    pub delta_pico: u64,
}

/// Why a site did not release the aggregates of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The release would exceed the site's privacy budget for this dataset.
    BudgetExhausted,
    /// The release differs from an earlier one by fewer than k patients, so their
    /// difference would isolate them.
    Differencing,
    /// The release widens what leaves the site; hospital IT has not approved it yet.
    AwaitingApproval,
}

/// A site's conformance to the schema, as counts of patients (the unit of every count that
/// leaves; suppressed like any count). A patient is counted in each status and each cell in
/// which at least one of their series falls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConformanceSummary {
    /// Patients with at least one curated series.
    pub patients: Cell,
    /// Patients with a series in scope, out of scope, deviating.
    pub status: [Cell; 3],
    /// Patients with a series violating each of `data_of_interest.constraints`, in order
    /// (matched by the constraint's position, never by its attribute's name).
    pub deviations: Vec<Cell>,
    /// Patients with a finding of each severity in the curation run: info, warning, error.
    pub findings: [Cell; 3],
    /// Inputs in quarantine (files: a refused file has no patient).
    pub quarantined: Cell,
}

/// Whether the site's de-identification profile provides what the schema requires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileCheck {
    /// Indices into `deidentification.options` of the options the site lacks.
    pub missing: Vec<u16>,
}

impl ProfileCheck {
    pub fn satisfied(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Check what the coordinator can see of a site's aggregates against `k` (the schema's).
pub fn check_aggregates(a: &SiteAggregates, k: u64) -> Result<(), PrivacyViolation> {
    if u64::from(a.k) < k {
        return Err(PrivacyViolation::SmallCell);
    }
    let k = u64::from(a.k);
    for c in [a.patients, a.series] {
        check_cells(&[c], k).or_else(|e| match e {
            // One total on its own may be withheld.
            PrivacyViolation::SingleSuppression => Ok(()),
            e => Err(e),
        })?;
    }
    for t in &a.counts {
        check_cells(&t.cells, k)?;
    }
    for h in &a.histograms {
        check_cells(h, k)?;
    }
    for (_, m) in &a.moments {
        if m.is_some_and(|m| m.patients < k) {
            return Err(PrivacyViolation::TooFewPatients);
        }
    }
    if a.nyul.as_ref().is_some_and(|n| n.patients < k)
        || a.ct.as_ref().is_some_and(|c| c.patients < k)
    {
        return Err(PrivacyViolation::TooFewPatients);
    }
    Ok(())
}

/// Whether a site's summaries can come from real volumes (the coordinator checks each
/// report, and the secure total, before fitting a model from them): Nyúl and CT summaries
/// pass their own checks and cover at least one volume (CT: voxel) per patient.
pub fn check_plausible(a: &SiteAggregates) -> Result<(), crate::summary::Implausible> {
    use crate::summary::Implausible;
    if let Some(n) = &a.nyul {
        if n.summary.volumes < n.patients {
            return Err(Implausible::FewerVolumesThanPatients);
        }
        n.summary.check()?;
    }
    if let Some(c) = &a.ct {
        if c.summary.count < c.patients {
            return Err(Implausible::FewerVolumesThanPatients);
        }
        c.summary.check()?;
    }
    Ok(())
}

/// The bin of `value` in a histogram with `edges` (0: below the first edge; `edges.len()`:
/// at or above the last).
pub fn bin_of(value: f64, edges: &[f64]) -> usize {
    edges.partition_point(|e| *e <= value)
}

/// Add released counts (suppressed cells add nothing and mark the sum as a lower bound).
pub fn add_cells(into: &mut Vec<Option<u64>>, cells: &[Cell]) {
    if into.len() < cells.len() {
        into.resize(cells.len(), Some(0));
    }
    for (a, c) in into.iter_mut().zip(cells) {
        *a = match (*a, c.value()) {
            (Some(x), Some(y)) => Some(x.wrapping_add(y)),
            _ => None,
        };
    }
}

/// The value at quantile `q` (0–1) of a histogram of counts, by linear interpolation inside
/// the bin (cells as from [`bin_of`]: the end cells are clamped to the end edges).
pub fn histogram_quantile(counts: &[u64], edges: &[f64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || edges.len() < 2 || counts.len() != edges.len() + 1 {
        return None;
    }
    let target = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0.0;
    for (i, c) in counts.iter().enumerate() {
        let c = *c as f64;
        if c > 0.0 && seen + c >= target {
            if i == 0 {
                return Some(edges[0]);
            }
            if i == edges.len() {
                return Some(edges[edges.len() - 1]);
            }
            let (lo, hi) = (edges[i - 1], edges[i]);
            return Some(lo + (hi - lo) * ((target - seen) / c).clamp(0.0, 1.0));
        }
        seen += c;
    }
    Some(edges[edges.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn suppression_leaves_nothing_recoverable(
            counts in proptest::collection::vec(0u64..40, 1..12), k in 5u64..12
        ) {
            let cells = suppress(&counts, k);
            prop_assert!(check_cells(&cells, k).is_ok(), "{:?} -> {:?}", counts, cells);
            let withheld: u64 = counts.iter().zip(&cells)
                .filter(|(_, c)| **c == Cell::Suppressed).map(|(v, _)| *v).sum();
            let any = cells.contains(&Cell::Suppressed);
            let total: u64 = counts.iter().sum();
            // Either nothing is withheld, or the withheld cells hold at least k patients
            // together, or the whole table is below k (then its total is withheld too).
            prop_assert!(!any || withheld >= k || total < k);
            for (v, c) in counts.iter().zip(&cells) {
                if let Cell::Value(x) = c { prop_assert_eq!(x, v); }
            }
            // No empty cell is shown beside a withheld one.
            prop_assert!(!any || !cells.contains(&Cell::Value(0)), "{:?}", cells);
        }
    }

    #[test]
    fn suppression_by_hand() {
        use Cell::*;
        assert_eq!(
            suppress(&[20, 3, 15, 0], 5),
            vec![Value(20), Suppressed, Suppressed, Suppressed]
        );
        assert_eq!(
            suppress(&[20, 30, 0], 5),
            vec![Value(20), Value(30), Value(0)]
        );
        assert_eq!(
            suppress(&[2, 2, 9, 40], 5),
            vec![Suppressed, Suppressed, Suppressed, Value(40)]
        );
        assert_eq!(
            check_cells(&[Value(3)], 5),
            Err(PrivacyViolation::SmallCell)
        );
        assert_eq!(
            check_cells(&[Value(30), Suppressed], 5),
            Err(PrivacyViolation::SingleSuppression)
        );
    }

    #[test]
    fn moments_release_a_k_anonymous_range() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let m = Moments::of(&v, 3).expect("10 >= 3");
        assert_eq!(m.patients, 10);
        assert_eq!(m.low.map(from_fixed), Some(3.0));
        assert_eq!(m.high.map(from_fixed), Some(8.0));
        assert!((m.mean() - 5.5).abs() < 1e-12);
        assert!(Moments::of(&v[..4], 5).is_none());
        // From k to 2k − 2 patients the k-th lowest and highest would be one patient's
        // maximum and another's minimum (or cross): the range is withheld.
        for n in 5..=8 {
            let few = Moments::of(&v[..n], 5).expect("n >= k");
            assert_eq!((few.low, few.high), (None, None), "n = {n}");
            assert_eq!(few.patients, n as u64, "the sums are still released");
        }
        let enough = Moments::of(&v[..9], 5).expect("2k - 1");
        assert_eq!(
            (enough.low, enough.high),
            (Some(to_fixed(5.0)), Some(to_fixed(5.0)))
        );
        let sd = (v.iter().map(|x| (x - 5.5).powi(2)).sum::<f64>() / 9.0).sqrt();
        assert!((m.std() - sd).abs() < 1e-9);
    }

    #[test]
    fn quantiles_from_histograms() {
        let edges = [0.0, 10.0, 20.0];
        // 10 patients below 0, 10 in [0,10), 10 in [10,20), 10 at or above 20.
        let counts = [10, 10, 10, 10];
        assert_eq!(histogram_quantile(&counts, &edges, 0.5), Some(10.0));
        assert_eq!(histogram_quantile(&counts, &edges, 0.375), Some(5.0));
        assert_eq!(bin_of(-1.0, &edges), 0);
        assert_eq!(bin_of(0.0, &edges), 1);
        assert_eq!(bin_of(25.0, &edges), 3);
    }
}
