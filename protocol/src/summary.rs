//! Mergeable summaries of harmonisation fitting. Each site computes one over its own volumes;
//! merging summaries (exact, associative and commutative: integer sums) gives exactly the
//! summary of the pooled volumes, so the fitted model is the same whether fitted centrally or
//! federated. Values are fixed-point integers so that they can also be summed under secure
//! aggregation modulo 2^64.

use serde::{Deserialize, Serialize};

/// Fixed-point scale: real value = integer / `FIXED_SCALE` (micro-units).
pub const FIXED_SCALE: f64 = 1_000_000.0;

/// Number of Nyúl–Udupa landmarks (percentiles 1, 10, 20, …, 90, 99).
pub const NYUL_LANDMARKS: usize = 11;

/// Convert a real value to fixed point (rounded to the nearest micro-unit).
pub fn to_fixed(v: f64) -> i64 {
    (v * FIXED_SCALE).round() as i64
}

/// Convert fixed point back to a real value.
pub fn from_fixed(v: i64) -> f64 {
    v as f64 / FIXED_SCALE
}

/// Nyúl–Udupa standard scale: the sum of per-volume mapped landmark vectors and their count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NyulSummary {
    /// Σ over volumes of the landmarks mapped to the output range, fixed point.
    pub landmark_sums: [i64; NYUL_LANDMARKS],
    /// Number of volumes.
    pub volumes: u64,
}

impl NyulSummary {
    /// Add another summary.
    pub fn merge(&mut self, other: &NyulSummary) {
        for (a, b) in self.landmark_sums.iter_mut().zip(other.landmark_sums) {
            *a = a.wrapping_add(b);
        }
        self.volumes = self.volumes.wrapping_add(other.volumes);
    }

    /// The standard scale (mean mapped landmarks), if any volume was summarised.
    pub fn standard_scale(&self) -> Option<[f64; NYUL_LANDMARKS]> {
        if self.volumes == 0 {
            return None;
        }
        let mut s = [0.0; NYUL_LANDMARKS];
        for (o, v) in s.iter_mut().zip(self.landmark_sums) {
            *o = from_fixed(v) / self.volumes as f64;
        }
        Some(s)
    }
}

/// Why a summary cannot be what a site computed from real volumes (a poisoned or broken
/// release); a model built from it would rescale every site's images to nonsense.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Implausible {
    #[error("no volume is summarised")]
    Empty,
    #[error("mean Nyúl landmarks leave the output range [1, 100]")]
    LandmarkRange,
    #[error("mean Nyúl landmarks do not increase")]
    LandmarksNotIncreasing,
    #[error("fewer volumes than patients")]
    FewerVolumesThanPatients,
    #[error("the CT histogram does not have 4,096 one-HU bins")]
    HistogramLength,
    #[error("the CT histogram does not add up to the voxel count")]
    HistogramTotal,
    #[error("the CT mean or spread lies outside what the histogram allows")]
    CtMoments,
}

impl NyulSummary {
    /// Whether the summary can come from real volumes: each volume's mapped landmarks lie in
    /// [1, 100] and increase, and so do their means.
    pub fn check(&self) -> Result<(), Implausible> {
        let scale = self.standard_scale().ok_or(Implausible::Empty)?;
        // A micro-unit of rounding per volume.
        let eps = 1e-5;
        if scale.iter().any(|v| !(1.0 - eps..=100.0 + eps).contains(v)) {
            return Err(Implausible::LandmarkRange);
        }
        if scale.windows(2).any(|w| w[1] < w[0] - eps) || scale[NYUL_LANDMARKS - 1] <= scale[0] {
            return Err(Implausible::LandmarksNotIncreasing);
        }
        Ok(())
    }
}

impl CtSummary {
    /// Whether the summary can come from real CT volumes: 4,096 bins adding up to the count,
    /// a mean between the lowest and highest occupied bins (±1 HU of rounding) and a finite
    /// spread no wider than the occupied range.
    pub fn check(&self) -> Result<(), Implausible> {
        if self.histogram.len() != CT_HU_BINS {
            return Err(Implausible::HistogramLength);
        }
        if self.count == 0 {
            return Err(Implausible::Empty);
        }
        let total = self
            .histogram
            .iter()
            .try_fold(0u64, |a, b| a.checked_add(*b))
            .ok_or(Implausible::HistogramTotal)?;
        if total != self.count {
            return Err(Implausible::HistogramTotal);
        }
        let first = self.histogram.iter().position(|c| *c > 0);
        let last = self.histogram.iter().rposition(|c| *c > 0);
        let (Some(first), Some(last)) = (first, last) else {
            return Err(Implausible::Empty);
        };
        let lo = f64::from(CT_HU_MIN) + first as f64 - 1.0;
        let hi = f64::from(CT_HU_MIN) + last as f64 + 1.0;
        let (Some(mean), Some(std)) = (self.mean(), self.std()) else {
            return Err(Implausible::Empty);
        };
        // Values beyond the end bins are counted in them: the end bins are open.
        let lo = if first == 0 { f64::NEG_INFINITY } else { lo };
        let hi = if last == CT_HU_BINS - 1 {
            f64::INFINITY
        } else {
            hi
        };
        if !mean.is_finite() || mean < lo || mean > hi || !std.is_finite() || std > hi - lo {
            return Err(Implausible::CtMoments);
        }
        Ok(())
    }
}

/// Lowest HU of the CT histogram.
pub const CT_HU_MIN: i32 = -1024;
/// Number of 1-HU bins (−1024 … 3071).
pub const CT_HU_BINS: usize = 4096;

