//! Intensity harmonisation and discretisation: pure functions of a volume, a foreground mask
//! and a (possibly fitted) model. Methods that learn something from a set of volumes produce
//! mergeable summaries (`protocol::summary`) whose merge equals fitting on the pooled data.
//!
//! Reference semantics: `intensity-normalization` 2.2.4 for z-score, KDE, FCM, WhiteStripe,
//! Nyúl and LSQ; IBSI for μ±3σ re-segmentation and discretisation; pyradiomics for its
//! normalisation and `binWidth`; DICOM PS3.3 C.11.2.1.2 for windowing; nnU-Net for CT.

pub mod scan;
pub mod stats;

use ndarray::ShapeBuilder;
use protocol::summary::{CT_HU_BINS, CT_HU_MIN, CtSummary, NYUL_LANDMARKS, NyulSummary, to_fixed};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use self::scan::{Extent, Region};
use self::stats::{Contrast, mean_std, otsu, percentile};
use fc_volume::{StoredType, Volume};

/// Version of the serialised model format.
pub const MODEL_VERSION: u32 = 1;

/// Nyúl–Udupa landmark percentiles.
pub const NYUL_PERCENTILES: [f64; NYUL_LANDMARKS] = [
    1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0,
];

/// How the foreground (the voxels statistics are taken over) is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Foreground {
    /// Otsu's threshold over the whole volume (the default).
    Otsu,
    /// `intensity-normalization` 2.2.4's convention: voxels above 1e-6.
    Positive,
    /// A supplied mask (label map > 0), one entry per voxel in memory order.
    Mask(Vec<bool>),
    /// CT padding: voxels at or below the Pixel Padding Value (or Range Limit), e.g. −2000 or
    /// −3024 HU outside the reconstruction circle, are excluded.
    AbovePadding(f64),
}

/// VOI windowing functions (PS3.3 C.11.2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// Discretisation modes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Discretisation {
    /// IBSI fixed bin number: ⌊Ng·(x − min)/(max − min)⌋ + 1, max → Ng.
    FixedBinNumber { bins: u32 },
    /// IBSI fixed bin size: ⌊(x − lower)/w⌋ + 1, with `lower` the re-segmentation lower bound
    /// (the ROI minimum when absent).
    FixedBinSize { width: f64, lower: Option<f64> },
    /// pyradiomics `binWidth`: ⌊x/W⌋ − ⌊min/W⌋ + 1 (edges aligned to 0; not IBSI).
    PyradiomicsBinWidth { width: f64 },
}

/// A method and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum Method {
    MinMax,
    Percentile {
        low: f64,
        high: f64,
    },
    /// IBSI outlier filtering: voxels outside μ ± nσ of the ROI leave the mask.
    MuSigmaIbsi {
        n: f64,
    },
    /// pyradiomics: whole-image z-score, clipped to ±n.
    MuSigmaPyradiomics {
        n: f64,
    },
    ZScore,
    Kde {
        contrast: Contrast,
    },
    WhiteStripe {
        contrast: Contrast,
        width: f64,
    },
    Fcm,
    Nyul,
    Lsq,
    CtWindow {
        center: f64,
        width: f64,
        function: WindowFunction,
    },
    CtNnunet,
    Discretise(Discretisation),
}

/// What a population method learnt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Fitted {
    /// Per-volume methods learn nothing across volumes.
    None,
    Nyul {
        summary: NyulSummary,
    },
    Ct {
        summary: CtSummary,
    },
    /// LSQ: the standard tissue means (CSF, GM, WM) of the reference volume.
    Lsq {
        standard_means: [f64; 3],
    },
}

/// A harmonisation model: method, parameters and fitted state; saved and reloaded as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub version: u32,
    pub method: Method,
    pub fitted: Fitted,
}

