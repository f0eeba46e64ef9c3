//! Threshold GLWE aggregation on tfhe-rs `core_crypto` (protocol: docs/secure-aggregation.md).
//!
//! Every participant of a round encrypts under its own fresh binary key with the *same*
//! round seed, so all ciphertexts share one mask A, regenerated from the seed by anyone. Only
//! bodies travel: `b_i = ⟨A, s_i⟩ + Δ·m_i + e_i`, 8 bytes per element. The coordinator sums
//! `Σ w_i b_i` without any key. Committee members, who hold replicated pieces of every `s_i`,
//! return `−⟨A, Σ_i w_i r_{i,M}⟩ + smudging` for their assigned pieces M; adding the shares
//! to the sum leaves `Δ · Σ w_i m_i + noise`, which rounds to the exact weighted sum.

use rand::rngs::ChaCha8Rng;
use rand::{Rng, RngExt, SeedableRng};

use sha2::{Digest, Sha256};
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::*;

use crate::CryptoError;
use crate::codec::Codec;
pub use crate::params::{BODY_DROPPED_BITS, GlweParams, RoundSeed, round_body};

/// A participant's single-use binary secret key for one round.
pub struct RoundKey {
    key: GlweSecretKeyOwned<u64>,
}

impl std::fmt::Debug for RoundKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoundKey(..)")
    }
}

fn seed_from(rng: &mut impl Rng) -> Seed {
    Seed(((rng.next_u64() as u128) << 64) | rng.next_u64() as u128)
}

impl RoundKey {
    /// Draws a fresh binary key.
    pub fn generate(params: &GlweParams, rng: &mut impl Rng) -> Self {
        let mut keygen = SecretRandomGenerator::<DefaultRandomGenerator>::new(seed_from(rng));
        RoundKey {
            key: allocate_and_generate_new_binary_glwe_secret_key(
                GlweDimension(1),
                PolynomialSize(params.polynomial_size),
                &mut keygen,
            ),
        }
    }

    /// The key's coefficients, to be shared among the committee.
    pub fn coefficients(&self) -> &[u64] {
        self.key.as_ref()
    }
}

/// Ciphertexts per mask block. Each block's mask comes from its own seed, derived from the
/// round seed and the block's index, so blocks are encrypted (and decryption shares
/// computed) independently and in parallel, with the same result on any number of threads.
pub const BLOCK_CIPHERTEXTS: usize = 16;

fn block_seed(seed: RoundSeed, block: usize) -> CompressionSeed {
    CompressionSeed::from(Seed(block_key(seed, block)))
}

fn block_key(seed: RoundSeed, block: usize) -> u128 {
    let mut h = Sha256::new();
    h.update(b"cohort.v1/mask-block");
    h.update(seed.0.to_le_bytes());
    h.update((block as u64).to_le_bytes());
    let d: [u8; 32] = h.finalize().into();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

/// The masks of a block's first `count` ciphertexts, `n` values each, one after another:
/// exactly what tfhe-rs's seeded decompression draws for them (its default AES-128-CTR
/// generator keyed by the block's seed from counter 0, each value eight bytes
/// little-endian), but computed a whole AES batch at a time instead of a byte at a time,
/// which made mask generation the largest part of encrypting.
fn block_masks(seed: RoundSeed, block: usize, count: usize, n: usize) -> Vec<u64> {
    use tfhe_csprng::generators::aes_ctr::{AES_CALLS_PER_BATCH, Aes128Key, AesBlockCipher};
    use tfhe_csprng::generators::default::DefaultAes128BlockCipher;
    let mut aes =
        DefaultAes128BlockCipher::new(Aes128Key::new(u128::from_le(block_key(seed, block))));
    let mut out = vec![0u64; count * n];
    let per_batch = AES_CALLS_PER_BATCH * 16 / 8;
    for (k, values) in out.chunks_mut(per_batch).enumerate() {
        let first = (k * AES_CALLS_PER_BATCH) as u128;
        let bytes = aes.generate_batch(std::array::from_fn(|i| (first + i as u128).to_le()));
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
    }
    out
}

/// Threads the crypto uses by default: every core of the machine. (Results do not depend
/// on it; [`encrypt_threads`] and [`decryption_share_threads`] take a count instead.)
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `f(block_index, block)` over the `block_len`-sized blocks of `out` on up to
/// `threads` scoped threads (inline when one suffices).
fn par_blocks<F>(out: &mut [u64], block_len: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [u64]) + Sync,
{
    let mut blocks: Vec<(usize, &mut [u64])> = out.chunks_mut(block_len).enumerate().collect();
    let threads = threads.clamp(1, blocks.len().max(1));
    if threads == 1 {
        for (b, chunk) in blocks {
            f(b, chunk);
        }
        return;
    }
    let mut groups: Vec<Vec<(usize, &mut [u64])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, blk) in blocks.drain(..).enumerate() {
        groups[i % threads].push(blk);
    }
    std::thread::scope(|scope| {
        for group in groups {
            let f = &f;
            scope.spawn(move || {
                for (b, chunk) in group {
                    f(b, chunk);
                }
            });
        }
    });
}

