//! Differential privacy at the node: noise on released counts and sums, and the ledgers that
//! refuse a release — the privacy budget (sequential composition of each release's ε and δ,
//! per site and dataset) and the query ledger (a release whose patient set differs from an
//! earlier one's by fewer than k patients would isolate them by subtraction).
//!
//! Mechanisms: two-sided geometric ("discrete Laplace") noise when δ = 0, discrete Gaussian
//! noise (Canonne, Kamath & Steinke 2020, rejection from discrete Laplace) when δ > 0; real
//! sums get continuous Laplace or Gaussian noise. Sampling uses floating point over the
//! operating system's random generator, not exact arithmetic.

use protocol::aggregate::{Mechanism, NoiseApplied};
use protocol::schema::DifferentialPrivacy;
use ring::rand::SecureRandom;

/// Uniform in (0, 1).
fn uniform(rng: &ring::rand::SystemRandom) -> f64 {
    let mut b = [0u8; 8];
    // The system generator does not fail on supported platforms; a zero draw is still in range.
    let _ = rng.fill(&mut b);
    ((u64::from_be_bytes(b) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Two-sided geometric noise with scale `t`: P(x) ∝ exp(−|x| / t).
pub fn discrete_laplace(t: f64, rng: &ring::rand::SystemRandom) -> i64 {
    let q = (-1.0 / t).exp();
    // Geometric on {0, 1, ...} with success probability 1 − q, by inversion.
    let geometric = |u: f64| (u.ln() / q.ln()).floor() as i64;
    geometric(uniform(rng)) - geometric(uniform(rng))
}

/// Discrete Gaussian noise with parameter `sigma`: P(x) ∝ exp(−x² / (2σ²)).
pub fn discrete_gaussian(sigma: f64, rng: &ring::rand::SystemRandom) -> i64 {
    let t = sigma.floor() + 1.0;
    loop {
        let y = discrete_laplace(t, rng);
        let d = (y.abs() as f64) - sigma * sigma / t;
        if uniform(rng) < (-(d * d) / (2.0 * sigma * sigma)).exp() {
            return y;
        }
    }
}

/// Continuous Laplace noise with scale `b`.
pub fn laplace(b: f64, rng: &ring::rand::SystemRandom) -> f64 {
    let u = uniform(rng) - 0.5;
    -b * u.signum() * (1.0 - 2.0 * u.abs()).ln()
}

/// Standard normal noise.
pub fn gaussian(rng: &ring::rand::SystemRandom) -> f64 {
    (-2.0 * uniform(rng).ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform(rng)).cos()
}

/// Noise for one release: the schema's ε and δ split evenly over its `statistics`.
#[derive(Debug)]
pub struct Noise {
    epsilon: f64,
    delta: f64,
    applied: NoiseApplied,
    rng: ring::rand::SystemRandom,
}

impl Noise {
    pub fn new(dp: &DifferentialPrivacy, statistics: usize) -> Self {
        let m = statistics.max(1) as f64;
        Noise {
            epsilon: dp.epsilon / m,
            delta: dp.delta / m,
            applied: NoiseApplied {
                mechanism: if dp.delta > 0.0 {
                    Mechanism::DiscreteGaussian
                } else {
                    Mechanism::DiscreteLaplace
                },
                epsilon_micro: (dp.epsilon * 1e6).round() as u64,
                delta_pico: (dp.delta * 1e12).round() as u64,
            },
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// What the release spends (for the aggregates and the ledger).
    pub fn applied(&self) -> NoiseApplied {
        self.applied
    }

    /// Gaussian σ for L2 sensitivity `s` at this statistic's (ε, δ) (the classic bound).
    fn sigma(&self, s: f64) -> f64 {
        s * (2.0 * (1.25 / self.delta).ln()).sqrt() / self.epsilon
    }

    /// A noisy count with sensitivity `s`, clamped at zero.
    pub fn count(&mut self, c: u64, s: f64) -> u64 {
        let e = match self.applied.mechanism {
            Mechanism::DiscreteLaplace => discrete_laplace(s / self.epsilon, &self.rng),
            Mechanism::DiscreteGaussian => discrete_gaussian(self.sigma(s), &self.rng),
        };
        (c as i64).saturating_add(e).max(0) as u64
    }

    /// A noisy real sum with sensitivity `s`.
    pub fn real(&mut self, x: f64, s: f64) -> f64 {
        match self.applied.mechanism {
            Mechanism::DiscreteLaplace => x + laplace(s / self.epsilon, &self.rng),
            Mechanism::DiscreteGaussian => x + self.sigma(s) * gaussian(&self.rng),
        }
    }
}

/// Whether a release over `new` patients may follow the earlier releases `earlier` (each a
/// sorted set of keyed patient hashes): refused when it differs from one of them by 1..k
/// patients in either direction.
pub fn isolates_few(new: &[String], earlier: &[Vec<String>], k: usize) -> bool {
    use std::collections::BTreeSet;
    let n: BTreeSet<&String> = new.iter().collect();
    earlier.iter().any(|old| {
        let o: BTreeSet<&String> = old.iter().collect();
        let added = n.difference(&o).count();
        let removed = o.difference(&n).count();
        (added > 0 && added < k) || (removed > 0 && removed < k)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pearson's χ² of observed counts against expected probabilities over the values
    /// `lo..=hi` (the tails pooled into the end cells).
    fn chi_square(draws: &[i64], lo: i64, hi: i64, pmf: impl Fn(i64) -> f64) -> (f64, usize) {
        let n = draws.len() as f64;
        let cells = (hi - lo + 1) as usize;
        let mut obs = vec![0.0; cells];
        for d in draws {
            obs[((*d).clamp(lo, hi) - lo) as usize] += 1.0;
        }
        let total: f64 = (-10_000..=10_000).map(&pmf).sum();
        let mut exp = vec![0.0; cells];
        for x in -10_000i64..=10_000 {
            exp[(x.clamp(lo, hi) - lo) as usize] += pmf(x) / total * n;
        }
        let chi = obs
            .iter()
            .zip(&exp)
            .map(|(o, e)| (o - e) * (o - e) / e)
            .sum::<f64>();
        (chi, cells - 1)
    }

    #[test]
    fn discrete_laplace_has_its_distribution() {
        let rng = ring::rand::SystemRandom::new();
        let t = 2.0;
        let draws: Vec<i64> = (0..60_000).map(|_| discrete_laplace(t, &rng)).collect();
        let (chi, df) = chi_square(&draws, -8, 8, |x| (-(x.abs() as f64) / t).exp());
        // χ² with 16 degrees of freedom: the 99.9th percentile is 39.3.
        assert_eq!(df, 16);
        assert!(chi < 39.3, "χ² = {chi}");
        let q = (-1.0 / t).exp();
        let var = draws.iter().map(|x| (*x * *x) as f64).sum::<f64>() / draws.len() as f64;
        let expected = 2.0 * q / ((1.0 - q) * (1.0 - q));
        assert!(
            (var / expected - 1.0).abs() < 0.05,
            "variance {var} vs {expected}"
        );
        // A wrong scale is detected by the same test.
        let wrong: Vec<i64> = (0..60_000).map(|_| discrete_laplace(3.0, &rng)).collect();
        assert!(chi_square(&wrong, -8, 8, |x| (-(x.abs() as f64) / t).exp()).0 > 39.3);
    }

    #[test]
    fn discrete_gaussian_has_its_distribution() {
        let rng = ring::rand::SystemRandom::new();
        let sigma = 3.0;
        let draws: Vec<i64> = (0..60_000)
            .map(|_| discrete_gaussian(sigma, &rng))
            .collect();
        let (chi, df) = chi_square(&draws, -9, 9, |x| {
            (-((x * x) as f64) / (2.0 * sigma * sigma)).exp()
        });
        // 18 degrees of freedom: 99.9th percentile 42.3.
        assert_eq!(df, 18);
        assert!(chi < 42.3, "χ² = {chi}");
        let mean = draws.iter().sum::<i64>() as f64 / draws.len() as f64;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn the_budget_split_and_the_mechanism_follow_the_schema() {
        let n = Noise::new(
            &DifferentialPrivacy {
                epsilon: 1.0,
                delta: 0.0,
            },
            4,
        );
        assert_eq!(n.applied().mechanism, Mechanism::DiscreteLaplace);
        assert_eq!(n.applied().epsilon_micro, 1_000_000);
        assert!((n.epsilon - 0.25).abs() < 1e-12);
        let g = Noise::new(
            &DifferentialPrivacy {
                epsilon: 1.0,
                delta: 1e-6,
            },
            2,
        );
        assert_eq!(g.applied().mechanism, Mechanism::DiscreteGaussian);
        assert_eq!(g.applied().delta_pico, 1_000_000);
    }

    #[test]
    fn differencing_is_refused_below_k() {
        let set = |r: std::ops::Range<u32>| r.map(|i| format!("p{i:03}")).collect::<Vec<_>>();
        let earlier = vec![set(0..20)];
        assert!(isolates_few(&set(0..21), &earlier, 5), "one patient added");
        assert!(
            isolates_few(&set(1..20), &earlier, 5),
            "one patient removed"
        );
        assert!(
            !isolates_few(&set(0..25), &earlier, 5),
            "five added: allowed"
        );
        assert!(
            !isolates_few(&set(0..20), &earlier, 5),
            "the same set again"
        );
    }
}
