//! Simulation workers (`cohort simulate --workers N`): the participants in separate worker
//! processes (the real `cohort sim-worker`, mutual-TLS gRPC to the driver), each sending one
//! partial sum a round, give the single-process engine's model, bit for bit; workers started
//! elsewhere dial in (the Kubernetes Indexed Job's way); a worker that fails or holds other
//! data stops the run with a message that says so.

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use cohort::simulate::{SimArgs, SimReport, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

const BIN: &str = env!("CARGO_BIN_EXE_cohort");

fn args(out: &std::path::Path, extra: &[&str]) -> SimArgs {
    let mut argv = vec![
        "simulate",
        "--quiet",
        "--no-baseline",
        "--worker-command",
        BIN,
        "--out",
        out.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).args
}

fn weights(r: &SimReport) -> &str {
    r.model_path.rsplit('/').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_two_and_three_worker_processes_give_the_single_process_model() {
    let data = "/usr/share/datasets/fashion-mnist";
    assert!(std::path::Path::new(data).is_dir(), "{data} is missing");
    let dir = tempfile::tempdir().unwrap();
    // 600 participants, 60 a round, secure aggregation with real encryption and three
    // dedicated key custodians (in the driver), 2 rounds.
    let job = [
        "--dataset",
        data,
        "--participants",
        "600",
        "--fraction",
        "0.1",
        "--rounds",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--custodians",
        "3",
    ];
    let mut models = Vec::new();
    for workers in ["0", "1", "2", "3"] {
        let mut extra = job.to_vec();
        extra.extend(["--workers", workers]);
        let r = run(args(&dir.path().join(workers), &extra)).await.unwrap();
        assert_eq!(r.engine, "virtual");
        assert_eq!(r.rounds.len(), 2);
        assert!(r.rounds.iter().all(|x| x.participants == 60), "{workers}");
        assert_eq!(r.served_rows, 10_000);
        let seconds = r.engine_seconds.as_ref().unwrap();
        assert!(
            seconds.train > 0.0 && seconds.encrypt > 0.0,
            "the workers report their time: {seconds:?}"
        );
        let accuracy: Vec<Option<f64>> = r.rounds.iter().map(|x| x.eval_accuracy).collect();
        models.push((workers, weights(&r).to_string(), accuracy));
    }
    for (workers, model, accuracy) in &models[1..] {
        assert_eq!(
            model, &models[0].1,
            "{workers} workers: a different model than in one process"
        );
        assert_eq!(accuracy, &models[0].2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_emulated_jobs_and_dropouts_run_in_workers_too() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        (
            "emulated",
            &[
                "--secure",
                "emulated",
                "--dropout",
                "0.2",
                "--clip-norm",
                "0.5",
            ][..],
        ),
        ("plaintext", &["--plaintext"][..]),
        // SCAFFOLD: each worker keeps its participants' control variates; half of them a
        // round, so some carry theirs over rounds they sit out.
        (
            "scaffold",
            &[
                "--secure",
                "emulated",
                "--strategy",
                "scaffold",
                "--fraction",
                "0.5",
            ][..],
        ),
    ] {
        let job = |workers: &'static str| {
            let mut a = vec![
                "--participants",
                "40",
                "--rounds",
                "3",
                "--round-timeout",
                "5",
                "--workers",
                workers,
            ];
            a.extend_from_slice(extra);
            a
        };
        let one = run(args(&dir.path().join(format!("{name}-1")), &job("0")))
            .await
            .unwrap();
        let two = run(args(&dir.path().join(format!("{name}-2")), &job("2")))
            .await
            .unwrap();
        let stragglers =
            |r: &SimReport| -> Vec<usize> { r.rounds.iter().map(|x| x.stragglers.len()).collect() };
        assert_eq!(stragglers(&one), stragglers(&two), "{name}");
        if name != "plaintext" {
            // Exact sums: the same model.
            assert_eq!(weights(&one), weights(&two), "{name}");
            if name == "emulated" {
                assert!(stragglers(&one).iter().any(|&s| s > 0));
            }
        } else {
            // An f64 sum grouped by worker: the same up to rounding.
            let (a, b) = (
                one.federated_accuracy.unwrap(),
                two.federated_accuracy.unwrap(),
            );
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_worker_stops_the_run_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(
        dir.path(),
        &[
            "--participants",
            "20",
            "--rounds",
            "2",
            "--plaintext",
            "--workers",
            "2",
        ],
    );
    a.worker_command = Some("/bin/false".into());
    let e = tokio::time::timeout(Duration::from_secs(60), run(a))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(format!("{e:#}").contains("exited with"), "{e:#}");
    // Secure rounds with workers need the driver's custodians, and say so.
    let e = run(args(
        dir.path(),
        &["--participants", "20", "--workers", "2"],
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("--custodians"), "{e}");
}

/// Workers started elsewhere, as a Kubernetes Indexed Job starts them: the driver listens
/// with its own certificate, each worker dials in with `--shard` and the shared worker
/// certificate. A worker whose dataset differs (same path, other rows) is refused and the
/// run stops, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_started_elsewhere_dial_in_and_mismatched_data_is_refused() {
    use cohort_crypto::pki::{Authority, Role, Validity};
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let v = Validity::days(std::time::SystemTime::now(), 1);
    let ca = Authority::generate("sim test CA", &v).unwrap();
    std::fs::write(tls.join("ca.pem"), ca.cert_pem()).unwrap();
    let driver = ca
        .issue(
            "sim-driver",
            Role::Coordinator,
            &["sim-driver".to_string()],
            &["127.0.0.1".parse().unwrap()],
            &v,
        )
        .unwrap();
    std::fs::write(tls.join("driver.pem"), &driver.cert_pem).unwrap();
    std::fs::write(tls.join("driver.key"), &driver.key_pem).unwrap();
    let worker = ca.issue("worker", Role::Participant, &[], &[], &v).unwrap();
    std::fs::write(tls.join("worker.pem"), &worker.cert_pem).unwrap();
    std::fs::write(tls.join("worker.key"), &worker.key_pem).unwrap();
    // The same relative dataset path holds different tables in two directories.
    let table = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv"),
    )
    .unwrap();
    let (here, elsewhere) = (dir.path().join("here"), dir.path().join("elsewhere"));
    for (d, rows) in [(&here, usize::MAX), (&elsewhere, 400)] {
        std::fs::create_dir(d).unwrap();
        let t: Vec<&str> = table.lines().take(rows).collect();
        std::fs::write(d.join("table.csv"), t.join("\n") + "\n").unwrap();
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let start = |shard: &str, cwd: &std::path::Path| {
        Command::new(BIN)
            .current_dir(cwd)
            .args([
                "sim-worker",
                "--driver",
                &format!("https://127.0.0.1:{port}"),
            ])
            .args([
                "--shard",
                shard,
                "--shards",
                "2",
                "--server-name",
                "sim-driver",
            ])
            .arg("--tls")
            .arg(&tls)
            .spawn()
            .unwrap()
    };
    let driver = |out: &str| {
        Command::new(BIN)
            .current_dir(&here)
            .args([
                "simulate",
                "--quiet",
                "--no-baseline",
                "--dataset",
                "table.csv",
            ])
            .args([
                "--label",
                "diagnosis",
                "--participants",
                "10",
                "--rounds",
                "2",
            ])
            .args([
                "--secure",
                "emulated",
                "--workers",
                "2",
                "--workers-listen",
                &listen,
            ])
            .arg("--workers-tls")
            .arg(&tls)
            .arg("--out")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    // Both workers see the driver's table: the job completes, and they exit cleanly.
    let mut workers = [start("0", &here), start("1", &here)];
    let out = driver("ok");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in &mut workers {
        assert!(w.wait().unwrap().success());
    }
    // Worker 1 sees another table under the same name: refused, the run stops naming it.
    let mut workers = [start("0", &here), start("1", &elsewhere)];
    let out = driver("mismatch");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("worker 1's data differs from the driver's"),
        "{text}"
    );
    for w in &mut workers {
        let _ = w.wait();
    }
}
