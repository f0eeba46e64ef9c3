//! The model registry: global model versions, content-addressed.
//!
//! A version's weights (safetensors) are stored once under the SHA-256 of its parameters
//! (the flat little-endian f32s: the same digest participants check when they download a
//! model), `objects/sha256/<hex>.safetensors` (`.safetensors.enc` when encrypted at rest,
//! with the object's name as associated data, so a ciphertext cannot be passed off under
//! another address). The address names the parameters rather than the file because
//! safetensors serialisation is not byte-for-byte deterministic. A version is its manifest,
//! `<job>/vNNNNN.json`: job, version, parent, round, strategy, participants, metrics, the
//! address of its weights and the SHA-256 of the stored file. Reading a version checks the
//! file against that SHA-256 and the parameters against the address.
//!
//! Objects live in an [`Objects`] backend: a local directory (default; every write goes to a
//! temporary name, is synced, and renamed, so a reader never sees half an object), or an
//! S3-compatible object store ([`crate::S3Objects`], through `object_store`).

use std::path::PathBuf;
use std::sync::Arc;

use cohort_model::ModelSpec;
use sha2::{Digest, Sha256};

use cohort_crypto::atrest::{self, KeyProvider};

use crate::error::StoreError;
use crate::objects::{LocalObjects, Objects};
use crate::records::{ModelManifest, ModelRef, RoundSummary};

/// The object holding the weights whose parameters' SHA-256 is `params_digest`.
fn object_key(params_digest: &str, encrypted: bool) -> String {
    let ext = if encrypted {
        ".safetensors.enc"
    } else {
        ".safetensors"
    };
    format!("{WEIGHTS_PREFIX}{params_digest}{ext}")
}

/// Where weights objects are, named by their parameters' digest.
const WEIGHTS_PREFIX: &str = "objects/sha256/";

/// The serving pointer's key, at the registry's root.
const SERVING_KEY: &str = "serving.json";

/// The model registry over an [`Objects`] backend: the whole registry, or one job's view of
/// it ([`ModelStore::for_job`]; objects are shared, manifests are the job's).
#[derive(Clone)]
pub struct ModelStore {
    objects: Arc<dyn Objects>,
    /// Manifests are under `<job>/`; the root view (no job) keeps them at the top level.
    job: Option<String>,
    /// Encrypts weights at rest (envelope encryption, `cohort_crypto::atrest`) when set.
    keys: Option<Arc<dyn KeyProvider>>,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("objects", &self.objects)
            .field("job", &self.job)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

impl ModelStore {
    /// A registry in the local directory `dir` (created if need be).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Ok(Self::over(Arc::new(LocalObjects::new(dir)?)))
    }

    /// A registry in `dir` whose weights are encrypted at rest with `keys`.
    pub fn open_encrypted(
        dir: impl Into<PathBuf>,
        keys: Arc<dyn KeyProvider>,
    ) -> Result<Self, StoreError> {
        Ok(Self::open(dir)?.with_keys(keys))
    }

    /// A registry over any backend.
    pub fn over(objects: Arc<dyn Objects>) -> Self {
        ModelStore {
            objects,
            job: None,
            keys: None,
        }
    }

