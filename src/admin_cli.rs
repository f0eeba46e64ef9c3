//! `cohort admin …`: the operator's client of the coordinator's Admin gRPC service, printing
//! readable tables.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use cohort_protocol::pb::{self, admin_client::AdminClient};
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// admin.toml as `cohort provision --admins …` writes it (coordinator address and the
    /// admin certificate).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// The coordinator's address (overrides the configuration's).
    #[arg(long, global = true)]
    pub coordinator: Option<String>,
    /// Connect without TLS (a coordinator started with --insecure-dev). Development only.
    #[arg(long, global = true)]
    pub insecure_dev: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// The coordinator at a glance.
    Status,
    /// Participants: list (default), approve, remove.
    Participants {
        #[command(subcommand)]
        action: Option<ParticipantAction>,
    },
    /// Jobs: list (default), create, start, pause, resume, cancel, status.
    Jobs {
        #[command(subcommand)]
        action: Option<JobAction>,
    },
    /// Model versions: list (default), promote, rollback.
    Models {
        #[command(subcommand)]
        action: Option<ModelAction>,
    },
    /// The audit log of admin actions.
    Audit {
        /// Most recent entries to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stream events (rounds, participants) as they happen, until interrupted.
    Events,
}

#[derive(Subcommand, Debug)]
pub enum ParticipantAction {
    List,
    /// Let a participant that waits for approval join.
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a participant's session and refuse it from now on.
    Remove {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobAction {
    List,
    /// Create a job from a TOML specification (the keys of coordinator.toml's `[job]`).
    Create {
        spec: PathBuf,
    },
    Start {
        id: String,
    },
    /// No new round starts until resumed; a round under way completes.
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop for good; a round under way is abandoned.
    Cancel {
        id: String,
    },
    /// A job and its per-round history.
    Status {
        id: String,
    },
    /// A job with tables: the federation's summary table from round 0 (per column the
    /// count, missing share, mean and standard deviation, or each category's share; totals
    /// only).
    Stats {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelAction {
    List {
        /// Only this job's versions.
        #[arg(long)]
        job: Option<String>,
    },
    /// Serve this version for inference.
    Promote { job: String, version: u64 },
    /// Serve the previously promoted version again.
    Rollback,
}

/// admin.toml (`coordinator`) or an inference client's client.toml (`server`): where to
/// connect and with which certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientFile {
    pub coordinator: Option<String>,
    pub server: Option<String>,
    pub tls: Option<cohort_protocol::tls::TlsFiles>,
}

impl ClientFile {
    /// Reads `p`; [tls] paths are relative to its directory.
    pub(crate) fn load(p: &std::path::Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let mut c: ClientFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        if let Some(dir) = p.parent() {
            c.tls = c.tls.map(|t| t.relative_to(dir));
        }
        Ok(c)
    }
}

async fn connect(a: &AdminArgs) -> anyhow::Result<AdminClient<Channel>> {
    let cfg = a.config.as_deref().map(ClientFile::load).transpose()?;
    let url = a
        .coordinator
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.coordinator.clone()))
        .ok_or_else(|| anyhow::anyhow!("give --config admin.toml or --coordinator URL"))?;
    let channel = channel(
        &url,
        cfg.as_ref().and_then(|c| c.tls.as_ref()),
        a.insecure_dev,
        "use the admin.toml `cohort provision --admins` wrote",
    )
    .await?;
    Ok(AdminClient::new(channel))
}

/// A channel to `url` with the certificate in `tls` (a client of the federation), or without
/// TLS when `insecure_dev`; `hint` says where a missing [tls] section comes from.
pub(crate) async fn channel(
    url: &str,
    tls: Option<&cohort_protocol::tls::TlsFiles>,
    insecure_dev: bool,
    hint: &str,
) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("address {url:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    match tls {
        Some(tls) => {
            let node = tls.node().map_err(anyhow::Error::msg)?;
            endpoint = endpoint.tls_config(node.client_config())?;
        }
        None if insecure_dev => {}
        None => anyhow::bail!(
            "no [tls] section: {hint}, or pass --insecure-dev for a server without TLS"
        ),
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// A status as the operator reads it: the code and the server's message.
pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn num(x: f64, has: bool) -> String {
    if has && x.is_finite() {
        format!("{x:.4}")
    } else {
        "-".into()
    }
}

/// The quantile at `p`, if the summary has it.
fn quantile(q: &[pb::Quantile], p: f64) -> Option<f64> {
    q.iter().find(|x| x.p == p).map(|x| x.value)
}

/// Prints rows under a header, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    // Write errors (a closed pipe, as with `| head`) end the output quietly.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        writeln!(out, "{}", s.join("  ").trim_end())
    };
    let _ = (|| {
        line(header.iter().map(|h| h.to_string()).collect())?;
        line(w.iter().map(|n| "-".repeat(*n)).collect())?;
        if rows.is_empty() {
            line(vec!["(none)".into()])?;
        }
        for r in rows {
            line(r)?;
        }
        Ok::<(), std::io::Error>(())
    })();
}

