//! Exact statistics of a volume's foreground, read straight from the voxels: the foreground
//! is never copied out, and each statistic costs one read pass (two for order statistics).
//!
//! - The foreground is a value window: `floor ≤ x` (an `f32` bound equivalent to a rule's
//!   `f64` threshold, so the comparison is exact) and, per pass, an upper bound.
//! - Passes run over blocks of 32 voxels. A block's range is taken first with vectorised
//!   compares; a block wholly outside the window (the air around a head) is skipped, and a
//!   block wholly inside needs no per-voxel test.
//! - Order statistics use a histogram over the values' bit patterns: 65,536 buckets (sign,
//!   exponent and the top 7 mantissa bits), monotone in value and needing no known range. A
//!   rank's bucket is found from the counts and only that bucket's values are gathered and
//!   sorted, so a percentile is exact (numpy's linear interpolation) in linear time.

use rayon::prelude::*;

use super::stats::{Contrast, kde_density, local_maxima};

const BLOCK: usize = 32;
const BUCKETS: usize = 1 << 16;
/// Grid points of the tissue-mode KDE (statsmodels rounds `gridsize=80` up to a power of 2).
pub const GRID: usize = 128;

/// The bucket of a value: its bits reordered so that unsigned order is numeric order (−0 is
/// folded onto +0), keeping the top 16.
#[inline]
fn bucket(x: f32) -> usize {
    (key(x) >> 16) as usize & (BUCKETS - 1)
}

#[inline]
fn key(x: f32) -> u32 {
    let b = (x + 0.0).to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// The value whose key is `k` (inverse of [`key`]).
fn unkey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k })
}

/// The values a bucket can hold, as a closed interval (unbounded where its bounds are NaN
/// patterns, which no foreground value has).
fn bucket_bounds(b: usize) -> (f32, f32) {
    let lo = unkey((b as u32) << 16);
    let hi = unkey(((b as u32) << 16) | 0xFFFF);
    (
        if lo.is_nan() { f32::NEG_INFINITY } else { lo },
        if hi.is_nan() { f32::INFINITY } else { hi },
    )
}

/// The smallest `f32` whose value is at least `t` (NaN for NaN).
pub fn f32_at_least(t: f64) -> f32 {
    let c = t as f32;
    if f64::from(c) < t { c.next_up() } else { c }
}

/// The smallest `f32` whose value exceeds `t`.
pub fn f32_above(t: f64) -> f32 {
    let c = f32_at_least(t);
    if f64::from(c) == t { c.next_up() } else { c }
}

/// The largest `f32` whose value is below `t`.
pub fn f32_below(t: f64) -> f32 {
    let c = t as f32;
    let c = if f64::from(c) > t { c.next_down() } else { c };
    if f64::from(c) == t { c.next_down() } else { c }
}

// Block reductions, each a separate loop over eight lanes so that it vectorises.

/// A block's largest value (NaN ignored).
#[inline]
fn block_max(w: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut lanes = w.chunks_exact(8);
    for c in &mut lanes {
        for l in 0..8 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mut r = m[0];
    for &x in m[1..].iter().chain(lanes.remainder()) {
        r = if x > r { x } else { r };
    }
    r
}

/// A block's smallest value (NaN ignored).
#[inline]
fn block_min(w: &[f32]) -> f32 {
    let mut m = [f32::INFINITY; 8];
    let mut lanes = w.chunks_exact(8);
    for c in &mut lanes {
        for l in 0..8 {
            m[l] = if c[l] < m[l] { c[l] } else { m[l] };
        }
    }
    let mut r = m[0];
    for &x in m[1..].iter().chain(lanes.remainder()) {
        r = if x < r { x } else { r };
    }
    r
}

/// Whether a block holds a NaN (or an infinity: x · 0 is 0 only for finite x).
#[inline]
fn block_not_finite(w: &[f32]) -> bool {
    let mut m = [0f32; 8];
    let mut lanes = w.chunks_exact(8);
    for c in &mut lanes {
        for l in 0..8 {
            m[l] += c[l] * 0.0;
        }
    }
    let mut r = 0.0;
    for &x in &m {
        r += x;
    }
    for &x in lanes.remainder() {
        r += x * 0.0;
    }
    r != 0.0
}

/// The foreground of a volume: the voxels at or above `floor` (never NaN).
#[derive(Clone, Copy, Debug)]
pub struct Region<'a> {
    values: &'a [f32],
    floor: f32,
}

