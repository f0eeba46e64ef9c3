//! Soak: a compressed long run of one `cohort coordinator` process. Jobs follow one another
//! (`--rounds` secure rounds in all, `--rounds-per-job` each) while participants join and
//! leave at random (each agent runs for a random time, then is dropped mid-whatever it was
//! doing, and comes back after a pause) and an admin interleaves actions over the Admin API
//! (status, listings, removing and re-approving a participant, pausing and resuming the job,
//! promoting and rolling back versions).
//!
//! `cargo bench --bench soak -- [--rounds 2000] [--participants 12] [--per-round 4]
//! [--rounds-per-job 100] [--sample-every 100] [--no-retention] [--json out.json]`
//!
//! Every `--sample-every` rounds it samples the coordinator's resident memory and open file
//! descriptors (/proc), the state file's size, the registry's size and file count, and the
//! number of series on /metrics. The coordinator runs with `[retention] model_versions =
//! --keep-versions (5), round_history = --keep-rounds (20), audit_entries = --keep-audit
//! (500)`; `--no-retention` shows what grows without it. Printed: the samples, what grew between
//! the first quarter and the end, and every unexpected error. All traffic stays on
//! loopback, bounded by `--rounds` and `--timeout`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use cohort_model::data::load_csv;
use cohort_model::{ComputeSlots, LabelColumn, Sharing};
use cohort_protocol::pb::admin_client::AdminClient;
use cohort_protocol::pb::{
    CreateJobRequest, GetStatusRequest, JobRequest, ListAuditRequest, ListModelsRequest,
    ListParticipantsRequest, ModelRequest, ParticipantRequest, RollbackModelRequest,
};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use tonic::transport::Channel;

#[path = "support/harness.rs"]
mod harness;
use harness::{
    admin_client, agent_options, coordinator_config_with, fds, free_port, provision, rss_kb,
    rss_parts_kb, secure_job_spec, site_data, start_coordinator,
};

#[derive(Parser, Clone)]
pub struct Args {
    /// Secure rounds in all, over successive jobs.
    #[arg(long, default_value_t = 2000)]
    rounds: u64,
    /// Rounds of each job.
    #[arg(long, default_value_t = 100)]
    rounds_per_job: u64,
    /// Participants (each with its own certificate), joining and leaving at random.
    #[arg(long, default_value_t = 12)]
    participants: usize,
    /// Participants selected each round.
    #[arg(long, default_value_t = 4)]
    per_round: usize,
    /// Secure aggregation's committee size.
    #[arg(long, default_value_t = 3)]
    committee: usize,
    /// Training rows each participant holds.
    #[arg(long, default_value_t = 16)]
    rows: usize,
    /// Sample the coordinator every this many completed rounds.
    #[arg(long, default_value_t = 100)]
    sample_every: u64,
    /// Mean seconds an agent stays online before it is dropped.
    #[arg(long, default_value_t = 30.0)]
    online_secs: f64,
    /// Mean seconds it stays away.
    #[arg(long, default_value_t = 3.0)]
    offline_secs: f64,
    /// Milliseconds between admin actions.
    #[arg(long, default_value_t = 500)]
    admin_every_ms: u64,
    /// `[retention] model_versions`.
    #[arg(long, default_value_t = 5)]
    keep_versions: u64,
    /// `[retention] round_history`.
    #[arg(long, default_value_t = 20)]
    keep_rounds: u64,
    /// `[retention] audit_entries`.
    #[arg(long, default_value_t = 500)]
    keep_audit: u64,
    /// Run without `[retention]` (everything kept).
    #[arg(long)]
    no_retention: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    timeout: f64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Sample {
    pub rounds: u64,
    pub seconds: f64,
    pub rss_mb: f64,
    /// Of `rss_mb`: anonymous pages (the heap) and file pages (code as far as it ran).
    pub rss_anon_mb: f64,
    pub rss_file_mb: f64,
    pub fds: usize,
    pub state_bytes: u64,
    pub registry_bytes: u64,
    pub registry_files: usize,
    pub metrics_series: usize,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub rounds: u64,
    pub jobs: u64,
    pub seconds: f64,
    /// Rounds that needed more than one attempt.
    pub retried_rounds: u64,
    /// Agents dropped while online (each came back later).
    pub leaves: u64,
    pub admin_actions: u64,
    /// Admin actions refused because of what was going on (pausing a job that had just
    /// finished, …): expected in a race, counted apart from errors.
    pub admin_refusals: u64,
    /// Unexpected errors: admin calls failing otherwise, agents failing other than by
    /// being dropped or removed.
    pub errors: u64,
    pub samples: Vec<Sample>,
    /// Kept at the end (what retention bounds).
    pub model_versions_kept: usize,
    pub audit_entries_kept: usize,
    /// The most round records any finished job kept.
    pub finished_job_rounds_kept: usize,
    pub weights_objects: usize,
}

fn dir_size(dir: &Path) -> (u64, usize) {
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut files) = (0, 0);
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    bytes += m.len();
                    files += 1;
                }
                Err(_) => {}
            }
        }
    }
    (bytes, files)
}

