//! Load generator for the coordinator: N real participants, each with its own certificate
//! and its own mutual-TLS gRPC connection, held by this process, against one `cohort
//! coordinator` process on loopback; secure rounds of K selected participants.
//!
//! `cargo bench --bench federation_load -- [--participants 100,1000] [--per-round 100]
//! [--rounds 10] [--json out.json]`
//!
//! For each N: `cohort provision` issues N participant certificates and an admin's; the
//! coordinator starts with every participant allowed; the N agents (cohort's participant
//! library, `cohort_participant::run`) connect to a job created and started over the Admin
//! API: `--rounds` secure rounds of `--per-round` selected participants (logistic regression
//! on breast-cancer rows, `--rows` a participant), the first once all N are online.
//! Sampled every 50 ms: the coordinator's resident memory and open file descriptors
//! (sockets among them) from /proc. Printed: connect time, rounds/s, round latency p50/p99
//! (the coordinator's own round records), the peaks, and every agent error. Everything stays
//! on loopback, bounded by `--rounds` and `--timeout`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use cohort_model::data::load_csv;
use cohort_model::{ComputeSlots, Dataset, LabelColumn, Sharing};
use cohort_protocol::pb::{CreateJobRequest, GetStatusRequest, JobRequest};

#[path = "support/harness.rs"]
mod harness;
use harness::{
    admin_client, agent_options, coordinator_config, cpu_seconds, fds, free_port, percentile,
    provision, rss_kb, secure_job_spec, site_data, start_coordinator,
};

#[derive(Parser)]
pub struct Args {
    /// Federation sizes to measure, one after another.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    participants: Vec<usize>,
    /// Participants selected each round.
    #[arg(long, default_value_t = 100)]
    per_round: usize,
    /// Rounds per federation.
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Training rows each participant holds (drawn from the breast-cancer table).
    #[arg(long, default_value_t = 16)]
    rows: usize,
    /// Secure aggregation's committee size (drawn from the participants each round).
    #[arg(long, default_value_t = 5)]
    committee: usize,
    /// Give up on a federation after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Row {
    pub participants: usize,
    pub per_round: usize,
    pub rounds: u64,
    pub connect_seconds: f64,
    pub job_seconds: f64,
    pub rounds_per_second: f64,
    pub round_p50_seconds: f64,
    pub round_p99_seconds: f64,
    pub coordinator_peak_rss_mb: f64,
    pub coordinator_rss_after_mb: f64,
    pub coordinator_peak_fds: usize,
    pub coordinator_peak_sockets: usize,
    /// CPU seconds (user and system) the coordinator used, connecting included.
    pub coordinator_cpu_seconds: f64,
    pub client_peak_rss_mb: f64,
    pub agent_errors: usize,
    pub failed_rounds: u64,
}

/// The job, created over the Admin API: its rounds start once all `n` participants are
/// online.
fn job_spec(args: &Args, n: usize) -> String {
    let k = args.per_round.min(n);
    secure_job_spec(
        &format!("load-{n}"),
        args.rounds,
        n,
        k,
        (k * 9 / 10).max(2),
        args.committee,
        60,
    )
}

