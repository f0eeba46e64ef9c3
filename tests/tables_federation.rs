//! A real federation on tables with missing values and text categories: a coordinator process
//! whose job declares the tables' schema (`cohort schema`), three participant processes with
//! `format = "table"`, round 0 through secure aggregation, a `kill -9` of the coordinator after
//! round 1, and the resumed job (which keeps round 0's statistics) to its end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::*;

/// Three shares of the messy table (row i to share i % 3), with its header.
fn messy_shares(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(messy_table(dir)).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let mut shares = vec![format!("{header}\n"); 3];
    for (i, row) in lines.enumerate() {
        shares[i % 3] += &format!("{row}\n");
    }
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = dir.join(format!("site-{i}.csv"));
            std::fs::write(&p, s).unwrap();
            p
        })
        .collect()
}

fn spawn_table_participant(dir: &Path, addr: &str, i: usize, share: &Path) -> Proc {
    let cfg = format!(
        r#"
coordinator = "https://{addr}"
id = "hospital-{i}"
poll_wait_ms = 2000
[tls]
ca = "{pki}/participants/hospital-{i}/ca.pem"
cert = "{pki}/participants/hospital-{i}/cert.pem"
key = "{pki}/participants/hospital-{i}/key.pem"
key_passphrase_env = "{KEY_PASSPHRASE_ENV}"
[data]
format = "table"
path = "{path}"
test_fraction = 0.2
seed = {i}
"#,
        path = share.display(),
        pki = dir.join("pki").display()
    );
    let p = dir.join(format!("participant-{i}.toml"));
    std::fs::write(&p, cfg).unwrap();
    let child = Command::new(BIN)
        .args(["participant", "--config"])
        .arg(&p)
        .env(KEY_PASSPHRASE_ENV, KEY_PASSPHRASE)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proc {
        child,
        name: format!("participant {i}"),
    }
}

#[test]
fn a_federation_on_messy_tables_agrees_on_one_pipeline_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    provision(d);
    let shares = messy_shares(d);
    // The job's [data] section, inferred from the first site's file.
    let data = succeed(Command::new(BIN).arg("schema").arg(&shares[0]).args([
        "--label",
        "diagnosis",
        "--in-coordinator-toml",
    ]));
    assert!(data.contains("[job.data.schema]"), "{data}");
    assert!(data.contains("type = \"categorical\""), "{data}");
    let inputs: usize = data
        .split("model takes")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no input width in {data}"));
    let job = format!(
        r#"
[job]
id = "messy"
rounds = 3
min_participants = 3
min_updates = 3
round_timeout_secs = 60
eval_timeout_secs = 20
liveness_timeout_secs = 10
seed = 7

[job.model]
kind = "logistic"
inputs = {inputs}
classes = 2

[job.train]
epochs = 3
batch_size = 16
learning_rate = 0.1
optimizer = "sgd"
seed = 1

[job.secure_aggregation]
committee_size = 3
t_min = 2
decrypt_timeout_secs = 20

{data}"#
    );
    let cfg = coordinator_config(
        d,
        free_port(),
        r#""hospital-0", "hospital-1", "hospital-2""#,
        &job,
    );
    let coord = spawn_coordinator(&cfg);
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| spawn_table_participant(d, &coord.addr, i, &shares[i]))
        .collect();
    // Round 0: every site's statistics, decrypted only as their sum, then committed.
    coord.wait_log(
        &["committee asked to decrypt", "round=0"],
        Duration::from_secs(120),
    );
    let line = coord.wait_log(&["round 0 committed"], Duration::from_secs(60));
    assert!(line.contains("3 sites"), "{line}");
    coord.wait_log(
        &["model version committed", "round=1"],
        Duration::from_secs(120),
    );
    // kill -9 after round 1: the restarted coordinator resumes from the state, with round 0's
    // statistics (it does not ask the sites again).
    let pid = coord.proc.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    drop(coord);
    let mut coord = spawn_coordinator(&cfg);
    coord.wait_log(&["resuming the job"], Duration::from_secs(30));
    let status = coord.proc.wait_for_exit(Duration::from_secs(180));
    assert!(status.success(), "coordinator exited with {status}");
    let mut rounds_after_restart = Vec::new();
    while let Ok(line) = coord.log.try_recv() {
        if line.contains("round started") {
            rounds_after_restart.push(line);
        }
    }
    assert!(
        rounds_after_restart.iter().all(|l| !l.contains("round=0")),
        "round 0 ran again after the restart: {rounds_after_restart:?}"
    );
    for p in parts.iter_mut() {
        let s = p.wait_for_exit(Duration::from_secs(30));
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("models/messy/v00003.json")).unwrap())
            .unwrap();
    let acc = manifest["eval"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "held-out accuracy after 3 rounds: {acc}");
}
