//! Global model versions on the local filesystem: `v00003.safetensors` beside
//! `v00003.json`, a manifest that names the round, its parent, the participants, the metrics
//! and the SHA-256 of the weights file. Files are written to a temporary name and renamed,
//! so a reader never sees half a version.

use std::path::{Path, PathBuf};

use cohort_model::{ComputeDevice, Metrics, ModelSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use cohort_crypto::atrest::{self, KeyFileProvider, KeyProvider};

use crate::round::RoundSummary;

/// The name a version's weights are bound to when encrypted.
fn weights_name(version: u64) -> String {
    format!("v{version:05}.safetensors")
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
    /// Hex SHA-256 of the flat little-endian f32 parameters (as on the wire).
    pub params_digest: String,
    pub participants: Vec<String>,
    pub total_examples: u64,
    pub train: Option<Metrics>,
    pub eval: Option<Metrics>,
    pub created_unix_ms: u64,
    pub weights_file: String,
}

/// Errors writing or reading versions.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Model(#[from] cohort_model::ModelError),
    #[error("{path}: manifest is not valid: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Keys { path: PathBuf, message: String },
}

/// A directory of model versions.
#[derive(Clone)]
pub struct ModelStore {
    dir: PathBuf,
    /// Encrypts weights at rest (envelope encryption, `cohort_crypto::atrest`) when set.
    keys: Option<std::sync::Arc<dyn KeyProvider>>,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("dir", &self.dir)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

/// Keys for encryption at rest from a key directory: `<id>.kek` files (64 hex digits, mode
/// 0600) and a `current` file naming the one that wraps new data keys. `cohort keys` writes
/// and rotates them.
pub fn load_key_dir(dir: &Path) -> Result<KeyFileProvider, StoreError> {
    let bad = |message: String| StoreError::Keys {
        path: dir.to_path_buf(),
        message,
    };
    let current_path = dir.join("current");
    let current = std::fs::read_to_string(&current_path).map_err(io(&current_path))?;
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".kek"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| bad(format!("{}: not 64 hex digits", path.display())))?;
        keys.push((id.to_string(), bytes));
    }
    KeyFileProvider::from_keys(keys, current.trim()).map_err(|e| bad(e.to_string()))
}

