//! Agreement between raters' categorical labels: Cohen's κ (two raters), Fleiss' κ (a fixed
//! number of raters per item), Krippendorff's α (any raters, missing ratings).
//!
//! Conventions (tested against statsmodels 0.14 and krippendorff 0.9):
//! - Cohen's κ from the two raters' contingency table; weighted κ uses |i − j| (linear) or
//!   (i − j)² (quadratic) over the category order, as `statsmodels.stats.inter_rater.cohens_kappa`
//!   with `wt="linear"` / `wt="quadratic"`.
//! - Fleiss' κ with Fleiss's chance agreement P̄e = Σ p_j² (`method="fleiss"`), or Randolph's
//!   free-marginal P̄e = 1/k (`method="randolph"`), where k counts the categories of the table.
//! - Krippendorff's α from the coincidence matrix over units with at least two ratings, with the
//!   nominal, ordinal, interval or ratio difference function.
//!
//! `None` where the statistic is undefined: no items, or chance agreement of 1 (every rating in
//! one category), which the references report as NaN.

/// Weights of Cohen's κ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    None,
    Linear,
    Quadratic,
}

/// Cohen's κ of a square contingency table (`table[i][j]`: items rater A put in category i
/// and rater B in category j).
pub fn cohen_kappa_table(table: &[Vec<f64>], weights: Weights) -> Option<f64> {
    let k = table.len();
    if k == 0 || table.iter().any(|r| r.len() != k) {
        return None;
    }
    let n: f64 = table.iter().flatten().sum();
    if n <= 0.0 {
        return None;
    }
    let rows: Vec<f64> = table.iter().map(|r| r.iter().sum::<f64>() / n).collect();
    let cols: Vec<f64> = (0..k)
        .map(|j| table.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let w = |i: usize, j: usize| -> f64 {
        let d = i.abs_diff(j) as f64;
        match weights {
            Weights::None => f64::from(u8::from(i != j)),
            Weights::Linear => d,
            Weights::Quadratic => d * d,
        }
    };
    let mut observed = 0.0;
    let mut expected = 0.0;
    for i in 0..k {
        for j in 0..k {
            observed += w(i, j) * table[i][j] / n;
            expected += w(i, j) * rows[i] * cols[j];
        }
    }
    (expected > 0.0).then(|| 1.0 - observed / expected)
}

/// Cohen's κ of two raters' ratings of the same items (categories `0..categories`).
pub fn cohen_kappa(a: &[u32], b: &[u32], categories: usize, weights: Weights) -> Option<f64> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let mut table = vec![vec![0.0; categories]; categories];
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as usize, y as usize);
        if x >= categories || y >= categories {
            return None;
        }
        table[x][y] += 1.0;
    }
    cohen_kappa_table(&table, weights)
}

/// Chance agreement of Fleiss' κ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chance {
    /// P̄e = Σ p_j² (Fleiss 1971).
    Fleiss,
    /// P̄e = 1/k (Randolph 2005, free-marginal).
    Randolph,
}

/// Fleiss' κ of a table of counts (`counts[item][category]`: raters who put the item in the
/// category). Every item must have the same number of raters, at least two.
pub fn fleiss_kappa(counts: &[Vec<u32>], chance: Chance) -> Option<f64> {
    let k = counts.first()?.len();
    let raters: u32 = counts[0].iter().sum();
    if raters < 2 || k == 0 {
        return None;
    }
    if counts
        .iter()
        .any(|r| r.len() != k || r.iter().sum::<u32>() != raters)
    {
        return None;
    }
    let n = f64::from(raters);
    let items = counts.len() as f64;
    let mut p_cat = vec![0.0; k];
    let mut p_mean = 0.0;
    for r in counts {
        let sq: f64 = r.iter().map(|&c| f64::from(c) * f64::from(c)).sum();
        p_mean += (sq - n) / (n * (n - 1.0));
        for (j, &c) in r.iter().enumerate() {
            p_cat[j] += f64::from(c);
        }
    }
    p_mean /= items;
    let total = items * n;
    let p_exp = match chance {
        Chance::Fleiss => p_cat.iter().map(|c| (c / total) * (c / total)).sum(),
        Chance::Randolph => 1.0 / k as f64,
    };
    (p_exp < 1.0).then(|| (p_mean - p_exp) / (1.0 - p_exp))
}

/// Level of measurement of Krippendorff's α.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Nominal,
    Ordinal,
    Interval,
    Ratio,
}

