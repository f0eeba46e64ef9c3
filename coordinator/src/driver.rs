//! The coordinator's driver: the shared state around the sans-IO [`Orchestrator`], and the
//! plumbing that moves it.
//!
//! - every change goes through [`with_orch`]: a short-held lock (never across an `.await`)
//!   and the events it produced handed on in order;
//! - an **event processor** task receives the state machine's events in order, logs, counts
//!   and rebroadcasts them to observers and the Admin event stream;
//! - a **commit loop** writes each completed round's model version and commits it to the
//!   durable state, retrying while storage fails, and only then tells the state machine,
//!   which starts nothing more until it hears (`committed` / `commit_failed`);
//! - a **timer** task calls `handle_timeout` when `poll_timeout` says so;
//! - a **change counter** (`watch`) wakes long-polling participants when tasks may have
//!   changed.
//!
//! The network edge (authentication, rate limits, nonces, the gRPC status of every error)
//! is [`crate::edge`]; the Federation RPCs are [`crate::federation`].

use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use cohort_protocol::server::RateLimiter;
use cohort_storage::state::StateError;
use cohort_storage::{ModelStore, Retention, State, StoreError};
use tokio::sync::{broadcast, mpsc, watch};

use crate::commit::JobContext;
use crate::commit::{CommitError, Durable, commit_round, commit_statistics};
use crate::metrics::Metrics as Meters;
use crate::round::{Event, Orchestrator, RoundSummary};

/// Uploads received at once (see `Shared::upload_slots`).
const UPLOAD_SLOTS: usize = 4;

/// A model version as it is downloaded.
pub(crate) struct EncodedModel {
    pub(crate) job: String,
    pub(crate) version: u64,
    /// Hex SHA-256 of the parameters, as named in tasks.
    pub(crate) digest: String,
    pub(crate) chunks: Vec<cohort_protocol::pb::ModelChunk>,
}

/// No job is active: the state machine is needed but none runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no job is active: waiting for an operator to start one")]
pub struct NoJob;

/// What the coordinator's own calls (start, attaching inference, serving) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("writing the serving pointer: {0}")]
    Registry(#[from] StoreError),
    #[error("an inference service is already attached")]
    InferenceAttached,
    #[error("TLS: {0}")]
    Tls(#[from] cohort_protocol::tls::TlsError),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A running coordinator: the state machine of the active job, its plumbing, the durable
/// state and the model store.
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) shared: Arc<Shared>,
}

/// Who may join, beyond what the certificates say.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Participant ids admitted without an operator's approval; `None` admits every id
    /// (unless `require_approval`).
    pub allowed: Option<std::collections::BTreeSet<String>>,
    /// Ids not in `allowed` wait, as "pending", until an operator approves them (instead of
    /// being refused).
    pub require_approval: bool,
}

