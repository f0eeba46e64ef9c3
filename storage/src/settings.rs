//! Where the registry is and how it is encrypted, as configuration files give it
//! (`[model_store]`, `[at_rest]`), and opening it. Parsing a section opens nothing: a store,
//! a key directory or a PKCS#11 session is opened only by [`open_registry`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cohort_crypto::atrest::KeyProvider;
use cohort_protocol::tls::TlsFiles;
use serde::Deserialize;

use crate::objects::{S3Config, S3Objects};
use crate::registry::ModelStore;
use crate::{StoreError, keys, pkcs11};

/// `[model_store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStoreSection {
    /// An S3-compatible bucket (credentials from the environment).
    pub s3: S3Config,
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

/// A configuration file that cannot be used: its path, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum FileError<E: std::error::Error + 'static> {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Invalid { path: PathBuf, source: E },
}

/// Reads a configuration file with `parse`, then makes the `[tls]` files and the `[at_rest]`
/// key directory that `paths` gives relative to the file's directory.
pub fn load_file<T, E: std::error::Error + 'static>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, E>,
    paths: impl FnOnce(&mut T) -> (&mut Option<TlsFiles>, &mut Option<AtRestSection>),
) -> Result<T, FileError<E>> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut cfg = parse(&text).map_err(|source| FileError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        let (tls, at_rest) = paths(&mut cfg);
        *tls = tls.take().map(|t| t.relative_to(dir));
        if let Some(a) = at_rest.as_mut() {
            a.relative_to(dir);
        }
    }
    Ok(cfg)
}

/// A registry that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no model registry: set model_dir or [model_store.s3]")]
    NoRegistry,
    #[error("[at_rest]: give exactly one of key_dir and [at_rest.pkcs11]")]
    KeyProviders,
    #[error("at_rest.pkcs11.pin_env: environment variable {0} is not set")]
    PinUnset(String),
    #[error("opening model directory {path}: {source}")]
    Directory { path: PathBuf, source: StoreError },
    #[error("[model_store.s3]: {0}")]
    S3(StoreError),
    #[error("[at_rest]: {0}")]
    Keys(StoreError),
    #[error("[at_rest.pkcs11]: {0}")]
    Pkcs11(cohort_crypto::CryptoError),
}

impl AtRestSection {
    /// Makes `key_dir` relative to `dir` (the configuration file's).
    pub fn relative_to(&mut self, dir: &Path) {
        if let Some(k) = self.key_dir.as_mut()
            && k.is_relative()
        {
            *k = dir.join(&*k);
        }
    }

    /// Opens the configured key provider (reads the key directory or logs in to the token).
    pub fn provider(&self) -> Result<Arc<dyn KeyProvider>, OpenError> {
        match (&self.key_dir, &self.pkcs11) {
            (Some(dir), None) => keys::load_key_dir(dir)
                .map(|k| Arc::new(k) as _)
                .map_err(OpenError::Keys),
            (None, Some(p)) => {
                let pin = std::env::var(&p.pin_env)
                    .map_err(|_| OpenError::PinUnset(p.pin_env.clone()))?;
                pkcs11::Pkcs11Provider::open(&p.module, &p.token, &pin, &p.key)
                    .map(|k| Arc::new(k) as _)
                    .map_err(OpenError::Pkcs11)
            }
            _ => Err(OpenError::KeyProviders),
        }
    }
}

/// Opens the model registry: `[model_store.s3]` or `model_dir`, encrypted with the `[at_rest]`
/// keys when that section is present.
pub fn open_registry(
    model_dir: Option<&Path>,
    s3: Option<&ModelStoreSection>,
    at_rest: Option<&AtRestSection>,
) -> Result<ModelStore, OpenError> {
    let store = match (s3, model_dir) {
        (Some(m), _) => ModelStore::over(Arc::new(S3Objects::new(&m.s3).map_err(OpenError::S3)?)),
        (None, Some(dir)) => ModelStore::open(dir).map_err(|source| OpenError::Directory {
            path: dir.to_path_buf(),
            source,
        })?,
        (None, None) => return Err(OpenError::NoRegistry),
    };
    Ok(match at_rest {
        Some(a) => store.with_keys(a.provider()?),
        None => store,
    })
}
