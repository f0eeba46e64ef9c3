//! `serve.toml`: a stand-alone inference server (`cohort serve`). It reads versions from the
//! coordinator's registry (a shared `model_dir` volume or the same S3 bucket, with the same
//! `[at_rest]` keys) and follows the promoted version through the registry's serving pointer.
//! Parsing checks every key and opens nothing; [`ServeConfig::open_model_store`] opens the
//! registry.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cohort_protocol::tls::TlsFiles;
use cohort_storage::settings::{
    AtRestSection, FileError, ModelStoreSection, OpenError, load_file, open_registry,
};
use cohort_storage::{ModelRef, ModelStore};
use serde::Deserialize;

use crate::settings::{InferenceSettings, InvalidSetting};

fn default_watch_interval_ms() -> u64 {
    1_000
}

/// `serve.toml`.
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
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// How often the serving pointer is read, in milliseconds.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Serve this version and ignore promotions.
    #[serde(default)]
    pub pin: Option<ModelRef>,
    #[serde(default)]
    pub inference: InferenceSettings,
}

/// A `serve.toml` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServeConfigError {
    #[error("{0}")]
    Syntax(String),
    #[error("no model registry: set model_dir or [model_store.s3]")]
    NoRegistry,
    #[error("watch_interval_ms must be positive")]
    WatchInterval,
    #[error(transparent)]
    Inference(#[from] InvalidSetting),
}

impl ServeConfig {
    pub fn parse(text: &str) -> Result<Self, ServeConfigError> {
        let cfg: ServeConfig =
            toml::from_str(text).map_err(|e| ServeConfigError::Syntax(e.to_string()))?;
        if cfg.model_dir.is_none() && cfg.model_store.is_none() {
            return Err(ServeConfigError::NoRegistry);
        }
        if cfg.watch_interval_ms == 0 {
            return Err(ServeConfigError::WatchInterval);
        }
        cfg.inference.validate()?;
        Ok(cfg)
    }

    /// Reads `path`; `[tls]` and `[at_rest]` paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, FileError<ServeConfigError>> {
        load_file(path, Self::parse, |c| (&mut c.tls, &mut c.at_rest))
    }

    /// Opens the registry it names (and its key provider).
    pub fn open_model_store(&self) -> Result<ModelStore, OpenError> {
        open_registry(
            self.model_dir.as_deref(),
            self.model_store.as_ref(),
            self.at_rest.as_ref(),
        )
    }
}
