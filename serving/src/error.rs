//! What goes wrong in serving: [`ServingError`] for starting and switching versions, and
//! [`Refusal`] for one request, which the gRPC edge ([`crate::api`]) maps to its status code
//! in one place.

use cohort_protocol::tls::TlsError;
use cohort_storage::StoreError;

use crate::settings::InvalidSetting;

/// A service that cannot start, or a version that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error(transparent)]
    Settings(#[from] InvalidSetting),
    #[error("version {version} of job {job:?}: {source}")]
    Read {
        job: String,
        version: u64,
        source: StoreError,
    },
    #[error("version {version} of job {job:?} cannot be served: {message}")]
    Model {
        job: String,
        version: u64,
        message: String,
    },
    #[error("starting an inference worker: {0}")]
    Thread(std::io::Error),
    #[error("reading the serving pointer: {0}")]
    Pointer(StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Why one request was not answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No version has been promoted yet.
    NoVersion,
    /// The request itself is wrong (the text says how).
    Invalid(String),
    /// More examples are waiting than the queue holds.
    QueueFull { waiting: usize, capacity: usize },
    /// The caller is over its examples-per-second rate.
    OverRate { caller: String, rate: f64 },
    /// The forward pass failed.
    Failed(String),
    /// The version's worker is gone.
    WorkerStopped,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoVersion => f.write_str("no model version has been promoted for serving yet"),
            Refusal::Invalid(m) => f.write_str(m),
            Refusal::QueueFull { waiting, capacity } => write!(
                f,
                "the inference queue is full ({waiting} of {capacity} examples waiting); retry \
                 with backoff"
            ),
            Refusal::OverRate { caller, rate } => write!(
                f,
                "{caller}: over the limit of {rate} examples per second; slow down"
            ),
            Refusal::Failed(e) => write!(f, "inference failed: {e}"),
            Refusal::WorkerStopped => f.write_str("the inference worker has stopped"),
        }
    }
}
