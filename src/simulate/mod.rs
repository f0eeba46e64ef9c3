//! `cohort simulate`: a coordinator and N participants in one process, talking over real
//! loopback gRPC, then a centralised model trained on the pooled data for comparison.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use cohort_coordinator::round::{Sampling, SecureSettings};
use cohort_coordinator::{JobConfig, ModelStore, Orchestrator};
use cohort_model::{ComputeDevice, ModelSpec, Optimizer, Standardizer, TrainConfig};
use cohort_participant::SiteData;

mod args;
mod availability;
mod client;
pub mod data;
mod dp;
mod networked;
mod progress;
mod report;
mod served;
mod synthetic;
mod virtual_engine;
pub mod workers;

pub use args::{Engine, SamplingArg, SecureMode, SimArgs};
use data::{DataSettings, Prepared, prepare};
use networked::{NetworkedRun, networked};
use progress::{Progress, RoundsLog};
pub use report::{RoundRow, SimReport};
use report::{fmt_opt, model_name, print_table, row, secure_description, secure_json};
use served::{SimPki, ask_served_model};
pub use virtual_engine::EngineSeconds;

/// The model declared in `path` (`--model`): a `kind = "layers"` stack, on its own or as a
/// job specification's `[model]` table, its input shape and classes filled in from the data
/// when it leaves them out, its embeddings placed by the table's schema, checked against the
/// data. Errors begin with the path.
fn declared_model(
    path: &std::path::Path,
    shape: cohort_model::FeatureShape,
    classes: usize,
    data: Option<&cohort_model::tabular::DataSpec>,
) -> anyhow::Result<ModelSpec> {
    let at = || format!("--model {}", path.display());
    let text = std::fs::read_to_string(path).with_context(at)?;
    let table: toml::Table = toml::from_str(&text).with_context(at)?;
    let table = match table.get("model") {
        Some(toml::Value::Table(m)) => m.clone(),
        _ => table,
    };
    let mut spec: ModelSpec = table.try_into().with_context(at)?;
    if let ModelSpec::Layers {
        inputs,
        channels,
        height,
        width,
        classes: declared,
        ..
    } = &mut spec
    {
        if *inputs == 0 && *channels == 0 && *height == 0 && *width == 0 {
            match shape {
                cohort_model::FeatureShape::Flat(n) => *inputs = n,
                cohort_model::FeatureShape::Image {
                    channels: c,
                    height: h,
                    width: w,
                } => (*channels, *height, *width) = (c, h, w),
            }
        }
        if *declared == 0 {
            *declared = classes;
        }
    }
    if let (ModelSpec::Layers { layers, .. }, Some(data)) = (&mut spec, data) {
        data.resolve_embeddings(layers)
            .map_err(|e| anyhow::anyhow!("invalid model spec: {e}"))
            .with_context(at)?;
    }
    spec.validate().with_context(at)?;
    spec.check_data(shape, classes).with_context(at)?;
    Ok(spec)
}

