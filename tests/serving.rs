//! Serving the global model, end to end with the real binary: the Inference service embedded
//! in a coordinator and a stand-alone `cohort serve` following the registry, both answering
//! continuous requests over mutual TLS while versions are promoted and rolled back.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cohort_protocol::pb::{self, inference_client::InferenceClient};
use tonic::transport::Channel;

mod common;
use common::*;

/// One example of the breast-cancer table's 30 features.
fn example(i: usize, label: Option<u32>) -> pb::Example {
    pb::Example {
        features: (0..30)
            .map(|k| ((i * 31 + k) % 17) as f32 / 8.0 - 1.0)
            .collect(),
        label,
        raw: Default::default(),
    }
}

async fn served_version(c: &mut InferenceClient<Channel>) -> Option<u64> {
    let info = c
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    info.variants
        .iter()
        .find(|v| v.model.as_ref().unwrap().variant == "a")
        .map(|v| v.model.as_ref().unwrap().version)
}

async fn wait_version(c: &mut InferenceClient<Channel>, version: u64) {
    let until = Instant::now() + Duration::from_secs(20);
    while served_version(c).await != Some(version) {
        assert!(Instant::now() < until, "version {version} is not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole HTTP/1.1 response to `GET path`.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics")
}

/// The value of the series `name{labels…}` whose labels include every one of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// What each load client saw: (version, variant) per answered request, and failures.
#[derive(Default)]
struct Seen {
    answers: Vec<(u64, String)>,
    failures: Vec<String>,
}

/// `n` clients sending Predict (every third one labelled) until `stop`.
fn load(
    clients: Vec<InferenceClient<Channel>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut i = k * 1000;
                while !*stop.borrow() {
                    i += 1;
                    let label = (i % 3 == 0).then_some((i % 2) as u32);
                    match c
                        .predict(pb::PredictRequest {
                            example: Some(example(i, label)),
                        })
                        .await
                    {
                        Ok(r) => {
                            let r = r.into_inner();
                            let p = r.prediction.unwrap();
                            assert_eq!(p.probabilities.len(), 2);
                            assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                            let m = r.model.unwrap();
                            seen.answers.push((m.version, m.variant));
                        }
                        Err(e) => seen.failures.push(format!("{e:?}")),
                    }
                }
                seen
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promotions_switch_both_servers_under_load_with_no_failed_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    provision(dir);
    let shares = write_shares(dir);

    // A 3-round job in batch mode makes versions 0..3.
    let port = free_port();
    let allowed = r#""hospital-0", "hospital-1", "hospital-2""#;
    let job = job_section("serve-job", 3, 20.0);
    let cfg = coordinator_config(dir, port, allowed, &format!("[job]\n{job}"));
    let coord = spawn_coordinator(&cfg);
    let mut parts: Vec<Proc> = (0..3)
        .map(|i| spawn_participant(dir, &coord.addr, i, &shares[i], 0))
        .collect();
    let mut coord = coord;
    assert!(coord.proc.wait_for_exit(Duration::from_secs(120)).success());
    for p in &mut parts {
        assert!(p.wait_for_exit(Duration::from_secs(30)).success());
    }

    // The coordinator again, in service mode, serving inference itself.
    let cfg = coordinator_config(
        dir,
        port,
        allowed,
        "[inference]\ndevice = \"cpu\"\nmax_batch = 8\nmax_wait_us = 1000\n",
    );
    let coord = spawn_coordinator(&cfg);
    // And a stand-alone server on the same registry, with an A/B split: version 1 keeps a
    // quarter of the traffic once another version is promoted.
    let pki = dir.join("pki");
    let (_serve, serve_addr, serve_metrics) = spawn_serve(
        dir,
        &format!(
            r#"
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
model_dir = "{models}"
watch_interval_ms = 100

{sections}
[inference]
device = "wgpu"
max_batch = 16
max_wait_us = 2000

[inference.candidate]
version = 1
share = 0.25
"#,
            models = dir.join("models").display(),
            sections = coordinator_sections(&pki)
        ),
        &[],
    );

    let mut embedded = inference_client(dir, "inference/app", &coord.addr).await;
    let mut alone = inference_client(dir, "inference/app", &serve_addr).await;
    // Nothing is promoted yet.
    let e = embedded
        .predict(pb::PredictRequest {
            example: Some(example(0, None)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // A participant's certificate is refused; an admin's is accepted.
    let mut hospital = inference_client(dir, "participants/hospital-0", &coord.addr).await;
    let e = hospital
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let mut hospital = inference_client(dir, "participants/hospital-0", &serve_addr).await;
    let e = hospital
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    inference_client(dir, "admins/ops", &serve_addr)
        .await
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap();

    assert!(http_get(&serve_metrics, "/ready").starts_with("HTTP/1.1 503"));
    admin(dir, &coord.addr, &["models", "promote", "serve-job", "1"]);
    wait_version(&mut embedded, 1).await;
    wait_version(&mut alone, 1).await;
    assert!(http_get(&serve_metrics, "/ready").starts_with("HTTP/1.1 200"));

    // Bad input is named.
    let e = alone
        .predict(pb::PredictRequest {
            example: Some(pb::Example {
                features: vec![0.5; 29],
                label: None,
                raw: Default::default(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("30 features"), "{}", e.message());

    // Continuous requests to both servers while version 2, then 3 are promoted and the
    // promotion of 3 is rolled back to 2.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(inference_client(dir, "inference/app", &coord.addr).await);
    }
    let embedded_load = load(clients, stop.clone());
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(inference_client(dir, "inference/app", &serve_addr).await);
    }
    let alone_load = load(clients, stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (step, want) in [("promote 2", 2), ("promote 3", 3), ("rollback", 2)] {
        let args: Vec<&str> = match step {
            "rollback" => vec!["models", "rollback"],
            s => vec!["models", "promote", "serve-job", &s[8..]],
        };
        admin(dir, &coord.addr, &args);
        wait_version(&mut embedded, want).await;
        wait_version(&mut alone, want).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop_tx.send(true).unwrap();

    let mut totals = BTreeMap::new();
    for (name, tasks) in [("embedded", embedded_load), ("cohort serve", alone_load)] {
        let mut answered = 0;
        let mut a_versions = Vec::new();
        let mut b_after_switch = (0usize, 0usize);
        for t in tasks {
            let seen = t.await.unwrap();
            assert!(
                seen.failures.is_empty(),
                "{name}: {} requests failed, e.g. {}",
                seen.failures.len(),
                seen.failures[0]
            );
            answered += seen.answers.len();
            let mine: Vec<u64> = seen
                .answers
                .iter()
                .filter(|(_, v)| v == "a")
                .map(|(n, _)| *n)
                .collect();
            // One client's requests follow the promotions in order: 1, 2, 3, then back to 2.
            let mut steps = mine.clone();
            steps.dedup();
            assert_eq!(steps, vec![1, 2, 3, 2], "{name}: versions seen in order");
            a_versions.extend(mine);
            for (v, variant) in &seen.answers {
                if *v != 1 || variant == "b" {
                    b_after_switch.0 += 1;
                    b_after_switch.1 += usize::from(variant == "b");
                }
            }
        }
        if name == "cohort serve" {
            let share = b_after_switch.1 as f64 / b_after_switch.0 as f64;
            assert!(
                (share - 0.25).abs() < 0.05,
                "{name}: candidate share {share:.3} of {} requests",
                b_after_switch.0
            );
        } else {
            assert_eq!(b_after_switch.1, 0, "the embedded server has no candidate");
        }
        assert!(answered > 50, "{name}: only {answered} requests answered");
        totals.insert(name, answered);
    }
    eprintln!("answered with no failure during 3 switches: {totals:?}");

    // ModelInfo: both variants, their shares, the device.
    let info = alone
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.device, "wgpu");
    let variant_shares: Vec<(String, u64, f64)> = info
        .variants
        .iter()
        .map(|v| {
            let m = v.model.as_ref().unwrap();
            (m.variant.clone(), m.version, v.share)
        })
        .collect();
    assert_eq!(
        variant_shares,
        vec![("a".into(), 2, 0.75), ("b".into(), 1, 0.25)],
        "{info:?}"
    );
    assert_eq!(info.variants[0].input_len, 30);
    assert!(info.variants[0].eval_accuracy.unwrap() > 0.8);

    // A batch is answered by one version, and the same version gives the same logits on
    // the stand-alone server's wgpu device (lavapipe in CI) as on the coordinator's CPU.
    let batch = pb::PredictBatchRequest {
        examples: (0..64).map(|i| example(i, None)).collect(),
    };
    let on_cpu = embedded
        .predict_batch(batch.clone())
        .await
        .unwrap()
        .into_inner();
    let cpu_model = on_cpu.model.unwrap();
    assert_eq!((cpu_model.version, cpu_model.device.as_str()), (2, "cpu"));
    let on_gpu = loop {
        let r = alone
            .predict_batch(batch.clone())
            .await
            .unwrap()
            .into_inner();
        // Variant b (version 1) answers a quarter of the batches.
        if r.model.as_ref().unwrap().version == 2 {
            break r;
        }
    };
    assert_eq!(on_gpu.model.unwrap().device, "wgpu");
    assert_eq!(on_gpu.predictions.len(), 64);
    let diff = on_cpu
        .predictions
        .iter()
        .zip(&on_gpu.predictions)
        .flat_map(|(a, b)| a.logits.iter().zip(&b.logits).map(|(x, y)| (x - y).abs()))
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "wgpu and CPU logits differ by {diff}");

    // `cohort predict` from the shell, with the client.toml `cohort provision` wrote.
    let predict = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("predict")
            .arg("--config")
            .arg(pki.join("inference/app/client.toml"))
            .args(["--server", &format!("https://{serve_addr}"), "--csv"])
            .arg(&shares[0])
            .args(args);
        c
    };
    let text = succeed(&mut predict(&[
        "--label",
        "diagnosis",
        "--limit",
        "50",
        "--batch",
        "16",
    ]));
    assert!(
        text.contains("serving serve-job v2 (variant a, 75% of requests)"),
        "{text}"
    );
    assert!(text.contains("50 rows answered; by version:"), "{text}");
    assert!(text.contains("accuracy "), "{text}");
    // Rows prepared as hospital-0 prepares its own (its exported statistics): the served
    // model classifies them well.
    let site = dir.join("hospital-0-standardizer.json");
    succeed(
        Command::new(BIN)
            .args(["participant", "--config"])
            .arg(dir.join("participant-0.toml"))
            .arg("--export-standardizer")
            .arg(&site),
    );
    let text = succeed(predict(&["--label", "diagnosis", "--standardizer"]).arg(&site));
    let accuracy: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("accuracy "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(accuracy > 0.9, "{text}");
    // A CSV without the label column: the model wants 30 features, the file has 31 columns.
    let out = predict(&["--limit", "3"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("InvalidArgument") && err.contains("30 features"),
        "{err}"
    );

    // Metrics of the stand-alone server: requests per version, latency, batches, quality.
    let text = scrape(&serve_metrics);
    let ok = series(
        &text,
        "cohort_inference_requests_total",
        &["outcome=\"ok\""],
    );
    assert!(ok as usize >= totals["cohort serve"], "{ok}\n{text}");
    for v in ["1", "2", "3"] {
        assert!(
            series(
                &text,
                "cohort_inference_requests_total",
                &[&format!("version=\"{v}\""), "outcome=\"ok\""]
            ) > 0.0,
            "no answers from version {v}"
        );
    }
    assert_eq!(
        series(
            &text,
            "cohort_inference_requests_total",
            &["outcome=\"invalid\""]
        ),
        2.0
    );
    assert!(
        series(
            &text,
            "cohort_inference_request_duration_seconds_count",
            &[]
        ) >= ok
    );
    assert!(series(&text, "cohort_inference_batch_size_count", &[]) > 0.0);
    assert!(series(&text, "cohort_inference_labelled_total", &["variant=\"b\""]) > 0.0);
    assert_eq!(
        series(&text, "cohort_inference_reloads_total", &["outcome=\"ok\""]),
        4.0
    );
    assert_eq!(
        series(
            &text,
            "cohort_inference_device",
            &["device=\"wgpu\"", "precision=\"f32\""]
        ),
        1.0
    );
    alert_rules_name_exported_metrics(|name| name.starts_with("cohort_inference_"), &text);
    // The coordinator exports the same families for its embedded server.
    let text = scrape(&coord.metrics);
    assert!(
        series(
            &text,
            "cohort_inference_requests_total",
            &["outcome=\"ok\""]
        ) > 0.0
    );
}
