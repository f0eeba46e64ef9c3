//! Round orchestration as a sans-IO state machine.
//!
//! [`Orchestrator`] owns a job's participant registry, its rounds and its global model. It does
//! no I/O and reads no clock: the driver (the tonic service, or a test) feeds it inputs with the
//! current time and takes outputs.
//!
//! - **Inputs** (`handle_*`): a participant joins, polls, sends a heartbeat, submits an update
//!   or an evaluation, leaves; and [`Orchestrator::handle_timeout`] when the time given by
//!   [`Orchestrator::poll_timeout`] has come.
//! - **Queries**: [`Orchestrator::task_for`] says what a participant should do now;
//!   [`Orchestrator::global`] is the current model.
//! - **Outputs**: [`Orchestrator::poll_event`] yields what happened, in order (rounds
//!   started, completed and failed, stragglers, participants lost). The driver must drain events
//!   after every input, and call `handle_timeout` no later than `poll_timeout`.
//!
//! One round: select participants → *training* (collect updates until every selected one
//! has sent its update or the deadline passes; updates are folded into a running weighted sum,
//! so memory is O(model), not O(participants × model)) → aggregate with the strategy → new
//! global version → *evaluation* (federated: participants evaluate the new model on their own
//! held-out data) → round complete. A round with too few updates at its deadline fails and is
//! tried again (a new attempt) with whoever is available.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_crypto::aggregation::{RoundInfo, SealedPiece};
use cohort_crypto::{Codec, GlweParams, VerifyKey};
use cohort_model::{Metrics, ModelSpec, TrainConfig};
use rand::SeedableRng;
use rand::rngs::{ChaCha8Rng, ChaCha20Rng};
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::strategy::Strategy;

/// Identity of a participant (its configured id; the certificate subject once mTLS exists).
pub type ParticipantId = String;

/// What the job does, validated by [`JobConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    pub job_id: String,
    pub model: ModelSpec,
    /// Local training settings; `seed` is the base of every participant's per-round seed.
    pub train: TrainConfig,
    pub rounds: u64,
    /// Participants that must be available before a round starts.
    pub min_participants: usize,
    /// Share of available participants selected each round (at least `min_updates`, and
    /// T_min in secure jobs).
    pub fraction: f64,
    /// Updates needed to aggregate; fewer at the deadline fails the round.
    pub min_updates: usize,
    /// Time allowed for training and upload.
    pub round_timeout: Duration,
    /// Time allowed for federated evaluation.
    pub eval_timeout: Duration,
    /// Evaluate each new global model on participants' held-out data.
    pub evaluate: bool,
    /// A participant not heard from for this long is marked lost.
    pub liveness_timeout: Duration,
    /// Seed of the initial model and of participant selection.
    pub seed: u64,
    /// Secure aggregation settings; `None` runs plaintext rounds (research comparisons only:
    /// the coordinator then sees every participant's update).
    pub secure: Option<SecureSettings>,
}

/// How a job aggregates securely (protocol: docs/secure-aggregation.md).
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSettings {
    /// Committee size n_D; the committee is drawn from each round's selected participants.
    /// The threshold is a strict majority, ⌊n_D/2⌋ + 1. Fewer selected → all of them.
    pub committee_size: usize,
    /// Fewest participants a manifest may list (members refuse smaller ones).
    pub t_min: usize,
    pub codec: Codec,
    pub params: GlweParams,
    /// Time committee members have to answer before their pieces are reassigned.
    pub decrypt_timeout: Duration,
    /// Dedicated key custodians: when given, they are every round's committee (those online;
    /// at least a strict majority of them must be) instead of members drawn from the round's
    /// participants, and they never train or evaluate.
    pub custodians: Vec<ParticipantId>,
}

impl Default for SecureSettings {
    fn default() -> Self {
        SecureSettings {
            committee_size: 5,
            t_min: 2,
            codec: Codec::default(),
            params: GlweParams::default(),
            decrypt_timeout: Duration::from_secs(30),
            custodians: Vec::new(),
        }
    }
}

impl SecureSettings {
    /// The committee a round with `selected` participants gets.
    pub fn committee_for(&self, selected: usize) -> usize {
        if self.custodians.is_empty() {
            self.committee_size.min(selected).max(1)
        } else {
            self.custodians.len()
        }
    }

    /// Members needed to decrypt with a committee of `members`: a strict majority of the
    /// configured custodians, or of the drawn committee.
    pub fn threshold_for(&self, members: usize) -> usize {
        if self.custodians.is_empty() {
            members / 2 + 1
        } else {
            self.custodians.len() / 2 + 1
        }
    }

    pub fn is_custodian(&self, id: &str) -> bool {
        self.custodians.iter().any(|c| c == id)
    }

