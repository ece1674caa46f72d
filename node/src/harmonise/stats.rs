//! Statistics the harmonisation methods share: linear-time percentiles (numpy's linear
//! interpolation), moments, Otsu's threshold, and the tissue-mode finder of
//! `intensity-normalization` 2.2.4 (statsmodels' FFT Gaussian KDE with an absolute bandwidth of
//! max/80 on a 128-point grid). Generic over `f32` voxels and `f64` values; sums in `f64`.

use rayon::prelude::*;

/// A voxel value type.
pub trait Sample: Copy + Into<f64> + PartialOrd + Send + Sync {}
impl Sample for f32 {}
impl Sample for f64 {}

fn cmp<T: PartialOrd>(a: &T, b: &T) -> std::cmp::Ordering {
    a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal)
}

/// Percentiles (0–100) of `values`, numpy's default linear interpolation, in linear time
/// without sorting or copying the values: a 65,536-bin histogram locates the bins holding the
/// needed ranks, and only those bins' values are gathered and selected. Exact.
pub fn percentiles<T: Sample>(values: &mut [T], ps: &[f64]) -> Vec<f64> {
    if values.len() < (1 << 16) {
        return percentiles_by_selection(values, ps);
    }
    percentiles_by_histogram(values, ps)
}

/// Chunk size for per-thread histograms: a few chunks per thread, so that per-chunk
/// histograms are few (each costs an allocation and a merge).
fn chunk_len(n: usize) -> usize {
    (n / (4 * rayon::current_num_threads().max(1))).max(1 << 16)
}

fn percentiles_by_histogram<T: Sample>(values: &[T], ps: &[f64]) -> Vec<f64> {
    let (min, max) = min_max(values);
    percentiles_in_range(values, ps, min, max)
}

/// [`percentiles`] of values whose minimum and maximum are known (no reordering, no copy).
pub fn percentiles_in_range<T: Sample>(values: &[T], ps: &[f64], min: f64, max: f64) -> Vec<f64> {
    if values.len() < (1 << 16) {
        return percentiles_by_selection(&mut values.to_vec(), ps);
    }
    located(values, ps, min, max).0
}

/// One percentile of values in a known range, with the count and the largest of the values
/// at or below it (what the tissue-mode KDE needs, without another pass).
fn percentile_and_below<T: Sample>(values: &[T], p: f64, min: f64, max: f64) -> (f64, usize, f64) {
    if values.len() < (1 << 16) {
        let t = percentiles_by_selection(&mut values.to_vec(), &[p])[0];
        let (n, _, hi) = count_min_max_below(values, t);
        return (t, n, hi);
    }
    let (v, below) = located(values, &[p], min, max);
    let (n, hi) = below.unwrap_or((0, f64::NEG_INFINITY));
    (v[0], n, hi)
}

/// The percentiles by histogram location (values in a known range, at least 2^16 of them).
fn located<T: Sample>(
    values: &[T],
    ps: &[f64],
    min: f64,
    max: f64,
) -> (Vec<f64>, Option<(usize, f64)>) {
    RankHistogram::build(values, min, max).locate(values, ps)
}

/// A 65,536-bin histogram of values over their known range: built in one pass, it then
/// answers any number of exact percentile queries with one gathering pass each.
#[derive(Debug)]
pub struct RankHistogram {
    min: f64,
    scale: f64,
    n: usize,
    /// Rank of the first value of each bin (and the count at the end).
    starts: Vec<usize>,
    degenerate: bool,
}

const RANK_BINS: usize = 1 << 16;