/// Runs the simulation and prints what happened; returns the report.
pub async fn run(args: SimArgs) -> anyhow::Result<SimReport> {
    let prep = prepare(&DataSettings::from(&args))?;
    if let Some(p) = &args.export_partition {
        std::fs::write(p, serde_json::to_vec(&prep.shares)?)
            .with_context(|| format!("writing the partition to {}", p.display()))?;
    }
    let spec = match (&args.model, &args.custom_model) {
        (Some(path), _) => declared_model(path, prep.shape, prep.classes, prep.spec.as_ref())?,
        (None, Some(name)) => {
            let (inputs, channels, height, width) = match prep.shape {
                cohort_model::FeatureShape::Flat(n) => (n, 0, 0, 0),
                cohort_model::FeatureShape::Image {
                    channels,
                    height,
                    width,
                } => (0, channels, height, width),
            };
            let spec = ModelSpec::Custom {
                name: name.clone(),
                inputs,
                channels,
                height,
                width,
                classes: prep.classes,
            };
            spec.validate().context("--custom-model")?;
            spec
        }
        (None, None) => ModelSpec::for_shape(prep.shape, prep.classes, &args.hidden),
    };
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
        proximal_mu: args.proximal_mu,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
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
        // Distributed noise is sized for T_min participants: with every selected participant
        // answering (no dropout, a fixed round size), that is the round's size, so the sum
        // carries no more noise than its guarantee needs.
        let distributed = args.dp == Some(cohort_coordinator::privacy::Mechanism::Distributed);
        let fixed_rounds = args.dropout == 0.0
            && args.availability.is_none()
            && args.sampling == SamplingArg::Uniform;
        let t_min = if distributed && fixed_rounds {
            (per_round as usize).clamp(1, n)
        } else {
            n.min(2)
        };
        Some(SecureSettings {
            committee_size: args.committee,
            t_min,
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
        if secure.is_none() && args.dp.is_some() {
            bail!(
                "--workers with --dp and --plaintext: plaintext partial sums are weighted by \
                 examples, and differential privacy needs every update to weigh 1; use \
                 --secure emulated (or secure aggregation with --custodians)"
            );
        }
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
    // The rate at which rounds sample participants (the privacy accounting's q).
    let q = match sampling {
        Sampling::Poisson => args.fraction,
        _ => per_round.min(n as u64) as f64 / n as f64,
    };
    let privacy = dp::settings(&args, q)?;
    if let Some(p) = &privacy
        && args.target_epsilon.is_some()
        && args.noise_multiplier.is_none()
        && !args.quiet
    {
        eprintln!(
            "cohort simulate: noise multiplier {:.4} keeps {} rounds at sampling rate {q:.4} \
             within ε = {} (δ = {})",
            p.noise_multiplier,
            args.rounds,
            p.target_epsilon.unwrap_or_default(),
            p.delta
        );
    }
    let strategy = cohort_coordinator::strategy::by_name(
        &args.strategy,
        args.server_lr as f32,
        args.server_momentum as f32,
    )
    .map_err(anyhow::Error::msg)?;
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
        // Tables preprocessed by the federation: round 0 sums their statistics.
        data: prep.spec.clone(),
        clip_norm: args.clip_norm,
        clip_per_layer: args.clip_per_layer,
        privacy,
        adaptive_clipping: args.clip_quantile.map(|q| {
            cohort_coordinator::privacy::AdaptiveClipping {
                target_quantile: q,
                learning_rate: 0.2,
            }
        }),
        emulated_codec: secure.as_ref().filter(|_| emulated).map(|s| s.codec),
        control_variates: strategy.control_variate().is_some(),
    };
    let emulation = secure
        .as_ref()
        .filter(|_| emulated)
        .map(|s| virtual_engine::Emulation { codec: s.codec });
    // The machine's randomness from the run's seed: a simulation (its central noise
    // included) is reproducible.
    let entropy: [u8; 32] = {
        use rand::{RngExt, SeedableRng};
        rand::rngs::ChaCha20Rng::seed_from_u64(args.seed ^ 0x5eed_0fe7_7a09).random()
    };
    let orch = Orchestrator::new(job, strategy, None, entropy).map_err(anyhow::Error::msg)?;
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
    let outcome = Arc::new(std::sync::Mutex::new(progress::Outcome::default()));
    let mut progress = Progress {
        bar: bar.clone(),
        selected: 0,
        received: 0,
        last: String::new(),
        log: match &args.rounds_log {
            Some(p) => Some(RoundsLog::create(p)?),
            None => None,
        },
        outcome: outcome.clone(),
    };
    let mut engine_seconds = None;
    let (history, federation_seconds) = match engine {
        Engine::Virtual => {
            // With workers, the participants are theirs; the custodians stay here.
            let own = if args.workers > 0 { 0 } else { n };
            let clients: Vec<(String, Option<SiteData>)> = prep.sites[..own]
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
    let outcome = std::mem::take(&mut *outcome.lock().expect("outcome lock"));
    if let Some(reason) = &outcome.failure {
        bail!("the job stopped: {reason}");
    }
    if (history.len() as u64) < args.rounds {
        bail!(
            "the federation stopped after {} of {} rounds",
            history.len(),
            args.rounds
        );
    }

    // Tables: every site's rows prepared by the federation's pipeline (round 0's), for the
    // baseline and the served model.
    let pipeline = outcome.statistics.as_ref().map(|s| s.pipeline.clone());
    if prep.spec.is_some() && pipeline.is_none() {
        bail!("the job has tables but round 0 reported no pipeline");
    }
    let locals = prep.locals(pipeline.as_deref())?;
    let data_summary = match (&outcome.statistics, &prep.spec) {
        (Some(s), Some(spec)) => Some(s.stats.summary(&spec.schema)),
        _ => None,
    };
    let federated_accuracy = history.last().and_then(|s| s.eval).map(|m| m.accuracy);
    let (centralised_accuracy, centralised_seconds) = if args.no_baseline {
        (None, None)
    } else {
        let t0 = Instant::now();
        let acc = centralised(
            &prep,
            pipeline.as_deref(),
            &spec,
            &train,
            args.rounds,
            args.device,
        )?;
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
        &locals,
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
        data_summary: data_summary.clone(),
        privacy: privacy.as_ref().map(|p| dp::report(p, &history)),
    };
    if !args.quiet {
        if let Some(summary) = &data_summary {
            report::print_summary(summary);
        }
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
        // Workers read tables only; the pipeline (and how it imputes) comes from the driver.
        no_impute: args.no_impute,
        missing_indicators: args.missing_indicators,
    };
    let examples = workers::driver::examples_of(&prep.sites);
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
    pipeline: Option<&cohort_model::tabular::Pipeline>,
    spec: &ModelSpec,
    train: &TrainConfig,
    rounds: u64,
    device: ComputeDevice,
) -> anyhow::Result<f64> {
    let (mut tr, mut te) = prep.pooled(pipeline)?;
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
