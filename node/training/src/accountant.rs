//! The privacy accountant of training rounds: each round releases the sum of clipped updates
//! (L2 sensitivity C) with Gaussian noise of standard deviation z·C, a Gaussian mechanism of
//! Rényi-DP ε(α) = α / (2z²) at every order α, i.e. ρ-zCDP with ρ = 1 / (2z²); T rounds
//! compose to T times that. The conversion to (ε, δ) is the one Google's `dp-accounting` uses
//! for RDP (Canonne, Kamath and Steinke 2020, Proposition 12 of Balle et al. 2020):
//! ε = min over α of ε(α) + log1p(−1/α) − log(δ·α)/(α − 1), over the same orders, so the two
//! agree to rounding (the test script checks it).

/// The orders the accountant minimises over (those of `dp-accounting`'s default list).
pub fn orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    o.extend((11..64).map(f64::from));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

/// ρ of zCDP after `rounds` rounds with noise multiplier `z`.
pub fn zcdp_rho(z: f64, rounds: u32) -> f64 {
    if z <= 0.0 {
        return f64::INFINITY;
    }
    f64::from(rounds) / (2.0 * z * z)
}

/// (ε, the order that gave it) after `rounds` rounds with noise multiplier `z`, at `delta`.
pub fn epsilon(z: f64, rounds: u32, delta: f64) -> (f64, f64) {
    if rounds == 0 {
        return (0.0, 0.0);
    }
    if z <= 0.0 || delta <= 0.0 {
        return (f64::INFINITY, 0.0);
    }
    let mut best = (f64::INFINITY, 0.0);
    for a in orders() {
        let r = f64::from(rounds) * a / (2.0 * z * z);
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_rounds_or_less_noise_spend_more() {
        let (e1, _) = epsilon(1.0, 10, 1e-5);
        let (e2, _) = epsilon(1.0, 100, 1e-5);
        let (e3, _) = epsilon(2.0, 100, 1e-5);
        assert!(e1 < e2 && e3 < e2, "{e1} {e2} {e3}");
        assert!(e1 > 0.0 && e2.is_finite());
        // The zCDP bound ε ≤ ρ + 2√(ρ ln 1/δ) is looser than the RDP conversion.
        let rho = zcdp_rho(1.0, 100);
        assert!(e2 <= rho + 2.0 * (rho * (1e5f64).ln()).sqrt());
        assert_eq!(epsilon(0.0, 1, 1e-5).0, f64::INFINITY);
    }
}
