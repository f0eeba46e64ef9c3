//! Coordinator configuration from TOML (`coordinator.toml`, and job specifications), checked
//! with errors that name the key. Parsing opens nothing: the registry and its key provider are
//! opened by [`CoordinatorConfig::open_model_store`], the state file by the caller.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_model::{ModelSpec, TrainConfig};
use serde::Deserialize;

use cohort_serving::{InferenceSettings, InvalidSetting};
use cohort_storage::settings::{
    AtRestSection, FileError, ModelStoreSection, OpenError, load_file, open_registry,
};

use crate::round::{JobConfig, JobError, Sampling, SecureSettings};
use crate::strategy::StrategyError;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, an unknown key or a value of the wrong type (the text names it).
    #[error("{0}")]
    Syntax(String),
    #[error("job.{key} must be a positive number of seconds, not {value}")]
    Seconds { key: &'static str, value: f64 },
    #[error("job: {0}")]
    Job(#[from] JobError),
    #[error("job.strategy: {0}")]
    Strategy(#[from] StrategyError),
    #[error(transparent)]
    Inference(#[from] InvalidSetting),
    #[error("{0}")]
    Retention(String),
}

/// `coordinator.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on, e.g. "127.0.0.1:7400".
    pub listen: SocketAddr,
    /// Where global model versions are written.
    pub model_dir: PathBuf,
    /// Participant ids allowed to join; absent admits any id (development only).
    #[serde(default)]
    pub allowed_participants: Option<BTreeSet<String>>,
    /// Mutual TLS (`cohort provision` writes this section). Without it the coordinator only
    /// starts with `--insecure-dev`.
    #[serde(default)]
    pub tls: Option<cohort_protocol::tls::TlsFiles>,
    /// Encryption of model artifacts at rest (AES-256-GCM, envelope keys from `key_dir`).
    #[serde(default)]
    pub at_rest: Option<AtRestSection>,
    /// Where model versions go instead of `model_dir`: `[model_store.s3]`.
    #[serde(default)]
    pub model_store: Option<ModelStoreSection>,
    /// The coordinator's durable state (redb). Defaults to `state.redb` beside `model_dir`
    /// (like `model_dir`, relative to the working directory).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Participants not in `allowed_participants` wait for an operator's approval (`cohort
    /// admin participants approve`) instead of being refused.
    #[serde(default)]
    pub require_approval: bool,
    /// What is kept of the state's growing parts (model versions, finished jobs' round
    /// history, the audit log); everything when absent.
    #[serde(default)]
    pub retention: cohort_storage::Retention,
    /// Where Prometheus scrapes `/metrics` (plain HTTP: bind it to a private address).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A job to run at start (batch mode: the coordinator exits when it is finished).
    /// Without one, jobs are created and started over the Admin API.
    #[serde(default)]
    pub job: Option<JobSection>,
    /// Serve the promoted model on this coordinator's listener (the Inference service),
    /// switching on every promotion and rollback.
    #[serde(default)]
    pub inference: Option<InferenceSettings>,
}

/// `[job]`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub id: String,
    pub rounds: u64,
    pub min_participants: usize,
    /// Defaults to `min_participants`.
    #[serde(default)]
    pub min_updates: Option<usize>,
    /// Share of the available participants drawn a round (with `sampling = "poisson"`:
    /// each one's probability of being drawn).
    #[serde(default = "one")]
    pub fraction: f64,
    /// Participants drawn a round, instead of a `fraction` of those available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_round: Option<usize>,
    /// `uniform` (default: a fixed number, without replacement) or `poisson` (each available
    /// participant independently with probability `fraction`).
    #[serde(default)]
    pub sampling: SamplingName,
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: f64,
    #[serde(default = "default_eval_timeout")]
    pub eval_timeout_secs: f64,
    #[serde(default = "default_liveness")]
    pub liveness_timeout_secs: f64,
    #[serde(default = "yes")]
    pub evaluate: bool,
    /// Share of the available participants that evaluate each new model (a seeded draw).
    #[serde(default = "one")]
    pub evaluate_fraction: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "fedavg")]
    pub strategy: String,
    #[serde(default = "one")]
    pub server_lr: f64,
    /// FedAvgM's server momentum β.
    #[serde(default = "default_momentum")]
    pub server_momentum: f64,
    /// Participants scale their updates down to this L2 norm before sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Clip each layer to its share of `clip_norm` rather than the update as a whole.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clip_per_layer: bool,
    /// `[job.privacy]`: differential privacy (needs `clip_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacySettings>,
    /// `[job.adaptive_clipping]`: the clip norm follows a quantile of the update norms,
    /// starting at `clip_norm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<crate::privacy::AdaptiveClipping>,
    /// The dataset participants train on, by name (for operators; participants bring
    /// their own data).
    #[serde(default)]
    pub dataset: Option<String>,
    pub model: ModelSpec,
    pub train: TrainConfig,
    /// `[job.secure_aggregation]`; on unless `enabled = false`.
    #[serde(default)]
    pub secure_aggregation: SecureSection,
    /// The participants' tables (`[data.schema]`, `[data.options]`): the job starts with
    /// round 0, the federation's statistics (docs/tabular.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<cohort_model::tabular::DataSpec>,
}

