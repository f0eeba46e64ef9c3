//! `cohort`: one binary for simulations, the coordinator and participants.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cohort::simulate;
use cohort_coordinator::{Coordinator, CoordinatorConfig, ModelStore};

#[derive(Parser)]
#[command(
    name = "cohort",
    version,
    about = "Federated learning with secure aggregation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole federation on this machine: a coordinator and N participants over real
    /// loopback gRPC. With no flags: 3 hospitals on the bundled breast-cancer table.
    Simulate(Box<simulate::SimArgs>),
    /// One worker process of a simulation run with `--workers` (started by `cohort simulate`
    /// itself, or as a Kubernetes Indexed Job with `--workers-listen` on the driver): owns a
    /// shard of the participants and sends one partial sum a round.
    SimWorker(simulate::workers::WorkerArgs),
    /// Run a coordinator.
    Coordinator {
        /// coordinator.toml
        #[arg(long)]
        config: PathBuf,
        /// Listen without TLS when the config has no [tls] section. Development only: anyone
        /// who can reach the port can join, and nothing is encrypted in transit.
        #[arg(long)]
        insecure_dev: bool,
    },
    /// Serve the promoted global model for inference (gRPC), following promotions through
    /// the coordinator's model registry.
    Serve {
        /// serve.toml
        #[arg(long)]
        config: PathBuf,
        /// auto (a GPU when wgpu finds one, else the CPU), wgpu or cpu; overrides
        /// [inference] device.
        #[arg(long)]
        device: Option<cohort_serving::DeviceChoice>,
        /// f32 or int8; overrides [inference] precision.
        #[arg(long)]
        precision: Option<cohort_model::Precision>,
        /// Listen without TLS when the config has no [tls] section. Development only.
        #[arg(long)]
        insecure_dev: bool,
    },
    /// Run a participant node (or a key custodian).
    Participant {
        /// participant.toml
        #[arg(long)]
        config: PathBuf,
        /// Connect without TLS when the config has no [tls] section. Development only.
        #[arg(long)]
        insecure_dev: bool,
        /// Write the statistics this site standardises its rows with (fitted on its own
        /// training split) to this JSON file and exit, without connecting: `cohort predict
        /// --standardizer FILE` prepares rows for the served model the same way.
        #[arg(long)]
        export_standardizer: Option<PathBuf>,
    },
    /// Administer a running coordinator over its Admin gRPC service (with an admin
    /// certificate from `cohort provision`).
    Admin(cohort::admin_cli::AdminArgs),
    /// Ask an inference server for predictions of a CSV file's rows or an IDX directory's
    /// images (with an inference certificate from `cohort provision`).
    Predict(cohort::predict_cli::PredictArgs),
    /// Create a federation's CA, certificates (coordinator, participants, custodians, admins,
    /// inference clients), a CRL and ready-to-use configurations in one new directory.
    Provision(cohort::provision::ProvisionArgs),
    /// Revoke identities of a provisioned federation: writes a new CRL, which a running
    /// coordinator picks up without a restart.
    Revoke(cohort::provision::RevokeArgs),
    /// Renew identities of a provisioned federation before their certificates expire: a new
    /// key and certificate from the same CA, same identity, role and names, replacing the old
    /// ones in each identity's directory (the node rejoins with them).
    Renew(cohort::provision::RenewArgs),
    /// Encrypt a private key file in place with a passphrase (PKCS#8, scrypt and AES-256);
    /// then name the passphrase's environment variable as `key_passphrase_env` in [tls].
    ProtectKey {
        /// The key file (key.pem).
        #[arg(long)]
        key: PathBuf,
        /// The environment variable that holds the passphrase.
        #[arg(long)]
        passphrase_env: String,
    },
    /// Rotate the key-encryption key of encrypted model versions: a new key becomes current
    /// and every version's data key is re-wrapped (the weights are not re-encrypted).
    RotateKeys {
        /// The coordinator's configuration: its [at_rest] key_dir and its model registry
        /// (model_dir or [model_store.s3]).
        #[arg(long, conflicts_with_all = ["key_dir", "model_dir"])]
        config: Option<PathBuf>,
        /// The [at_rest] key_dir (with --model-dir, instead of --config).
        #[arg(long, requires = "model_dir")]
        key_dir: Option<PathBuf>,
        /// The coordinator's model_dir.
        #[arg(long, requires = "key_dir")]
        model_dir: Option<PathBuf>,
    },
    /// Export a model version for PyTorch: model.safetensors (PyTorch's tensor layout and
    /// names) and model.py (the nn.Module that loads it and gives the same logits).
    Export(cohort::export_cli::ExportArgs),
    /// Infer a job's [data] section (the schema every site's table is read against) from
    /// one site's CSV table, to paste into the job specification.
    Schema(cohort::schema_cli::SchemaArgs),
    /// A job with tables: the federation's summary table from its round-0 statistics (the
    /// same as `cohort admin jobs stats JOB`).
    Stats {
        /// The job.
        job: String,
        /// admin.toml as `cohort provision --admins …` writes it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The coordinator's address (overrides the configuration's).
        #[arg(long)]
        coordinator: Option<String>,
        /// Connect without TLS (a coordinator started with --insecure-dev). Development only.
        #[arg(long)]
        insecure_dev: bool,
    },
}