    /// Refuses settings that cannot work or could overflow, naming the bound.
    pub fn validate(&self, min_participants: usize) -> Result<(), String> {
        let c = if self.custodians.is_empty() {
            cohort_crypto::Committee::new(self.committee_size, self.committee_size / 2 + 1)
                .map_err(|e| format!("secure_aggregation.committee_size: {e}"))?
        } else {
            let mut ids: Vec<&String> = self.custodians.iter().collect();
            ids.sort();
            ids.dedup();
            if ids.len() != self.custodians.len() || ids.iter().any(|i| i.is_empty()) {
                return Err(
                    "secure_aggregation.custodians: ids must be distinct and not empty".into(),
                );
            }
            let n = self.custodians.len();
            cohort_crypto::Committee::new(n, n / 2 + 1)
                .map_err(|e| format!("secure_aggregation.custodians: {e}"))?
        };
        if self.t_min == 0 || self.t_min > min_participants {
            return Err(format!(
                "secure_aggregation.t_min must be between 1 and min_participants ({min_participants}), not {}",
                self.t_min
            ));
        }
        if self.decrypt_timeout.is_zero() {
            return Err("secure_aggregation.decrypt_timeout must be positive".into());
        }
        // The largest committee has the most pieces, hence the most decryption shares.
        self.codec
            .check(&self.params.budget(c.pieces()))
            .map_err(|e| format!("secure_aggregation: {e}"))
    }
}

impl JobConfig {
    /// Refuses configurations that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        // The id names the job's model directory and appears in logs and metrics.
        if self.job_id.is_empty()
            || self.job_id.len() > 64
            || self.job_id.starts_with('.')
            || !self
                .job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "job id {:?} must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                self.job_id
            ));
        }
        // The registry's own names at its root.
        if matches!(self.job_id.as_str(), "objects" | "serving.json") {
            return Err(format!(
                "job id {:?} is reserved by the model registry",
                self.job_id
            ));
        }
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        self.train.validate().map_err(|e| format!("train: {e}"))?;
        if self.rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        if self.min_participants == 0 {
            return Err("min_participants must be at least 1".into());
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(format!("fraction must be in (0, 1], not {}", self.fraction));
        }
        if self.min_updates == 0 || self.min_updates > self.min_participants {
            return Err(format!(
                "min_updates must be between 1 and min_participants ({}), not {}",
                self.min_participants, self.min_updates
            ));
        }
        if self.round_timeout.is_zero() || self.liveness_timeout.is_zero() {
            return Err("round_timeout and liveness_timeout must be positive".into());
        }
        if let Some(sec) = &self.secure {
            sec.validate(self.min_participants)?;
        }
        Ok(())
    }
}

/// Where a participant stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Online,
    /// Not heard from within the liveness timeout.
    Lost,
    /// Left on its own.
    Left,
}

#[derive(Debug, Clone)]
struct Participant {
    session: String,
    presence: Presence,
    last_seen: Instant,
    num_examples: u64,
    keys: Option<PartyKeys>,
}

/// A participant's public keys for secure aggregation, sent when it joins.
pub type PartyKeys = cohort_crypto::aggregation::PublicKeys;

/// A participant as the registry sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParticipantInfo {
    pub id: ParticipantId,
    pub presence: Presence,
    pub num_examples: u64,
    /// Last sign of life (a poll, heartbeat or upload).
    #[serde(skip)]
    pub last_seen: Instant,
}

/// The work a participant should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    Train {
        round: u64,
        model_version: u64,
        config: TrainConfig,
        deadline: Instant,
        /// The secure round to encrypt for; `None` in plaintext jobs.
        secure: Option<Arc<RoundInfo>>,
    },
    /// A committee member's part of decryption.
    Decrypt(DecryptRequest),
    Evaluate {
        round: u64,
        model_version: u64,
        deadline: Instant,
    },
    /// Nothing to do; poll again.
    Idle,
    /// The job is over.
    Finished,
}

/// What a committee member is asked to decrypt.
#[derive(Debug, Clone, PartialEq)]
pub struct DecryptRequest {
    pub info: Arc<RoundInfo>,
    pub manifest_digest: [u8; 32],
    pub manifest_participants: usize,
    /// The coordinator's signature over the manifest digest.
    pub manifest_signature: [u8; 64],
    pub coordinator_key: VerifyKey,
    pub pieces: Vec<usize>,
    /// Increases with each reassignment to this member.
    pub request: u32,
    pub deadline: Instant,
}

/// A securely aggregated update after transfer: ciphertext bodies and sealed key pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureUpdate {
    pub round: u64,
    pub weight: u64,
    pub bodies: Vec<u64>,
    /// SHA-256 of the bodies' little-endian bytes, computed by the driver as they arrived.
    pub bodies_sha256: [u8; 32],
    pub pieces: Vec<SealedPiece>,
    pub signature: [u8; 64],
    pub train: Option<Metrics>,
}

/// A committee member's answer after transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareAnswer {
    pub round: u64,
    pub attempt: u32,
    pub request: u32,
    pub pieces: Vec<usize>,
    /// The share, or why the member refused.
    pub share: Result<SignedShare, String>,
}