/// Harmonisation problems (content, not I/O).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HarmoniseError {
    #[error("the foreground is empty: supply a mask, or use another foreground rule")]
    EmptyForeground,
    #[error("method {0} needs a fitted model; fit it first (or merge site summaries)")]
    NotFitted(&'static str),
    #[error("model format version {0} is not supported (this build reads {MODEL_VERSION})")]
    Version(u32),
    #[error("the mask has {mask} entries for {voxels} voxels")]
    MaskSize { mask: usize, voxels: usize },
    #[error("the tissue mode or scale is zero: the volume cannot be normalised by this method")]
    Degenerate,
}

/// The result: a float32 volume with the input's geometry, and for IBSI re-segmentation the
/// new ROI.
#[derive(Debug)]
pub struct Harmonised {
    pub volume: Volume,
    pub roi: Option<Vec<bool>>,
}

/// The voxels in memory order, without copying when the volume is contiguous.
fn values(v: &Volume) -> std::borrow::Cow<'_, [f32]> {
    match v.data.as_slice_memory_order() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(v.data.iter().copied().collect()),
    }
}

/// A float32 volume with `v`'s geometry and layout, the voxels `x` (of `v`, in memory order)
/// through `f`.
fn mapped(v: &Volume, x: &[f32], f: impl Fn(f64) -> f64 + Sync) -> Volume {
    like(v, x.par_iter().map(|a| f(f64::from(*a)) as f32).collect())
}

/// A float32 volume with `v`'s geometry and layout, from per-voxel values in memory order.
fn like(v: &Volume, out: Vec<f32>) -> Volume {
    let shape = v.data.raw_dim();
    let fortran = !v.data.is_standard_layout() && v.data.t().is_standard_layout();
    let data = if fortran {
        ndarray::Array4::from_shape_vec(shape.f(), out)
    } else {
        ndarray::Array4::from_shape_vec(shape, out)
    }
    .unwrap_or_else(|_| v.data.clone());
    Volume {
        data,
        affine: v.affine,
        stored: StoredType::F32,
    }
}

/// The foreground mask (memory order).
pub fn foreground(v: &[f32], rule: &Foreground) -> Result<Vec<bool>, HarmoniseError> {
    let mask = match rule {
        Foreground::Otsu => {
            let t = otsu(v);
            v.par_iter().map(|x| f64::from(*x) > t).collect()
        }
        Foreground::Positive => v.par_iter().map(|x| f64::from(*x) > 1e-6).collect(),
        Foreground::AbovePadding(p) => v.par_iter().map(|x| f64::from(*x) > *p).collect(),
        Foreground::Mask(m) => {
            if m.len() != v.len() {
                return Err(HarmoniseError::MaskSize {
                    mask: m.len(),
                    voxels: v.len(),
                });
            }
            m.clone()
        }
    };
    if !mask.iter().any(|b| *b) {
        return Err(HarmoniseError::EmptyForeground);
    }
    Ok(mask)
}

fn voi(v: &[f32], mask: &[bool]) -> Vec<f32> {
    v.par_iter()
        .zip(mask.par_iter())
        .filter(|(_, m)| **m)
        .map(|(x, _)| *x)
        .collect()
}

/// A rule's foreground over the voxels: a threshold on the volume itself (nothing copied), or
/// a supplied mask's values gathered.
enum Held<'a> {
    Above(&'a [f32], f64),
    Gathered(Vec<f32>),
}

impl Held<'_> {
    fn region(&self) -> Region<'_> {
        match self {
            Held::Above(x, t) => Region::above(x, *t),
            Held::Gathered(g) => Region::all(g),
        }
    }

    /// Exact percentiles of the foreground, with its count and range.
    fn percentiles(&self, ps: &[f64]) -> Result<(Extent, Vec<f64>), HarmoniseError> {
        self.region()
            .percentiles(ps)
            .map(|(e, l)| (e, l.values))
            .ok_or(HarmoniseError::EmptyForeground)
    }
}

fn held<'a>(x: &'a [f32], rule: &Foreground) -> Result<Held<'a>, HarmoniseError> {
    Ok(match rule {
        Foreground::Mask(m) => {
            if m.len() != x.len() {
                return Err(HarmoniseError::MaskSize {
                    mask: m.len(),
                    voxels: x.len(),
                });
            }
            Held::Gathered(voi(x, m))
        }
        Foreground::Otsu => Held::Above(x, otsu(x)),
        Foreground::Positive => Held::Above(x, 1e-6),
        Foreground::AbovePadding(p) => Held::Above(x, *p),
    })
}