const INSECURE: &str = "INSECURE DEVELOPMENT MODE: no TLS. Anyone who can reach this port can \
     join, impersonate participants and read everything in transit. Never use this with real data.";

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // cubecl logs a warning when `device = "auto"` finds no GPU adapter, which is an
        // expected answer (`cohort serve` then logs that it serves on the CPU).
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{default},cubecl_common=error"))
        });
    // Colour only on a terminal: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run_coordinator(config: PathBuf, insecure_dev: bool) -> anyhow::Result<()> {
    let cfg = CoordinatorConfig::load(&config).map_err(anyhow::Error::msg)?;
    if cfg.tls.is_none() && !insecure_dev {
        anyhow::bail!(
            "{}: no [tls] section. Create certificates with `cohort provision` and add the \
             [tls] section it prints, or pass --insecure-dev for a development run without TLS",
            config.display()
        );
    }
    if let Some(tls) = &cfg.tls {
        // Fail now, naming the file, rather than at the first connection.
        tls.server_config().map_err(anyhow::Error::msg)?;
    }
    if cfg.at_rest.is_none() {
        tracing::warn!("no [at_rest] section: model versions are stored unencrypted");
    }
    // A connection per participant: the usual soft limit of 1,024 open files would stop a
    // federation at about a thousand.
    match cohort_coordinator::raise_open_files_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "raised the limit on open files")
        }
        Ok((_, after)) => tracing::info!(limit = after, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open files limit"),
    }
    let store = cfg.open_model_store().map_err(anyhow::Error::msg)?;
    let state_path = cfg.state_path();
    let state = cohort_coordinator::State::open(&state_path).map_err(anyhow::Error::msg)?;
    let admission = cohort_coordinator::Admission {
        allowed: cfg.allowed_participants.clone(),
        require_approval: cfg.require_approval,
    };
    let coordinator = Coordinator::new(store.clone(), state, admission);
    if let Some(p) = coordinator
        .set_retention(cfg.retention)
        .map_err(|e| anyhow::anyhow!("applying [retention]: {e}"))?
    {
        tracing::info!(
            versions = p.model_versions.len(),
            rounds = p.rounds,
            audit_entries = p.audit_entries,
            "retention: pruned at start"
        );
    }
    // Its own certificate's and the CA's expiry, for /metrics and `cohort admin status`.
    if let Some(tls) = &cfg.tls {
        for (path, identity, role) in [
            (&tls.cert, "coordinator", "coordinator"),
            (&tls.ca, "ca", "ca"),
        ] {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let not_after = cohort_crypto::pki::not_after_of_pem(&pem)
                .with_context(|| format!("{}", path.display()))?;
            coordinator.metrics().certificate(identity, role, not_after);
        }
    }
    if let Some(job) = coordinator.recover().map_err(anyhow::Error::msg)? {
        println!("resumed job {job} from its last completed round");
    }
    if let Err(e) = coordinator.publish_serving() {
        tracing::error!(error = %e, "cohort serve instances keep their version until it is written");
    }
    if let Some(settings) = cfg.inference.clone() {
        let inference =
            cohort_coordinator::Inference::new(store, settings, coordinator.metrics().inference())
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
        let c = coordinator.clone();
        tokio::task::spawn_blocking(move || c.attach_inference(inference))
            .await?
            .map_err(|e| anyhow::anyhow!("inference: {e}"))?;
        println!("serving inference on the coordinator's listener");
    }
    // Batch mode: the configuration's job runs, and the coordinator exits once it is over.
    let batch = cfg.job.is_some();
    if let Some(job) = &cfg.job {
        coordinator
            .run_configured(job)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, state = %state_path.display(), "coordinator listening");
    if let Some(m) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("metrics_listen {m}"))?;
        let metrics_addr = l.local_addr()?;
        tracing::info!(%metrics_addr, "Prometheus metrics on /metrics");
        println!("metrics on http://{metrics_addr}/metrics");
        tokio::spawn(coordinator.metrics().serve(l, std::future::pending()));
    }
    // Print the bound address on stdout so scripts (and tests) can find an ephemeral port.
    println!("listening on {addr}");
    let c2 = coordinator.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("signal received; shutting down"),
            _ = async {
                if !batch {
                    return std::future::pending().await;
                }
                c2.finished().await;
                // Keep serving briefly so every participant learns that the job is over.
                tracing::info!("job finished; shutting down in 2 s");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            } => {}
        }
    };
    match cfg.tls.clone() {
        Some(tls) => coordinator
            .serve_tls(listener, tls, std::time::Duration::from_secs(2), stop)
            .await
            .map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!("{INSECURE}");
            eprintln!("WARNING: {INSECURE}");
            coordinator.serve(listener, stop).await?
        }
    }
    let history = coordinator.history();
    if let Some(last) = history.last() {
        println!(
            "finished {} rounds; last model version {} in {}",
            history.len(),
            last.round,
            coordinator
                .job_store()
                .weights_location(last.round)
                .unwrap_or_else(|e| e.to_string())
        );
    }
    Ok(())
}

