//! Secure-aggregation primitives per element: encryption (one core, every core, and
//! tfhe-rs's own seeded encryption for reference), the coordinator's weighted accumulation,
//! and a committee member's decryption share.
//!
//! `cargo bench --workspace --bench glwe`. Vectors of 2^18 values (128 ciphertexts of
//! N = 2048); divide the reported time by 262,144 for ns per element.

use cohort_crypto::glwe::{
    decryption_share_threads, default_threads, encrypt_tfhe_threads, encrypt_threads,
};
use cohort_crypto::{Accumulator, Codec, GlweParams, RoundKey, RoundSeed, encrypt};
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
    // Bodies travel as 6 bytes each (48 bits; see glwe::BODY_DROPPED_BITS).
    let wire = bodies.len() * 6;
    eprintln!(
        "wire size: {wire} bytes for {LEN} values = {:.2} bytes per element ({:.2}x f32)",
        wire as f64 / LEN as f64,
        wire as f64 / LEN as f64 / 4.0
    );

    let mut g = c.benchmark_group("glwe_2^18_elements");
    g.sample_size(10);
    g.throughput(Throughput::Elements(LEN as u64));
    g.bench_function("encrypt_one_core", |b| {
        b.iter(|| encrypt_threads(&key, seed, &messages, &codec, &params, &mut rng, 1))
    });
    let all = default_threads();
    g.bench_function(format!("encrypt_all_{all}_cores"), |b| {
        b.iter(|| encrypt_threads(&key, seed, &messages, &codec, &params, &mut rng, all))
    });
    g.bench_function("encrypt_tfhe_rs_reference_one_core", |b| {
        b.iter(|| encrypt_tfhe_threads(&key, seed, &messages, &codec, &params, &mut rng, 1))
    });
    let mut acc = Accumulator::new(bodies.len());
    g.bench_function("accumulate_one_participant", |b| {
        b.iter(|| acc.add(7, &bodies).unwrap())
    });
    let piece = key.coefficients().to_vec();
    g.bench_function("decryption_share_one_piece", |b| {
        b.iter(|| {
            decryption_share_threads(&[(1, &piece)], seed, LEN, &params, &mut rng, 1).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
