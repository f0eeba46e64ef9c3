//! A real federation on tables with missing values and text categories: a coordinator process
//! whose job declares the tables' schema (`cohort schema`), three participant processes with
//! `format = "table"`, round 0 through secure aggregation, a `kill -9` of the coordinator after
//! round 1, and the resumed job (which keeps round 0's statistics) to its end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::*;

/// Three shares of the messy table (row i to share i % 3), with its header.
fn messy_shares(dir: &Path) -> Vec<PathBuf> {
    split_three(
        dir,
        &std::fs::read_to_string(messy_table(dir)).unwrap(),
        "site",
    )
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
[faults]
upload_delay_ms = 400
"#,
        path = share.display(),
        pki = dir.join("pki").display()
    );
    spawn_participant_config(dir, i, &cfg)
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
rounds = 4
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
    // The federation's summary table, from the statistics the state kept (each round now
    // takes at least the participants' 400 ms upload delay, so the job is still running).
    let stats = admin(d, &coord.addr, &["jobs", "stats", "messy"]);
    // `cohort stats JOB` is the same table.
    let alias = succeed(
        Command::new(BIN)
            .args(["stats", "messy", "--config"])
            .arg(d.join("pki/admins/ops/admin.toml"))
            .args(["--coordinator", &format!("https://{}", coord.addr)]),
    );
    assert_eq!(alias, stats);
    assert!(stats.contains("over 3 sites"), "{stats}");
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("grade") && l.contains("categorical")),
        "{stats}"
    );
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("smoker") && l.contains("boolean")),
        "{stats}"
    );
    // A numeric column's quartiles from the federation's histogram (P25, MEDIAN, P75 are
    // the 7th to 9th columns).
    let radius = stats
        .lines()
        .find(|l| l.starts_with("mean_radius"))
        .unwrap_or_else(|| panic!("{stats}"));
    let q: Vec<f64> = radius
        .split_whitespace()
        .skip(6)
        .take(3)
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        q[0] <= q[1] && q[1] <= q[2] && q[1] > 10.0 && q[1] < 17.0,
        "{radius}"
    );
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
        serde_json::from_str(&std::fs::read_to_string(d.join("models/messy/v00004.json")).unwrap())
            .unwrap();
    let acc = manifest["eval"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "held-out accuracy after 4 rounds: {acc}");
    // A centralised model with the same preprocessing: the three sites' training rows
    // pooled (split as each site splits its own), prepared by the federation's pipeline,
    // trained for as many epochs as each site ran in all, and scored on the pooled
    // held-out rows, which is what the version's federated evaluation averages over.
    let pipeline: cohort_model::tabular::Pipeline =
        serde_json::from_value(manifest["pipeline"].clone()).unwrap();
    let spec = cohort_model::tabular::DataSpec {
        schema: pipeline.schema.clone(),
        options: Default::default(),
    };
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, share) in shares.iter().enumerate() {
        let text = std::fs::read_to_string(share).unwrap();
        let t = cohort_participant::SiteTables::read(&text, share, &spec, 0.2, i as u64).unwrap();
        let local = t.prepare(&pipeline).unwrap();
        train.push(local.train);
        test.push(local.test);
    }
    let train = cohort_model::Dataset::concat(&train.iter().collect::<Vec<_>>()).unwrap();
    let test = cohort_model::Dataset::concat(&test.iter().collect::<Vec<_>>()).unwrap();
    let model = cohort_model::ModelSpec::Logistic {
        inputs: pipeline.width(),
        classes: 2,
    };
    let cfg = cohort_model::TrainConfig {
        epochs: 3 * 4,
        batch_size: 16,
        learning_rate: 0.1,
        optimizer: cohort_model::Optimizer::Sgd,
        seed: 1,
        proximal_mu: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let (params, _) = cohort_model::train(
        &model,
        &model.initial_parameters(7),
        &train,
        &cfg,
        cohort_model::ComputeDevice::Cpu,
    )
    .unwrap();
    let central = cohort_model::evaluate(&model, &params, &test, cohort_model::ComputeDevice::Cpu)
        .unwrap()
        .accuracy;
    eprintln!("federated {acc}, centralised {central} (same preprocessing)");
    assert!(
        (acc - central).abs() <= 0.015,
        "federated {acc} vs centralised {central} with the same preprocessing"
    );
    // Every trained version carries the pipeline; the initial model does not.
    assert!(manifest["pipeline"]["steps"].is_array(), "{manifest}");
    // Rows of the site whose file the schema was inferred from: every category but the one
    // made up there is in the vocabulary.
    serve_raw_rows(
        d,
        &shares[0],
        &serde_json::from_value(manifest["pipeline"].clone()).unwrap(),
    );
}

