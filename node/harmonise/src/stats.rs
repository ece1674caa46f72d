//! Statistics of value slices the harmonisation methods share: linear-time percentiles (numpy's
//! linear interpolation), moments, Otsu's threshold, and the density step of the tissue-mode
//! finder of `intensity-normalization` 2.2.4 (statsmodels' FFT Gaussian KDE with an absolute
//! bandwidth of max/80 on a 128-point grid). Generic over `f32` voxels and `f64` values; sums
//! in `f64`. Statistics of a whole volume's foreground are in [`super::scan`].

use rayon::prelude::*;

/// A voxel value type.
pub trait Sample: Copy + Into<f64> + PartialOrd + Send + Sync {}
impl Sample for f32 {}
impl Sample for f64 {}

fn cmp<T: PartialOrd>(a: &T, b: &T) -> std::cmp::Ordering {
    a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal)
}

/// Chunk size for parallel passes: a few chunks per thread.
fn chunk_len(n: usize) -> usize {
    (n / (4 * rayon::current_num_threads().max(1))).max(1 << 16)
}

/// Percentiles (0–100) of `values`, numpy's default linear interpolation, by successive
/// selection in linear time (no full sort). `values` is reordered.
pub fn percentiles<T: Sample>(values: &mut [T], ps: &[f64]) -> Vec<f64> {
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

/// Percentiles of values that must not be reordered (selection on a copy).
pub fn percentiles_of<T: Sample>(values: &[T], ps: &[f64]) -> Vec<f64> {
    percentiles(&mut values.to_vec(), ps)
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

/// The density of statsmodels' FFT Gaussian KDE from linearly binned counts of `n` values
/// on the grid of `binned.len()` points from `a` to `b`, bandwidth `bw`: the grid and the
/// density (scaled by 100, as the reference does).
pub fn kde_density(binned: &[f64], n: usize, a: f64, b: f64, bw: f64) -> (Vec<f64>, Vec<f64>) {
    let m = binned.len();
    let range = b - a;
    let delta = range / (m - 1) as f64;
    let binned: Vec<f64> = binned.iter().map(|x| x / (delta * n as f64)).collect();
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

pub(crate) fn local_maxima(pdf: &[f64]) -> Vec<usize> {
    (1..pdf.len().saturating_sub(1))
        .filter(|&i| pdf[i] > pdf[i - 1] && pdf[i] > pdf[i + 1])
        .collect()
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
