//! Harmonisation against the Python reference (intensity-normalization 2.2.4, golden outputs
//! in tests/golden with the script that made them), hand-computed values, and merged-summary
//! fitting equal to pooled fitting.

use ndarray::Array4;
use node::harmonise::stats::Contrast;
use node::harmonise::{self, Discretisation, Fitted, Foreground, Method, Model, WindowFunction};
use node::volume::{StoredType, Volume, diagonal};

const GOLDEN: &str = include_str!("../golden/harmonise-2.2.4.json");

fn synthetic(n: usize, scale: f64, offset: f64, seed: u64) -> Volume {
    let mut state = seed;
    let mut data = Array4::<f32>::zeros((n, n, n, 1));
    let c = (n as f64 - 1.0) / 2.0;
    for i in 0..n {
        for j in 0..n {
            for k in 0..n {
                let r2 = (i as f64 - c).powi(2) + (j as f64 - c).powi(2) + (k as f64 - c).powi(2);
                if r2 >= 14.0 * 14.0 {
                    continue;
                }
                let base = if r2 < 36.0 {
                    900.0
                } else if r2 < 100.0 {
                    600.0
                } else {
                    300.0
                };
                let mut noise = 0.0;
                for _ in 0..4 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    noise += ((state >> 33) % 1001) as f64 / 10.0 - 50.0;
                }
                let v = (base + noise) * scale + offset;
                data[[i, j, k, 0]] = v as f32;
            }
        }
    }
    Volume {
        data,
        affine: diagonal([1.0, 1.0, 1.0]),
        stored: StoredType::F32,
    }
}

fn golden() -> serde_json::Value {
    serde_json::from_str(GOLDEN).expect("golden json")
}

fn samples(g: &serde_json::Value) -> Vec<[usize; 3]> {
    g["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| {
            let v: Vec<usize> = s
                .as_array()
                .expect("triple")
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as usize)
                .collect();
            [v[0], v[1], v[2]]
        })
        .collect()
}

fn volumes(g: &serde_json::Value) -> Vec<Volume> {
    g["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            synthetic(
                32,
                v[0].as_f64().unwrap_or(1.0),
                v[1].as_f64().unwrap_or(0.0),
                v[2].as_u64().unwrap_or(1),
            )
        })
        .collect()
}

fn check(name: &str, model: &Model, tolerance: f64) {
    let g = golden();
    let s = samples(&g);
    let expected = g["methods"][name]
        .as_array()
        .unwrap_or_else(|| panic!("{name} in golden"));
    for (vi, v) in volumes(&g).iter().enumerate() {
        let out = harmonise::apply(model, v, &Foreground::Positive).expect("applies");
        // Handing the volume over (rewritten in place) gives the same voxels, bit for bit.
        let owned =
            harmonise::apply_owned(model, v.clone(), &Foreground::Positive).expect("applies");
        assert_eq!(
            owned.volume.data, out.volume.data,
            "{name}: in place differs"
        );
        assert_eq!(owned.volume.affine, out.volume.affine);
        for (si, [i, j, k]) in s.iter().enumerate() {
            let want = expected[vi][si].as_f64().expect("number");
            let got = f64::from(out.volume.data[[*i, *j, *k, 0]]);
            let scale = want.abs().max(1e-3);
            assert!(
                (got - want).abs() / scale <= tolerance,
                "{name} volume {vi} voxel ({i},{j},{k}): {got} vs reference {want}"
            );
        }
    }
}

fn per_volume(method: Method) -> Model {
    Model {
        version: harmonise::MODEL_VERSION,
        method,
        fitted: Fitted::None,
    }
}

#[test]
fn deterministic_methods_agree_with_intensity_normalization_2_2_4() {
    assert_eq!(golden()["version"], "2.2.4");
    // Inputs are float32 volumes here (the reference uses float64): allow 1e-4 relative.
    check("zscore", &per_volume(Method::ZScore), 1e-4);
    check(
        "kde_t1",
        &per_volume(Method::Kde {
            contrast: Contrast::T1,
        }),
        1e-4,
    );
    check(
        "whitestripe_t1",
        &per_volume(Method::WhiteStripe {
            contrast: Contrast::T1,
            width: 0.05,
        }),
        1e-4,
    );
    let g = golden();
    let model = harmonise::fit(&Method::Nyul, &volumes(&g), &Foreground::Positive).expect("fit");
    let Fitted::Nyul { summary } = &model.fitted else {
        panic!("nyul model")
    };
    let scale = summary.standard_scale().expect("scale");
    for (got, want) in scale.iter().zip(
        g["methods"]["nyul_standard_scale"]
            .as_array()
            .expect("scale"),
    ) {
        let want = want.as_f64().expect("number");
        assert!(
            (got - want).abs() / want.abs().max(1e-3) <= 1e-4,
            "standard scale {got} vs {want}"
        );
    }
    check("nyul", &model, 1e-4);
}

