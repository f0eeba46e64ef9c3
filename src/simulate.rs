//! `cohort simulate`: a coordinator and N participants in one process, talking over real
//! loopback gRPC, then a centralised model trained on the pooled data for comparison.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_coordinator::round::Event;
use cohort_coordinator::round::SecureSettings;
use cohort_coordinator::{Coordinator, JobConfig, ModelStore, Orchestrator, RoundSummary};
use cohort_model::data::{IdxSplit, load_csv, load_idx_dir, parse_csv};
use cohort_model::{
    ComputeDevice, ComputeSlots, Dataset, LabelColumn, ModelSpec, Optimizer, Partition, Sharing,
    Standardizer, TrainConfig,
};
use cohort_participant::{AgentOptions, LocalData};
use serde::Serialize;

/// The bundled breast-cancer table (scikit-learn, BSD-3-Clause; see examples/data).
const BREAST_CANCER: &str = include_str!("../examples/data/breast_cancer.csv");

#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of participants.
    #[arg(long, default_value_t = 3)]
    pub participants: usize,
    /// Training rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Local learning rate (default: 0.1 for sgd, 0.001 for adam).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Local optimizer: sgd or adam.
    #[arg(long, default_value = "sgd")]
    pub optimizer: Optimizer,
    /// Seed of partitioning, splits, model initialisation and shuffling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A CSV file (with --label), or an MNIST-style IDX directory such as
    /// /usr/share/datasets/fashion-mnist. Default: the bundled breast-cancer table.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// CSV label column: a name, a zero-based index, or "last".
    #[arg(long, default_value = "last")]
    pub label: String,
    /// How the data is spread: iid, roundrobin (row i to participant i mod N),
    /// dirichlet:ALPHA (label skew) or shards:K.
    #[arg(long, default_value = "iid")]
    pub partition: Partition,
    /// Share of each participant's table held out for evaluation (CSV data; IDX data uses
    /// its own test set).
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Hidden layer sizes for tables, e.g. 32,16 (none: logistic regression).
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Share of participants selected each round.
    #[arg(long, default_value_t = 1.0)]
    pub fraction: f64,
    /// Server strategy: fedavg or fedadam.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    #[arg(long, default_value_t = 1.0)]
    pub server_lr: f64,
    /// Compute device for training and evaluation: cpu or wgpu.
    #[arg(long, default_value = "cpu")]
    pub device: ComputeDevice,
    /// How participants training at the same time share this machine's cores: per-core (one
    /// training per core, each on one thread), one-at-a-time (each on all cores) or
    /// unmanaged (all at once on one pool).
    #[arg(long, default_value = "per-core")]
    pub sharing: Sharing,
    /// Seconds a round may take before stragglers are left out.
    #[arg(long, default_value_t = 600.0)]
    pub round_timeout: f64,
    /// Where model versions go (default: runs/simulate-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a JSON summary here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write each participant's rows as JSON here ({"train": [[row, ...], ...], "test":
    /// [...]}, zero-based rows of the IDX training and test files, or of the CSV table), so
    /// another framework can be run on exactly the same shares.
    #[arg(long)]
    pub export_partition: Option<PathBuf>,
    /// Draw accuracy per round as an SVG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Skip the centralised baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Run plaintext rounds: no secure aggregation, the coordinator sees every update.
    /// For research comparisons only.
    #[arg(long)]
    pub plaintext: bool,
    /// Secure aggregation committee size per round (threshold: a strict majority).
    #[arg(long, default_value_t = 5)]
    pub committee: usize,
    /// Run this many dedicated key custodians (no data) as the committee, instead of
    /// drawing it from the participants.
    #[arg(long, default_value_t = 0)]
    pub custodians: usize,
    /// No progress bar or table (the report and exit code still tell the outcome).
    #[arg(long, short)]
    pub quiet: bool,
}

/// One round in the report.
#[derive(Debug, Serialize)]
pub struct RoundRow {
    pub round: u64,
    pub participants: usize,
    pub stragglers: Vec<String>,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_auc: Option<f64>,
    pub seconds: f64,
}

