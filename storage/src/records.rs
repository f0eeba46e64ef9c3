//! The records that the durable state and the model registry both keep: a completed round's
//! summary, a version's manifest, and a reference to a version. Plain data, serialised as JSON
//! so an operator can read them with any tool.

use cohort_model::{Metrics, ModelSpec};
use serde::{Deserialize, Serialize};

/// A participant's id (its certificate identity under mutual TLS).
pub type ParticipantId = String;

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
    /// Jobs with differential privacy: what this round spent, and the job's ε after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<RoundPrivacy>,
    /// Adaptive clipping: the clip norm this round's updates were clipped to, and the share
    /// of them that were within it (from the securely summed indicators, noised under DP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipping: Option<RoundClipping>,
}

/// Adaptive clipping's record of one round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundClipping {
    pub clip_norm: f64,
    pub unclipped_share: f64,
    /// The clip norm the next round uses.
    pub next_clip_norm: f64,
}

/// The privacy accounting of one round of a job with differential privacy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// The round's sampling rate q: participants selected over those available.
    pub sampling_rate: f64,
    /// The Gaussian noise multiplier the round's noise is accounted at (noise standard
    /// deviation over the L2 sensitivity of the sum).
    pub noise_multiplier: f64,
    /// ε of the whole job so far (this round included), at `delta`.
    pub epsilon: f64,
    pub delta: f64,
}

/// The manifest written beside each version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub job_id: String,
    pub version: u64,
    /// Version this one was aggregated from (`None` for the initial model).
    pub parent: Option<u64>,
    pub round: u64,
    pub strategy: String,
    pub model: ModelSpec,
    pub num_parameters: usize,
    /// Hex SHA-256 of the safetensors file.
    pub sha256: String,
    /// Hex SHA-256 of the flat little-endian f32 parameters (as on the wire): the weights'
    /// content address.
    pub params_digest: String,
    pub participants: Vec<String>,
    pub total_examples: u64,
    pub train: Option<Metrics>,
    pub eval: Option<Metrics>,
    pub created_unix_ms: u64,
    /// The object holding the weights (`objects/sha256/<sha256>.safetensors[.enc]`).
    pub weights_file: String,
    /// Jobs with tables: the pipeline (fitted from the federation's statistics) that
    /// prepares raw rows for this version, as training and evaluation prepared them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<cohort_model::tabular::Pipeline>,
    /// Jobs with differential privacy: the (ε, δ) guarantee of this version (every round
    /// that made it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<RoundPrivacy>,
}

/// A model version by job and number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelRef {
    pub job_id: String,
    pub version: u64,
}