/// What one pass over the foreground learns: count, range and a bucket histogram.
#[derive(Debug)]
pub struct Census {
    pub n: usize,
    pub min: f32,
    pub max: f32,
    /// Rank of the first value of each bucket (and the count at the end).
    starts: Vec<usize>,
}

/// Values at requested ranks, and for the first requested percentile how many values lie at
/// or below it and the largest of them.
#[derive(Debug, PartialEq)]
pub struct Located {
    pub values: Vec<f64>,
    pub at_or_below_first: usize,
    pub largest_at_or_below_first: f32,
}

/// Count and range of a foreground.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Extent {
    pub n: usize,
    pub min: f32,
    pub max: f32,
}

impl Census {
    pub fn extent(&self) -> Extent {
        Extent {
            n: self.n,
            min: self.min,
            max: self.max,
        }
    }
}

impl<'a> Region<'a> {
    /// The voxels whose value (as `f64`) exceeds `threshold`: the foreground rules' form.
    pub fn above(values: &'a [f32], threshold: f64) -> Self {
        Region {
            values,
            floor: f32_above(threshold),
        }
    }

    /// Every value (a region already gathered, e.g. by a mask); NaN never counts.
    pub fn all(values: &'a [f32]) -> Self {
        Region {
            values,
            floor: f32::NEG_INFINITY,
        }
    }

    fn chunk(&self) -> usize {
        let c = (self.values.len() / (4 * rayon::current_num_threads().max(1))).max(1 << 16);
        c.div_ceil(BLOCK) * BLOCK
    }

    /// Fold every foreground value in `[lo, hi]`: `visit(acc, block, full, min, max)` sees
    /// each block that may hold such values, with its range; `full` when all of its values are
    /// in (so no per-value test is due).
    fn fold<A, I, V, M>(&self, lo: f32, hi: f32, init: I, visit: V, merge: M) -> A
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        V: Fn(&mut A, &[f32], bool, f32, f32) + Sync + Send,
        M: Fn(A, A) -> A + Sync + Send,
    {
        let lo = self.at_least_floor(lo);
        if lo.is_nan() || hi.is_nan() {
            return init();
        }
        self.values
            .par_chunks(self.chunk())
            .map(|c| {
                let mut acc = init();
                for w in c.chunks(BLOCK) {
                    let bmax = block_max(w);
                    if bmax < lo {
                        continue;
                    }
                    let bmin = block_min(w);
                    if bmin > hi {
                        continue;
                    }
                    let full = bmin >= lo && bmax <= hi && !block_not_finite(w);
                    visit(&mut acc, w, full, bmin, bmax);
                }
                acc
            })
            .reduce(&init, &merge)
    }

    /// The larger of `lo` and the floor (the floor when either is NaN; a NaN floor admits
    /// nothing).
    fn at_least_floor(&self, lo: f32) -> f32 {
        if lo > self.floor { lo } else { self.floor }
    }

    /// The window `[lo, hi]` intersected with the foreground, as a per-value test.
    fn window(&self, lo: f32, hi: f32) -> impl Fn(f32) -> bool + Copy + Sync + Send {
        let lo = self.at_least_floor(lo);
        move |x: f32| x >= lo && x <= hi
    }

    /// Count, minimum and maximum of the foreground in one pass (no histogram).
    pub fn extent(&self) -> Option<(usize, f32, f32)> {
        let inside = self.window(f32::NEG_INFINITY, f32::INFINITY);
        let (n, lo, hi) = self.fold(
            f32::NEG_INFINITY,
            f32::INFINITY,
            || (0usize, f32::INFINITY, f32::NEG_INFINITY),
            |a, w, full, bmin, bmax| {
                if full {
                    a.0 += w.len();
                    a.1 = a.1.min(bmin);
                    a.2 = a.2.max(bmax);
                } else {
                    for &x in w.iter().filter(|x| inside(**x)) {
                        a.0 += 1;
                        a.1 = a.1.min(x);
                        a.2 = a.2.max(x);
                    }
                }
            },
            |a, b| (a.0 + b.0, a.1.min(b.1), a.2.max(b.2)),
        );
        (n > 0).then_some((n, lo, hi))
    }