/// Krippendorff's α of `ratings[rater][unit]` (`None`: the rater did not rate the unit).
pub fn krippendorff_alpha(ratings: &[Vec<Option<f64>>], level: Level) -> Option<f64> {
    let units = ratings.first()?.len();
    if ratings.iter().any(|r| r.len() != units) {
        return None;
    }
    // The values that occur, in order.
    let mut values: Vec<f64> = ratings
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let v = values.len();
    if v == 0 {
        return None;
    }
    let index = |x: f64| values.binary_search_by(|p| p.total_cmp(&x)).ok();
    // Coincidence matrix over pairable units.
    let mut o = vec![vec![0.0; v]; v];
    for u in 0..units {
        let here: Vec<usize> = ratings
            .iter()
            .filter_map(|r| r[u])
            .filter(|x| x.is_finite())
            .filter_map(index)
            .collect();
        let m = here.len();
        if m < 2 {
            continue;
        }
        let mut counts = vec![0.0; v];
        for &c in &here {
            counts[c] += 1.0;
        }
        for c in 0..v {
            for k in 0..v {
                let pairs = if c == k {
                    counts[c] * (counts[c] - 1.0)
                } else {
                    counts[c] * counts[k]
                };
                o[c][k] += pairs / (m as f64 - 1.0);
            }
        }
    }
    let n_c: Vec<f64> = o.iter().map(|r| r.iter().sum()).collect();
    let n: f64 = n_c.iter().sum();
    if n <= 1.0 {
        return None;
    }
    let delta = |c: usize, k: usize| -> f64 {
        match level {
            Level::Nominal => f64::from(u8::from(c != k)),
            Level::Interval => (values[c] - values[k]).powi(2),
            Level::Ratio => {
                let s = values[c] + values[k];
                if s == 0.0 {
                    0.0
                } else {
                    ((values[c] - values[k]) / s).powi(2)
                }
            }
            Level::Ordinal => {
                let (lo, hi) = (c.min(k), c.max(k));
                let between: f64 = n_c[lo..=hi].iter().sum();
                (between - (n_c[c] + n_c[k]) / 2.0).powi(2)
            }
        }
    };
    let mut d_o = 0.0;
    let mut d_e = 0.0;
    for c in 0..v {
        for k in 0..v {
            let d = delta(c, k);
            d_o += o[c][k] * d;
            d_e += n_c[c] * n_c[k] * d;
        }
    }
    (d_e > 0.0).then(|| 1.0 - (n - 1.0) * d_o / d_e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_chance_agreement() {
        let a = [0, 1, 2, 1, 0, 2];
        assert_eq!(cohen_kappa(&a, &a, 3, Weights::None), Some(1.0));
        // Every rating in one category: chance agreement 1, κ undefined.
        assert_eq!(cohen_kappa(&[1, 1], &[1, 1], 2, Weights::None), None);
        let counts = vec![vec![3, 0], vec![0, 3], vec![3, 0]];
        assert!((fleiss_kappa(&counts, Chance::Fleiss).unwrap_or(0.0) - 1.0).abs() < 1e-12);
        assert_eq!(
            fleiss_kappa(&[vec![2, 1], vec![1, 1]], Chance::Fleiss),
            None
        );
    }

    #[test]
    fn krippendorff_worked_example() {
        // Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the nominal example
        // with missing data: α = 0.743.
        let n = None;
        let s = |x: f64| Some(x);
        let data = vec![
            vec![
                s(1.),
                s(2.),
                s(3.),
                s(3.),
                s(2.),
                s(1.),
                s(4.),
                s(1.),
                s(2.),
                n,
                n,
                n,
            ],
            vec![
                s(1.),
                s(2.),
                s(3.),
                s(3.),
                s(2.),
                s(2.),
                s(4.),
                s(1.),
                s(2.),
                s(5.),
                n,
                s(3.),
            ],
            vec![
                n,
                s(3.),
                s(3.),
                s(3.),
                s(2.),
                s(3.),
                s(4.),
                s(2.),
                s(2.),
                s(5.),
                s(1.),
                n,
            ],
            vec![
                s(1.),
                s(2.),
                s(3.),
                s(3.),
                s(2.),
                s(4.),
                s(4.),
                s(1.),
                s(2.),
                s(5.),
                s(1.),
                n,
            ],
        ];
        let a = krippendorff_alpha(&data, Level::Nominal).unwrap_or(0.0);
        assert!((a - 0.743).abs() < 5e-4, "{a}");
        let i = krippendorff_alpha(&data, Level::Interval).unwrap_or(0.0);
        assert!((i - 0.849).abs() < 5e-4, "{i}");
    }
}
