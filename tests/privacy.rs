//! cohort's privacy accountant against Google's `dp-accounting` (from PyPI): ε of the
//! Poisson-sampled Gaussian mechanism over a grid of noise multipliers, sampling rates,
//! rounds and δ, within 1%.

mod common;

use std::process::Command;

use cohort_coordinator::privacy::Accountant;

#[test]
fn the_accountant_agrees_with_dp_accounting_within_one_percent() {
    let python = common::python_venv("python-dp-accounting", &["dp-accounting==0.6.0"]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dp_accounting_grid.py");
    let out = Command::new(&python).arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grid: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(grid.len(), 200);
    let mut worst = (0.0f64, String::new());
    for point in &grid {
        let f = |k: &str| point[k].as_f64().unwrap();
        let (z, q, steps, delta, want) =
            (f("z"), f("q"), f("steps") as u64, f("delta"), f("epsilon"));
        let mut a = Accountant::default();
        a.compose_gaussian(q, z, steps);
        let got = a.epsilon(delta).0;
        let rel = (got - want).abs() / want.max(1e-12);
        assert!(
            rel <= 0.01,
            "z {z}, q {q}, {steps} rounds, δ {delta}: cohort ε {got}, dp-accounting {want}"
        );
        if rel > worst.0 {
            worst = (
                rel,
                format!("z {z}, q {q}, {steps} rounds, δ {delta}: {got} vs {want}"),
            );
        }
    }
    eprintln!("largest relative difference {:.2e} ({})", worst.0, worst.1);
}

/// Distributed differential privacy over real processes: three participant processes clip
/// their updates (at a clip norm adaptive clipping moves), add discrete Gaussian noise (from
/// the operating system's generator) to their encoded updates and encrypt them; the coordinator decrypts only the noised sum,
/// accounts every round, shows ε in the Admin API, /metrics and each version's manifest, and
/// stops the job before the round that would exceed its budget.
#[test]
fn a_federation_with_distributed_noise_accounts_every_round_and_stops_at_its_budget() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::provision(d);
    let shares = common::write_shares(d);
    // Two rounds at z = 1.5 (every participant every round) cost ε 4.42; a third would take
    // it to 5.58, past the target.
    let job = common::job_section("dp", 4, 60.0).replace(
        "strategy = \"fedadam\"\nserver_lr = 0.05\n",
        "clip_norm = 1.0\n\n[job.privacy]\nmechanism = \"distributed\"\nnoise_multiplier = 1.5\n\
         delta = 1e-5\ntarget_epsilon = 5.0\n\n[job.adaptive_clipping]\ntarget_quantile = 0.5\n",
    );
    assert!(job.contains("[job.privacy]"), "{job}");
    let cfg = common::coordinator_config(
        d,
        common::free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        &format!("[job]{job}"),
    );
    let coord = common::spawn_coordinator(&cfg);
    let mut parts: Vec<common::Proc> = (0..3)
        .map(|i| common::spawn_participant(d, &coord.addr, i, &shares[i], 1500))
        .collect();
    coord.wait_log(
        &["model version committed", "round=1"],
        Duration::from_secs(120),
    );
    // While round 2 trains: ε of round 1 in the Admin API and in /metrics.
    let status = common::admin(d, &coord.addr, &["jobs", "status", "dp"]);
    assert!(status.contains("EPSILON"), "{status}");
    let mut one = Accountant::default();
    one.compose_gaussian(1.0, 1.5, 1);
    let eps1 = format!("{:.4}", one.epsilon(1e-5).0);
    assert!(status.contains(&eps1), "ε {eps1} not in {status}");
    let metrics = common::scrape(&coord.metrics);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cohort_privacy_epsilon{job_id=\"dp\"}")),
        "{metrics}"
    );
    // Adaptive clipping: round 1 clipped at the job's clip_norm, and the next norm is out.
    assert!(status.contains("CLIP NORM"), "{status}");
    let round1 = status
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(round1.contains("1.0000"), "{round1}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cohort_clip_norm{job_id=\"dp\"}")),
        "{metrics}"
    );
    coord.wait_log(&["privacy budget spent"], Duration::from_secs(120));
    let mut coord = coord;
    let exit = coord.proc.wait_for_exit(Duration::from_secs(60));
    assert!(exit.success(), "coordinator exited with {exit}");
    for p in parts.iter_mut() {
        let s = p.wait_for_exit(Duration::from_secs(30));
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    let manifest = |v: u32| -> Option<serde_json::Value> {
        let p = d.join(format!("models/dp/v{v:05}.json"));
        p.exists()
            .then(|| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
    };
    let mut two = Accountant::default();
    two.compose_gaussian(1.0, 1.5, 2);
    let m2 = manifest(2).expect("version 2");
    let eps2 = m2["privacy"]["epsilon"].as_f64().unwrap();
    assert!((eps2 - two.epsilon(1e-5).0).abs() < 1e-9, "{m2}");
    assert_eq!(m2["privacy"]["delta"].as_f64(), Some(1e-5));
    assert!(
        manifest(3).is_none(),
        "round 3 would have exceeded the budget"
    );
    // The noise is there: the participants' clipped updates (norm ≤ 1) cannot move the
    // 62-parameter model by more than 1 a round without it.
    let keys =
        std::sync::Arc::new(cohort_storage::load_key_dir(&d.join("pki/coordinator/kek")).unwrap());
    let params = |v: u32| {
        cohort_coordinator::ModelStore::open(d.join("models"))
            .unwrap()
            .with_keys(keys.clone())
            .for_job("dp")
            .read_params(v as u64)
            .unwrap()
    };
    let moved: f64 = params(2)
        .iter()
        .zip(params(1))
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(moved > 1.0, "version 2 moved by {moved}");
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: cohort::simulate::SimArgs,
}

/// The command of the README and docs/privacy.md, as written: 100 participants, 20 rounds,
/// distributed noise calibrated to ε = 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_private_simulation_spends_at_most_its_target() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let argv = [
        "simulate",
        "--participants",
        "100",
        "--rounds",
        "20",
        "--clip-norm",
        "0.5",
        "--dp",
        "distributed",
        "--target-epsilon",
        "3",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    let r = cohort::simulate::run(Cli::parse_from(argv).args)
        .await
        .unwrap();
    assert_eq!(r.rounds.len(), 20, "every round within the budget");
    let eps: Vec<f64> = r.rounds.iter().map(|x| x.epsilon.unwrap()).collect();
    assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
    let last = eps[19];
    assert!(last <= 3.0 && last > 2.9, "ε {last}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["privacy"]["mechanism"], "distributed");
    assert!((json["privacy"]["epsilon"].as_f64().unwrap() - last).abs() < 1e-12);
    let acc = r.federated_accuracy.unwrap();
    assert!(acc > 0.6, "held-out accuracy {acc}");
    // Without --clip-norm, or noise settings without --dp, the run is refused by name.
    for (bad, says) in [
        (
            &["--dp", "central", "--noise-multiplier", "1"][..],
            "--clip-norm",
        ),
        (&["--noise-multiplier", "1"][..], "--dp"),
        (
            &["--dp", "central", "--clip-norm", "1"][..],
            "--target-epsilon",
        ),
    ] {
        let mut argv = vec!["simulate", "--quiet", "--participants", "3"];
        argv.extend_from_slice(bad);
        let e = cohort::simulate::run(Cli::parse_from(argv).args)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
}
