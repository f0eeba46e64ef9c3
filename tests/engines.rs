//! The virtual-participant engine against the networked one: the same job on the same data
//! and seed gives the same global model, bit for bit (model versions are content-addressed by
//! the SHA-256 of their parameters, so equal weight files mean equal parameters).

use clap::Parser;
use cohort::simulate::{SimArgs, SimReport, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

async fn simulate(engine: &str, extra: &[&str], out: &std::path::Path) -> SimReport {
    let mut argv = vec![
        "simulate",
        "--quiet",
        "--no-baseline",
        "--rounds",
        "4",
        "--engine",
        engine,
        "--out",
        out.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    run(Cli::parse_from(argv).args).await.unwrap()
}

fn weights(r: &SimReport) -> &str {
    r.model_path.rsplit('/').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_give_the_same_model_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut models = std::collections::HashMap::new();
    for (name, extra) in [
        // Secure aggregation (the default): exact integer sums.
        ("secure", &["--participants", "5"][..]),
        // A sampled fraction of the participants each round, the selection seeded.
        ("sampled", &["--participants", "6", "--fraction", "0.5"][..]),
        // Updates clipped to an L2 norm before they leave each participant.
        (
            "clipped",
            &["--participants", "4", "--clip-norm", "0.3"][..],
        ),
        // FedProx: the proximal coefficient travels with each training task.
        (
            "fedprox",
            &[
                "--participants",
                "4",
                "--strategy",
                "fedprox",
                "--proximal-mu",
                "0.1",
            ][..],
        ),
        // Central differential privacy: the coordinator's keyed noise on the aggregate.
        (
            "central-dp",
            &[
                "--participants",
                "4",
                "--clip-norm",
                "1",
                "--dp",
                "central",
                "--noise-multiplier",
                "0.3",
            ][..],
        ),
        // A robust rule (plaintext jobs): every update kept, combined coordinate by coordinate.
        (
            "median",
            &["--participants", "5", "--plaintext", "--strategy", "median"][..],
        ),
        // Per-layer clipping: each layer of an MLP to its share of the clip norm, and the
        // same MLP clipped as a whole.
        (
            "per-layer",
            &[
                "--participants",
                "4",
                "--hidden",
                "8",
                "--clip-norm",
                "0.3",
                "--clip-per-layer",
            ][..],
        ),
        (
            "clipped-mlp",
            &["--participants", "4", "--hidden", "8", "--clip-norm", "0.3"][..],
        ),
        // Adaptive clipping: the indicators summed with the updates move the clip norm.
        (
            "adaptive-clip",
            &[
                "--participants",
                "4",
                "--clip-norm",
                "0.05",
                "--clip-quantile",
                "0.5",
            ][..],
        ),
        // SCAFFOLD: the server's control variate travels with each task, each participant
        // keeps its own from round to round, and their changes are summed with the updates;
        // with half the participants a round, the server moves c by |S|/N of the mean.
        (
            "scaffold",
            &["--participants", "4", "--strategy", "scaffold"][..],
        ),
        (
            "scaffold-sampled",
            &[
                "--participants",
                "6",
                "--fraction",
                "0.5",
                "--strategy",
                "scaffold",
            ][..],
        ),
        // Stateful server strategies (their state carried from round to round).
        (
            "fedavgm",
            &["--participants", "4", "--strategy", "fedavgm"][..],
        ),
        (
            "fedadagrad",
            &[
                "--participants",
                "4",
                "--strategy",
                "fedadagrad",
                "--server-lr",
                "0.1",
            ][..],
        ),
        (
            "fedyogi",
            &[
                "--participants",
                "4",
                "--strategy",
                "fedyogi",
                "--server-lr",
                "0.01",
            ][..],
        ),
    ] {
        let net = simulate("networked", extra, &dir.path().join(format!("{name}-n"))).await;
        let vir = simulate("virtual", extra, &dir.path().join(format!("{name}-v"))).await;
        assert_eq!(
            weights(&net),
            weights(&vir),
            "{name}: the final models differ"
        );
        let per_round = |r: &SimReport| -> Vec<(usize, Option<f64>)> {
            r.rounds
                .iter()
                .map(|x| (x.participants, x.eval_accuracy))
                .collect()
        };
        assert_eq!(per_round(&net), per_round(&vir), "{name}");
        assert_eq!(net.rounds.len(), 4);
        let acc = net.federated_accuracy.unwrap();
        assert!(acc > 0.85, "{name}: held-out accuracy {acc}");
        assert_eq!(net.served_accuracy, vir.served_accuracy);
        models.insert(name, weights(&net).to_string());
    }
    // Each setting reached the participants: none of them gives plain FedAvg's model.
    let plain = simulate(
        "networked",
        &["--participants", "4"],
        &dir.path().join("plain"),
    )
    .await;
    for name in [
        "clipped",
        "fedprox",
        "scaffold",
        "fedavgm",
        "central-dp",
        "adaptive-clip",
    ] {
        assert_ne!(models[name], weights(&plain), "{name} is plain FedAvg");
    }
    assert_ne!(
        models["per-layer"], models["clipped-mlp"],
        "per-layer clipping is whole-update clipping"
    );
    let mean = simulate(
        "networked",
        &["--participants", "5", "--plaintext"],
        &dir.path().join("plain-mean"),
    )
    .await;
    assert_ne!(models["median"], weights(&mean), "median is the mean");
}

/// A model declared as a stack of layers (`--model`, with batch normalisation and dropout;
/// the input shape and classes left to the data) trains to the same bits in the networked
/// engine, the virtual one and two worker processes, and is served; a bad stack is refused
/// naming the file and the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_model_trains_alike_in_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.toml");
    std::fs::write(
        &model,
        r#"
kind = "layers"
layers = [
  { type = "linear", units = 16 },
  { type = "batch_norm" },
  { type = "relu" },
  { type = "dropout", p = 0.2 },
  { type = "linear", units = 2 },
]
"#,
    )
    .unwrap();
    let m = model.to_str().unwrap();
    let base = ["--participants", "4", "--model", m, "--epochs", "2"];
    let net = simulate("networked", &base, &dir.path().join("n")).await;
    let vir = simulate("virtual", &base, &dir.path().join("v")).await;
    let mut workers = base.to_vec();
    // Workers need a committee of key custodians run by the driver; the sums are exact
    // either way.
    workers.extend(["--custodians", "3", "--workers", "2"]);
    workers.extend(["--worker-command", env!("CARGO_BIN_EXE_cohort")]);
    let two = simulate("virtual", &workers, &dir.path().join("w")).await;
    assert_eq!(weights(&net), weights(&vir));
    assert_eq!(weights(&net), weights(&two));
    assert!(
        matches!(
            &net.model,
            cohort_model::ModelSpec::Layers {
                inputs: 30,
                classes: 2,
                ..
            }
        ),
        "the data's shape and classes: {:?}",
        net.model
    );
    let acc = net.federated_accuracy.unwrap();
    assert!(acc > 0.9, "held-out accuracy {acc}");
    assert_eq!(Some(net.served_accuracy), net.federated_accuracy);

    std::fs::write(
        &model,
        "kind = \"layers\"\n[[layers]]\ntype = \"max_pool2d\"\nsize = 2\n",
    )
    .unwrap();
    let argv = [
        "simulate",
        "--quiet",
        "--model",
        m,
        "--out",
        dir.path().to_str().unwrap(),
    ];
    let e = run(Cli::parse_from(argv).args).await.unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains(m) && e.contains("layer 0 (max_pool2d): pooling needs an image"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_the_virtual_engine_for_many_participants() {
    // 120 participants of the 569-row table, a tenth of them a round, plaintext: the virtual
    // engine (auto above 100) runs it to the end and the served model answers every row.
    let dir = tempfile::tempdir().unwrap();
    let r = simulate(
        "auto",
        &[
            "--participants",
            "120",
            "--clients-per-round",
            "12",
            "--test-fraction",
            "0.3",
            "--plaintext",
        ],
        dir.path(),
    )
    .await;
    assert_eq!(r.rounds.len(), 4);
    assert!(
        r.rounds.iter().all(|x| x.participants == 12),
        "{:?}",
        r.rounds
    );
    assert!(r.served_rows > 0);
    // Poisson sampling: each participant with probability 0.1, so the rounds' sizes vary.
    let r = simulate(
        "auto",
        &[
            "--participants",
            "120",
            "--sampling",
            "poisson",
            "--fraction",
            "0.1",
            "--test-fraction",
            "0.3",
            "--plaintext",
        ],
        &dir.path().join("poisson"),
    )
    .await;
    let sizes: Vec<usize> = r.rounds.iter().map(|x| x.participants).collect();
    assert!(sizes.iter().all(|&n| (2..=30).contains(&n)), "{sizes:?}");
    assert!(sizes.iter().min() != sizes.iter().max(), "{sizes:?}");
}

/// The README's cross-device command, shortened: 10,000 Fashion-MNIST participants (one test
/// image each), one round of 600 of them with real encryption (past the default codec's
/// 1,024-weight capacity, so the widened codec runs), then the same round emulated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_participants_of_fashion_mnist() {
    let data = "/usr/share/datasets/fashion-mnist";
    assert!(
        std::path::Path::new(data).is_dir(),
        "{data} is missing: scripts/install-test-deps installs dataset-fashion-mnist"
    );
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--dataset",
        data,
        "--participants",
        "10000",
        "--fraction",
        "0.06",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
    ];
    let one_round = |out: &str, secure: &'static str| {
        let mut argv = vec![
            "simulate",
            "--quiet",
            "--no-baseline",
            "--rounds",
            "1",
            "--secure",
            secure,
            "--out",
        ];
        argv.push(Box::leak(
            dir.path()
                .join(out)
                .to_str()
                .unwrap()
                .to_string()
                .into_boxed_str(),
        ));
        argv.extend_from_slice(&args);
        Cli::parse_from(argv).args
    };
    let full = run(one_round("full", "full")).await.unwrap();
    assert_eq!(full.engine, "virtual");
    assert_eq!(full.rounds[0].participants, 600);
    let codec = &full.secure_aggregation;
    assert_eq!(codec["max_total_weight"], 1200);
    assert_eq!(codec["mode"], "full");
    assert_eq!(
        full.served_rows, 10_000,
        "every participant's test image answered"
    );
    let emulated = run(one_round("emulated", "emulated")).await.unwrap();
    assert_eq!(emulated.secure_aggregation["mode"], "emulated");
    assert_eq!(
        weights(&full),
        weights(&emulated),
        "emulation = encryption, bit for bit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropouts_are_left_out_and_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rounds.csv");
    let r = simulate(
        "auto",
        &[
            "--participants",
            "20",
            "--dropout",
            "0.2",
            "--secure",
            "emulated",
            "--rounds-log",
            log.to_str().unwrap(),
        ],
        &dir.path().join("run"),
    )
    .await;
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 5, "a header and a line a round: {lines:?}");
    assert!(lines[0].starts_with("round,participants,stragglers"));
    assert!(lines[4].starts_with("4,"));
    assert_eq!(r.engine, "virtual", "--dropout takes the virtual engine");
    assert_eq!(r.rounds.len(), 4);
    let left_out: usize = r.rounds.iter().map(|x| x.stragglers.len()).sum();
    assert!(
        left_out > 0,
        "a fifth of 80 selections drop out: {:?}",
        r.rounds
    );
    assert!(
        r.rounds
            .iter()
            .all(|x| x.participants + x.stragglers.len() == 20)
    );
}

