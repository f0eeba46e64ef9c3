//! The state machine's inputs and outputs as domain types: tasks, updates, shares and
//! evaluations as received, refusals ([`Rejection`], mapped to gRPC codes at the service
//! edge), and the [`Event`]s it reports.

use std::sync::Arc;
use std::time::Instant;

use cohort_crypto::VerifyKey;
use cohort_crypto::aggregation::{RoundInfo, SealedPiece};
use cohort_model::{Metrics, TrainConfig};
use serde::Serialize;

use super::ParticipantId;

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
        /// Scale the update down to this L2 norm before sending it.
        clip_norm: Option<f64>,
        /// Clip each layer to its share of `clip_norm` instead of the update as a whole.
        clip_per_layer: bool,
        /// Distributed differential privacy: add discrete Gaussian noise of this standard
        /// deviation (in the update's units) to each encoded value before encrypting it.
        noise_stddev: Option<f64>,
        /// Adaptive clipping: append this value when the update was within `clip_norm`
        /// (before clipping it), 0 otherwise.
        clip_indicator: Option<f64>,
        /// SCAFFOLD: the server's control variate. Correct local gradients by it minus the
        /// participant's own, and append the own one's change to the update.
        control: Option<Arc<Vec<f32>>>,
    },
    /// Round 0 of a job with tables: send the training table's statistics
    /// (`TableStats::to_values`, split by the job's `DigitCodec::for_statistics`), weight 1,
    /// encrypted for `secure` in secure jobs.
    Statistics {
        attempt: u32,
        deadline: Instant,
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

/// Many participants' updates summed elsewhere and sent as one: a hierarchical aggregator
/// (a simulation worker that owns a shard of virtual participants) folds its participants'
/// updates into one partial sum and sends it with each participant's signed record. Folding
/// it is what folding each update would have done: exactly so in secure rounds (addition
/// mod 2^64) and emulated ones (exact multiples of 2^-f); in plaintext rounds up to the
/// rounding of the f64 sum's grouping.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialSum {
    pub round: u64,
    /// Every participant in the sum, in the order it was folded.
    pub contributions: Vec<Contribution>,
    pub values: PartialValues,
}

/// What a [`PartialSum`] adds up.
#[derive(Debug, Clone, PartialEq)]
pub enum PartialValues {
    /// Plaintext rounds: Σ w_i · Δ_i over the contributions, w_i their examples.
    Plain(Vec<f64>),
    /// Secure rounds: Σ w_i · bodies_i mod 2^64, w_i their declared weights.
    Secure(Vec<u64>),
}

/// One participant's part of a [`PartialSum`]: its weight and metrics, and in secure rounds
/// its signed upload record (bodies digest, sealed key pieces, signature) without the bodies.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub id: ParticipantId,
    pub weight: u64,
    pub train: Option<Metrics>,
    pub secure: Option<SecureRecord>,
}

/// The signed part of a secure upload that travels with a partial sum.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureRecord {
    pub bodies_sha256: [u8; 32],
    pub pieces: Vec<SealedPiece>,
    pub signature: [u8; 64],
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

pub use cohort_storage::RoundSummary;

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
    /// ([`super::Orchestrator::committed`]) or its commit failed
    /// ([`super::Orchestrator::commit_failed`]).
    RoundCompleted {
        summary: RoundSummary,
        params: Arc<Vec<f32>>,
        strategy_state: Option<Vec<u8>>,
        /// Jobs with tables: the pipeline that prepares rows for the version (stored with it).
        pipeline: Option<Arc<cohort_model::tabular::Pipeline>>,
    },
    JobFinished {
        rounds: u64,
    },
    /// A job with a privacy budget stops before round `round`: it would take ε from
    /// `epsilon` to `next`, past `target`. `JobFinished` follows.
    PrivacyBudgetSpent {
        round: u64,
        epsilon: f64,
        next: f64,
        target: f64,
    },
    /// Round 0 is done: the federation's statistics and the pipeline fitted from them. The
    /// machine waits for the driver to commit round 0 (storing them) before round 1.
    StatisticsCompleted {
        attempts: u32,
        participants: Vec<ParticipantId>,
        stragglers: Vec<ParticipantId>,
        seconds: f64,
        statistics: super::FederationStatistics,
    },
    /// The job stopped on its own and will not go on (the text says why).
    JobFailed {
        reason: String,
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
