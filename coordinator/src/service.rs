//! The tonic driver of the round state machine: the `cohort.v1.Federation` service.
//!
//! The service is thin. Each call converts its messages to domain types, feeds the
//! [`Orchestrator`] under a short-held lock (never across an `.await`), and returns. Three
//! pieces of plumbing surround it:
//!
//! - an **event processor** task receives the state machine's events in order, writes each
//!   new model version to the [`ModelStore`], logs, and rebroadcasts to observers;
//! - a **timer** task calls `handle_timeout` when `poll_timeout` says so;
//! - a **change counter** (`watch`) wakes long-polling participants when tasks may have
//!   changed.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cohort_model::Metrics;
use cohort_protocol::pb::federation_server::{Federation, FederationServer};
use cohort_protocol::pb::{self, task::Kind, update_chunk::Part};
use cohort_protocol::{MAX_MESSAGE_BYTES, ParamAssembler, ProtocolError};
use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics as Meters;
use crate::model_store::ModelStore;
use crate::round::{
    Event, Orchestrator, PartyKeys, Rejection, RoundSummary, SecureUpdate, ShareAnswer,
    SignedShare, Task, Update,
};
use crate::state::State;
use cohort_crypto::{MemberPublic, VerifyKey};
use cohort_protocol::WordAssembler;
use cohort_protocol::secure::{bytes32, bytes64, record_pb, round_pb, sealed_from_pb, sealed_pb};

/// Longest a PollTask call is held open.
const MAX_POLL_WAIT: Duration = Duration::from_secs(30);

