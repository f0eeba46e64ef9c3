//! Coordinator configuration from TOML, validated at start with messages that name the key.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_model::{ModelSpec, TrainConfig};
use serde::Deserialize;

use crate::round::{JobConfig, SecureSettings};

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
    pub inference: Option<crate::inference::InferenceSettings>,
}

/// `[model_store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStoreSection {
    /// An S3-compatible bucket (credentials from the environment).
    pub s3: crate::model_store::S3Config,
}

/// `[at_rest]`: one key provider, a key directory or a PKCS#11 token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtRestSection {
    /// Key-encryption keys (`<id>.kek`, `current`), as `cohort provision` or `cohort
    /// rotate-keys` write them; relative to the configuration file.
    #[serde(default)]
    pub key_dir: Option<PathBuf>,
    /// Keys in a PKCS#11 token (an HSM) instead.
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Section>,
}

/// `[at_rest.pkcs11]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Section {
    /// The PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The environment variable that holds the user PIN (never the PIN itself).
    pub pin_env: String,
    /// Label of the AES key that wraps new data keys.
    pub key: String,
}

impl AtRestSection {
    /// The configured key provider.
    pub fn provider(
        &self,
    ) -> Result<std::sync::Arc<dyn cohort_crypto::atrest::KeyProvider>, String> {
        match (&self.key_dir, &self.pkcs11) {
            (Some(dir), None) => crate::model_store::load_key_dir(dir)
                .map(|k| std::sync::Arc::new(k) as _)
                .map_err(|e| e.to_string()),
            (None, Some(p)) => {
                let pin = std::env::var(&p.pin_env).map_err(|_| {
                    format!(
                        "at_rest.pkcs11.pin_env: environment variable {} is not set",
                        p.pin_env
                    )
                })?;
                crate::pkcs11::Pkcs11Provider::open(&p.module, &p.token, &pin, &p.key)
                    .map(|k| std::sync::Arc::new(k) as _)
                    .map_err(|e| e.to_string())
            }
            _ => Err("[at_rest]: give exactly one of key_dir and [at_rest.pkcs11]".into()),
        }
    }
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
    #[serde(default = "one")]
    pub fraction: f64,
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: f64,
    #[serde(default = "default_eval_timeout")]
    pub eval_timeout_secs: f64,
    #[serde(default = "default_liveness")]
    pub liveness_timeout_secs: f64,
    #[serde(default = "yes")]
    pub evaluate: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "fedavg")]
    pub strategy: String,
    #[serde(default = "one")]
    pub server_lr: f64,
    /// The dataset participants train on, by name (for operators; participants bring
    /// their own data).
    #[serde(default)]
    pub dataset: Option<String>,
    pub model: ModelSpec,
    pub train: TrainConfig,
    /// `[job.secure_aggregation]`; on unless `enabled = false`.
    #[serde(default)]
    pub secure_aggregation: SecureSection,
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
    pub fn settings(&self, min_updates: usize) -> Result<Option<SecureSettings>, String> {
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

fn secs(key: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("job.{key} must be a positive number of seconds, not {v}"))
}

impl JobSection {
    /// A job specification on its own (what `cohort admin jobs create` sends): the keys of
    /// `[job]` at the top level, `[model]`, `[train]` and `[secure_aggregation]` tables.
    pub fn parse_spec(text: &str) -> Result<Self, String> {
        let spec: JobSection = toml::from_str(text).map_err(|e| e.to_string())?;
        spec.job_config()?;
        Ok(spec)
    }

    /// This section as a stand-alone job specification ([`Self::parse_spec`] reads it back).
    pub fn to_spec(&self) -> String {
        toml::to_string(self).expect("a job section serialises")
    }

    /// The strategy it names.
    pub fn strategy(&self) -> Result<Box<dyn crate::Strategy>, String> {
        crate::strategy::by_name(&self.strategy, self.server_lr as f32)
            .map_err(|e| format!("job.strategy: {e}"))
    }