async fn run_serve(
    config: PathBuf,
    device: Option<cohort_serving::DeviceChoice>,
    precision: Option<cohort_model::Precision>,
    insecure_dev: bool,
) -> anyhow::Result<()> {
    use cohort_serving::Inference;
    let mut cfg = cohort_serving::ServeConfig::load(&config).map_err(anyhow::Error::msg)?;
    if cfg.tls.is_none() && !insecure_dev {
        anyhow::bail!(
            "{}: no [tls] section. Give it a certificate of the federation (`cohort provision`), \
             or pass --insecure-dev for a development run without TLS",
            config.display()
        );
    }
    if let Some(tls) = &cfg.tls {
        tls.server_config().map_err(anyhow::Error::msg)?;
    }
    if let Some(d) = device {
        cfg.inference.device = d;
    }
    if let Some(p) = precision {
        cfg.inference.precision = p;
    }
    let store = cfg.open_model_store().map_err(anyhow::Error::msg)?;
    let metrics = cohort_serving::InferenceMetrics::new();
    let encode = metrics.exporter();
    let inference = Inference::new(store, cfg.inference.clone(), metrics)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    match &cfg.pin {
        Some(to) => {
            let (i, to) = (inference.clone(), to.clone());
            tokio::task::spawn_blocking(move || i.switch(&to))
                .await?
                .map_err(|e| anyhow::anyhow!("pinned version: {e}"))?;
        }
        None => {
            tokio::spawn(
                inference
                    .clone()
                    .follow_registry(std::time::Duration::from_millis(cfg.watch_interval_ms)),
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    if let Some(m) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("metrics_listen {m}"))?;
        println!("metrics on http://{}/metrics", l.local_addr()?);
        let i = inference.clone();
        tokio::spawn(cohort_protocol::server::serve_metrics(
            l,
            std::future::pending(),
            encode,
            move || i.serving().is_some(),
        ));
    }
    tracing::info!(%addr, device = %inference.device(), "inference service listening");
    println!("listening on {addr}");
    if cfg.tls.is_none() {
        const OPEN: &str = "INSECURE DEVELOPMENT MODE: no TLS. Anyone who can reach this port \
             can query the model, and requests and answers cross the network in the clear.";
        tracing::warn!("{OPEN}");
        eprintln!("WARNING: {OPEN}");
    }
    cohort_serving::serve_alone(
        inference,
        listener,
        cfg.tls.clone(),
        std::time::Duration::from_secs(2),
        shutdown_signal(),
    )
    .await
    .map_err(anyhow::Error::msg)
}

fn export_standardizer(config: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let cfg = cohort_participant::ParticipantConfig::load(config).map_err(anyhow::Error::msg)?;
    let local = match cfg.load_data().map_err(anyhow::Error::msg)? {
        cohort_participant::SiteData::Ready(l) => l,
        _ => anyhow::bail!(
            "{}: a table of a job with tables is prepared by the federation's pipeline, which \
             travels with each model version: there is no site standardizer to export",
            config.display()
        ),
    };
    let s = local.standardizer.clone().with_context(|| {
        format!(
            "{}: this site does not standardise its data ([data] standardize = false, or \
             images), so rows need no preparation",
            config.display()
        )
    })?;
    std::fs::write(out, serde_json::to_vec_pretty(&s)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote the statistics of {} features to {}",
        s.mean.len(),
        out.display()
    );
    Ok(())
}

async fn run_participant(config: PathBuf, insecure_dev: bool) -> anyhow::Result<()> {
    let cfg = cohort_participant::ParticipantConfig::load(&config).map_err(anyhow::Error::msg)?;
    let mut opts = cfg.options();
    match &cfg.tls {
        Some(tls) => opts.tls = Some(tls.node().map_err(anyhow::Error::msg)?),
        None if insecure_dev => {
            tracing::warn!("{INSECURE}");
            eprintln!("WARNING: {INSECURE}");
        }
        None => anyhow::bail!(
            "{}: no [tls] section. Use the configuration `cohort provision` wrote for this node, \
             or pass --insecure-dev for a development run without TLS",
            config.display()
        ),
    }
    if cfg.role == cohort_participant::config::Role::Custodian {
        tracing::info!(id = %cfg.id, "key custodian: holds no data, answers decryption requests");
        let report = tokio::select! {
            r = cohort_participant::run_custodian(opts) => r?,
            _ = shutdown_signal() => anyhow::bail!("interrupted"),
        };
        println!(
            "custodian {} done: {} decryption shares sent",
            cfg.id, report.shares_sent
        );
        return Ok(());
    }
    let data = cfg.load_data().map_err(anyhow::Error::msg)?;
    match &data {
        cohort_participant::SiteData::Ready(d) => tracing::info!(
            id = %cfg.id,
            train = d.train.len(),
            test = d.test.len(),
            "data loaded"
        ),
        other => tracing::info!(
            id = %cfg.id,
            rows = other.examples(),
            "table loaded; read against the job's schema when the job starts"
        ),
    }
    let report = tokio::select! {
        r = cohort_participant::run(opts, data) => r?,
        _ = shutdown_signal() => anyhow::bail!("interrupted"),
    };
    println!(
        "participant {} done: trained {} rounds, {} evaluations",
        cfg.id, report.rounds_trained, report.evaluations
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Simulate(args) => {
                init_logs("warn");
                simulate::run(*args).await.map(|_| ())
            }
            Command::SimWorker(args) => {
                init_logs("warn");
                simulate::workers::run_worker(args).await
            }
            Command::Coordinator {
                config,
                insecure_dev,
            } => {
                init_logs("info");
                run_coordinator(config, insecure_dev).await
            }
            Command::Serve {
                config,
                device,
                precision,
                insecure_dev,
            } => {
                init_logs("info");
                run_serve(config, device, precision, insecure_dev).await
            }
            Command::Participant {
                config,
                export_standardizer: Some(out),
                ..
            } => export_standardizer(&config, &out),
            Command::Participant {
                config,
                insecure_dev,
                export_standardizer: None,
            } => {
                init_logs("info");
                run_participant(config, insecure_dev).await
            }
            Command::Predict(args) => {
                init_logs("warn");
                cohort::predict_cli::run(args).await
            }
            Command::Admin(args) => {
                init_logs("warn");
                cohort::admin_cli::run(args).await
            }
            Command::Stats {
                job,
                config,
                coordinator,
                insecure_dev,
            } => {
                init_logs("warn");
                use cohort::admin_cli::{AdminArgs, AdminCommand, JobAction};
                cohort::admin_cli::run(AdminArgs {
                    config,
                    coordinator,
                    insecure_dev,
                    command: AdminCommand::Jobs {
                        action: Some(JobAction::Stats { id: job }),
                    },
                })
                .await
            }
            Command::Provision(args) => {
                cohort::provision::provision(&args)?;
                println!(
                    "federation provisioned in {}: keep ca/ca.key offline; give each node its own directory",
                    args.out.display()
                );
                Ok(())
            }
            Command::RotateKeys {
                config,
                key_dir,
                model_dir,
            } => {
                let (key_dir, store) = match (config, key_dir, model_dir) {
                    (Some(c), _, _) => {
                        let cfg = CoordinatorConfig::load(&c).map_err(anyhow::Error::msg)?;
                        let key_dir = cfg
                            .at_rest
                            .as_ref()
                            .and_then(|a| a.key_dir.clone())
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "{}: no [at_rest] key_dir to rotate (PKCS#11 keys rotate in the token)",
                                    c.display()
                                )
                            })?;
                        let store = CoordinatorConfig {
                            at_rest: None,
                            ..cfg
                        }
                        .open_model_store()
                        .map_err(anyhow::Error::msg)?;
                        (key_dir, store)
                    }
                    (None, Some(k), Some(m)) => (k, ModelStore::open(&m)?),
                    _ => anyhow::bail!("give --config, or --key-dir and --model-dir"),
                };
                let id = cohort_storage::add_key(&key_dir)
                    .map_err(anyhow::Error::msg)?;
                let keys = cohort_storage::load_key_dir(&key_dir)
                    .map_err(anyhow::Error::msg)?;
                let n = store
                    .with_keys(Arc::new(keys))
                    .rewrap_all()
                    .map_err(anyhow::Error::msg)?;
                println!(
                    "{id} is now current; {n} model objects re-wrapped. Old keys stay in {} until you remove them.",
                    key_dir.display()
                );
                Ok(())
            }
            Command::ProtectKey {
                key,
                passphrase_env,
            } => {
                let pass = std::env::var(&passphrase_env).map_err(|_| {
                    anyhow::anyhow!("the passphrase variable {passphrase_env} is not set")
                })?;
                let pem = std::fs::read_to_string(&key)
                    .with_context(|| format!("reading {}", key.display()))?;
                let (salt, iv): ([u8; 16], [u8; 16]) = (rand::random(), rand::random());
                let enc = cohort_protocol::tls::encrypt_key_pem(&pem, &pass, &salt, &iv)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
                cohort::provision::write_private(&key, &enc)?;
                println!(
                    "{} is encrypted; add key_passphrase_env = \"{passphrase_env}\" to the [tls] section that names it",
                    key.display()
                );
                Ok(())
            }
            Command::Export(args) => {
                let version = cohort::export_cli::run(&args)?;
                println!(
                    "job {} version {version}: {} and {}",
                    args.job,
                    args.out.join("model.safetensors").display(),
                    args.out.join("model.py").display()
                );
                Ok(())
            }
            Command::Schema(args) => {
                print!("{}", cohort::schema_cli::section(&args)?.0);
                Ok(())
            }
            Command::Renew(args) => {
                for (dir, not_after) in cohort::provision::renew(&args)? {
                    println!(
                        "renewed {}: valid until {}",
                        dir.display(),
                        cohort_crypto::pki::utc(not_after)
                    );
                }
                Ok(())
            }
            Command::Revoke(args) => {
                cohort::provision::revoke(&args)?;
                println!(
                    "revoked {:?}; new CRL in {}",
                    args.identities,
                    args.dir.join("crl.pem").display()
                );
                Ok(())
            }
        }
    });
    // Participants' blocking training threads must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