    /// Count, range and bucket histogram in one pass; `None` when the region is empty.
    pub fn census(&self) -> Option<Census> {
        let inside = self.window(f32::NEG_INFINITY, f32::INFINITY);
        let init = || {
            let h: Box<[u32; BUCKETS]> = Box::new([0; BUCKETS]);
            (h, 0usize, f32::INFINITY, f32::NEG_INFINITY)
        };
        let (hist, n, min, max) = self.fold(
            f32::NEG_INFINITY,
            f32::INFINITY,
            init,
            |a, w, full, bmin, bmax| {
                let h: &mut [u32; BUCKETS] = &mut a.0;
                if full {
                    a.1 += w.len();
                    a.2 = a.2.min(bmin);
                    a.3 = a.3.max(bmax);
                    for &x in w {
                        h[bucket(x)] += 1;
                    }
                } else {
                    for &x in w.iter().filter(|x| inside(**x)) {
                        h[bucket(x)] += 1;
                        a.1 += 1;
                        a.2 = a.2.min(x);
                        a.3 = a.3.max(x);
                    }
                }
            },
            |mut a, b| {
                a.0.iter_mut().zip(b.0.iter()).for_each(|(x, y)| *x += y);
                (a.0, a.1 + b.1, a.2.min(b.2), a.3.max(b.3))
            },
        );
        if n == 0 {
            return None;
        }
        let mut starts = vec![0usize; BUCKETS + 1];
        for b in 0..BUCKETS {
            starts[b + 1] = starts[b] + hist[b] as usize;
        }
        Some(Census {
            n,
            min,
            max,
            starts,
        })
    }

