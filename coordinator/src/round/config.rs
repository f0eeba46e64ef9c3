//! What a job does ([`JobConfig`]) and how it aggregates securely ([`SecureSettings`]),
//! checked before a job starts with errors that name the setting ([`JobError`]).

use std::time::Duration;

use cohort_crypto::{Codec, GlweParams};
use cohort_model::{ModelSpec, TrainConfig};

use super::ParticipantId;

/// A job that cannot run as configured, or cannot resume from what was stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// A setting out of range or inconsistent with another; the text names it.
    #[error("{0}")]
    Invalid(String),
    /// The stored history or model version does not fit the job.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// The strategy's stored server state cannot be restored.
    #[error("strategy state: {0}")]
    Strategy(#[from] crate::strategy::StrategyError),
}

fn invalid(message: String) -> JobError {
    JobError::Invalid(message)
}

/// How a round's participants are drawn from the available ones, seeded by the job seed, the
/// round and the attempt. Never fewer than a round needs to aggregate (`min_updates`, and
/// T_min in secure jobs), never more than secure aggregation's total weight allows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    /// ⌈`fraction` × available⌉ of them, uniformly without replacement.
    #[default]
    Fraction,
    /// This many of them (all, when fewer are available), uniformly without replacement.
    Count(usize),
    /// Each independently with probability `fraction`: the round's size varies (the sampling
    /// that privacy accounting of subsampled mechanisms assumes). A draw smaller than a round
    /// needs is topped up from the same seeded order.
    Poisson,
}

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
    /// How the round's participants are drawn.
    pub sampling: Sampling,
    /// Updates needed to aggregate; fewer at the deadline fails the round.
    pub min_updates: usize,
    /// Time allowed for training and upload.
    pub round_timeout: Duration,
    /// Time allowed for federated evaluation.
    pub eval_timeout: Duration,
    /// Evaluate each new global model on participants' held-out data.
    pub evaluate: bool,
    /// Share of the available participants that evaluate each new model (a seeded draw;
    /// cross-device studies evaluate on a sample).
    pub evaluate_fraction: f64,
    /// A participant not heard from for this long is marked lost.
    pub liveness_timeout: Duration,
    /// Seed of the initial model and of participant selection.
    pub seed: u64,
    /// Secure aggregation settings; `None` runs plaintext rounds (research comparisons only:
    /// the coordinator then sees every participant's update).
    pub secure: Option<SecureSettings>,
    /// The participants' tables (`[job.data]`): when given, the job starts with round 0, the
    /// federation's statistics summed like updates, and every site prepares its rows with
    /// the pipeline fitted from them.
    pub data: Option<cohort_model::tabular::DataSpec>,
    /// Each participant scales its update down to this L2 norm before sending it (per-update
    /// norm clipping); `None`: no clipping.
    pub clip_norm: Option<f64>,
    /// Clip each layer to its share of `clip_norm` (`clip_norm · √(n_l / d)`) rather than the
    /// update as a whole.
    pub clip_per_layer: bool,
    /// Differential privacy: every update weighs the same (1), the sum carries Gaussian noise
    /// of `noise_multiplier · clip_norm`, and each round's cost is accounted.
    pub privacy: Option<crate::privacy::PrivacySettings>,
    /// Adaptive clipping: `clip_norm` is where the clip norm starts, and it follows the
    /// target quantile of the update norms from round to round.
    pub adaptive_clipping: Option<crate::privacy::AdaptiveClipping>,
    /// Simulations only: plaintext rounds that emulate secure aggregation's integer
    /// arithmetic with this codec. Distributed noise is then sized as for T_min =
    /// `min_updates` and added by the simulated participants to their plaintext updates:
    /// the same integers the encrypted sum would carry, with no privacy from the coordinator.
    pub emulated_codec: Option<Codec>,
    /// SCAFFOLD: every training task carries the server's control variate, and every update
    /// carries the participant's control variate's change after the model's values (set with
    /// `strategy = "scaffold"`; [`JobConfig::check_strategy`] refuses a mismatch).
    pub control_variates: bool,
}

