//! Exact negacyclic products `A · s mod (X^N + 1, 2^64)` of a u64 polynomial with a binary
//! key, by FFT.
//!
//! tfhe-rs multiplies polynomials in `encrypt_seeded_glwe_ciphertext_list` with an exact
//! integer algorithm (Karatsuba), which dominates encryption time. Here `A` is cut into four
//! 16-bit limbs; each limb's product with a binary key has coefficients below
//! `2^16 · N ≤ 2^28` in magnitude, so the double-precision FFT (tfhe-rs's own, `tfhe-fft`)
//! computes it with an error far below 1/2 and rounding recovers it exactly. The four limb
//! products are shifted and added modulo 2^64. The key is transformed once per round.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dyn_stack::{PodBuffer, PodStack, StackReq};
use tfhe_fft::c64;
use tfhe_fft::unordered::{Method, Plan};

/// A negacyclic FFT of real polynomials of size `n` (as `n / 2` complex points).
pub(crate) struct NegacyclicFft {
    n: usize,
    plan: Plan,
    /// exp(iπj/n), j < n/2.
    twist: Vec<c64>,
}

/// The FFT for size `n`, planned once per process.
pub(crate) fn fft_for(n: usize) -> Arc<NegacyclicFft> {
    static PLANS: OnceLock<Mutex<BTreeMap<usize, Arc<NegacyclicFft>>>> = OnceLock::new();
    let mut plans = PLANS
        .get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .expect("FFT plan cache lock");
    plans
        .entry(n)
        .or_insert_with(|| {
            let half = n / 2;
            let twist = (0..half)
                .map(|j| {
                    let a = std::f64::consts::PI * j as f64 / n as f64;
                    c64::new(a.cos(), a.sin())
                })
                .collect();
            Arc::new(NegacyclicFft {
                n,
                plan: Plan::new(half, Method::Measure(Duration::from_millis(2))),
                twist,
            })
        })
        .clone()
}

/// One thread's scratch space for [`NegacyclicFft`].
pub(crate) struct Scratch {
    buf: PodBuffer,
    fourier: Vec<c64>,
    limbs: Vec<i64>,
}

impl NegacyclicFft {
    pub(crate) fn scratch(&self) -> Scratch {
        Scratch {
            buf: PodBuffer::new(StackReq::any_of(&[
                self.plan.fft_scratch(),
                self.plan.fft_scratch(),
            ])),
            fourier: vec![c64::new(0.0, 0.0); self.n / 2],
            limbs: vec![0; self.n],
        }
    }

    fn forward(&self, out: &mut [c64], value: impl Fn(usize) -> f64, buf: &mut PodBuffer) {
        let half = self.n / 2;
        for (j, (o, t)) in out.iter_mut().zip(&self.twist).enumerate() {
            *o = c64::new(value(j), value(j + half)) * *t;
        }
        self.plan.fwd(out, PodStack::new(buf));
    }

    /// The key's transform (values 0 or 1).
    pub(crate) fn key(&self, key: &[u64]) -> Vec<c64> {
        let mut out = vec![c64::new(0.0, 0.0); self.n / 2];
        let mut buf = PodBuffer::new(self.plan.fft_scratch());
        self.forward(&mut out, |j| key[j] as f64, &mut buf);
        out
    }

    /// `out += A · s` (wrapping), where `key_hat` is [`Self::key`] of the binary key `s`.
    pub(crate) fn add_product(&self, out: &mut [u64], a: &[u64], key_hat: &[c64], s: &mut Scratch) {
        let half = self.n / 2;
        let scale = 1.0 / half as f64;
        for limb in 0..4 {
            let shift = 16 * limb;
            self.forward(
                &mut s.fourier,
                // Below 2^16: the i32 conversion is a single instruction, u64's is not.
                |j| ((a[j] >> shift) & 0xffff) as i32 as f64,
                &mut s.buf,
            );
            for (f, k) in s.fourier.iter_mut().zip(key_hat) {
                *f *= *k;
            }
            self.plan.inv(&mut s.fourier, PodStack::new(&mut s.buf));
            for (j, (f, t)) in s.fourier.iter().zip(&self.twist).enumerate() {
                let v = *f * t.conj() * scale;
                s.limbs[j] = round(v.re);
                s.limbs[j + half] = round(v.im);
            }
            for (o, &l) in out.iter_mut().zip(&s.limbs) {
                *o = o.wrapping_add((l as u64).wrapping_shl(shift));
            }
        }
    }
}

/// A general (not binary) u64 polynomial prepared for [`NegacyclicFft::add_product_general`]:
/// the transforms of its four 16-bit limbs.
pub(crate) struct LimbsHat(Vec<Vec<c64>>);

impl NegacyclicFft {
    /// Transforms of the 16-bit limbs of `r`.
    pub(crate) fn limbs(&self, r: &[u64]) -> LimbsHat {
        let mut buf = PodBuffer::new(self.plan.fft_scratch());
        LimbsHat(
            (0..4)
                .map(|limb| {
                    let mut out = vec![c64::new(0.0, 0.0); self.n / 2];
                    self.forward(
                        &mut out,
                        |j| ((r[j] >> (16 * limb)) & 0xffff) as i32 as f64,
                        &mut buf,
                    );
                    out
                })
                .collect(),
        )
    }