/// CT foreground intensity statistics: counts, sums and a 1-HU histogram (values outside the
/// range are counted in the end bins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtSummary {
    pub count: u64,
    /// Σ HU, fixed point.
    pub sum: i64,
    /// Σ HU², fixed point of HU² / 1000 (so that whole CT volumes fit in 64 bits).
    pub sum_squares: i64,
    /// Counts per HU from [`CT_HU_MIN`].
    pub histogram: Vec<u64>,
}

impl Default for CtSummary {
    fn default() -> Self {
        CtSummary {
            count: 0,
            sum: 0,
            sum_squares: 0,
            histogram: vec![0; CT_HU_BINS],
        }
    }
}

impl CtSummary {
    /// Add another summary.
    pub fn merge(&mut self, other: &CtSummary) {
        self.count = self.count.wrapping_add(other.count);
        self.sum = self.sum.wrapping_add(other.sum);
        self.sum_squares = self.sum_squares.wrapping_add(other.sum_squares);
        if self.histogram.len() < other.histogram.len() {
            self.histogram.resize(other.histogram.len(), 0);
        }
        for (a, b) in self.histogram.iter_mut().zip(&other.histogram) {
            *a = a.wrapping_add(*b);
        }
    }

    /// Mean HU.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| from_fixed(self.sum) / self.count as f64)
    }

    /// Population standard deviation of HU.
    pub fn std(&self) -> Option<f64> {
        let mean = self.mean()?;
        let ex2 = from_fixed(self.sum_squares) * 1000.0 / self.count as f64;
        Some((ex2 - mean * mean).max(0.0).sqrt())
    }

    /// The HU at percentile `p` (0–100) of the histogram (lower bin edge, nearest rank).
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((p / 100.0) * (self.count - 1) as f64).round() as u64;
        let mut seen = 0u64;
        for (i, c) in self.histogram.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Some(f64::from(CT_HU_MIN) + i as f64);
            }
        }
        Some(f64::from(CT_HU_MIN) + (self.histogram.len() - 1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn implausible_summaries_are_named() {
        let mut n = NyulSummary {
            volumes: 2,
            ..NyulSummary::default()
        };
        for (i, v) in n.landmark_sums.iter_mut().enumerate() {
            *v = to_fixed(2.0 * (1.0 + 9.9 * i as f64));
        }
        assert_eq!(n.check(), Ok(()));
        let mut scaled = n.clone();
        scaled.landmark_sums[10] = to_fixed(2.0 * 5000.0);
        assert_eq!(scaled.check(), Err(Implausible::LandmarkRange));
        let mut flipped = n.clone();
        flipped.landmark_sums.reverse();
        assert_eq!(flipped.check(), Err(Implausible::LandmarksNotIncreasing));
        assert_eq!(NyulSummary::default().check(), Err(Implausible::Empty));

        let mut c = CtSummary::default();
        for hu in [-50i32, 0, 40, 60] {
            c.count += 1;
            c.sum += to_fixed(f64::from(hu));
            c.sum_squares += to_fixed(f64::from(hu * hu) / 1000.0);
            c.histogram[(hu - CT_HU_MIN) as usize] += 1;
        }
        assert_eq!(c.check(), Ok(()));
        let mut shifted = c.clone();
        shifted.sum = to_fixed(4.0 * 2000.0);
        assert_eq!(shifted.check(), Err(Implausible::CtMoments));
        let mut short = c.clone();
        short.histogram.truncate(10);
        assert_eq!(short.check(), Err(Implausible::HistogramLength));
        let mut inflated = c.clone();
        inflated.count = 1_000_000;
        assert_eq!(inflated.check(), Err(Implausible::HistogramTotal));
    }

    fn nyul() -> impl Strategy<Value = NyulSummary> {
        (
            proptest::array::uniform11(-1_000_000_000i64..1_000_000_000),
            0u64..1000,
        )
            .prop_map(|(landmark_sums, volumes)| NyulSummary {
                landmark_sums,
                volumes,
            })
    }

    fn ct() -> impl Strategy<Value = CtSummary> {
        (
            0u64..1_000_000,
            -1_000_000_000i64..1_000_000_000,
            0i64..1_000_000_000,
            proptest::collection::vec(0u64..1000, CT_HU_BINS),
        )
            .prop_map(|(count, sum, sum_squares, histogram)| CtSummary {
                count,
                sum,
                sum_squares,
                histogram,
            })
    }

    proptest! {
        #[test]
        fn nyul_merge_is_associative_and_commutative(a in nyul(), b in nyul(), c in nyul()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(ab_c, a_bc);
        }

        #[test]
        fn ct_merge_is_associative_and_commutative(a in ct(), b in ct(), c in ct()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(ab_c, a_bc);
        }
    }

    #[test]
    fn statistics_from_summaries() {
        let mut s = CtSummary::default();
        for hu in [-1000i32, 0, 40, 40, 1000] {
            s.count += 1;
            s.sum += to_fixed(f64::from(hu));
            s.sum_squares += to_fixed(f64::from(hu * hu) / 1000.0);
            s.histogram[(hu - CT_HU_MIN) as usize] += 1;
        }
        assert_eq!(s.mean(), Some(16.0));
        let var = [-1000.0f64, 0.0, 40.0, 40.0, 1000.0]
            .iter()
            .map(|x| (x - 16.0).powi(2))
            .sum::<f64>()
            / 5.0;
        assert!((s.std().unwrap_or_default() - var.sqrt()).abs() < 1e-6);
        assert_eq!(s.percentile(50.0), Some(40.0));
        assert_eq!(s.percentile(0.0), Some(-1000.0));
        assert_eq!(s.percentile(100.0), Some(1000.0));
        let n = NyulSummary {
            landmark_sums: [to_fixed(3.0); NYUL_LANDMARKS],
            volumes: 2,
        };
        assert_eq!(n.standard_scale().map(|s| s[0]), Some(1.5));
    }
}