    /// The state machine's configuration.
    pub fn job_config(&self) -> Result<JobConfig, String> {
        let min_updates = self.min_updates.unwrap_or(self.min_participants);
        let cfg = JobConfig {
            job_id: self.id.clone(),
            model: self.model.clone(),
            train: self.train.clone(),
            rounds: self.rounds,
            min_participants: self.min_participants,
            fraction: self.fraction,
            min_updates,
            round_timeout: secs("round_timeout_secs", self.round_timeout_secs)?,
            eval_timeout: secs("eval_timeout_secs", self.eval_timeout_secs)?,
            evaluate: self.evaluate,
            liveness_timeout: secs("liveness_timeout_secs", self.liveness_timeout_secs)?,
            seed: self.seed,
            secure: self.secure_aggregation.settings(min_updates)?,
        };
        cfg.validate().map_err(|e| format!("job: {e}"))?;
        crate::strategy::by_name(&self.strategy, self.server_lr as f32)
            .map_err(|e| format!("job.strategy: {e}"))?;
        Ok(cfg)
    }
}

impl CoordinatorConfig {
    /// Reads and validates `path`; errors begin with the path.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut cfg = Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(dir) = path.parent() {
            relative_to(dir, &mut cfg.tls, &mut cfg.at_rest);
        }
        Ok(cfg)
    }

    /// The model registry: `[model_store.s3]` or `model_dir`, encrypted with the `[at_rest]`
    /// keys when that section is present.
    pub fn open_model_store(&self) -> Result<crate::ModelStore, String> {
        open_store(
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

    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: CoordinatorConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(job) = &cfg.job {
            job.job_config()?;
        }
        if let Some(i) = &cfg.inference {
            i.validate()?;
        }
        Ok(cfg)
    }
}

/// Makes the `[tls]` files and the `[at_rest]` key directory relative to `dir` (the
/// configuration file's).
fn relative_to(
    dir: &Path,
    tls: &mut Option<cohort_protocol::tls::TlsFiles>,
    at_rest: &mut Option<AtRestSection>,
) {
    *tls = tls.take().map(|t| t.relative_to(dir));
    if let Some(k) = at_rest.as_mut().and_then(|a| a.key_dir.as_mut())
        && k.is_relative()
    {
        *k = dir.join(&*k);
    }
}

/// The model registry: `[model_store.s3]` or `model_dir`, encrypted with the `[at_rest]` keys
/// when that section is present.
fn open_store(
    model_dir: Option<&Path>,
    s3: Option<&ModelStoreSection>,
    at_rest: Option<&AtRestSection>,
) -> Result<crate::ModelStore, String> {
    let store = match (s3, model_dir) {
        (Some(m), _) => crate::ModelStore::over(std::sync::Arc::new(
            crate::model_store::S3Objects::new(&m.s3).map_err(|e| e.to_string())?,
        )),
        (None, Some(dir)) => crate::ModelStore::open(dir)
            .map_err(|e| format!("opening model directory {}: {e}", dir.display()))?,
        (None, None) => {
            return Err("no model registry: set model_dir or [model_store.s3]".to_string());
        }
    };
    Ok(match at_rest {
        Some(a) => store.with_keys(a.provider()?),
        None => store,
    })
}

fn default_watch_interval_ms() -> u64 {
    1_000
}

/// `serve.toml`: a stand-alone inference server (`cohort serve`). It reads versions from the
/// coordinator's registry (a shared `model_dir` volume or the same S3 bucket, with the same
/// `[at_rest]` keys) and follows the promoted version through the registry's serving pointer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on, e.g. "0.0.0.0:7500".
    pub listen: SocketAddr,
    /// The coordinator's `model_dir`.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    #[serde(default)]
    pub model_store: Option<ModelStoreSection>,
    #[serde(default)]
    pub at_rest: Option<AtRestSection>,
    /// Mutual TLS with a certificate of the federation CA (the coordinator role's will do).
    /// Without it `cohort serve` only starts with `--insecure-dev`.
    #[serde(default)]
    pub tls: Option<cohort_protocol::tls::TlsFiles>,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// How often the serving pointer is read, in milliseconds.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Serve this version and ignore promotions.
    #[serde(default)]
    pub pin: Option<crate::state::ModelRef>,
    #[serde(default)]
    pub inference: crate::inference::InferenceSettings,
}

