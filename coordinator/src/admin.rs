//! The `cohort.v1.Admin` gRPC service: operators list and approve participants, create and
//! control jobs, promote and roll back model versions, read the audit log and watch events.
//!
//! Thin like the Federation service: each call checks that the caller holds an *admin*
//! certificate (a participant's gets `PermissionDenied`), then calls the coordinator's
//! control methods (`control.rs`), which commit the change and its audit entry before the
//! call is answered.

use std::pin::Pin;
use std::time::Instant;

use cohort_crypto::pki::Role;
use cohort_protocol::pb::admin_server::{Admin, AdminServer};
use cohort_protocol::pb::{self};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::driver::Coordinator;
use crate::round::{Event, Presence, RoundSummary};
use cohort_storage::state::{Approval, JobRecord, ParticipantRecord, unix_ms};

/// The identity an action is recorded under on a plaintext development listener.
const DEV_IDENTITY: &str = "insecure-dev";

impl Coordinator {
    /// The Admin gRPC service.
    pub fn admin_service(&self) -> AdminServer<AdminApi> {
        AdminServer::new(AdminApi(self.clone()))
    }

    /// The caller's admin identity; `PermissionDenied` for any other role.
    fn admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        Ok(self
            .caller_as(req, Role::Admin)?
            .unwrap_or_else(|| DEV_IDENTITY.to_string()))
    }

    /// Runs a blocking control action (it writes to disk) off the async workers.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Coordinator) -> Result<R, Status> + Send + 'static,
    ) -> Result<R, Status> {
        let c = self.clone();
        tokio::task::spawn_blocking(move || f(&c))
            .await
            .map_err(|e| Status::internal(format!("admin action panicked: {e}")))?
    }

    fn participants_pb(&self) -> Result<Vec<pb::ParticipantRecord>, Status> {
        let stored = self
            .state()
            .participants()
            .map_err(|e| Status::internal(e.to_string()))?;
        let live: std::collections::BTreeMap<String, crate::round::ParticipantInfo> = self
            .lock()
            .map(|o| {
                o.participants()
                    .into_iter()
                    .map(|p| (p.id.clone(), p))
                    .collect()
            })
            .unwrap_or_default();
        let (now, now_ms) = (Instant::now(), unix_ms());
        let mut out: Vec<pb::ParticipantRecord> = stored
            .into_iter()
            .map(|r: ParticipantRecord| {
                let l = live.get(&r.id);
                let last_seen = l
                    .map(|l| {
                        now_ms.saturating_sub(now.duration_since(l.last_seen).as_millis() as u64)
                    })
                    .unwrap_or(0)
                    .max(r.last_seen_unix_ms);
                pb::ParticipantRecord {
                    presence: match l.map(|l| l.presence) {
                        Some(Presence::Online) => "online",
                        Some(Presence::Lost) => "lost",
                        Some(Presence::Left) => "left",
                        None => "offline",
                    }
                    .into(),
                    status: r.approval.as_str().into(),
                    first_seen_unix_ms: r.first_seen_unix_ms,
                    last_seen_unix_ms: last_seen,
                    num_examples: l.map(|l| l.num_examples).unwrap_or(r.num_examples),
                    role: r.role,
                    id: r.id,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

fn job_pb(j: JobRecord) -> pb::JobRecord {
    pb::JobRecord {
        state: j.state.as_str().into(),
        rounds: j.rounds,
        rounds_completed: j.rounds_completed,
        strategy: j.strategy,
        model: j.model,
        dataset: j.dataset,
        secure_aggregation: j.secure,
        created_unix_ms: j.created_unix_ms,
        updated_unix_ms: j.updated_unix_ms,
        created_by: j.created_by,
        restarts: j.restarts,
        spec_toml: j.spec_toml,
        id: j.id,
    }
}

fn round_pb(s: &RoundSummary, completed: u64) -> pb::RoundRecord {
    pb::RoundRecord {
        round: s.round,
        attempts: s.attempts,
        participants: s.participants.clone(),
        stragglers: s.stragglers.clone(),
        total_examples: s.total_examples,
        seconds: s.seconds,
        train_loss: s.train.map(|m| m.loss).unwrap_or(f64::NAN),
        eval_loss: s.eval.map(|m| m.loss).unwrap_or(f64::NAN),
        eval_accuracy: s.eval.map(|m| m.accuracy).unwrap_or(f64::NAN),
        has_eval: s.eval.is_some(),
        completed_unix_ms: completed,
        epsilon: s.privacy.map_or(f64::NAN, |p| p.epsilon),
        delta: s.privacy.map_or(0.0, |p| p.delta),
        sampling_rate: s.privacy.map_or(f64::NAN, |p| p.sampling_rate),
        noise_multiplier: s.privacy.map_or(f64::NAN, |p| p.noise_multiplier),
        clip_norm: s.clipping.map_or(f64::NAN, |c| c.clip_norm),
        unclipped_share: s.clipping.map_or(f64::NAN, |c| c.unclipped_share),
        next_clip_norm: s.clipping.map_or(f64::NAN, |c| c.next_clip_norm),
    }
}

fn model_pb(
    m: crate::ModelManifest,
    serving: &Option<cohort_storage::ModelRef>,
) -> pb::ModelRecord {
    pb::ModelRecord {
        serving: serving
            .as_ref()
            .is_some_and(|s| s.job_id == m.job_id && s.version == m.version),
        job_id: m.job_id,
        version: m.version,
        sha256: m.sha256,
        round: m.round,
        parent: m.parent.unwrap_or(0),
        participants: m.participants.len() as u32,
        strategy: m.strategy,
        eval_accuracy: m.eval.map(|e| e.accuracy).unwrap_or(f64::NAN),
        eval_loss: m.eval.map(|e| e.loss).unwrap_or(f64::NAN),
        has_eval: m.eval.is_some(),
        created_unix_ms: m.created_unix_ms,
        epsilon: m.privacy.map_or(f64::NAN, |p| p.epsilon),
        delta: m.privacy.map_or(0.0, |p| p.delta),
    }
}

/// The gRPC status for a control-plane refusal (the Admin service's edge, and the
/// Federation service's for admissions).
pub(crate) fn control_status(e: crate::control::ControlError) -> Status {
    use crate::control::ControlError as E;
    match e {
        E::NotFound(m) => Status::not_found(m),
        E::AlreadyExists(m) => Status::already_exists(m),
        E::InvalidArgument(m) => Status::invalid_argument(m),
        E::FailedPrecondition(m) => Status::failed_precondition(m),
        E::PermissionDenied(m) => Status::permission_denied(m),
        E::Unavailable(m) => Status::unavailable(m),
        E::Internal(m) => Status::internal(m),
        e @ (E::State(_) | E::Registry(_) | E::Inconsistent(_)) => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
        e @ (E::Spec(_) | E::Job(_)) => Status::invalid_argument(e.to_string()),
    }
}

impl From<crate::control::ControlError> for Status {
    fn from(e: crate::control::ControlError) -> Status {
        control_status(e)
    }
}

/// An event as the Admin service streams it.
fn event_pb(job: &str, ev: &Event) -> pb::AdminEvent {
    let (kind, round, participants, detail): (&str, u64, Vec<String>, String) = match ev {
        Event::ParticipantJoined { id, rejoined } => (
            "participant_joined",
            0,
            vec![id.clone()],
            if *rejoined { "rejoined" } else { "" }.into(),
        ),
        Event::ParticipantLost { id } => ("participant_lost", 0, vec![id.clone()], String::new()),
        Event::ParticipantLeft { id } => ("participant_left", 0, vec![id.clone()], String::new()),
        Event::RoundStarted {
            round,
            attempt,
            selected,
        } => (
            "round_started",
            *round,
            selected.clone(),
            format!("attempt {attempt}"),
        ),
        Event::UpdateAccepted { round, id } => {
            ("update_accepted", *round, vec![id.clone()], String::new())
        }
        Event::DecryptionStarted {
            round,
            participants,
            committee,
            ..
        } => (
            "decryption_started",
            *round,
            committee.clone(),
            format!("sum over {participants} participants"),
        ),
        Event::MemberFailed { round, id, reason } => {
            ("member_failed", *round, vec![id.clone()], reason.clone())
        }
        Event::StragglersDropped { round, ids } => {
            ("stragglers_dropped", *round, ids.clone(), String::new())
        }
        Event::RoundFailed {
            round,
            attempt,
            cause,
        } => (
            "round_failed",
            *round,
            vec![],
            format!("attempt {attempt}: {cause:?}"),
        ),
        Event::RoundCompleted { summary, .. } => (
            "round_completed",
            summary.round,
            summary.participants.clone(),
            match summary.eval {
                Some(m) => format!("eval accuracy {:.4}", m.accuracy),
                None => String::new(),
            },
        ),
        Event::JobFinished { rounds } => ("job_finished", *rounds, vec![], String::new()),
        Event::PrivacyBudgetSpent {
            round,
            epsilon,
            next,
            target,
        } => (
            "privacy_budget_spent",
            *round,
            vec![],
            format!("ε {epsilon:.4}; this round would take it to {next:.4}, past {target}"),
        ),
        Event::CommitFailed { round, reason } => ("commit_failed", *round, vec![], reason.clone()),
        Event::CommitRecovered { round } => ("commit_recovered", *round, vec![], String::new()),
        Event::Paused(true) => ("job_paused", 0, vec![], String::new()),
        Event::Paused(false) => ("job_resumed", 0, vec![], String::new()),
        Event::JobCancelled { round } => ("job_cancelled", *round, vec![], String::new()),
        Event::StatisticsCompleted {
            participants,
            statistics,
            ..
        } => (
            "statistics_completed",
            0,
            participants.clone(),
            format!(
                "{} rows over {} sites; pipeline of {} features",
                statistics.stats.rows,
                statistics.sites,
                statistics.pipeline.width()
            ),
        ),
        Event::JobFailed { reason } => ("job_failed", 0, vec![], reason.clone()),
    };
    pb::AdminEvent {
        unix_ms: unix_ms(),
        kind: kind.into(),
        job_id: job.into(),
        round,
        participants,
        detail,
    }
}

/// The Admin service over a [`Coordinator`].
#[derive(Clone)]
pub struct AdminApi(Coordinator);

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AdminEvent, Status>> + Send>>;

/// Job `id`'s record, or NOT_FOUND.
fn job_record(
    state: &cohort_storage::State,
    id: &str,
) -> Result<cohort_storage::state::JobRecord, Status> {
    state
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("no job {id:?}")))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::CoordinatorStatus>, Status> {
        let c = &self.0;
        c.admin(&req)?;
        let participants = c.participants_pb()?;
        let (active_job, phase, round) = c
            .lock()
            .ok()
            .filter(|o| !o.is_finished())
            .map(|o| {
                (
                    o.config().job_id.clone(),
                    o.phase_name().to_string(),
                    o.global().0,
                )
            })
            .unwrap_or_default();
        let serving = c.state().serving().map_err(internal)?;
        Ok(Response::new(pb::CoordinatorStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            active_job,
            phase,
            round,
            participants_online: participants
                .iter()
                .filter(|p| p.presence == "online")
                .count() as u32,
            participants_pending: participants
                .iter()
                .filter(|p| p.status == Approval::Pending.as_str())
                .count() as u32,
            approval_required: c.shared.admission.require_approval,
            jobs: c.state().jobs().map_err(internal)?.len() as u64,
            serving_job: serving
                .as_ref()
                .map(|s| s.job_id.clone())
                .unwrap_or_default(),
            serving_version: serving.map(|s| s.version).unwrap_or(0),
            certificates: c
                .metrics()
                .certificates()
                .into_iter()
                .map(|e| pb::CertificateExpiry {
                    identity: e.identity,
                    role: e.role,
                    not_after_unix: e.not_after,
                })
                .collect(),
        }))
    }

    async fn list_participants(
        &self,
        req: Request<pb::ListParticipantsRequest>,
    ) -> Result<Response<pb::ListParticipantsResponse>, Status> {
        self.0.admin(&req)?;
        Ok(Response::new(pb::ListParticipantsResponse {
            participants: self.0.participants_pb()?,
        }))
    }

    async fn approve_participant(
        &self,
        req: Request<pb::ParticipantRequest>,
    ) -> Result<Response<pb::ParticipantRecord>, Status> {
        self.set_approval(req, Approval::Approved).await
    }

    async fn remove_participant(
        &self,
        req: Request<pb::ParticipantRequest>,
    ) -> Result<Response<pb::ParticipantRecord>, Status> {
        self.set_approval(req, Approval::Removed).await
    }

    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::JobRecord>, Status> {
        let who = self.0.admin(&req)?;
        let spec = req.into_inner().spec_toml;
        let job = self
            .0
            .blocking(move |c| Ok(c.create_job(&who, &spec)?))
            .await?;
        Ok(Response::new(job_pb(job)))
    }

    async fn start_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobRecord>, Status> {
        self.job_action(req, |c, who, id| c.start_job(who, id))
            .await
    }

    async fn pause_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobRecord>, Status> {
        self.job_action(req, |c, who, id| c.set_paused(who, id, true))
            .await
    }

    async fn resume_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobRecord>, Status> {
        self.job_action(req, |c, who, id| c.set_paused(who, id, false))
            .await
    }

    async fn cancel_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobRecord>, Status> {
        self.job_action(req, |c, who, id| c.cancel_job(who, id, ""))
            .await
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.0.admin(&req)?;
        let jobs = self.0.state().jobs().map_err(internal)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(job_pb).collect(),
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.0.admin(&req)?;
        let id = req.into_inner().job_id;
        let state = self.0.state();
        let job = job_record(state, &id)?;
        let rounds = state
            .rounds(&id)
            .map_err(internal)?
            .iter()
            .map(|r| round_pb(&r.summary, r.completed_unix_ms))
            .collect();
        let phase = match self.0.lock() {
            Ok(o) if o.config().job_id == id => o.phase_name().to_string(),
            _ => job.state.as_str().to_string(),
        };
        Ok(Response::new(pb::JobStatus {
            job: Some(job_pb(job)),
            phase,
            rounds,
        }))
    }

    async fn get_statistics(
        &self,
        req: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobStatistics>, Status> {
        self.0.admin(&req)?;
        let id = req.into_inner().job_id;
        let state = self.0.state();
        let job = job_record(state, &id)?;
        let spec = crate::config::JobSection::parse_spec(&job.spec_toml)
            .map_err(|e| internal(format!("job {id}: stored specification: {e}")))?;
        let data = spec.data.ok_or_else(|| {
            Status::failed_precondition(format!(
                "job {id} declares no tables ([data]), so it has no federation statistics"
            ))
        })?;
        let r = state.statistics(&id).map_err(internal)?.ok_or_else(|| {
            Status::not_found(format!(
                "job {id} has not completed round 0 (its statistics)"
            ))
        })?;
        let columns = r
            .stats
            .summary(&data.schema)
            .into_iter()
            .map(|c| pb::ColumnSummary {
                column: c.column,
                kind: c.kind,
                count: c.count,
                missing_share: c.missing_share,
                mean: c.mean,
                std: c.std,
                shares: c
                    .shares
                    .into_iter()
                    .map(|(category, share)| pb::CategoryShare { category, share })
                    .collect(),
                quantiles: c
                    .quantiles
                    .into_iter()
                    .map(|(p, value)| pb::Quantile { p, value })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::JobStatistics {
            job_id: id,
            sites: r.sites as u64,
            rows: r.stats.rows,
            columns,
            completed_unix_ms: r.completed_unix_ms,
        }))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.0.admin(&req)?;
        let job = req.into_inner().job_id;
        let state = self.0.state();
        let serving = state.serving().map_err(internal)?;
        let models = state
            .models((!job.is_empty()).then_some(job.as_str()))
            .map_err(internal)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.into_iter().map(|m| model_pb(m, &serving)).collect(),
        }))
    }

    async fn promote_model(
        &self,
        req: Request<pb::ModelRequest>,
    ) -> Result<Response<pb::ModelRecord>, Status> {
        let who = self.0.admin(&req)?;
        let r = req.into_inner();
        let to = self
            .0
            .blocking(move |c| Ok(c.promote(&who, &r.job_id, r.version)?))
            .await?;
        self.model_record(&to)
    }

    async fn rollback_model(
        &self,
        req: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::ModelRecord>, Status> {
        let who = self.0.admin(&req)?;
        let to = self.0.blocking(move |c| Ok(c.rollback(&who)?)).await?;
        self.model_record(&to)
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.0.admin(&req)?;
        let limit = match req.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let entries = self.0.state().audit(limit).map_err(internal)?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::AuditEntry {
                    seq: e.seq,
                    unix_ms: e.unix_ms,
                    who: e.who,
                    action: e.action,
                    target: e.target,
                    detail: e.detail,
                })
                .collect(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.0.admin(&req)?;
        let rx = self.0.shared.admin_events.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok((job, ev)) => return Some((Ok(event_pb(&job, &ev)), rx)),
                    // A slow watcher misses events rather than holding the coordinator up.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("an event watcher fell behind; {n} events skipped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl AdminApi {
    /// A state change of one job, by an admin, answered with the job's new record.
    async fn job_action(
        &self,
        req: Request<pb::JobRequest>,
        f: impl FnOnce(&Coordinator, &str, &str) -> Result<JobRecord, crate::control::ControlError>
        + Send
        + 'static,
    ) -> Result<Response<pb::JobRecord>, Status> {
        let who = self.0.admin(&req)?;
        let id = req.into_inner().job_id;
        let job = self.0.blocking(move |c| Ok(f(c, &who, &id)?)).await?;
        Ok(Response::new(job_pb(job)))
    }

    async fn set_approval(
        &self,
        req: Request<pb::ParticipantRequest>,
        approval: Approval,
    ) -> Result<Response<pb::ParticipantRecord>, Status> {
        let who = self.0.admin(&req)?;
        let r = req.into_inner();
        let id = r.participant_id.clone();
        self.0
            .blocking(move |c| Ok(c.set_approval(&who, &r.participant_id, approval, &r.reason)?))
            .await?;
        let p = self
            .0
            .participants_pb()?
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| Status::internal("participant record vanished"))?;
        Ok(Response::new(p))
    }

    fn model_record(
        &self,
        to: &cohort_storage::ModelRef,
    ) -> Result<Response<pb::ModelRecord>, Status> {
        let state = self.0.state();
        let m = state
            .model(&to.job_id, to.version)
            .map_err(internal)?
            .ok_or_else(|| Status::internal("promoted version vanished"))?;
        Ok(Response::new(model_pb(m, &Some(to.clone()))))
    }
}