#[test]
fn fcm_agrees_with_the_reference_within_one_percent() {
    check("fcm_t1", &per_volume(Method::Fcm), 1e-2);
}

#[test]
fn merged_site_summaries_equal_pooled_fitting_bit_for_bit() {
    let g = golden();
    let vols = volumes(&g);
    for method in [Method::Nyul, Method::CtNnunet] {
        let pooled = harmonise::fit(&method, &vols, &Foreground::Positive).expect("pooled");
        let sites: Vec<Model> = vols
            .iter()
            .map(|v| {
                harmonise::fit(&method, std::slice::from_ref(v), &Foreground::Positive)
                    .expect("site")
            })
            .collect();
        let merged_forward = harmonise::merge(&sites).expect("merge");
        let mut reversed = sites.clone();
        reversed.reverse();
        let merged_back = harmonise::merge(&reversed).expect("merge");
        assert_eq!(merged_forward, pooled, "{method:?}");
        assert_eq!(merged_back, pooled, "{method:?}: order does not matter");
        // Models round-trip through their serialised form.
        let json = serde_json::to_string(&pooled).expect("serialise");
        let back: Model = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, pooled);
    }
}

fn tiny(values: &[f32]) -> Volume {
    let mut data = Array4::<f32>::zeros((values.len(), 1, 1, 1));
    for (i, v) in values.iter().enumerate() {
        data[[i, 0, 0, 0]] = *v;
    }
    Volume {
        data,
        affine: diagonal([1.0, 1.0, 1.0]),
        stored: StoredType::F32,
    }
}

fn run(method: Method, v: &Volume, fg: &Foreground) -> Vec<f32> {
    harmonise::apply(&per_volume(method), v, fg)
        .expect("applies")
        .volume
        .data
        .iter()
        .copied()
        .collect()
}

#[test]
fn simple_methods_and_discretisation_match_hand_computed_values() {
    let v = tiny(&[0.0, 10.0, 20.0, 30.0, 40.0]);
    let all = Foreground::Mask(vec![true; 5]);
    assert_eq!(
        run(Method::MinMax, &v, &all),
        vec![0.0, 0.25, 0.5, 0.75, 1.0]
    );
    // Percentiles 25/75 of 0..40 are 10 and 30.
    assert_eq!(
        run(
            Method::Percentile {
                low: 25.0,
                high: 75.0
            },
            &v,
            &all
        ),
        vec![0.0, 0.0, 0.5, 1.0, 1.0]
    );
    let z = run(Method::ZScore, &v, &all);
    let sd = 200f32.sqrt();
    for (o, x) in z.iter().zip([0.0f32, 10.0, 20.0, 30.0, 40.0]) {
        assert!((o - (x - 20.0) / sd).abs() < 1e-6);
    }
    // pyradiomics: clip the whole-image z-score at ±1.
    let clipped = run(Method::MuSigmaPyradiomics { n: 1.0 }, &v, &all);
    assert_eq!(clipped[0], -1.0);
    assert_eq!(clipped[4], 1.0);
    // IBSI: voxels beyond μ ± 1σ leave the ROI, intensities unchanged.
    let ibsi =
        harmonise::apply(&per_volume(Method::MuSigmaIbsi { n: 1.0 }), &v, &all).expect("ibsi");
    assert_eq!(ibsi.roi, Some(vec![false, true, true, true, false]));
    // IBSI fixed bin number, 4 bins: ⌊4(x−0)/40⌋+1, max → 4.
    assert_eq!(
        run(
            Method::Discretise(Discretisation::FixedBinNumber { bins: 4 }),
            &v,
            &all
        ),
        vec![1.0, 2.0, 3.0, 4.0, 4.0]
    );
    // IBSI fixed bin size 25 from −10: ⌊(x+10)/25⌋+1.
    assert_eq!(
        run(
            Method::Discretise(Discretisation::FixedBinSize {
                width: 25.0,
                lower: Some(-10.0)
            }),
            &v,
            &all
        ),
        vec![1.0, 1.0, 2.0, 2.0, 3.0]
    );
    // pyradiomics binWidth 25 on 5..45: ⌊x/25⌋ − ⌊5/25⌋ + 1.
    let w = tiny(&[5.0, 24.0, 25.0, 45.0, 50.0]);
    assert_eq!(
        run(
            Method::Discretise(Discretisation::PyradiomicsBinWidth { width: 25.0 }),
            &w,
            &Foreground::Mask(vec![true; 5])
        ),
        vec![1.0, 1.0, 2.0, 2.0, 3.0]
    );
    // Voxels outside the ROI get bin 0.
    let partial = run(
        Method::Discretise(Discretisation::FixedBinNumber { bins: 2 }),
        &v,
        &Foreground::Mask(vec![false, true, true, true, true]),
    );
    assert_eq!(partial, vec![0.0, 1.0, 1.0, 2.0, 2.0]);
}