pub(crate) struct Shared {
    /// The active job's state machine (`None` until a job is started). A std mutex: every
    /// critical section is short and synchronous.
    pub(crate) orch: Mutex<Option<Orchestrator>>,
    /// The active job's context, replaced with the state machine.
    pub(crate) context: Mutex<Option<Arc<JobContext>>>,
    /// Events drained from the state machine, in order, for the processor task.
    to_processor: mpsc::UnboundedSender<(Arc<JobContext>, Event)>,
    /// Bumped whenever tasks may have changed; long-polls and the timer wait on it.
    pub(crate) changed: watch::Sender<u64>,
    /// Processed events, for observers (progress displays, tests).
    observers: broadcast::Sender<Event>,
    /// Processed events as the Admin service streams them.
    pub(crate) admin_events: broadcast::Sender<(Arc<str>, Event)>,
    /// Set once the active job has finished (or was cancelled) and everything is written.
    pub(crate) finished: watch::Sender<bool>,
    /// The current global model encoded for download (chunks and digest), once per version.
    pub(crate) encoded: Mutex<Option<Arc<EncodedModel>>>,
    /// SCAFFOLD: the server's control variate of the current version, encoded the same way.
    pub(crate) encoded_control: Mutex<Option<Arc<EncodedModel>>>,
    /// The root of the model store; each job's versions are in a subdirectory.
    pub(crate) store: ModelStore,
    /// Durable state: participants, jobs, rounds, model versions, audit log.
    pub(crate) state: State,
    /// Serialises read-modify-write of job and participant records (admin actions, rounds, joins).
    pub(crate) records: Mutex<()>,
    /// What is kept of the state's growing parts (`[retention]`; everything by default).
    pub(crate) retention: Mutex<Retention>,
    pub(crate) admission: Admission,
    pub(crate) metrics: Meters,
    /// Uploads whose data is being received at once. Each holds one model-sized buffer
    /// until it is checked and folded into the sum, so this bounds the coordinator's memory
    /// at O(model), whatever the number of participants.
    pub(crate) upload_slots: tokio::sync::Semaphore,
    /// Set when serving with mutual TLS: every call must carry a certificate of the role its
    /// service is for.
    pub(crate) require_certificates: std::sync::atomic::AtomicBool,
    pub(crate) limiter: RateLimiter,
    pub(crate) nonces: crate::guard::NonceLog,
    /// The embedded inference service, when `[inference]` is configured.
    pub(crate) inference: std::sync::OnceLock<cohort_serving::Inference>,
}

impl Shared {
    /// What commits and pruning touch.
    pub(crate) fn durable(&self) -> Durable<'_> {
        Durable {
            state: &self.state,
            store: &self.store,
            records: &self.records,
            retention: *self.retention.lock().expect("retention lock"),
            metrics: &self.metrics,
        }
    }
}

impl Coordinator {
    /// A coordinator with no job yet, its state in `state` and model versions under `store`.
    /// Call [`Coordinator::recover`] to resume the job the state says was active. Must be
    /// called inside a tokio runtime.
    pub fn new(store: ModelStore, state: State, admission: Admission) -> Self {
        let (to_processor, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            orch: Mutex::new(None),
            context: Mutex::new(None),
            to_processor,
            changed: watch::channel(0).0,
            observers: broadcast::channel(4096).0,
            admin_events: broadcast::channel(4096).0,
            finished: watch::channel(false).0,
            encoded: Mutex::new(None),
            encoded_control: Mutex::new(None),
            store,
            state,
            records: Mutex::new(()),
            retention: Mutex::new(Retention::default()),
            admission,
            metrics: Meters::new(),
            upload_slots: tokio::sync::Semaphore::new(UPLOAD_SLOTS),
            require_certificates: std::sync::atomic::AtomicBool::new(false),
            limiter: RateLimiter::new(crate::guard::RATE_PER_SECOND, crate::guard::RATE_BURST),
            nonces: crate::guard::NonceLog::default(),
            inference: std::sync::OnceLock::new(),
        });
        tokio::spawn(process_events(rx, Arc::downgrade(&shared)));
        tokio::spawn(run_timer(Arc::downgrade(&shared)));
        Coordinator { shared }
    }

    /// The root model store.
    pub fn store(&self) -> &ModelStore {
        &self.shared.store
    }

    /// The model store of the active job (the root store when no job is active).
    pub fn job_store(&self) -> ModelStore {
        self.shared
            .context
            .lock()
            .expect("context lock")
            .as_ref()
            .map(|c| c.store.clone())
            .unwrap_or_else(|| self.shared.store.clone())
    }

    /// The Prometheus metrics.
    pub fn metrics(&self) -> Meters {
        self.shared.metrics.clone()
    }

    /// Serves the Inference service on this coordinator's listener, following promotions
    /// and rollbacks. Loads the version the state says is promoted, if any (blocking). A
    /// version that cannot be loaded is logged and counted, and the coordinator runs on:
    /// training does not depend on serving, and the next promotion tries again.
    pub fn attach_inference(
        &self,
        inference: cohort_serving::Inference,
    ) -> Result<(), CoordinatorError> {
        if let Some(to) = self.shared.state.serving()?
            && let Err(e) = inference.switch(&to)
        {
            tracing::error!(
                job = %to.job_id,
                version = to.version,
                error = %e,
                "the promoted version cannot be served; Predict answers UNAVAILABLE until the \
                 next promotion"
            );
        }
        self.shared
            .inference
            .set(inference)
            .map_err(|_| CoordinatorError::InferenceAttached)
    }

    /// Rewrites the registry's serving pointer from the state (the state is the record; a
    /// crash between the two writes of a promotion leaves the pointer behind).
    pub fn publish_serving(&self) -> Result<(), CoordinatorError> {
        match self.shared.state.serving()? {
            Some(to) => Ok(self.shared.store.write_serving(&to)?),
            None => Ok(()),
        }
    }

    /// The durable state.
    pub fn state(&self) -> &State {
        &self.shared.state
    }

    /// Events as they are processed (after the model version of a completed round is written).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.observers.subscribe()
    }

    /// Resolves once the job has finished and its last model version is on disk.
    pub async fn finished(&self) {
        let mut rx = self.shared.finished.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    /// Completed rounds of the active job.
    pub fn history(&self) -> Vec<RoundSummary> {
        self.lock()
            .map(|o| o.history().to_vec())
            .unwrap_or_default()
    }

    /// The active job's state machine; `Unavailable` when no job is active.
    pub(crate) fn lock(&self) -> Result<OrchGuard<'_>, NoJob> {
        let g = self
            .shared
            .orch
            .lock()
            .expect("state machine lock poisoned");
        if g.is_none() {
            return Err(NoJob);
        }
        Ok(OrchGuard(g))
    }

    /// Runs `f` on the active job's state machine, then hands its events to the processor
    /// and, if anything happened (or `bump`), wakes waiters.
    pub(crate) fn with<R>(
        &self,
        bump: bool,
        f: impl FnOnce(&mut Orchestrator) -> R,
    ) -> Result<R, NoJob> {
        with_orch(&self.shared, bump, f).ok_or(NoJob)
    }
}

