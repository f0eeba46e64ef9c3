//! Where the registry's objects live: a local directory (every write goes to a temporary
//! name, is synced and renamed, so a reader never sees half an object) or an S3-compatible
//! object store (through `object_store`).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{StoreError, io, write_atomic};

/// Where the registry's objects live: put, get and list by key (`/`-separated).
pub trait Objects: Send + Sync + std::fmt::Debug {
    /// Stores `bytes` under `key`, replacing what was there, atomically.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The object under `key` ([`StoreError::Missing`] when there is none).
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;
    fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// Keys that start with `prefix` (which ends with `/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Removes the object under `key`; removing one that is not there is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Where `key` is, for people: a path or a URL.
    fn locate(&self, key: &str) -> String;
}

/// Objects as files under a directory.
#[derive(Debug, Clone)]
pub struct LocalObjects {
    root: PathBuf,
}

impl LocalObjects {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(LocalObjects { root })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

impl Objects for LocalObjects {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let p = self.path(key);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        write_atomic(&p, bytes)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.path(key);
        std::fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::Missing {
                location: p.display().to_string(),
            },
            _ => StoreError::Io { path: p, source: e },
        })
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.path(key).is_file())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.path(prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        let mut stack = vec![(dir, prefix.trim_end_matches('/').to_string())];
        while let Some((d, k)) = stack.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::Io { path: d, source: e }),
            };
            for entry in entries {
                let entry = entry.map_err(io(&d))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let key = if k.is_empty() {
                    name
                } else {
                    format!("{k}/{name}")
                };
                if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
                    stack.push((entry.path(), key));
                } else if !key.ends_with(".tmp") {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { path: p, source: e })
            }
            _ => Ok(()),
        }
    }

    fn locate(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
}

/// `[model_store.s3]`: an S3-compatible bucket. Credentials come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Keys are written under this prefix (several federations can share a bucket).
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// An S3-compatible server (MinIO, Ceph, …); AWS when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allow a plain-HTTP endpoint (a server on the same host or a test server).
    #[serde(default)]
    pub allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// Objects in an S3-compatible bucket, through `object_store`. Its calls run on a runtime of
/// its own, on a short-lived thread, so the store can be used from any thread, inside a
/// tokio runtime or not.
pub struct S3Objects {
    store: Arc<dyn object_store::ObjectStore>,
    prefix: String,
    url: String,
    /// Taken only in `drop`.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for S3Objects {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside async code; this does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Objects").field("url", &self.url).finish()
    }
}

impl S3Objects {
    /// A bucket, with credentials from the environment.
    pub fn new(cfg: &S3Config) -> Result<Self, StoreError> {
        Self::build(cfg, object_store::aws::AmazonS3Builder::from_env())
    }

    /// A bucket, with the credentials given (tools and tests; the coordinator reads them
    /// from the environment).
    pub fn with_credentials(
        cfg: &S3Config,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<Self, StoreError> {
        Self::build(
            cfg,
            object_store::aws::AmazonS3Builder::new()
                .with_access_key_id(access_key_id)
                .with_secret_access_key(secret_access_key),
        )
    }

    fn build(
        cfg: &S3Config,
        builder: object_store::aws::AmazonS3Builder,
    ) -> Result<Self, StoreError> {
        let url = format!("s3://{}/{}", cfg.bucket, cfg.prefix.trim_matches('/'));
        let bad = |e: &dyn std::fmt::Display| StoreError::Remote {
            location: url.clone(),
            message: e.to_string(),
        };
        let mut b = builder
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_allow_http(cfg.allow_http);
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        let store = b.build().map_err(|e| bad(&e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cohort-s3")
            .enable_all()
            .build()
            .map_err(|e| bad(&e))?;
        Ok(S3Objects {
            store: Arc::new(store),
            prefix: cfg.prefix.trim_matches('/').to_string(),
            url,
            rt: Some(rt),
        })
    }

    fn path(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs `f` to completion on this store's runtime, from a thread outside any runtime.
    fn run<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.rt.as_ref().expect("taken only in drop").block_on(f))
                .join()
                .expect("object store call panicked")
        })
    }

    fn err(&self, key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::Missing {
                location: self.locate(key),
            },
            e => StoreError::Remote {
                location: self.locate(key),
                message: e.to_string(),
            },
        }
    }
}

impl Objects for S3Objects {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let payload = object_store::PutPayload::from(bytes.to_vec());
        self.run(self.store.put(&self.path(key), payload))
            .map(|_| ())
            .map_err(|e| self.err(key, e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.run(async {
            let r = self.store.get(&self.path(key)).await?;
            r.bytes().await
        })
        .map(|b| b.to_vec())
        .map_err(|e| self.err(key, e))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.run(self.store.head(&self.path(key))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let p = self.path(prefix.trim_end_matches('/'));
        let metas: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(Some(&p)).try_collect())
            .map_err(|e| self.err(prefix, e))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(String::from))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.run(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn locate(&self, key: &str) -> String {
        format!("{}/{key}", self.url.trim_end_matches('/'))
    }
}
