//! The cohort participant: a node agent that runs next to its data, dials out to the
//! coordinator, trains in the rounds it is given, and sends back only its update and metrics.
//!
//! [`LocalData::prepare`] holds out a test split and standardises with statistics fitted on
//! this participant's own training data only. [`run`] is the agent loop: join, long-poll for
//! tasks, fetch the global model, train or evaluate, upload; reconnect and rejoin when the
//! coordinator goes away; leave when the job is finished.

pub mod config;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_crypto::aggregation::{self, ShareRequest};
use cohort_crypto::{Kind as SigKind, MemberPolicy, MemberSecret, RoundSeed, SeedLog, Signer25519};
use cohort_protocol::secure::{bytes32, bytes64, record_from_pb, round_from_pb, sealed_from_pb};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

use cohort_model::{
    ComputeDevice, ComputeSlots, Dataset, Metrics, ModelSpec, Standardizer, TrainConfig,
};
use cohort_protocol::pb::federation_client::FederationClient;
use cohort_protocol::pb::{self, task::Kind};
use cohort_protocol::{MAX_MESSAGE_BYTES, ParamAssembler};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use config::ParticipantConfig;

/// Errors that end the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("coordinator address {0:?} is not a valid URI: {1}")]
    Address(String, String),
    #[error("coordinator refused: {0}")]
    Refused(Status),
    #[error("{0}")]
    Model(#[from] cohort_model::ModelError),
    #[error("{0}")]
    Data(#[from] cohort_model::DataError),
    #[error("protocol: {0}")]
    Protocol(#[from] cohort_protocol::ProtocolError),
    #[error("stopped before the job finished")]
    Stopped,
}

/// This participant's data, split and standardised locally.
#[derive(Debug, Clone)]
pub struct LocalData {
    pub train: Dataset,
    pub test: Dataset,
    /// Statistics fitted on `train` (and applied to both), if standardising.
    pub standardizer: Option<Standardizer>,
}

impl LocalData {
    /// Holds out `test_fraction` (stratified, seeded) and, if `standardize`, fits a
    /// standardiser on the training part only.
    pub fn prepare(
        data: Dataset,
        test_fraction: f64,
        standardize: bool,
        seed: u64,
    ) -> Result<Self, cohort_model::DataError> {
        let (train, test) = data.split(test_fraction, seed)?;
        if train.is_empty() {
            return Err(cohort_model::DataError::Invalid(
                "no training examples left after the test split".into(),
            ));
        }
        Ok(Self::from_split(train, test, standardize))
    }

    /// Uses a given train/test split; if `standardize`, fits on `train` and applies to both.
    pub fn from_split(mut train: Dataset, mut test: Dataset, standardize: bool) -> Self {
        let standardizer = standardize.then(|| {
            let s = Standardizer::fit(&train);
            s.apply(&mut train);
            s.apply(&mut test);
            s
        });
        LocalData {
            train,
            test,
            standardizer,
        }
    }
}

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub id: String,
    /// e.g. "http://127.0.0.1:7400".
    pub coordinator: String,
    pub device: ComputeDevice,
    /// How long each PollTask may wait on the coordinator.
    pub poll_wait: Duration,
    /// Give up after failing to reach the coordinator for this long.
    pub reconnect_for: Duration,
    /// Fault injection: wait this long after training before uploading (a slow link or a
    /// straggler). Zero in normal operation.
    pub upload_delay: Duration,
    /// Mutual TLS towards the coordinator (`https://` addresses); also binds this node's
    /// secure-aggregation keys to its certificate and checks other nodes' bindings. `None`
    /// only for development against an `--insecure-dev` coordinator.
    pub tls: Option<cohort_protocol::tls::NodeTls>,
    /// When a job finishes, wait for the coordinator's next job instead of exiting (a node
    /// of a long-running federation).
    pub stay_between_jobs: bool,
    /// Cores shared with other participants training in the same process (a simulation);
    /// `None`: train on the process-wide pool, every core (a node of its own).
    pub compute: Option<Arc<ComputeSlots>>,
}

/// Runs `f` on a pool of `compute`, or directly when there is none.
fn on_compute<T: Send>(compute: Option<&ComputeSlots>, f: impl FnOnce() -> T + Send) -> T {
    match compute {
        Some(c) => c.run(f),
        None => f(),
    }
}

/// How often a node between jobs asks whether a new one has started.
const BETWEEN_JOBS_POLL: Duration = Duration::from_secs(2);

/// What the agent did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReport {
    pub rounds_trained: u64,
    pub evaluations: u64,
    pub updates_refused: u64,
    /// Decryption shares sent as a committee member.
    pub shares_sent: u64,
}