/// Mean and population standard deviation of the foreground, straight from the rule (one
/// read pass for the mean, one for the spread; nothing is copied).
fn foreground_mean_std(v: &[f32], rule: &Foreground) -> Result<(f64, f64), HarmoniseError> {
    let threshold = match held(v, rule)? {
        Held::Gathered(g) if g.is_empty() => return Err(HarmoniseError::EmptyForeground),
        Held::Gathered(g) => return Ok(mean_std(&g)),
        Held::Above(_, t) => t,
    };
    let chunk = (v.len() / (4 * rayon::current_num_threads().max(1))).max(1 << 16);
    let (n, sum) = v
        .par_chunks(chunk)
        .map(|c| {
            c.iter()
                .map(|x| f64::from(*x))
                .filter(|f| *f > threshold)
                .fold((0usize, 0.0), |(n, s), f| (n + 1, s + f))
        })
        .reduce(|| (0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    if n == 0 {
        return Err(HarmoniseError::EmptyForeground);
    }
    let mean = sum / n as f64;
    let squares: f64 = v
        .par_chunks(chunk)
        .map(|c| {
            c.iter()
                .map(|x| f64::from(*x))
                .filter(|f| *f > threshold)
                .map(|f| (f - mean) * (f - mean))
                .sum::<f64>()
        })
        .sum();
    Ok((mean, (squares / n as f64).sqrt()))
}

/// Fuzzy c-means on foreground intensities (c = 3, m = 2, error 0.005, 50 iterations, as
/// `skfuzzy.cmeans` in the reference), initialised at the 20th/50th/80th percentiles.
/// Memberships depend on intensity only, so the iterations run over a fine histogram (65,536
/// bins, each at the mean of its voxels) weighted by counts: exact up to the bin width, and
/// independent of the number of voxels. Returns centres ascending (CSF, GM, WM) and the
/// membership-weighted tissue means.
pub fn fcm<T: stats::Sample>(voi: &[T]) -> ([f64; 3], [f64; 3]) {
    let (lo, hi) = stats::min_max(voi);
    const BINS: usize = 65_536;
    let width = if hi > lo {
        (hi - lo) / BINS as f64
    } else {
        1.0
    };
    let mut count = vec![0.0f64; BINS];
    let mut sum = vec![0.0f64; BINS];
    for x in voi {
        let x: f64 = (*x).into();
        let b = (((x - lo) / width) as usize).min(BINS - 1);
        count[b] += 1.0;
        sum[b] += x;
    }
    let points: Vec<(f64, f64)> = count
        .iter()
        .zip(&sum)
        .filter(|(c, _)| **c > 0.0)
        .map(|(c, s)| (s / c, *c))
        .collect();
    let init = stats::percentiles_of(voi, &[20.0, 50.0, 80.0]);
    let mut c = [init[0], init[1], init[2]];
    let memberships = |c: &[f64; 3], x: f64| -> [f64; 3] {
        let d = [
            (x - c[0]).abs().max(1e-12),
            (x - c[1]).abs().max(1e-12),
            (x - c[2]).abs().max(1e-12),
        ];
        let mut u = [0.0; 3];
        for i in 0..3 {
            u[i] = 1.0 / ((d[i] / d[0]).powi(2) + (d[i] / d[1]).powi(2) + (d[i] / d[2]).powi(2));
        }
        u
    };
    for _ in 0..50 {
        let mut num = [0.0; 3];
        let mut den = [0.0; 3];
        for &(x, n) in &points {
            let u = memberships(&c, x);
            for i in 0..3 {
                let w = u[i] * u[i] * n;
                num[i] += w * x;
                den[i] += w;
            }
        }
        let next = [num[0] / den[0], num[1] / den[1], num[2] / den[2]];
        let change = (0..3).map(|i| (next[i] - c[i]).abs()).fold(0.0, f64::max);
        c = next;
        if change < 0.005 {
            break;
        }
    }
    c.sort_by(f64::total_cmp);
    let mut wsum = [0.0; 3];
    let mut wx = [0.0; 3];
    for &(x, n) in &points {
        let u = memberships(&c, x);
        for i in 0..3 {
            wsum[i] += u[i] * n;
            wx[i] += u[i] * n * x;
        }
    }
    (c, [wx[0] / wsum[0], wx[1] / wsum[1], wx[2] / wsum[2]])
}

/// Nyúl landmarks of one volume's foreground, raw and mapped (its P1 → 1, P99 → 100).
fn nyul_landmarks(
    held: &Held,
) -> Result<([f64; NYUL_LANDMARKS], [f64; NYUL_LANDMARKS]), HarmoniseError> {
    let (_, l) = held.percentiles(&NYUL_PERCENTILES)?;
    let (lo, hi) = (l[0], l[NYUL_LANDMARKS - 1]);
    // A constant foreground (hi = lo), infinite voxels, or landmarks that are not increasing
    // have no standard scale to map to: refused, never merged as NaN or a silent rescale.
    if !(lo.is_finite() && hi.is_finite() && hi > lo) || l.windows(2).any(|w| w[1] < w[0]) {
        return Err(HarmoniseError::Degenerate);
    }
    let mut raw = [0.0; NYUL_LANDMARKS];
    let mut mapped = [0.0; NYUL_LANDMARKS];
    for i in 0..NYUL_LANDMARKS {
        raw[i] = l[i];
        mapped[i] = 1.0 + (l[i] - lo) * (100.0 - 1.0) / (hi - lo);
    }
    Ok((raw, mapped))
}

/// Nyúl summary of one volume.
pub fn fit_nyul(v: &Volume, rule: &Foreground) -> Result<NyulSummary, HarmoniseError> {
    let x = values(v);
    let held = held(&x, rule)?;
    let (_, mapped) = nyul_landmarks(&held)?;
    let mut s = NyulSummary {
        volumes: 1,
        ..NyulSummary::default()
    };
    for (o, m) in s.landmark_sums.iter_mut().zip(mapped) {
        *o = to_fixed(m);
    }
    Ok(s)
}

/// CT summary of one volume's foreground (HU).
pub fn fit_ct(v: &Volume, rule: &Foreground) -> Result<CtSummary, HarmoniseError> {
    let x = values(v);
    let mask = foreground(&x, rule)?;
    let mut s = CtSummary::default();
    for hu in voi(&x, &mask) {
        let hu = f64::from(hu);
        s.count += 1;
        s.sum += to_fixed(hu);
        s.sum_squares += to_fixed(hu * hu / 1000.0);
        let bin =
            (hu.round() as i64 - i64::from(CT_HU_MIN)).clamp(0, CT_HU_BINS as i64 - 1) as usize;
        s.histogram[bin] += 1;
    }
    Ok(s)
}

/// Piecewise-linear interpolation through (xs, ys), extrapolating with the end segments.
fn interp_extrapolate(x: f64, xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len();
    let seg = if x <= xs[0] {
        0
    } else if x >= xs[n - 1] {
        n - 2
    } else {
        xs.partition_point(|v| *v <= x).saturating_sub(1).min(n - 2)
    };
    let (x0, x1, y0, y1) = (xs[seg], xs[seg + 1], ys[seg], ys[seg + 1]);
    if x1 == x0 {
        y0
    } else {
        y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    }
}

/// Where a method's per-voxel map writes: a new volume beside the input, or the input's own
/// buffer (no allocation, so no page faults on a fresh 64 MB output).
trait Target {
    /// The voxels, in memory order.
    fn values(&self) -> &[f32];
    /// Every voxel through `f`.
    fn map<F: Fn(f64) -> f64 + Sync>(self, f: F) -> Volume;
    /// Voxels inside `mask` through `f`, the others to zero.
    fn map_inside<F: Fn(f64) -> f64 + Sync>(self, mask: &[bool], f: F) -> Volume;
    /// The voxels unchanged, as float32.
    fn keep(self) -> Volume;
}

struct Fresh<'a> {
    v: &'a Volume,
    x: std::borrow::Cow<'a, [f32]>,
}

impl Target for Fresh<'_> {
    fn values(&self) -> &[f32] {
        &self.x
    }
    fn map<F: Fn(f64) -> f64 + Sync>(self, f: F) -> Volume {
        mapped(self.v, &self.x, f)
    }
    fn map_inside<F: Fn(f64) -> f64 + Sync>(self, mask: &[bool], f: F) -> Volume {
        let out: Vec<f32> = self
            .x
            .par_iter()
            .zip(mask.par_iter())
            .map(|(a, inside)| {
                if *inside {
                    f(f64::from(*a)) as f32
                } else {
                    0.0
                }
            })
            .collect();
        like(self.v, out)
    }
    fn keep(self) -> Volume {
        like(self.v, self.x.into_owned())
    }
}

