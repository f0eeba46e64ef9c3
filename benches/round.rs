//! One full plaintext round — selection, model download, local training, upload, FedAvg,
//! federated evaluation, model version written — with 3 and 10 participants on the
//! breast-cancer model, over real loopback gRPC.
//!
//! `cargo bench --bench round`. Each sample runs a federation of `iters` rounds through
//! `cohort simulate` (the same code as the command line) and counts the rounds' own time,
//! measured by the coordinator from round start to round completion (joining and process
//! start are left out).

use std::time::Duration;

use clap::Parser;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: cohort::simulate::SimArgs,
}

fn rounds_time(rt: &tokio::runtime::Runtime, participants: usize, rounds: u64) -> Duration {
    let out = tempfile::tempdir().unwrap();
    let args = Wrap::parse_from([
        "simulate".to_string(),
        "--quiet".into(),
        "--no-baseline".into(),
        format!("--participants={participants}"),
        format!("--rounds={rounds}"),
        format!("--out={}", out.path().display()),
    ])
    .args;
    let report = rt.block_on(cohort::simulate::run(args)).unwrap();
    Duration::from_secs_f64(report.rounds.iter().map(|r| r.seconds).sum())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("plaintext_round");
    g.sample_size(10);
    for n in [3usize, 10] {
        g.bench_function(BenchmarkId::new("breast_cancer_logistic", n), |b| {
            b.iter_custom(|iters| rounds_time(&rt, n, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
