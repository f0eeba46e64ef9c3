//! The privacy accountant: Rényi differential privacy (RDP) of the rounds a job has run,
//! converted to (ε, δ).
//!
//! A round of DP federated averaging is a (subsampled) Gaussian mechanism: each participant's
//! update is clipped to L2 norm `C`, the sum carries Gaussian noise of standard deviation
//! `z · C` (`z` the noise multiplier), and each participant takes part with probability `q`.
//! Its RDP at order α is that of the Poisson-sampled Gaussian mechanism (Mironov, Talwar and
//! Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019); rounds
//! compose by adding RDP order by order, and the total converts to (ε, δ) by the bound of
//! Canonne, Kamath and Steinke (2020, Proposition 12), minimised over the orders. The orders
//! and the arithmetic are those of Google's `dp-accounting` (its `RdpAccountant`), which a
//! test checks this module against.
//!
//! The distributed discrete Gaussian (each participant adds integer noise inside secure
//! aggregation) is accounted through [`distributed_noise_multiplier`]: Kairouz, Liu and
//! Steinke's bound on the sum of discrete Gaussians (2021, Theorem 1) as the noise multiplier
//! of the Gaussian with the same concentrated-DP guarantee.

use serde::{Deserialize, Serialize};

/// Where a job's differential-privacy noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Each participant adds discrete Gaussian noise to its encoded update before
    /// encrypting it; the sum over at least T_min participants carries the job's noise, and
    /// no party sees a less noised value. Needs secure aggregation.
    Distributed,
    /// The coordinator adds Gaussian noise to the aggregate before the strategy sees it: the
    /// released models are private, the coordinator is trusted with the aggregate (and, in
    /// plaintext jobs, with every update).
    Central,
}

impl std::str::FromStr for Mechanism {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "distributed" => Ok(Mechanism::Distributed),
            "central" => Ok(Mechanism::Central),
            _ => Err(format!(
                "unknown privacy mechanism {s:?}: use distributed or central"
            )),
        }
    }
}

fn default_delta() -> f64 {
    1e-5
}

/// A job's differential privacy (`[job.privacy]`): participant-level (ε, δ)-DP of the
/// sequence of global models, each update's L2 norm bounded by the job's `clip_norm`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    pub mechanism: Mechanism,
    /// Noise standard deviation on the round's sum over the sum's L2 sensitivity
    /// (`clip_norm`).
    pub noise_multiplier: f64,
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// The job stops before a round that would take its ε past this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
}

impl PrivacySettings {
    /// Checks the numbers (the job checks how they fit its other settings).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.noise_multiplier > 0.0 && self.noise_multiplier.is_finite()) {
            return Err(format!(
                "privacy.noise_multiplier must be a positive number, not {}",
                self.noise_multiplier
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "privacy.delta must be in (0, 1), not {}",
                self.delta
            ));
        }
        if let Some(e) = self.target_epsilon
            && !(e > 0.0 && e.is_finite())
        {
            return Err(format!(
                "privacy.target_epsilon must be a positive number, not {e}"
            ));
        }
        Ok(())
    }
}

fn half() -> f64 {
    0.5
}

fn point_two() -> f64 {
    0.2
}

/// Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
/// Clipping", 2021; `[job.adaptive_clipping]`): each participant also sends whether its
/// update was within the clip norm C, the indicators are summed like the updates (and noised
/// with them under DP), and after each round `C ← C · exp(−η (b̄ − γ))`, b̄ the share within
/// it. C tracks the γ-quantile of the update norms; the job's `clip_norm` is its start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// γ: the share of updates the clip norm should leave unclipped.
    #[serde(default = "half")]
    pub target_quantile: f64,
    /// η, the geometric step.
    #[serde(default = "point_two")]
    pub learning_rate: f64,
}

