//! Fixed-point encoding of model updates into the GLWE plaintext space, and the capacity
//! check that refuses configurations whose sums or noise could overflow.
//!
//! A value `x` is clipped to `[-clip, clip]` and encoded as `m = round(x · 2^frac_bits)`; the
//! plaintext is `m · Δ` with `Δ = 2^delta_log`, in Z/2^64. A weighted sum `Σ w_i m_i` decodes
//! exactly as long as it stays below `2^(63 − delta_log)` in magnitude and the total noise
//! stays below `Δ / 2`.

use crate::CryptoError;

/// How updates are encoded and how much they may add up to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// log2 of Δ, the scale of messages in the 64-bit plaintext.
    pub delta_log: u32,
    /// Fractional bits of the fixed-point encoding.
    pub frac_bits: u32,
    /// Per-coordinate bound B: values are clipped to [-B, B].
    pub clip: f32,
    /// Largest total weight W = Σ w_i a round may aggregate.
    pub max_total_weight: u64,
}

impl Default for Codec {
    /// The defaults of docs/secure-aggregation.md: δ = 31, f = 16, B = 32, W ≤ 1024.
    fn default() -> Self {
        Codec {
            delta_log: 31,
            frac_bits: 16,
            clip: 32.0,
            max_total_weight: 1024,
        }
    }
}

/// The noise the decryption must absorb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseBudget {
    /// Encryption noise per coefficient is at most 2^this (T-uniform).
    pub encryption_log2: u32,
    /// Smudging noise per coefficient per decryption share is at most 2^this.
    pub smudging_log2: u32,
    /// Decryption shares added up (pieces of the replicated sharing).
    pub shares: usize,
    /// Low bits of every body rounded away before sending: each body then errs by at most
    /// 2^(dropped_bits − 1), weighted like the encryption noise.
    pub dropped_bits: u32,
}

impl Codec {
    /// Largest |m| a single clipped value encodes to.
    pub fn max_message(&self) -> u64 {
        (self.clip as f64 * (1u64 << self.frac_bits) as f64).round() as u64
    }

    /// Refuses a configuration that could overflow, naming the bound it breaks.
    pub fn check(&self, noise: &NoiseBudget) -> Result<(), CryptoError> {
        let refuse = |m: String| Err(CryptoError::Capacity(m));
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return refuse(format!(
                "clip must be positive and finite, not {}",
                self.clip
            ));
        }
        if self.delta_log == 0 || self.delta_log >= 63 {
            return refuse(format!(
                "delta_log must be in 1..63, not {}",
                self.delta_log
            ));
        }
        if self.frac_bits > 30 {
            return refuse(format!("frac_bits {} is more than 30", self.frac_bits));
        }
        if self.max_total_weight == 0 {
            return refuse("max_total_weight must be at least 1".into());
        }
        // |Σ w_i m_i| ≤ W · max|m| must stay below 2^(63 − δ).
        let sum_bound = self.max_total_weight as u128 * self.max_message() as u128;
        let sum_limit = 1u128 << (63 - self.delta_log);
        if sum_bound >= sum_limit {
            return refuse(format!(
                "weighted sums can reach W·B·2^f = {} · {} · 2^{} = {sum_bound}, \
                 not below 2^(63 − δ) = 2^{} = {sum_limit}: lower clip, frac_bits, \
                 max_total_weight or delta_log",
                self.max_total_weight,
                self.clip,
                self.frac_bits,
                63 - self.delta_log
            ));
        }
        // Total noise W · (2^e + 2^(d−1)) + shares · 2^s must stay below Δ / 2.
        let rounding = if noise.dropped_bits == 0 {
            0
        } else {
            1u128 << (noise.dropped_bits - 1)
        };
        let noise_bound = self.max_total_weight as u128
            * ((1u128 << noise.encryption_log2) + rounding)
            + noise.shares as u128 * (1u128 << noise.smudging_log2);
        let noise_limit = 1u128 << (self.delta_log - 1);
        if noise_bound >= noise_limit {
            return refuse(format!(
                "noise can reach W·(2^{} + {rounding}) + {}·2^{} = {noise_bound}, not below Δ/2 = 2^{} = \
                 {noise_limit}: raise delta_log or lower max_total_weight",
                noise.encryption_log2,
                noise.shares,
                noise.smudging_log2,
                self.delta_log - 1
            ));
        }
        Ok(())
    }

    /// A codec for rounds whose weights add up to at most `max_total_weight`: the default
    /// encoding when that fits; otherwise, keeping at least 12 fractional bits if any
    /// encoding can (8 otherwise), the smallest Δ whose noise margin holds that weight, with
    /// the widest clip range (32, 8, then 2) and then the most fractional bits (up to the
    /// default's 16) its sums leave room for. Larger rounds trade per-value
    /// precision for capacity; [`Codec::check`] proves the result cannot overflow. Refuses a
    /// weight no encoding carries.
    pub fn for_total_weight(
        max_total_weight: u64,
        noise: &NoiseBudget,
    ) -> Result<Codec, CryptoError> {
        let d = Codec {
            max_total_weight,
            ..Codec::default()
        };
        if d.check(noise).is_ok() {
            return Ok(d);
        }
        // Precision first (12 fractional bits or more), then range.
        for min_frac in [12, 8] {
            for delta_log in d.delta_log..62 {
                for clip in [32.0, 8.0, 2.0] {
                    for frac_bits in (min_frac..=d.frac_bits).rev() {
                        let c = Codec {
                            delta_log,
                            frac_bits,
                            clip,
                            max_total_weight,
                        };
                        if c.check(noise).is_ok() {
                            return Ok(c);
                        }
                    }
                }
            }
        }
        Err(CryptoError::Capacity(format!(
            "no encoding carries sums of total weight {max_total_weight} with at least 8 \
             fractional bits in a 64-bit plaintext"
        )))
    }

    /// Fixed-point message of one value (clipped).
    pub fn encode(&self, x: f32) -> i64 {
        let x = if x.is_nan() {
            0.0
        } else {
            x.clamp(-self.clip, self.clip)
        };
        round_half_away(x as f64 * (1u64 << self.frac_bits) as f64)
    }

    /// Plaintext `m · Δ` of a message.
    pub fn plaintext(&self, m: i64) -> u64 {
        (m as u64).wrapping_shl(self.delta_log)
    }

    /// Rounds a decrypted coefficient to the nearest multiple of Δ and returns the signed
    /// message it carries.
    pub fn message(&self, coefficient: u64) -> i64 {
        let half = 1u64 << (self.delta_log - 1);
        (coefficient.wrapping_add(half) as i64) >> self.delta_log
    }

    /// The mean of the values behind a weighted message sum `Σ w_i m_i` with `Σ w_i = W`.
    pub fn mean(&self, sum: i64, total_weight: u64) -> f32 {
        (sum as f64 / ((1u64 << self.frac_bits) as f64 * total_weight as f64)) as f32
    }
}

