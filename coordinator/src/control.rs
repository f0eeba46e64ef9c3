//! Jobs and participants under an operator's control, and what survives a restart.
//!
//! A job is *created* from a specification, *started* (its initial model becomes version 0
//! and it takes the coordinator: one job is active at a time), *paused* and *resumed*
//! (while paused no new round starts; a round under way completes), and ends *finished* or
//! *cancelled*. Every change an operator makes is committed to the durable state together
//! with its audit entry before it is answered.
//!
//! Recovery: a completed round is committed (model version, round record, strategy state,
//! job progress) in one transaction after its model file is on disk. After a crash,
//! [`Coordinator::recover`] rebuilds the active job from the last committed round; the
//! round that was under way starts again as a new attempt with a fresh round seed, and
//! participants, whose sessions died with the old process, join again.

use std::sync::Arc;
use std::time::Instant;

use cohort_storage::ModelRef;

use crate::commit::{JobContext, new_record};
use crate::config::JobSection;
use crate::driver::{Coordinator, NoJob, with_orch};
use crate::round::{Orchestrator, RoundSummary};
use cohort_storage::state::{
    Approval, JobRecord, JobState, ParticipantRecord, State, StateError, unix_ms,
};

/// Why an operator's or a participant's request to the control plane was refused. Each
/// service edge maps these to its protocol's codes (gRPC: `admin::control_status`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such job, version or participant.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request itself is malformed (an empty id, a bad job specification).
    #[error("{0}")]
    InvalidArgument(String),
    /// Not possible in the current state (a job already active, nothing to roll back to).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is not allowed (a removed or pending participant).
    #[error("{0}")]
    PermissionDenied(String),
    /// No job is active to act on.
    #[error("{0}")]
    Unavailable(String),
    /// The durable state or the model store failed.
    #[error("{0}")]
    Internal(String),
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("model registry: {0}")]
    Registry(#[from] cohort_storage::StoreError),
    /// A job specification that cannot run.
    #[error(transparent)]
    Spec(#[from] crate::config::ConfigError),
    /// A job that cannot run or resume as recorded.
    #[error(transparent)]
    Job(#[from] crate::round::JobError),
    /// The durable state contradicts itself (the text says how); nothing is changed.
    #[error("the state is inconsistent: {0}")]
    Inconsistent(String),
}

impl From<NoJob> for ControlError {
    fn from(e: NoJob) -> ControlError {
        ControlError::Unavailable(e.to_string())
    }
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    tracing::error!("state: {e}");
    ControlError::Internal(e.to_string())
}

fn state_err(e: StateError) -> ControlError {
    internal(e)
}

impl Coordinator {
    /// Runs `orch`'s job at once, with state in memory and every participant admitted (the
    /// embedded simulation and tests). Must be called inside a tokio runtime.
    pub fn start(
        orch: Orchestrator,
        store: cohort_storage::ModelStore,
    ) -> Result<Self, ControlError> {
        let c = Coordinator::new(store, State::in_memory(), crate::Admission::default());
        c.run_job(orch, "embedded", None)?;
        Ok(c)
    }

    /// Makes `orch` the active job.
    fn install(&self, orch: Orchestrator) {
        let cfg = orch.config().clone();
        let store = self.shared.store.for_job(&cfg.job_id);
        let ctx = Arc::new(JobContext {
            strategy: orch.strategy_name(),
            config: cfg,
            store,
        });
        {
            // The same lock order as `with_orch`: state machine, then context.
            let mut g = self.shared.orch.lock().expect("state machine lock");
            *self.shared.context.lock().expect("context lock") = Some(ctx);
            *g = Some(orch);
        }
        self.shared.finished.send_replace(false);
        // Events of the new machine (a restored pause) go out; waiters wake.
        with_orch(&self.shared, true, |_| ());
    }

    /// Starts `orch`'s job now: writes its initial model as version 0, records it as
    /// running (with `spec`, if it came from one), and makes it the active job.
    pub(crate) fn run_job(
        &self,
        orch: Orchestrator,
        who: &str,
        spec: Option<&JobSection>,
    ) -> Result<JobRecord, ControlError> {
        let cfg = orch.config().clone();
        let mut job = match self.shared.state.job(&cfg.job_id)? {
            Some(j) => j,
            None => new_record(&cfg, orch.strategy_name(), spec, who),
        };
        let (version, params) = orch.global();
        let store = self.shared.store.for_job(&cfg.job_id);
        let m = store.write(
            &cfg.job_id,
            &cfg.model,
            orch.strategy_name(),
            version,
            &params,
            None,
            unix_ms(),
        )?;
        job.state = JobState::Running;
        job.updated_unix_ms = unix_ms();
        self.shared.state.audited(
            who,
            "start_job",
            &cfg.job_id,
            "",
            [State::job_write(&job)]
                .into_iter()
                .chain(State::model_writes(&m))
                .collect(),
        )?;
        self.shared.metrics.job_state(&job.id, job.state);
        self.install(orch);
        tracing::info!(job = %cfg.job_id, by = who, "job started");
        Ok(job)
    }

    /// Resumes the job the durable state says was active, from its last completed round.
    /// Returns its id, or `None` when no job was active.
    pub fn recover(&self) -> Result<Option<String>, ControlError> {
        let state = &self.shared.state;
        let jobs = state.jobs()?;
        let mut active: Vec<JobRecord> = jobs.into_iter().filter(|j| j.state.is_active()).collect();
        if active.len() > 1 {
            return Err(ControlError::Inconsistent(format!(
                "the state has {} active jobs ({}); at most one can be",
                active.len(),
                active
                    .iter()
                    .map(|j| j.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let Some(mut job) = active.pop() else {
            return Ok(None);
        };
        let id = job.id.clone();
        let section = JobSection::parse_spec(&job.spec_toml).map_err(|e| {
            ControlError::Inconsistent(format!("job {id}: stored specification: {e}"))
        })?;
        let cfg = section.job_config()?;
        let history: Vec<RoundSummary> =
            state.rounds(&id)?.into_iter().map(|r| r.summary).collect();
        let done = history.len() as u64;
        // The newest version is the last completed round's (older ones may have been pruned
        // by the retention setting).
        let newest = state.models(Some(&id))?.last().map(|m| m.version);
        if newest != Some(done) {
            return Err(ControlError::Inconsistent(format!(
                "job {id}: its newest model version is {newest:?}, but it completed {done} rounds"
            )));
        }
        let store = self.shared.store.for_job(&id);
        let global = store.read_params(done)?;
        job.restarts += 1;
        // A new attempt number, so nothing of the interrupted attempt is confused with it.
        let attempt = job.restarts + 1;
        let mut orch = Orchestrator::resume(
            cfg,
            section.strategy()?,
            None,
            history,
            global,
            attempt,
            rand::random(),
        )?;
        if let Some(st) = state.strategy_state(&id)? {
            orch.restore_strategy_state(&st)?;
        }
        // Jobs with tables: round 0's statistics, if it was committed (else it runs again).
        match state.statistics(&id)? {
            Some(r) => orch.restore_statistics(&r.stats, r.sites, Instant::now())?,
            None if orch.data_spec().is_some() && done > 0 => {
                return Err(ControlError::Inconsistent(format!(
                    "job {id} declares its tables and completed {done} rounds, but its \
                     round-0 statistics are not in the state"
                )));
            }
            None => {}
        }
        if job.state == JobState::Paused {
            orch.set_paused(true, Instant::now());
        }
        job.updated_unix_ms = unix_ms();
        {
            let _g = self.shared.records.lock().expect("records lock");
            state.put_job(&job)?;
        }
        self.shared.metrics.job_state(&id, job.state);
        tracing::warn!(
            job = %id,
            completed = done,
            restarts = job.restarts,
            "resuming the job after a restart from its last completed round"
        );
        self.install(orch);
        Ok(Some(id))
    }

    /// Runs the configuration file's job: starts it if new, resumes it if the state has it
    /// active, and refuses a different job under the same id.
    pub fn run_configured(&self, section: &JobSection) -> Result<(), ControlError> {
        let cfg = section.job_config()?;
        match self.shared.state.job(&cfg.job_id)? {
            None => {
                if let Some(active) = self.active_job_id() {
                    return Err(ControlError::FailedPrecondition(format!(
                        "job {active} is active; the configured job {} cannot start",
                        cfg.job_id
                    )));
                }
                let orch = Orchestrator::new(cfg, section.strategy()?, None, rand::random())?;
                let mut job =
                    new_record(orch.config(), orch.strategy_name(), Some(section), "config");
                job.state = JobState::Created;
                self.shared.state.audited(
                    "config",
                    "create_job",
                    &job.id,
                    "",
                    vec![State::job_write(&job)],
                )?;
                self.run_job(orch, "config", Some(section))?;
                Ok(())
            }
            Some(j) => {
                let stored = JobSection::parse_spec(&j.spec_toml)
                    .and_then(|s| s.job_config())
                    .ok();
                if stored.as_ref() != Some(&cfg) {
                    return Err(ControlError::AlreadyExists(format!(
                        "job {} in the state was created from another specification; give the \
                         configured job a new id",
                        cfg.job_id
                    )));
                }
                if self.active_job_id().as_deref() == Some(cfg.job_id.as_str())
                    || !j.state.is_active()
                {
                    // Resumed by `recover`, or already over (finished or cancelled).
                    if !j.state.is_active() {
                        self.shared.finished.send_replace(true);
                    }
                    Ok(())
                } else {
                    Err(ControlError::FailedPrecondition(format!(
                        "job {} is {} but not active",
                        j.id,
                        j.state.as_str()
                    )))
                }
            }
        }
    }

    /// The active job's id, if any.
    pub fn active_job_id(&self) -> Option<String> {
        self.shared
            .orch
            .lock()
            .expect("state machine lock")
            .as_ref()
            .filter(|o| !o.is_finished())
            .map(|o| o.config().job_id.clone())
    }

    /// Whether `id` may join now, recording it as seen; pending participants wait for an
    /// operator, removed ones are refused.
    pub(crate) fn admit(&self, id: &str, num_examples: u64) -> Result<(), ControlError> {
        let state = &self.shared.state;
        let adm = &self.shared.admission;
        let custodian = self
            .lock()?
            .config()
            .secure
            .as_ref()
            .is_some_and(|s| s.is_custodian(id));
        let listed = custodian || adm.allowed.as_ref().is_some_and(|a| a.contains(id));
        let _records = self.shared.records.lock().expect("records lock");
        let now = unix_ms();
        let mut rec = state
            .participant(id)
            .map_err(state_err)?
            .unwrap_or(ParticipantRecord {
                id: id.to_string(),
                approval: Approval::Pending,
                role: if custodian {
                    "custodian"
                } else {
                    "participant"
                }
                .into(),
                first_seen_unix_ms: now,
                last_seen_unix_ms: now,
                num_examples,
            });
        let known = rec.first_seen_unix_ms != now || rec.approval != Approval::Pending;
        rec.last_seen_unix_ms = now;
        rec.num_examples = num_examples;
        let verdict = match rec.approval {
            Approval::Removed => Err(ControlError::PermissionDenied(format!(
                "{id} was removed from the federation by an operator"
            ))),
            Approval::Approved => Ok(()),
            Approval::Pending if listed || (adm.allowed.is_none() && !adm.require_approval) => {
                rec.approval = Approval::Approved;
                Ok(())
            }
            Approval::Pending if adm.require_approval => {
                if !known {
                    tracing::warn!(participant = %id, "new participant waiting for approval: `cohort admin participants approve {id}`");
                }
                Err(ControlError::FailedPrecondition(format!(
                    "{id} is waiting for an operator's approval"
                )))
            }
            Approval::Pending => Err(ControlError::PermissionDenied(format!(
                "participant {id:?} is not allowed to join"
            ))),
        };
        // Refused newcomers that nobody asked for are not recorded (no state growth from
        // strangers); everyone else is, with the time they were last seen.
        if verdict.is_ok() || adm.require_approval || known {
            state.put_participant(&rec).map_err(state_err)?;
        }
        verdict.inspect_err(|s| {
            tracing::warn!(participant = %id, "join refused: {s}");
        })
    }

    // ----- admin actions (each audited) -----

    pub(crate) fn create_job(&self, who: &str, spec_toml: &str) -> Result<JobRecord, ControlError> {
        let section = JobSection::parse_spec(spec_toml)
            .map_err(|e| ControlError::InvalidArgument(format!("job specification: {e}")))?;
        let cfg = section
            .job_config()
            .map_err(|e| ControlError::InvalidArgument(format!("job specification: {e}")))?;
        let _g = self.shared.records.lock().expect("records lock");
        if self
            .shared
            .state
            .job(&cfg.job_id)
            .map_err(state_err)?
            .is_some()
        {
            return Err(ControlError::AlreadyExists(format!(
                "a job {:?} exists already",
                cfg.job_id
            )));
        }
        let job = new_record(&cfg, &section.strategy, Some(&section), who);
        self.shared
            .state
            .audited(who, "create_job", &job.id, "", vec![State::job_write(&job)])
            .map_err(state_err)?;
        self.shared.metrics.job_state(&job.id, job.state);
        Ok(job)
    }

    fn job_or_404(&self, id: &str) -> Result<JobRecord, ControlError> {
        self.shared
            .state
            .job(id)
            .map_err(state_err)?
            .ok_or_else(|| ControlError::NotFound(format!("no job {id:?}")))
    }

    pub(crate) fn start_job(&self, who: &str, id: &str) -> Result<JobRecord, ControlError> {
        let job = self.job_or_404(id)?;
        if job.state != JobState::Created {
            return Err(ControlError::FailedPrecondition(format!(
                "job {id} is {}; only a created job can start",
                job.state.as_str()
            )));
        }
        if let Some(active) = self.active_job_id() {
            // A job's last round is committed (its record says finished) a moment before its
            // state machine hears so: wait for that, rather than refuse a start that an
            // operator's `jobs status` said was possible. (Runs on a blocking thread.)
            let ended = self
                .shared
                .state
                .job(&active)
                .map_err(state_err)?
                .is_some_and(|j| !j.state.is_active());
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while ended && self.active_job_id().is_some() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Some(active) = self.active_job_id() {
                return Err(ControlError::FailedPrecondition(format!(
                    "job {active} is active; pause does not free the coordinator: cancel it or wait for it to finish"
                )));
            }
        }
        let section = JobSection::parse_spec(&job.spec_toml)?;
        let cfg = section.job_config()?;
        let orch = Orchestrator::new(cfg, section.strategy()?, None, rand::random())?;
        self.run_job(orch, who, Some(&section))
    }

    /// Pauses (`true`) or resumes the active job `id`.
    pub(crate) fn set_paused(
        &self,
        who: &str,
        id: &str,
        paused: bool,
    ) -> Result<JobRecord, ControlError> {
        let _g = self.shared.records.lock().expect("records lock");
        let mut job = self.job_or_404(id)?;
        let (from, to, action) = if paused {
            (JobState::Running, JobState::Paused, "pause_job")
        } else {
            (JobState::Paused, JobState::Running, "resume_job")
        };
        if job.state != from || self.active_job_id().as_deref() != Some(id) {
            return Err(ControlError::FailedPrecondition(format!(
                "job {id} is {}; only a {} job can be {}",
                job.state.as_str(),
                from.as_str(),
                if paused { "paused" } else { "resumed" }
            )));
        }
        job.state = to;
        job.updated_unix_ms = unix_ms();
        self.shared
            .state
            .audited(who, action, id, "", vec![State::job_write(&job)])
            .map_err(state_err)?;
        self.with(true, |o| o.set_paused(paused, Instant::now()))?;
        self.shared.metrics.job_state(id, job.state);
        Ok(job)
    }

    pub(crate) fn cancel_job(
        &self,
        who: &str,
        id: &str,
        reason: &str,
    ) -> Result<JobRecord, ControlError> {
        let _g = self.shared.records.lock().expect("records lock");
        let mut job = self.job_or_404(id)?;
        if !matches!(
            job.state,
            JobState::Created | JobState::Running | JobState::Paused
        ) {
            return Err(ControlError::FailedPrecondition(format!(
                "job {id} is {} already",
                job.state.as_str()
            )));
        }
        job.state = JobState::Cancelled;
        job.updated_unix_ms = unix_ms();
        self.shared
            .state
            .audited(who, "cancel_job", id, reason, vec![State::job_write(&job)])
            .map_err(state_err)?;
        if self.active_job_id().as_deref() == Some(id) {
            self.with(true, |o| o.cancel())?;
        }
        self.shared.metrics.job_state(id, job.state);
        drop(_g);
        crate::commit::prune(&self.shared.durable(), std::slice::from_ref(&job));
        Ok(job)
    }

    /// Approves (`Approved`) or removes (`Removed`) a participant.
    pub(crate) fn set_approval(
        &self,
        who: &str,
        id: &str,
        approval: Approval,
        reason: &str,
    ) -> Result<ParticipantRecord, ControlError> {
        if id.is_empty() {
            return Err(ControlError::InvalidArgument(
                "participant_id is empty".into(),
            ));
        }
        let state = &self.shared.state;
        let records = self.shared.records.lock().expect("records lock");
        let mut rec = state
            .participant(id)
            .map_err(state_err)?
            .unwrap_or(ParticipantRecord {
                id: id.to_string(),
                approval,
                role: "participant".into(),
                first_seen_unix_ms: 0,
                last_seen_unix_ms: 0,
                num_examples: 0,
            });
        rec.approval = approval;
        let action = match approval {
            Approval::Approved => "approve_participant",
            Approval::Removed => "remove_participant",
            Approval::Pending => "reset_participant",
        };
        state
            .audited(
                who,
                action,
                id,
                reason,
                vec![State::participant_write(&rec)],
            )
            .map_err(state_err)?;
        drop(records);
        if approval == Approval::Removed {
            // Ends its session; it is refused when it tries to join again.
            let _ = self.with(true, |o| o.handle_leave(id, Instant::now()));
        }
        Ok(rec)
    }

    pub(crate) fn promote(
        &self,
        who: &str,
        job: &str,
        version: u64,
    ) -> Result<ModelRef, ControlError> {
        if self
            .shared
            .state
            .model(job, version)
            .map_err(state_err)?
            .is_none()
        {
            return Err(ControlError::NotFound(format!(
                "no model version {version} of job {job:?}"
            )));
        }
        let to = ModelRef {
            job_id: job.to_string(),
            version,
        };
        self.shared.state.promote(who, &to).map_err(state_err)?;
        self.publish_promotion(&to);
        Ok(to)
    }

    pub(crate) fn rollback(&self, who: &str) -> Result<ModelRef, ControlError> {
        // The version rolled back from leaves the serving history: with retention, its job's
        // versions are pruned again (it may have been kept only as a promotion).
        let from = self.shared.state.serving().map_err(state_err)?;
        let to = self
            .shared
            .state
            .rollback(who)
            .map_err(state_err)?
            .ok_or_else(|| {
                ControlError::FailedPrecondition(
                    "nothing to roll back to: fewer than two promotions".into(),
                )
            })?;
        self.publish_promotion(&to);
        if let Some(job) = from
            .map(|f| self.shared.state.job(&f.job_id))
            .transpose()
            .map_err(state_err)?
            .flatten()
        {
            crate::commit::prune(&self.shared.durable(), &[job]);
        }
        Ok(to)
    }

    /// After a promotion or rollback is committed: the metric, the registry's serving
    /// pointer (which `cohort serve` instances follow) and the embedded inference service.
    /// Failures are logged, not returned: the state already holds the decision, and the
    /// pointer is rewritten from it at the next start.
    fn publish_promotion(&self, to: &ModelRef) {
        self.shared.metrics.serving(to);
        if let Err(e) = self.shared.store.write_serving(to) {
            tracing::error!(error = %e, "writing the serving pointer");
        }
        if let Some(i) = self.shared.inference.get()
            && let Err(e) = i.switch(to)
        {
            tracing::error!(error = %e, "the embedded inference service keeps its version");
        }
    }
}

impl Coordinator {
    /// Sets what is kept of the state's growing parts (`[retention]`) and applies it to
    /// every job now (see [`cohort_storage::retention`]). Returns what this first pass removed
    /// from the state; `None` when nothing is pruned. Call before [`Coordinator::recover`].
    pub fn set_retention(
        &self,
        retention: cohort_storage::Retention,
    ) -> Result<Option<cohort_storage::Pruned>, String> {
        retention.validate()?;
        *self.shared.retention.lock().expect("retention lock") = retention;
        self.shared.state.keep_audit(retention.audit_entries);
        let pruned =
            crate::commit::prune_at_start(&self.shared.durable()).map_err(|e| e.to_string())?;
        if retention.prunes() {
            // The file keeps the space pruning freed (reused by later writes) until this.
            match self.shared.state.compact() {
                Ok(Some((before, after))) => {
                    tracing::info!(before, after, "state database compacted (bytes)")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("compacting the state database failed: {e}"),
            }
        }
        Ok(pruned)
    }
}