/// The active job's state machine, locked (see [`Coordinator::lock`]).
pub(crate) struct OrchGuard<'a>(std::sync::MutexGuard<'a, Option<Orchestrator>>);

impl std::ops::Deref for OrchGuard<'_> {
    type Target = Orchestrator;
    fn deref(&self) -> &Orchestrator {
        self.0.as_ref().expect("checked when locked")
    }
}

/// Runs `f` on the active job's state machine (`None` when there is none) and hands the
/// events it produced to the processor, in order.
pub(crate) fn with_orch<R>(
    shared: &Shared,
    bump: bool,
    f: impl FnOnce(&mut Orchestrator) -> R,
) -> Option<R> {
    let mut g = shared.orch.lock().expect("state machine lock poisoned");
    let o = g.as_mut()?;
    let out = f(o);
    let mut any = false;
    if o.has_events() {
        let ctx = shared
            .context
            .lock()
            .expect("context lock")
            .clone()
            .expect("a job's context is set with its state machine");
        while let Some(ev) = o.poll_event() {
            any = true;
            // Sent under the lock, so the processor sees events in the machine's order.
            let _ = shared.to_processor.send((ctx.clone(), ev));
        }
    }
    drop(g);
    if any || bump {
        shared.changed.send_modify(|c| *c += 1);
    }
    Some(out)
}