impl JobConfig {
    /// Refuses a strategy this job cannot run, naming both settings: `fedprox` without a
    /// proximal term in `train` (any other strategy may take one: FedProx's client term
    /// composes with every server rule); robust rules, which need every update in the clear,
    /// which secure aggregation never shows and DP's noise is not sized for.
    pub fn check_strategy(&self, strategy: &dyn crate::Strategy) -> Result<(), JobError> {
        let mu = self.train.proximal_mu;
        if strategy.name() == "fedprox" && (mu.is_nan() || mu <= 0.0) {
            return Err(invalid(
                crate::strategy::StrategyError::ProximalMu(mu).to_string(),
            ));
        }
        let scaffold = strategy.control_variate().is_some();
        if scaffold != self.control_variates {
            return Err(invalid(format!(
                "strategy = \"{}\" and control_variates = {}: control variates travel with \
                 SCAFFOLD's tasks and updates, and only with them",
                strategy.name(),
                self.control_variates
            )));
        }
        if scaffold && self.privacy.is_some() {
            return Err(invalid(
                "strategy = \"scaffold\" with [privacy]: the control variates' changes travel \
                 with the update, unclipped, and the noise is sized for the clipped update alone"
                    .into(),
            ));
        }
        let Some(rule) = strategy.robust_rule() else {
            return Ok(());
        };
        if self.secure.is_some() {
            return Err(invalid(format!(
                "strategy = \"{}\" combines individual updates, and secure aggregation (on: \
                 secure_aggregation.enabled) never shows the coordinator one: turn secure \
                 aggregation off (secure_aggregation.enabled = false; simulate --plaintext) or \
                 choose a strategy that works on the mean",
                rule.name()
            )));
        }
        if self.privacy.is_some() {
            return Err(invalid(format!(
                "strategy = \"{}\" with [privacy]: the noise is sized for a mean of clipped \
                 updates, not for a robust rule's combination",
                rule.name()
            )));
        }
        Ok(())
    }

    /// Whether round `round` sums unweighted contributions (each weight 1): round 0's
    /// statistics, and every round of a job with differential privacy (whose sensitivity is
    /// one participant's clipped update).
    pub fn uniform_weights(&self, round: u64) -> bool {
        round == 0 || self.privacy.is_some()
    }

    /// Adaptive clipping: the value a participant appends for "my update was within the clip
    /// norm" (0 otherwise) at clip norm `clip`. 1 without DP; under DP a share of `clip`
    /// small enough that the indicator costs little of the noise (Andrew et al.'s σ_b of a
    /// twentieth of the round's size), since it widens the sensitivity the noise covers.
    pub fn indicator_scale(&self, clip: f64) -> Option<f64> {
        self.adaptive_clipping?;
        Some(match (&self.privacy, self.noise_codec()) {
            (None, _) => 1.0,
            (Some(p), codec) => {
                let t = codec.map_or(self.min_updates, |(_, t)| t).max(1) as f64;
                clip * (20.0 * p.noise_multiplier / t).min(1.0)
            }
        })
    }

    /// Values a participant sends in a training round: the model's, SCAFFOLD's control
    /// variate's change (as many again), and adaptive clipping's indicator.
    pub fn training_len(&self) -> usize {
        let d = self.model.num_parameters();
        d * (1 + usize::from(self.control_variates)) + usize::from(self.adaptive_clipping.is_some())
    }

    /// The L2 sensitivity of the round's sum at clip norm `clip`: the update's (plus, under
    /// distributed DP, the encoding's rounding) and adaptive clipping's indicator.
    pub fn sensitivity(&self, clip: f64) -> f64 {
        let indicator = self.indicator_scale(clip);
        match (self.privacy.map(|p| p.mechanism), self.noise_codec()) {
            (Some(crate::privacy::Mechanism::Distributed), Some((codec, _))) => {
                cohort_crypto::dp::round_sensitivity(clip, self.training_len(), &codec, indicator)
            }
            _ => clip.hypot(indicator.unwrap_or(0.0)),
        }
    }

    /// Distributed DP: the standard deviation of the discrete Gaussian noise each
    /// participant adds at clip norm `clip`, in the update's units (σ = z · S / √T_min, S the
    /// sensitivity), so that any T_min of them carry the job's noise.
    pub fn participant_noise(&self, clip: f64) -> Option<f64> {
        let p = self.privacy.as_ref()?;
        if p.mechanism != crate::privacy::Mechanism::Distributed {
            return None;
        }
        let (_, t_min) = self.noise_codec()?;
        Some(p.noise_multiplier * self.sensitivity(clip) / (t_min as f64).sqrt())
    }

