//! cohort's inference service: the promoted global model answering `Predict`, `PredictBatch` and
//! `ModelInfo` over gRPC, in `cohort serve` or embedded in the coordinator.
//!
//! - **Workers.** Each served version runs on one OS thread that owns its Burn model (wgpu or
//!   CPU, f32 or int8). Requests reach it through a queue; the worker takes what is
//!   waiting, up to `max_batch` examples or until the oldest has waited `max_wait_us`, and
//!   runs them as one forward pass (micro-batching). Examples waiting across all workers are
//!   bounded by `queue`: past it a request is refused with `RESOURCE_EXHAUSTED` at once, so
//!   memory stays bounded and callers back off.
//! - **Hot reload.** A switch builds the new version's workers (weights read and checked from
//!   the registry, model built, one warm-up pass) before it swaps the deployment pointer. A
//!   request holds the deployment it started with, so requests in flight finish on the old
//!   version; the old workers exit when the last of them is answered. No request fails.
//! - **A/B.** With `[inference.candidate]`, a second version of the promoted job takes a
//!   fixed share of requests (a low-discrepancy sequence, so the share is exact over any
//!   window). Every answer names its version and variant; metrics are per version.

//!
//! It reads versions from the model registry (`cohort_storage`) and knows nothing of the
//! coordinator, which embeds it with `[inference]`. Modules, in dependency order (no cycles):
//! [`settings`], [`error`], [`metrics`], `worker` (one served version's thread),
//! `deployment` ([`Inference`]: versions, hot reload, A/B), [`api`] (the gRPC edge) and
//! [`server`] (`cohort serve`); [`config`] is `serve.toml`.

pub mod api;
pub mod config;
mod deployment;
pub mod error;
pub mod metrics;
pub mod server;
pub mod settings;
mod worker;

pub use api::InferenceApi;
pub use config::ServeConfig;
pub use deployment::Inference;
pub use error::{Refusal, ServingError};
pub use metrics::InferenceMetrics;
pub use server::serve_alone;
pub use settings::{Candidate, DeviceChoice, InferenceSettings, InvalidSetting};

#[cfg(test)]
mod tests;
