//! Agreement between two segmentation masks on the image's own grid, distances in mm.
//!
//! Definitions (tested against SimpleITK 2.x and medpy 0.5):
//! - Dice 2|A∩B|/(|A|+|B|) and IoU |A∩B|/|A∪B| (SimpleITK `LabelOverlapMeasuresImageFilter`).
//! - The surface of a mask is the set of its voxels that one erosion with the 6-neighbourhood
//!   removes; voxels on the edge of the grid are surface (outside the grid counts as empty).
//! - A directed surface distance is, for each surface voxel of one mask, the Euclidean distance
//!   in mm (voxel spacing from the geometry) to the nearest surface voxel of the other.
//! - Hausdorff distance: the largest distance from a voxel of one mask to the nearest voxel of
//!   the other, either way, between the voxel sets (SimpleITK's `HausdorffDistanceImageFilter`;
//!   medpy's `hd` measures between surfaces and is larger where one surface runs inside the
//!   other mask).
//! - HD95: the 95th percentile, with linear interpolation between order statistics, of both
//!   directed distance sets pooled — medpy's `hd95`. (MONAI instead takes the larger of the two
//!   directed 95th percentiles; the two differ on the same masks.)
//! - ASSD: the mean of both directed distance sets pooled (medpy 0.5's `assd`; medpy 0.4 and
//!   some tools average the two directed means instead, which weighs the smaller surface more).
//!
//! Empty masks are their own outcome, never a number: both empty ([`MaskAgreement::BothEmpty`]),
//! or one empty ([`MaskAgreement::OneEmpty`]: Dice and IoU are 0, distances undefined).

use ndarray::{Array3, ArrayView3};
use serde::{Deserialize, Serialize};

/// Overlap and distances of two non-empty masks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    pub dice: f64,
    pub iou: f64,
    /// Voxels in A, in B, in both.
    pub a: u64,
    pub b: u64,
    pub both: u64,
    /// mm.
    pub hausdorff: f64,
    pub hd95: f64,
    pub assd: f64,
}

/// The agreement of two masks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum MaskAgreement {
    Both(Overlap),
    /// Neither rater marked anything: agreement, but no overlap to measure.
    BothEmpty,
    /// One rater marked voxels and the other none.
    OneEmpty {
        a: u64,
        b: u64,
    },
}

impl MaskAgreement {
    /// Dice, with the one-empty case as 0 and the both-empty case as `None`.
    pub fn dice(&self) -> Option<f64> {
        match self {
            MaskAgreement::Both(o) => Some(o.dice),
            MaskAgreement::OneEmpty { .. } => Some(0.0),
            MaskAgreement::BothEmpty => None,
        }
    }
}

/// Compare two masks on the same grid with voxel `spacing` (mm, along i, j, k). The caller
/// checks that the grids match (see [`crate::LabelMap::same_grid`]); masks of different shapes
/// are compared over the voxels they share.
pub fn compare(a: ArrayView3<bool>, b: ArrayView3<bool>, spacing: [f64; 3]) -> MaskAgreement {
    let (mut na, mut nb, mut both) = (0u64, 0u64, 0u64);
    for (&x, &y) in a.iter().zip(b.iter()) {
        na += u64::from(x);
        nb += u64::from(y);
        both += u64::from(x && y);
    }
    match (na, nb) {
        (0, 0) => return MaskAgreement::BothEmpty,
        (0, _) | (_, 0) => return MaskAgreement::OneEmpty { a: na, b: nb },
        _ => {}
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let hausdorff = max(&directed(a, b, spacing)).max(max(&directed(b, a, spacing)));
    let sa = surface(a);
    let sb = surface(b);
    let ab = directed(sa.view(), sb.view(), spacing);
    let ba = directed(sb.view(), sa.view(), spacing);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut pooled: Vec<f64> = ab.iter().chain(&ba).copied().collect();
    pooled.sort_by(f64::total_cmp);
    MaskAgreement::Both(Overlap {
        dice: 2.0 * both as f64 / (na + nb) as f64,
        iou: both as f64 / (na + nb - both) as f64,
        a: na,
        b: nb,
        both,
        hausdorff,
        hd95: percentile_sorted(&pooled, 95.0),
        assd: mean(&pooled),
    })
}

/// The q-th percentile of sorted values, linear between order statistics (numpy's default).
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = q / 100.0 * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            let f = pos - lo as f64;
            sorted[lo] + (sorted[hi] - sorted[lo]) * f
        }
    }
}

/// The mask's surface: voxels with a 6-neighbour outside the mask or outside the grid.
pub fn surface(m: ArrayView3<bool>) -> Array3<bool> {
    let (ni, nj, nk) = m.dim();
    Array3::from_shape_fn((ni, nj, nk), |(i, j, k)| {
        if !m[(i, j, k)] {
            return false;
        }
        let edge = i == 0 || j == 0 || k == 0 || i + 1 == ni || j + 1 == nj || k + 1 == nk;
        edge || !m[(i - 1, j, k)]
            || !m[(i + 1, j, k)]
            || !m[(i, j - 1, k)]
            || !m[(i, j + 1, k)]
            || !m[(i, j, k - 1)]
            || !m[(i, j, k + 1)]
    })
}

