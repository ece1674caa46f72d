//! Image quality metrics of a volume, with a documented foreground mask.
//!
//! Definitions follow MRIQC (`mriqc/qc/anatomical.py`) where MRQy's differ, and are computed
//! over the whole volume rather than averaged per slice:
//! - **foreground**: voxels above Otsu's threshold of the volume; **air**: the rest.
//! - `snr` = μ_F / (σ_F · √(n/(n−1))) over the foreground (MRIQC).
//! - `snr_dietrich` = 0.6551364 · μ_F / MAD_air (σ_air when MAD ≤ 1; −1 when σ_air < 1e-3).
//! - Tissue classes for `cnr` and `cjv` come from 3-class fuzzy c-means on the foreground
//!   (hard assignment to the nearest centre: low, middle, high ≈ CSF, GM, WM on T1):
//!   `cnr` = |μ_WM − μ_GM| / √(σ_air² + σ_WM² + σ_GM²), `cjv` = (σ_WM + σ_GM) / |μ_WM − μ_GM|.
//! - `efc` = (1/E_max) Σ (x/B_max) ln((x + 1e-16)/B_max), B_max = √Σx², E_max = N (1/√N) ln(1/√N)
//!   (MRIQC's +1e-16, not MRQy's +1e16).
//! - `fber` = median(|x_F|²) / median(|x_air|²); −1 when the air energy is below 1e-3.
//! - CT: `air_hu_mean` and `air_noise_hu` over voxels in (−1024, −900] HU (padding excluded).

use serde::Serialize;

use fc_harmonise::fcm;
use fc_harmonise::stats::{mean_std, otsu, percentile};
use fc_volume::Volume;

/// Rayleigh correction of MRIQC's Dietrich SNR.
pub const DIETRICH_FACTOR: f64 = 0.6551364;

/// The metrics of one volume.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QualityReport {
    pub voxels: usize,
    pub foreground_fraction: f64,
    pub mean: f64,
    pub range: f64,
    pub variance: f64,
    /// Coefficient of variation of the foreground, in percent.
    pub cv: f64,
    pub snr: f64,
    pub snr_dietrich: f64,
    pub cnr: f64,
    pub cjv: f64,
    pub efc: f64,
    pub fber: f64,
    /// CT only: mean and standard deviation of air voxels, in HU.
    pub air_hu_mean: Option<f64>,
    pub air_noise_hu: Option<f64>,
    /// Quality flags: `blank` (no variation), `saturated` (over 5 % of voxels at the maximum),
    /// `truncated` (over 20 % of the in-plane border is foreground), `unexpected-fov` (in-plane
    /// field of view outside 50–700 mm).
    pub flags: Vec<&'static str>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    percentile(&mut v, 50.0)
}