async fn measure(args: &Args, n: usize, table: &Dataset) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let names: Vec<String> = (0..n).map(|i| format!("p-{i}")).collect();
    provision(&pki, &names)?;
    let port = free_port();
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(&cfg, coordinator_config(dir.path(), &pki, port, &names))?;
    let coordinator = start_coordinator(&cfg)?;
    let pid = coordinator.0.id();
    let url = format!("https://127.0.0.1:{port}");

    // Sample the coordinator's memory and descriptors, and this process's memory.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut peak_fds, mut peak_sockets, mut client_peak) = (0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (f, s) = fds(pid);
                peak_fds = peak_fds.max(f);
                peak_sockets = peak_sockets.max(s);
                if let Some((_, hwm)) = rss_kb(std::process::id()) {
                    client_peak = hwm;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (peak_fds, peak_sockets, client_peak)
        })
    };

    let mut admin = admin_client(&pki, &url).await?;

    let job = admin
        .create_job(CreateJobRequest {
            spec_toml: job_spec(args, n),
        })
        .await?
        .into_inner();
    admin
        .start_job(JobRequest {
            job_id: job.id.clone(),
        })
        .await?;

    // N agents, each with its own certificate and connection.
    let compute = ComputeSlots::new(Sharing::PerCore, 2)?;
    let connect = Instant::now();
    let spawned_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        * 1e3;
    let mut agents = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let mut opts = agent_options(&pki, name, &url, &compute)?;
        opts.reconnect_for = Duration::from_secs(60);
        let data = site_data(table, args.rows, i)?;
        agents.spawn(async move { cohort_participant::run(opts, Arc::new(data)).await });
    }
    let job_id = job.id.clone();
    loop {
        let s = admin.get_status(GetStatusRequest {}).await?.into_inner();
        let online = s.participants_online as usize;
        // Round 1 starts only with all N online (and a fast job may be over by now).
        if online >= n || s.round >= 1 || s.active_job.is_empty() {
            break;
        }
        if connect.elapsed().as_secs_f64() > args.timeout {
            bail!(
                "{online} of {n} participants online after {:.0} s",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job_start = Instant::now();
    let status = loop {
        let status = admin
            .get_job(JobRequest {
                job_id: job_id.clone(),
            })
            .await?
            .into_inner();
        let state = status
            .job
            .as_ref()
            .map(|j| j.state.clone())
            .unwrap_or_default();
        if state == "finished" || state == "cancelled" {
            break status;
        }

        if job_start.elapsed().as_secs_f64() > args.timeout {
            bail!(
                "job not finished after {:.0} s (state {state})",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // From the coordinator's round records: the first round starts as the N-th participant
    // joins, so connecting took until then, and the job from then to the last round's end.
    let (first, last) = match (status.rounds.first(), status.rounds.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => bail!("no round completed"),
    };
    let first_start_ms = first.completed_unix_ms as f64 - first.seconds * 1e3;
    let connect_seconds = (first_start_ms - spawned_ms) / 1e3;
    let job_seconds = (last.completed_unix_ms as f64 - first_start_ms) / 1e3;
    let after = rss_kb(pid).unwrap_or_default();
    let coordinator_cpu_seconds = cpu_seconds(pid);

    let mut agent_errors = 0;
    while let Some(r) = agents.join_next().await {
        if let Ok(Err(e)) | Err(e) = r
            .map_err(anyhow::Error::from)
            .map(|r| r.map_err(anyhow::Error::from))
        {
            agent_errors += 1;
            if agent_errors <= 5 {
                eprintln!("agent error: {e:#}");
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak_fds, peak_sockets, client_peak) = sampler.join().unwrap();
    let mut secs: Vec<f64> = status.rounds.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let record = status.job.unwrap_or_default();
    Ok(Row {
        participants: n,
        per_round: args.per_round.min(n),
        rounds: record.rounds_completed,
        connect_seconds,
        job_seconds,
        rounds_per_second: record.rounds_completed as f64 / job_seconds,
        round_p50_seconds: percentile(&secs, 0.5),
        round_p99_seconds: percentile(&secs, 0.99),
        coordinator_peak_rss_mb: after.1 as f64 / 1024.0,
        coordinator_rss_after_mb: after.0 as f64 / 1024.0,
        coordinator_peak_fds: peak_fds,
        coordinator_peak_sockets: peak_sockets,
        coordinator_cpu_seconds,
        client_peak_rss_mb: client_peak as f64 / 1024.0,
        agent_errors,
        failed_rounds: status
            .rounds
            .iter()
            .map(|r| u64::from(r.attempts.saturating_sub(1)))
            .sum(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(Args::parse()).await.map(|_| ())
}

/// The whole command (`tests/load.rs` runs it with a small federation).
pub async fn run(args: Args) -> anyhow::Result<Vec<Row>> {
    // This process holds a connection per participant.
    cohort_coordinator::raise_open_files_limit()?;
    let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv");
    let table = load_csv(&csv, &LabelColumn::Name("diagnosis".into()))?;
    let mut rows = Vec::new();
    println!(
        "{:>6} {:>5} {:>6} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>7} {:>9} {:>9} {:>6}",
        "N",
        "K",
        "rounds",
        "connect s",
        "rounds/s",
        "p50 s",
        "p99 s",
        "coord MB",
        "fds",
        "sockets",
        "coord cpu",
        "client MB",
        "errors"
    );
    for &n in &args.participants {
        let r = measure(&args, n, &table)
            .await
            .with_context(|| format!("{n} participants"))?;
        println!(
            "{:>6} {:>5} {:>6} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>9.0} {:>6} {:>7} {:>9.1} {:>9.0} {:>6}",
            r.participants,
            r.per_round,
            r.rounds,
            r.connect_seconds,
            r.rounds_per_second,
            r.round_p50_seconds,
            r.round_p99_seconds,
            r.coordinator_peak_rss_mb,
            r.coordinator_peak_fds,
            r.coordinator_peak_sockets,
            r.coordinator_cpu_seconds,
            r.client_peak_rss_mb,
            r.agent_errors
        );
        rows.push(r);
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(rows)
}