/// Adds a new key to `dir` (creating it) and makes it current. Returns its id.
pub fn add_key(dir: &Path) -> Result<String, StoreError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let n = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".kek"))
        })
        .count();
    let id = format!("kek-{}", n + 1);
    let key = KeyFileProvider::new_key().map_err(|e| StoreError::Keys {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let path = dir.join(format!("{id}.kek"));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    use std::io::Write;
    o.open(&path)
        .and_then(|mut f| {
            f.write_all(hex::encode(key).as_bytes())
                .and_then(|_| f.sync_all())
        })
        .map_err(io(&path))?;
    write_atomic(&dir.join("current"), id.as_bytes())?;
    Ok(id)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl ModelStore {
    /// Opens (creating if needed) a store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(ModelStore { dir, keys: None })
    }

    /// A store whose weights are encrypted at rest with `keys`.
    pub fn open_encrypted(
        dir: impl Into<PathBuf>,
        keys: std::sync::Arc<dyn KeyProvider>,
    ) -> Result<Self, StoreError> {
        let mut s = Self::open(dir)?;
        s.keys = Some(keys);
        Ok(s)
    }

    /// The store of one job's versions: the subdirectory named after the job, with the same
    /// keys. Job ids are checked to be plain names (see `JobConfig::validate`).
    pub fn for_job(&self, job_id: &str) -> Result<Self, StoreError> {
        let mut s = Self::open(self.dir.join(job_id))?;
        s.keys = self.keys.clone();
        Ok(s)
    }

    /// Version `version`'s flat parameters, checked against its manifest's digest.
    pub fn read_params(&self, version: u64) -> Result<Vec<f32>, StoreError> {
        let manifest = self.manifest(version)?;
        let bytes = self.read_weights(version)?;
        let path = self.weights_path(version);
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != manifest.sha256 {
            return Err(StoreError::Manifest {
                path,
                message: format!(
                    "SHA-256 {sha} differs from the manifest's {}",
                    manifest.sha256
                ),
            });
        }
        let net = manifest
            .model
            .build(
                &manifest.model.initial_parameters(0),
                &ComputeDevice::Cpu.inference(),
            )?
            .load_safetensors(bytes)?;
        let params = net.to_flat();
        let digest = cohort_protocol::params_digest(&params);
        if digest != manifest.params_digest {
            return Err(StoreError::Manifest {
                path,
                message: format!(
                    "parameters digest {digest} differs from the manifest's {}",
                    manifest.params_digest
                ),
            });
        }
        Ok(params)
    }

    /// A version's safetensors bytes, decrypted if need be.
    pub fn read_weights(&self, version: u64) -> Result<Vec<u8>, StoreError> {
        let p = self.weights_path(version);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        match &self.keys {
            Some(k) => atrest::decrypt(k.as_ref(), &weights_name(version), &bytes).map_err(|e| {
                StoreError::Keys {
                    path: p,
                    message: e.to_string(),
                }
            }),
            None => Ok(bytes),
        }
    }

    /// Re-wraps every encrypted version's data key under the current key-encryption key
    /// (after a rotation); the weights themselves are not re-encrypted. Returns how many
    /// files changed.
    pub fn rewrap_all(&self) -> Result<usize, StoreError> {
        let Some(keys) = &self.keys else {
            return Ok(0);
        };
        let mut changed = 0;
        // Each job's versions live in a subdirectory.
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
                let mut sub = Self::open(entry.path())?;
                sub.keys = self.keys.clone();
                changed += sub.rewrap_all()?;
            }
        }
        for v in self.versions()? {
            let p = self.weights_path(v);
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            let re = atrest::rewrap(keys.as_ref(), &bytes).map_err(|e| StoreError::Keys {
                path: p.clone(),
                message: e.to_string(),
            })?;
            if let Some(re) = re {
                write_atomic(&p, &re)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn weights_path(&self, version: u64) -> PathBuf {
        match self.keys {
            Some(_) => self.dir.join(format!("{}.enc", weights_name(version))),
            None => self.dir.join(weights_name(version)),
        }
    }

    pub fn manifest_path(&self, version: u64) -> PathBuf {
        self.dir.join(format!("v{version:05}.json"))
    }

    /// Writes version `version` (weights first, then the manifest that makes it visible).
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        job_id: &str,
        spec: &ModelSpec,
        strategy: &str,
        version: u64,
        params: &[f32],
        summary: Option<&RoundSummary>,
        created_unix_ms: u64,
    ) -> Result<ModelManifest, StoreError> {
        let net = spec.build(params, &ComputeDevice::Cpu.inference())?;
        let bytes = net.to_safetensors()?;
        let weights = self.weights_path(version);
        match &self.keys {
            Some(k) => {
                let enc =
                    atrest::encrypt(k.as_ref(), &weights_name(version), &bytes).map_err(|e| {
                        StoreError::Keys {
                            path: weights.clone(),
                            message: e.to_string(),
                        }
                    })?;
                write_atomic(&weights, &enc)?;
            }
            None => write_atomic(&weights, &bytes)?,
        }
        let manifest = ModelManifest {
            job_id: job_id.to_string(),
            version,
            parent: version.checked_sub(1),
            round: version,
            strategy: strategy.to_string(),
            model: spec.clone(),
            num_parameters: params.len(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            params_digest: cohort_protocol::params_digest(params),
            participants: summary.map(|s| s.participants.clone()).unwrap_or_default(),
            total_examples: summary.map(|s| s.total_examples).unwrap_or(0),
            train: summary.and_then(|s| s.train),
            eval: summary.and_then(|s| s.eval),
            created_unix_ms,
            weights_file: weights
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        write_atomic(&self.manifest_path(version), &json)?;
        Ok(manifest)
    }

    /// Reads a version's manifest.
    pub fn manifest(&self, version: u64) -> Result<ModelManifest, StoreError> {
        let p = self.manifest_path(version);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Manifest {
            path: p,
            message: e.to_string(),
        })
    }

    /// Versions present (those whose manifest exists), ascending.
    pub fn versions(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let name = entry.map_err(io(&self.dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(v) = name
                .strip_prefix('v')
                .and_then(|s| s.strip_suffix(".json"))
                .and_then(|s| s.parse().ok())
            {
                out.push(v);
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path().join("models")).unwrap();
        let spec = ModelSpec::Logistic {
            inputs: 3,
            classes: 2,
        };
        let p = spec.initial_parameters(1);
        let m0 = store.write("j", &spec, "fedavg", 0, &p, None, 5).unwrap();
        assert_eq!(m0.parent, None);
        let m1 = store.write("j", &spec, "fedavg", 1, &p, None, 6).unwrap();
        assert_eq!(m1.parent, Some(0));
        assert_eq!(store.versions().unwrap(), vec![0, 1]);
        assert_eq!(store.manifest(1).unwrap(), m1);
        let bytes = std::fs::read(store.weights_path(1)).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), m1.sha256);
        assert_eq!(m1.params_digest, cohort_protocol::params_digest(&p));
        assert_eq!(store.read_params(1).unwrap(), p);
        assert!(!dir.path().join("models/v00001.tmp").exists());
    }

    #[test]
    fn encrypted_versions_hold_no_model_bytes_and_survive_key_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("keys");
        add_key(&kdir).unwrap();
        let keys = std::sync::Arc::new(load_key_dir(&kdir).unwrap());
        let store = ModelStore::open_encrypted(dir.path().join("models"), keys).unwrap();
        let spec = ModelSpec::Mlp {
            inputs: 20,
            hidden: vec![16],
            classes: 3,
        };
        let p = spec.initial_parameters(3);
        store.write("j", &spec, "fedavg", 1, &p, None, 6).unwrap();
        let job = store.for_job("j").unwrap();
        job.write("j", &spec, "fedavg", 0, &p, None, 6).unwrap();
        let on_disk = std::fs::read(store.weights_path(1)).unwrap();
        // No parameter's bytes appear in the file (8-byte runs of the little-endian f32s).
        let raw = cohort_protocol::f32_bytes(&p);
        let leaked = raw
            .chunks_exact(8)
            .filter(|w| on_disk.windows(8).any(|d| d == *w))
            .count();
        assert_eq!(leaked, 0, "{leaked} runs of model bytes found on disk");
        let plain = store.read_weights(1).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&plain)),
            store.manifest(1).unwrap().sha256
        );
        // Rotate: a new key, every version re-wrapped, the old key removed: still readable.
        add_key(&kdir).unwrap();
        let rotated = ModelStore::open_encrypted(
            dir.path().join("models"),
            std::sync::Arc::new(load_key_dir(&kdir).unwrap()),
        )
        .unwrap();
        assert_eq!(rotated.rewrap_all().unwrap(), 2, "the job's version too");
        std::fs::remove_file(kdir.join("kek-1.kek")).unwrap();
        let after = ModelStore::open_encrypted(
            dir.path().join("models"),
            std::sync::Arc::new(load_key_dir(&kdir).unwrap()),
        )
        .unwrap();
        assert_eq!(after.read_weights(1).unwrap(), plain);
        assert_eq!(after.for_job("j").unwrap().read_params(0).unwrap(), p);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kdir.join("kek-2.kek"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