/// `[job] sampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingName {
    #[default]
    Uniform,
    Poisson,
}

/// `[job.secure_aggregation]`: threshold GLWE secure aggregation, on by default.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureSection {
    /// `false` runs plaintext rounds: the coordinator sees every update (research only).
    pub enabled: bool,
    /// Committee size n_D (threshold ⌊n_D/2⌋ + 1), drawn from each round's participants.
    pub committee_size: usize,
    /// Fewest participants a decrypted sum may cover. Defaults to `min(2, min_updates)`.
    pub t_min: Option<usize>,
    /// Per-coordinate clip bound B of updates.
    pub clip: f32,
    /// Fractional bits f of the fixed-point encoding.
    pub frac_bits: u32,
    /// Largest total aggregation weight W of a round.
    pub max_total_weight: u64,
    pub decrypt_timeout_secs: f64,
    /// Dedicated key custodians (participant ids that hold no data): when given, they form
    /// every round's committee instead of members drawn from the training participants.
    pub custodians: Vec<String>,
}

impl Default for SecureSection {
    fn default() -> Self {
        let d = SecureSettings::default();
        SecureSection {
            enabled: true,
            committee_size: d.committee_size,
            t_min: None,
            clip: d.codec.clip,
            frac_bits: d.codec.frac_bits,
            max_total_weight: d.codec.max_total_weight,
            decrypt_timeout_secs: d.decrypt_timeout.as_secs_f64(),
            custodians: Vec::new(),
        }
    }
}

impl SecureSection {
    /// The job's secure settings, `None` when disabled.
    pub fn settings(&self, min_updates: usize) -> Result<Option<SecureSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let d = SecureSettings::default();
        Ok(Some(SecureSettings {
            committee_size: self.committee_size,
            t_min: self.t_min.unwrap_or(min_updates.min(2)),
            codec: cohort_crypto::Codec {
                clip: self.clip,
                frac_bits: self.frac_bits,
                max_total_weight: self.max_total_weight,
                ..d.codec
            },
            params: d.params,
            decrypt_timeout: secs(
                "secure_aggregation.decrypt_timeout_secs",
                self.decrypt_timeout_secs,
            )?,
            custodians: self.custodians.clone(),
        }))
    }
}