/// Writes model versions and commits completed rounds to the durable state, logs, counts,
/// and rebroadcasts events, strictly in order.
async fn process_events(
    mut rx: mpsc::UnboundedReceiver<(Arc<JobContext>, Event)>,
    shared: Weak<Shared>,
) {
    while let Some((ctx, ev)) = rx.recv().await {
        let Some(s) = shared.upgrade() else { return };
        let job = ctx.config.job_id.as_str();
        s.metrics.observe(job, &ev);
        match &ev {
            Event::RoundCompleted {
                summary,
                params,
                strategy_state,
                pipeline,
            } => {
                // The state machine starts nothing more until this commit is reported, so
                // the next round's events cannot overtake it; other events go on being
                // processed (and streamed) while storage fails.
                tokio::spawn(commit_until_durable(
                    Arc::downgrade(&s),
                    ctx.clone(),
                    Pending::Round {
                        summary: summary.clone(),
                        params: params.clone(),
                        strategy_state: strategy_state.clone(),
                        pipeline: pipeline.clone(),
                    },
                ));
            }
            Event::CommitFailed { round, reason } => tracing::error!(
                job,
                round,
                "the completed round could not be committed: {reason}; the job holds it and \
                 retries until storage accepts it"
            ),
            Event::CommitRecovered { round } => {
                tracing::info!(job, round, "storage accepts commits again; the job goes on")
            }
            Event::RoundStarted {
                round,
                attempt,
                selected,
            } => tracing::info!(job, round, attempt, ?selected, "round started"),
            Event::StragglersDropped { round, ids } => {
                tracing::warn!(job, round, ?ids, "stragglers left out at the deadline")
            }
            Event::RoundFailed {
                round,
                attempt,
                cause,
            } => tracing::warn!(job, round, attempt, ?cause, "round failed; will retry"),
            Event::ParticipantJoined { id, rejoined } => {
                tracing::info!(%id, rejoined, "participant joined")
            }
            Event::ParticipantLost { id } => tracing::warn!(%id, "participant lost"),
            Event::ParticipantLeft { id } => tracing::info!(%id, "participant left"),
            Event::UpdateAccepted { round, id } => {
                tracing::info!(job, round, %id, "update accepted")
            }
            Event::DecryptionStarted {
                round,
                attempt,
                participants,
                committee,
            } => tracing::info!(
                job,
                round,
                attempt,
                participants,
                ?committee,
                "training closed; committee asked to decrypt the sum"
            ),
            Event::MemberFailed { round, id, reason } => {
                tracing::warn!(job, round, %id, "committee member failed: {reason}; pieces reassigned")
            }
            Event::JobFinished { rounds } => tracing::info!(job, rounds, "job finished"),
            Event::PrivacyBudgetSpent {
                round,
                epsilon,
                next,
                target,
            } => tracing::warn!(
                job,
                round,
                "privacy budget spent: round {round} would take ε from {epsilon:.3} to \
                 {next:.3}, past the target {target}; the job stops here"
            ),
            Event::StatisticsCompleted {
                participants,
                statistics,
                ..
            } => {
                tracing::info!(
                    job,
                    sites = participants.len(),
                    rows = statistics.stats.rows,
                    features = statistics.pipeline.width(),
                    "round 0: the federation's statistics are in; pipeline fitted"
                );
                tokio::spawn(commit_until_durable(
                    Arc::downgrade(&s),
                    ctx.clone(),
                    Pending::Statistics(statistics.clone()),
                ));
            }
            Event::JobFailed { reason } => tracing::error!(job, "job stopped: {reason}"),
            Event::Paused(p) => tracing::info!(job, paused = p, "job paused or resumed"),
            Event::JobCancelled { round } => {
                tracing::warn!(
                    job,
                    round,
                    "job cancelled; the round under way is abandoned"
                )
            }
        }
        let _ = s.admin_events.send((Arc::from(job), ev.clone()));
        let finished = matches!(
            ev,
            Event::JobFinished { .. } | Event::JobCancelled { .. } | Event::JobFailed { .. }
        );
        let _ = s.observers.send(ev);
        if finished {
            s.finished.send_replace(true);
        }
    }
}

/// First wait before committing a round again after a failure; it doubles up to
/// [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
const COMMIT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(15);

/// What waits to be committed: a completed round (its model version, summary and the
/// strategy's state), or round 0 of a job with tables (the federation's statistics).
enum Pending {
    Round {
        summary: RoundSummary,
        params: Arc<Vec<f32>>,
        strategy_state: Option<Vec<u8>>,
        pipeline: Option<Arc<cohort_model::tabular::Pipeline>>,
    },
    Statistics(crate::round::FederationStatistics),
}

impl Pending {
    fn round(&self) -> u64 {
        match self {
            Pending::Round { summary, .. } => summary.round,
            Pending::Statistics(_) => 0,
        }
    }