    /// The values of the given buckets (ascending bucket numbers), each list sorted.
    fn gather(&self, buckets: &[usize]) -> Vec<Vec<f32>> {
        let (Some(first), Some(last)) = (buckets.first(), buckets.last()) else {
            return Vec::new();
        };
        let (lo, _) = bucket_bounds(*first);
        let (_, hi) = bucket_bounds(*last);
        let mut slot = vec![0u16; BUCKETS];
        for (i, b) in buckets.iter().enumerate() {
            slot[*b] = (i + 1) as u16;
        }
        let inside = self.window(lo, hi);
        let k = buckets.len();
        let mut lists = self.fold(
            lo,
            hi,
            || vec![Vec::new(); k],
            |g: &mut Vec<Vec<f32>>, w, full, _, _| {
                for &x in w {
                    if full || inside(x) {
                        let s = slot[bucket(x)];
                        if s > 0 {
                            g[usize::from(s) - 1].push(x);
                        }
                    }
                }
            },
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, mut y)| x.append(&mut y));
                a
            },
        );
        for l in &mut lists {
            l.sort_unstable_by(f32::total_cmp);
        }
        lists
    }

    /// Percentiles (0–100, numpy's linear interpolation) of the region, exactly, with one
    /// gathering pass; and for the first one, how many values lie at or below it and the
    /// largest of them. `ps` must not be empty.
    pub fn locate(&self, census: &Census, ps: &[f64]) -> Located {
        let n = census.n;
        let starts = &census.starts;
        let pos: Vec<(usize, f64)> = ps
            .iter()
            .map(|p| {
                let x = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
                (x.floor() as usize, x - x.floor())
            })
            .collect();
        let mut ranks = Vec::new();
        for &(lo, frac) in &pos {
            ranks.push(lo);
            if frac > 0.0 && lo + 1 < n {
                ranks.push(lo + 1);
            }
        }
        let rank_bucket = |r: usize| starts.partition_point(|s| *s <= r) - 1;
        let mut needed: Vec<usize> = ranks.iter().map(|r| rank_bucket(*r)).collect();
        needed.sort_unstable();
        needed.dedup();
        let lists = self.gather(&needed);
        let value_at = |r: usize| -> f32 {
            let b = rank_bucket(r);
            let i = needed.binary_search(&b).unwrap_or(0);
            lists
                .get(i)
                .and_then(|l| l.get(r - starts[b]))
                .copied()
                .unwrap_or(f32::NAN)
        };
        let values: Vec<f64> = pos
            .iter()
            .map(|&(lo, frac)| {
                let v = f64::from(value_at(lo));
                if frac > 0.0 && lo + 1 < n {
                    v + frac * (f64::from(value_at(lo + 1)) - v)
                } else {
                    v
                }
            })
            .collect();
        // Values at or below the first percentile: every bucket below its lower rank's, and
        // the gathered values at or below it (buckets between gathered ones are empty).
        let t = values.first().copied().unwrap_or(f64::NAN);
        let b0 = pos.first().map_or(0, |p| rank_bucket(p.0));
        let mut count = starts[b0];
        let mut largest = f32::NEG_INFINITY;
        for (b, l) in needed.iter().zip(&lists) {
            if *b >= b0 {
                for &v in l.iter().filter(|v| f64::from(**v) <= t) {
                    count += 1;
                    largest = largest.max(v);
                }
            }
        }
        Located {
            values,
            at_or_below_first: count,
            largest_at_or_below_first: largest,
        }
    }

    /// Percentiles (0–100, numpy's linear interpolation) of the region, exactly, with its
    /// count and range: a census, then one gathering pass. `None` when the region is empty.
    pub fn percentiles(&self, ps: &[f64]) -> Option<(Extent, Located)> {
        let census = self.census()?;
        let located = self.locate(&census, ps);
        Some((census.extent(), located))
    }

    /// How many foreground values lie below `t` (as `f64`), in one pass.
    pub fn count_below(&self, t: f64) -> usize {
        let hi = f32_below(t);
        let inside = self.window(f32::NEG_INFINITY, hi);
        self.fold(
            f32::NEG_INFINITY,
            hi,
            || 0usize,
            |a, w, full, _, _| {
                *a += if full {
                    w.len()
                } else {
                    w.iter().filter(|x| inside(**x)).count()
                }
            },
            |a, b| a + b,
        )
    }

    /// Count, sum and sum of squares of the foreground values strictly between `lo` and `hi`.
    pub fn moments_between(&self, lo: f64, hi: f64) -> (usize, f64, f64) {
        let (lo, hi) = (f32_above(lo), f32_below(hi));
        let inside = self.window(lo, hi);
        let (n, s, q) = self.fold(
            lo,
            hi,
            || (0usize, [0.0f64; 4], [0.0f64; 4]),
            |a, w, full, _, _| {
                let mut lanes = w.chunks_exact(4);
                for c in &mut lanes {
                    for (l, x) in c.iter().enumerate() {
                        let keep = full || inside(*x);
                        let f = if keep { f64::from(*x) } else { 0.0 };
                        a.0 += usize::from(keep);
                        a.1[l] += f;
                        a.2[l] += f * f;
                    }
                }
                for &x in lanes.remainder() {
                    if full || inside(x) {
                        let f = f64::from(x);
                        a.0 += 1;
                        a.1[0] += f;
                        a.2[0] += f * f;
                    }
                }
            },
            |a, b| {
                let mut s = a.1;
                let mut q = a.2;
                for l in 0..4 {
                    s[l] += b.1[l];
                    q[l] += b.2[l];
                }
                (a.0 + b.0, s, q)
            },
        );
        (n, s.iter().sum(), q.iter().sum())
    }

    /// statsmodels' linear binning (`fast_linbin`, interior points) of the foreground values
    /// at or below `upper` onto [`GRID`] points from `a` with spacing `1 / inv`: weight
    /// `1 − r` to point `⌊(x − a)·inv⌋` and `r` to the next, `r` the fractional part.
    pub fn linear_binning(&self, upper: f32, a: f64, inv: f64) -> [f64; GRID] {
        let inside = self.window(f32::NEG_INFINITY, upper);
        // Per grid point, how many values start there and the sum of their fractions: the
        // two weights follow, with one integer and one float update per value.
        let (count, frac) = self.fold(
            f32::NEG_INFINITY,
            upper,
            || ([0u32; GRID], [0.0f64; GRID]),
            |h, w, full, _, _| {
                let (count, frac) = (&mut h.0, &mut h.1);
                for &x in w {
                    if full || inside(x) {
                        let lxi = (f64::from(x) - a) * inv;
                        // `as i32` is one instruction (`as usize` needs range fix-ups).
                        let li = lxi as i32;
                        if (1..GRID as i32 - 1).contains(&li) {
                            count[li as usize] += 1;
                            frac[li as usize] += lxi - f64::from(li);
                        }
                    }
                }
            },
            |mut x, y| {
                x.0.iter_mut().zip(&y.0).for_each(|(p, q)| *p += q);
                x.1.iter_mut().zip(&y.1).for_each(|(p, q)| *p += q);
                x
            },
        );
        let mut out = [0.0; GRID];
        for j in 0..GRID {
            let from_left = if j > 0 { frac[j - 1] } else { 0.0 };
            out[j] = f64::from(count[j]) - frac[j] + from_left;
        }
        out
    }

    /// statsmodels `KDEUnivariate(kernel="gau", bw=max/80, gridsize=80, fft=True)` of the
    /// `n` foreground values from `min` up to `max` (all of them when `max` is the
    /// foreground's maximum): the 128-point grid and the density on it.
    pub fn smooth_histogram(&self, n: usize, min: f32, max: f32) -> (Vec<f64>, Vec<f64>) {
        let (min, top) = (f64::from(min), f64::from(max));
        let bw = top / 80.0;
        let a = min - 3.0 * bw;
        let b = top + 3.0 * bw;
        let delta = (b - a) / (GRID - 1) as f64;
        let binned = self.linear_binning(max, a, 1.0 / delta);
        kde_density(&binned, n, a, b, bw)
    }

    /// The tissue mode of a contrast (intensity-normalization 2.2.4 `get_tissue_mode`): the
    /// last (T1) or first (PD) peak after dropping the top 4 % (1 %), or the largest peak;
    /// with the foreground's count and range. `None` when the region is empty.
    pub fn tissue_mode(&self, contrast: Contrast) -> Option<(Extent, f64)> {
        match contrast {
            Contrast::T2 | Contrast::Flair => {
                // No percentile: count and range suffice.
                let (n, min, max) = self.extent()?;
                Some((Extent { n, min, max }, self.largest_peak(n, min, max)))
            }
            Contrast::T1 | Contrast::Pd => {
                let census = self.census()?;
                Some((census.extent(), self.tissue_mode_with(&census, contrast)))
            }
        }
    }

    /// [`Region::tissue_mode`] reusing a census of the region (WhiteStripe needs one anyway).
    pub fn tissue_mode_with(&self, census: &Census, contrast: Contrast) -> f64 {
        match contrast {
            Contrast::T2 | Contrast::Flair => self.largest_peak(census.n, census.min, census.max),
            Contrast::T1 | Contrast::Pd => {
                let tail = if contrast == Contrast::T1 { 96.0 } else { 99.0 };
                let l = self.locate(census, &[tail]);
                // The values at or below the percentile are exactly those up to the largest.
                let (grid, pdf) = self.smooth_histogram(
                    l.at_or_below_first,
                    census.min,
                    l.largest_at_or_below_first,
                );
                let maxima = local_maxima(&pdf);
                let i = if contrast == Contrast::T1 {
                    maxima.last()
                } else {
                    maxima.first()
                };
                i.map_or(grid[0], |&i| grid[i])
            }
        }
    }

    fn largest_peak(&self, n: usize, min: f32, max: f32) -> f64 {
        let (grid, pdf) = self.smooth_histogram(n, min, max);
        let i = pdf
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        grid[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::percentiles_of;

    fn lcg(n: usize, seed: u64, f: impl Fn(u64) -> f32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f(state >> 33)
            })
            .collect()
    }

    /// A volume-like mix: runs of background zeros, a signed foreground, some NaNs.
    fn mixed(n: usize, seed: u64) -> Vec<f32> {
        lcg(n, seed, |r| {
            let run = (r >> 20) % 5;
            if run == 0 {
                0.0
            } else if r % 997 == 0 {
                f32::NAN
            } else {
                (r % 70_000) as f32 / 7.0 - 3000.0
            }
        })
    }

    #[test]
    fn bucket_keys_are_monotone_and_invert() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -2.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            1.0,
            1.0000001,
            3e38,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{} {}", w[0], w[1]);
        }
        assert_eq!(key(-0.0), key(0.0));
        for x in xs.iter().filter(|x| **x != -0.0) {
            assert_eq!(unkey(key(*x)).to_bits(), x.to_bits());
            let (lo, hi) = bucket_bounds(bucket(*x));
            assert!(lo <= *x && *x <= hi, "{x} in [{lo}, {hi}]");
        }
    }

    #[test]
    fn f32_bounds_are_exact() {
        for t in [0.1f64, 1e-6, -3.3, 900.0, 1.0 / 3.0, 16777217.0, -0.0] {
            let a = f32_above(t);
            assert!(f64::from(a) > t && f64::from(a.next_down()) <= t, "{t}");
            let b = f32_below(t);
            assert!(f64::from(b) < t && f64::from(b.next_up()) >= t, "{t}");
            let c = f32_at_least(t);
            assert!(f64::from(c) >= t && f64::from(c.next_down()) < t, "{t}");
        }
    }

    #[test]
    fn census_and_percentiles_match_brute_force() {
        for (len, seed) in [(1usize, 1u64), (63, 2), (1000, 3), (300_001, 4)] {
            let v = mixed(len, seed);
            let region = Region::above(&v, 1e-6);
            let fg: Vec<f32> = v.iter().copied().filter(|x| f64::from(*x) > 1e-6).collect();
            let Some(c) = region.census() else {
                assert!(fg.is_empty());
                continue;
            };
            assert_eq!(c.n, fg.len());
            let lo = fg.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = fg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!((c.min, c.max), (lo, hi));
            assert_eq!(region.extent(), Some((fg.len(), lo, hi)));
            let ps = [96.0, 0.0, 0.5, 1.0, 10.0, 33.3, 50.0, 99.5, 100.0];
            let l = region.locate(&c, &ps);
            assert_eq!(l.values, percentiles_of(&fg, &ps), "len {len}");
            let at_or_below: Vec<f32> = fg
                .iter()
                .copied()
                .filter(|x| f64::from(*x) <= l.values[0])
                .collect();
            assert_eq!(l.at_or_below_first, at_or_below.len());
            let largest = at_or_below
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(l.largest_at_or_below_first, largest);
        }
    }

    #[test]
    fn counts_and_moments_in_windows_match_brute_force() {
        let v = mixed(200_003, 9);
        let all = Region::all(&v);
        let fg: Vec<f64> = v
            .iter()
            .filter(|x| !x.is_nan())
            .map(|x| f64::from(*x))
            .collect();
        for t in [-3000.0, -1.5, 0.0, 0.1, 2500.3, 1e9] {
            assert_eq!(
                all.count_below(t),
                fg.iter().filter(|x| **x < t).count(),
                "{t}"
            );
        }
        for (lo, hi) in [(0.0, 100.0), (-10.0, 10.0), (-1e9, 1e9), (5.0, 4.0)] {
            let inside: Vec<f64> = fg.iter().copied().filter(|x| *x > lo && *x < hi).collect();
            let (n, s, q) = all.moments_between(lo, hi);
            assert_eq!(n, inside.len());
            let bs: f64 = inside.iter().sum();
            let bq: f64 = inside.iter().map(|x| x * x).sum();
            assert!((s - bs).abs() <= 1e-9 * bs.abs().max(1.0), "{s} {bs}");
            assert!((q - bq).abs() <= 1e-9 * bq.max(1.0), "{q} {bq}");
        }
    }

    #[test]
    fn linear_binning_matches_the_two_weight_form() {
        let v = mixed(100_000, 5);
        let region = Region::above(&v, 0.0);
        let (a, m) = (-10.0, GRID);
        let inv = 127.0 / 7000.0;
        let upper = 5000.0f32;
        let mut expected = vec![0.0f64; m];
        for x in v.iter().copied().filter(|x| *x > 0.0 && *x <= upper) {
            let lxi = (f64::from(x) - a) * inv;
            let li = lxi as usize;
            let rem = lxi - li as f64;
            if li >= 1 && li < m - 1 {
                expected[li] += 1.0 - rem;
                expected[li + 1] += rem;
            }
        }
        let got = region.linear_binning(upper, a, inv);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{g} {e}");
        }
        assert!(expected.iter().sum::<f64>() > 1000.0);
    }
}
