//! The parameters every party agrees on, without tfhe-rs: GLWE sizes and noise, the round
//! seed, and how bodies travel. (tfhe-rs itself is behind the default `he` feature.)

use crate::codec::NoiseBudget;

/// GLWE parameters (docs/secure-aggregation.md: k = 1, N = 2048, q = 2^64, T-uniform(17) noise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlweParams {
    pub polynomial_size: usize,
    pub noise_log2: u32,
    pub smudging_log2: u32,
}

impl Default for GlweParams {
    fn default() -> Self {
        GlweParams {
            polynomial_size: 2048,
            noise_log2: 17,
            smudging_log2: 20,
        }
    }
}

impl GlweParams {
    /// Ciphertexts (polynomials) needed for `len` values.
    pub fn ciphertexts(&self, len: usize) -> usize {
        len.div_ceil(self.polynomial_size).max(1)
    }

    /// The noise budget of a round whose decryption adds `shares` decryption shares.
    pub fn budget(&self, shares: usize) -> NoiseBudget {
        NoiseBudget {
            encryption_log2: self.noise_log2,
            smudging_log2: self.smudging_log2,
            shares,
            dropped_bits: BODY_DROPPED_BITS,
        }
    }
}

/// The 128-bit seed of a round's common mask. Unique per (federation, job, round, attempt);
/// a participant must never encrypt twice under one seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoundSeed(pub u128);

/// Low bits of each body that are rounded away before it is sent (they hold only noise): a
/// body travels as its top 48 bits, 6 bytes, 1.5× an f32. The rounding error, at most 2^15
/// per body, is part of the noise budget ([`NoiseBudget::dropped_bits`]).
pub const BODY_DROPPED_BITS: u32 = 16;

/// Rounds `b` to the nearest multiple of 2^[`BODY_DROPPED_BITS`] (modulo 2^64).
#[inline]
pub fn round_body(b: u64) -> u64 {
    b.wrapping_add(1 << (BODY_DROPPED_BITS - 1)) & !((1u64 << BODY_DROPPED_BITS) - 1)
}