impl ServeConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: ServeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.model_dir.is_none() && cfg.model_store.is_none() {
            return Err("no model registry: set model_dir or [model_store.s3]".into());
        }
        if cfg.watch_interval_ms == 0 {
            return Err("watch_interval_ms must be positive".into());
        }
        cfg.inference.validate()?;
        Ok(cfg)
    }

    /// Reads `path`; [tls] and [at_rest] paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut cfg = Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(dir) = path.parent() {
            relative_to(dir, &mut cfg.tls, &mut cfg.at_rest);
        }
        Ok(cfg)
    }

    pub fn open_model_store(&self) -> Result<crate::ModelStore, String> {
        open_store(
            self.model_dir.as_deref(),
            self.model_store.as_ref(),
            self.at_rest.as_ref(),
        )
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
        let e = both.at_rest.unwrap().provider().unwrap_err();
        assert!(e.contains("exactly one"), "{e}");
        let hsm = CoordinatorConfig::parse(&with(
            "[at_rest.pkcs11]\nmodule = \"m.so\"\ntoken = \"t\"\npin_env = \"COHORT_TEST_NO_SUCH_PIN\"\nkey = \"kek-1\"",
        ))
        .unwrap();
        let e = hsm.at_rest.unwrap().provider().unwrap_err();
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
        .unwrap_err();
        assert!(
            e.contains("secure_aggregation") && e.contains("2^(63 − δ)"),
            "{e}"
        );
        let e = CoordinatorConfig::parse(&format!(
            "{GOOD}\n[job.secure_aggregation]\ncommittee_size = 13\n"
        ))
        .unwrap_err();
        assert!(e.contains("committee_size"), "{e}");
        let e = CoordinatorConfig::parse(&format!("{GOOD}\n[job.secure_aggregation]\nt_mn = 2\n"))
            .unwrap_err();
        assert!(e.contains("t_mn"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = CoordinatorConfig::parse(&GOOD.replace("rounds = 3", "rounds = 3\nrunds = 4"))
            .unwrap_err();
        assert!(e.contains("runds"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace("rounds = 3", "rounds = 0")).unwrap_err();
        assert!(e.contains("rounds"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace("\"sgd\"", "\"lbfgs\"")).unwrap_err();
        assert!(e.contains("lbfgs"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace(
            "min_participants = 2",
            "min_participants = 2\nround_timeout_secs = -1",
        ))
        .unwrap_err();
        assert!(e.contains("round_timeout_secs"), "{e}");
        let e = CoordinatorConfig::parse(&GOOD.replace("127.0.0.1:7400", "localhost")).unwrap_err();
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
        let c = ServeConfig::parse(good).unwrap();
        assert_eq!(c.inference.precision, cohort_model::Precision::Int8);
        assert_eq!(c.inference.device, crate::inference::DeviceChoice::Wgpu);
        assert_eq!(c.pin.unwrap().version, 3);
        assert_eq!(c.watch_interval_ms, 1000);
        let e = ServeConfig::parse(&good.replace("model_dir = \"models\"\n", "")).unwrap_err();
        assert!(e.contains("model_dir or [model_store.s3]"), "{e}");
        let e = ServeConfig::parse(&good.replace("\"int8\"", "\"fp16\"")).unwrap_err();
        assert!(e.contains("fp16"), "{e}");
        let e = ServeConfig::parse(&good.replace("share = 0.1", "share = 2")).unwrap_err();
        assert!(e.contains("inference.candidate.share"), "{e}");
        let e = CoordinatorConfig::parse(&format!("{GOOD}\n[inference]\nqueue = 0\n")).unwrap_err();
        assert!(e.contains("inference.queue"), "{e}");
        assert!(
            CoordinatorConfig::parse(&format!("{GOOD}\n[inference]\n"))
                .unwrap()
                .inference
                .is_some()
        );
    }
}
