//! `cohort simulate`: a coordinator and N participants in one process, talking over real
//! loopback gRPC, then a centralised model trained on the pooled data for comparison.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use cohort_coordinator::round::{Sampling, SecureSettings};
use cohort_coordinator::{JobConfig, ModelStore, Orchestrator};
use cohort_model::{
    ComputeDevice, ModelSpec, Optimizer, Partition, Sharing, Standardizer, TrainConfig,
};
use cohort_participant::LocalData;

mod availability;
mod client;
pub mod data;
mod networked;
mod progress;
mod report;
mod served;
mod synthetic;
mod virtual_engine;
pub mod workers;

use data::{DataSettings, Prepared, prepare};
use networked::{NetworkedRun, networked};
use progress::{Progress, RoundsLog};
pub use report::{RoundRow, SimReport};
use report::{fmt_opt, model_name, print_table, row, secure_description, secure_json};
use served::{SimPki, ask_served_model};
pub use virtual_engine::EngineSeconds;

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
    /// How CSV tables are prepared: `federation` (one pipeline for every site from the
    /// federation's statistics: missing values imputed, categories one-hot encoded,
    /// standardised), `site` (each site standardises with its own statistics; numbers only),
    /// or `auto` (federation when the table has missing values or text categories).
    #[arg(long, default_value = "auto")]
    pub preprocess: data::Preprocess,
    /// Refuse missing values instead of imputing them (strict mode).
    #[arg(long)]
    pub no_impute: bool,
    /// Add a 0/1 feature per column with missing values, set where the value was missing.
    #[arg(long)]
    pub missing_indicators: bool,
    /// Hidden layer sizes for tables, e.g. 32,16 (none: logistic regression).
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Share of participants selected each round.
    #[arg(long, default_value_t = 1.0)]
    pub fraction: f64,
    /// Participants drawn a round, instead of a `--fraction` of them.
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// `uniform`: a fixed number a round, without replacement; `poisson`: each participant
    /// independently with probability `--fraction` (the round's size varies).
    #[arg(long, default_value = "uniform")]
    pub sampling: SamplingArg,
    /// Share of the participants that evaluate each round's model on their held-out rows
    /// (a seeded draw; cross-device studies evaluate on a sample).
    #[arg(long, default_value_t = 1.0)]
    pub evaluate_fraction: f64,
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
    /// How participants run: `networked` (each a gRPC client over mutual TLS to a real
    /// coordinator service), `virtual` (data shards driven in this process by the same state
    /// machine, memory O(model × cores)), or `auto` (virtual above 100 participants).
    #[arg(long, default_value = "auto")]
    pub engine: Engine,
    /// Secure aggregation as deployed (`full`: every update encrypted, the sum decrypted by
    /// the committee), or `emulated` by its exact integer arithmetic (the same codec and
    /// weights, no encryption: the same model bit for bit, much faster; virtual engine only,
    /// and the report says so).
    #[arg(long, default_value = "full")]
    pub secure: SecureMode,
    /// Append each round to this CSV file as it completes (round, participants, stragglers,
    /// losses, accuracies, AUC, seconds), for following long runs.
    #[arg(long)]
    pub rounds_log: Option<PathBuf>,
    /// Fault injection, virtual engine: each participant selected for a round drops out of it
    /// (its update never arrives) with this probability, drawn from the round's seed; the
    /// round goes on without it at its deadline, as in a real federation.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Virtual engine: an availability trace, a CSV file `participant,from_round,to_round`
    /// (inclusive intervals; a participant listed is online only in its intervals, others
    /// always): offline participants are neither selected nor asked to evaluate.
    #[arg(long)]
    pub availability: Option<PathBuf>,
    /// Run the participants in this many worker processes (virtual engine), each owning a
    /// shard of them and sending one partial sum a round over mutual-TLS gRPC; this process
    /// runs the state machine and the committee (dedicated --custodians in secure jobs).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// With --workers: listen for workers started elsewhere (`cohort sim-worker`, e.g. a
    /// Kubernetes Indexed Job) on this address instead of starting them here.
    #[arg(long)]
    pub workers_listen: Option<std::net::SocketAddr>,
    /// With --workers-listen: directory with the driver's TLS material (ca.pem, driver.pem,
    /// driver.key, and crl.pem if any).
    #[arg(long)]
    pub workers_tls: Option<PathBuf>,
    /// The cohort executable local workers run (default: this one).
    #[arg(long, hide = true)]
    pub worker_command: Option<PathBuf>,
}