/// The input volume, rewritten in place (made contiguous first if it is a view).
struct InPlace(Volume);

impl InPlace {
    fn new(mut v: Volume) -> Self {
        if v.data.as_slice_memory_order().is_none() {
            v.data = v.data.as_standard_layout().into_owned();
        }
        InPlace(v)
    }
}

impl InPlace {
    /// The voxels in memory order (contiguous by construction, so never empty in fact).
    fn buffer(&mut self) -> &mut [f32] {
        self.0.data.as_slice_memory_order_mut().unwrap_or(&mut [])
    }
}

impl Target for InPlace {
    fn values(&self) -> &[f32] {
        self.0.data.as_slice_memory_order().unwrap_or(&[])
    }
    fn map<F: Fn(f64) -> f64 + Sync>(mut self, f: F) -> Volume {
        self.buffer().par_chunks_mut(1 << 16).for_each(|c| {
            for a in c {
                *a = f(f64::from(*a)) as f32;
            }
        });
        self.keep()
    }
    fn map_inside<F: Fn(f64) -> f64 + Sync>(mut self, mask: &[bool], f: F) -> Volume {
        self.buffer()
            .par_iter_mut()
            .zip(mask.par_iter())
            .for_each(|(a, inside)| {
                *a = if *inside {
                    f(f64::from(*a)) as f32
                } else {
                    0.0
                };
            });
        self.keep()
    }
    fn keep(mut self) -> Volume {
        self.0.stored = StoredType::F32;
        self.0
    }
}