/// A decryption share as received.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedShare {
    pub values: Vec<u64>,
    /// SHA-256 of the values' little-endian bytes, computed by the driver as they arrived.
    pub sha256: [u8; 32],
    /// The member's signature over the manifest, its id and `sha256`.
    pub signature: [u8; 64],
}

/// An update after transfer: the local model minus the global model it started from.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub round: u64,
    pub delta: Vec<f32>,
    /// Aggregation weight: examples trained on.
    pub num_examples: u64,
    pub train: Option<Metrics>,
}

/// Why an input was refused. Each maps to one gRPC status code at the service edge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("unknown participant {0:?}")]
    UnknownParticipant(String),
    #[error("participant {0:?} is not allowed to join this federation")]
    NotAllowed(String),
    #[error("round {round} is not open (current round {current}, {phase})")]
    RoundClosed {
        round: u64,
        current: u64,
        phase: &'static str,
    },
    #[error("participant {0:?} was not selected for round {1}")]
    NotSelected(String, u64),
    #[error("participant {0:?} already submitted for round {1}")]
    Duplicate(String, u64),
    #[error("update has {got} parameters, the model has {expected}")]
    ParameterCount { expected: usize, got: usize },
    #[error("update is invalid: {0}")]
    Invalid(String),
}

/// Why a round attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// Fewer than `min_updates` updates arrived before the deadline.
    TooFewUpdates { received: usize, needed: usize },
    /// Fewer than the threshold of committee members answered, so nothing was decrypted.
    CommitteeUnavailable { answered: usize, needed: usize },
    /// The decrypted sum did not decode (shares that do not belong together).
    Undecodable { reason: String },
}

/// One completed round.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    /// Attempts it took (1 when it succeeded the first time).
    pub attempts: u32,
    /// Participants whose updates were aggregated.
    pub participants: Vec<ParticipantId>,
    /// Selected participants that missed the deadline.
    pub stragglers: Vec<ParticipantId>,
    /// Sum of the aggregation weights.
    pub total_examples: u64,
    /// Example-weighted mean of the participants' training metrics.
    pub train: Option<Metrics>,
    /// Example-weighted mean of the federated evaluation of the new model.
    pub eval: Option<Metrics>,
    /// Participants that evaluated it.
    pub evaluated_by: usize,
    pub seconds: f64,
}

/// What happened, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ParticipantJoined {
        id: ParticipantId,
        rejoined: bool,
    },
    ParticipantLost {
        id: ParticipantId,
    },
    ParticipantLeft {
        id: ParticipantId,
    },
    RoundStarted {
        round: u64,
        attempt: u32,
        selected: Vec<ParticipantId>,
    },
    UpdateAccepted {
        round: u64,
        id: ParticipantId,
    },
    /// Training closed on a securely aggregated round; the committee is asked to decrypt
    /// the sum over `participants`.
    DecryptionStarted {
        round: u64,
        attempt: u32,
        participants: usize,
        committee: Vec<ParticipantId>,
    },
    /// A committee member did not answer in time or refused; its pieces went to others.
    MemberFailed {
        round: u64,
        id: ParticipantId,
        reason: String,
    },
    /// Selected participants whose update did not arrive by the deadline.
    StragglersDropped {
        round: u64,
        ids: Vec<ParticipantId>,
    },
    RoundFailed {
        round: u64,
        attempt: u32,
        cause: FailureCause,
    },
    /// Round complete; `params` is the new global model, version `round`, and
    /// `strategy_state` the strategy's server state after it (to persist with it). The
    /// machine starts nothing more until the driver reports the round durably committed
    /// ([`Orchestrator::committed`]) or its commit failed ([`Orchestrator::commit_failed`]).
    RoundCompleted {
        summary: RoundSummary,
        params: Arc<Vec<f32>>,
        strategy_state: Option<Vec<u8>>,
    },
    JobFinished {
        rounds: u64,
    },
    /// Committing round `round` failed (storage full, unreachable, refusing): the job waits,
    /// holding the round, until a commit succeeds.
    CommitFailed {
        round: u64,
        reason: String,
    },
    /// Round `round` was committed after earlier commits of it had failed; the job goes on.
    CommitRecovered {
        round: u64,
    },
    /// An operator paused (`true`) or resumed the job.
    Paused(bool),
    /// An operator cancelled the job; the round under way, if any, was abandoned.
    JobCancelled {
        round: u64,
    },
}

#[derive(Debug)]
struct Training {
    round: u64,
    attempt: u32,
    selected: BTreeSet<ParticipantId>,
    received: BTreeSet<ParticipantId>,
    deadline: Instant,
    started: Instant,
    /// Σ w_i · Δ_i, in f64 so the order of arrival does not change the sum measurably
    /// (plaintext jobs; empty in secure ones).
    acc: Vec<f64>,
    weight: u64,
    train_metrics: Vec<Metrics>,
    /// The encrypted sum and what the committee will need (secure jobs).
    secure: Option<Box<secure::SecureTraining>>,
}