/// How secure aggregation runs in a simulation (`--secure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecureMode {
    Full,
    Emulated,
}

/// How a round's participants are drawn (`--sampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplingArg {
    Uniform,
    Poisson,
}

/// How simulated participants run (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    Auto,
    Networked,
    Virtual,
}

impl Engine {
    /// Participants above which `auto` takes the virtual engine.
    pub const AUTO_VIRTUAL_ABOVE: usize = 100;

    /// The engine that runs: `auto` takes the virtual one above the threshold or when a
    /// feature only it has is asked for (`virtual_only`), which `networked` refuses.
    fn resolve(self, participants: usize, virtual_only: bool) -> anyhow::Result<Engine> {
        Ok(match self {
            Engine::Networked if virtual_only => bail!(
                "--secure emulated, --dropout, --availability and --workers run in the virtual \
                 engine: drop --engine networked"
            ),
            Engine::Auto if virtual_only || participants > Self::AUTO_VIRTUAL_ABOVE => {
                Engine::Virtual
            }
            Engine::Auto => Engine::Networked,
            e => e,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Networked => "networked",
            Engine::Virtual => "virtual",
        }
    }
}

/// Runs the simulation and prints what happened; returns the report.
pub async fn run(args: SimArgs) -> anyhow::Result<SimReport> {
    let prep = prepare(&DataSettings::from(&args))?;
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
    // Rounds of more than 512 participants need a codec with room for their total weight
    // (each participant's weight is at least 1; twice the participants leaves room for
    // unequal shares): fewer fractional bits, proven not to overflow.
    let sampling = match (args.sampling, args.clients_per_round) {
        (SamplingArg::Uniform, None) => Sampling::Fraction,
        (SamplingArg::Uniform, Some(k)) => Sampling::Count(k),
        (SamplingArg::Poisson, None) => Sampling::Poisson,
        (SamplingArg::Poisson, Some(_)) => bail!(
            "--clients-per-round and --sampling poisson exclude each other: Poisson sampling \
             draws each participant with probability --fraction"
        ),
    };
    // The most a round can draw (Poisson: its expected size, then twice that for room).
    let per_round = match sampling {
        Sampling::Count(k) => k.min(n) as u64,
        _ => ((n as f64 * args.fraction).ceil() as u64).max(1),
    }
    .max(1);
    let secure = if args.plaintext {
        None
    } else {
        let d = SecureSettings::default();
        let members = if custodian_ids.is_empty() {
            args.committee.min(n)
        } else {
            custodian_ids.len()
        };
        let pieces = cohort_crypto::Committee::new(members, members / 2 + 1)
            .map(|c| c.pieces())
            .unwrap_or(1);
        let codec = cohort_crypto::Codec::for_total_weight(
            (2 * per_round).max(d.codec.max_total_weight),
            &d.params.budget(pieces),
        )
        .map_err(|e| anyhow::anyhow!("secure aggregation of {per_round} participants: {e}"))?;
        Some(SecureSettings {
            committee_size: args.committee,
            t_min: n.min(2),
            custodians: custodian_ids.clone(),
            codec,
            ..d
        })
    };
    let emulated = secure.is_some() && args.secure == SecureMode::Emulated;
    if !(0.0..1.0).contains(&args.dropout) {
        bail!(
            "--dropout must be at least 0 and below 1, not {}",
            args.dropout
        );
    }
    let engine = args.engine.resolve(
        n,
        emulated || args.dropout > 0.0 || args.workers > 0 || args.availability.is_some(),
    )?;
    let availability = match &args.availability {
        Some(path) => {
            let ids = (0..n).map(participant_id).collect();
            Some(availability::Availability::load(path, &ids)?)
        }
        None => None,
    };
    if args.workers > 0 {
        if secure.is_some() && !emulated && custodian_ids.is_empty() {
            bail!(
                "--workers needs the committee to be key custodians run by this process: add \
                 --custodians {} (or --secure emulated, or --plaintext)",
                args.committee
            );
        }
        if args.workers > n {
            bail!(
                "--workers {} is more than the {n} participants",
                args.workers
            );
        }
    } else if args.workers_listen.is_some() || args.workers_tls.is_some() {
        bail!("--workers-listen and --workers-tls go with --workers N");
    }
    let mut secure_label = secure_description(secure.as_ref(), n, per_round);
    if emulated {
        secure_label.push_str(
            "; EMULATED: the same codec and weights in exact integer arithmetic, no encryption",
        );
    }
    let job = JobConfig {
        job_id: SIM_JOB.into(),
        model: spec.clone(),
        train: train.clone(),
        rounds: args.rounds,
        // Everyone, unless a trace takes some offline: then whoever is online, as long as
        // a round can aggregate.
        min_participants: if availability.is_some() {
            secure.as_ref().map_or(1, |s| s.t_min.max(1))
        } else {
            n
        },
        fraction: args.fraction,
        sampling,
        // A secure round needs t_min updates; an emulated one needs as many.
        min_updates: secure.as_ref().map_or(1, |s| s.t_min.max(1)),
        round_timeout: Duration::try_from_secs_f64(args.round_timeout)
            .context("--round-timeout must be a positive number of seconds")?,
        eval_timeout: Duration::from_secs(120),
        evaluate: true,
        evaluate_fraction: args.evaluate_fraction,
        liveness_timeout: Duration::from_secs(60),
        seed: args.seed,
        secure: if emulated { None } else { secure.clone() },
    };
    let emulation = secure
        .as_ref()
        .filter(|_| emulated)
        .map(|s| virtual_engine::Emulation { codec: s.codec });
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
    // TLS exactly as in production, from a throw-away CA in a temporary directory (the
    // virtual engine's participants need no certificates; the served model's client does).
    let pki = match engine {
        Engine::Virtual => SimPki::new(0, &[])?,
        _ => SimPki::new(n, &custodian_ids)?,
    };

    if !args.quiet {
        eprintln!(
            "cohort simulate: {} participants ({}, {} engine), {} rounds, {} on {}, device {}, secure aggregation: {secure_label}",
            n,
            args.partition,
            engine.name(),
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
                "{bar:30} {pos}/{len} rounds ({per_sec}, ETA {eta}), {msg} [{elapsed}]",
            )
            .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(250));
        b
    };
    let mut progress = Progress {
        bar: bar.clone(),
        selected: 0,
        received: 0,
        last: String::new(),
        log: match &args.rounds_log {
            Some(p) => Some(RoundsLog::create(p)?),
            None => None,
        },
    };
    let mut engine_seconds = None;
    let (history, federation_seconds) = match engine {
        Engine::Virtual => {
            // With workers, the participants are theirs; the custodians stay here.
            let own = if args.workers > 0 { 0 } else { n };
            let clients: Vec<(String, Option<Arc<LocalData>>)> = prep.locals[..own]
                .iter()
                .enumerate()
                .map(|(i, l)| (participant_id(i), Some(l.clone())))
                .chain(custodian_ids.iter().map(|c| (c.clone(), None)))
                .collect();
            let (st, device) = (store.clone(), args.device);
            let conditions = virtual_engine::Conditions {
                dropout: args.dropout,
                availability,
            };
            let started = Instant::now();
            let workers = match args.workers {
                0 => None,
                _ => Some(start_workers(&args, &prep, &pki).await?),
            };
            let hub = workers.as_ref().map(|w| w.hub.clone());
            let ran = tokio::task::spawn_blocking(move || {
                let ran = hub
                    .as_deref()
                    .map(|hub| {
                        Ok::<_, anyhow::Error>(workers::Remote {
                            hub,
                            shards: hub.wait_ready()?,
                        })
                    })
                    .transpose()
                    .and_then(|remote| {
                        virtual_engine::run(
                            orch,
                            &st,
                            clients,
                            remote,
                            device,
                            emulation,
                            &conditions,
                            |ev| progress.on(ev),
                        )
                    });
                if let Some(hub) = &hub {
                    match &ran {
                        Ok(_) => hub.finish(),
                        Err(e) => hub.fail(format!("{e:#}")),
                    }
                }
                ran
            })
            .await?;
            if let Some(w) = workers {
                w.stop().await;
            }
            let (history, seconds) = ran?;
            engine_seconds = Some(seconds);
            (history, started.elapsed().as_secs_f64())
        }
        _ => {
            networked(NetworkedRun {
                args: &args,
                prep: &prep,
                orch,
                store: &store,
                pki: &pki,
                custodian_ids: &custodian_ids,
                progress,
            })
            .await?
        }
    };
    bar.finish_and_clear();
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
    let model_path = store
        .for_job(SIM_JOB)
        .weights_location(final_version)
        .map_err(anyhow::Error::msg)?;
    let served = ask_served_model(
        store.clone(),
        cohort_storage::ModelRef {
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
        secure_aggregation: {
            let mut j = secure_json(secure.as_ref());
            if let Some(o) = j.as_object_mut() {
                o.insert(
                    "mode".into(),
                    if emulated { "emulated" } else { "full" }.into(),
                );
            }
            j
        },
        rounds: rows,
        federated_accuracy,
        centralised_accuracy,
        model_path: model_path.clone(),
        served_rows: served.0,
        served_accuracy: served.1,
        federation_seconds,
        centralised_seconds,
        engine: engine.name().to_string(),
        engine_seconds,
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

/// Starts the `SimulationWorkers` service and, unless they are started elsewhere
/// (`--workers-listen`), `--workers` local worker processes.
async fn start_workers(
    args: &SimArgs,
    prep: &Prepared,
    pki: &SimPki,
) -> anyhow::Result<workers::driver::Workers> {
    let plan = cohort_protocol::pb::WorkerPlan {
        participants: args.participants as u32,
        seed: args.seed,
        dataset: args
            .dataset
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        label: args.label.clone(),
        partition: args.partition.to_string(),
        test_fraction: args.test_fraction,
        device: args.device.to_string(),
        dropout: args.dropout,
        first: 0,
        end: 0,
        preprocess: clap::ValueEnum::to_possible_value(&args.preprocess)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        no_impute: args.no_impute,
        missing_indicators: args.missing_indicators,
    };
    let examples = workers::driver::examples_of(&prep.locals);
    match (&args.workers_listen, &args.workers_tls) {
        (Some(listen), Some(dir)) => {
            let crl = dir.join("crl.pem");
            let tls = cohort_protocol::tls::TlsFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("driver.pem"),
                key: dir.join("driver.key"),
                crl: crl.exists().then_some(crl),
                server_name: None,
                key_passphrase_env: None,
            };
            workers::driver::Workers::start(args.workers, plan, examples, *listen, tls, None).await
        }
        (Some(_), None) => {
            bail!("--workers-listen needs --workers-tls DIR (ca.pem, driver.pem, driver.key)")
        }
        (None, _) => {
            let exe = match &args.worker_command {
                Some(p) => p.clone(),
                None => {
                    std::env::current_exe().context("finding this executable for the workers")?
                }
            };
            workers::driver::Workers::start(
                args.workers,
                plan,
                examples,
                "127.0.0.1:0".parse().expect("an address"),
                pki.coordinator.clone(),
                Some((&exe, pki.dir.path())),
            )
            .await
        }
    }
}

fn participant_id(i: usize) -> String {
    format!("participant-{:03}", i + 1)
}

/// The simulation's job.
const SIM_JOB: &str = "simulation";

/// The inference client of the simulation.
const SIM_APP: &str = "app";

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
    let (mut tr, mut te) = prep.pooled()?;
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
