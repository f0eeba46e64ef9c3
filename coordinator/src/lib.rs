//! The cohort coordinator: round orchestration ([`round`], a sans-IO state machine),
//! aggregation strategies ([`strategy`]), the model store ([`model_store`]), configuration
//! ([`config`]), the gRPC driver ([`service`]) and its mutual-TLS listener ([`listener`]).

pub mod admin;
pub mod config;
mod control;
pub mod inference;
pub mod listener;
pub mod metrics;
pub mod model_store;
pub mod pkcs11;
pub mod round;
pub mod service;
pub mod state;
pub mod strategy;

pub use config::CoordinatorConfig;
pub use inference::{Inference, InferenceSettings};
pub use model_store::{ModelManifest, ModelStore};
pub use round::{Event, JobConfig, Orchestrator, RoundSummary};
pub use service::{Admission, Coordinator};
pub use state::State;
pub use strategy::Strategy;
