//! Consensus of several raters' label maps: majority vote and STAPLE, binary and multi-label,
//! with the conventions of SimpleITK's `LabelVotingImageFilter`, `STAPLEImageFilter` and
//! `MultiLabelSTAPLEImageFilter` (tested against SimpleITK in `scripts/reference/`):
//!
//! - **Majority vote**: per voxel the label with the most votes (background 0 votes too); when
//!   the largest count is shared, the voxel gets the undecided label (by default one more than
//!   the largest label any rater used).
//! - **STAPLE** (Warfield 2004): the truth estimate W starts as the per-voxel mean of the raters'
//!   decisions; the prior is W's mean over the image times a confidence weight (1), fixed
//!   before the loop; each iteration estimates every rater's sensitivity p and specificity q
//!   from W, then W from them; the loop ends on the first iteration after the first in which
//!   no p or q moved by more than 1e-7 (squared change ≤ 1e-14). A rater with no foreground
//!   (or no background) under W has p (or q) 1.
//! - **Multi-label STAPLE** (Rohlfing 2004): one confusion matrix per rater, rows the rater's
//!   labels plus a reject row, columns the true labels, seeded from the majority vote
//!   (undecided voxels skipped) and normalised by row; priors are the labels' frequencies over
//!   every rater; each iteration re-estimates the matrices from the voxel posteriors and
//!   normalises them by column, until no entry moves by 1e-5 or more. The result is each
//!   voxel's most probable label, undecided on a tie. SimpleITK accumulates in single
//!   precision and this in double, so labels can differ where two posteriors tie to within
//!   single precision.

