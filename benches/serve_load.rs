//! Load generator for the Inference service: the Fashion-MNIST CNN served over loopback gRPC,
//! closed-loop clients sending `Predict`, on the CPU and wgpu, f32 and int8, with and
//! without micro-batching. Prints throughput and p50/p99 latency, and the int8 model's
//! accuracy change on the Fashion-MNIST test set.
//!
//! `cargo bench --bench serve_load -- [--seconds 5] [--clients 32] [--devices cpu,wgpu]`
//!
//! The model is trained first (Adam, `--train` examples, one epoch) so the accuracy figures
//! mean something; latency does not depend on the weights. The server is the product's own
//! (`cohort_serving::serve_alone`), without TLS so the figures are the
//! service's and not the handshake's. Needs Debian's dataset-fashion-mnist.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use cohort_coordinator::ModelStore;
use cohort_model::data::{IdxSplit, load_idx_dir};
use cohort_model::train::metrics_from_logits;
use cohort_model::{ComputeDevice, InferenceModel, ModelSpec, Optimizer, Precision, TrainConfig};
use cohort_protocol::pb::{self, inference_client::InferenceClient};
use cohort_serving::{DeviceChoice, Inference, InferenceSettings};
use cohort_storage::ModelRef;

#[derive(Parser)]
struct Args {
    /// Seconds of load per configuration (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Devices to measure.
    #[arg(long, value_delimiter = ',', default_value = "cpu,wgpu")]
    devices: Vec<String>,
    /// Precisions to measure under load.
    #[arg(long, value_delimiter = ',', default_value = "f32,int8")]
    precisions: Vec<Precision>,
    /// Training examples for the served model.
    #[arg(long, default_value_t = 20_000)]
    train: usize,
    /// Fashion-MNIST directory (IDX files).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// A Python with onnx, onnxruntime, grpcio, grpcio-tools and safetensors: also measure
    /// the peer (benches/serve_peer.py, the same model in ONNX Runtime behind grpcio).
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(serde::Serialize)]
struct Row {
    device: String,
    precision: String,
    mode: String,
    max_batch: usize,
    requests: usize,
    throughput_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_batch: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn measure(
    store: &ModelStore,
    to: &ModelRef,
    device: ComputeDevice,
    precision: Precision,
    max_batch: usize,
    args: &Args,
    images: &[Vec<f32>],
) -> Row {
    let settings = InferenceSettings {
        device: match device {
            ComputeDevice::Cpu => DeviceChoice::Cpu,
            ComputeDevice::Wgpu => DeviceChoice::Wgpu,
        },
        precision,
        max_batch,
        max_wait_us: 2_000,
        queue: 4_096,
        ..InferenceSettings::default()
    };
    let metrics = cohort_serving::InferenceMetrics::new();
    let encode = metrics.exporter();
    let inf = Inference::new(store.clone(), settings, metrics).unwrap();
    let (i2, to2) = (inf.clone(), to.clone());
    tokio::task::spawn_blocking(move || i2.switch(&to2))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cohort_serving::serve_alone(
        inf,
        listener,
        None,
        Duration::from_secs(60),
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut lat = drive(addr, args, images).await;
    let _ = stop_tx.send(());
    let _ = server.await;
    lat.sort_by(f64::total_cmp);
    let text = encode();
    let sum_count = |name: &str| -> (f64, f64) {
        let get = |suffix: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}_{suffix}")))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum::<f64>()
        };
        (get("sum"), get("count"))
    };
    let (s, n) = sum_count("cohort_inference_batch_size");
    Row {
        device: device.to_string(),
        precision: precision.to_string(),
        mode: if max_batch == 1 { "single" } else { "batched" }.into(),
        max_batch,
        requests: lat.len(),
        throughput_rps: lat.len() as f64 / args.seconds,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        mean_batch: if n > 0.0 { s / n } else { 0.0 },
    }
}