/// A model version as it is downloaded.
struct EncodedModel {
    job: String,
    version: u64,
    /// Hex SHA-256 of the parameters, as named in tasks.
    digest: String,
    chunks: Vec<pb::ModelChunk>,
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

/// The job an event came from (events are processed after the job may have been replaced).
#[derive(Debug)]
pub(crate) struct JobContext {
    pub(crate) config: crate::JobConfig,
    pub(crate) strategy: &'static str,
    pub(crate) store: ModelStore,
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
    changed: watch::Sender<u64>,
    /// Processed events, for observers (progress displays, tests).
    observers: broadcast::Sender<Event>,
    /// Processed events as the Admin service streams them.
    pub(crate) admin_events: broadcast::Sender<pb::AdminEvent>,
    /// Set once the active job has finished (or was cancelled) and everything is written.
    pub(crate) finished: watch::Sender<bool>,
    /// The current global model encoded for download (chunks and digest), once per version.
    encoded: Mutex<Option<Arc<EncodedModel>>>,
    /// The root of the model store; each job's versions are in a subdirectory.
    pub(crate) store: ModelStore,
    /// Durable state: participants, jobs, rounds, model versions, audit log.
    pub(crate) state: State,
    /// Serialises read-modify-write of job records (admin actions, completed rounds).
    pub(crate) job_records: Mutex<()>,
    pub(crate) admission: Admission,
    pub(crate) metrics: Meters,
    /// Uploads whose data is being received at once. Each holds one model-sized buffer
    /// until it is checked and folded into the sum, so this bounds the coordinator's memory
    /// at O(model), whatever the number of participants.
    upload_slots: tokio::sync::Semaphore,
    /// Set when serving with mutual TLS: every call must carry a certificate of the role its
    /// service is for.
    pub(crate) require_certificates: std::sync::atomic::AtomicBool,
    limiter: RateLimiter,
    nonces: NonceLog,
    /// The embedded inference service, when `[inference]` is configured.
    pub(crate) inference: std::sync::OnceLock<crate::inference::Inference>,
}

/// gRPC server reflection, v1 and v1alpha, over every `cohort.v1` service and
/// `grpc.health.v1`, so grpcurl, grpcui and generated clients work without the .proto files.
pub(crate) fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let with_sets = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(cohort_protocol::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = with_sets(tonic_reflection::server::Builder::configure())
        .build_v1()
        .expect("the descriptor set built with the protocol is valid");
    let v1alpha = with_sets(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .expect("the descriptor set built with the protocol is valid");
    (v1, v1alpha)
}

/// The identity in the caller's client certificate, if its role is one of `allowed`;
/// otherwise `PermissionDenied` naming the role and what `service` is for. Every refusal is
/// logged with the identity.
pub(crate) fn certificate_identity<T>(
    req: &Request<T>,
    allowed: &[cohort_crypto::pki::Role],
    service: &str,
) -> Result<String, Status> {
    let leaf = req
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| {
            tracing::warn!("refused a call without a client certificate");
            Status::unauthenticated("a client certificate is required")
        })?;
    let (id, role) = cohort_crypto::pki::identity_of(&leaf)
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    if !allowed.contains(&role) {
        tracing::warn!(identity = %id, %role, "refused: {service}");
        return Err(Status::permission_denied(format!(
            "{id:?} holds a {role} certificate; {service}"
        )));
    }
    Ok(id)
}

/// Recent message nonces per participant: a state-changing message (an update, a share, an
/// evaluation) whose nonce was seen before is a replay and is refused. The newest
/// `NONCES_KEPT` per participant are kept; anything older is refused anyway by the round,
/// attempt and seed the message is bound to.
#[derive(Default)]
struct NonceLog {
    seen: Mutex<std::collections::HashMap<String, NonceWindow>>,
}

#[derive(Default)]
struct NonceWindow {
    set: std::collections::HashSet<[u8; cohort_protocol::NONCE_BYTES]>,
    order: std::collections::VecDeque<[u8; cohort_protocol::NONCE_BYTES]>,
}

const NONCES_KEPT: usize = 256;

impl NonceLog {
    fn check(&self, id: &str, nonce: &[u8]) -> Result<(), Status> {
        let n = cohort_protocol::nonce_of(nonce).map_err(|e| protocol_status(&e))?;
        let mut seen = self.seen.lock().expect("nonce lock");
        let w = seen.entry(id.to_string()).or_default();
        if !w.set.insert(n) {
            return Err(Status::already_exists(
                "replayed message: its nonce was used before",
            ));
        }
        w.order.push_back(n);
        if w.order.len() > NONCES_KEPT
            && let Some(old) = w.order.pop_front()
        {
            w.set.remove(&old);
        }
        Ok(())
    }
}

/// Token buckets per caller: `rate.0` requests per second sustained, bursts of `rate.1`.
pub(crate) struct RateLimiter {
    rate: Mutex<(f64, f64)>,
    buckets: Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub(crate) fn new(per_second: f64, burst: f64) -> Self {
        RateLimiter {
            rate: Mutex::new((per_second, burst)),
            buckets: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn allow(&self, key: &str, now: Instant) -> bool {
        self.allow_n(key, now, 1.0)
    }

    /// Whether `key` may spend `cost` tokens now (and spends them if so).
    pub(crate) fn allow_n(&self, key: &str, now: Instant, cost: f64) -> bool {
        let (rate, burst) = *self.rate.lock().expect("limiter lock");
        let mut b = self.buckets.lock().expect("limiter lock");
        if b.len() > 100_000 {
            // Forget idle callers rather than grow without bound.
            b.retain(|_, (tokens, at)| *tokens < burst || now.duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = b.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= cost {
            *tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Default per-caller limit: generous for a participant (long-polls, heartbeats, chunked
/// uploads), tight enough to stop a flood.
const RATE_PER_SECOND: f64 = 50.0;
const RATE_BURST: f64 = 500.0;

/// Uploads received at once (see `Shared::upload_slots`).
const UPLOAD_SLOTS: usize = 4;

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
            store,
            state,
            job_records: Mutex::new(()),
            admission,
            metrics: Meters::new(),
            upload_slots: tokio::sync::Semaphore::new(UPLOAD_SLOTS),
            require_certificates: std::sync::atomic::AtomicBool::new(false),
            limiter: RateLimiter::new(RATE_PER_SECOND, RATE_BURST),
            nonces: NonceLog::default(),
            inference: std::sync::OnceLock::new(),
        });
        tokio::spawn(process_events(rx, Arc::downgrade(&shared)));
        tokio::spawn(run_timer(Arc::downgrade(&shared)));
        Coordinator { shared }
    }

    /// Runs `orch`'s job at once, with state in memory and every participant admitted (the
    /// embedded simulation and tests). Must be called inside a tokio runtime.
    pub fn start(orch: Orchestrator, store: ModelStore) -> Result<Self, String> {
        let c = Coordinator::new(store, State::in_memory(), Admission::default());
        c.run_job(orch, "embedded", None)?;
        Ok(c)
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
    pub fn attach_inference(&self, inference: crate::inference::Inference) -> Result<(), String> {
        if let Some(to) = self.shared.state.serving().map_err(|e| e.to_string())?
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
            .map_err(|_| "an inference service is already attached".to_string())
    }

    /// Rewrites the registry's serving pointer from the state (the state is the record; a
    /// crash between the two writes of a promotion leaves the pointer behind).
    pub fn publish_serving(&self) -> Result<(), String> {
        match self.shared.state.serving().map_err(|e| e.to_string())? {
            Some(to) => self
                .shared
                .store
                .write_serving(&to)
                .map_err(|e| format!("writing the serving pointer: {e}")),
            None => Ok(()),
        }
    }

    /// The durable state.
    pub fn state(&self) -> &State {
        &self.shared.state
    }

    /// The gRPC service, with message size limits set.
    pub fn service(&self) -> FederationServer<Coordinator> {
        FederationServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        self.router()
            .serve_with_incoming_shutdown(crate::listener::nodelay(listener), shutdown)
            .await
    }

    /// Every service a coordinator serves: Federation, Admin, grpc.health.v1 and server
    /// reflection (v1 and v1alpha), so standard gRPC tools work.
    fn router(&self) -> tonic::transport::server::Router {
        let (health, health_service) = tonic_health::server::health_reporter();
        let (v1, v1alpha) = reflection();
        let inference = self.shared.inference.get().is_some();
        tokio::spawn(async move {
            use cohort_protocol::pb::{
                admin_server::AdminServer, federation_server::FederationServer,
            };
            health.set_serving::<FederationServer<Coordinator>>().await;
            health
                .set_serving::<AdminServer<crate::admin::AdminApi>>()
                .await;
            if inference {
                health
                    .set_serving::<cohort_protocol::pb::inference_server::InferenceServer<
                        crate::inference::InferenceApi,
                    >>()
                    .await;
            }
        });
        tonic::transport::Server::builder()
            .add_service(self.service())
            .add_service(self.admin_service())
            .add_optional_service(self.shared.inference.get().map(|i| i.service()))
            .add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha)
    }

    /// Serves with mutual TLS on `listener` until `shutdown` completes: TLS 1.3 only, a
    /// client certificate from the federation CA required, revoked ones refused. Every call
    /// must then come from a participant certificate whose identity matches the session.
    /// The CRL is re-read every `crl_poll` while serving: a revocation takes effect without
    /// a restart, and closes the revoked certificate's open connections.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: cohort_protocol::tls::TlsFiles,
        crl_poll: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), String> {
        let (incoming, tasks) = crate::listener::incoming(listener, tls, crl_poll)?;
        self.shared
            .require_certificates
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(i) = self.shared.inference.get() {
            i.require_certificates();
        }
        let served = self
            .router()
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        for t in tasks {
            t.abort();
        }
        served.map_err(|e| e.to_string())
    }

    /// The identity in the caller's certificate, when the service runs with TLS; `None`
    /// on a plaintext development listener. Only participant certificates may call.
    /// Every call is also counted against its caller's rate limit: the certificate
    /// identity, or the remote address on a plaintext listener.
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        self.caller_as(req, cohort_crypto::pki::Role::Participant)
    }

    /// [`Self::caller`] for a service meant for `role`.
    pub(crate) fn caller_as<T>(
        &self,
        req: &Request<T>,
        role: cohort_crypto::pki::Role,
    ) -> Result<Option<String>, Status> {
        let id = self.certificate_identity(req, role)?;
        let key = id.clone().unwrap_or_else(|| {
            req.remote_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into())
        });
        if !self.shared.limiter.allow(&key, Instant::now()) {
            tracing::warn!(caller = %key, "refused: over the rate limit");
            return Err(Status::resource_exhausted(format!(
                "{key}: too many requests; slow down"
            )));
        }
        Ok(id)
    }

    /// Sets the per-caller rate limit: `per_second` sustained, bursts of `burst`.
    pub fn set_rate_limit(&self, per_second: f64, burst: f64) {
        *self.shared.limiter.rate.lock().expect("limiter lock") = (per_second, burst);
    }

    fn certificate_identity<T>(
        &self,
        req: &Request<T>,
        wanted: cohort_crypto::pki::Role,
    ) -> Result<Option<String>, Status> {
        if !self
            .shared
            .require_certificates
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(None);
        }
        let service = match wanted {
            cohort_crypto::pki::Role::Admin => "the Admin service is for admins",
            _ => "the Federation service is for participants",
        };
        certificate_identity(req, &[wanted], service).map(Some)
    }