fn print_participant(
    r: Result<tonic::Response<pb::ParticipantRecord>, tonic::Status>,
) -> anyhow::Result<()> {
    let p = r.map_err(status_err)?.into_inner();
    println!("{} is {}", p.id, p.status);
    Ok(())
}

fn jobs_table(jobs: Vec<pb::JobRecord>) {
    table(
        &[
            "JOB",
            "STATE",
            "ROUNDS",
            "STRATEGY",
            "MODEL",
            "SECURE",
            "RESTARTS",
            "CREATED BY",
            "UPDATED",
        ],
        jobs.into_iter()
            .map(|j| {
                vec![
                    j.id,
                    j.state,
                    format!("{}/{}", j.rounds_completed, j.rounds),
                    j.strategy,
                    j.model,
                    if j.secure_aggregation { "yes" } else { "no" }.into(),
                    j.restarts.to_string(),
                    j.created_by,
                    when(j.updated_unix_ms),
                ]
            })
            .collect(),
    );
}

fn model_row(m: &pb::ModelRecord) -> Vec<String> {
    vec![
        m.job_id.clone(),
        m.version.to_string(),
        if m.version == 0 {
            "-".into()
        } else {
            m.parent.to_string()
        },
        m.participants.to_string(),
        num(m.eval_accuracy, m.has_eval),
        num(m.eval_loss, m.has_eval),
        m.sha256.chars().take(16).collect(),
        if m.serving { "*" } else { "" }.into(),
        when(m.created_unix_ms),
    ]
}

const MODEL_HEADER: [&str; 9] = [
    "JOB",
    "VERSION",
    "PARENT",
    "PARTICIPANTS",
    "EVAL ACC",
    "EVAL LOSS",
    "SHA-256",
    "SERVING",
    "CREATED",
];

/// Within this many days of expiry a certificate is flagged in `cohort admin status`.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// The certificates' expiry lines of `cohort admin status`: the soonest first; those already
/// expired or within [`EXPIRY_WARNING_DAYS`] flagged, with what to do.
pub fn certificate_lines(certs: &[pb::CertificateExpiry], now: i64) -> Vec<String> {
    let mut out = Vec::new();
    for c in certs {
        let left = c.not_after_unix - now;
        let when = cohort_crypto::pki::utc(c.not_after_unix);
        let who = format!("{} ({})", c.identity, c.role);
        out.push(if left < 0 {
            format!("certificate  {who:<28} EXPIRED at {when}: issue a new one")
        } else if left < EXPIRY_WARNING_DAYS * 86_400 {
            format!(
                "certificate  {who:<28} expires {when}, in {} days: renew it",
                left / 86_400
            )
        } else {
            format!("certificate  {who:<28} expires {when}")
        });
    }
    out
}

fn print_certificates(certs: &[pb::CertificateExpiry], now: i64) {
    for l in certificate_lines(certs, now) {
        println!("{l}");
    }
}