struct Session {
    client: FederationClient<Channel>,
    id: String,
    heartbeat: Duration,
}

/// This participant's secure-aggregation secrets and memory, for the life of the process.
/// Nothing here is written to disk: after a restart the participant has new keys, so pieces
/// sealed to the old ones cannot be opened by anyone, and a forgotten seed or manifest cannot
/// be abused (the old keys are gone with them).
struct Secrets {
    seal: MemberSecret,
    sign: Signer25519,
    policy: MemberPolicy,
    seeds: SeedLog,
    /// Round seed of each (job, round, attempt) this participant trained in.
    round_seeds: BTreeMap<(String, u64, u32), RoundSeed>,
    rng: ChaCha20Rng,
}

impl Secrets {
    fn generate() -> Self {
        let mut rng = ChaCha20Rng::from_rng(&mut rand::rng());
        Secrets {
            seal: MemberSecret::generate(&mut rng),
            sign: Signer25519::generate(&mut rng),
            policy: MemberPolicy::default(),
            seeds: SeedLog::default(),
            round_seeds: BTreeMap::new(),
            rng,
        }
    }

    /// The public keys to join with, signed by the certificate's key under TLS.
    fn keys(
        &self,
        tls: Option<&cohort_protocol::tls::NodeTls>,
    ) -> Result<pb::SecureKeys, AgentError> {
        let (seal, verify) = (self.seal.public().0, self.sign.verify_key().0);
        let binding = match tls {
            Some(t) => cohort_crypto::pki::sign_with_key(
                &t.key_pem,
                &cohort_crypto::pki::binding_message(&seal, &verify),
            )
            .map_err(|e| AgentError::Address("certificate key".into(), e.to_string()))?,
            None => Vec::new(),
        };
        Ok(pb::SecureKeys {
            seal_key: seal.to_vec(),
            verify_key: verify.to_vec(),
            binding,
        })
    }
}

type SharedSecrets = Arc<Mutex<Secrets>>;

fn lock(s: &SharedSecrets) -> std::sync::MutexGuard<'_, Secrets> {
    s.lock().expect("secrets lock poisoned")
}