impl RankHistogram {
    pub fn build<T: Sample>(values: &[T], min: f64, max: f64) -> Self {
        let n = values.len();
        if max.partial_cmp(&min) != Some(std::cmp::Ordering::Greater) {
            return RankHistogram {
                min,
                scale: 0.0,
                n,
                starts: Vec::new(),
                degenerate: true,
            };
        }
        let scale = RANK_BINS as f64 / (max - min);
        let bin = move |v: f64| (((v - min) * scale) as usize).min(RANK_BINS - 1);
        let hist = values
            .par_chunks(chunk_len(n))
            .map(|chunk| {
                let mut h = vec![0u32; RANK_BINS];
                for v in chunk {
                    h[bin((*v).into())] += 1;
                }
                h
            })
            .reduce(
                || vec![0u32; RANK_BINS],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let mut starts = vec![0usize; RANK_BINS + 1];
        for b in 0..RANK_BINS {
            starts[b + 1] = starts[b] + hist[b] as usize;
        }
        RankHistogram {
            min,
            scale,
            n,
            starts,
            degenerate: false,
        }
    }

    /// Percentiles (numpy's linear interpolation) of the same `values`, and for the first
    /// one the count and the largest of the values at or below it.
    pub fn locate<T: Sample>(&self, values: &[T], ps: &[f64]) -> (Vec<f64>, Option<(usize, f64)>) {
        let n = self.n;
        if self.degenerate {
            return (vec![self.min; ps.len()], Some((n, self.min)));
        }
        let (min, scale) = (self.min, self.scale);
        let bin = move |v: f64| (((v - min) * scale) as usize).min(RANK_BINS - 1);
        let starts = &self.starts;
        // Ranks needed: floor and floor + 1 of each position.
        let mut ranks: Vec<usize> = Vec::new();
        let pos: Vec<(usize, f64)> = ps
            .iter()
            .map(|p| {
                let x = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
                (x.floor() as usize, x - x.floor())
            })
            .collect();
        for &(lo, frac) in &pos {
            ranks.push(lo);
            if frac > 0.0 && lo + 1 < n {
                ranks.push(lo + 1);
            }
        }
        let rank_bin = |r: usize| starts.partition_point(|s| *s <= r) - 1;
        let mut needed: Vec<usize> = ranks.iter().map(|r| rank_bin(*r)).collect();
        needed.sort_unstable();
        needed.dedup();
        // Which gathered list a bin's values go to (0: none), by table lookup.
        let mut slot = vec![0u16; RANK_BINS];
        for (i, b) in needed.iter().enumerate() {
            slot[*b] = (i + 1) as u16;
        }
        let mut gathered: Vec<Vec<f64>> = values
            .par_chunks(chunk_len(n))
            .map(|chunk| {
                let mut g: Vec<Vec<f64>> = vec![Vec::new(); needed.len()];
                for v in chunk {
                    let v: f64 = (*v).into();
                    let s = slot[bin(v)];
                    if s > 0 {
                        g[usize::from(s) - 1].push(v);
                    }
                }
                g
            })
            .reduce(
                || vec![Vec::new(); needed.len()],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, mut y)| x.append(&mut y));
                    a
                },
            );
        for g in &mut gathered {
            g.sort_unstable_by(f64::total_cmp);
        }
        let value_at = |r: usize| -> f64 {
            let b = rank_bin(r);
            let i = needed.binary_search(&b).unwrap_or(0);
            gathered[i][r - starts[b]]
        };
        let out: Vec<f64> = pos
            .iter()
            .map(|&(lo, frac)| {
                let v = value_at(lo);
                if frac > 0.0 && lo + 1 < n {
                    v + frac * (value_at(lo + 1) - v)
                } else {
                    v
                }
            })
            .collect();
        // For the first percentile: how many values are at or below it, and the largest of them
        // (bins between the gathered ones are empty, so the gathered values decide).
        let below = out.first().map(|&t| {
            let b0 = rank_bin(pos[0].0);
            let mut count = starts[b0];
            let mut largest = f64::NEG_INFINITY;
            for (i, b) in needed.iter().enumerate() {
                if *b >= b0 {
                    for v in gathered[i].iter().filter(|v| **v <= t) {
                        count += 1;
                        largest = largest.max(*v);
                    }
                }
            }
            (count, largest)
        });
        (out, below)
    }
}