    /// Writes it durably; says what was written, for the log.
    fn write(&self, s: &Durable, ctx: &JobContext) -> Result<String, CommitError> {
        match self {
            Pending::Round {
                summary,
                params,
                strategy_state,
                pipeline,
            } => {
                let m = commit_round(
                    s,
                    ctx,
                    summary,
                    params,
                    strategy_state.as_deref(),
                    pipeline.as_deref(),
                )?;
                Ok(format!(
                    "round complete; model version committed (participants {}, eval accuracy \
                     {:?}, weights {}, sha256 {})",
                    summary.participants.len(),
                    summary.eval.map(|m| m.accuracy),
                    m.weights_file,
                    m.sha256
                ))
            }
            Pending::Statistics(st) => {
                commit_statistics(s, ctx, st)?;
                Ok(format!(
                    "round 0 committed: the federation's statistics ({} sites, {} rows)",
                    st.sites, st.stats.rows
                ))
            }
        }
    }
}

/// Writes what a completed round (or round 0) produced to the durable state, retrying while
/// that fails (disk full, permissions, the object store down), then tells the state
/// machine, which holds the round until then: a round is never built on a version (or a
/// pipeline) that was not stored. Each failure is logged, counted and reported to the
/// machine (the job's status says "paused: storage failure"). Stops if the job is cancelled
/// or replaced meanwhile; a restarted coordinator redoes the round from the last committed
/// version.
async fn commit_until_durable(shared: Weak<Shared>, ctx: Arc<JobContext>, pending: Pending) {
    let (job, round) = (ctx.config.job_id.clone(), pending.round());
    let pending = Arc::new(pending);
    let mut wait = COMMIT_RETRY_FIRST;
    loop {
        let Some(s) = shared.upgrade() else { return };
        let (s2, ctx2, p2) = (s.clone(), ctx.clone(), pending.clone());
        let written = tokio::task::spawn_blocking(move || p2.write(&s2.durable(), &ctx2))
            .await
            .unwrap_or_else(|e| Err(CommitError::Panicked(e.to_string())))
            .map_err(|e| e.to_string());
        let same_job = |o: &Orchestrator| o.config().job_id == job;
        match written {
            Ok(what) => {
                tracing::info!(job, round, "{what}");
                with_orch(&s, true, |o| {
                    if same_job(o) {
                        o.committed(round, Instant::now())
                    }
                });
                let _ = tokio::task::spawn_blocking(move || {
                    crate::commit::prune_job(&s.durable(), &job)
                })
                .await;
                return;
            }
            Err(e) => {
                s.metrics.commit_failure(&job);
                let waiting = with_orch(&s, true, |o| {
                    let waiting = same_job(o) && o.awaiting_commit() == Some(round);
                    if waiting {
                        o.commit_failed(round, e.clone());
                    }
                    waiting
                })
                .unwrap_or(false);
                if !waiting {
                    tracing::warn!(
                        job,
                        round,
                        "committing the round failed ({e}); the job is no longer active, so it is not retried"
                    );
                    return;
                }
                tracing::warn!(
                    job,
                    round,
                    retry_in_ms = wait.as_millis() as u64,
                    "committing the round failed: {e}"
                );
            }
        }
        drop(s);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(COMMIT_RETRY_MAX);
    }
}

/// Calls `handle_timeout` when the state machine asks to be woken.
async fn run_timer(shared: Weak<Shared>) {
    let mut changed = match shared.upgrade() {
        Some(s) => s.changed.subscribe(),
        None => return,
    };
    loop {
        let next = {
            let Some(s) = shared.upgrade() else { return };
            changed.borrow_and_update();
            let o = s.orch.lock().expect("lock");
            o.as_ref().and_then(|o| o.poll_timeout())
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                let Some(s) = shared.upgrade() else { return };
                with_orch(&s, false, |o| o.handle_timeout(Instant::now()));
            }
            r = changed.changed() => if r.is_err() { return },
        }
    }
}