    /// `out += A · R` (wrapping) for any u64 polynomial `R` given by [`Self::limbs`].
    ///
    /// With 16-bit limbs `A = Σ a_i 2^(16i)`, `R = Σ r_j 2^(16j)`, only the products with
    /// `i + j ≤ 3` survive modulo 2^64. They are summed per `k = i + j` in the Fourier domain:
    /// each sum has coefficients below 4 · 2^32 · N ≤ 2^45, which double precision still
    /// rounds back exactly (the FFT's error there is a few hundredths).
    pub(crate) fn add_product_general(
        &self,
        out: &mut [u64],
        a: &[u64],
        r_hat: &LimbsHat,
        s: &mut Scratch,
    ) {
        let half = self.n / 2;
        let scale = 1.0 / half as f64;
        let mut a_hat: Vec<Vec<c64>> = Vec::with_capacity(4);
        for limb in 0..4 {
            let mut f = vec![c64::new(0.0, 0.0); half];
            self.forward(
                &mut f,
                |j| ((a[j] >> (16 * limb)) & 0xffff) as i32 as f64,
                &mut s.buf,
            );
            a_hat.push(f);
        }
        for k in 0..4usize {
            for f in s.fourier.iter_mut() {
                *f = c64::new(0.0, 0.0);
            }
            for (i, ai) in a_hat.iter().enumerate().take(k + 1) {
                let rj = &r_hat.0[k - i];
                for ((f, x), y) in s.fourier.iter_mut().zip(ai).zip(rj) {
                    *f += *x * *y;
                }
            }
            self.plan.inv(&mut s.fourier, PodStack::new(&mut s.buf));
            for (j, (f, t)) in s.fourier.iter().zip(&self.twist).enumerate() {
                let v = *f * t.conj() * scale;
                s.limbs[j] = round(v.re);
                s.limbs[j + half] = round(v.im);
            }
            let shift = 16 * k as u32;
            for (o, &l) in out.iter_mut().zip(&s.limbs) {
                *o = o.wrapping_add((l as u64).wrapping_shl(shift));
            }
        }
    }
}

/// Nearest integer of `x`, |x| < 2^51, without a libm call (`f64::round` is one on the
/// baseline x86-64 target): adding 1.5 · 2^52 leaves no fractional bits, so the addition
/// itself rounds.
#[inline(always)]
fn round(x: f64) -> i64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    ((x + MAGIC) - MAGIC) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::ChaCha8Rng;
    use rand::{Rng, SeedableRng};
    use tfhe::core_crypto::algorithms::polynomial_algorithms::polynomial_wrapping_add_mul_assign;
    use tfhe::core_crypto::prelude::*;

    #[test]
    fn general_products_are_exact_against_tfhe_rs() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for n in [256usize, 2048] {
            let fft = fft_for(n);
            let mut scratch = fft.scratch();
            for case in 0..6 {
                let a: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
                // Uniform values, and the worst case for magnitudes: every limb 0xffff.
                let r: Vec<u64> = if case == 0 {
                    vec![u64::MAX; n]
                } else {
                    (0..n).map(|_| rng.next_u64()).collect()
                };
                let a = if case == 0 { vec![u64::MAX; n] } else { a };
                let mut fast = vec![0u64; n];
                fft.add_product_general(&mut fast, &a, &fft.limbs(&r), &mut scratch);
                let mut exact = Polynomial::new(0u64, PolynomialSize(n));
                polynomial_wrapping_add_mul_assign(
                    &mut exact,
                    &Polynomial::from_container(a.as_slice()),
                    &Polynomial::from_container(r.as_slice()),
                );
                assert_eq!(fast, exact.into_container(), "N = {n}, case {case}");
            }
        }
    }

    #[test]
    fn rounding_without_libm_is_exact_near_integers() {
        for k in [-(1i64 << 30), -3, -1, 0, 1, 2, 1 << 29] {
            for e in [-0.49, -0.1, 0.0, 0.1, 0.49] {
                assert_eq!(round(k as f64 + e), k, "{k} + {e}");
            }
        }
    }

    #[test]
    fn products_are_exact_against_tfhe_rs() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for n in [256usize, 2048] {
            let fft = fft_for(n);
            let mut scratch = fft.scratch();
            for _ in 0..5 {
                let a: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
                let s: Vec<u64> = (0..n).map(|_| rng.next_u64() & 1).collect();
                let mut fast = vec![0u64; n];
                fft.add_product(&mut fast, &a, &fft.key(&s), &mut scratch);
                let mut exact = Polynomial::new(0u64, PolynomialSize(n));
                polynomial_wrapping_add_mul_assign(
                    &mut exact,
                    &Polynomial::from_container(a.as_slice()),
                    &Polynomial::from_container(s.as_slice()),
                );
                assert_eq!(fast, exact.into_container(), "N = {n}");
            }
        }
    }
}