/// `cohort serve` answers raw rows of version 4 (a missing value, an unseen category) with
/// the probabilities the model gives the rows a site prepares from its file; `cohort predict`
/// sends a raw CSV.
fn serve_raw_rows(d: &Path, share: &Path, pipeline: &cohort_model::tabular::Pipeline) {
    use cohort_protocol::pb;
    // Promote version 4 in the registry `cohort serve` follows.
    let kek = d.join("pki/coordinator/kek");
    let store = cohort_coordinator::ModelStore::open_encrypted(
        d.join("models"),
        std::sync::Arc::new(cohort_storage::load_key_dir(&kek).unwrap()),
    )
    .unwrap();
    store
        .write_serving(&cohort_storage::ModelRef {
            job_id: "messy".into(),
            version: 4,
        })
        .unwrap();
    let (_serve, addr, _) = spawn_serve(
        d,
        &format!(
            "listen = \"127.0.0.1:0\"\nmodel_dir = \"{}\"\nwatch_interval_ms = 100\n{}\n[inference]\ndevice = \"cpu\"\n",
            d.join("models").display(),
            coordinator_sections(&d.join("pki"))
        ),
        &[],
    );
    // Ten rows of a site's file, the first with a missing value and an unseen category.
    let text = std::fs::read_to_string(share).unwrap();
    let mut lines: Vec<String> = text.lines().take(11).map(str::to_string).collect();
    let header: Vec<String> = lines[0].split(',').map(str::to_string).collect();
    let grade = header.iter().position(|h| h == "grade").unwrap();
    let mut first: Vec<String> = lines[1].split(',').map(str::to_string).collect();
    first[0] = "NA".into();
    first[grade] = "V".into();
    lines[1] = first.join(",");
    let csv = lines.join("\n") + "\n";
    let raw_csv = d.join("raw.csv");
    std::fs::write(&raw_csv, &csv).unwrap();
    // The site's side: its file read against the schema, prepared by the pipeline, and the
    // model's probabilities for those features.
    let table =
        cohort_model::tabular::Table::parse(&csv, Path::new("raw.csv"), &pipeline.schema).unwrap();
    let (prepared, report) = pipeline.transform(&table).unwrap();
    assert!(
        report.imputed >= 1 && report.unknown_categories == 1,
        "{report:?}"
    );
    let params = store.for_job("messy").read_params(4).unwrap();
    let spec = cohort_model::ModelSpec::Logistic {
        inputs: pipeline.width(),
        classes: 2,
    };
    let model = cohort_model::infer::InferenceModel::load(
        &spec,
        &params,
        cohort_model::ComputeDevice::Cpu,
        Default::default(),
    )
    .unwrap();
    let logits = model.logits(&prepared.features, prepared.len()).unwrap();
    let site_probs: Vec<f32> = logits
        .chunks(2)
        .flat_map(|l| {
            let m = l[0].max(l[1]);
            let e = [(l[0] - m).exp(), (l[1] - m).exp()];
            [e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])]
        })
        .collect();
    // The server's side: the same rows raw, keyed by column name.
    let examples: Vec<pb::Example> = lines[1..]
        .iter()
        .map(|l| pb::Example {
            features: Vec::new(),
            label: None,
            raw: header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .filter(|(k, _)| k != "diagnosis")
                .collect(),
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let served: Vec<f32> = rt.block_on(async {
        let mut c = inference_client(d, "inference/app", &addr).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match c
                .predict_batch(pb::PredictBatchRequest {
                    examples: examples.clone(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    assert_eq!(r.model.unwrap().version, 4);
                    return r
                        .predictions
                        .iter()
                        .flat_map(|p| p.probabilities.clone())
                        .collect();
                }
                Err(e)
                    if e.code() == tonic::Code::Unavailable
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    assert_eq!(served.len(), site_probs.len());
    for (a, b) in served.iter().zip(&site_probs) {
        assert!(
            (a - b).abs() < 1e-6,
            "served {served:?}\nsite {site_probs:?}"
        );
    }
    // `cohort predict` sends the raw CSV (its label column scored) and the raw rows as JSON.
    let out = succeed(
        Command::new(BIN)
            .arg("predict")
            .arg("--config")
            .arg(d.join("pki/inference/app/client.toml"))
            .args(["--server", &format!("https://{addr}"), "--csv"])
            .arg(&raw_csv),
    );
    assert!(
        out.contains("10 rows answered") && out.contains("accuracy"),
        "{out}"
    );
    let json: Vec<serde_json::Value> = examples
        .iter()
        .map(|e| serde_json::to_value(&e.raw).unwrap())
        .collect();
    let raw_json = d.join("raw.json");
    std::fs::write(&raw_json, serde_json::to_string(&json).unwrap()).unwrap();
    let out = succeed(
        Command::new(BIN)
            .arg("predict")
            .arg("--config")
            .arg(d.join("pki/inference/app/client.toml"))
            .args(["--server", &format!("https://{addr}"), "--json"])
            .arg(&raw_json),
    );
    assert!(out.contains("10 rows answered"), "{out}");
}
