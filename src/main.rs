//! `cohort`: one binary for simulations, the coordinator and participants.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cohort::simulate;
use cohort_coordinator::{Coordinator, CoordinatorConfig, ModelStore, Orchestrator};

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
    /// Run a coordinator.
    Coordinator {
        /// coordinator.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a participant node.
    Participant {
        /// participant.toml
        #[arg(long)]
        config: PathBuf,
    },
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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

async fn run_coordinator(config: PathBuf) -> anyhow::Result<()> {
    let cfg = CoordinatorConfig::load(&config).map_err(anyhow::Error::msg)?;
    let job = cfg.job.job_config().map_err(anyhow::Error::msg)?;
    let strategy =
        cohort_coordinator::strategy::by_name(&cfg.job.strategy, cfg.job.server_lr as f32)
            .map_err(anyhow::Error::msg)?;
    let orch = Orchestrator::new(job, strategy, cfg.allowed_participants.clone())
        .map_err(anyhow::Error::msg)?;
    let store = ModelStore::open(&cfg.model_dir)
        .with_context(|| format!("opening model directory {}", cfg.model_dir.display()))?;
    let coordinator = Coordinator::start(orch, store).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, job = %cfg.job.id, "coordinator listening");
    // Print the bound address on stdout so scripts (and tests) can find an ephemeral port.
    println!("listening on {addr}");
    let c2 = coordinator.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("signal received; shutting down"),
            _ = async {
                c2.finished().await;
                // Keep serving briefly so every participant learns that the job is over.
                tracing::info!("job finished; shutting down in 2 s");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            } => {}
        }
    };
    coordinator.serve(listener, stop).await?;
    let history = coordinator.history();
    if let Some(last) = history.last() {
        println!(
            "finished {} rounds; last model version {} in {}",
            history.len(),
            last.round,
            coordinator.store().weights_path(last.round).display()
        );
    }
    Ok(())
}

async fn run_participant(config: PathBuf) -> anyhow::Result<()> {
    let cfg = cohort_participant::ParticipantConfig::load(&config).map_err(anyhow::Error::msg)?;
    if cfg.role == cohort_participant::config::Role::Custodian {
        tracing::info!(id = %cfg.id, "key custodian: holds no data, answers decryption requests");
        let report = tokio::select! {
            r = cohort_participant::run_custodian(cfg.options()) => r?,
            _ = shutdown_signal() => anyhow::bail!("interrupted"),
        };
        println!(
            "custodian {} done: {} decryption shares sent",
            cfg.id, report.shares_sent
        );
        return Ok(());
    }
    let data = cfg.load_data().map_err(anyhow::Error::msg)?;
    tracing::info!(
        id = %cfg.id,
        train = data.train.len(),
        test = data.test.len(),
        "data loaded"
    );
    let report = tokio::select! {
        r = cohort_participant::run(cfg.options(), Arc::new(data)) => r?,
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
            Command::Coordinator { config } => {
                init_logs("info");
                run_coordinator(config).await
            }
            Command::Participant { config } => {
                init_logs("info");
                run_participant(config).await
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