/// Series on /metrics (lines that are not comments).
fn metrics_series(addr: &str) -> usize {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

fn job_spec(args: &Args, id: &str, rounds: u64) -> String {
    let k = args.per_round;
    secure_job_spec(
        id,
        rounds,
        k,
        k,
        k.saturating_sub(1).max(2),
        args.committee,
        10,
    )
}

/// Counts what the admin and the agents met.
#[derive(Default)]
struct Tally {
    leaves: AtomicU64,
    admin_actions: AtomicU64,
    admin_refusals: AtomicU64,
    errors: AtomicU64,
}

impl Tally {
    fn admin<T>(&self, what: &str, r: Result<T, tonic::Status>) {
        self.admin_actions.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(_) => {}
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                self.admin_refusals.fetch_add(1, Ordering::Relaxed);
            }
            Err(s) => {
                if self.errors.fetch_add(1, Ordering::Relaxed) < 10 {
                    eprintln!("admin {what}: {s}");
                }
            }
        }
    }
}

/// Aborts a task when dropped (an agent goes with the loop that started it).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One participant coming and going until `stop`.
async fn churn(
    i: usize,
    opts: cohort_participant::AgentOptions,
    data: Arc<cohort_participant::LocalData>,
    args: Args,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + i as u64);
    while !stop.load(Ordering::Relaxed) {
        let mut agent = tokio::spawn(cohort_participant::run(opts.clone(), data.clone()));
        let _dropped_with_this_loop = AbortOnDrop(agent.abort_handle());
        let online = Duration::from_secs_f64(args.online_secs * rng.random_range(0.5..1.5));
        tokio::select! {
            r = &mut agent => match r {
                // Removed by the admin (refused for good until approved again).
                Ok(Err(cohort_participant::AgentError::Refused(_))) => {}
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    if tally.errors.fetch_add(1, Ordering::Relaxed) < 10 {
                        eprintln!("participant {i}: {e}");
                    }
                }
                Err(e) => eprintln!("participant {i}: {e}"),
            },
            _ = tokio::time::sleep(online) => {
                // Dropped mid-whatever it was doing: no goodbye.
                agent.abort();
                tally.leaves.fetch_add(1, Ordering::Relaxed);
            }
        }
        let away = Duration::from_secs_f64(args.offline_secs * rng.random_range(0.5..1.5));
        tokio::time::sleep(away).await;
    }
}

