//! Global model versions on the local filesystem: `v00003.safetensors` beside
//! `v00003.json`, a manifest that names the round, its parent, the participants, the metrics
//! and the SHA-256 of the weights file. Files are written to a temporary name and renamed,
//! so a reader never sees half a version.

use std::path::{Path, PathBuf};

use cohort_model::{ComputeDevice, Metrics, ModelSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::round::RoundSummary;

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
}

/// A directory of model versions.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
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
        Ok(ModelStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn weights_path(&self, version: u64) -> PathBuf {
        self.dir.join(format!("v{version:05}.safetensors"))
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
        write_atomic(&weights, &bytes)?;
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
        assert!(!dir.path().join("models/v00001.tmp").exists());
    }
}