impl AdaptiveClipping {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            return Err(format!(
                "adaptive_clipping.target_quantile must be in (0, 1), not {}",
                self.target_quantile
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "adaptive_clipping.learning_rate must be a positive number, not {}",
                self.learning_rate
            ));
        }
        Ok(())
    }

    /// The clip norm after a round at `clip` in which a share `unclipped` of the updates was
    /// within it (a noised share is clamped to [0, 1] first).
    pub fn next(&self, clip: f64, unclipped: f64) -> f64 {
        clip * (-self.learning_rate * (unclipped.clamp(0.0, 1.0) - self.target_quantile)).exp()
    }
}

/// The RDP orders `dp-accounting` uses by default.
pub fn default_orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    o.extend((11..64).map(f64::from));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

/// Accumulated RDP at each order.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Accountant { orders, rdp }
    }
}

impl Accountant {
    /// Adds `steps` rounds of the Gaussian mechanism with noise multiplier `z`, each
    /// participant sampled with probability `q` (Poisson sampling; `q = 1`: every one).
    pub fn compose_gaussian(&mut self, q: f64, z: f64, steps: u64) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_sampled_gaussian(q, z, a);
        }
    }

    /// The RDP accumulated at each order (the orders of [`default_orders`]).
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// ε at `delta` and the order that gives it.
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// RDP at order `alpha` of one Poisson-sampled Gaussian mechanism (`dp-accounting`'s
/// `_compute_rdp_poisson_subsampled_gaussian`).
pub fn rdp_sampled_gaussian(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() || z == 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * z * z);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, z, alpha as u64)
    } else {
        log_a_frac(q, z, alpha)
    };
    log_a / (alpha - 1.0)
}

/// (ε, order) from RDP values at `orders` (`dp-accounting`'s `compute_epsilon`).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    if delta <= 0.0 {
        let all_zero = rdp.iter().all(|&r| r == 0.0);
        return (if all_zero { 0.0 } else { f64::INFINITY }, 0.0);
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
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