/// The `--report` JSON.
#[derive(Debug, Serialize)]
pub struct SimReport {
    pub dataset: String,
    pub participants: usize,
    pub partition: String,
    pub model: ModelSpec,
    pub train: TrainConfig,
    pub strategy: String,
    pub device: String,
    pub seed: u64,
    pub secure_aggregation: serde_json::Value,
    pub rounds: Vec<RoundRow>,
    pub federated_accuracy: Option<f64>,
    pub centralised_accuracy: Option<f64>,
    /// Where the final global model's weights are (a path, or a URL for object storage).
    pub model_path: String,
    /// Held-out rows of every participant answered by the served final model (the
    /// Inference service over mutual TLS), and the accuracy of those answers.
    pub served_rows: usize,
    pub served_accuracy: f64,
    pub federation_seconds: f64,
    pub centralised_seconds: Option<f64>,
}

/// The data of each simulated participant, plus the pooled raw splits for the baseline.
struct Prepared {
    name: String,
    locals: Vec<LocalData>,
    pooled_train: Dataset,
    pooled_test: Dataset,
    standardize: bool,
    /// Each participant's rows of the source: (training rows, held-out rows).
    shares: Shares,
}

/// Each participant's rows of the source data, for `--export-partition`.
#[derive(Debug, Serialize)]
struct Shares {
    train: Vec<Vec<usize>>,
    test: Vec<Vec<usize>>,
}