async fn connect(
    opts: &AgentOptions,
    num_examples: u64,
    keys: &pb::SecureKeys,
) -> Result<Session, AgentError> {
    let endpoint = Endpoint::from_shared(opts.coordinator.clone())
        .map_err(|e| AgentError::Address(opts.coordinator.clone(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let endpoint = match &opts.tls {
        Some(tls) => endpoint
            .tls_config(tls.client_config())
            .map_err(|e| AgentError::Address(opts.coordinator.clone(), e.to_string()))?,
        None => endpoint,
    };
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let mut client = FederationClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let joined = client
                .join(pb::JoinRequest {
                    participant_id: opts.id.clone(),
                    num_examples,
                    client_version: env!("CARGO_PKG_VERSION").into(),
                    keys: Some(keys.clone()),
                })
                .await?
                .into_inner();
            Ok::<_, Status>(Session {
                client,
                id: joined.session_id,
                heartbeat: Duration::from_millis(joined.heartbeat_interval_ms.max(100) as u64),
            })
        };
        match attempt.await {
            Ok(s) => {
                tracing::info!(participant = %opts.id, "joined");
                return Ok(s);
            }
            Err(s) if matches!(s.code(), Code::PermissionDenied | Code::InvalidArgument) => {
                return Err(AgentError::Refused(s));
            }
            Err(s) => {
                if started.elapsed() > opts.reconnect_for {
                    return Err(AgentError::Refused(s));
                }
                tracing::debug!(participant = %opts.id, "coordinator not reachable ({}); retrying", s.message());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn fetch_model(
    s: &mut Session,
    job_id: &str,
    version: u64,
    expected: u64,
    digest: &str,
) -> Result<Vec<f32>, Status> {
    let mut stream = s
        .client
        .fetch_model(pb::FetchModelRequest {
            session_id: s.id.clone(),
            job_id: job_id.into(),
            version,
        })
        .await?
        .into_inner();
    let mut asm = ParamAssembler::new(expected);
    let mut last = String::new();
    while let Some(chunk) = stream.message().await? {
        asm.push(&chunk.data)
            .map_err(|e| Status::data_loss(e.to_string()))?;
        if !chunk.digest.is_empty() {
            last = chunk.digest;
        }
    }
    if last != digest {
        return Err(Status::data_loss("model digest differs from the task's"));
    }
    asm.finish(digest)
        .map_err(|e| Status::data_loss(e.to_string()))
}

/// Runs `f` on a blocking thread while heartbeats keep the participant alive.
async fn with_heartbeats<T: Send + 'static>(
    s: &Session,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let mut client = s.client.clone();
    let (session, every) = (s.id.clone(), s.heartbeat);
    let beat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let _ = client
                .heartbeat(pb::HeartbeatRequest {
                    session_id: session.clone(),
                })
                .await;
        }
    });
    let out = tokio::task::spawn_blocking(f)
        .await
        .expect("training thread panicked");
    beat.abort();
    out
}

/// A fresh nonce for a state-changing message (the coordinator refuses repeats).
fn nonce() -> Vec<u8> {
    rand::random::<[u8; cohort_protocol::NONCE_BYTES]>().to_vec()
}

fn metrics_pb(loss: f64, accuracy: f64, n: usize) -> pb::Metrics {
    (&Metrics {
        loss,
        accuracy,
        auc: None,
        num_examples: n,
    })
        .into()
}

/// The model spec a task names; a task without a valid one is refused.
fn task_model(model: Option<&pb::ModelSpec>) -> Result<ModelSpec, Status> {
    let m = model.ok_or_else(|| Status::invalid_argument("task without model"))?;
    ModelSpec::try_from(m).map_err(|e| Status::invalid_argument(e.to_string()))
}

async fn train_round(
    s: &mut Session,
    opts: &AgentOptions,
    data: &Arc<LocalData>,
    secrets: &SharedSecrets,
    t: pb::TrainTask,
) -> Result<(), Status> {
    let spec = task_model(t.model.as_ref())?;
    let secure = t
        .secure
        .as_ref()
        .map(|r| round_from_pb(&t.job_id, t.round, r))
        .transpose()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // Seal key pieces only to keys their owners' certificates vouch for; check before
    // spending a round's training on it.
    if let (Some(info), Some(tls)) = (&secure, &opts.tls)
        && let Err(e) = info.check_bindings(&tls.ca_pem)
    {
        tracing::error!(participant = %opts.id, round = t.round, "refusing to take part: {e}");
        return Err(Status::aborted(format!("refusing to take part: {e}")));
    }
    let cfg = TrainConfig::try_from(
        t.config
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("task without config"))?,
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let global = fetch_model(
        s,
        &t.job_id,
        t.model_version,
        t.num_parameters,
        &t.model_digest,
    )
    .await?;
    let (d, dev, compute) = (data.clone(), opts.device, opts.compute.clone());
    let start = global.clone();
    let trained = with_heartbeats(s, move || {
        on_compute(compute.as_deref(), || {
            cohort_model::train(&spec, &start, &d.train, &cfg, dev)
        })
    })
    .await;
    let (params, report) = match trained {
        Ok(x) => x,
        Err(e) => {
            // Nothing is sent: the coordinator counts this participant as a straggler.
            tracing::error!(participant = %opts.id, round = t.round, "local training failed: {e}");
            return Ok(());
        }
    };
    let delta: Vec<f32> = params.iter().zip(&global).map(|(p, g)| p - g).collect();
    if !opts.upload_delay.is_zero() {
        tracing::info!(participant = %opts.id, round = t.round, "fault injection: delaying the upload by {:?}", opts.upload_delay);
        tokio::time::sleep(opts.upload_delay).await;
    }
    let mut header = pb::UpdateHeader {
        nonce: nonce(),
        session_id: s.id.clone(),
        job_id: t.job_id.clone(),
        round: t.round,
        num_parameters: delta.len() as u64,
        num_examples: report.num_examples as u64,
        train: Some(metrics_pb(
            *report.epoch_loss.last().unwrap_or(&f64::NAN),
            report.last_epoch_accuracy,
            report.num_examples,
        )),
        train_seconds: report.seconds,
        secure: None,
    };
    match secure {
        None => {
            let chunks = cohort_protocol::update_chunks(header, &delta);
            s.client
                .submit_update(futures::stream::iter(chunks))
                .await?;
        }
        Some(info) => {
            let (me, sec, n) = (opts.id.clone(), secrets.clone(), report.num_examples as u64);
            let info = Arc::new(info);
            let round_info = info.clone();
            let protected = with_heartbeats(s, move || {
                let mut guard = lock(&sec);
                let x = &mut *guard;
                x.round_seeds.insert(
                    (round_info.job.clone(), round_info.round, round_info.attempt),
                    round_info.seed,
                );
                aggregation::protect(&round_info, &me, &x.sign, &mut x.seeds, &delta, n, &mut x.rng)
            })
            .await
            .map_err(|e| {
                tracing::error!(participant = %opts.id, round = t.round, "refusing to encrypt: {e}");
                Status::aborted(format!("refusing to encrypt: {e}"))
            })?;
            header.secure = Some(pb::SecureUpload {
                weight: protected.weight,
                pieces: protected
                    .pieces
                    .iter()
                    .map(cohort_protocol::secure::sealed_pb)
                    .collect(),
                signature: protected.signature.to_vec(),
                num_bodies: protected.bodies.len() as u64,
            });
            let bodies: Vec<cohort_protocol::Body> = protected
                .bodies
                .iter()
                .map(|&b| cohort_protocol::Body(b))
                .collect();
            let chunks = cohort_protocol::update_chunks(header, &bodies);
            s.client
                .submit_update(futures::stream::iter(chunks))
                .await?;
            tracing::info!(participant = %opts.id, round = t.round, weight = protected.weight, "encrypted update sent");
            return Ok(());
        }
    }
    tracing::info!(participant = %opts.id, round = t.round, loss = report.epoch_loss.last(), "update sent");
    Ok(())
}

/// A committee member's part: fetch the manifest's records and this member's pieces, check
/// them against the task and the coordinator's signature, then answer (or refuse) under the
/// member policy.
async fn decrypt_round(
    s: &mut Session,
    opts: &AgentOptions,
    secrets: &SharedSecrets,
    d: pb::DecryptTask,
) -> Result<(), Status> {
    use pb::decryption_input::Kind as In;
    let info = d
        .secure
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("decrypt task without its round"))
        .and_then(|r| {
            round_from_pb(&d.job_id, d.round, r)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })?;
    let mut stream = s
        .client
        .fetch_decryption_input(pb::FetchDecryptionInputRequest {
            session_id: s.id.clone(),
            job_id: d.job_id.clone(),
            round: d.round,
            attempt: info.attempt,
        })
        .await?
        .into_inner();
    let (mut records, mut keys, mut pieces) = (Vec::new(), BTreeMap::new(), Vec::new());
    let mut public = Vec::new();
    let malformed = |e: cohort_protocol::ProtocolError| Status::invalid_argument(e.to_string());
    while let Some(item) = stream.message().await? {
        match item.kind {
            Some(In::Upload(u)) => {
                let (rec, pk) = record_from_pb(&u).map_err(malformed)?;
                keys.insert(rec.participant.clone(), pk.verify);
                public.push((rec.participant.clone(), pk));
                records.push(rec);
            }
            Some(In::Piece(p)) => {
                let piece = p
                    .piece
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("piece missing"))?;
                pieces.push((p.sender.clone(), sealed_from_pb(piece).map_err(malformed)?));
            }
            None => {}
        }
    }
    let manifest = info.manifest(
        records
            .iter()
            .map(|r| (r.participant.clone(), r.weight))
            .collect(),
    );
    let assigned: Vec<usize> = d.pieces.iter().map(|&k| k as usize).collect();
    let (me, sec) = (opts.id.clone(), secrets.clone());
    let (task_digest, count) = (d.manifest_digest.clone(), d.manifest_participants as usize);
    let (coord_key, coord_sig) = (d.coordinator_key.clone(), d.manifest_signature.clone());
    let ca = opts.tls.as_ref().map(|t| t.ca_pem.clone());
    let answer = with_heartbeats(s, move || {
        // Every participant's signature key must be its own, vouched for by its certificate.
        if let Some(ca) = &ca {
            for (id, pk) in &public {
                pk.check(ca, id).map_err(|e| e.to_string())?;
            }
        }
        let digest = manifest.digest();
        if task_digest != digest || count != manifest.entries.len() {
            return Err("the records sent are not the manifest the task names".to_string());
        }
        let key = bytes32(&coord_key, "coordinator_key").map_err(|e| e.to_string())?;
        let sig = bytes64(&coord_sig, "manifest_signature").map_err(|e| e.to_string())?;
        cohort_crypto::sign::verify(
            &cohort_crypto::VerifyKey(key),
            SigKind::Manifest,
            &digest,
            &sig,
        )
        .map_err(|e| format!("manifest: {e}"))?;
        let mut guard = lock(&sec);
        let x = &mut *guard;
        if let Some(seed) = x
            .round_seeds
            .get(&(info.job.clone(), info.round, info.attempt))
            && *seed != info.seed
        {
            return Err(format!(
                "the task names seed {:032x}, but this round's seed was {:032x}",
                info.seed.0, seed.0
            ));
        }
        let len = d.num_parameters as usize;
        let req = ShareRequest {
            info: &info,
            manifest: &manifest,
            uploads: &records,
            keys: &keys,
            pieces: &pieces,
            assigned: &assigned,
            len,
        };
        aggregation::answer(&req, &me, &x.seal, &x.sign, &mut x.policy, &mut x.rng)
            .map_err(|e| e.to_string())
    })
    .await;
    let mut header = pb::ShareHeader {
        nonce: nonce(),
        session_id: s.id.clone(),
        job_id: d.job_id.clone(),
        round: d.round,
        attempt: d.secure.as_ref().map_or(0, |r| r.attempt),
        request: d.request,
        pieces: d.pieces.clone(),
        num_values: 0,
        signature: Vec::new(),
        refused: String::new(),
    };
    let chunks = match answer {
        Ok((share, signature)) => {
            header.num_values = share.len() as u64;
            header.signature = signature.to_vec();
            cohort_protocol::share_chunks(header, &share)
        }
        Err(reason) => {
            tracing::warn!(participant = %opts.id, round = d.round, "refusing to decrypt: {reason}");
            header.refused = reason;
            vec![pb::ShareChunk {
                part: Some(pb::share_chunk::Part::Header(header)),
            }]
        }
    };
    s.client.submit_share(futures::stream::iter(chunks)).await?;
    tracing::info!(participant = %opts.id, round = d.round, pieces = ?d.pieces, "decryption share sent");
    Ok(())
}