    /// The same registry, encrypting weights with `keys`.
    pub fn with_keys(mut self, keys: Arc<dyn KeyProvider>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// One job's versions (manifests under `<job>/`), with the same objects and keys. Job
    /// ids are checked to be plain names (see `JobConfig::validate`).
    pub fn for_job(&self, job_id: &str) -> Self {
        ModelStore {
            job: Some(job_id.to_string()),
            ..self.clone()
        }
    }

    fn manifest_key(&self, version: u64) -> String {
        match &self.job {
            Some(j) => format!("{j}/v{version:05}.json"),
            None => format!("v{version:05}.json"),
        }
    }

    /// Version `version`'s flat parameters, checked against its manifest's digest.
    pub fn read_params(&self, version: u64) -> Result<Vec<f32>, StoreError> {
        Ok(self.read_version(version)?.1)
    }

    /// Version `version`'s manifest and flat parameters (checked against the manifest's
    /// digest), reading the manifest once.
    pub fn read_version(&self, version: u64) -> Result<(ModelManifest, Vec<f32>), StoreError> {
        let manifest = self.manifest(version)?;
        let bytes = self.weights_of(&manifest)?;
        let params = manifest.model.params_from_safetensors(bytes)?;
        let digest = cohort_protocol::params_digest(&params);
        if digest != manifest.params_digest {
            return Err(StoreError::Manifest {
                path: PathBuf::from(self.objects.locate(&self.manifest_key(version))),
                message: format!(
                    "parameters digest {digest} differs from the manifest's {}",
                    manifest.params_digest
                ),
            });
        }
        Ok((manifest, params))
    }

    /// A version's safetensors bytes, decrypted if need be and checked against their address.
    pub fn read_weights(&self, version: u64) -> Result<Vec<u8>, StoreError> {
        self.weights_of(&self.manifest(version)?)
    }

    fn weights_of(&self, m: &ModelManifest) -> Result<Vec<u8>, StoreError> {
        let key = &m.weights_file;
        let bytes = self.read_object(key)?;
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != m.sha256 {
            return Err(StoreError::Manifest {
                path: PathBuf::from(self.objects.locate(key)),
                message: format!("SHA-256 {sha} differs from the manifest's {}", m.sha256),
            });
        }
        Ok(bytes)
    }

    /// An object's plaintext, decrypted if need be.
    fn read_object(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let stored = self.objects.get(key)?;
        Ok(if key.ends_with(".enc") {
            let k = self.keys.as_ref().ok_or_else(|| StoreError::Keys {
                path: PathBuf::from(self.objects.locate(key)),
                message: "encrypted at rest, and no [at_rest] keys are configured".into(),
            })?;
            atrest::decrypt(k.as_ref(), key, &stored).map_err(|e| StoreError::Keys {
                path: PathBuf::from(self.objects.locate(key)),
                message: e.to_string(),
            })?
        } else {
            stored
        })
    }

    /// Re-wraps every encrypted object's data key under the current key-encryption key
    /// (after a rotation); the weights themselves are not re-encrypted. Returns how many
    /// objects changed.
    pub fn rewrap_all(&self) -> Result<usize, StoreError> {
        let Some(keys) = &self.keys else {
            return Ok(0);
        };
        let mut changed = 0;
        for key in self.objects.list("objects/sha256/")? {
            if !key.ends_with(".enc") {
                continue;
            }
            let bytes = self.objects.get(&key)?;
            let re = atrest::rewrap(keys.as_ref(), &bytes).map_err(|e| StoreError::Keys {
                path: PathBuf::from(self.objects.locate(&key)),
                message: e.to_string(),
            })?;
            if let Some(re) = re {
                self.objects.put(&key, &re)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Where version `version`'s weights are (a path or a URL), for people.
    pub fn weights_location(&self, version: u64) -> Result<String, StoreError> {
        Ok(self.objects.locate(&self.manifest(version)?.weights_file))
    }

    /// Writes version `version`: its weights (unless an identical object exists), then the
    /// manifest that makes the version visible.
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
        self.write_with_pipeline(
            job_id,
            spec,
            strategy,
            version,
            params,
            summary,
            created_unix_ms,
            None,
        )
    }

    /// [`Self::write`] for a job with tables: the version's manifest carries the pipeline
    /// that prepares raw rows for it.
    #[allow(clippy::too_many_arguments)]
    pub fn write_with_pipeline(
        &self,
        job_id: &str,
        spec: &ModelSpec,
        strategy: &str,
        version: u64,
        params: &[f32],
        summary: Option<&RoundSummary>,
        created_unix_ms: u64,
        pipeline: Option<&cohort_model::tabular::Pipeline>,
    ) -> Result<ModelManifest, StoreError> {
        let params_digest = cohort_protocol::params_digest(params);
        let key = object_key(&params_digest, self.keys.is_some());
        let sha256 = if self.objects.exists(&key)? {
            // The same parameters are stored already: this version shares that object.
            hex::encode(Sha256::digest(self.read_object(&key)?))
        } else {
            let bytes = spec.to_safetensors(params)?;
            match &self.keys {
                Some(k) => {
                    let enc = atrest::encrypt(k.as_ref(), &key, &bytes).map_err(|e| {
                        StoreError::Keys {
                            path: PathBuf::from(self.objects.locate(&key)),
                            message: e.to_string(),
                        }
                    })?;
                    self.objects.put(&key, &enc)?;
                }
                None => self.objects.put(&key, &bytes)?,
            }
            hex::encode(Sha256::digest(&bytes))
        };
        let manifest = ModelManifest {
            job_id: job_id.to_string(),
            version,
            parent: version.checked_sub(1),
            round: version,
            strategy: strategy.to_string(),
            model: spec.clone(),
            num_parameters: params.len(),
            sha256,
            params_digest,
            participants: summary.map(|s| s.participants.clone()).unwrap_or_default(),
            total_examples: summary.map(|s| s.total_examples).unwrap_or(0),
            train: summary.and_then(|s| s.train),
            eval: summary.and_then(|s| s.eval),
            created_unix_ms,
            weights_file: key,
            pipeline: pipeline.cloned(),
            privacy: summary.and_then(|s| s.privacy),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        self.objects.put(&self.manifest_key(version), &json)?;
        Ok(manifest)
    }

    /// Reads a version's manifest.
    pub fn manifest(&self, version: u64) -> Result<ModelManifest, StoreError> {
        let key = self.manifest_key(version);
        let bytes = self.objects.get(&key)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Manifest {
            path: PathBuf::from(self.objects.locate(&key)),
            message: e.to_string(),
        })
    }

    /// Records the version promoted for serving at the registry's root (`serving.json`),
    /// where `cohort serve` instances watch for it. The coordinator's state is the record;
    /// this pointer follows it (and is rewritten from it when the coordinator starts).
    pub fn write_serving(&self, to: &ModelRef) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(to).expect("a model reference serialises");
        self.objects.put(SERVING_KEY, &bytes)
    }

    /// The version promoted for serving, if one has been.
    pub fn read_serving(&self) -> Result<Option<ModelRef>, StoreError> {
        let bytes = match self.objects.get(SERVING_KEY) {
            Ok(b) => b,
            Err(StoreError::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Manifest {
                path: PathBuf::from(self.objects.locate(SERVING_KEY)),
                message: e.to_string(),
            })
    }

    /// Removes version `version`'s manifest (its weights stay: other versions, of this job or
    /// another, may share them; see [`Self::delete_weights`]).
    pub fn delete_version(&self, version: u64) -> Result<(), StoreError> {
        self.objects.delete(&self.manifest_key(version))
    }

    /// Weights objects present (their keys, as manifests' `weights_file` names them).
    pub fn weights_objects(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .objects
            .list(WEIGHTS_PREFIX)?
            .into_iter()
            .filter(|k| k.ends_with(".safetensors") || k.ends_with(".safetensors.enc"))
            .collect())
    }

    /// Removes a weights object; the caller has checked that no kept manifest names it.
    pub fn delete_weights(&self, key: &str) -> Result<(), StoreError> {
        if !key.starts_with(WEIGHTS_PREFIX) {
            return Err(StoreError::Manifest {
                path: PathBuf::from(self.objects.locate(key)),
                message: format!("{key:?} is not a weights object"),
            });
        }
        self.objects.delete(key)
    }

    /// Versions present (those whose manifest exists), ascending.
    pub fn versions(&self) -> Result<Vec<u64>, StoreError> {
        let prefix = self
            .job
            .as_ref()
            .map(|j| format!("{j}/"))
            .unwrap_or_default();
        let mut out: Vec<u64> = if prefix.is_empty() {
            self.objects
                .list("")?
                .into_iter()
                .filter(|k| !k.contains('/'))
                .collect()
        } else {
            self.objects.list(&prefix)?
        }
        .iter()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .strip_prefix('v')?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{add_key, load_key_dir};

    #[test]
    fn versions_are_content_addressed_and_round_trip_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let root = ModelStore::open(dir.path().join("models")).unwrap();
        let store = root.for_job("j");
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
        assert_eq!(
            root.versions().unwrap(),
            Vec::<u64>::new(),
            "the job's, not the root's"
        );
        assert_eq!(store.manifest(1).unwrap(), m1);
        // The same parameters are one object, named by their SHA-256.
        assert_eq!(m0.weights_file, m1.weights_file);
        assert_eq!(m0.sha256, m1.sha256);
        assert_eq!(
            m1.weights_file,
            format!("objects/sha256/{}.safetensors", m1.params_digest)
        );
        let bytes = std::fs::read(dir.path().join("models").join(&m1.weights_file)).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), m1.sha256);
        assert_eq!(m1.params_digest, cohort_protocol::params_digest(&p));
        assert_eq!(store.read_params(1).unwrap(), p);
        // An object that does not match its address is refused.
        std::fs::write(
            dir.path().join("models").join(&m1.weights_file),
            b"tampered",
        )
        .unwrap();
        let e = store.read_weights(1).unwrap_err().to_string();
        assert!(e.contains("differs from the manifest"), "{e}");
    }