/// The smallest noise multiplier (to 0.1%) with which `steps` rounds at sampling rate `q`
/// stay within `target_epsilon` at `delta`; `None` when no multiplier up to 10⁴ does.
pub fn calibrate(target_epsilon: f64, delta: f64, q: f64, steps: u64) -> Option<f64> {
    let eps = |z: f64| {
        let mut a = Accountant::default();
        a.compose_gaussian(q, z, steps);
        a.epsilon(delta).0
    };
    let (mut lo, mut hi) = (1e-3, 1e4);
    if eps(hi) > target_epsilon {
        return None;
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if eps(mid) > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The Gaussian noise multiplier equivalent (in concentrated DP) to `n` participants each
/// adding discrete Gaussian noise of standard deviation `sigma` (in the integer units of the
/// encoding) to updates of L2 sensitivity `sensitivity` (same units) and dimension `d`:
/// Kairouz, Liu and Steinke's `ε = min(√(Δ²/(nσ²) + 2τd), Δ/(√n σ) + τ√d)` with
/// `τ = 10 Σ_{k<n} exp(−2π²σ² k/(k+1))` is `ε²/2`-zCDP, which is the guarantee of the
/// Gaussian mechanism with multiplier `1/ε`.
pub fn distributed_noise_multiplier(sigma: f64, n: usize, sensitivity: f64, d: usize) -> f64 {
    let n_f = n.max(1) as f64;
    let tau: f64 = 10.0
        * (1..n.max(1))
            .map(|k| {
                let k = k as f64;
                (-2.0 * std::f64::consts::PI.powi(2) * sigma * sigma * k / (k + 1.0)).exp()
            })
            .sum::<f64>();
    let d = d as f64;
    let var = sensitivity * sensitivity / (n_f * sigma * sigma);
    let eps = (var + 2.0 * tau * d)
        .sqrt()
        .min(sensitivity / (n_f.sqrt() * sigma) + tau * d.sqrt());
    1.0 / eps
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log(A_α) for integer α.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        log_a = log_add(log_a, coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// log(A_α) for fractional α (Mironov et al., section 3.3).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let s2 = std::f64::consts::SQRT_2 * sigma;
    for i in 0..1000 {
        let i = i as f64;
        let coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = coef + i * q.ln() + j * log1mq;
        let log_t1 = coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        (last_s0, last_s1) = (log_s0, log_s1);
    }
    f64::INFINITY
}

/// log(erfc(x)), accurate far into the tail.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 0.0 && x < 25.0 {
        return r.ln();
    }
    // The Laurent series of log(erfc(x)) at infinity (as dp-accounting's fallback).
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
        - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without sampling, the Gaussian mechanism's RDP is α/(2z²): T rounds at z give
    /// `min_α Tα/(2z²) + log(1 − 1/α) − log(δα)/(α − 1)`.
    #[test]
    fn full_participation_is_the_gaussian_closed_form() {
        let mut a = Accountant::default();
        a.compose_gaussian(1.0, 2.0, 10);
        for (&o, &r) in default_orders().iter().zip(a.rdp()) {
            assert!((r - 10.0 * o / 8.0).abs() < 1e-9);
        }
        let (eps, order) = a.epsilon(1e-5);
        let by_hand = default_orders()
            .into_iter()
            .filter(|&o| o > 1.01)
            .map(|o| 10.0 * o / 8.0 + (-1.0 / o).ln_1p() - (1e-5 * o).ln() / (o - 1.0))
            .fold(f64::INFINITY, f64::min);
        assert!(
            (eps - by_hand).abs() < 1e-12,
            "{eps} vs {by_hand} at {order}"
        );
    }

    /// Sampling only helps, and more noise, fewer rounds or a larger δ give a smaller ε.
    #[test]
    fn epsilon_moves_the_right_way() {
        let eps = |q: f64, z: f64, t: u64, d: f64| {
            let mut a = Accountant::default();
            a.compose_gaussian(q, z, t);
            a.epsilon(d).0
        };
        let base = eps(0.1, 1.0, 100, 1e-5);
        assert!(eps(0.01, 1.0, 100, 1e-5) < base);
        assert!(eps(1.0, 1.0, 100, 1e-5) > base);
        assert!(eps(0.1, 2.0, 100, 1e-5) < base);
        assert!(eps(0.1, 1.0, 10, 1e-5) < base);
        assert!(eps(0.1, 1.0, 100, 1e-3) < base);
        assert_eq!(eps(0.0, 1.0, 100, 1e-5), 0.0);
        assert_eq!(Accountant::default().epsilon(1e-5).0, 0.0);
    }

    /// Two values from dp-accounting 0.6.0 (`RdpAccountant`, `PoissonSampledDpEvent(q,
    /// GaussianDpEvent(z))` composed T times); the test suite checks a whole grid against
    /// the package itself.
    #[test]
    fn agrees_with_dp_accounting_on_known_points() {
        for (q, z, t, delta, want) in [
            (0.01, 1.1, 1000, 1e-5, 1.711770),
            (1.0, 1.0, 10, 1e-5, 19.053598),
        ] {
            let mut a = Accountant::default();
            a.compose_gaussian(q, z, t);
            let eps = a.epsilon(delta).0;
            assert!((eps - want).abs() / want < 1e-3, "{eps} vs {want}");
        }
    }

    #[test]
    fn calibration_finds_the_multiplier_that_meets_the_target() {
        let z = calibrate(3.0, 1e-5, 0.1, 200).unwrap();
        let eps = |z| {
            let mut a = Accountant::default();
            a.compose_gaussian(0.1, z, 200);
            a.epsilon(1e-5).0
        };
        assert!(eps(z) <= 3.0 && eps(z * 0.99) > 3.0, "z = {z}");
        assert!(calibrate(1e-9, 1e-5, 1.0, 1000).is_none());
    }

    /// Many participants' discrete Gaussians with large σ add up to the continuous Gaussian's
    /// guarantee: multiplier √n σ / Δ.
    #[test]
    fn distributed_discrete_gaussian_tends_to_the_gaussian() {
        let z = distributed_noise_multiplier(1000.0, 10, 2000.0, 100_000);
        assert!((z - 10f64.sqrt() / 2.0).abs() < 1e-9, "{z}");
        // With σ below one unit, the discreteness costs privacy.
        assert!(distributed_noise_multiplier(0.3, 10, 1.0, 100_000) < 10f64.sqrt() * 0.3);
    }
}