/// Percentiles by successive selection (small inputs). `values` is reordered.
fn percentiles_by_selection<T: Sample>(values: &mut [T], ps: &[f64]) -> Vec<f64> {
    let n = values.len();
    if n == 0 {
        return vec![f64::NAN; ps.len()];
    }
    let mut wanted: Vec<(usize, f64, usize)> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let pos = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            (pos.floor() as usize, pos - pos.floor(), i)
        })
        .collect();
    wanted.sort_by_key(|w| w.0);
    let mut out = vec![0.0; ps.len()];
    let mut start = 0usize;
    let mut cache: Option<(usize, f64)> = None;
    for (lo, frac, i) in wanted {
        let lo_value = match cache {
            Some((k, v)) if k == lo => v,
            _ => {
                let (_, v, _) = values[start..].select_nth_unstable_by(lo - start, cmp);
                let v: f64 = (*v).into();
                start = lo;
                cache = Some((lo, v));
                v
            }
        };
        out[i] = if frac > 0.0 && lo + 1 < n {
            let next = values[lo + 1..]
                .iter()
                .map(|v| (*v).into())
                .fold(f64::INFINITY, f64::min);
            lo_value + frac * (next - lo_value)
        } else {
            lo_value
        };
    }
    out
}

/// Percentiles of values that must not be reordered (no copy for large inputs).
pub fn percentiles_of<T: Sample>(values: &[T], ps: &[f64]) -> Vec<f64> {
    if values.len() < (1 << 16) {
        return percentiles_by_selection(&mut values.to_vec(), ps);
    }
    percentiles_by_histogram(values, ps)
}

/// One percentile.
pub fn percentile<T: Sample>(values: &mut [T], p: f64) -> f64 {
    percentiles(values, &[p])[0]
}

/// Minimum and maximum.
pub fn min_max<T: Sample>(values: &[T]) -> (f64, f64) {
    values
        .par_chunks(chunk_len(values.len()))
        .map(|chunk| {
            chunk
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    let v: f64 = (*v).into();
                    (a.min(v), b.max(v))
                })
        })
        .reduce(
            || (f64::INFINITY, f64::NEG_INFINITY),
            |(a, b), (c, d)| (a.min(c), b.max(d)),
        )
}