async fn evaluate_round(
    s: &mut Session,
    opts: &AgentOptions,
    data: &Arc<LocalData>,
    e: pb::EvaluateTask,
) -> Result<(), Status> {
    let spec = task_model(e.model.as_ref())?;
    let params = fetch_model(
        s,
        &e.job_id,
        e.model_version,
        e.num_parameters,
        &e.model_digest,
    )
    .await?;
    let (d, dev, compute) = (data.clone(), opts.device, opts.compute.clone());
    let m = with_heartbeats(s, move || {
        on_compute(compute.as_deref(), || {
            cohort_model::evaluate(&spec, &params, &d.test, dev)
        })
    })
    .await;
    let m = m.map_err(|err| Status::internal(err.to_string()))?;
    s.client
        .submit_evaluation(pb::SubmitEvaluationRequest {
            nonce: nonce(),
            session_id: s.id.clone(),
            job_id: e.job_id,
            round: e.round,
            metrics: Some((&m).into()),
        })
        .await?;
    Ok(())
}

/// The agent loop. Returns when the job is finished, or with an error when the coordinator
/// refuses this participant or cannot be reached for `reconnect_for`.
pub async fn run(opts: AgentOptions, data: Arc<LocalData>) -> Result<AgentReport, AgentError> {
    agent(opts, Some(data)).await
}