/// Admin actions at random until `stop`.
async fn administer(
    mut admin: AdminClient<Channel>,
    names: Vec<String>,
    every: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let job = match admin.get_status(GetStatusRequest {}).await {
            Ok(s) => s.into_inner().active_job,
            Err(s) => {
                tally.admin("status", Err::<(), _>(s));
                continue;
            }
        };
        tally.admin_actions.fetch_add(1, Ordering::Relaxed);
        match rng.random_range(0..6) {
            0 => tally.admin(
                "participants",
                admin.list_participants(ListParticipantsRequest {}).await,
            ),
            1 => {
                let r = admin
                    .list_models(ListModelsRequest {
                        job_id: job.clone(),
                    })
                    .await;
                let newest = r.as_ref().ok().and_then(|m| {
                    m.get_ref()
                        .models
                        .iter()
                        .max_by_key(|m| m.version)
                        .map(|m| (m.job_id.clone(), m.version))
                });
                tally.admin("models", r);
                if let Some((job_id, version)) = newest {
                    tally.admin(
                        "promote",
                        admin.promote_model(ModelRequest { job_id, version }).await,
                    );
                }
            }
            2 => tally.admin(
                "audit",
                admin.list_audit(ListAuditRequest { limit: 50 }).await,
            ),
            3 => {
                let who = names[rng.random_range(0..names.len())].clone();
                tally.admin(
                    "remove",
                    admin
                        .remove_participant(ParticipantRequest {
                            participant_id: who.clone(),
                            reason: "soak".into(),
                        })
                        .await,
                );
                tokio::time::sleep(every * 2).await;
                tally.admin(
                    "approve",
                    admin
                        .approve_participant(ParticipantRequest {
                            participant_id: who,
                            reason: "soak".into(),
                        })
                        .await,
                );
            }
            4 if !job.is_empty() => {
                let req = JobRequest { job_id: job };
                tally.admin("pause", admin.pause_job(req.clone()).await);
                tokio::time::sleep(every).await;
                tally.admin("resume", admin.resume_job(req).await);
            }
            _ => tally.admin(
                "rollback",
                admin.rollback_model(RollbackModelRequest {}).await,
            ),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(Args::parse()).await.map(|_| ())
}

/// The whole command (`tests/soak.rs` runs it shortened).
pub async fn run(args: Args) -> anyhow::Result<Report> {
    cohort_coordinator::raise_open_files_limit()?;
    let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv");
    let table = load_csv(&csv, &LabelColumn::Name("diagnosis".into()))?;
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let names: Vec<String> = (0..args.participants).map(|i| format!("p-{i}")).collect();
    provision(&pki, &names)?;
    let (port, metrics_port) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let retention = if args.no_retention {
        String::new()
    } else {
        let (v, r, a) = (args.keep_versions, args.keep_rounds, args.keep_audit);
        format!("\n[retention]\nmodel_versions = {v}\nround_history = {r}\naudit_entries = {a}\n")
    };
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "metrics_listen = \"{metrics_addr}\"\n{}",
            coordinator_config_with(dir.path(), &pki, port, &names, &retention)
        ),
    )?;
    let coordinator = start_coordinator(&cfg)?;
    let pid = coordinator.0.id();
    let url = format!("https://127.0.0.1:{port}");
    let mut admin = admin_client(&pki, &url).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let compute = ComputeSlots::new(Sharing::PerCore, 2)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let mut opts = agent_options(&pki, name, &url, &compute)?;
        opts.stay_between_jobs = true;
        opts.reconnect_for = Duration::from_secs(120);
        let data = Arc::new(site_data(&table, args.rows, i)?);
        tasks.spawn(churn(
            i,
            opts,
            data,
            args.clone(),
            stop.clone(),
            tally.clone(),
        ));
    }
    tasks.spawn(administer(
        admin.clone(),
        names.clone(),
        Duration::from_millis(args.admin_every_ms),
        stop.clone(),
        tally.clone(),
    ));

    let started = Instant::now();
    let sample = |rounds: u64| {
        let (rss, _) = rss_kb(pid).unwrap_or_default();
        let (anon, file) = rss_parts_kb(pid).unwrap_or_default();
        let (registry_bytes, registry_files) = dir_size(&dir.path().join("models"));
        Sample {
            rounds,
            seconds: started.elapsed().as_secs_f64(),
            rss_mb: rss as f64 / 1024.0,
            rss_anon_mb: anon as f64 / 1024.0,
            rss_file_mb: file as f64 / 1024.0,
            fds: fds(pid).0,
            state_bytes: std::fs::metadata(dir.path().join("state.redb"))
                .map(|m| m.len())
                .unwrap_or(0),
            registry_bytes,
            registry_files,
            metrics_series: metrics_series(&metrics_addr),
        }
    };
    println!(
        "{:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>10} {:>12} {:>9} {:>8}",
        "rounds",
        "seconds",
        "RSS MB",
        "anon MB",
        "file MB",
        "fds",
        "state B",
        "registry B",
        "reg files",
        "series"
    );
    let print = |s: &Sample| {
        println!(
            "{:>7} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>5} {:>10} {:>12} {:>9} {:>8}",
            s.rounds,
            s.seconds,
            s.rss_mb,
            s.rss_anon_mb,
            s.rss_file_mb,
            s.fds,
            s.state_bytes,
            s.registry_bytes,
            s.registry_files,
            s.metrics_series
        )
    };
    let mut report = Report::default();
    let (mut done, mut next_sample, mut job_no) = (0u64, 0u64, 0u64);
    let mut job_ids = Vec::new();
    while done < args.rounds {
        let rounds = args.rounds_per_job.min(args.rounds - done);
        let id = format!("soak-{job_no}");
        job_no += 1;
        admin
            .create_job(CreateJobRequest {
                spec_toml: job_spec(&args, &id, rounds),
            })
            .await
            .with_context(|| format!("creating {id}"))?;
        admin
            .start_job(JobRequest { job_id: id.clone() })
            .await
            .with_context(|| format!("starting {id}"))?;
        job_ids.push(id.clone());
        let status = loop {
            if started.elapsed().as_secs_f64() > args.timeout {
                bail!("{done} rounds after {:.0} s; giving up", args.timeout);
            }
            let st = admin
                .get_job(JobRequest { job_id: id.clone() })
                .await?
                .into_inner();
            let job = st.job.clone().unwrap_or_default();
            if done + job.rounds_completed >= next_sample {
                let s = sample(done + job.rounds_completed);
                print(&s);
                report.samples.push(s);
                next_sample += args.sample_every;
            }
            match job.state.as_str() {
                "finished" => break st,
                "cancelled" => bail!("{id} was cancelled"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        done += rounds;
        report.retried_rounds += status.rounds.iter().filter(|r| r.attempts > 1).count() as u64;
    }
    report.seconds = started.elapsed().as_secs_f64();
    let last = sample(done);
    print(&last);
    report.samples.push(last);
    stop.store(true, Ordering::Relaxed);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    // What is kept at the end. Pruning follows a round's commit (after the job's state
    // machine hears of it): give the last round's pass time to end.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.model_versions_kept = admin
        .list_models(ListModelsRequest::default())
        .await?
        .into_inner()
        .models
        .len();
    report.audit_entries_kept = admin
        .list_audit(ListAuditRequest { limit: u32::MAX })
        .await?
        .into_inner()
        .entries
        .len();
    for id in &job_ids[..job_ids.len().saturating_sub(1)] {
        let n = admin
            .get_job(JobRequest { job_id: id.clone() })
            .await?
            .into_inner()
            .rounds
            .len();
        report.finished_job_rounds_kept = report.finished_job_rounds_kept.max(n);
    }
    report.weights_objects = dir_size(&dir.path().join("models/objects")).1;
    report.rounds = done;
    report.jobs = job_no;
    report.leaves = tally.leaves.load(Ordering::Relaxed);
    report.admin_actions = tally.admin_actions.load(Ordering::Relaxed);
    report.admin_refusals = tally.admin_refusals.load(Ordering::Relaxed);
    report.errors = tally.errors.load(Ordering::Relaxed);
    let quarter = &report.samples[report.samples.len() / 4];
    let end = report.samples.last().expect("sampled");
    println!(
        "{} rounds in {} jobs, {:.0} s ({:.1} rounds/s); {} retried; {} leaves; {} admin \
         actions ({} refused in a race); {} errors",
        report.rounds,
        report.jobs,
        report.seconds,
        report.rounds as f64 / report.seconds,
        report.retried_rounds,
        report.leaves,
        report.admin_actions,
        report.admin_refusals,
        report.errors
    );
    println!(
        "from round {} to {}: RSS {:+.1} MB (anonymous {:+.1}, file {:+.1}), fds {:+}, state file {:+} B, registry {:+} B \
         ({:+} files), /metrics series {:+}",
        quarter.rounds,
        end.rounds,
        end.rss_mb - quarter.rss_mb,
        end.rss_anon_mb - quarter.rss_anon_mb,
        end.rss_file_mb - quarter.rss_file_mb,
        end.fds as i64 - quarter.fds as i64,
        end.state_bytes as i64 - quarter.state_bytes as i64,
        end.registry_bytes as i64 - quarter.registry_bytes as i64,
        end.registry_files as i64 - quarter.registry_files as i64,
        end.metrics_series as i64 - quarter.metrics_series as i64,
    );
    println!(
        "kept: {} model versions, {} audit entries, at most {} rounds of a finished job, {} \
         weights objects",
        report.model_versions_kept,
        report.audit_entries_kept,
        report.finished_job_rounds_kept,
        report.weights_objects
    );
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    drop(coordinator);
    Ok(report)
}