/// Apply a model to a volume, writing a new volume.
pub fn apply(model: &Model, v: &Volume, rule: &Foreground) -> Result<Harmonised, HarmoniseError> {
    apply_to(model, Fresh { v, x: values(v) }, rule)
}

/// Apply a model to a volume the caller no longer needs, rewriting its voxels in place (the
/// same result as [`apply`], without allocating the output).
pub fn apply_owned(
    model: &Model,
    v: Volume,
    rule: &Foreground,
) -> Result<Harmonised, HarmoniseError> {
    apply_to(model, InPlace::new(v), rule)
}

fn apply_to<T: Target>(
    model: &Model,
    out: T,
    rule: &Foreground,
) -> Result<Harmonised, HarmoniseError> {
    if model.version != MODEL_VERSION {
        return Err(HarmoniseError::Version(model.version));
    }
    let x: &[f32] = out.values();
    // Generic, not `dyn`: the per-voxel function is inlined and vectorised.
    fn finish<T: Target, F: Fn(f64) -> f64 + Sync>(
        out: T,
        f: F,
    ) -> Result<Harmonised, HarmoniseError> {
        Ok(Harmonised {
            volume: out.map(f),
            roi: None,
        })
    }
    let mask = || foreground(x, rule);
    match &model.method {
        Method::MinMax => {
            let held = held(x, rule)?;
            let (_, lo, hi) = held
                .region()
                .extent()
                .ok_or(HarmoniseError::EmptyForeground)?;
            let (lo, hi) = (f64::from(lo), f64::from(hi));
            if hi <= lo {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| (v - lo) / (hi - lo))
        }
        Method::Percentile { low, high } => {
            let held = held(x, rule)?;
            let (_, p) = held.percentiles(&[*low, *high])?;
            if p[1] <= p[0] {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| (v.clamp(p[0], p[1]) - p[0]) / (p[1] - p[0]))
        }
        Method::MuSigmaIbsi { n } => {
            let m = mask()?;
            let (mu, sd) = mean_std(&voi(x, &m));
            let roi = x
                .par_iter()
                .zip(m.par_iter())
                .map(|(v, inside)| *inside && (f64::from(*v) - mu).abs() <= n * sd)
                .collect();
            Ok(Harmonised {
                volume: out.keep(),
                roi: Some(roi),
            })
        }
        Method::MuSigmaPyradiomics { n } => {
            let (mu, sd) = mean_std(x);
            if sd == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| ((v - mu) / sd).clamp(-n, *n))
        }
        Method::ZScore => {
            let (mu, sd) = foreground_mean_std(x, rule)?;
            if sd == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| (v - mu) / sd)
        }
        Method::Kde { contrast } => {
            let held = held(x, rule)?;
            let (extent, mode) = held
                .region()
                .tissue_mode(*contrast)
                .ok_or(HarmoniseError::EmptyForeground)?;
            // A constant foreground has no density to smooth (the reference raises): refused
            // like the other degenerate inputs.
            if mode == 0.0 || extent.max <= extent.min {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| v / mode)
        }
        Method::WhiteStripe { contrast, width } => {
            let held = held(x, rule)?;
            let region = held.region();
            // One census serves the tissue mode's percentile and the stripe's.
            let census = region.census().ok_or(HarmoniseError::EmptyForeground)?;
            let mode = region.tissue_mode_with(&census, *contrast);
            let q = region.count_below(mode) as f64 / census.n as f64;
            let (lo, hi) = ((q - width).max(0.0), (q + width).min(1.0));
            let b = region.locate(&census, &[lo * 100.0, hi * 100.0]).values;
            // The reference's stripe: (image · mask) strictly inside (ws_l, ws_u); voxels
            // outside the mask count as zeros when zero lies inside.
            let (mut n, sum, squares) = region.moments_between(b[0], b[1]);
            if b[0] < 0.0 && 0.0 < b[1] {
                n += x.len() - census.n;
            }
            if n == 0 {
                return Err(HarmoniseError::Degenerate);
            }
            let mu = sum / n as f64;
            let sd = (squares / n as f64 - mu * mu).max(0.0).sqrt();
            if sd == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| (v - mu) / sd)
        }
        Method::Fcm => {
            let (_, means) = fcm(&voi(x, &mask()?));
            if means[2] == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| v / means[2])
        }
        Method::Nyul => {
            let Fitted::Nyul { summary } = &model.fitted else {
                return Err(HarmoniseError::NotFitted("nyul"));
            };
            let scale = summary
                .standard_scale()
                .ok_or(HarmoniseError::NotFitted("nyul"))?;
            let held = held(x, rule)?;
            let (raw, _) = nyul_landmarks(&held)?;
            finish(out, |v| interp_extrapolate(v, &raw, &scale))
        }
        Method::Lsq => {
            let Fitted::Lsq { standard_means } = &model.fitted else {
                return Err(HarmoniseError::NotFitted("lsq"));
            };
            let (_, m) = fcm(&voi(x, &mask()?));
            let mtm: f64 = m.iter().map(|a| a * a).sum();
            let mts: f64 = m.iter().zip(standard_means).map(|(a, b)| a * b).sum();
            if mts == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            let sf = mtm / mts;
            finish(out, |v| v / sf)
        }
        Method::CtWindow {
            center,
            width,
            function,
        } => finish(out, |v| window(v, *center, *width, *function, 0.0, 1.0)),
        Method::CtNnunet => {
            let Fitted::Ct { summary } = &model.fitted else {
                return Err(HarmoniseError::NotFitted("ct-nnunet"));
            };
            let (Some(mean), Some(sd), Some(p05), Some(p995)) = (
                summary.mean(),
                summary.std(),
                summary.percentile(0.5),
                summary.percentile(99.5),
            ) else {
                return Err(HarmoniseError::NotFitted("ct-nnunet"));
            };
            if sd == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            finish(out, |v| (v.clamp(p05, p995) - mean) / sd)
        }
        Method::Discretise(d) => {
            let m = mask()?;
            let (lo, hi) = stats::min_max(&voi(x, &m));
            let d = *d;
            let bin = move |v: f64| -> f64 {
                match d {
                    Discretisation::FixedBinNumber { bins } => {
                        let ng = f64::from(bins);
                        if v < hi && hi > lo {
                            ((ng * (v - lo) / (hi - lo)).floor() + 1.0).min(ng)
                        } else {
                            ng
                        }
                    }
                    Discretisation::FixedBinSize { width, lower } => {
                        ((v - lower.unwrap_or(lo)) / width).floor() + 1.0
                    }
                    Discretisation::PyradiomicsBinWidth { width } => {
                        (v / width).floor() - (lo / width).floor() + 1.0
                    }
                }
            };
            Ok(Harmonised {
                volume: out.map_inside(&m, bin),
                roi: None,
            })
        }
    }
}