    /// The largest clip norm adaptive clipping may reach: the codec's per-value bound under
    /// distributed DP (every clipped value must encode unclipped).
    pub fn max_clip_norm(&self) -> Option<f64> {
        match (self.privacy.map(|p| p.mechanism), self.noise_codec()) {
            (Some(crate::privacy::Mechanism::Distributed), Some((codec, _))) => {
                Some(codec.clip as f64)
            }
            _ => None,
        }
    }

    /// The codec distributed noise is encoded with, and the fewest participants whose noise
    /// a decrypted sum carries.
    fn noise_codec(&self) -> Option<(Codec, usize)> {
        match (&self.secure, self.emulated_codec) {
            (Some(sec), _) => Some((sec.codec, sec.t_min)),
            (None, Some(codec)) => Some((codec, self.min_updates)),
            (None, None) => None,
        }
    }

    /// The Gaussian noise multiplier a round at clip norm `clip` is accounted at: the
    /// configured one for central noise; for distributed noise, that of T_min participants'
    /// discrete Gaussians over the sensitivity (Kairouz, Liu and Steinke's bound).
    pub fn accounted_noise_multiplier(&self, clip: f64) -> Option<f64> {
        let p = self.privacy.as_ref()?;
        match (
            p.mechanism,
            self.participant_noise(clip),
            self.noise_codec(),
        ) {
            (crate::privacy::Mechanism::Distributed, Some(sigma), Some((codec, t_min))) => {
                let unit = (1u64 << codec.frac_bits) as f64;
                Some(crate::privacy::distributed_noise_multiplier(
                    sigma * unit,
                    t_min,
                    self.sensitivity(clip) * unit,
                    self.training_len(),
                ))
            }
            _ => Some(p.noise_multiplier),
        }
    }

    fn validate_privacy(&self, p: &crate::privacy::PrivacySettings) -> Result<(), JobError> {
        p.validate().map_err(invalid)?;
        let Some(clip) = self.clip_norm else {
            return Err(invalid(
                "privacy needs clip_norm: the L2 norm every update is clipped to bounds what \
                 one participant can change, and the noise is sized from it"
                    .into(),
            ));
        };
        if self.data.is_some() {
            return Err(invalid(
                "privacy and data: round 0 sums the tables' statistics exactly, and ε would \
                 not cover them; a job with differential privacy has each site prepare its \
                 own rows (leave out [data])"
                    .into(),
            ));
        }
        if p.mechanism == crate::privacy::Mechanism::Central {
            return Ok(());
        }
        let Some((codec, _)) = self.noise_codec() else {
            return Err(invalid(
                "privacy.mechanism = \"distributed\" adds the noise inside secure \
                 aggregation, which this job turns off (secure_aggregation.enabled = false): \
                 use mechanism = \"central\" or turn secure aggregation on"
                    .into(),
            ));
        };
        if clip > codec.clip as f64 {
            return Err(invalid(format!(
                "clip_norm {clip} is above the codec's per-value bound {}: distributed noise \
                 needs every clipped value encoded unclipped",
                codec.clip
            )));
        }
        // Sums of W messages and their noise (20 standard deviations of the total: never
        // reached in practice) must stay inside the plaintext's signed range.
        // Adaptive clipping may take the clip norm up to the codec's bound.
        let widest = if self.adaptive_clipping.is_some() {
            codec.clip as f64
        } else {
            clip
        };
        let sigma =
            self.participant_noise(widest).unwrap_or(0.0) * (1u64 << codec.frac_bits) as f64;
        let w = codec.max_total_weight as f64;
        let bound = w * codec.max_message() as f64 + 20.0 * sigma * w.sqrt();
        let limit = 2f64.powi(63 - codec.delta_log as i32);
        if bound >= limit {
            return Err(invalid(format!(
                "privacy: sums of {w} noised updates can reach {bound:.3e}, not below the \
                 plaintext's 2^{} = {limit:.3e}: lower noise_multiplier or max_total_weight",
                63 - codec.delta_log
            )));
        }
        Ok(())
    }
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
    pub fn validate(&self, min_participants: usize) -> Result<(), JobError> {
        let c = if self.custodians.is_empty() {
            cohort_crypto::Committee::new(self.committee_size, self.committee_size / 2 + 1)
                .map_err(|e| invalid(format!("secure_aggregation.committee_size: {e}")))?
        } else {
            let mut ids: Vec<&String> = self.custodians.iter().collect();
            ids.sort();
            ids.dedup();
            if ids.len() != self.custodians.len() || ids.iter().any(|i| i.is_empty()) {
                return Err(invalid(
                    "secure_aggregation.custodians: ids must be distinct and not empty".into(),
                ));
            }
            let n = self.custodians.len();
            cohort_crypto::Committee::new(n, n / 2 + 1)
                .map_err(|e| invalid(format!("secure_aggregation.custodians: {e}")))?
        };
        if self.t_min == 0 || self.t_min > min_participants {
            return Err(invalid(format!(
                "secure_aggregation.t_min must be between 1 and min_participants ({min_participants}), not {}",
                self.t_min
            )));
        }
        if self.decrypt_timeout.is_zero() {
            return Err(invalid(
                "secure_aggregation.decrypt_timeout must be positive".into(),
            ));
        }
        // The largest committee has the most pieces, hence the most decryption shares.
        self.codec
            .check(&self.params.budget(c.pieces()))
            .map_err(|e| invalid(format!("secure_aggregation: {e}")))
    }
}