/// `y.round() as i64` (halves away from zero) without a libm call on a plain x86-64 target,
/// for `|y| < 2^52`: the cast truncates toward zero, and `y − trunc(y)` is exact.
fn round_half_away(y: f64) -> i64 {
    let t = y as i64;
    let r = y - t as f64;
    if r >= 0.5 {
        t + 1
    } else if r <= -0.5 {
        t - 1
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_f64_round_bit_for_bit() {
        let mut edge = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.49999999999999994,
            -0.49999999999999994,
            4503599627370495.5,
            -4503599627370495.5,
            2097152.5,
            1e15 + 0.5,
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x as f64 / u64::MAX as f64 - 0.5) * 2f64.powi((x % 40) as i32);
            edge.push(v);
            edge.push(v.floor() + 0.5);
        }
        for y in edge {
            assert_eq!(round_half_away(y), y.round() as i64, "{y:?}");
        }
    }

    fn budget() -> NoiseBudget {
        NoiseBudget {
            encryption_log2: 17,
            smudging_log2: 20,
            shares: 10,
            dropped_bits: 16,
        }
    }

    #[test]
    fn default_fits() {
        Codec::default().check(&budget()).unwrap();
    }

    #[test]
    fn larger_rounds_get_a_codec_that_provably_fits() {
        assert_eq!(
            Codec::for_total_weight(1024, &budget()).unwrap(),
            Codec::default()
        );
        let mut last = Codec::default();
        for w in [2048u64, 20_000, 200_000] {
            let c = Codec::for_total_weight(w, &budget()).unwrap();
            c.check(&budget()).unwrap();
            assert_eq!(c.max_total_weight, w);
            assert!(c.frac_bits >= 8);
            // More weight never buys range or precision back.
            assert!(
                c.max_message() <= last.max_message() && c.delta_log >= last.delta_log,
                "{w}: {c:?} after {last:?}"
            );
            // A sum of W values at the clip bound decodes exactly.
            let m = c.encode(c.clip);
            let sum = (m as i128 * w as i128) as i64;
            assert_eq!(c.message(c.plaintext(sum)), sum, "{w}");
            last = c;
        }
        // 20,000 participants of weight 1 each, with room: about four decimal digits a value.
        let c = Codec::for_total_weight(20_000, &budget()).unwrap();
        assert!(c.frac_bits >= 12, "{c:?}");
        assert!(Codec::for_total_weight(1 << 20, &budget()).is_err());
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let c = Codec::default();
        for x in [0.0f32, 1.5, -2.25, 31.99, -32.0, 1e-5] {
            let m = c.encode(x);
            let back = c.mean(c.message(c.plaintext(m)), 1);
            assert!((back - x).abs() <= 0.5 / 65536.0, "{x} -> {back}");
        }
        assert_eq!(c.encode(100.0), c.encode(32.0), "clipped");
        assert_eq!(c.encode(f32::NAN), 0);
        // Noise below Δ/2 is rounded away, either sign.
        let p = c.plaintext(-7);
        assert_eq!(c.message(p.wrapping_add((1 << 30) - 1)), -7);
        assert_eq!(c.message(p.wrapping_sub((1 << 30) - 1)), -7);
    }

    #[test]
    fn capacity_edge_and_refusal() {
        // B · 2^f = 2^21, so W may be at most 2^11 − 1 with δ = 31 (sums below 2^32) — but the
        // noise bound W · 2^17 + 10 · 2^20 < 2^30 allows W < 2^13 − 80: the sum bound binds.
        let at_edge = Codec {
            max_total_weight: (1 << 11) - 1,
            ..Codec::default()
        };
        at_edge.check(&budget()).unwrap();
        let over = Codec {
            max_total_weight: 1 << 11,
            ..Codec::default()
        };
        let e = over.check(&budget()).unwrap_err().to_string();
        assert!(e.contains("2^(63 − δ)") && e.contains("2^32"), "{e}");
        let noisy = Codec {
            delta_log: 24,
            clip: 1.0,
            ..Codec::default()
        };
        let e = noisy.check(&budget()).unwrap_err().to_string();
        assert!(e.contains("Δ/2"), "{e}");
    }
}