/// Encrypts fixed-point messages under `key` with the round's common mask, on
/// [`default_threads`] threads. Returns the bodies as sent, `ciphertexts(len) · N` values
/// (messages padded with zeros), each rounded by [`round_body`].
pub fn encrypt(
    key: &RoundKey,
    seed: RoundSeed,
    messages: &[i64],
    codec: &Codec,
    params: &GlweParams,
    rng: &mut impl Rng,
) -> Vec<u64> {
    encrypt_threads(key, seed, messages, codec, params, rng, default_threads())
}

/// [`encrypt`] on `threads` threads; the bodies do not depend on the thread count.
///
/// The masks are tfhe-rs's own (a seeded GLWE list decompressed from the block's seed, as
/// committee members regenerate them), the noise is T-uniform(2^noise_log2) like tfhe-rs's,
/// and the product `A · s` is computed exactly by FFT (cohort's own `fft` module) instead of tfhe-rs's
/// Karatsuba multiplication, which is what made encryption slow.
pub fn encrypt_threads(
    key: &RoundKey,
    seed: RoundSeed,
    messages: &[i64],
    codec: &Codec,
    params: &GlweParams,
    rng: &mut impl Rng,
    threads: usize,
) -> Vec<u64> {
    let n = params.polynomial_size;
    let count = params.ciphertexts(messages.len());
    let block_len = BLOCK_CIPHERTEXTS * n;
    let noise_seeds: Vec<[u8; 32]> = (0..count.div_ceil(BLOCK_CIPHERTEXTS))
        .map(|_| {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            s
        })
        .collect();
    let fft = crate::fft::fft_for(n);
    let key_hat = fft.key(key.coefficients());
    let mut out = vec![0u64; count * n];
    par_blocks(&mut out, block_len, threads, |b, chunk| {
        let cts = chunk.len() / n;
        let masks = block_masks(seed, b, cts, n);
        let mut noise = NoiseSource::new(
            rand::rngs::ChaCha20Rng::from_seed(noise_seeds[b]),
            params.noise_log2,
        );
        let mut scratch = fft.scratch();
        for j in 0..cts {
            let body = &mut chunk[j * n..(j + 1) * n];
            let first = b * block_len + j * n;
            for (i, v) in body.iter_mut().enumerate() {
                let m = messages.get(first + i).copied().unwrap_or(0);
                *v = codec.plaintext(m).wrapping_add(noise.next() as u64);
            }
            fft.add_product(body, &masks[j * n..(j + 1) * n], &key_hat, &mut scratch);
            for v in body.iter_mut() {
                *v = round_body(*v);
            }
        }
    });
    out
}

/// A T-uniform sample of bound 2^`log2`: uniform on [−2^log2, 2^log2] with the two ends at
/// half weight (tfhe-rs's `TUniform`), from `log2 + 2` uniform bits.
fn t_uniform_of(bits: u64, log2: u32) -> i64 {
    ((bits >> 1) + (bits & 1)) as i64 - (1i64 << log2)
}

/// T-uniform samples, as many from each 64 random bits as whole `log2 + 2`-bit slices fit
/// (three for the default bound 2^17): a third of the generator's work of one a word.
struct NoiseSource<R: Rng> {
    rng: R,
    log2: u32,
    word: u64,
    left: u32,
}