/// A dedicated key custodian: joins with its keys, holds no data, and only answers the
/// committee's decryption requests. Returns when the job is finished.
pub async fn run_custodian(opts: AgentOptions) -> Result<AgentReport, AgentError> {
    agent(opts, None).await
}

async fn agent(
    opts: AgentOptions,
    data: Option<Arc<LocalData>>,
) -> Result<AgentReport, AgentError> {
    let mut report = AgentReport::default();
    let n = data.as_ref().map_or(0, |d| d.train.len() as u64);
    let secrets: SharedSecrets = Arc::new(Mutex::new(Secrets::generate()));
    let keys = lock(&secrets).keys(opts.tls.as_ref())?;
    let mut s = connect(&opts, n, &keys).await?;
    loop {
        let polled = s
            .client
            .poll_task(pb::PollTaskRequest {
                session_id: s.id.clone(),
                wait_ms: opts.poll_wait.as_millis() as u32,
            })
            .await;
        let outcome = match polled.map(|r| r.into_inner().kind) {
            Ok(Some(Kind::Train(_) | Kind::Evaluate(_))) if data.is_none() => {
                tracing::error!(participant = %opts.id, "asked to train or evaluate, but this node is a custodian and holds no data");
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            Ok(Some(Kind::Train(t))) => {
                let round = t.round;
                let data = data.as_ref().expect("checked above");
                let r = train_round(&mut s, &opts, data, &secrets, t).await;
                if r.is_ok() {
                    report.rounds_trained += 1;
                } else if let Err(e) = &r
                    && matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists)
                {
                    tracing::warn!(participant = %opts.id, round, "update refused: {}", e.message());
                    report.updates_refused += 1;
                    continue;
                }
                r
            }
            Ok(Some(Kind::Evaluate(e))) => {
                let data = data.as_ref().expect("checked above");
                let r = evaluate_round(&mut s, &opts, data, e).await;
                if r.is_ok() {
                    report.evaluations += 1;
                } else if let Err(e) = &r
                    && matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists)
                {
                    continue;
                }
                r
            }
            Ok(Some(Kind::Decrypt(d))) => {
                let r = decrypt_round(&mut s, &opts, &secrets, d).await;
                if r.is_ok() {
                    report.shares_sent += 1;
                }
                if let Err(e) = &r
                    && matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists)
                {
                    continue;
                }
                r
            }
            Ok(Some(Kind::Idle(_))) | Ok(None) => Ok(()),
            Ok(Some(Kind::Finished(f))) if opts.stay_between_jobs => {
                // A new job replaces the coordinator's sessions: the next poll then fails
                // with Unauthenticated, and this node joins the new job.
                tracing::info!(participant = %opts.id, "{}; waiting for the next job", f.reason);
                tokio::time::sleep(BETWEEN_JOBS_POLL).await;
                Ok(())
            }
            Ok(Some(Kind::Finished(f))) => {
                tracing::info!(participant = %opts.id, "{}", f.reason);
                let _ = s
                    .client
                    .leave(pb::LeaveRequest {
                        session_id: s.id.clone(),
                    })
                    .await;
                return Ok(report);
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unauthenticated | Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                tracing::warn!(participant = %opts.id, "lost the coordinator ({}); rejoining", e.message());
                s = connect(&opts, n, &keys).await?;
            }
            Err(e) => {
                tracing::warn!(participant = %opts.id, "task failed: {} ({:?})", e.message(), e.code());
                // This node refused the task itself (Aborted): the same task will come back
                // until the round moves on, so wait longer before asking again.
                let pause = if e.code() == Code::Aborted { 1000 } else { 200 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}