/// Compute the metrics; `ct` selects the CT air measures.
pub fn measure(volume: &Volume, ct: bool) -> QualityReport {
    let x: Vec<f64> = volume.data.iter().map(|v| f64::from(*v)).collect();
    let n = x.len();
    let mut r = QualityReport {
        voxels: n,
        ..QualityReport::default()
    };
    if n == 0 {
        r.flags.push("blank");
        return r;
    }
    let (all_mean, all_sd) = mean_std(&x);
    if all_sd < 1e-6 * all_mean.abs().max(1.0) {
        r.flags.push("blank");
        r.mean = all_mean;
        return r;
    }
    let threshold = otsu(&x);
    let fg: Vec<f64> = x.iter().copied().filter(|v| *v > threshold).collect();
    let air: Vec<f64> = x.iter().copied().filter(|v| *v <= threshold).collect();
    r.foreground_fraction = fg.len() as f64 / n as f64;
    let (mu_f, sd_f) = mean_std(&fg);
    let (min_f, max_f) = fg
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    r.mean = mu_f;
    r.range = max_f - min_f;
    r.variance = sd_f * sd_f;
    r.cv = if mu_f != 0.0 {
        100.0 * sd_f / mu_f
    } else {
        0.0
    };
    let nf = fg.len() as f64;
    r.snr = if nf > 1.0 && sd_f > 0.0 {
        mu_f / (sd_f * (nf / (nf - 1.0)).sqrt())
    } else {
        0.0
    };
    let (mu_air, sd_air) = mean_std(&air);
    let air_median = median(air.clone());
    let mad_air = median(air.iter().map(|v| (v - air_median).abs()).collect());
    r.snr_dietrich = if sd_air < 1e-3 {
        -1.0
    } else if mad_air > 1.0 {
        DIETRICH_FACTOR * mu_f / mad_air
    } else {
        DIETRICH_FACTOR * mu_f / sd_air
    };
    let _ = mu_air;
    // Tissue classes by 3-class FCM on the foreground, hard-assigned to the nearest centre.
    let (centres, _) = fcm(&fg);
    let mut classes: [Vec<f64>; 3] = Default::default();
    for v in &fg {
        let k = (0..3)
            .min_by(|a, b| (v - centres[*a]).abs().total_cmp(&(v - centres[*b]).abs()))
            .unwrap_or(0);
        classes[k].push(*v);
    }
    let (mu_gm, sd_gm) = mean_std(&classes[1]);
    let (mu_wm, sd_wm) = mean_std(&classes[2]);
    let contrast = (mu_wm - mu_gm).abs();
    r.cnr = if contrast > 0.0 {
        contrast / (sd_air * sd_air + sd_wm * sd_wm + sd_gm * sd_gm).sqrt()
    } else {
        0.0
    };
    r.cjv = if contrast > 0.0 {
        (sd_wm + sd_gm) / contrast
    } else {
        f64::INFINITY
    };
    let b_max = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let nn = n as f64;
    let e_max = nn * (1.0 / nn.sqrt()) * (1.0 / nn.sqrt()).ln();
    let e: f64 = x
        .iter()
        .map(|v| {
            let v = v.max(0.0);
            (v / b_max) * ((v + 1e-16) / b_max).ln()
        })
        .sum();
    r.efc = if e_max != 0.0 { e / e_max } else { 0.0 };
    let air_energy = median(air.iter().map(|v| v * v).collect());
    r.fber = if air_energy < 1e-3 {
        -1.0
    } else {
        median(fg.iter().map(|v| v * v).collect()) / air_energy
    };
    if ct {
        let air_hu: Vec<f64> = x
            .iter()
            .copied()
            .filter(|v| *v > -1024.0 && *v <= -900.0)
            .collect();
        if !air_hu.is_empty() {
            let (m, s) = mean_std(&air_hu);
            r.air_hu_mean = Some(m);
            r.air_noise_hu = Some(s);
        }
    }
    // Flags.
    let (_, max_all) = x
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    let at_max = x.iter().filter(|v| **v == max_all).count();
    if at_max as f64 > 0.05 * n as f64 {
        r.flags.push("saturated");
    }
    let (ni, nj, nk) = volume.shape();
    let mut border_fg = 0usize;
    let mut border = 0usize;
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                if i == 0 || j == 0 || i + 1 == ni || j + 1 == nj {
                    border += 1;
                    if f64::from(volume.data[[i, j, k, 0]]) > threshold {
                        border_fg += 1;
                    }
                }
            }
        }
    }
    if border > 0 && border_fg as f64 > 0.2 * border as f64 {
        r.flags.push("truncated");
    }
    let s = volume.spacing();
    let fov = [ni as f64 * s[0], nj as f64 * s[1]];
    if fov.iter().any(|f| !(50.0..=700.0).contains(f)) {
        r.flags.push("unexpected-fov");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use fc_volume::{StoredType, diagonal};
    use ndarray::Array4;

    fn cube(n: usize, spacing: f64, f: impl Fn(usize, usize, usize) -> f32) -> Volume {
        let mut data = Array4::<f32>::zeros((n, n, n, 1));
        for ((i, j, k, _), v) in data.indexed_iter_mut() {
            *v = f(i, j, k);
        }
        Volume {
            data,
            affine: diagonal([spacing, spacing, spacing]),
            stored: StoredType::F32,
        }
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        // Air 0..2 alternating, a centred block at 100 (half the foreground) and 200.
        let v = cube(20, 10.0, |i, j, k| {
            let inside = (5..15).contains(&i) && (5..15).contains(&j) && (5..15).contains(&k);
            if inside {
                if i < 10 {
                    100.0
                } else {
                    200.0 + ((i + j + k) % 2) as f32 * 10.0
                }
            } else {
                ((i + j + k) % 3) as f32
            }
        });
        let q = measure(&v, false);
        assert!(q.flags.is_empty(), "{:?}", q.flags);
        assert!((q.foreground_fraction - 1000.0 / 8000.0).abs() < 1e-12);
        // Foreground: 500 at 100, 250 at 200, 250 at 210 → mean 152.5.
        assert!((q.mean - 152.5).abs() < 1e-9);
        assert_eq!(q.range, 110.0);
        let var =
            (500.0 * 52.5f64.powi(2) + 250.0 * 47.5f64.powi(2) + 250.0 * 57.5f64.powi(2)) / 1000.0;
        assert!((q.variance - var).abs() < 1e-6);
        assert!((q.cv - 100.0 * var.sqrt() / 152.5).abs() < 1e-9);
        assert!((q.snr - 152.5 / (var.sqrt() * (1000.0f64 / 999.0).sqrt())).abs() < 1e-9);
        // Foreground energies: 500 × 1e4, 250 × 4e4, 250 × 44100 → median (numpy, between
        // ranks 499 and 500) = 25000; air 0, 1, 2 in about equal thirds → median energy 1.
        assert!((q.fber - 25_000.0).abs() < 1e-6, "{}", q.fber);
        assert!(q.efc > 0.0 && q.efc < 1.0, "{}", q.efc);
    }

    #[test]
    fn blank_saturated_truncated_and_fov_flags() {
        assert_eq!(
            measure(&cube(8, 1.0, |_, _, _| 7.0), false).flags,
            vec!["blank"]
        );
        let saturated = measure(
            &cube(
                20,
                10.0,
                |i, _, _| if i < 10 { 4095.0 } else { (i % 3) as f32 },
            ),
            false,
        );
        assert!(
            saturated.flags.contains(&"saturated"),
            "{:?}",
            saturated.flags
        );
        assert!(
            saturated.flags.contains(&"truncated"),
            "{:?}",
            saturated.flags
        );
        let tiny_fov = measure(
            &cube(8, 0.5, |i, j, k| {
                if (2..6).contains(&i) && (2..6).contains(&j) && (2..6).contains(&k) {
                    100.0
                } else {
                    ((i + j) % 2) as f32
                }
            }),
            false,
        );
        assert!(
            tiny_fov.flags.contains(&"unexpected-fov"),
            "{:?}",
            tiny_fov.flags
        );
        let ct = measure(
            &cube(20, 10.0, |i, j, k| {
                if (5..15).contains(&i) && (5..15).contains(&j) {
                    40.0
                } else {
                    -1000.0 + ((i + j + k) % 2) as f32 * 6.0
                }
            }),
            true,
        );
        assert!(
            (ct.air_hu_mean.expect("air") - -997.0).abs() < 0.1,
            "{:?}",
            ct.air_hu_mean
        );
        assert!((ct.air_noise_hu.expect("noise") - 3.0).abs() < 0.01);
    }
}