#[test]
fn ct_windowing_follows_the_dicom_formulas() {
    // LINEAR, c = 40, w = 80: c' = 39.5, w' = 79; x ≤ 0 → 0; x > 79 → 1.
    let w = |x: f64, f| harmonise::window(x, 40.0, 80.0, f, 0.0, 1.0);
    assert_eq!(w(0.0, WindowFunction::Linear), 0.0);
    assert_eq!(w(79.5, WindowFunction::Linear), 1.0);
    assert!((w(39.5, WindowFunction::Linear) - 0.5).abs() < 1e-12);
    assert!((w(40.0, WindowFunction::LinearExact) - 0.5).abs() < 1e-12);
    assert!((w(40.0, WindowFunction::Sigmoid) - 0.5).abs() < 1e-12);
    assert!(w(120.0, WindowFunction::Sigmoid) > 0.98);
    // The nnU-Net CT scheme clips to the pooled foreground's P0.5/P99.5 and z-scores with its
    // mean and std.
    let vols: Vec<Volume> = (0..3)
        .map(|s| {
            tiny(
                &(0..200)
                    .map(|i| (i * 10 + s * 3) as f32 - 1000.0)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let all = Foreground::Mask(vec![true; 200]);
    let model = harmonise::fit(&Method::CtNnunet, &vols, &all).expect("fit");
    let Fitted::Ct { summary } = &model.fitted else {
        panic!("ct model")
    };
    let (mean, sd) = (summary.mean().expect("mean"), summary.std().expect("std"));
    let out = harmonise::apply(&model, &vols[0], &all).expect("apply");
    let lo = summary.percentile(0.5).expect("p0.5");
    let first = f64::from(out.volume.data[[0, 0, 0, 0]]);
    assert!(
        (first - (lo.max(-1000.0) - mean) / sd).abs() < 1e-5,
        "{first}"
    );
}

#[test]
fn ct_padding_is_excluded_from_the_statistics() {
    // Padding −2000 around two tissue values: the z-score uses the non-padding voxels only.
    let v = tiny(&[-2000.0, -2000.0, 0.0, 100.0, -2000.0]);
    let z = run(Method::ZScore, &v, &Foreground::AbovePadding(-2000.0));
    assert!(
        (z[2] + 1.0).abs() < 1e-6 && (z[3] - 1.0).abs() < 1e-6,
        "{z:?}"
    );
    let all = run(Method::ZScore, &v, &Foreground::Mask(vec![true; 5]));
    assert!(
        (all[3] - 1.0).abs() > 0.1,
        "padding would have shifted the statistics: {all:?}"
    );
}

#[test]
fn kde_on_a_constant_foreground_is_refused_like_other_degenerate_inputs() {
    // The reference raises on a constant foreground (no density to estimate); so do we, for
    // every contrast, instead of returning a scale from a flat histogram.
    let v = tiny(&[0.0, 0.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0]);
    for contrast in [Contrast::T1, Contrast::T2, Contrast::Flair, Contrast::Pd] {
        let r = harmonise::apply(
            &per_volume(Method::Kde { contrast }),
            &v,
            &Foreground::Positive,
        );
        assert_eq!(
            r.map(|_| ()),
            Err(harmonise::HarmoniseError::Degenerate),
            "{contrast:?}"
        );
    }
    // A foreground that varies is normalised.
    let w = tiny(&[0.0, 5.0, 6.0, 7.0, 7.0, 7.0, 8.0, 9.0]);
    assert!(
        harmonise::apply(
            &per_volume(Method::Kde {
                contrast: Contrast::T1
            }),
            &w,
            &Foreground::Positive
        )
        .is_ok()
    );
}

#[test]
fn degenerate_volumes_are_refused_by_the_nyul_fit() {
    let flat = tiny(&[0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]);
    assert_eq!(
        harmonise::fit_nyul(&flat, &Foreground::Positive).map(|_| ()),
        Err(harmonise::HarmoniseError::Degenerate),
        "constant foreground"
    );
    let infinite = tiny(&[0.0, 5.0, 6.0, 7.0, f32::INFINITY, 8.0, 9.0, 10.0]);
    assert_eq!(
        harmonise::fit_nyul(&infinite, &Foreground::Positive).map(|_| ()),
        Err(harmonise::HarmoniseError::Degenerate),
        "an infinite voxel"
    );
    let fine = tiny(&[0.0, 5.0, 6.0, 7.0, 7.5, 8.0, 9.0, 10.0]);
    assert!(harmonise::fit_nyul(&fine, &Foreground::Positive).is_ok());
}