fn prepare(args: &SimArgs) -> anyhow::Result<Prepared> {
    let n = args.participants;
    if n == 0 {
        bail!("--participants must be at least 1");
    }
    match &args.dataset {
        Some(dir) if dir.is_dir() => {
            let train = load_idx_dir(dir, IdxSplit::Train)?;
            let test = load_idx_dir(dir, IdxSplit::Test)?;
            let parts = cohort_model::partition(
                &train.labels,
                train.num_classes,
                n,
                args.partition,
                args.seed,
            )?;
            let test_parts = cohort_model::partition(
                &test.labels,
                test.num_classes,
                n,
                Partition::Iid,
                args.seed + 1,
            )?;
            let locals = parts
                .iter()
                .zip(&test_parts)
                .map(|(p, t)| LocalData {
                    train: train.subset(p),
                    test: test.subset(t),
                    standardizer: None,
                })
                .collect();
            Ok(Prepared {
                name: dir.display().to_string(),
                locals,
                pooled_train: train,
                pooled_test: test,
                standardize: false,
                shares: Shares {
                    train: parts,
                    test: test_parts,
                },
            })
        }
        source => {
            let label: LabelColumn = args.label.parse().expect("infallible");
            let (ds, name) = match source {
                Some(path) => (load_csv(path, &label)?, path.display().to_string()),
                None => (
                    parse_csv(
                        BREAST_CANCER,
                        Path::new("breast_cancer.csv (bundled)"),
                        &LabelColumn::Name("diagnosis".into()),
                    )?,
                    "breast_cancer.csv (bundled, scikit-learn)".to_string(),
                ),
            };
            let parts =
                cohort_model::partition(&ds.labels, ds.num_classes, n, args.partition, args.seed)?;
            let mut locals = Vec::with_capacity(n);
            let (mut trains, mut tests) = (Vec::new(), Vec::new());
            let mut shares = Shares {
                train: Vec::with_capacity(n),
                test: Vec::with_capacity(n),
            };
            for (i, p) in parts.iter().enumerate() {
                let (tr, te) = ds
                    .subset(p)
                    .split_indices(args.test_fraction, args.seed + i as u64)?;
                shares.train.push(tr.iter().map(|&r| p[r]).collect());
                shares.test.push(te.iter().map(|&r| p[r]).collect());
                let (tr, te) = (
                    ds.subset(shares.train.last().unwrap()),
                    ds.subset(shares.test.last().unwrap()),
                );
                trains.push(tr.clone());
                tests.push(te.clone());
                locals.push(LocalData::from_split(tr, te, true));
            }
            Ok(Prepared {
                name,
                locals,
                pooled_train: Dataset::concat(&trains.iter().collect::<Vec<_>>())?,
                pooled_test: Dataset::concat(&tests.iter().collect::<Vec<_>>())?,
                standardize: true,
                shares,
            })
        }
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// Runs the simulation and prints what happened; returns the report.
pub async fn run(args: SimArgs) -> anyhow::Result<SimReport> {
    let prep = prepare(&args)?;
    if let Some(p) = &args.export_partition {
        std::fs::write(p, serde_json::to_vec(&prep.shares)?)
            .with_context(|| format!("writing the partition to {}", p.display()))?;
    }
    let first = &prep.locals[0].train;
    let spec = ModelSpec::for_shape(first.shape, first.num_classes, &args.hidden);
    let lr = args.lr.unwrap_or(match args.optimizer {
        Optimizer::Sgd => 0.1,
        Optimizer::Adam => 0.001,
    });
    let train = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: lr,
        optimizer: args.optimizer,
        seed: args.seed,
    };
    let n = args.participants;
    let custodian_ids: Vec<String> = (1..=args.custodians)
        .map(|i| format!("custodian-{i}"))
        .collect();
    if args.plaintext && !custodian_ids.is_empty() {
        bail!("--custodians needs secure aggregation: drop --plaintext");
    }
    let secure = (!args.plaintext).then(|| SecureSettings {
        committee_size: args.committee,
        t_min: n.min(2),
        custodians: custodian_ids.clone(),
        ..SecureSettings::default()
    });
    let secure_label = secure_description(secure.as_ref(), n, args.fraction);
    let job = JobConfig {
        job_id: SIM_JOB.into(),
        model: spec.clone(),
        train: train.clone(),
        rounds: args.rounds,
        min_participants: n,
        fraction: args.fraction,
        min_updates: 1,
        round_timeout: Duration::try_from_secs_f64(args.round_timeout)
            .context("--round-timeout must be a positive number of seconds")?,
        eval_timeout: Duration::from_secs(120),
        evaluate: true,
        liveness_timeout: Duration::from_secs(60),
        seed: args.seed,
        secure: secure.clone(),
    };
    let strategy = cohort_coordinator::strategy::by_name(&args.strategy, args.server_lr as f32)
        .map_err(anyhow::Error::msg)?;
    let orch =
        Orchestrator::new(job, strategy, None, rand::random()).map_err(anyhow::Error::msg)?;
    let strategy_name = orch.strategy_name();
    let out = args.out.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("runs/simulate-{t}"))
    });
    let store = ModelStore::open(out.join("models"))
        .with_context(|| format!("creating {}", out.display()))?;
    let coordinator = Coordinator::start(orch, store).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // TLS exactly as in production, from a throw-away CA in a temporary directory.
    let pki = SimPki::new(n, &custodian_ids)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let (c, files) = (coordinator.clone(), pki.coordinator.clone());
        tokio::spawn(async move {
            c.serve_tls(listener, files, Duration::from_secs(3600), async {
                let _ = stop_rx.await;
            })
            .await
        })
    };

    if !args.quiet {
        eprintln!(
            "cohort simulate: {} participants ({}), {} rounds, {} on {}, device {}, secure aggregation: {secure_label}",
            n,
            args.partition,
            args.rounds,
            model_name(&spec),
            prep.name,
            args.device
        );
    }
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(args.rounds);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} rounds, {msg} [{elapsed}]",
            )
            .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(250));
        b
    };
    let mut events = coordinator.subscribe();
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    let compute = ComputeSlots::for_this_machine(args.sharing)
        .context("starting the training thread pools")?;
    for (i, local) in prep.locals.iter().enumerate() {
        let opts = AgentOptions {
            id: participant_id(i),
            coordinator: format!("https://{addr}"),
            device: args.device,
            poll_wait: Duration::from_secs(10),
            reconnect_for: Duration::from_secs(30),
            upload_delay: Duration::ZERO,
            tls: Some(pki.client(&participant_id(i))?),
            stay_between_jobs: false,
            compute: Some(compute.clone()),
        };
        let data = Arc::new(local.clone());
        agents.spawn(async move { (i + 1, cohort_participant::run(opts, data).await) });
    }
    for (k, id) in custodian_ids.iter().enumerate() {
        let opts = AgentOptions {
            id: id.clone(),
            coordinator: format!("https://{addr}"),
            device: args.device,
            poll_wait: Duration::from_secs(10),
            reconnect_for: Duration::from_secs(30),
            upload_delay: Duration::ZERO,
            tls: Some(pki.client(id)?),
            stay_between_jobs: false,
            compute: None,
        };
        agents.spawn(async move { (n + k + 1, cohort_participant::run_custodian(opts).await) });
    }
    let progress = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let (mut selected, mut received, mut last) = (0usize, 0usize, String::new());
            while let Ok(ev) = events.recv().await {
                match ev {
                    Event::RoundStarted { selected: s, .. } => {
                        (selected, received) = (s.len(), 0);
                    }
                    Event::UpdateAccepted { .. } => received += 1,
                    Event::RoundCompleted { summary, .. } => {
                        bar.inc(1);
                        last = format!(
                            ", last held-out accuracy {}",
                            fmt_opt(summary.eval.map(|m| m.accuracy), 4)
                        );
                    }
                    Event::JobFinished { .. } => break,
                    _ => {}
                }
                bar.set_message(format!("{received}/{selected} updates{last}"));
            }
        })
    };
    // Participants end when the job is finished (they are told so) or when they fail; a
    // failure ends the simulation at once (dropping the set aborts the others).
    while let Some(joined) = agents.join_next().await {
        match joined {
            Ok((_, Ok(_))) => {}
            Ok((i, Err(e))) => bail!("participant {i} failed: {e}"),
            Err(e) => bail!("a participant panicked: {e}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), coordinator.finished())
        .await
        .context("all participants ended but the job did not finish")?;
    let federation_seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = progress.await;
    let history = coordinator.history();
    let _ = stop_tx.send(());
    server.await?.map_err(anyhow::Error::msg)?;
    if (history.len() as u64) < args.rounds {
        bail!(
            "the federation stopped after {} of {} rounds",
            history.len(),
            args.rounds
        );
    }

    let federated_accuracy = history.last().and_then(|s| s.eval).map(|m| m.accuracy);
    let (centralised_accuracy, centralised_seconds) = if args.no_baseline {
        (None, None)
    } else {
        let t0 = Instant::now();
        let acc = centralised(&prep, &spec, &train, args.rounds, args.device)?;
        (Some(acc), Some(t0.elapsed().as_secs_f64()))
    };
    let final_version = history.last().map(|s| s.round).unwrap_or(0);
    let model_path = coordinator
        .job_store()
        .weights_location(final_version)
        .map_err(anyhow::Error::msg)?;
    let served = ask_served_model(
        coordinator.store().clone(),
        cohort_coordinator::state::ModelRef {
            job_id: SIM_JOB.into(),
            version: final_version,
        },
        &pki,
        &prep,
        args.device,
    )
    .await
    .context("serving the final model")?;
    let rows: Vec<RoundRow> = history.iter().map(row).collect();
    let report = SimReport {
        dataset: prep.name.clone(),
        participants: n,
        partition: args.partition.to_string(),
        model: spec.clone(),
        train,
        strategy: strategy_name.to_string(),
        device: args.device.to_string(),
        seed: args.seed,
        secure_aggregation: secure_json(secure.as_ref()),
        rounds: rows,
        federated_accuracy,
        centralised_accuracy,
        model_path: model_path.clone(),
        served_rows: served.0,
        served_accuracy: served.1,
        federation_seconds,
        centralised_seconds,
    };
    if !args.quiet {
        print_table(&history);
        println!();
        println!(
            "federated model:   held-out accuracy {} ({} rounds, {:.2} s)",
            fmt_opt(federated_accuracy, 4),
            history.len(),
            federation_seconds
        );
        if let Some(c) = centralised_accuracy {
            println!(
                "centralised model: held-out accuracy {c:.4} (same model, pooled data, {} epochs)",
                args.rounds as usize * args.epochs
            );
        }
        println!("secure aggregation: {secure_label}");
        println!("global model written to {model_path}");
        println!(
            "served model:      {} held-out rows answered over gRPC (Inference, mutual TLS), \
             accuracy {:.4}, slowest batch {:.1} ms",
            served.0,
            served.1,
            served.2 * 1e3
        );
    }
    if let Some(p) = &args.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing report {}", p.display()))?;
    }
    if let Some(p) = &args.plot {
        let fed: Vec<(f64, f64)> = history
            .iter()
            .filter_map(|s| s.eval.map(|m| (s.round as f64, m.accuracy)))
            .collect();
        let svg = crate::plot::accuracy_svg(
            &format!("{} — {} participants, {}", prep.name, n, args.partition),
            &fed,
            centralised_accuracy,
        );
        std::fs::write(p, svg).with_context(|| format!("writing plot {}", p.display()))?;
    }
    Ok(report)
}

fn participant_id(i: usize) -> String {
    format!("participant-{:03}", i + 1)
}

/// The simulation's job.
const SIM_JOB: &str = "simulation";

/// The inference client of the simulation.
const SIM_APP: &str = "app";

/// The final version served by `cohort serve`'s code over mutual TLS, asked for every
/// participant's held-out rows (prepared as that site prepares its own data), in batches as
/// large as a request may carry. Returns the rows answered, their accuracy and the slowest batch's seconds.
async fn ask_served_model(
    store: ModelStore,
    to: cohort_coordinator::state::ModelRef,
    pki: &SimPki,
    prep: &Prepared,
    device: ComputeDevice,
) -> anyhow::Result<(usize, f64, f64)> {
    use cohort_coordinator::inference::{DeviceChoice, Inference, InferenceSettings};
    use cohort_protocol::pb::{self, inference_client::InferenceClient};
    let settings = InferenceSettings {
        device: match device {
            ComputeDevice::Cpu => DeviceChoice::Cpu,
            ComputeDevice::Wgpu => DeviceChoice::Wgpu,
        },
        queue: 4096,
        ..InferenceSettings::default()
    };
    let metrics = cohort_coordinator::metrics::Metrics::inference_only();
    let inference =
        Inference::new(store, settings, metrics.inference()).map_err(anyhow::Error::msg)?;
    let i = inference.clone();
    tokio::task::spawn_blocking(move || i.switch(&to))
        .await?
        .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cohort_coordinator::inference::serve_alone(
        inference,
        listener,
        Some(pki.coordinator.clone()),
        Duration::from_secs(3600),
        async {
            let _ = stop_rx.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(pki.client(SIM_APP)?.client_config())?
        .connect()
        .await?;
    let mut client = InferenceClient::new(channel)
        .max_decoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES);
    let (mut rows, mut correct, mut slowest) = (0, 0, 0.0f64);
    for local in &prep.locals {
        let t = &local.test;
        let per_request = cohort_protocol::examples_per_request(t.shape.len()).min(1024);
        for chunk in (0..t.len()).collect::<Vec<_>>().chunks(per_request) {
            let started = Instant::now();
            let answer = client
                .predict_batch(pb::PredictBatchRequest {
                    examples: chunk
                        .iter()
                        .map(|&r| pb::Example {
                            features: t.row(r).to_vec(),
                            label: Some(t.labels[r]),
                        })
                        .collect(),
                })
                .await?
                .into_inner();
            slowest = slowest.max(started.elapsed().as_secs_f64());
            rows += chunk.len();
            correct += chunk
                .iter()
                .zip(&answer.predictions)
                .filter(|(r, p)| p.class == t.labels[**r])
                .count();
        }
    }
    let _ = stop_tx.send(());
    server.await?.map_err(anyhow::Error::msg)?;
    Ok((rows, correct as f64 / rows.max(1) as f64, slowest))
}

/// The simulation's throw-away federation PKI: a CA, the coordinator's certificate and one
/// participant certificate per agent, in a temporary directory removed at the end.
struct SimPki {
    dir: tempfile::TempDir,
    coordinator: cohort_protocol::tls::TlsFiles,
}

impl SimPki {
    fn new(participants: usize, custodians: &[String]) -> anyhow::Result<Self> {
        use cohort_crypto::pki::{Authority, Role, Validity};
        let dir = tempfile::Builder::new()
            .prefix("cohort-sim-pki")
            .tempdir()?;
        let v = Validity::days(std::time::SystemTime::now(), 2);
        let ca = Authority::generate("cohort simulation (throw-away)", &v)?;
        let write = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca_path = write("ca.pem", ca.cert_pem())?;
        let c = ca.issue(
            "coordinator",
            Role::Coordinator,
            &["coordinator".to_string()],
            &["127.0.0.1".parse().expect("an IP address")],
            &v,
        )?;
        let coordinator = cohort_protocol::tls::TlsFiles {
            ca: ca_path,
            cert: write("coordinator.pem", &c.cert_pem)?,
            key: write("coordinator.key", &c.key_pem)?,
            crl: Some(write(
                "crl.pem",
                &ca.crl(&[], 1, 2, std::time::SystemTime::now())?,
            )?),
            server_name: None,
            key_passphrase_env: None,
        };
        let ids = (0..participants)
            .map(participant_id)
            .chain(custodians.iter().cloned());
        for id in ids {
            let p = ca.issue(&id, Role::Participant, &[], &[], &v)?;
            write(&format!("{id}.pem"), &p.cert_pem)?;
            write(&format!("{id}.key"), &p.key_pem)?;
        }
        let app = ca.issue(SIM_APP, Role::Inference, &[], &[], &v)?;
        write(&format!("{SIM_APP}.pem"), &app.cert_pem)?;
        write(&format!("{SIM_APP}.key"), &app.key_pem)?;
        Ok(SimPki { dir, coordinator })
    }

    fn client(&self, id: &str) -> anyhow::Result<cohort_protocol::tls::NodeTls> {
        let files = cohort_protocol::tls::TlsFiles {
            ca: self.coordinator.ca.clone(),
            cert: self.dir.path().join(format!("{id}.pem")),
            key: self.dir.path().join(format!("{id}.key")),
            crl: None,
            server_name: Some("coordinator".into()),
            key_passphrase_env: None,
        };
        Ok(files.node()?)
    }
}

/// How the run aggregates, in words.
fn secure_description(s: Option<&SecureSettings>, n: usize, fraction: f64) -> String {
    match s {
        None => "OFF (plaintext rounds: the coordinator sees every update)".into(),
        Some(s) => {
            let selected = ((n as f64 * fraction).ceil() as usize).clamp(1, n);
            let c = s.committee_for(selected);
            let who = if s.custodians.is_empty() {
                "committee"
            } else {
                "custodian committee"
            };
            format!(
                "on ({}: tfhe-rs GLWE N={}, fresh keys every round, {}-of-{} {who}, T_min {})",
                cohort_crypto::aggregation::SCHEME,
                s.params.polynomial_size,
                s.threshold_for(c),
                c,
                s.t_min
            )
        }
    }
}

/// The report's `secure_aggregation`: the scheme and its parameters, or `false`.
fn secure_json(s: Option<&SecureSettings>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Bool(false),
        Some(s) => serde_json::json!({
            "scheme": cohort_crypto::aggregation::SCHEME,
            "library": "tfhe-rs 1.8.2 core_crypto",
            "glwe_dimension": 1,
            "polynomial_size": s.params.polynomial_size,
            "noise": format!("t-uniform(2^{})", s.params.noise_log2),
            "smudging": format!("uniform(±2^{})", s.params.smudging_log2),
            "committee_size": s.committee_for(usize::MAX),
            "custodians": s.custodians,
            "threshold": "strict majority",
            "t_min": s.t_min,
            "clip": s.codec.clip,
            "frac_bits": s.codec.frac_bits,
            "delta_log": s.codec.delta_log,
            "max_total_weight": s.codec.max_total_weight,
        }),
    }
}

fn model_name(spec: &ModelSpec) -> String {
    match spec {
        ModelSpec::Logistic { .. } => "logistic regression".into(),
        ModelSpec::Mlp { hidden, .. } => format!("MLP {hidden:?}"),
        ModelSpec::Cnn { .. } => "CNN".into(),
    }
}

fn row(s: &RoundSummary) -> RoundRow {
    RoundRow {
        round: s.round,
        participants: s.participants.len(),
        stragglers: s.stragglers.clone(),
        train_loss: s.train.map(|m| m.loss),
        train_accuracy: s.train.map(|m| m.accuracy),
        eval_loss: s.eval.map(|m| m.loss),
        eval_accuracy: s.eval.map(|m| m.accuracy),
        eval_auc: s.eval.and_then(|m| m.auc),
        seconds: s.seconds,
    }
}

fn print_table(history: &[RoundSummary]) {
    println!(
        "{:>5}  {:>12}  {:>10}  {:>17}  {:>8}",
        "round", "participants", "train loss", "held-out accuracy", "seconds"
    );
    for s in history {
        println!(
            "{:>5}  {:>12}  {:>10}  {:>17}  {:>8.2}",
            s.round,
            s.participants.len(),
            fmt_opt(s.train.map(|m| m.loss), 4),
            fmt_opt(s.eval.map(|m| m.accuracy), 4),
            s.seconds
        );
    }
}

/// Trains the same model on the pooled training data (standardised with pooled statistics,
/// as a central party would) for as many epochs as each participant ran in total, and
/// evaluates on the pooled held-out data.
fn centralised(
    prep: &Prepared,
    spec: &ModelSpec,
    train: &TrainConfig,
    rounds: u64,
    device: ComputeDevice,
) -> anyhow::Result<f64> {
    let mut tr = prep.pooled_train.clone();
    let mut te = prep.pooled_test.clone();
    if prep.standardize {
        let s = Standardizer::fit(&tr);
        s.apply(&mut tr);
        s.apply(&mut te);
    }
    let mut cfg = train.clone();
    cfg.epochs = train.epochs * rounds as usize;
    let (params, _) =
        cohort_model::train(spec, &spec.initial_parameters(cfg.seed), &tr, &cfg, device)?;
    Ok(cohort_model::evaluate(spec, &params, &te, device)?.accuracy)
}