#[derive(Debug)]
struct Evaluating {
    summary: RoundSummary,
    selected: BTreeSet<ParticipantId>,
    received: BTreeMap<ParticipantId, Metrics>,
    deadline: Instant,
    started: Instant,
    params: Arc<Vec<f32>>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for enough participants to start round `round`.
    Waiting {
        round: u64,
        attempt: u32,
    },
    Training(Training),
    /// Secure jobs: the committee decrypts the sum.
    Decrypting(Box<secure::Decrypting>),
    Evaluating(Evaluating),
    /// Round `round` is complete and waits to be durably committed; `failure` holds why the
    /// last commit failed, if one did.
    Committing {
        round: u64,
        failure: Option<String>,
    },
    Finished,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Waiting { .. } => "waiting for participants",
            Phase::Training(_) => "training",
            Phase::Decrypting(_) => "decrypting",
            Phase::Evaluating(_) => "evaluating",
            Phase::Committing { failure: None, .. } => "committing",
            Phase::Committing {
                failure: Some(_), ..
            } => "paused: storage failure",
            Phase::Finished => "finished",
        }
    }
}

/// A job's round orchestration. See the module documentation for the contract.
pub struct Orchestrator {
    config: JobConfig,
    strategy: Box<dyn Strategy>,
    /// Ids allowed to join; `None` admits anyone (development only).
    allowed: Option<BTreeSet<ParticipantId>>,
    participants: BTreeMap<ParticipantId, Participant>,
    sessions: BTreeMap<String, ParticipantId>,
    phase: Phase,
    global: Arc<Vec<f32>>,
    version: u64,
    completed: Vec<RoundSummary>,
    events: VecDeque<Event>,
    /// Round seeds: a CSPRNG seeded from the operating system.
    entropy: ChaCha20Rng,
    /// Signs manifests.
    signer: cohort_crypto::Signer25519,
    /// No new round starts while paused (an operator's choice).
    paused: bool,
    /// Set when an operator cancelled the job.
    cancelled: bool,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("job", &self.config.job_id)
            .field("phase", &self.phase.name())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// A job starting from the seeded initial model of `config.model`.
    ///
    /// `entropy` seeds the machine's own randomness (round seeds of secure aggregation, its
    /// signing key): the driver draws it from the operating system, tests pass a constant.
    /// The machine reads no other source of randomness, and no clock.
    pub fn new(
        config: JobConfig,
        strategy: Box<dyn Strategy>,
        allowed: Option<BTreeSet<ParticipantId>>,
        entropy: [u8; 32],
    ) -> Result<Self, String> {
        config.validate()?;
        let global = Arc::new(config.model.initial_parameters(config.seed));
        let mut entropy = ChaCha20Rng::from_seed(entropy);
        let signer = cohort_crypto::Signer25519::generate(&mut entropy);
        Ok(Orchestrator {
            entropy,
            signer,
            config,
            strategy,
            allowed,
            participants: BTreeMap::new(),
            sessions: BTreeMap::new(),
            phase: Phase::Waiting {
                round: 1,
                attempt: 1,
            },
            global,
            version: 0,
            completed: Vec::new(),
            events: VecDeque::new(),
            paused: false,
            cancelled: false,
        })
    }

    /// A job resumed after a restart: `history` holds its completed rounds (oldest first,
    /// numbered from 1 without gaps), `global` the model version of the last one. The next
    /// round starts as attempt `attempt`, so nothing about the interrupted attempt is reused
    /// (its round seed in particular: the driver passes fresh `entropy` at every start).
    pub fn resume(
        config: JobConfig,
        strategy: Box<dyn Strategy>,
        allowed: Option<BTreeSet<ParticipantId>>,
        history: Vec<RoundSummary>,
        global: Vec<f32>,
        attempt: u32,
        entropy: [u8; 32],
    ) -> Result<Self, String> {
        let mut o = Orchestrator::new(config, strategy, allowed, entropy)?;
        if global.len() != o.global.len() {
            return Err(format!(
                "the last model version has {} parameters, the job's model {}",
                global.len(),
                o.global.len()
            ));
        }
        for (i, s) in history.iter().enumerate() {
            if s.round != i as u64 + 1 {
                return Err(format!(
                    "completed rounds are not contiguous: round {} where {} was expected",
                    s.round,
                    i + 1
                ));
            }
        }
        let done = history.len() as u64;
        if done > o.config.rounds {
            return Err(format!(
                "{done} rounds completed, but the job has only {}",
                o.config.rounds
            ));
        }
        o.global = Arc::new(global);
        o.version = done;
        o.completed = history;
        o.phase = if done == o.config.rounds {
            Phase::Finished
        } else {
            Phase::Waiting {
                round: done + 1,
                attempt: attempt.max(1),
            }
        };
        Ok(o)
    }