impl JobConfig {
    /// Refuses configurations that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), JobError> {
        // The id names the job's model directory and appears in logs and metrics.
        if self.job_id.is_empty()
            || self.job_id.len() > 64
            || self.job_id.starts_with('.')
            || !self
                .job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(format!(
                "job id {:?} must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                self.job_id
            )));
        }
        // The registry's own names at its root.
        if matches!(self.job_id.as_str(), "objects" | "serving.json") {
            return Err(invalid(format!(
                "job id {:?} is reserved by the model registry",
                self.job_id
            )));
        }
        self.model
            .validate()
            .map_err(|e| invalid(format!("model: {e}")))?;
        self.train
            .validate()
            .map_err(|e| invalid(format!("train: {e}")))?;
        if self.rounds == 0 {
            return Err(invalid("rounds must be at least 1".into()));
        }
        if self.min_participants == 0 {
            return Err(invalid("min_participants must be at least 1".into()));
        }
        if self.sampling == Sampling::Count(0) {
            return Err(invalid("clients_per_round must be at least 1".into()));
        }
        if !(self.evaluate_fraction > 0.0 && self.evaluate_fraction <= 1.0) {
            return Err(JobError::Invalid(format!(
                "evaluate_fraction must be in (0, 1], not {}",
                self.evaluate_fraction
            )));
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(invalid(format!(
                "fraction must be in (0, 1], not {}",
                self.fraction
            )));
        }
        if self.min_updates == 0 || self.min_updates > self.min_participants {
            return Err(invalid(format!(
                "min_updates must be between 1 and min_participants ({}), not {}",
                self.min_participants, self.min_updates
            )));
        }
        if self.round_timeout.is_zero() || self.liveness_timeout.is_zero() {
            return Err(invalid(
                "round_timeout and liveness_timeout must be positive".into(),
            ));
        }
        if let Some(sec) = &self.secure {
            sec.validate(self.min_participants)?;
        }
        if let Some(c) = self.clip_norm
            && !(c > 0.0 && c.is_finite())
        {
            return Err(invalid(format!(
                "clip_norm must be a positive number, not {c}"
            )));
        }
        if self.clip_per_layer && self.clip_norm.is_none() {
            return Err(invalid(
                "clip_per_layer needs clip_norm, the bound the layers share".into(),
            ));
        }
        if let Some(p) = &self.privacy {
            self.validate_privacy(p)?;
        }
        if let Some(a) = &self.adaptive_clipping {
            a.validate().map_err(invalid)?;
            if self.clip_norm.is_none() {
                return Err(invalid(
                    "adaptive_clipping needs clip_norm, the clip norm of the first round".into(),
                ));
            }
        }
        if let Some(data) = &self.data {
            data.validate().map_err(|e| invalid(format!("data: {e}")))?;
            let width = data.width();
            if self.model.input_shape() != cohort_model::FeatureShape::Flat(width) {
                return Err(invalid(format!(
                    "model: the data's pipeline gives {width} features a row, the model takes {:?}",
                    self.model.input_shape()
                )));
            }
            if self.model.classes() != data.schema.classes.len() {
                return Err(invalid(format!(
                    "model: {} classes, the data's label {:?} has {}",
                    self.model.classes(),
                    data.schema.label,
                    data.schema.classes.len()
                )));
            }
            let codec = self.secure.as_ref().map(|s| s.codec).unwrap_or_default();
            cohort_crypto::DigitCodec::for_statistics(&codec)
                .map_err(|e| invalid(format!("data: the federation's statistics: {e}")))?;
        }
        Ok(())
    }
}
