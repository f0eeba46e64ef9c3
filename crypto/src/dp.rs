//! Distributed differential privacy inside secure aggregation: each participant adds discrete
//! Gaussian noise to its encoded update, in the integers the GLWE plaintext carries, so that
//! the decrypted sum over at least T_min participants carries the job's noise and no party,
//! the coordinator and the committee included, ever sees a less noised value.
//!
//! The sampler is Canonne, Kamath and Steinke's ("The Discrete Gaussian for Differential
//! Privacy", 2020, Algorithms 1–3): a discrete Laplace proposal accepted with probability
//! `exp(−(|Y| − σ²/t)²/(2σ²))`. The Bernoulli trials use `f64` probabilities rather than the
//! paper's exact rational arithmetic, and the sampler is not constant-time.

use rand::{Rng, RngExt};

use crate::codec::Codec;

/// Bernoulli(exp(−γ)), γ ≥ 0.
fn bernoulli_exp(gamma: f64, rng: &mut impl Rng) -> bool {
    rng.random::<f64>() < (-gamma).exp()
}

/// Discrete Laplace with scale `t` (≥ 1): P(x) ∝ exp(−|x|/t).
fn discrete_laplace(t: u64, rng: &mut impl Rng) -> i64 {
    let tf = t as f64;
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp(u as f64 / tf, rng) {
            continue;
        }
        let mut v = 0u64;
        while bernoulli_exp(1.0, rng) {
            v += 1;
        }
        let x = (u + t * v) as i64;
        let negative = rng.random::<bool>();
        if negative && x == 0 {
            continue;
        }
        return if negative { -x } else { x };
    }
}

/// One draw of the discrete Gaussian N_Z(0, σ²): P(x) ∝ exp(−x²/(2σ²)) over the integers.
/// σ = 0 gives 0.
pub fn discrete_gaussian(sigma: f64, rng: &mut impl Rng) -> i64 {
    if sigma <= 0.0 {
        return 0;
    }
    let t = sigma.floor() as u64 + 1;
    let s2 = sigma * sigma;
    loop {
        let y = discrete_laplace(t, rng);
        let g = (y.unsigned_abs() as f64 - s2 / t as f64).powi(2) / (2.0 * s2);
        if bernoulli_exp(g, rng) {
            return y;
        }
    }
}

/// The messages a participant encrypts under distributed DP: each value encoded by `codec`
/// (the update was clipped in L2 beforehand, to at most the codec's per-value clip, so no
/// value is clipped again), plus discrete Gaussian noise of standard deviation
/// `stddev · 2^frac_bits` in message units. The sum wraps like the plaintext space does
/// (modulo 2^64 once scaled), so the decrypted total is the exact sum of everyone's noised
/// messages as long as the job's capacity check holds. `stddev` 0 gives the encoding alone
/// and draws nothing from `rng`.
pub fn noised_messages(codec: &Codec, update: &[f32], stddev: f64, rng: &mut impl Rng) -> Vec<i64> {
    let sigma = stddev * (1u64 << codec.frac_bits) as f64;
    update
        .iter()
        .map(|&x| codec.encode(x).wrapping_add(discrete_gaussian(sigma, rng)))
        .collect()
}

/// The noise generator of a simulated participant, from its per-round training seed: a
/// simulation's noise is reproducible (and the same in every engine). A deployed participant
/// draws its noise from the operating system instead: anyone who knows a seed could remove
/// the noise it made.
pub fn simulation_noise_rng(training_seed: u64) -> rand::rngs::ChaCha20Rng {
    use rand::SeedableRng;
    rand::rngs::ChaCha20Rng::seed_from_u64(training_seed ^ 0x00d1_ffe7_e1a1_005e)
}

/// Per-value messages' L2 norm after encoding can exceed the update's by the rounding of each
/// value, at most half a unit each: the sensitivity of the sum of `d`-value updates clipped to
/// `clip_norm`, in the update's units.
pub fn encoded_sensitivity(clip_norm: f64, d: usize, codec: &Codec) -> f64 {
    clip_norm + (d as f64).sqrt() / (1u64 << (codec.frac_bits + 1)) as f64
}

/// The L2 sensitivity of a round's sum of `d`-value updates clipped to `clip_norm`, with
/// adaptive clipping's `indicator` value appended when there is one: what the noise is sized
/// from, and what a participant checks the noise it is asked for against.
pub fn round_sensitivity(clip_norm: f64, d: usize, codec: &Codec, indicator: Option<f64>) -> f64 {
    encoded_sensitivity(clip_norm, d, codec).hypot(indicator.unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha20Rng;

    #[test]
    fn discrete_gaussian_has_the_right_mean_and_variance() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for sigma in [0.7, 3.0, 40.0, 5000.0] {
            let n = 40_000;
            let xs: Vec<f64> = (0..n)
                .map(|_| discrete_gaussian(sigma, &mut rng) as f64)
                .collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            // The discrete Gaussian's variance is below σ² (by a hair once σ ≥ 1); the sample
            // variance's standard error is σ²·√(2/n) ≈ 0.7%.
            let want = if sigma < 1.0 {
                // Σ x² e^{−x²/2σ²} / Σ e^{−x²/2σ²}, summed directly.
                let w = |x: f64| (-x * x / (2.0 * sigma * sigma)).exp();
                let (num, den) = (-50..=50).fold((0.0, 0.0), |(a, b), x| {
                    let x = x as f64;
                    (a + x * x * w(x), b + w(x))
                });
                num / den
            } else {
                sigma * sigma
            };
            assert!(
                (var / want - 1.0).abs() < 0.035,
                "σ {sigma}: variance {var} vs {want}"
            );
            assert!(
                mean.abs() < 4.0 * sigma / (n as f64).sqrt(),
                "σ {sigma}: mean {mean}"
            );
            // Symmetric and integer, and the tails are Gaussian: nothing beyond 7σ.
            assert!(xs.iter().all(|x| x.abs() <= 7.0 * sigma + 1.0));
        }
        assert_eq!(discrete_gaussian(0.0, &mut rng), 0);
    }

    #[test]
    fn noised_messages_are_the_encoding_plus_integer_noise() {
        let codec = Codec::default();
        let update = [0.25f32, -1.0, 0.0];
        let mut a = ChaCha20Rng::seed_from_u64(1);
        let m = noised_messages(&codec, &update, 0.01, &mut a);
        let mut b = ChaCha20Rng::seed_from_u64(1);
        for (i, &x) in update.iter().enumerate() {
            let noise = discrete_gaussian(0.01 * 65536.0, &mut b);
            assert_eq!(m[i], codec.encode(x) + noise);
        }
        assert_eq!(
            noised_messages(&codec, &update, 0.0, &mut a),
            update.map(|x| codec.encode(x))
        );
        let s = encoded_sensitivity(1.0, 1 << 16, &codec);
        assert!((s - (1.0 + 256.0 / 131072.0)).abs() < 1e-12);
    }
}