fn default_momentum() -> f64 {
    0.9
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn fedavg() -> String {
    "fedavg".into()
}
fn default_round_timeout() -> f64 {
    120.0
}
fn default_eval_timeout() -> f64 {
    30.0
}
fn default_liveness() -> f64 {
    30.0
}

fn secs(key: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(ConfigError::Seconds { key, value })
}

impl JobSection {
    /// A job specification on its own (what `cohort admin jobs create` sends): the keys of
    /// `[job]` at the top level, `[model]`, `[train]` and `[secure_aggregation]` tables.
    pub fn parse_spec(text: &str) -> Result<Self, ConfigError> {
        let spec: JobSection =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        spec.job_config()?;
        Ok(spec)
    }

    /// This section as a stand-alone job specification ([`Self::parse_spec`] reads it back).
    pub fn to_spec(&self) -> String {
        toml::to_string(self).expect("a job section serialises")
    }

    /// The strategy it names.
    pub fn strategy(&self) -> Result<Box<dyn crate::Strategy>, ConfigError> {
        Ok(crate::strategy::by_name(
            &self.strategy,
            self.server_lr as f32,
            self.server_momentum as f32,
        )?)
    }

    /// The state machine's configuration.
    pub fn job_config(&self) -> Result<JobConfig, ConfigError> {
        let min_updates = self.min_updates.unwrap_or(self.min_participants);
        let strategy = self.strategy()?;
        let mut model = self.model.clone();
        if let (Some(data), cohort_model::ModelSpec::Layers { layers, .. }) =
            (&self.data, &mut model)
        {
            data.resolve_embeddings(layers).map_err(|e| {
                ConfigError::Job(JobError::Invalid(format!("invalid model spec: {e}")))
            })?;
        }
        let cfg = JobConfig {
            job_id: self.id.clone(),
            model,
            train: self.train.clone(),
            rounds: self.rounds,
            min_participants: self.min_participants,
            fraction: self.fraction,
            sampling: match (self.sampling, self.clients_per_round) {
                (SamplingName::Uniform, None) => Sampling::Fraction,
                (SamplingName::Uniform, Some(k)) => Sampling::Count(k),
                (SamplingName::Poisson, None) => Sampling::Poisson,
                (SamplingName::Poisson, Some(_)) => {
                    return Err(ConfigError::Job(JobError::Invalid(
                        "job.clients_per_round: Poisson sampling draws each participant with \
                         probability `fraction`; give one or the other"
                            .into(),
                    )));
                }
            },
            min_updates,
            round_timeout: secs("round_timeout_secs", self.round_timeout_secs)?,
            eval_timeout: secs("eval_timeout_secs", self.eval_timeout_secs)?,
            evaluate: self.evaluate,
            evaluate_fraction: self.evaluate_fraction,
            liveness_timeout: secs("liveness_timeout_secs", self.liveness_timeout_secs)?,
            seed: self.seed,
            secure: self.secure_aggregation.settings(min_updates)?,
            data: self.data.clone(),
            clip_norm: self.clip_norm,
            clip_per_layer: self.clip_per_layer,
            privacy: self.privacy,
            emulated_codec: None,
            adaptive_clipping: self.adaptive_clipping,
            control_variates: strategy.control_variate().is_some(),
        };
        cfg.validate()?;
        cfg.check_strategy(strategy.as_ref())?;
        Ok(cfg)
    }
}

impl CoordinatorConfig {
    /// Reads and validates `path`; errors begin with the path.
    pub fn load(path: &Path) -> Result<Self, FileError<ConfigError>> {
        load_file(path, Self::parse, |c| (&mut c.tls, &mut c.at_rest))
    }

    /// Opens the model registry: `[model_store.s3]` or `model_dir`, encrypted with the
    /// `[at_rest]` keys when that section is present (this reads the key directory or logs
    /// in to the PKCS#11 token).
    pub fn open_model_store(&self) -> Result<crate::ModelStore, OpenError> {
        open_registry(
            Some(&self.model_dir),
            self.model_store.as_ref(),
            self.at_rest.as_ref(),
        )
    }

    /// The state file: `state_file`, or `state.redb` beside `model_dir`.
    pub fn state_path(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            self.model_dir
                .parent()
                .unwrap_or(Path::new("."))
                .join("state.redb")
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: CoordinatorConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        if let Some(job) = &cfg.job {
            job.job_config()?;
        }
        if let Some(i) = &cfg.inference {
            i.validate()?;
        }
        cfg.retention.validate().map_err(ConfigError::Retention)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:7400"
model_dir = "models"
[job]
id = "bc"
rounds = 3
min_participants = 2
[job.model]
kind = "logistic"
inputs = 30
classes = 2
[job.train]
epochs = 1
batch_size = 16
learning_rate = 0.1
optimizer = "sgd"
"#;

    #[test]
    fn retention_is_read_and_settings_that_keep_nothing_are_refused() {
        let c = CoordinatorConfig::parse(&format!(
            "{GOOD}\n[retention]\nmodel_versions = 5\naudit_entries = 1000\n"
        ))
        .unwrap();
        assert_eq!(c.retention.model_versions, Some(5));
        assert_eq!(c.retention.audit_entries, Some(1000));
        assert_eq!(c.retention.round_history, None);
        let e = CoordinatorConfig::parse(&format!("{GOOD}\n[retention]\nmodel_versions = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("retention.model_versions"), "{e}");
        let e = CoordinatorConfig::parse(&format!("{GOOD}\n[retention]\nrounds = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds"), "{e}");
    }

    #[test]
    fn parses_with_defaults() {
        let c = CoordinatorConfig::parse(GOOD).unwrap();
        let j = c.job.as_ref().unwrap().job_config().unwrap();
        assert_eq!(j.min_updates, 2);
        assert_eq!(j.round_timeout, Duration::from_secs(120));
        assert!(c.allowed_participants.is_none());
        let sec = j.secure.expect("secure aggregation is on by default");
        assert_eq!((sec.committee_size, sec.t_min), (5, 2));
        let off = CoordinatorConfig::parse(&format!(
            "{GOOD}\n[job.secure_aggregation]\nenabled = false\n"
        ))
        .unwrap();
        assert!(off.job.unwrap().job_config().unwrap().secure.is_none());
    }

    #[test]
    fn at_rest_takes_exactly_one_provider() {
        // [at_rest] is a top-level table: it goes before [job].
        let with = |at_rest: &str| GOOD.replace("[job]\n", &format!("{at_rest}\n[job]\n"));
        let both = CoordinatorConfig::parse(&with(
            "[at_rest]\nkey_dir = \"k\"\n[at_rest.pkcs11]\nmodule = \"m.so\"\ntoken = \"t\"\npin_env = \"COHORT_TEST_NO_SUCH_PIN\"\nkey = \"kek-1\"",
        ))
        .unwrap();
        let e = both.at_rest.unwrap().provider().unwrap_err().to_string();
        assert!(e.contains("exactly one"), "{e}");
        let hsm = CoordinatorConfig::parse(&with(
            "[at_rest.pkcs11]\nmodule = \"m.so\"\ntoken = \"t\"\npin_env = \"COHORT_TEST_NO_SUCH_PIN\"\nkey = \"kek-1\"",
        ))
        .unwrap();
        let e = hsm.at_rest.unwrap().provider().unwrap_err().to_string();
        assert!(
            e.contains("COHORT_TEST_NO_SUCH_PIN"),
            "the PIN comes from the environment: {e}"
        );
    }

    #[test]
    fn secure_settings_that_could_overflow_are_refused_naming_the_bound() {
        let e = CoordinatorConfig::parse(&format!(
            "{GOOD}\n[job.secure_aggregation]\nmax_total_weight = 100000\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("secure_aggregation") && e.contains("2^(63 − δ)"),
            "{e}"
        );
        let e = CoordinatorConfig::parse(&format!(
            "{GOOD}\n[job.secure_aggregation]\ncommittee_size = 13\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("committee_size"), "{e}");
        let e = CoordinatorConfig::parse(&format!("{GOOD}\n[job.secure_aggregation]\nt_mn = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t_mn"), "{e}");
    }

    #[test]
    fn sampling_is_a_fraction_a_count_or_poisson() {
        let with = |extra: &str| {
            CoordinatorConfig::parse(&GOOD.replace(
                "min_participants = 2",
                &format!("min_participants = 2\n{extra}"),
            ))
            .map(|c| c.job.unwrap().job_config().unwrap().sampling)
        };
        assert_eq!(with("").unwrap(), Sampling::Fraction);
        assert_eq!(with("clients_per_round = 2").unwrap(), Sampling::Count(2));
        assert_eq!(
            with("sampling = \"poisson\"\nfraction = 0.5").unwrap(),
            Sampling::Poisson
        );
        let e = CoordinatorConfig::parse(&GOOD.replace(
            "min_participants = 2",
            "min_participants = 2\nsampling = \"poisson\"\nclients_per_round = 2",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("clients_per_round"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace(
            "min_participants = 2",
            "min_participants = 2\nsampling = \"stratified\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("stratified"), "{e}");
        // A specification keeps its sampling through its own round trip.
        let spec = JobSection::parse_spec(
            "id = \"j\"\nrounds = 1\nmin_participants = 2\nclients_per_round = 2\n\
             [model]\nkind = \"logistic\"\ninputs = 3\nclasses = 2\n\
             [train]\nepochs = 1\nbatch_size = 4\nlearning_rate = 0.1\noptimizer = \"sgd\"\n",
        )
        .unwrap();
        let again = JobSection::parse_spec(&spec.to_spec()).unwrap();
        assert_eq!(again.job_config().unwrap().sampling, Sampling::Count(2));
    }

    #[test]
    fn fedprox_takes_its_coefficient_from_the_training_section() {
        let text = "id = \"p\"\nrounds = 1\nmin_participants = 2\nstrategy = \"fedprox\"\n\
             [model]\nkind = \"logistic\"\ninputs = 3\nclasses = 2\n\
             [train]\nepochs = 1\nbatch_size = 4\nlearning_rate = 0.1\noptimizer = \"sgd\"\n";
        let e = JobSection::parse_spec(text).unwrap_err().to_string();
        assert!(e.contains("fedprox") && e.contains("proximal_mu"), "{e}");
        let spec = JobSection::parse_spec(&format!("{text}proximal_mu = 0.01\n")).unwrap();
        assert_eq!(spec.job_config().unwrap().train.proximal_mu, 0.01);
        assert_eq!(spec.strategy().unwrap().name(), "fedprox");
        let again = JobSection::parse_spec(&spec.to_spec()).unwrap();
        assert_eq!(again.job_config().unwrap().train.proximal_mu, 0.01);
    }

    #[test]
    fn a_specification_declares_its_privacy_and_keeps_it_through_its_round_trip() {
        let text = "id = \"dp\"\nrounds = 5\nmin_participants = 3\nclip_norm = 1.0\n\
             [model]\nkind = \"logistic\"\ninputs = 3\nclasses = 2\n\
             [train]\nepochs = 1\nbatch_size = 4\nlearning_rate = 0.1\noptimizer = \"sgd\"\n\
             [privacy]\nmechanism = \"distributed\"\nnoise_multiplier = 1.1\n\
             target_epsilon = 8.0\n";
        let spec = JobSection::parse_spec(text).unwrap();
        let p = spec.job_config().unwrap().privacy.unwrap();
        assert_eq!(p.mechanism, crate::privacy::Mechanism::Distributed);
        assert_eq!((p.noise_multiplier, p.delta), (1.1, 1e-5));
        assert_eq!(p.target_epsilon, Some(8.0));
        let again = JobSection::parse_spec(&spec.to_spec()).unwrap();
        assert_eq!(again.job_config().unwrap().privacy, Some(p));
        // Per-layer clipping, kept through the round trip; refused without a clip norm.
        let layered = text.replace(
            "clip_norm = 1.0\n",
            "clip_norm = 1.0\nclip_per_layer = true\n",
        );
        let spec = JobSection::parse_spec(&layered).unwrap();
        assert!(spec.job_config().unwrap().clip_per_layer);
        let again = JobSection::parse_spec(&spec.to_spec()).unwrap();
        assert!(again.job_config().unwrap().clip_per_layer);
        let no_norm = "id = \"l\"\nrounds = 1\nmin_participants = 2\nclip_per_layer = true\n\
             [model]\nkind = \"logistic\"\ninputs = 3\nclasses = 2\n\
             [train]\nepochs = 1\nbatch_size = 4\nlearning_rate = 0.1\noptimizer = \"sgd\"\n";
        let e = JobSection::parse_spec(no_norm).unwrap_err().to_string();
        assert!(e.contains("clip_per_layer needs clip_norm"), "{e}");
        // Adaptive clipping, with its defaults, and its refusals.
        let adaptive = format!("{text}[adaptive_clipping]\n");
        let a = JobSection::parse_spec(&adaptive)
            .unwrap()
            .job_config()
            .unwrap()
            .adaptive_clipping
            .unwrap();
        assert_eq!((a.target_quantile, a.learning_rate), (0.5, 0.2));
        let e = JobSection::parse_spec(&format!("{adaptive}target_quantile = 1.5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("adaptive_clipping.target_quantile"), "{e}");
        // Refusals name the setting.
        let e = JobSection::parse_spec(&text.replace("clip_norm = 1.0\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("privacy needs clip_norm"), "{e}");
        let e = JobSection::parse_spec(&text.replace("\"distributed\"", "\"local\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("local"), "{e}");
        let e = JobSection::parse_spec(&format!("{text}noise = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("noise"), "{e}");
        let e = JobSection::parse_spec(&format!("{text}[secure_aggregation]\nenabled = false\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secure_aggregation.enabled = false"), "{e}");
    }

    #[test]
    fn a_specification_declares_its_tables_and_keeps_them_through_its_round_trip() {
        let base = "id = \"t\"\nrounds = 1\nmin_participants = 2\n\
             [model]\nkind = \"logistic\"\ninputs = INPUTS\nclasses = 2\n\
             [train]\nepochs = 1\nbatch_size = 4\nlearning_rate = 0.1\noptimizer = \"sgd\"\n\
             [data.schema]\nlabel = \"y\"\nclasses = [\"0\", \"1\"]\n\
             [[data.schema.columns]]\nname = \"age\"\ntype = \"numeric\"\nbins = [20.0, 40.0, 60.0]\n\
             [[data.schema.columns]]\nname = \"stage\"\ntype = \"categorical\"\n\
             categories = [\"I\", \"II\"]\n\
             [data.options]\nimpute = \"most_frequent\"\nmissing_indicators = true\n";
        // age and its indicator, two stages and an indicator.
        let spec = JobSection::parse_spec(&base.replace("INPUTS", "5")).unwrap();
        let cfg = spec.job_config().unwrap();
        let data = cfg.data.as_ref().unwrap();
        assert_eq!(data.width(), 5);
        assert_eq!(
            data.options.impute,
            cohort_model::tabular::Impute::MostFrequent
        );
        let again = JobSection::parse_spec(&spec.to_spec()).unwrap();
        assert_eq!(again.job_config().unwrap().data, cfg.data);
        // A model that does not fit the tables, and a bad schema, are refused by name.
        let refused = |text: &str| match JobSection::parse_spec(text) {
            Err(e) => e.to_string(),
            Ok(s) => s.job_config().unwrap_err().to_string(),
        };
        let e = refused(&base.replace("INPUTS", "4"));
        assert!(e.contains("gives 5 features a row"), "{e}");
        let e = refused(
            &base
                .replace("INPUTS", "5")
                .replace("[20.0, 40.0, 60.0]", "[40.0, 20.0]"),
        );
        assert!(e.contains("data: column \"age\": bins"), "{e}");
        let e = refused(
            &base
                .replace("INPUTS", "5")
                .replace("rounds = 1\n", "rounds = 1\nclip_norm = 0.0\n"),
        );
        assert!(e.contains("clip_norm must be a positive number"), "{e}");
        // A declared model embeds a categorical column by name: the schema places its block
        // (after age and its indicator), through the specification's round trip too.
        let layers = base.replace(
            "[model]\nkind = \"logistic\"\ninputs = INPUTS\nclasses = 2\n",
            "[model]\nkind = \"layers\"\ninputs = 5\nclasses = 2\n\
             [[model.layers]]\ntype = \"embedding\"\ncolumn = \"COLUMN\"\ndim = 4\n\
             [[model.layers]]\ntype = \"linear\"\nunits = 2\n",
        );
        let spec = JobSection::parse_spec(&layers.replace("COLUMN", "stage")).unwrap();
        let placed = |spec: &JobSection| match spec.job_config().unwrap().model {
            cohort_model::ModelSpec::Layers { layers, .. } => layers[0].clone(),
            m => panic!("{m:?}"),
        };
        let want = cohort_model::layers::Layer::Embedding {
            dim: 4,
            column: Some("stage".into()),
            offset: 2,
            categories: 2,
        };
        assert_eq!(placed(&spec), want);
        assert_eq!(
            placed(&JobSection::parse_spec(&spec.to_spec()).unwrap()),
            want
        );
        let e = refused(&layers.replace("COLUMN", "age"));
        assert!(
            e.contains("layer 0 (embedding): column \"age\" is numeric, not categorical"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = CoordinatorConfig::parse(&GOOD.replace("rounds = 3", "rounds = 3\nrunds = 4"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("runds"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace("rounds = 3", "rounds = 0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace("\"sgd\"", "\"lbfgs\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lbfgs"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace(
            "min_participants = 2",
            "min_participants = 2\nround_timeout_secs = -1",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("round_timeout_secs"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace("127.0.0.1:7400", "localhost"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn serve_config_parses_and_names_what_is_wrong() {
        let good = r#"
listen = "0.0.0.0:7500"
model_dir = "models"
[pin]
job_id = "j"
version = 3
[inference]
device = "wgpu"
precision = "int8"
max_batch = 16
[inference.candidate]
version = 2
share = 0.1
"#;
        let c = cohort_serving::ServeConfig::parse(good).unwrap();
        assert_eq!(c.inference.precision, cohort_model::Precision::Int8);
        assert_eq!(c.inference.device, cohort_serving::DeviceChoice::Wgpu);
        assert_eq!(c.pin.unwrap().version, 3);
        assert_eq!(c.watch_interval_ms, 1000);
        let e = cohort_serving::ServeConfig::parse(&good.replace("model_dir = \"models\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_dir or [model_store.s3]"), "{e}");
        let e = cohort_serving::ServeConfig::parse(&good.replace("\"int8\"", "\"fp16\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp16"), "{e}");
        let e = cohort_serving::ServeConfig::parse(&good.replace("share = 0.1", "share = 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inference.candidate.share"), "{e}");
        let e = CoordinatorConfig::parse(&format!("{GOOD}\n[inference]\nqueue = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inference.queue"), "{e}");
        assert!(
            CoordinatorConfig::parse(&format!("{GOOD}\n[inference]\n"))
                .unwrap()
                .inference
                .is_some()
        );
    }
}