    #[test]
    fn encrypted_versions_hold_no_model_bytes_and_survive_key_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("keys");
        add_key(&kdir).unwrap();
        let keys = Arc::new(load_key_dir(&kdir).unwrap());
        let root = ModelStore::open_encrypted(dir.path().join("models"), keys).unwrap();
        let store = root.for_job("j");
        let spec = ModelSpec::Mlp {
            inputs: 20,
            hidden: vec![16],
            classes: 3,
        };
        let p = spec.initial_parameters(3);
        let q = spec.initial_parameters(4);
        let m1 = store.write("j", &spec, "fedavg", 1, &p, None, 6).unwrap();
        store.write("j", &spec, "fedavg", 2, &q, None, 6).unwrap();
        assert!(m1.weights_file.ends_with(".safetensors.enc"));
        let on_disk = std::fs::read(dir.path().join("models").join(&m1.weights_file)).unwrap();
        // No parameter's bytes appear in the file (8-byte runs of the little-endian f32s).
        let raw = cohort_protocol::f32_bytes(&p);
        let leaked = raw
            .chunks_exact(8)
            .filter(|w| on_disk.windows(8).any(|d| d == *w))
            .count();
        assert_eq!(leaked, 0, "{leaked} runs of model bytes found on disk");
        let plain = store.read_weights(1).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&plain)), m1.sha256);
        assert!(m1.weights_file.contains(&m1.params_digest));
        // An encrypted object moved to another address does not decrypt there.
        let m2 = store.manifest(2).unwrap();
        let models = dir.path().join("models");
        std::fs::copy(models.join(&m1.weights_file), models.join(&m2.weights_file)).unwrap();
        assert!(store.read_weights(2).is_err());
        // Writing the version again restores a missing object.
        std::fs::remove_file(models.join(&m2.weights_file)).unwrap();
        store.write("j", &spec, "fedavg", 2, &q, None, 6).unwrap();
        assert_eq!(store.read_params(2).unwrap(), q);
        // Rotate: a new key, every object re-wrapped, the old key removed: still readable.
        add_key(&kdir).unwrap();
        let rotated = root
            .clone()
            .with_keys(Arc::new(load_key_dir(&kdir).unwrap()));
        assert_eq!(rotated.rewrap_all().unwrap(), 2);
        std::fs::remove_file(kdir.join("kek-1.kek")).unwrap();
        let after = ModelStore::open_encrypted(
            dir.path().join("models"),
            Arc::new(load_key_dir(&kdir).unwrap()),
        )
        .unwrap()
        .for_job("j");
        assert_eq!(after.read_weights(1).unwrap(), plain);
        assert_eq!(after.read_params(1).unwrap(), p);
        assert_eq!(after.read_params(2).unwrap(), q);
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