/// For each voxel of `from`, the distance in mm to the nearest voxel of `to`.
fn directed(from: ArrayView3<bool>, to: ArrayView3<bool>, spacing: [f64; 3]) -> Vec<f64> {
    let d2 = squared_distance_to(to, spacing);
    from.iter()
        .zip(d2.iter())
        .filter(|(f, _)| **f)
        .map(|(_, d)| d.sqrt())
        .collect()
}

/// Exact squared Euclidean distance (mm²) from every voxel to the nearest `true` voxel of
/// `features`, with anisotropic spacing: the separable lower-envelope algorithm of
/// Felzenszwalb and Huttenlocher (2012), one pass per axis.
pub fn squared_distance_to(features: ArrayView3<bool>, spacing: [f64; 3]) -> Array3<f64> {
    let mut d = features.mapv(|f| if f { 0.0 } else { f64::INFINITY });
    for (axis, &s) in spacing.iter().enumerate() {
        let n = d.shape()[axis];
        let mut f = vec![0.0; n];
        let mut out = vec![0.0; n];
        let mut v = vec![0usize; n];
        let mut z = vec![0.0; n + 1];
        for mut lane in d.lanes_mut(ndarray::Axis(axis)) {
            for (q, x) in lane.iter().enumerate() {
                f[q] = *x;
            }
            envelope(&f, s, &mut out, &mut v, &mut z);
            for (q, x) in lane.iter_mut().enumerate() {
                *x = out[q];
            }
        }
    }
    d
}

/// One dimension of the distance transform: d(q) = min_p (s·(q − p))² + f(p).
fn envelope(f: &[f64], s: f64, d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    // Parabolas only from finite samples.
    let mut k: isize = -1;
    let s2 = s * s;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            let p = v[k as usize];
            let (qf, pf) = (q as f64, p as f64);
            let x = ((f[q] + s2 * qf * qf) - (f[p] + s2 * pf * pf)) / (2.0 * s2 * (qf - pf));
            if x <= z[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = x;
            z[k as usize + 1] = f64::INFINITY;
            break;
        }
    }
    if k < 0 {
        d.iter_mut().for_each(|x| *x = f64::INFINITY);
        return;
    }
    let mut j = 0usize;
    for (q, out) in d.iter_mut().enumerate() {
        while z[j + 1] < q as f64 {
            j += 1;
        }
        let p = v[j];
        let dq = s * (q as f64 - p as f64);
        *out = dq * dq + f[p];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(features: &Array3<bool>, spacing: [f64; 3]) -> Array3<f64> {
        let pts: Vec<(usize, usize, usize)> = features
            .indexed_iter()
            .filter(|(_, f)| **f)
            .map(|(p, _)| p)
            .collect();
        Array3::from_shape_fn(features.dim(), |(i, j, k)| {
            pts.iter()
                .map(|&(a, b, c)| {
                    let d = [
                        (i as f64 - a as f64) * spacing[0],
                        (j as f64 - b as f64) * spacing[1],
                        (k as f64 - c as f64) * spacing[2],
                    ];
                    d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
                })
                .fold(f64::INFINITY, f64::min)
        })
    }

    #[test]
    fn the_distance_transform_is_exact() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % 100
        };
        let f = Array3::from_shape_fn((9, 7, 5), |_| next() < 6);
        let spacing = [0.7, 1.3, 2.5];
        let fast = squared_distance_to(f.view(), spacing);
        let slow = brute(&f, spacing);
        for (a, b) in fast.iter().zip(slow.iter()) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }

    #[test]
    fn identical_masks_agree_and_empty_ones_are_their_own_case() {
        let mut m = Array3::from_elem((6, 6, 6), false);
        for i in 1..4 {
            for j in 2..5 {
                m[(i, j, 3)] = true;
            }
        }
        let MaskAgreement::Both(o) = compare(m.view(), m.view(), [1.0, 1.0, 2.0]) else {
            panic!("both non-empty");
        };
        assert_eq!(
            (o.dice, o.iou, o.hausdorff, o.hd95, o.assd),
            (1.0, 1.0, 0.0, 0.0, 0.0)
        );
        let empty = Array3::from_elem((6, 6, 6), false);
        assert_eq!(
            compare(empty.view(), empty.view(), [1.0; 3]),
            MaskAgreement::BothEmpty
        );
        assert_eq!(
            compare(m.view(), empty.view(), [1.0; 3]),
            MaskAgreement::OneEmpty { a: 9, b: 0 }
        );
    }

    #[test]
    fn a_shifted_cube_is_as_far_as_its_shift() {
        let cube = |o: usize| {
            Array3::from_shape_fn((12, 12, 12), |(i, j, k)| {
                (o..o + 4).contains(&i) && (3..7).contains(&j) && (3..7).contains(&k)
            })
        };
        let MaskAgreement::Both(o) = compare(cube(2).view(), cube(4).view(), [1.5, 1.0, 1.0])
        else {
            panic!("both non-empty");
        };
        assert!((o.dice - 0.5).abs() < 1e-12);
        assert!((o.iou - 1.0 / 3.0).abs() < 1e-12);
        assert!((o.hausdorff - 3.0).abs() < 1e-12, "{}", o.hausdorff);
    }
}