    /// One of the `UPLOAD_SLOTS` model-sized receive buffers, held while an upload or share
    /// arrives.
    async fn upload_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.shared
            .upload_slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))
    }

    /// Refuses a message for another job than this coordinator's.
    fn check_job(&self, id: &str, job_id: &str) -> Result<(), Status> {
        let job = self.lock()?.config().job_id.clone();
        if job_id == job {
            Ok(())
        } else {
            Err(refuse(
                id,
                Status::not_found(format!("no job {job_id:?} (this coordinator runs {job:?})")),
            ))
        }
    }

    /// Refuses a message whose nonce is missing or was seen before from `id`.
    fn check_nonce(&self, id: &str, nonce: &[u8]) -> Result<(), Status> {
        self.shared
            .nonces
            .check(id, nonce)
            .map_err(|s| refuse(id, s))
    }

    /// The participant of `session`, checked against the caller's certificate identity.
    fn session_of(&self, cert: Option<String>, session: &str) -> Result<String, Status> {
        let id = self.participant(session)?;
        match cert {
            Some(c) if c != id => Err(refuse(
                &c,
                Status::permission_denied(format!(
                    "the session belongs to {id:?}, not to the certificate's {c:?}"
                )),
            )),
            _ => Ok(id),
        }
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
    pub(crate) fn lock(&self) -> Result<OrchGuard<'_>, Status> {
        let g = self
            .shared
            .orch
            .lock()
            .expect("state machine lock poisoned");
        if g.is_none() {
            return Err(Status::unavailable(
                "no job is active: waiting for an operator to start one",
            ));
        }
        Ok(OrchGuard(g))
    }

    /// Runs `f` on the active job's state machine, then hands its events to the processor
    /// and, if anything happened (or `bump`), wakes waiters.
    pub(crate) fn with<R>(
        &self,
        bump: bool,
        f: impl FnOnce(&mut Orchestrator) -> R,
    ) -> Result<R, Status> {
        with_orch(&self.shared, bump, f).ok_or_else(|| {
            Status::unavailable("no job is active: waiting for an operator to start one")
        })
    }

    fn participant(&self, session: &str) -> Result<String, Status> {
        self.lock()?
            .participant_for_session(session)
            .cloned()
            .ok_or_else(|| {
                tracing::warn!("refused a call with an unknown or expired session");
                Status::unauthenticated("unknown or expired session: join again")
            })
    }

    /// The download form of model `version`, encoded on first use and then shared by every
    /// task and fetch of that version.
    fn encoded(&self, job: &str, version: u64, params: &[f32]) -> Arc<EncodedModel> {
        let mut cache = self.shared.encoded.lock().expect("encoded-model lock");
        match &*cache {
            Some(e) if e.version == version && e.job == job => e.clone(),
            _ => {
                let chunks = cohort_protocol::model_chunks(params);
                let digest = chunks.last().map(|c| c.digest.clone()).unwrap_or_default();
                let e = Arc::new(EncodedModel {
                    job: job.to_string(),
                    version,
                    digest,
                    chunks,
                });
                *cache = Some(e.clone());
                e
            }
        }
    }

    fn task_message(&self, id: &str) -> Result<pb::Task, Status> {
        let (task, version, params, cfg) = {
            let o = self.lock()?;
            let (v, p) = o.global();
            (o.task_for(id), v, p, o.config().clone())
        };
        let now = Instant::now();
        let ms = |d: Instant| d.saturating_duration_since(now).as_millis() as u64;
        let kind = match task {
            Task::Train {
                round,
                model_version,
                config,
                deadline,
                secure,
            } => Kind::Train(pb::TrainTask {
                secure: secure.as_deref().map(round_pb),
                job_id: cfg.job_id.clone(),
                round,
                model: Some((&cfg.model).into()),
                config: Some((&config).into()),
                num_parameters: params.len() as u64,
                model_digest: self.encoded(&cfg.job_id, version, &params).digest.clone(),
                deadline_in_ms: ms(deadline),
                model_version,
            }),
            Task::Evaluate {
                round,
                model_version,
                deadline,
            } => Kind::Evaluate(pb::EvaluateTask {
                job_id: cfg.job_id.clone(),
                round,
                model: Some((&cfg.model).into()),
                num_parameters: params.len() as u64,
                model_digest: self.encoded(&cfg.job_id, version, &params).digest.clone(),
                deadline_in_ms: ms(deadline),
                model_version,
            }),
            Task::Decrypt(d) => Kind::Decrypt(pb::DecryptTask {
                job_id: cfg.job_id.clone(),
                round: d.info.round,
                secure: Some(round_pb(&d.info)),
                manifest_digest: d.manifest_digest.to_vec(),
                manifest_participants: d.manifest_participants as u32,
                manifest_signature: d.manifest_signature.to_vec(),
                coordinator_key: d.coordinator_key.0.to_vec(),
                pieces: d.pieces.iter().map(|&k| k as u32).collect(),
                num_parameters: params.len() as u64,
                deadline_in_ms: ms(d.deadline),
                request: d.request,
            }),
            Task::Idle => Kind::Idle(pb::IdleTask { retry_after_ms: 0 }),
            Task::Finished => Kind::Finished(pb::FinishedTask {
                reason: if self.lock()?.is_cancelled() {
                    format!("job {} was cancelled by an operator", cfg.job_id)
                } else {
                    format!("job {} finished", cfg.job_id)
                },
            }),
        };
        Ok(pb::Task { kind: Some(kind) })
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
            } => {
                // The state machine starts nothing more until this commit is reported, so
                // the next round's events cannot overtake it; other events go on being
                // processed (and streamed) while storage fails.
                tokio::spawn(commit_until_durable(
                    Arc::downgrade(&s),
                    ctx.clone(),
                    summary.clone(),
                    params.clone(),
                    strategy_state.clone(),
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
            Event::Paused(p) => tracing::info!(job, paused = p, "job paused or resumed"),
            Event::JobCancelled { round } => {
                tracing::warn!(
                    job,
                    round,
                    "job cancelled; the round under way is abandoned"
                )
            }
        }
        let _ = s.admin_events.send(crate::admin::event_pb(job, &ev));
        let finished = matches!(ev, Event::JobFinished { .. } | Event::JobCancelled { .. });
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

/// Writes a completed round's model version and commits it to the durable state, retrying
/// while that fails (disk full, permissions, the object store down), then tells the state
/// machine, which holds the round until then: a round is never built on a version that was
/// not stored. Each failure is logged, counted and reported to the machine (the job's status
/// says "paused: storage failure"). Stops if the job is cancelled or replaced meanwhile; a
/// restarted coordinator redoes the round from the last committed version.
async fn commit_until_durable(
    shared: Weak<Shared>,
    ctx: Arc<JobContext>,
    summary: RoundSummary,
    params: Arc<Vec<f32>>,
    strategy_state: Option<Vec<u8>>,
) {
    let (job, round) = (ctx.config.job_id.clone(), summary.round);
    let (summary, strategy_state) = (Arc::new(summary), strategy_state.map(Arc::new));
    let mut wait = COMMIT_RETRY_FIRST;
    loop {
        let Some(s) = shared.upgrade() else { return };
        let (s2, ctx2, sum2, p2, st2) = (
            s.clone(),
            ctx.clone(),
            summary.clone(),
            params.clone(),
            strategy_state.clone(),
        );
        let written = tokio::task::spawn_blocking(move || {
            crate::control::commit_round(&s2, &ctx2, &sum2, &p2, st2.as_deref().map(Vec::as_slice))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the model writer panicked: {e}")));
        let same_job = |o: &Orchestrator| o.config().job_id == job;
        match written {
            Ok(m) => {
                tracing::info!(
                    job,
                    round,
                    participants = summary.participants.len(),
                    eval_accuracy = summary.eval.map(|m| m.accuracy),
                    weights = %m.weights_file,
                    sha256 = %m.sha256,
                    "round complete; model version committed"
                );
                with_orch(&s, true, |o| {
                    if same_job(o) {
                        o.committed(round, Instant::now())
                    }
                });
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

/// The gRPC status for a refusal.
pub fn rejection_status(r: &Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::UnknownParticipant(_) => Status::unauthenticated(msg),
        Rejection::NotAllowed(_) => Status::permission_denied(msg),
        Rejection::RoundClosed { .. } | Rejection::NotSelected(..) => {
            Status::failed_precondition(msg)
        }
        Rejection::Duplicate(..) => Status::already_exists(msg),
        Rejection::ParameterCount { .. } | Rejection::Invalid(_) => Status::invalid_argument(msg),
    }
}

fn protocol_status(e: &ProtocolError) -> Status {
    let msg = e.to_string();
    match e {
        ProtocolError::Malformed(_) | ProtocolError::ParameterCount { .. } => {
            Status::invalid_argument(msg)
        }
        ProtocolError::DigestMismatch { .. } => Status::data_loss(msg),
        ProtocolError::TooLarge { .. } => Status::resource_exhausted(msg),
    }
}

fn refuse(id: &str, status: Status) -> Status {
    tracing::warn!(participant = %id, code = ?status.code(), "refused: {}", status.message());
    status
}

/// The next message of a client stream. tonic reports a message over the size limit as
/// `OutOfRange`; the gRPC specification's code for that is `ResourceExhausted`.
async fn next_message<T>(stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
    stream.message().await.map_err(|s| {
        if s.code() == tonic::Code::OutOfRange {
            Status::resource_exhausted(s.message().to_string())
        } else {
            s
        }
    })
}

/// A client stream of one header, data chunks and a trailer.
trait DataPart: Send + Sized + 'static {
    type Header;
    /// The message's name in errors.
    const HEADER: &'static str;
    /// `Some(header)` if this message is the header.
    fn header(self) -> Option<Self::Header>;
    /// `Some(Ok(data))`, `Some(Err(digest))` for the trailer, `None` for anything else.
    fn split(self) -> Option<Result<Vec<u8>, String>>;
}

/// The stream's first message, which must be its header.
async fn first_header<M: DataPart>(stream: &mut Streaming<M>) -> Result<M::Header, Status> {
    next_message(stream)
        .await?
        .and_then(M::header)
        .ok_or_else(|| {
            Status::invalid_argument(format!("the first message must be a {}", M::HEADER))
        })
}

impl DataPart for pb::UpdateChunk {
    type Header = pb::UpdateHeader;
    const HEADER: &'static str = "UpdateHeader";
    fn header(self) -> Option<pb::UpdateHeader> {
        match self.part {
            Some(Part::Header(h)) => Some(h),
            _ => None,
        }
    }
    fn split(self) -> Option<Result<Vec<u8>, String>> {
        match self.part {
            Some(Part::Data(d)) => Some(Ok(d)),
            Some(Part::Trailer(t)) => Some(Err(t.digest)),
            _ => None,
        }
    }
}

impl DataPart for pb::ShareChunk {
    type Header = pb::ShareHeader;
    const HEADER: &'static str = "ShareHeader";
    fn header(self) -> Option<pb::ShareHeader> {
        match self.part {
            Some(pb::share_chunk::Part::Header(h)) => Some(h),
            _ => None,
        }
    }
    fn split(self) -> Option<Result<Vec<u8>, String>> {
        use pb::share_chunk::Part as SharePart;
        match self.part {
            Some(SharePart::Data(d)) => Some(Ok(d)),
            Some(SharePart::Trailer(t)) => Some(Err(t.digest)),
            _ => None,
        }
    }
}

/// Receives data chunks into `asm` until the trailer, then checks count and digest.
async fn receive_words<T: cohort_protocol::Word, M: DataPart>(
    stream: &mut Streaming<M>,
    mut asm: cohort_protocol::Assembler<T>,
    id: &str,
) -> Result<(Vec<T>, [u8; 32]), Status> {
    let digest = loop {
        match next_message(stream).await.map_err(|s| refuse(id, s))? {
            Some(m) => match m.split() {
                Some(Ok(d)) => asm.push(&d).map_err(|e| refuse(id, protocol_status(&e)))?,
                Some(Err(digest)) => break digest,
                None => {
                    return Err(refuse(
                        id,
                        Status::invalid_argument(
                            "unexpected message after the header: only data chunks and one trailer may follow",
                        ),
                    ));
                }
            },
            None => {
                return Err(refuse(
                    id,
                    Status::invalid_argument("stream ended without a trailer"),
                ));
            }
        }
    };
    if next_message(stream).await?.is_some() {
        return Err(refuse(
            id,
            Status::invalid_argument("messages after the trailer"),
        ));
    }
    asm.finish_with_digest(&digest)
        .map_err(|e| refuse(id, protocol_status(&e)))
}

type ModelStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for Coordinator {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let cert = self.caller(&req)?;
        let leaf: Option<Vec<u8>> = req.peer_certs().and_then(|c| c.first().map(|d| d.to_vec()));
        let r = req.into_inner();
        if let Some(c) = &cert
            && *c != r.participant_id
        {
            return Err(refuse(
                c,
                Status::permission_denied(format!(
                    "the certificate is {c:?}'s; it cannot join as {:?}",
                    r.participant_id
                )),
            ));
        }
        let session = format!("{:032x}", rand::random::<u128>());
        let id = r.participant_id.clone();
        let keys = r
            .keys
            .as_ref()
            .map(|k| {
                Ok::<_, ProtocolError>(PartyKeys {
                    seal: MemberPublic(bytes32(&k.seal_key, "keys.seal_key")?),
                    verify: VerifyKey(bytes32(&k.verify_key, "keys.verify_key")?),
                    // The certificate this call came with, and the participant's signature
                    // with its key over both keys: relayed so that others can check them.
                    binding: leaf.as_ref().filter(|_| !k.binding.is_empty()).map(|cert| {
                        cohort_crypto::aggregation::KeyBinding {
                            certificate: cert.clone(),
                            signature: k.binding.clone(),
                        }
                    }),
                })
            })
            .transpose()
            .map_err(|e| refuse(&id, protocol_status(&e)))?;
        self.admit(&id, r.num_examples)?;
        self.with(true, |o| {
            o.handle_join_with_keys(
                &r.participant_id,
                session.clone(),
                r.num_examples,
                keys,
                Instant::now(),
            )
        })?
        .map_err(|e| refuse(&id, rejection_status(&e)))?;
        let o = self.lock()?;
        Ok(Response::new(pb::JoinResponse {
            session_id: session,
            job_id: o.config().job_id.clone(),
            heartbeat_interval_ms: (o.config().liveness_timeout / 3).as_millis() as u32,
        }))
    }

    async fn poll_task(
        &self,
        req: Request<pb::PollTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        let wait = Duration::from_millis(r.wait_ms as u64).min(MAX_POLL_WAIT);
        let until = tokio::time::Instant::now() + wait;
        let mut changed = self.shared.changed.subscribe();
        loop {
            changed.borrow_and_update();
            self.with(false, |o| o.handle_heartbeat(&id, Instant::now()))?
                .map_err(|e| refuse(&id, rejection_status(&e)))?;
            let task = self.task_message(&id)?;
            if !matches!(task.kind, Some(Kind::Idle(_))) {
                return Ok(Response::new(task));
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Ok(Response::new(task)) },
                _ = tokio::time::sleep_until(until) => return Ok(Response::new(task)),
            }
        }
    }

    type FetchModelStream = ModelStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        self.check_job(&id, &r.job_id)?;
        let (job, (version, params)) = {
            let o = self.lock()?;
            (o.config().job_id.clone(), o.global())
        };
        if r.version != version {
            return Err(refuse(
                &id,
                Status::failed_precondition(format!(
                    "model version {} is not the current global model (version {version})",
                    r.version
                )),
            ));
        }
        let chunks = self.encoded(&job, version, &params).chunks.clone();
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let cert = self.caller(&req)?;
        let mut stream = req.into_inner();
        let header = first_header(&mut stream).await?;
        let id = self.session_of(cert, &header.session_id)?;
        self.check_job(&id, &header.job_id)?;
        self.check_nonce(&id, &header.nonce)?;
        if let Some(sec) = header.secure.as_ref() {
            self.lock()?
                .check_secure_update(&id, header.round, sec.num_bodies as usize)
                .map_err(|e| refuse(&id, rejection_status(&e)))?;
        } else {
            self.lock()?
                .check_update(&id, header.round, header.num_parameters as usize)
                .map_err(|e| refuse(&id, rejection_status(&e)))?;
        }
        let train = header
            .train
            .as_ref()
            .map(Metrics::try_from)
            .transpose()
            .map_err(|e| refuse(&id, protocol_status(&e)))?;
        // One model-sized buffer per upload in flight, at most UPLOAD_SLOTS of them.
        let _slot = self.upload_slot().await?;
        if let Some(sec) = header.secure {
            let pieces = sec
                .pieces
                .iter()
                .map(sealed_from_pb)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| refuse(&id, protocol_status(&e)))?;
            let signature = bytes64(&sec.signature, "secure.signature")
                .map_err(|e| refuse(&id, protocol_status(&e)))?;
            let asm = cohort_protocol::BodyAssembler::new(sec.num_bodies);
            let (bodies, bodies_sha256) = receive_words(&mut stream, asm, &id).await?;
            let update = SecureUpdate {
                round: header.round,
                weight: sec.weight,
                bodies: bodies.into_iter().map(|b| b.0).collect(),
                bodies_sha256,
                pieces,
                signature,
                train,
            };
            self.shared
                .metrics
                .received("update", update.bodies.len() as u64 * 6);
            let t = Instant::now();
            let done = self.with(true, |o| {
                o.handle_secure_update(&id, update, Instant::now())
            })?;
            self.shared
                .metrics
                .aggregation("update", t.elapsed().as_secs_f64());
            done.map_err(|e| refuse(&id, rejection_status(&e)))?;
        } else {
            let asm = ParamAssembler::new(header.num_parameters);
            let (delta, _) = receive_words(&mut stream, asm, &id).await?;
            let update = Update {
                round: header.round,
                delta,
                num_examples: header.num_examples,
                train,
            };
            self.shared
                .metrics
                .received("update", update.delta.len() as u64 * 4);
            let t = Instant::now();
            let done = self.with(true, |o| o.handle_update(&id, update, Instant::now()))?;
            self.shared
                .metrics
                .aggregation("update", t.elapsed().as_secs_f64());
            done.map_err(|e| refuse(&id, rejection_status(&e)))?;
        }
        Ok(Response::new(pb::SubmitUpdateResponse {
            round: header.round,
        }))
    }

    type FetchDecryptionInputStream =
        Pin<Box<dyn Stream<Item = Result<pb::DecryptionInput, Status>> + Send>>;

    async fn fetch_decryption_input(
        &self,
        req: Request<pb::FetchDecryptionInputRequest>,
    ) -> Result<Response<Self::FetchDecryptionInputStream>, Status> {
        use pb::decryption_input::Kind as In;
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        self.check_job(&id, &r.job_id)?;
        let (records, pieces) = self
            .lock()?
            .decryption_input(&id, r.round, r.attempt)
            .map_err(|e| refuse(&id, rejection_status(&e)))?;
        let items = records
            .into_iter()
            .map(|(rec, keys)| In::Upload(record_pb(&rec, &keys)))
            .chain(pieces.into_iter().map(|(sender, p)| {
                In::Piece(pb::PieceFrom {
                    sender,
                    piece: Some(sealed_pb(&p)),
                })
            }))
            .map(|kind| Ok(pb::DecryptionInput { kind: Some(kind) }));
        Ok(Response::new(Box::pin(futures::stream::iter(
            items.collect::<Vec<_>>(),
        ))))
    }

    async fn submit_share(
        &self,
        req: Request<Streaming<pb::ShareChunk>>,
    ) -> Result<Response<pb::SubmitShareResponse>, Status> {
        let cert = self.caller(&req)?;
        let mut stream = req.into_inner();
        let header = first_header(&mut stream).await?;
        let id = self.session_of(cert, &header.session_id)?;
        self.check_job(&id, &header.job_id)?;
        self.check_nonce(&id, &header.nonce)?;
        let share = if header.refused.is_empty() {
            let expected = self.lock()?.bodies_len().unwrap_or(0) as u64;
            if header.num_values != expected {
                return Err(refuse(
                    &id,
                    Status::invalid_argument(format!(
                        "share has {} values, the round's ciphertexts have {expected}",
                        header.num_values
                    )),
                ));
            }
            let signature = bytes64(&header.signature, "share signature")
                .map_err(|e| refuse(&id, protocol_status(&e)))?;
            let _slot = self.upload_slot().await?;
            let (values, sha256) =
                receive_words(&mut stream, WordAssembler::new(header.num_values), &id).await?;
            Ok(SignedShare {
                values,
                sha256,
                signature,
            })
        } else {
            Err(header.refused.clone())
        };
        let answer = ShareAnswer {
            round: header.round,
            attempt: header.attempt,
            request: header.request,
            pieces: header.pieces.iter().map(|&k| k as usize).collect(),
            share,
        };
        if let Ok(sh) = &answer.share {
            self.shared
                .metrics
                .received("share", sh.values.len() as u64 * 8);
        }
        let t = Instant::now();
        let done = self.with(true, |o| o.handle_share(&id, answer, Instant::now()))?;
        self.shared
            .metrics
            .aggregation("share", t.elapsed().as_secs_f64());
        done.map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::SubmitShareResponse {}))
    }

    async fn submit_evaluation(
        &self,
        req: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::SubmitEvaluationResponse>, Status> {
        let cert = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.session_of(cert, &r.session_id)?;
        self.check_job(&id, &r.job_id)?;
        self.check_nonce(&id, &r.nonce)?;
        let metrics = r
            .metrics
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("metrics missing"))
            .and_then(|m| Metrics::try_from(m).map_err(|e| protocol_status(&e)))
            .map_err(|s| refuse(&id, s))?;
        self.with(true, |o| {
            o.handle_evaluation(&id, r.round, metrics, Instant::now())
        })?
        .map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::SubmitEvaluationResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let cert = self.caller(&req)?;
        let id = self.session_of(cert, &req.into_inner().session_id)?;
        self.with(false, |o| o.handle_heartbeat(&id, Instant::now()))?
            .map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let cert = self.caller(&req)?;
        let id = self.session_of(cert, &req.into_inner().session_id)?;
        self.with(true, |o| o.handle_leave(&id, Instant::now()))?
            .map_err(|e| refuse(&id, rejection_status(&e)))?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}