/// DICOM VOI windowing of one value into [y_min, y_max].
pub fn window(x: f64, c: f64, w: f64, f: WindowFunction, y_min: f64, y_max: f64) -> f64 {
    match f {
        WindowFunction::Linear | WindowFunction::LinearExact => {
            let (c, w) = if f == WindowFunction::Linear {
                (c - 0.5, (w - 1.0).max(f64::MIN_POSITIVE))
            } else {
                (c, w)
            };
            if x <= c - w / 2.0 {
                y_min
            } else if x > c + w / 2.0 {
                y_max
            } else {
                ((x - c) / w + 0.5) * (y_max - y_min) + y_min
            }
        }
        WindowFunction::Sigmoid => (y_max - y_min) / (1.0 + (-4.0 * (x - c) / w).exp()) + y_min,
    }
}

/// Fit a model over volumes (all of one site, or pooled).
pub fn fit(
    method: &Method,
    volumes: &[Volume],
    rule: &Foreground,
) -> Result<Model, HarmoniseError> {
    let fitted = match method {
        Method::Nyul => {
            let mut s = NyulSummary::default();
            for v in volumes {
                s.merge(&fit_nyul(v, rule)?);
            }
            Fitted::Nyul { summary: s }
        }
        Method::CtNnunet => {
            let mut s = CtSummary::default();
            for v in volumes {
                s.merge(&fit_ct(v, rule)?);
            }
            Fitted::Ct { summary: s }
        }
        Method::Lsq => {
            let first = volumes.first().ok_or(HarmoniseError::NotFitted("lsq"))?;
            let x = values(first);
            let roi = voi(&x, &foreground(&x, rule)?);
            let (_, means) = fcm(&roi);
            if means[0] == 0.0 {
                return Err(HarmoniseError::Degenerate);
            }
            Fitted::Lsq {
                standard_means: [1.0, means[1] / means[0], means[2] / means[0]],
            }
        }
        _ => Fitted::None,
    };
    Ok(Model {
        version: MODEL_VERSION,
        method: method.clone(),
        fitted,
    })
}

/// Merge the fitted state of site models of the same method (summaries add).
pub fn merge(models: &[Model]) -> Option<Model> {
    let first = models.first()?.clone();
    let mut out = first;
    for m in &models[1..] {
        if m.method != out.method {
            return None;
        }
        match (&mut out.fitted, &m.fitted) {
            (Fitted::Nyul { summary: a }, Fitted::Nyul { summary: b }) => a.merge(b),
            (Fitted::Ct { summary: a }, Fitted::Ct { summary: b }) => a.merge(b),
            (Fitted::None, Fitted::None) => {}
            _ => return None,
        }
    }
    Some(out)
}

/// One value's percentile helper for callers.
pub fn value_percentile(values: &mut [f64], p: f64) -> f64 {
    percentile(values, p)
}