impl<R: Rng> NoiseSource<R> {
    fn new(rng: R, log2: u32) -> Self {
        NoiseSource {
            rng,
            log2,
            word: 0,
            left: 0,
        }
    }

    fn next(&mut self) -> i64 {
        let width = self.log2 + 2;
        if self.left < width {
            self.word = self.rng.next_u64();
            self.left = 64;
        }
        let bits = self.word & ((1u64 << width) - 1);
        self.word >>= width;
        self.left -= width;
        t_uniform_of(bits, self.log2)
    }
}

/// Reference encryption with tfhe-rs's own `encrypt_seeded_glwe_ciphertext_list` (same masks,
/// same noise distribution, Karatsuba products). Kept for benchmarks and tests.
pub fn encrypt_tfhe_threads(
    key: &RoundKey,
    seed: RoundSeed,
    messages: &[i64],
    codec: &Codec,
    params: &GlweParams,
    rng: &mut impl Rng,
    threads: usize,
) -> Vec<u64> {
    let n = params.polynomial_size;
    let count = params.ciphertexts(messages.len());
    let block_len = BLOCK_CIPHERTEXTS * n;
    let noise_seeds: Vec<Seed> = (0..count.div_ceil(BLOCK_CIPHERTEXTS))
        .map(|_| seed_from(rng))
        .collect();
    let mut out = vec![0u64; count * n];
    par_blocks(&mut out, block_len, threads, |b, chunk| {
        let start = (b * block_len).min(messages.len());
        let end = (start + chunk.len()).min(messages.len());
        let mut plain = PlaintextList::new(0u64, PlaintextCount(chunk.len()));
        for (p, &m) in plain.iter_mut().zip(&messages[start..end]) {
            *p.0 = codec.plaintext(m);
        }
        let mut list = SeededGlweCiphertextList::new(
            0u64,
            GlweSize(2),
            PolynomialSize(n),
            GlweCiphertextCount(chunk.len() / n),
            block_seed(seed, b),
            CiphertextModulus::new_native(),
        );
        let mut noise_seeder = DeterministicSeeder::<DefaultRandomGenerator>::new(noise_seeds[b]);
        encrypt_seeded_glwe_ciphertext_list(
            &key.key,
            &mut list,
            &plain,
            TUniform::<u64>::new(params.noise_log2),
            &mut noise_seeder,
        );
        for (c, v) in chunk.iter_mut().zip(list.as_ref()) {
            *c = round_body(*v);
        }
    });
    out
}

/// The coordinator's running sum `Σ w_i · body_i` (wrapping): O(model) memory whatever the
/// number of participants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accumulator {
    sum: Vec<u64>,
    total_weight: u64,
    count: usize,
}

impl Accumulator {
    /// For bodies of `len` values.
    pub fn new(len: usize) -> Self {
        Accumulator {
            sum: vec![0; len],
            total_weight: 0,
            count: 0,
        }
    }

    /// Adds one participant's bodies with weight `w`.
    pub fn add(&mut self, w: u64, bodies: &[u64]) -> Result<(), CryptoError> {
        if bodies.len() != self.sum.len() {
            return Err(CryptoError::Length {
                expected: self.sum.len(),
                got: bodies.len(),
            });
        }
        for (s, b) in self.sum.iter_mut().zip(bodies) {
            *s = s.wrapping_add(b.wrapping_mul(w));
        }
        self.total_weight += w;
        self.count += 1;
        Ok(())
    }

    /// Adds another accumulator's sum (a partial sum over other participants, as a
    /// hierarchical aggregator sends it): the result is what adding each of its
    /// participants here would have given, bit for bit (addition mod 2^64 commutes).
    pub fn add_partial(&mut self, partial: &Accumulator) -> Result<(), CryptoError> {
        if partial.sum.len() != self.sum.len() {
            return Err(CryptoError::Length {
                expected: self.sum.len(),
                got: partial.sum.len(),
            });
        }
        for (s, v) in self.sum.iter_mut().zip(&partial.sum) {
            *s = s.wrapping_add(*v);
        }
        self.total_weight += partial.total_weight;
        self.count += partial.count;
        Ok(())
    }

