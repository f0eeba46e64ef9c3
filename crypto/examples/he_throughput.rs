//! Encrypts and adds a vector with cohort's threshold GLWE, printing per-element figures as
//! JSON (used by benches/compare_tenseal.py for a same-run comparison with CKKS).
//!
//! `cargo run --release --example he_throughput -- [ELEMENTS]` (default 2^20).

use std::time::Instant;

use cohort_crypto::glwe::encrypt_threads;
use cohort_crypto::{Accumulator, Codec, GlweParams, RoundKey, RoundSeed};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ELEMENTS must be a number"))
        .unwrap_or(1 << 20);
    let (codec, params) = (Codec::default(), GlweParams::default());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let reps = 3;
    let mut enc = f64::INFINITY;
    let mut bodies = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        // Encoding is part of encryption's cost, as CKKS encoding is on the other side.
        let msgs: Vec<i64> = values.iter().map(|&x| codec.encode(x)).collect();
        let key = RoundKey::generate(&params, &mut rng);
        // One thread: the comparison is per core.
        bodies = encrypt_threads(&key, RoundSeed(1), &msgs, &codec, &params, &mut rng, 1);
        enc = enc.min(t.elapsed().as_secs_f64());
    }
    let mut add = f64::INFINITY;
    for _ in 0..reps {
        let mut acc = Accumulator::new(bodies.len());
        acc.add(1, &bodies).expect("same length");
        let t = Instant::now();
        acc.add(1, &bodies).expect("same length");
        add = add.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"elements\": {n}, \"encrypt_ns_per_element\": {:.2}, \"add_ns_per_element\": {:.3}, \"bytes_per_element\": {:.3}}}",
        enc * 1e9 / n as f64,
        add * 1e9 / n as f64,
        // Bodies travel as 6 bytes (48 bits; glwe::BODY_DROPPED_BITS).
        bodies.len() as f64 * 6.0 / n as f64
    );
}
