//! The runnable examples (`cargo run --release --example …`), each against real processes:
//! an operator's program drives a job through the Admin API while one of the three hospitals
//! is a participant embedded in another program, fed its records in memory; then an
//! application asks the promoted model for predictions.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{KEY_PASSPHRASE, KEY_PASSPHRASE_ENV, Proc};

/// An example's binary, built by `cargo test` next to the test binaries.
fn example(name: &str) -> PathBuf {
    let bin = Path::new(common::BIN);
    let path = bin.parent().unwrap().join("examples").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

#[test]
fn an_admin_program_drives_a_job_that_an_embedded_participant_trains_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = common::provision(d);
    let shares = common::write_shares(d);
    // A coordinator with no job of its own (the admin program creates it), embedding the
    // Inference service.
    let cfg = common::coordinator_config(
        d,
        common::free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        "[inference]\ndevice = \"cpu\"\n",
    );
    let coord = common::spawn_coordinator(&cfg);
    let _parts: Vec<Proc> = [0, 2]
        .into_iter()
        .map(|i| common::spawn_participant(d, &coord.addr, i, &shares[i], 0))
        .collect();
    // hospital-1 runs inside another program, which reads its records itself.
    let embedded_cfg = d.join("embedded.toml");
    std::fs::write(
        &embedded_cfg,
        format!(
            r#"coordinator = "https://{addr}"
id = "hospital-1"
poll_wait_ms = 2000
[tls]
ca = "{pki}/participants/hospital-1/ca.pem"
cert = "{pki}/participants/hospital-1/cert.pem"
key = "{pki}/participants/hospital-1/key.pem"
key_passphrase_env = "{KEY_PASSPHRASE_ENV}"
[data]
format = "csv"
path = "not-read.csv"
"#,
            addr = coord.addr,
            pki = pki.display()
        ),
    )
    .unwrap();
    let embedded = Command::new(example("embedded_participant"))
        .arg(&embedded_cfg)
        .arg(&shares[1])
        .env(KEY_PASSPHRASE_ENV, KEY_PASSPHRASE)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The operator's program: create, start, follow, promote.
    let admin_cfg = d.join("admin.toml");
    std::fs::write(
        &admin_cfg,
        format!(
            r#"coordinator = "https://{addr}"
[tls]
ca = "{pki}/admins/ops/ca.pem"
cert = "{pki}/admins/ops/cert.pem"
key = "{pki}/admins/ops/key.pem"
"#,
            addr = coord.addr,
            pki = pki.display()
        ),
    )
    .unwrap();
    let spec = d.join("job.toml");
    std::fs::write(&spec, common::job_spec("examples", 2, 60.0)).unwrap();
    let out = Command::new(example("admin_client"))
        .arg(&admin_cfg)
        .arg(&spec)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "admin_client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "created job examples (2 rounds",
        "round 1 completed",
        "round 2 completed",
        "job examples finished: 2 of 2 rounds",
        "promoted version 2 of job examples",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    // The embedded participant trained both rounds and exits with the job.
    let mut embedded = Proc {
        child: embedded,
        name: "embedded_participant".into(),
    };
    let status = embedded.wait_for_exit(Duration::from_secs(60));
    let mut stdout = String::new();
    std::io::Read::read_to_string(embedded.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(
        status.success(),
        "embedded participant exited with {status}: {stdout}"
    );
    assert!(
        stdout.contains("hospital-1: trained 2 rounds"),
        "embedded participant: {stdout}"
    );
    let status = common::admin(d, &coord.addr, &["jobs", "status", "examples"]);
    assert!(status.contains("finished"), "{status}");

    // The application: the promoted version answers every row of a share.
    let client_cfg = d.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            r#"server = "https://{addr}"
[tls]
ca = "{pki}/inference/app/ca.pem"
cert = "{pki}/inference/app/cert.pem"
key = "{pki}/inference/app/key.pem"
"#,
            addr = coord.addr,
            pki = pki.display()
        ),
    )
    .unwrap();
    let rows = std::fs::read_to_string(&shares[0]).unwrap().lines().count() - 1;
    let out = Command::new(example("predict_client"))
        .arg(&client_cfg)
        .arg(&shares[0])
        .arg("diagnosis")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "predict_client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!("answered {rows} of {rows} rows with job examples version 2");
    assert!(text.contains(&want), "{want:?} not in:\n{text}");
    assert!(text.contains("row 0: class "), "{text}");
}

/// A Burn module written in an example (outside cohort's crates), registered and federated
/// by `cohort simulate`'s code with secure aggregation; its final version is promoted to the
/// Inference service and answers every held-out row with the federated accuracy.
#[test]
fn a_custom_burn_model_from_an_example_trains_securely_and_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(example("custom_model"))
        .args([
            "--participants",
            "4",
            "--rounds",
            "8",
            "--epochs",
            "2",
            "--quiet",
        ])
        .args(["--no-baseline", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "custom_model: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("residual-mlp: federated accuracy"))
        .unwrap_or_else(|| panic!("{text}"));
    let number = |after: &str| -> f64 {
        line.split(after)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches(',')
            .parse()
            .unwrap()
    };
    let (fed, served) = (number("federated accuracy "), number("served accuracy "));
    assert!(fed > 0.9, "{line}");
    assert_eq!(fed, served, "{line}");
    // The registry's manifest names the custom model.
    let manifests: Vec<PathBuf> = std::fs::read_dir(dir.path().join("models/simulation"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let last = manifests.iter().max().unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last).unwrap()).unwrap();
    assert_eq!(m["model"]["kind"], "custom", "{m}");
    assert_eq!(m["model"]["name"], "residual-mlp", "{m}");
}
