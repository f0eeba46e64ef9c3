//! The cohort coordinator: round orchestration ([`round`], a sans-IO state machine),
//! aggregation strategies ([`strategy`]), the model store ([`ModelStore`]), configuration
//! ([`config`]), the gRPC services and their driver ([`Coordinator`]), and the Admin API
//! ([`admin`]).

pub mod admin;
mod commit;
pub mod config;
mod control;
mod driver;
pub mod edge;
mod federation;
mod guard;
pub mod metrics;
pub mod privacy;
pub mod robust;
pub mod round;
mod server;
pub mod strategy;

pub use cohort_serving::{Inference, InferenceSettings};
pub use cohort_storage::{ModelManifest, ModelStore, State};
pub use config::CoordinatorConfig;
pub use control::ControlError;
pub use driver::{Admission, Coordinator, CoordinatorError, NoJob};
pub use round::{Event, JobConfig, Orchestrator, RoundSummary};
pub use server::raise_open_files_limit;
pub use strategy::Strategy;