/// The cross-device command of docs/simulation.md, shortened: 100,000 participants of
/// LEAF-style synthetic data (more than any bundled dataset has rows), 1,000 drawn a round
/// with real encryption and a custodian committee, 1% evaluating each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_synthetic_participants() {
    let dir = tempfile::tempdir().unwrap();
    let r = simulate(
        "auto",
        &[
            "--dataset",
            "synthetic:1,1",
            "--participants",
            "100000",
            "--clients-per-round",
            "1000",
            "--evaluate-fraction",
            "0.01",
            "--epochs",
            "1",
            "--batch-size",
            "10",
            "--lr",
            "0.05",
            "--custodians",
            "5",
        ],
        &dir.path().join("out"),
    )
    .await;
    assert_eq!(r.engine, "virtual");
    assert_eq!(r.participants, 100_000);
    assert_eq!(r.rounds.len(), 4);
    assert!(r.rounds.iter().all(|x| x.participants == 1000));
    assert_eq!(r.secure_aggregation["mode"], "full");
    // Every participant's held-out rows (at least one each) answered by the served model.
    assert!(r.served_rows >= 100_000, "{}", r.served_rows);
    assert!(r.rounds.iter().all(|x| x.eval_accuracy.is_some()));
}

/// An availability trace: participants offline in a round are neither selected nor
/// counted; they come back when their interval begins; the same model with workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_availability_trace_decides_who_takes_part_in_each_round() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("availability.csv");
    let mut t = String::from("participant,from_round,to_round\n");
    for p in 1..=5 {
        t += &format!("participant-{p:03},1,2\n");
    }
    t += "participant-006,3,4\n";
    std::fs::write(&trace, t).unwrap();
    let run_with = |workers: &'static str, out: &str| {
        let out = dir.path().join(out);
        let trace = trace.clone();
        async move {
            simulate(
                "virtual",
                &[
                    "--participants",
                    "20",
                    "--custodians",
                    "3",
                    "--availability",
                    trace.to_str().unwrap(),
                    "--workers",
                    workers,
                    "--worker-command",
                    env!("CARGO_BIN_EXE_cohort"),
                ],
                &out,
            )
            .await
        }
    };
    let one = run_with("0", "one").await;
    let counts: Vec<usize> = one.rounds.iter().map(|r| r.participants).collect();
    assert_eq!(counts, [19, 19, 15, 15], "20 less the offline ones");
    let two = run_with("2", "two").await;
    assert_eq!(weights(&one), weights(&two));
    // A trace naming nobody of the simulation is refused with its line.
    std::fs::write(
        &trace,
        "participant,from_round,to_round\nparticipant-099,1,2\n",
    )
    .unwrap();
    let mut argv = vec!["simulate", "--quiet", "--participants", "20"];
    argv.extend(["--availability", trace.to_str().unwrap()]);
    let e = run(Cli::parse_from(argv).args).await.unwrap_err();
    assert!(format!("{e:#}").contains("line 2: no participant"), "{e:#}");
}