    /// Pauses (no new round starts; a round under way completes) or resumes.
    pub fn set_paused(&mut self, paused: bool, now: Instant) {
        if self.paused == paused || self.is_finished() {
            return;
        }
        self.paused = paused;
        self.events.push_back(Event::Paused(paused));
        self.advance(now);
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether an operator cancelled the job.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// Stops the job for good; a round under way is abandoned (nothing of it is kept).
    pub fn cancel(&mut self) {
        if self.is_finished() {
            return;
        }
        let round = self.current_round();
        self.phase = Phase::Finished;
        self.cancelled = true;
        self.events.push_back(Event::JobCancelled { round });
    }

    /// The strategy's server state to persist with the current model version.
    pub fn strategy_state(&self) -> Option<Vec<u8>> {
        self.strategy.save_state()
    }

    /// Restores the strategy's state saved with the version a job resumes from.
    pub fn restore_strategy_state(&mut self, state: &[u8]) -> Result<(), String> {
        self.strategy.restore_state(state)
    }

    // ----- getters -----

    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    /// Name of the aggregation strategy (recorded in each model version's manifest).
    pub fn strategy_name(&self) -> &'static str {
        self.strategy.name()
    }

    /// The current global model and its version (0 = initial, r = after round r).
    pub fn global(&self) -> (u64, Arc<Vec<f32>>) {
        (self.version, self.global.clone())
    }