    /// A partial sum as it arrives from elsewhere: the weighted sum of `count` participants'
    /// bodies, whose weights add up to `total_weight`.
    pub fn from_parts(sum: Vec<u64>, total_weight: u64, count: usize) -> Self {
        Accumulator {
            sum,
            total_weight,
            count,
        }
    }

    /// Adds a committee member's decryption share (it carries no weight).
    pub fn add_share(&mut self, share: &[u64]) -> Result<(), CryptoError> {
        if share.len() != self.sum.len() {
            return Err(CryptoError::Length {
                expected: self.sum.len(),
                got: share.len(),
            });
        }
        for (s, v) in self.sum.iter_mut().zip(share) {
            *s = s.wrapping_add(*v);
        }
        Ok(())
    }

    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Participants added.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn sum(&self) -> &[u64] {
        &self.sum
    }
}

/// A committee member's decryption share for its assigned pieces: `−⟨A, Σ w_i r_i⟩ + e`,
/// where `weighted_pieces` are `(w_i, r_i)` over the manifest's participants and pieces.
/// Runs on [`default_threads`] threads.
pub fn decryption_share(
    weighted_pieces: &[(u64, &[u64])],
    seed: RoundSeed,
    len: usize,
    params: &GlweParams,
    rng: &mut impl Rng,
) -> Result<Vec<u64>, CryptoError> {
    decryption_share_threads(weighted_pieces, seed, len, params, rng, default_threads())
}

/// [`decryption_share`] on `threads` threads.
pub fn decryption_share_threads(
    weighted_pieces: &[(u64, &[u64])],
    seed: RoundSeed,
    len: usize,
    params: &GlweParams,
    rng: &mut impl Rng,
    threads: usize,
) -> Result<Vec<u64>, CryptoError> {
    let n = params.polynomial_size;
    let mut r = vec![0u64; n];
    for (w, piece) in weighted_pieces {
        if piece.len() != n {
            return Err(CryptoError::Length {
                expected: n,
                got: piece.len(),
            });
        }
        for (acc, v) in r.iter_mut().zip(piece.iter()) {
            *acc = acc.wrapping_add(v.wrapping_mul(*w));
        }
    }
    let fft = crate::fft::fft_for(n);
    let r_hat = fft.limbs(&r);
    let count = params.ciphertexts(len);
    let block_len = BLOCK_CIPHERTEXTS * n;
    let smudge_seeds: Vec<u64> = (0..count.div_ceil(BLOCK_CIPHERTEXTS))
        .map(|_| rng.next_u64())
        .collect();
    let bound = 1i64 << params.smudging_log2;
    let mut share = vec![0u64; count * n];
    par_blocks(&mut share, block_len, threads, |b, chunk| {
        // The block's masks, as the participants' encryption drew them.
        let masks = block_masks(seed, b, chunk.len() / n, n);
        let mut scratch = fft.scratch();
        let mut product = vec![0u64; n];
        let mut smudge = ChaCha8Rng::seed_from_u64(smudge_seeds[b]);
        for (j, out) in chunk.chunks_exact_mut(n).enumerate() {
            product.iter_mut().for_each(|v| *v = 0);
            fft.add_product_general(
                &mut product,
                &masks[j * n..(j + 1) * n],
                &r_hat,
                &mut scratch,
            );
            for (o, p) in out.iter_mut().zip(&product) {
                let e = smudge.random_range(-bound..=bound);
                *o = p.wrapping_neg().wrapping_add(e as u64);
            }
        }
    });
    Ok(share)
}

/// Decodes `sum + Σ shares` into the weighted mean of the first `len` values.
pub fn decode(
    acc: &Accumulator,
    shares: &[Vec<u64>],
    len: usize,
    codec: &Codec,
) -> Result<Vec<f32>, CryptoError> {
    Ok(decode_sums(acc, shares, len, codec)?
        .into_iter()
        .map(|m| codec.mean(m, acc.total_weight))
        .collect())
}