pub async fn run(a: AdminArgs) -> anyhow::Result<()> {
    let mut c = connect(&a).await?;
    match a.command {
        AdminCommand::Status => {
            let s = c
                .get_status(pb::GetStatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let job = if s.active_job.is_empty() {
                "(none)".to_string()
            } else {
                format!("{} ({}, model version {})", s.active_job, s.phase, s.round)
            };
            println!("coordinator  {}", s.version);
            println!("active job   {job}");
            println!(
                "participants {} online, {} waiting for approval{}",
                s.participants_online,
                s.participants_pending,
                if s.approval_required {
                    " (approval required)"
                } else {
                    ""
                }
            );
            println!("jobs         {}", s.jobs);
            if s.serving_job.is_empty() {
                println!("serving      (nothing promoted)");
            } else {
                println!("serving      {} v{}", s.serving_job, s.serving_version);
            }
            print_certificates(&s.certificates, cohort_protocol::tls::unix_now());
        }
        AdminCommand::Participants { action } => match action.unwrap_or(ParticipantAction::List) {
            ParticipantAction::List => {
                let ps = c
                    .list_participants(pb::ListParticipantsRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .participants;
                table(
                    &[
                        "PARTICIPANT",
                        "ROLE",
                        "STATUS",
                        "PRESENCE",
                        "EXAMPLES",
                        "FIRST SEEN",
                        "LAST SEEN",
                    ],
                    ps.into_iter()
                        .map(|p| {
                            vec![
                                p.id,
                                p.role,
                                p.status,
                                p.presence,
                                p.num_examples.to_string(),
                                when(p.first_seen_unix_ms),
                                when(p.last_seen_unix_ms),
                            ]
                        })
                        .collect(),
                );
            }
            ParticipantAction::Approve { id, reason } => {
                let r = pb::ParticipantRequest {
                    participant_id: id,
                    reason,
                };
                print_participant(c.approve_participant(r).await)?;
            }
            ParticipantAction::Remove { id, reason } => {
                let r = pb::ParticipantRequest {
                    participant_id: id,
                    reason,
                };
                print_participant(c.remove_participant(r).await)?;
            }
        },
        AdminCommand::Jobs { action } => {
            let job = |id: String| pb::JobRequest { job_id: id };
            let done = |r: Result<tonic::Response<pb::JobRecord>, tonic::Status>| {
                r.map(|r| {
                    let j = r.into_inner();
                    println!("job {} is {}", j.id, j.state);
                })
                .map_err(status_err)
            };
            match action.unwrap_or(JobAction::List) {
                JobAction::List => jobs_table(
                    c.list_jobs(pb::ListJobsRequest {})
                        .await
                        .map_err(status_err)?
                        .into_inner()
                        .jobs,
                ),
                JobAction::Create { spec } => {
                    let spec_toml = std::fs::read_to_string(&spec)
                        .with_context(|| format!("reading {}", spec.display()))?;
                    let j = c
                        .create_job(pb::CreateJobRequest { spec_toml })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}: {}", spec.display(), status_err(s)))?
                        .into_inner();
                    println!(
                        "job {} created; start it with `cohort admin jobs start {}`",
                        j.id, j.id
                    );
                }
                JobAction::Start { id } => done(c.start_job(job(id)).await)?,
                JobAction::Pause { id } => done(c.pause_job(job(id)).await)?,
                JobAction::Resume { id } => done(c.resume_job(job(id)).await)?,
                JobAction::Cancel { id } => done(c.cancel_job(job(id)).await)?,
                JobAction::Stats { id } => {
                    let s = c
                        .get_statistics(job(id))
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    println!(
                        "job {}: statistics of {} training rows over {} sites (round 0, {})\n",
                        s.job_id,
                        s.rows,
                        s.sites,
                        when(s.completed_unix_ms)
                    );
                    let opt = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
                    table(
                        &[
                            "COLUMN", "TYPE", "COUNT", "MISSING", "MEAN", "STD", "P25", "MEDIAN",
                            "P75", "SHARES",
                        ],
                        s.columns
                            .into_iter()
                            .map(|c| {
                                vec![
                                    c.column,
                                    c.kind,
                                    format!("{}", c.count),
                                    format!("{:.1}%", 100.0 * c.missing_share),
                                    opt(c.mean),
                                    opt(c.std),
                                    opt(quantile(&c.quantiles, 0.25)),
                                    opt(quantile(&c.quantiles, 0.5)),
                                    opt(quantile(&c.quantiles, 0.75)),
                                    c.shares
                                        .iter()
                                        .map(|s| format!("{} {:.1}%", s.category, 100.0 * s.share))
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                ]
                            })
                            .collect(),
                    );
                }
                JobAction::Status { id } => {
                    let s = c.get_job(job(id)).await.map_err(status_err)?.into_inner();
                    let phase = s.phase.clone();
                    if let Some(j) = s.job {
                        jobs_table(vec![j]);
                    }
                    println!("\nphase: {phase}\n");
                    // Jobs with differential privacy: ε after each round, at the job's δ.
                    let private = s.rounds.iter().any(|r| r.delta > 0.0);
                    let mut header = vec![
                        "ROUND",
                        "ATTEMPTS",
                        "PARTICIPANTS",
                        "STRAGGLERS",
                        "EXAMPLES",
                        "TRAIN LOSS",
                        "EVAL ACC",
                        "SECONDS",
                        "COMPLETED",
                    ];
                    if private {
                        header.extend(["EPSILON", "DELTA"]);
                    }
                    // Adaptive clipping: the round's clip norm and the share within it.
                    let adaptive = s.rounds.iter().any(|r| r.clip_norm.is_finite());
                    if adaptive {
                        header.extend(["CLIP NORM", "UNCLIPPED"]);
                    }
                    table(
                        &header,
                        s.rounds
                            .into_iter()
                            .map(|r| {
                                let mut row = vec![
                                    r.round.to_string(),
                                    r.attempts.to_string(),
                                    r.participants.len().to_string(),
                                    r.stragglers.len().to_string(),
                                    r.total_examples.to_string(),
                                    num(r.train_loss, true),
                                    num(r.eval_accuracy, r.has_eval),
                                    format!("{:.2}", r.seconds),
                                    when(r.completed_unix_ms),
                                ];
                                if private {
                                    row.push(num(r.epsilon, r.delta > 0.0));
                                    row.push(format!("{:e}", r.delta));
                                }
                                if adaptive {
                                    row.push(num(r.clip_norm, true));
                                    row.push(num(r.unclipped_share, true));
                                }
                                row
                            })
                            .collect(),
                    );
                }
            }
        }
        AdminCommand::Models { action } => {
            match action.unwrap_or(ModelAction::List { job: None }) {
                ModelAction::List { job } => {
                    let ms = c
                        .list_models(pb::ListModelsRequest {
                            job_id: job.unwrap_or_default(),
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner()
                        .models;
                    table(&MODEL_HEADER, ms.iter().map(model_row).collect());
                }
                ModelAction::Promote { job, version } => {
                    let m = c
                        .promote_model(pb::ModelRequest {
                            job_id: job,
                            version,
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    println!("serving {} v{} (sha256 {})", m.job_id, m.version, m.sha256);
                }
                ModelAction::Rollback => {
                    let m = c
                        .rollback_model(pb::RollbackModelRequest {})
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    println!(
                        "rolled back: serving {} v{} (sha256 {})",
                        m.job_id, m.version, m.sha256
                    );
                }
            }
        }
        AdminCommand::Audit { limit } => {
            let es = c
                .list_audit(pb::ListAuditRequest { limit })
                .await
                .map_err(status_err)?
                .into_inner()
                .entries;
            table(
                &["SEQ", "WHEN", "WHO", "ACTION", "TARGET", "DETAIL"],
                es.into_iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            when(e.unix_ms),
                            e.who,
                            e.action,
                            e.target,
                            e.detail,
                        ]
                    })
                    .collect(),
            );
        }
        AdminCommand::Events => {
            let mut s = c
                .watch_events(pb::WatchEventsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(e) = s.message().await.map_err(status_err)? {
                println!(
                    "{}  {:<20} {:<16} round {:<4} {} {}",
                    when(e.unix_ms),
                    e.kind,
                    e.job_id,
                    e.round,
                    e.participants.join(","),
                    e.detail
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_near_or_past_expiry_are_flagged_with_what_to_do() {
        let now = 1_796_198_400; // 2026-12-02 08:00:00 UTC
        let cert = |identity: &str, role: &str, days: i64| pb::CertificateExpiry {
            identity: identity.into(),
            role: role.into(),
            not_after_unix: now + days * 86_400,
        };
        let lines = certificate_lines(
            &[
                cert("hospital-b", "participant", -1),
                cert("hospital-a", "participant", 12),
                cert("coordinator", "coordinator", 300),
            ],
            now,
        );
        assert_eq!(
            lines,
            [
                "certificate  hospital-b (participant)     EXPIRED at 2026-12-01 08:00:00 UTC: \
                 issue a new one",
                "certificate  hospital-a (participant)     expires 2026-12-14 08:00:00 UTC, in \
                 12 days: renew it",
                "certificate  coordinator (coordinator)    expires 2027-09-28 08:00:00 UTC",
            ]
        );
    }
}