/// Mean and population standard deviation.
pub fn mean_std<T: Sample>(values: &[T]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.par_iter().map(|v| (*v).into()).sum::<f64>() / n;
    let var = values
        .par_iter()
        .map(|v| {
            let d: f64 = (*v).into() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// Otsu's threshold over a 256-bin histogram of `values`.
pub fn otsu<T: Sample>(values: &[T]) -> f64 {
    let (min, max) = min_max(values);
    if max.partial_cmp(&min) != Some(std::cmp::Ordering::Greater) {
        return min;
    }
    let bins = 256usize;
    let width = (max - min) / bins as f64;
    let hist = values
        .par_chunks(1 << 16)
        .map(|chunk| {
            let mut h = vec![0u64; bins];
            for v in chunk {
                let v: f64 = (*v).into();
                h[(((v - min) / width) as usize).min(bins - 1)] += 1;
            }
            h
        })
        .reduce(
            || vec![0u64; bins],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let centre = |b: usize| min + (b as f64 + 0.5) * width;
    let total = values.len() as f64;
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(b, c)| centre(b) * *c as f64)
        .sum();
    let (mut w0, mut sum0, mut best, mut threshold) = (0.0, 0.0, -1.0, min);
    for (b, c) in hist.iter().enumerate() {
        w0 += *c as f64;
        sum0 += centre(b) * *c as f64;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let m0 = sum0 / w0;
        let m1 = (sum_all - sum0) / w1;
        let between = w0 * w1 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            threshold = min + (b as f64 + 1.0) * width;
        }
    }
    threshold
}

/// statsmodels `KDEUnivariate(kernel="gau", bw=max/80, gridsize=80, fft=True)`: the grid
/// (128 points from min − 3 bw to max + 3 bw) and the density on it.
pub fn smooth_histogram<T: Sample>(values: &[T]) -> (Vec<f64>, Vec<f64>) {
    smooth_histogram_below(values, f64::INFINITY)
}

/// [`smooth_histogram`] of the values at or below `upper`, without collecting them.
pub fn smooth_histogram_below<T: Sample>(values: &[T], upper: f64) -> (Vec<f64>, Vec<f64>) {
    let (n, min, max) = count_min_max_below(values, upper);
    smooth_histogram_known(values, upper, n, min, max)
}

fn count_min_max_below<T: Sample>(values: &[T], upper: f64) -> (usize, f64, f64) {
    values
        .par_chunks(chunk_len(values.len()))
        .map(|chunk| {
            let (mut c, mut a, mut b) = (0usize, f64::INFINITY, f64::NEG_INFINITY);
            for v in chunk {
                let v: f64 = (*v).into();
                if v <= upper {
                    c += 1;
                    a = a.min(v);
                    b = b.max(v);
                }
            }
            (c, a, b)
        })
        .reduce(
            || (0, f64::INFINITY, f64::NEG_INFINITY),
            |(c, a, b), (d, e, f)| (c + d, a.min(e), b.max(f)),
        )
}

/// [`smooth_histogram_below`] when the count, minimum and maximum of the values at or below
/// `upper` are known.
fn smooth_histogram_known<T: Sample>(
    values: &[T],
    upper: f64,
    n: usize,
    min: f64,
    max: f64,
) -> (Vec<f64>, Vec<f64>) {
    let bw = max / 80.0;
    let m = 128usize;
    let a = min - 3.0 * bw;
    let b = max + 3.0 * bw;
    let delta = (b - a) / (m - 1) as f64;
    let range = b - a;
    // Linear binning (statsmodels fast_linbin, interior points).
    let inv = 1.0 / delta;
    let mut binned = values
        .par_chunks(chunk_len(values.len()))
        .map(|chunk| {
            let mut h = vec![0.0f64; m];
            for v in chunk {
                let v: f64 = (*v).into();
                if v > upper {
                    continue;
                }
                let lxi = (v - a) * inv;
                let li = lxi as usize;
                let rem = lxi - li as f64;
                if li >= 1 && li < m - 1 {
                    h[li] += 1.0 - rem;
                    h[li + 1] += rem;
                }
            }
            h
        })
        .reduce(
            || vec![0.0f64; m],
            |mut x, y| {
                x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                x
            },
        );
    for x in &mut binned {
        *x /= delta * n as f64;
    }
    // Real DFT, Silverman's Gaussian transform, inverse (numpy rfft/irfft conventions).
    let half = m / 2;
    let mut re = vec![0.0; half + 1];
    let mut im = vec![0.0; half + 1];
    let pi = std::f64::consts::PI;
    for j in 0..=half {
        let (mut sr, mut si) = (0.0, 0.0);
        for (k, x) in binned.iter().enumerate() {
            let angle = -2.0 * pi * (j * k) as f64 / m as f64;
            sr += x * angle.cos();
            si += x * angle.sin();
        }
        let jf = j as f64;
        let fac1 = 2.0 * (pi * bw / range).powi(2);
        let bc = 1.0 - (1.0 / 3.0) * (jf / m as f64 * pi).powi(2);
        let fac = (-jf * jf * fac1).exp() / bc;
        re[j] = sr * fac;
        im[j] = if j == 0 || j == half { 0.0 } else { si * fac };
    }
    let grid: Vec<f64> = (0..m).map(|i| a + i as f64 * delta).collect();
    let density: Vec<f64> = (0..m)
        .map(|k| {
            let mut s = re[0];
            for j in 1..half {
                let angle = 2.0 * pi * (j * k) as f64 / m as f64;
                s += 2.0 * (re[j] * angle.cos() - im[j] * angle.sin());
            }
            s += re[half] * (pi * k as f64).cos();
            100.0 * s / m as f64
        })
        .collect();
    (grid, density)
}

/// Which tissue peak a contrast normalises to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Contrast {
    /// T1 (and "other"): the last peak.
    T1,
    /// T2: the largest peak.
    T2,
    /// FLAIR: the largest peak.
    Flair,
    /// PD: the first peak.
    Pd,
}

fn local_maxima(pdf: &[f64]) -> Vec<usize> {
    (1..pdf.len().saturating_sub(1))
        .filter(|&i| pdf[i] > pdf[i - 1] && pdf[i] > pdf[i + 1])
        .collect()
}

/// The tissue mode of a contrast (intensity-normalization 2.2.4 `get_tissue_mode`).
pub fn tissue_mode<T: Sample>(voi: &[T], contrast: Contrast) -> f64 {
    let (min, max) = min_max(voi);
    tissue_mode_in_range(voi, contrast, min, max)
}

/// [`tissue_mode`] of values whose minimum and maximum are known.
pub fn tissue_mode_in_range<T: Sample>(voi: &[T], contrast: Contrast, min: f64, max: f64) -> f64 {
    tissue_mode_with(voi, contrast, min, max, None)
}

/// [`tissue_mode_in_range`] reusing a [`RankHistogram`] of the same values.
pub fn tissue_mode_with<T: Sample>(
    voi: &[T],
    contrast: Contrast,
    min: f64,
    max: f64,
    ranks: Option<&RankHistogram>,
) -> f64 {
    match contrast {
        Contrast::T2 | Contrast::Flair => {
            let (grid, pdf) = smooth_histogram(voi);
            let i = pdf
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            grid[i]
        }
        Contrast::T1 | Contrast::Pd => {
            let tail = if contrast == Contrast::T1 { 96.0 } else { 99.0 };
            let (threshold, n, largest) = match ranks {
                Some(r) if voi.len() >= (1 << 16) => {
                    let (v, below) = r.locate(voi, &[tail]);
                    let (n, hi) = below.unwrap_or((0, f64::NEG_INFINITY));
                    (v[0], n, hi)
                }
                _ => percentile_and_below(voi, tail, min, max),
            };
            let (grid, pdf) = smooth_histogram_known(voi, threshold, n, min, largest);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear_interpolation() {
        let mut v: Vec<f64> = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(
            percentiles(&mut v, &[0.0, 25.0, 50.0, 90.0, 100.0, 10.0]),
            vec![1.0, 2.0, 3.0, 4.6, 5.0, 1.4]
        );
        let mut w: Vec<f64> = (0..1001).map(|i| ((i * 7919) % 1001) as f64).collect();
        let p = percentiles(&mut w, &[1.0, 99.0, 50.0]);
        assert_eq!(p, vec![10.0, 990.0, 500.0]);
    }

    #[test]
    fn one_rank_histogram_answers_several_queries_exactly() {
        let mut state = 5u64;
        let v: Vec<f32> = (0..150_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) % 7_000) as f32 / 7.0 + 100.0
            })
            .collect();
        let (min, max) = min_max(&v);
        let r = RankHistogram::build(&v, min, max);
        for ps in [&[96.0][..], &[45.0, 55.0], &[0.0, 100.0, 33.3]] {
            assert_eq!(r.locate(&v, ps).0, percentiles_of(&v, ps), "{ps:?}");
        }
        let t = Contrast::T1;
        assert_eq!(
            tissue_mode_with(&v, t, min, max, Some(&r)),
            tissue_mode_in_range(&v, t, min, max)
        );
    }

    #[test]
    fn the_percentile_with_its_lower_part_matches_brute_force() {
        let mut state = 11u64;
        let v: Vec<f32> = (0..200_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) % 5_000) as f32 / 3.0
            })
            .collect();
        let (min, max) = min_max(&v);
        for p in [96.0, 99.0, 50.0, 0.0, 100.0] {
            let (t, n, largest) = percentile_and_below(&v, p, min, max);
            assert_eq!(t, percentiles_of(&v, &[p])[0]);
            let (bn, _, bmax) = count_min_max_below(&v, t);
            assert_eq!((n, largest), (bn, bmax), "p = {p}");
        }
    }

    #[test]
    fn histogram_percentiles_equal_selection_exactly() {
        let mut state = 7u64;
        let v: Vec<f32> = (0..300_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) % 100_000) as f32 / 7.0 - 3000.0
            })
            .collect();
        let ps = [0.0, 0.5, 1.0, 10.0, 33.3, 50.0, 96.0, 99.5, 100.0];
        let by_hist = percentiles_of(&v, &ps);
        let by_select = percentiles_by_selection(&mut v.clone(), &ps);
        assert_eq!(by_hist, by_select);
    }

    #[test]
    fn otsu_separates_two_classes() {
        let v: Vec<f64> = (0..1000)
            .map(|i| {
                if i % 2 == 0 {
                    10.0 + (i % 7) as f64
                } else {
                    100.0 + (i % 5) as f64
                }
            })
            .collect();
        let t = otsu(&v);
        assert!(v.iter().all(|x| (*x < 50.0) == (*x < t)), "{t}");
    }
}
