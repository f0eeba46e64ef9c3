//! Exact sums of large or fractional values through secure aggregation, for a federation's
//! statistics (counts, sums, sums of squares) rather than model updates.
//!
//! The update codec carries values within ±B at `f` fractional bits, and decodes a weighted
//! mean. Statistics need exact sums of values of any size. So each value becomes a
//! fixed-point integer `S = round(v · 2^F)`, split into `L` signed digits of `k` bits
//! (`S = Σ_j d_j · 2^(k·j)`, each `d_j` in [−2^(k−1), 2^(k−1))); each digit travels as one
//! update value `d_j / 2^f`, which the codec encodes back to exactly `d_j`; every participant
//! has weight 1; and the decrypted integer sums of the digits ([`crate::decode_sums`])
//! recombine into `Σ_i S_i` exactly, in 128-bit arithmetic. The coordinator and the
//! committee see only the sums of the digits, never a participant's own.

use crate::CryptoError;
use crate::codec::Codec;

/// How statistics are split into digits for one codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigitCodec {
    /// Fixed-point fractional bits of the values (F).
    pub frac_bits: u32,
    /// Bits per digit (k).
    pub digit_bits: u32,
    /// Digits per value (L).
    pub digits: usize,
}

/// Statistics' range: magnitudes below 2^80 (sums of squares of large values over many
/// rows fit) at 2^-32 resolution (the sums of squares of small values keep their digits).
const STATISTICS_MAX_LOG2: i32 = 80;
const STATISTICS_FRAC_BITS: u32 = 32;

impl DigitCodec {
    /// The digits every party uses for a federation's statistics under `codec`: magnitudes
    /// up to 2^80 at 32 fractional bits (6 digits a value under the default codec).
    pub fn for_statistics(codec: &Codec) -> Result<DigitCodec, CryptoError> {
        DigitCodec::new(codec, 2f64.powi(STATISTICS_MAX_LOG2), STATISTICS_FRAC_BITS)
    }

    /// Update values that carry `n` statistics.
    pub fn len_for(&self, n: usize) -> usize {
        n * self.digits
    }

    /// Digits for values up to `max_abs` in magnitude at `frac_bits` fractional bits, as
    /// large as `codec` carries exactly: a digit `d` travels as `d / 2^f`, within ±B, so
    /// k − 1 ≤ f + log2 B (and below f32's 24-bit mantissa). The codec's capacity check
    /// already bounds a round's sum of digits (every participant has weight 1).
    pub fn new(codec: &Codec, max_abs: f64, frac_bits: u32) -> Result<DigitCodec, CryptoError> {
        let clip_bits = codec.clip.log2().floor();
        if !(max_abs.is_finite() && max_abs > 0.0) || clip_bits < 1.0 {
            return Err(CryptoError::Capacity(format!(
                "exact sums need a positive, finite bound (got {max_abs}) and a clip of at \
                 least 2 (got {})",
                codec.clip
            )));
        }
        let digit_bits = (codec.frac_bits + clip_bits as u32).min(23) + 1;
        // The magnitude's bits, a bit of margin for balanced digits, and the sign.
        let value_bits = (max_abs.log2().ceil().max(0.0) as u32 + 2) + frac_bits + 1;
        if value_bits > 120 {
            return Err(CryptoError::Capacity(format!(
                "values up to {max_abs} at {frac_bits} fractional bits need {value_bits} bits; \
                 at most 120 fit"
            )));
        }
        Ok(DigitCodec {
            frac_bits,
            digit_bits,
            digits: value_bits.div_ceil(digit_bits) as usize,
        })
    }

    /// The update values that carry `values`: `digits` per value, value after value.
    /// Refuses a value that is not finite or beyond what the digits carry (at least the
    /// bound they were sized for).
    pub fn encode(&self, values: &[f64], codec: &Codec) -> Result<Vec<f32>, CryptoError> {
        let k = self.digit_bits;
        let scale = (1u128 << self.frac_bits) as f64;
        // Balanced digits reach a little less than 2^(kL−1): stay a bit below, and within
        // what a federation's sum of such values keeps in 128 bits.
        let limit = 1i128 << (k * self.digits as u32 - 2).min(116);
        let half = 1i128 << (k - 1);
        let unit = (1u64 << codec.frac_bits) as f32;
        let mut out = Vec::with_capacity(values.len() * self.digits);
        for (i, v) in values.iter().enumerate() {
            let s = (v * scale).round();
            if !s.is_finite() || s.abs() >= limit as f64 {
                return Err(CryptoError::Capacity(format!(
                    "statistic {i} ({v}) is outside the range the digits were sized for"
                )));
            }
            let mut s = s as i128;
            for _ in 0..self.digits {
                // Balanced remainder: d in [−2^(k−1), 2^(k−1)).
                let d = (s + half).rem_euclid(1i128 << k) - half;
                out.push(d as f32 / unit);
                s = (s - d) >> k;
            }
            debug_assert_eq!(s, 0, "the limit leaves no digit over");
        }
        Ok(out)
    }

    /// The exact sums of the values behind the decrypted digit sums ([`crate::decode_sums`]).
    pub fn decode(&self, digit_sums: &[i64]) -> Result<Vec<f64>, CryptoError> {
        if !digit_sums.len().is_multiple_of(self.digits) {
            return Err(CryptoError::Length {
                expected: digit_sums.len().div_ceil(self.digits) * self.digits,
                got: digit_sums.len(),
            });
        }
        let scale = (1u128 << self.frac_bits) as f64;
        digit_sums
            .chunks_exact(self.digits)
            .map(|ds| {
                let mut total = 0i128;
                for (j, &d) in ds.iter().enumerate() {
                    // Sums of digits that no honest values give (a participant sending
                    // digits out of range) can overflow: refused, never wrapped.
                    total = (d as i128)
                        .checked_mul(1i128 << (self.digit_bits as usize * j))
                        .and_then(|v| total.checked_add(v))
                        .ok_or_else(|| {
                            CryptoError::Capacity(
                                "the sum of the statistics overflows 128 bits".into(),
                            )
                        })?;
                }
                Ok(total as f64 / scale)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_carry_any_value_and_their_sums_recombine_exactly() {
        let codec = Codec::default();
        let dc = DigitCodec::new(&codec, 1e12, 8).unwrap();
        assert_eq!(dc.digit_bits, 22);
        let sites: [&[f64]; 3] = [
            &[1.0, -2.5, 999_999_999_999.0, 0.0, 3.0625],
            &[7.0, 1e-3, -123_456_789.25, -0.5, 2.0],
            &[-1.0, 10.0, 1.0, 0.5, -5.125],
        ];
        let mut sums = vec![0i64; 5 * dc.digits];
        for site in sites {
            let x = dc.encode(site, &codec).unwrap();
            for v in &x {
                assert!(v.abs() <= codec.clip, "{v} within the codec's clip");
            }
            // What the codec makes of each travelling value, summed as the encrypted sum is.
            for (s, v) in sums.iter_mut().zip(&x) {
                *s += codec.encode(*v);
            }
        }
        let got = dc.decode(&sums).unwrap();
        for (j, g) in got.iter().enumerate() {
            let want: i128 = sites.iter().map(|s| (s[j] * 256.0).round() as i128).sum();
            assert_eq!(*g, want as f64 / 256.0, "statistic {j}");
        }
        assert!(
            dc.encode(&[1e30], &codec).is_err(),
            "beyond what the digits carry"
        );
        assert!(dc.encode(&[f64::NAN], &codec).is_err());
        assert!(dc.decode(&sums[1..]).is_err());
    }
}