/// Majority vote of label maps given as equal-length slices of labels. `undecided`: the label
/// for ties (default: the largest label used plus one).
pub fn majority_vote(raters: &[&[u16]], undecided: Option<u16>) -> Vec<u16> {
    let Some(first) = raters.first() else {
        return Vec::new();
    };
    let max = raters
        .iter()
        .flat_map(|r| r.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let undecided = undecided.unwrap_or(max.saturating_add(1));
    let mut votes = vec![0u32; usize::from(max) + 1];
    (0..first.len())
        .map(|i| {
            votes.iter_mut().for_each(|v| *v = 0);
            for r in raters {
                votes[usize::from(r[i])] += 1;
            }
            let best = votes.iter().copied().max().unwrap_or(0);
            let mut winners = votes.iter().enumerate().filter(|(_, v)| **v == best);
            match (winners.next(), winners.next()) {
                (Some((label, _)), None) => label as u16,
                _ => undecided,
            }
        })
        .collect()
}

/// What binary STAPLE estimates.
#[derive(Clone, Debug, PartialEq)]
pub struct Staple {
    /// Per voxel, the probability that it is foreground.
    pub probability: Vec<f64>,
    pub sensitivity: Vec<f64>,
    pub specificity: Vec<f64>,
    pub iterations: u32,
}

/// Binary STAPLE of the raters' masks (`true`: foreground).
pub fn staple(raters: &[&[bool]], max_iterations: u32) -> Staple {
    let n = raters.first().map_or(0, |r| r.len());
    let m = raters.len();
    let mut w = vec![0.0f64; n];
    for r in raters {
        for (acc, &d) in w.iter_mut().zip(r.iter()) {
            *acc += f64::from(u8::from(d));
        }
    }
    let mut prior = 0.0;
    for acc in w.iter_mut() {
        *acc /= m.max(1) as f64;
        prior += *acc;
    }
    prior /= n.max(1) as f64;
    let mut p = vec![0.0; m];
    let mut q = vec![0.0; m];
    let mut last_p = vec![-10.0; m];
    let mut last_q = vec![-10.0; m];
    let mut iteration = 0;
    while iteration < max_iterations.max(1) {
        for (j, r) in raters.iter().enumerate() {
            let (mut pn, mut pd, mut qn, mut qd) = (0.0, 0.0, 0.0, 0.0);
            for (&d, &wi) in r.iter().zip(&w) {
                if d {
                    pn += wi;
                } else {
                    qn += 1.0 - wi;
                }
                pd += wi;
                qd += 1.0 - wi;
            }
            p[j] = if pd == 0.0 { 1.0 } else { pn / pd };
            q[j] = if qd == 0.0 { 1.0 } else { qn / qd };
        }
        for (i, wi) in w.iter_mut().enumerate() {
            let (mut a, mut b) = (1.0, 1.0);
            for (j, r) in raters.iter().enumerate() {
                if r[i] {
                    a *= p[j];
                    b *= 1.0 - q[j];
                } else {
                    a *= 1.0 - p[j];
                    b *= q[j];
                }
            }
            let denominator = prior * a + (1.0 - prior) * b;
            *wi = if denominator == 0.0 {
                0.0
            } else {
                prior * a / denominator
            };
        }
        let converged = iteration != 0
            && (0..m).all(|j| {
                (p[j] - last_p[j]).powi(2) <= 1e-14 && (q[j] - last_q[j]).powi(2) <= 1e-14
            });
        last_p.clone_from(&p);
        last_q.clone_from(&q);
        if converged {
            break;
        }
        iteration += 1;
    }
    Staple {
        probability: w,
        sensitivity: p,
        specificity: q,
        iterations: iteration,
    }
}

/// Multi-label STAPLE of label maps; returns the labels and the number of iterations.
/// `undecided`: the label for ties (default: the largest label used plus one).
pub fn multi_label_staple(
    raters: &[&[u16]],
    undecided: Option<u16>,
    threshold: f64,
    max_iterations: Option<u32>,
) -> (Vec<u16>, u32) {
    let Some(first) = raters.first() else {
        return (Vec::new(), 0);
    };
    let n = first.len();
    let labels = usize::from(
        raters
            .iter()
            .flat_map(|r| r.iter())
            .copied()
            .max()
            .unwrap_or(0),
    ) + 1;
    let undecided = undecided.unwrap_or(labels as u16);
    // Matrices: (labels + 1) rows (the rater's label, then reject) × labels columns.
    let cell = |row: usize, col: usize| row * labels + col;
    let vote = majority_vote(raters, None);
    let mut confusion: Vec<Vec<f64>> = raters
        .iter()
        .map(|r| {
            let mut m = vec![0.0; (labels + 1) * labels];
            for (i, &v) in vote.iter().enumerate() {
                if usize::from(v) < labels {
                    m[cell(usize::from(r[i]), usize::from(v))] += 1.0;
                }
            }
            for row in 0..=labels {
                let sum: f64 = (0..labels).map(|c| m[cell(row, c)]).sum();
                if sum > 0.0 {
                    (0..labels).for_each(|c| m[cell(row, c)] /= sum);
                }
            }
            m
        })
        .collect();
    let mut priors = vec![0.0; labels];
    for r in raters {
        for &l in r.iter() {
            priors[usize::from(l)] += 1.0;
        }
    }
    let total: f64 = priors.iter().sum();
    if total > 0.0 {
        priors.iter_mut().for_each(|p| *p /= total);
    }
    let posterior = |confusion: &[Vec<f64>], i: usize, w: &mut [f64]| {
        w.copy_from_slice(&priors);
        for (m, r) in confusion.iter().zip(raters) {
            let row = usize::from(r[i]);
            for (c, wc) in w.iter_mut().enumerate() {
                *wc *= m[cell(row, c)];
            }
        }
    };
    let mut w = vec![0.0; labels];
    let mut iteration = 0;
    loop {
        if max_iterations.is_some_and(|max| iteration >= max) {
            break;
        }
        let mut updated: Vec<Vec<f64>> = vec![vec![0.0; (labels + 1) * labels]; raters.len()];
        for i in 0..n {
            posterior(&confusion, i, &mut w);
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|x| *x /= sum);
            }
            for (m, r) in updated.iter_mut().zip(raters) {
                let row = usize::from(r[i]);
                for (c, wc) in w.iter().enumerate() {
                    m[cell(row, c)] += wc;
                }
            }
        }
        for m in &mut updated {
            for c in 0..labels {
                let sum: f64 = (0..=labels).map(|row| m[cell(row, c)]).sum();
                if sum != 0.0 {
                    (0..=labels).for_each(|row| m[cell(row, c)] /= sum);
                }
            }
        }
        let mut largest = 0.0f64;
        for (m, u) in confusion.iter_mut().zip(&updated) {
            for (x, &y) in m.iter_mut().zip(u) {
                largest = largest.max((y - *x).abs());
                *x = y;
            }
        }
        if largest < threshold {
            break;
        }
        iteration += 1;
    }
    let out = (0..n)
        .map(|i| {
            posterior(&confusion, i, &mut w);
            let mut winner = undecided;
            let mut best = 0.0;
            for (c, &wc) in w.iter().enumerate() {
                if wc > best {
                    best = wc;
                    winner = c as u16;
                } else if wc >= best {
                    winner = undecided;
                }
            }
            winner
        })
        .collect();
    (out, iteration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_and_ties() {
        let a = [1u16, 2, 3, 0];
        let b = [1u16, 2, 2, 1];
        let c = [1u16, 3, 2, 2];
        assert_eq!(majority_vote(&[&a, &b, &c], None), vec![1, 2, 2, 4]);
        assert_eq!(majority_vote(&[&a, &b], Some(9)), vec![1, 2, 9, 9]);
    }

    #[test]
    fn staple_weighs_down_a_contrary_rater() {
        let good = [true, true, true, true, false, false, false, false];
        let bad = [false, false, false, false, true, true, true, true];
        let s = staple(&[&good, &good, &bad], u32::MAX);
        assert_eq!(s.sensitivity[0], s.sensitivity[1]);
        assert!(s.sensitivity[2] < s.sensitivity[0]);
        for (i, w) in s.probability.iter().enumerate() {
            assert!((w - if i < 4 { 1.0 } else { 0.0 }).abs() < 1e-6);
        }
        let agree = staple(&[&good, &good], u32::MAX);
        assert_eq!((agree.sensitivity[0], agree.iterations), (1.0, 1));
    }

    #[test]
    fn multi_label_staple_follows_the_majority_of_good_raters() {
        let truth: Vec<u16> = (0..60).map(|i| (i / 20) as u16).collect();
        let mut noisy = truth.clone();
        noisy[5] = 2;
        noisy[25] = 0;
        let (out, _) = multi_label_staple(&[&truth, &truth, &noisy], None, 1e-5, None);
        assert_eq!(out, truth);
    }
}