/// The exact weighted sums `Σ w_i m_i` of the messages behind the sum and the committee's
/// shares, before [`decode`] divides them into means (for exact statistics,
/// [`crate::exact`]).
pub fn decode_sums(
    acc: &Accumulator,
    shares: &[Vec<u64>],
    len: usize,
    codec: &Codec,
) -> Result<Vec<i64>, CryptoError> {
    if acc.total_weight == 0 {
        return Err(CryptoError::Committee("nothing was aggregated".into()));
    }
    let mut total = acc.sum.clone();
    for s in shares {
        if s.len() != total.len() {
            return Err(CryptoError::Length {
                expected: total.len(),
                got: s.len(),
            });
        }
        for (t, v) in total.iter_mut().zip(s) {
            *t = t.wrapping_add(*v);
        }
    }
    Ok(total[..len.min(total.len())]
        .iter()
        .map(|&c| codec.message(c))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::Committee;
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    /// One participant's contribution: weight, update and the pieces of its key.
    struct Upload {
        weight: u64,
        bodies: Vec<u64>,
        pieces: Vec<Vec<u64>>,
    }

    fn params() -> GlweParams {
        GlweParams {
            polynomial_size: 256,
            ..GlweParams::default()
        }
    }

    fn upload(
        values: &[f32],
        weight: u64,
        seed: RoundSeed,
        committee: &Committee,
        rng: &mut ChaCha8Rng,
    ) -> Upload {
        let (codec, p) = (Codec::default(), params());
        let key = RoundKey::generate(&p, rng);
        let msgs: Vec<i64> = values.iter().map(|&x| codec.encode(x)).collect();
        Upload {
            weight,
            bodies: encrypt(&key, seed, &msgs, &codec, &p, rng),
            pieces: committee.share(key.coefficients(), rng),
        }
    }

    /// Runs the committee over `included` uploads with `responders` answering; returns the
    /// decoded mean.
    fn aggregate(
        uploads: &[&Upload],
        committee: &Committee,
        responders: &[usize],
        seed: RoundSeed,
        len: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<f32>, CryptoError> {
        let mut acc = Accumulator::new(uploads[0].bodies.len());
        for u in uploads {
            acc.add(u.weight, &u.bodies)?;
        }
        let assignment = committee.assign(responders)?;
        let mut shares = Vec::new();
        for member in responders {
            let mine: Vec<(u64, &[u64])> = assignment
                .iter()
                .filter(|(_, m)| m == member)
                .flat_map(|&(k, _)| {
                    uploads
                        .iter()
                        .map(move |u| (u.weight, u.pieces[k].as_slice()))
                })
                .collect();
            if !mine.is_empty() {
                shares.push(decryption_share(&mine, seed, len, &params(), rng)?);
            }
        }
        decode(&acc, &shares, len, &Codec::default())
    }

    fn check_mean(got: &[f32], inputs: &[(u64, Vec<f32>)]) {
        let w: u64 = inputs.iter().map(|i| i.0).sum();
        for (j, g) in got.iter().enumerate() {
            // Exact up to the fixed-point rounding of each input (1/2^17 each).
            let want: f64 = inputs
                .iter()
                .map(|(wi, v)| *wi as f64 * v[j] as f64)
                .sum::<f64>()
                / w as f64;
            assert!(
                (*g as f64 - want).abs() < 1e-4,
                "element {j}: {g} vs {want}"
            );
        }
    }

    fn vector(i: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|j| (((i * 31 + j * 7) % 200) as f32 - 100.0) / 7.0)
            .collect()
    }

    #[test]
    fn exact_weighted_means_for_1_3_10_and_100_participants() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let len = 300; // two ciphertexts of N = 256
        for n in [1usize, 3, 10, 100] {
            let committee = Committee::default_for(n).unwrap();
            let seed = RoundSeed(1000 + n as u128);
            let inputs: Vec<(u64, Vec<f32>)> = (0..n)
                .map(|i| (1 + (i as u64 % 7), vector(i, len)))
                .collect();
            let uploads: Vec<Upload> = inputs
                .iter()
                .map(|(w, v)| upload(v, *w, seed, &committee, &mut rng))
                .collect();
            assert_eq!(
                uploads[0].bodies.len(),
                512,
                "bodies only: 8 bytes per element"
            );
            let all: Vec<usize> = (0..committee.size()).collect();
            let refs: Vec<&Upload> = uploads.iter().collect();
            let got = aggregate(&refs, &committee, &all, seed, len, &mut rng).unwrap();
            check_mean(&got, &inputs);
        }
    }

    #[test]
    fn dropped_participants_and_members_need_no_recovery() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let committee = Committee::new(5, 3).unwrap();
        let seed = RoundSeed(77);
        let inputs: Vec<(u64, Vec<f32>)> = (0..6).map(|i| (10, vector(i, 100))).collect();
        let uploads: Vec<Upload> = inputs
            .iter()
            .map(|(w, v)| upload(v, *w, seed, &committee, &mut rng))
            .collect();
        // Participants 4 and 5 uploaded but are left out of the manifest; members 1 and 3
        // (n − t of them) do not answer.
        let kept: Vec<&Upload> = uploads[..4].iter().collect();
        let got = aggregate(&kept, &committee, &[0, 2, 4], seed, 100, &mut rng).unwrap();
        check_mean(&got, &inputs[..4]);
        // Fewer than t members: nothing can be decrypted.
        assert!(aggregate(&kept, &committee, &[0, 2], seed, 100, &mut rng).is_err());
    }

    #[test]
    fn values_at_the_clip_bound_with_maximal_weight_decode() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let committee = Committee::new(3, 2).unwrap();
        let seed = RoundSeed(5);
        // Total weight 1024 (the default codec's max_total_weight), values at ±B.
        let inputs = vec![
            (1000u64, vec![32.0f32, -32.0, 31.5]),
            (24, vec![32.0, -32.0, -32.0]),
        ];
        Codec::default()
            .check(&params().budget(committee.pieces()))
            .unwrap();
        let uploads: Vec<Upload> = inputs
            .iter()
            .map(|(w, v)| upload(v, *w, seed, &committee, &mut rng))
            .collect();
        let refs: Vec<&Upload> = uploads.iter().collect();
        let got = aggregate(&refs, &committee, &[0, 1, 2], seed, 3, &mut rng).unwrap();
        check_mean(&got, &inputs);
    }

    #[test]
    fn what_the_coordinator_holds_does_not_decode() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let committee = Committee::new(3, 2).unwrap();
        let seed = RoundSeed(9);
        let secret = vector(0, 64);
        let other = vector(1, 64);
        let uploads = [
            upload(&secret, 1, seed, &committee, &mut rng),
            upload(&other, 1, seed, &committee, &mut rng),
        ];
        let codec = Codec::default();
        // The coordinator alone: one participant's bodies, or the sum, without shares.
        let mut one = Accumulator::new(uploads[0].bodies.len());
        one.add(1, &uploads[0].bodies).unwrap();
        let alone = decode(&one, &[], 64, &codec).unwrap();
        let mut both = Accumulator::new(uploads[0].bodies.len());
        both.add(1, &uploads[0].bodies).unwrap();
        both.add(1, &uploads[1].bodies).unwrap();
        let sum_only = decode(&both, &[], 64, &codec).unwrap();
        // Decoding with a wrong key sum (shares computed from a key nobody used).
        let wrong_key = RoundKey::generate(&params(), &mut rng);
        let fake = decryption_share(
            &[(1, wrong_key.coefficients())],
            seed,
            64,
            &params(),
            &mut rng,
        )
        .unwrap();
        let wrong = decode(&one, &[fake], 64, &codec).unwrap();
        for attempt in [alone, sum_only, wrong] {
            let close = attempt
                .iter()
                .zip(&secret)
                .filter(|(a, b)| (*a - *b).abs() < 0.01)
                .count();
            assert!(close <= 2, "{close} of 64 values recovered");
        }
    }

    #[test]
    fn a_share_for_another_seed_gives_noise() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let committee = Committee::new(1, 1).unwrap();
        let v = vector(3, 32);
        let u = upload(&v, 1, RoundSeed(1), &committee, &mut rng);
        let mut acc = Accumulator::new(u.bodies.len());
        acc.add(1, &u.bodies).unwrap();
        let right =
            decryption_share(&[(1, &u.pieces[0])], RoundSeed(1), 32, &params(), &mut rng).unwrap();
        let wrong =
            decryption_share(&[(1, &u.pieces[0])], RoundSeed(2), 32, &params(), &mut rng).unwrap();
        check_mean(
            &decode(&acc, &[right], 32, &Codec::default()).unwrap(),
            &[(1, v.clone())],
        );
        let bad = decode(&acc, &[wrong], 32, &Codec::default()).unwrap();
        assert!(
            bad.iter()
                .zip(&v)
                .filter(|(a, b)| (*a - *b).abs() < 0.01)
                .count()
                <= 2
        );
    }

    #[test]
    fn blocks_give_the_same_result_on_any_number_of_threads() {
        let p = params();
        let codec = Codec::default();
        let committee = Committee::new(1, 1).unwrap();
        let len = BLOCK_CIPHERTEXTS * p.polynomial_size * 2 + 100; // three blocks
        let v = vector(7, len);
        let msgs: Vec<i64> = v.iter().map(|&x| codec.encode(x)).collect();
        let key = RoundKey::generate(&p, &mut ChaCha8Rng::seed_from_u64(8));
        let seed = RoundSeed(99);
        let one = encrypt_threads(
            &key,
            seed,
            &msgs,
            &codec,
            &p,
            &mut ChaCha8Rng::seed_from_u64(9),
            1,
        );
        let three = encrypt_threads(
            &key,
            seed,
            &msgs,
            &codec,
            &p,
            &mut ChaCha8Rng::seed_from_u64(9),
            3,
        );
        assert_eq!(one, three);
        let pieces = committee.share(key.coefficients(), &mut ChaCha8Rng::seed_from_u64(10));
        let share = decryption_share_threads(
            &[(1, &pieces[0])],
            seed,
            len,
            &p,
            &mut ChaCha8Rng::seed_from_u64(11),
            3,
        )
        .unwrap();
        let mut acc = Accumulator::new(one.len());
        acc.add(1, &one).unwrap();
        acc.add_share(&share).unwrap();
        check_mean(&decode(&acc, &[], len, &codec).unwrap(), &[(1, v)]);
    }

    #[test]
    fn fft_encryption_matches_tfhe_rs_encryption_up_to_noise() {
        let p = params();
        let codec = Codec::default();
        let len = BLOCK_CIPHERTEXTS * p.polynomial_size + 77; // two blocks
        let msgs: Vec<i64> = vector(4, len).iter().map(|&x| codec.encode(x)).collect();
        let key = RoundKey::generate(&p, &mut ChaCha8Rng::seed_from_u64(20));
        let seed = RoundSeed(1234);
        let fast = encrypt_threads(
            &key,
            seed,
            &msgs,
            &codec,
            &p,
            &mut ChaCha8Rng::seed_from_u64(21),
            2,
        );
        let reference = encrypt_tfhe_threads(
            &key,
            seed,
            &msgs,
            &codec,
            &p,
            &mut ChaCha8Rng::seed_from_u64(22),
            2,
        );
        // Same mask and key, independent noise: bodies differ by at most two noise bounds and
        // two roundings.
        let bound = (2u64 << p.noise_log2) + (1 << BODY_DROPPED_BITS);
        for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
            let d = f.wrapping_sub(*r) as i64;
            assert!(d.unsigned_abs() <= bound, "body {i} differs by {d}");
        }
        // And the noise is not zero: T-uniform over [−2^17, 2^17].
        assert!(fast.iter().zip(&reference).filter(|(f, r)| f != r).count() > len / 2);
        // Several samples from each random word: still T-uniform, ends at half weight.
        let mut noise = NoiseSource::new(ChaCha8Rng::seed_from_u64(23), 3);
        let samples: Vec<i64> = (0..160_000).map(|_| noise.next()).collect();
        assert_eq!(*samples.iter().min().unwrap(), -8);
        assert_eq!(*samples.iter().max().unwrap(), 8);
        for (v, weight) in [(-8, 0.5), (-3, 1.0), (0, 1.0), (7, 1.0), (8, 0.5)] {
            let share = samples.iter().filter(|&&x| x == v).count() as f64 / 160_000.0;
            let want = weight / 16.0;
            assert!(
                (share - want).abs() < 0.004,
                "P({v}) = {share}, want {want}"
            );
        }
        let mean = samples.iter().sum::<i64>() as f64 / samples.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        // The default bound: variance (2^(2b+1) + 1) / 6.
        let b = p.noise_log2;
        let mut noise = NoiseSource::new(ChaCha8Rng::seed_from_u64(24), b);
        let samples: Vec<f64> = (0..300_000).map(|_| noise.next() as f64).collect();
        assert!(samples.iter().all(|x| x.abs() <= (1u64 << b) as f64));
        let var = samples.iter().map(|x| x * x).sum::<f64>() / samples.len() as f64;
        let want = ((1u128 << (2 * b + 1)) + 1) as f64 / 6.0;
        assert!((var / want - 1.0).abs() < 0.02, "variance {var} vs {want}");
    }

    #[test]
    fn bodies_are_rounded_to_48_bits() {
        assert_eq!(round_body(0x1234_5678_9abc_7fff), 0x1234_5678_9abc_0000);
        assert_eq!(round_body(0x1234_5678_9abc_8000), 0x1234_5678_9abd_0000);
        assert_eq!(round_body(u64::MAX), 0, "wraps");
        let p = params();
        let codec = Codec::default();
        let key = RoundKey::generate(&p, &mut ChaCha8Rng::seed_from_u64(30));
        let msgs: Vec<i64> = vector(9, 100).iter().map(|&x| codec.encode(x)).collect();
        let bodies = encrypt(
            &key,
            RoundSeed(3),
            &msgs,
            &codec,
            &p,
            &mut ChaCha8Rng::seed_from_u64(31),
        );
        assert!(bodies.iter().all(|b| b & 0xffff == 0));
    }

    #[test]
    fn batched_masks_are_tfhe_rs_seeded_decompression_bit_for_bit() {
        let n = 2048;
        for (seed, block, count) in [(RoundSeed(1), 0, 3), (RoundSeed(u128::MAX - 7), 5, 16)] {
            let reference = SeededGlweCiphertextList::from_container(
                vec![0u64; count * n],
                GlweSize(2),
                PolynomialSize(n),
                block_seed(seed, block),
                CiphertextModulus::new_native(),
            )
            .decompress_into_glwe_ciphertext_list()
            .into_container();
            let fast = block_masks(seed, block, count, n);
            for j in 0..count {
                assert_eq!(
                    fast[j * n..(j + 1) * n],
                    reference[2 * j * n..(2 * j + 1) * n],
                    "ciphertext {j} of block {block}"
                );
            }
        }
    }

    #[test]
    fn accumulator_refuses_wrong_lengths() {
        let mut acc = Accumulator::new(4);
        assert!(matches!(
            acc.add(1, &[0; 3]),
            Err(CryptoError::Length {
                expected: 4,
                got: 3
            })
        ));
        assert_eq!(acc.count(), 0);
        assert!(acc.add_partial(&Accumulator::new(5)).is_err());
    }

    #[test]
    fn partial_sums_add_up_to_the_whole_sum_bit_for_bit() {
        let bodies: Vec<Vec<u64>> = (0..7u64)
            .map(|i| (0..6).map(|k| u64::MAX / 3 * i + k * 0x9e37_79b9).collect())
            .collect();
        let mut whole = Accumulator::new(6);
        for (i, b) in bodies.iter().enumerate() {
            whole.add(i as u64 + 1, b).unwrap();
        }
        let (mut first, mut second) = (Accumulator::new(6), Accumulator::new(6));
        for (i, b) in bodies.iter().enumerate() {
            let part = if i < 3 { &mut first } else { &mut second };
            part.add(i as u64 + 1, b).unwrap();
        }
        let mut merged = Accumulator::new(6);
        merged.add_partial(&second).unwrap();
        let first = Accumulator::from_parts(first.sum().to_vec(), first.total_weight(), 3);
        merged.add_partial(&first).unwrap();
        assert_eq!(merged.sum(), whole.sum());
        assert_eq!(
            (merged.total_weight(), merged.count()),
            (whole.total_weight(), 7)
        );
    }
}
