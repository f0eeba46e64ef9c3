//! The cohort coordinator: round orchestration ([`round`], a sans-IO state machine),
//! aggregation strategies ([`strategy`]), the model store ([`model_store`]), configuration
//! ([`config`]), the gRPC driver ([`service`]) and its mutual-TLS listener ([`listener`]).

pub mod config;
pub mod listener;
pub mod model_store;
pub mod pkcs11;
pub mod round;
pub mod service;
pub mod strategy;

pub use config::CoordinatorConfig;
pub use model_store::{ModelManifest, ModelStore};
pub use round::{Event, JobConfig, Orchestrator, RoundSummary};
pub use service::Coordinator;
pub use strategy::Strategy;