/// Closed-loop clients sending `Predict` to `addr` for `args.seconds` after a 1-s warm-up;
/// the latencies in milliseconds.
async fn drive(addr: std::net::SocketAddr, args: &Args, images: &[Vec<f32>]) -> Vec<f64> {
    let warm_until = Instant::now() + Duration::from_secs(1);
    let until = warm_until + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for k in 0..args.clients {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let mut c = InferenceClient::new(ch);
        let images: Vec<Vec<f32>> = images
            .iter()
            .skip(k)
            .step_by(args.clients)
            .cloned()
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            loop {
                let t = Instant::now();
                if t >= until {
                    break;
                }
                let features = images[i % images.len()].clone();
                i += 1;
                c.predict(pb::PredictRequest {
                    example: Some(pb::Example {
                        features,
                        label: None,
                        raw: Default::default(),
                    }),
                })
                .await
                .expect("predict");
                if t >= warm_until {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat
}

fn main() {
    let args = Args::parse();
    println!(
        "GPU adapter for `device = \"auto\"`: {}\n",
        if ComputeDevice::gpu_available() {
            "found (auto serves on wgpu)"
        } else {
            "none (auto serves on the CPU)"
        }
    );
    let train = load_idx_dir(&args.data, IdxSplit::Train)
        .unwrap_or_else(|e| panic!("{e} (apt-get install dataset-fashion-mnist)"));
    let test = load_idx_dir(&args.data, IdxSplit::Test).unwrap();
    let spec = ModelSpec::for_shape(train.shape, 10, &[]);
    let t = Instant::now();
    let sub = train.subset(&(0..args.train.min(train.len())).collect::<Vec<_>>());
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 64,
        learning_rate: 3e-3,
        optimizer: Optimizer::Adam,
        seed: 1,
        proximal_mu: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let (params, _) = cohort_model::train(
        &spec,
        &spec.initial_parameters(7),
        &sub,
        &cfg,
        ComputeDevice::Cpu,
    )
    .unwrap();
    eprintln!(
        "trained on {} examples in {:.1} s",
        sub.len(),
        t.elapsed().as_secs_f64()
    );

    // Accuracy of each variant on the whole test set.
    let devices: Vec<ComputeDevice> = args.devices.iter().map(|d| d.parse().unwrap()).collect();
    let x = &test.features;
    println!("## Fashion-MNIST test set (10,000 images)\n");
    println!("| device | precision | accuracy | change vs f32 | int8 tensors |");
    println!("|---|---|---|---|---|");
    let mut accuracy = Vec::new();
    for &dev in &devices {
        let mut f32_acc = 0.0;
        for prec in [Precision::F32, Precision::Int8] {
            let m = InferenceModel::load(&spec, &params, dev, prec).unwrap();
            let logits = m.logits_in_passes(x, 500).unwrap();
            let acc = metrics_from_logits(&logits, &test.labels, 10).accuracy;
            if prec == Precision::F32 {
                f32_acc = acc;
            }
            println!(
                "| {dev} | {prec} | {:.2} % | {:+.2} pt | {} of 8 |",
                acc * 100.0,
                (acc - f32_acc) * 100.0,
                m.quantized_tensors().len()
            );
            accuracy.push((dev.to_string(), prec.to_string(), acc));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    store
        .for_job("bench")
        .write("bench", &spec, "none", 0, &params, None, 0)
        .unwrap();
    let to = ModelRef {
        job_id: "bench".into(),
        version: 0,
    };
    let images: Vec<Vec<f32>> = (0..2000).map(|i| test.row(i).to_vec()).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();
    println!(
        "\n## Load: {} closed-loop clients, {} s per row, Predict (one image) over loopback gRPC\n",
        args.clients, args.seconds
    );
    println!(
        "| device | precision | mode | max batch | requests/s | p50 ms | p99 ms | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &dev in &devices {
        for &prec in &args.precisions {
            for max_batch in [1, 32] {
                let r = rt.block_on(measure(&store, &to, dev, prec, max_batch, &args, &images));
                println!(
                    "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} |",
                    r.device,
                    r.precision,
                    r.mode,
                    r.max_batch,
                    r.throughput_rps,
                    r.p50_ms,
                    r.p99_ms,
                    r.mean_batch
                );
                rows.push(r);
            }
        }
    }
    if let Some(python) = &args.peer_python {
        let weights = dir.path().join("peer.safetensors");
        let net = spec
            .build(&params, &ComputeDevice::Cpu.inference())
            .unwrap();
        std::fs::write(&weights, net.to_safetensors().unwrap()).unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = std::process::Command::new(python)
            .arg(root.join("benches/serve_peer.py"))
            .arg("--weights")
            .arg(&weights)
            .arg("--proto-dir")
            .arg(root.join("protocol/proto"))
            .args(["--threads", &args.clients.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the peer");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the peer said {line:?}"));
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let row = rt.block_on(async {
            // The peer serves the same model: its logits match cohort's.
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut c = InferenceClient::new(ch);
            let ours =
                InferenceModel::load(&spec, &params, ComputeDevice::Cpu, Precision::F32).unwrap();
            let mut diff = 0.0f32;
            for img in images.iter().take(100) {
                let r = c
                    .predict(pb::PredictRequest {
                        example: Some(pb::Example {
                            features: img.clone(),
                            label: None,
                            raw: Default::default(),
                        }),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let want = ours.logits(img, 1).unwrap();
                for (a, b) in r.prediction.unwrap().logits.iter().zip(&want) {
                    diff = diff.max((a - b).abs());
                }
            }
            assert!(
                diff < 1e-4,
                "the peer's logits differ from cohort's by {diff}"
            );
            eprintln!("peer logits agree with cohort's within {diff:e} on 100 images");
            let mut lat = drive(addr, &args, &images).await;
            lat.sort_by(f64::total_cmp);
            Row {
                device: "onnxruntime (CPU)".into(),
                precision: "f32".into(),
                mode: "peer: Python grpcio".into(),
                max_batch: 1,
                requests: lat.len(),
                throughput_rps: lat.len() as f64 / args.seconds,
                p50_ms: percentile(&lat, 0.50),
                p99_ms: percentile(&lat, 0.99),
                mean_batch: 1.0,
            }
        });
        let _ = child.kill();
        let _ = child.wait();
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} |",
            row.device,
            row.precision,
            row.mode,
            row.max_batch,
            row.throughput_rps,
            row.p50_ms,
            row.p99_ms,
            row.mean_batch
        );
        rows.push(row);
    }
    if let Some(p) = &args.json {
        let v = serde_json::json!({ "load": rows, "accuracy": accuracy });
        std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
}