    /// Completed rounds, oldest first.
    pub fn history(&self) -> &[RoundSummary] {
        &self.completed
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Name of the current phase, for status displays.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Waiting { .. } if self.paused => "paused",
            Phase::Finished if self.cancelled => "cancelled",
            _ => self.phase.name(),
        }
    }

    /// The participant holding `session`, if the session is current.
    pub fn participant_for_session(&self, session: &str) -> Option<&ParticipantId> {
        self.sessions.get(session)
    }

    pub fn participants(&self) -> Vec<ParticipantInfo> {
        self.participants
            .iter()
            .map(|(id, p)| ParticipantInfo {
                id: id.clone(),
                presence: p.presence,
                num_examples: p.num_examples,
                last_seen: p.last_seen,
            })
            .collect()
    }

    /// Round number a new update must carry, if training is under way.
    pub fn training_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Training(t) => Some(t.round),
            _ => None,
        }
    }

    // ----- inputs -----

    /// A participant joins (or rejoins) with a fresh `session` chosen by the driver. A rejoin
    /// replaces the old session; a participant selected for the open round keeps its place.
    pub fn handle_join(
        &mut self,
        id: &str,
        session: String,
        num_examples: u64,
        now: Instant,
    ) -> Result<(), Rejection> {
        self.handle_join_with_keys(id, session, num_examples, None, now)
    }

    /// [`Self::handle_join`] with the participant's secure-aggregation keys, which a secure
    /// job requires.
    pub fn handle_join_with_keys(
        &mut self,
        id: &str,
        session: String,
        num_examples: u64,
        keys: Option<PartyKeys>,
        now: Instant,
    ) -> Result<(), Rejection> {
        if id.is_empty() {
            return Err(Rejection::Invalid("participant id is empty".into()));
        }
        if self.config.secure.is_some() && keys.is_none() {
            return Err(Rejection::Invalid(
                "this job aggregates securely: join with seal and verify keys".into(),
            ));
        }
        if let Some(allowed) = &self.allowed
            && !allowed.contains(id)
            && !self.is_custodian(id)
        {
            return Err(Rejection::NotAllowed(id.to_string()));
        }
        let rejoined = if let Some(old) = self.participants.get(id) {
            self.sessions.remove(&old.session);
            true
        } else {
            false
        };
        self.sessions.insert(session.clone(), id.to_string());
        self.participants.insert(
            id.to_string(),
            Participant {
                session,
                presence: Presence::Online,
                last_seen: now,
                num_examples,
                keys,
            },
        );
        self.events.push_back(Event::ParticipantJoined {
            id: id.to_string(),
            rejoined,
        });
        self.advance(now);
        Ok(())
    }

    /// Any sign of life (a poll or heartbeat) from a participant.
    pub fn handle_heartbeat(&mut self, id: &str, now: Instant) -> Result<(), Rejection> {
        let p = self
            .participants
            .get_mut(id)
            .filter(|p| p.presence != Presence::Left)
            .ok_or_else(|| Rejection::UnknownParticipant(id.to_string()))?;
        p.last_seen = now;
        if p.presence == Presence::Lost {
            p.presence = Presence::Online;
            self.events.push_back(Event::ParticipantJoined {
                id: id.to_string(),
                rejoined: true,
            });
            self.advance(now);
        }
        Ok(())
    }

    /// A participant leaves; its session ends. Its pending work in the open round, if any,
    /// will count as missing at the deadline.
    pub fn handle_leave(&mut self, id: &str, now: Instant) -> Result<(), Rejection> {
        let p = self
            .participants
            .get_mut(id)
            .ok_or_else(|| Rejection::UnknownParticipant(id.to_string()))?;
        p.presence = Presence::Left;
        let session = p.session.clone();
        self.sessions.remove(&session);
        self.events
            .push_back(Event::ParticipantLeft { id: id.to_string() });
        self.advance(now);
        Ok(())
    }

    /// Checks that `id` may send an update for `round` now: it is known, selected, and has
    /// not sent one yet.
    fn check_open(&self, id: &str, round: u64) -> Result<&Training, Rejection> {
        if !self.participants.contains_key(id) {
            return Err(Rejection::UnknownParticipant(id.to_string()));
        }
        let t = match &self.phase {
            Phase::Training(t) if t.round == round => t,
            _ => {
                return Err(Rejection::RoundClosed {
                    round,
                    current: self.current_round(),
                    phase: self.phase.name(),
                });
            }
        };
        if !t.selected.contains(id) {
            return Err(Rejection::NotSelected(id.to_string(), round));
        }
        if t.received.contains(id) {
            return Err(Rejection::Duplicate(id.to_string(), round));
        }
        Ok(t)
    }

    /// Checks that `id` may send a plaintext update of `num_parameters` for `round` now,
    /// before the driver receives its data. [`Self::handle_update`] checks again.
    pub fn check_update(
        &self,
        id: &str,
        round: u64,
        num_parameters: usize,
    ) -> Result<(), Rejection> {
        let t = self.check_open(id, round)?;
        if t.secure.is_some() {
            return Err(Rejection::Invalid(
                "this round is securely aggregated: send encrypted bodies, not plaintext".into(),
            ));
        }
        if num_parameters != self.global.len() {
            return Err(Rejection::ParameterCount {
                expected: self.global.len(),
                got: num_parameters,
            });
        }
        Ok(())
    }

    /// A complete update arrives. It is folded into the round's running sum at once; when
    /// every selected participant has sent one, the round aggregates without waiting for the
    /// deadline.
    pub fn handle_update(
        &mut self,
        id: &str,
        update: Update,
        now: Instant,
    ) -> Result<(), Rejection> {
        self.check_update(id, update.round, update.delta.len())?;
        if update.num_examples == 0 {
            return Err(Rejection::Invalid("num_examples is 0".into()));
        }
        if let Some(i) = update.delta.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::Invalid(format!("parameter {i} is not finite")));
        }
        let Phase::Training(t) = &mut self.phase else {
            unreachable!("check_update ensured training");
        };
        let w = update.num_examples as f64;
        for (a, d) in t.acc.iter_mut().zip(&update.delta) {
            *a += w * *d as f64;
        }
        t.weight += update.num_examples;
        self.accepted(id, update.round, update.train, now);
        Ok(())
    }

    /// Records an update already folded into the sum; closes training when every selected
    /// participant has sent one.
    fn accepted(&mut self, id: &str, round: u64, train: Option<Metrics>, now: Instant) {
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen = now;
        }
        let Phase::Training(t) = &mut self.phase else {
            unreachable!("called while training");
        };
        t.received.insert(id.to_string());
        t.train_metrics.extend(train);
        self.events.push_back(Event::UpdateAccepted {
            round,
            id: id.to_string(),
        });
        if t.received.len() == t.selected.len() {
            self.close_training(now);
        }
    }

    /// A participant's evaluation of the model of `round`.
    pub fn handle_evaluation(
        &mut self,
        id: &str,
        round: u64,
        metrics: Metrics,
        now: Instant,
    ) -> Result<(), Rejection> {
        if !self.participants.contains_key(id) {
            return Err(Rejection::UnknownParticipant(id.to_string()));
        }
        let current = self.current_round();
        let phase = self.phase.name();
        let Phase::Evaluating(e) = &mut self.phase else {
            return Err(Rejection::RoundClosed {
                round,
                current,
                phase,
            });
        };
        if e.summary.round != round {
            return Err(Rejection::RoundClosed {
                round,
                current,
                phase,
            });
        }
        if !e.selected.contains(id) {
            return Err(Rejection::NotSelected(id.to_string(), round));
        }
        if e.received.contains_key(id) {
            return Err(Rejection::Duplicate(id.to_string(), round));
        }
        e.received.insert(id.to_string(), metrics);
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen = now;
        }
        if e.received.len() == e.selected.len() {
            self.close_evaluation(now);
        }
        Ok(())
    }

    /// Time has come: marks silent participants lost, closes phases whose deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let liveness = self.config.liveness_timeout;
        for (id, p) in self.participants.iter_mut() {
            if p.presence == Presence::Online && now.duration_since(p.last_seen) >= liveness {
                p.presence = Presence::Lost;
                self.events
                    .push_back(Event::ParticipantLost { id: id.clone() });
            }
        }
        match &self.phase {
            Phase::Training(t) if now >= t.deadline => self.close_training(now),
            Phase::Decrypting(d) if now >= d.deadline => self.decrypt_deadline(now),
            Phase::Evaluating(e) if now >= e.deadline => self.close_evaluation(now),
            _ => {}
        }
        self.advance(now);
    }

    // ----- outputs -----

    /// Whether [`Self::poll_event`] has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next thing that happened, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Training(t) => Some(t.deadline),
            Phase::Decrypting(d) => Some(d.deadline),
            Phase::Evaluating(e) => Some(e.deadline),
            _ => None,
        };
        let liveness = self
            .participants
            .values()
            .filter(|p| p.presence == Presence::Online)
            .map(|p| p.last_seen + self.config.liveness_timeout)
            .min();
        [phase, liveness].into_iter().flatten().min()
    }

    /// What participant `id` should do now.
    pub fn task_for(&self, id: &str) -> Task {
        match &self.phase {
            Phase::Finished => Task::Finished,
            Phase::Training(t) if t.selected.contains(id) && !t.received.contains(id) => {
                let mut config = self.config.train.clone();
                config.seed = participant_seed(self.config.train.seed, t.round, t.attempt, id);
                Task::Train {
                    round: t.round,
                    model_version: self.version,
                    config,
                    deadline: t.deadline,
                    secure: t.secure.as_ref().map(|s| s.info.clone()),
                }
            }
            Phase::Decrypting(d) => self.decrypt_task_for(d, id),
            Phase::Evaluating(e) if e.selected.contains(id) && !e.received.contains_key(id) => {
                Task::Evaluate {
                    round: e.summary.round,
                    model_version: self.version,
                    deadline: e.deadline,
                }
            }
            _ => Task::Idle,
        }
    }

    // ----- internals -----

    fn current_round(&self) -> u64 {
        match &self.phase {
            Phase::Waiting { round, .. } => *round,
            Phase::Training(t) => t.round,
            Phase::Decrypting(d) => d.round,
            Phase::Evaluating(e) => e.summary.round,
            Phase::Committing { round, .. } => *round,
            Phase::Finished => self.config.rounds,
        }
    }

    fn is_custodian(&self, id: &str) -> bool {
        self.config
            .secure
            .as_ref()
            .is_some_and(|s| s.is_custodian(id))
    }

    fn online_with_keys(&self, id: &str) -> bool {
        self.participants
            .get(id)
            .is_some_and(|p| p.presence == Presence::Online && p.keys.is_some())
    }

    /// Updates a round needs: `min_updates`, and at least T_min in secure jobs.
    fn needed_updates(&self) -> usize {
        let t_min = self.config.secure.as_ref().map_or(0, |s| s.t_min);
        self.config.min_updates.max(t_min)
    }

    fn online(&self) -> Vec<ParticipantId> {
        self.participants
            .iter()
            .filter(|(_, p)| p.presence == Presence::Online)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Starts a round when waiting and enough participants are online.
    fn advance(&mut self, now: Instant) {
        let Phase::Waiting { round, attempt } = self.phase else {
            return;
        };
        if self.paused {
            return;
        }
        let mut online: Vec<ParticipantId> = self
            .online()
            .into_iter()
            .filter(|id| !self.is_custodian(id))
            .collect();
        if online.len() < self.config.min_participants {
            return;
        }
        if let Some(sec) = &self.config.secure
            && !sec.custodians.is_empty()
        {
            let ready = sec
                .custodians
                .iter()
                .filter(|c| self.online_with_keys(c))
                .count();
            if ready < sec.threshold_for(ready) {
                return; // not enough custodians to ever decrypt
            }
        }
        // A `fraction` of those online, but never fewer than a round needs to aggregate.
        let mut want = ((online.len() as f64 * self.config.fraction).ceil() as usize)
            .max(self.needed_updates())
            .min(online.len());
        if let Some(sec) = &self.config.secure {
            // Every participant's weight is at least 1.
            want = want.min(sec.codec.max_total_weight as usize);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(selection_seed(self.config.seed, round, attempt));
        online.shuffle(&mut rng);
        online.truncate(want);
        let secure = self
            .config
            .secure
            .is_some()
            .then(|| self.secure_training(round, attempt, &online));
        let selected: BTreeSet<ParticipantId> = online.into_iter().collect();
        self.events.push_back(Event::RoundStarted {
            round,
            attempt,
            selected: selected.iter().cloned().collect(),
        });
        self.phase = Phase::Training(Training {
            round,
            attempt,
            selected,
            received: BTreeSet::new(),
            deadline: now + self.config.round_timeout,
            started: now,
            acc: if secure.is_some() {
                Vec::new()
            } else {
                vec![0.0; self.global.len()]
            },
            weight: 0,
            train_metrics: Vec::new(),
            secure,
        });
    }

    fn close_training(&mut self, now: Instant) {
        let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        let stragglers: Vec<ParticipantId> = t.selected.difference(&t.received).cloned().collect();
        if !stragglers.is_empty() {
            self.events.push_back(Event::StragglersDropped {
                round: t.round,
                ids: stragglers.clone(),
            });
        }
        let needed = self.needed_updates();
        if t.received.len() < needed {
            let cause = FailureCause::TooFewUpdates {
                received: t.received.len(),
                needed,
            };
            self.fail_attempt(t.round, t.attempt, cause, now);
            return;
        }
        if t.secure.is_some() {
            self.start_decryption(t, stragglers, now);
            return;
        }
        let w = t.weight as f64;
        let mean: Vec<f32> = t.acc.iter().map(|a| (a / w) as f32).collect();
        let summary = RoundSummary {
            round: t.round,
            attempts: t.attempt,
            participants: t.received.iter().cloned().collect(),
            stragglers,
            total_examples: t.weight,
            train: Metrics::weighted_mean(&t.train_metrics),
            eval: None,
            evaluated_by: 0,
            seconds: 0.0,
        };
        self.apply_mean(summary, &mean, t.started, now);
    }

    /// Applies the strategy to the mean update: new global version, then evaluation.
    fn apply_mean(
        &mut self,
        mut summary: RoundSummary,
        mean: &[f32],
        started: Instant,
        now: Instant,
    ) {
        let new_global = self.strategy.apply(&self.global, mean, summary.round);
        self.global = Arc::new(new_global);
        self.version = summary.round;
        summary.seconds = now.duration_since(started).as_secs_f64();
        let evaluators: BTreeSet<ParticipantId> = self
            .online()
            .into_iter()
            .filter(|id| !self.is_custodian(id))
            .collect();
        if !self.config.evaluate || evaluators.is_empty() {
            self.complete(summary, self.global.clone());
            return;
        }
        self.phase = Phase::Evaluating(Evaluating {
            summary,
            selected: evaluators,
            received: BTreeMap::new(),
            deadline: now + self.config.eval_timeout,
            started,
            params: self.global.clone(),
        });
    }

    /// A failed attempt: the round is tried again with whoever is available.
    fn fail_attempt(&mut self, round: u64, attempt: u32, cause: FailureCause, now: Instant) {
        self.events.push_back(Event::RoundFailed {
            round,
            attempt,
            cause,
        });
        self.phase = Phase::Waiting {
            round,
            attempt: attempt + 1,
        };
        self.advance(now);
    }

    fn close_evaluation(&mut self, now: Instant) {
        let Phase::Evaluating(e) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        let mut summary = e.summary;
        let metrics: Vec<Metrics> = e.received.values().copied().collect();
        summary.eval = Metrics::weighted_mean(&metrics);
        summary.evaluated_by = metrics.len();
        summary.seconds = now.duration_since(e.started).as_secs_f64();
        self.complete(summary, e.params);
    }

    fn complete(&mut self, summary: RoundSummary, params: Arc<Vec<f32>>) {
        let round = summary.round;
        self.completed.push(summary.clone());
        self.events.push_back(Event::RoundCompleted {
            summary,
            params,
            strategy_state: self.strategy.save_state(),
        });
        self.phase = Phase::Committing {
            round,
            failure: None,
        };
    }

    /// The round whose commit the machine waits for, if any.
    pub fn awaiting_commit(&self) -> Option<u64> {
        match self.phase {
            Phase::Committing { round, .. } => Some(round),
            _ => None,
        }
    }

    /// Why the last commit of the waiting round failed, if it did.
    pub fn commit_failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Committing { failure, .. } => failure.as_deref(),
            _ => None,
        }
    }

    /// Committing round `round` failed: the job holds the round and starts nothing until a
    /// later commit of it succeeds. Ignored unless the machine waits for that round.
    pub fn commit_failed(&mut self, round: u64, reason: String) {
        if let Phase::Committing {
            round: waiting,
            failure,
        } = &mut self.phase
            && *waiting == round
        {
            if failure.as_deref() != Some(reason.as_str()) {
                self.events.push_back(Event::CommitFailed {
                    round,
                    reason: reason.clone(),
                });
            }
            *failure = Some(reason);
        }
    }

    /// Round `round` is durably committed: the next round may start (or the job finishes).
    /// Ignored unless the machine waits for that round.
    pub fn committed(&mut self, round: u64, now: Instant) {
        let Phase::Committing {
            round: waiting,
            failure,
        } = &self.phase
        else {
            return;
        };
        if *waiting != round {
            return;
        }
        if failure.is_some() {
            self.events.push_back(Event::CommitRecovered { round });
        }
        if round >= self.config.rounds {
            self.phase = Phase::Finished;
            self.events.push_back(Event::JobFinished { rounds: round });
        } else {
            self.phase = Phase::Waiting {
                round: round + 1,
                attempt: 1,
            };
            self.advance(now);
        }
    }
}

/// Seed of a participant's local shuffling in one round attempt.
pub fn participant_seed(base: u64, round: u64, attempt: u32, id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a over the id, mixed with the rest.
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    splitmix(base ^ splitmix(round.wrapping_mul(1_000_003) ^ attempt as u64) ^ h)
}

fn selection_seed(base: u64, round: u64, attempt: u32) -> u64 {
    splitmix(base.wrapping_add(0x005e_1ec7) ^ splitmix(round << 16 | attempt as u64))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

mod secure;

#[cfg(test)]
mod tests;
