//! Secure-aggregation primitives per element: encryption (one core), the coordinator's
//! weighted accumulation, and a committee member's decryption share.
//!
//! `cargo bench --workspace --bench glwe`. Vectors of 2^18 values (128 ciphertexts of
//! N = 2048); divide the reported time by 262,144 for ns per element.

use cohort_crypto::{
    Accumulator, Codec, GlweParams, RoundKey, RoundSeed, decryption_share, encrypt,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

const LEN: usize = 1 << 18;

fn bench(c: &mut Criterion) {
    let (codec, params) = (Codec::default(), GlweParams::default());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let messages: Vec<i64> = (0..LEN)
        .map(|i| codec.encode((i % 1000) as f32 / 100.0 - 5.0))
        .collect();
    let key = RoundKey::generate(&params, &mut rng);
    let seed = RoundSeed(42);
    let bodies = encrypt(&key, seed, &messages, &codec, &params, &mut rng);
    eprintln!(
        "wire size: {} bytes for {} values = {:.2} bytes per element ({:.2}x f32)",
        bodies.len() * 8,
        LEN,
        bodies.len() as f64 * 8.0 / LEN as f64,
        bodies.len() as f64 * 8.0 / LEN as f64 / 4.0
    );

    let mut g = c.benchmark_group("glwe_2^18_elements");
    g.sample_size(10);
    g.throughput(Throughput::Elements(LEN as u64));
    g.bench_function("encrypt_one_core", |b| {
        b.iter(|| encrypt(&key, seed, &messages, &codec, &params, &mut rng))
    });
    let mut acc = Accumulator::new(bodies.len());
    g.bench_function("accumulate_one_participant", |b| {
        b.iter(|| acc.add(7, &bodies).unwrap())
    });
    let piece = key.coefficients().to_vec();
    g.bench_function("decryption_share_one_piece", |b| {
        b.iter(|| decryption_share(&[(1, &piece)], seed, LEN, &params, &mut rng).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
