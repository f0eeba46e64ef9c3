//! The registry's and the key directory's error, and the file helpers they share.

use std::path::{Path, PathBuf};

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
    #[error("object store {location}: {message}")]
    Remote { location: String, message: String },
    #[error("{location}: no such object")]
    Missing { location: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
