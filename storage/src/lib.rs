//! cohort's durable storage: the coordinator's [`State`] (participants, jobs, completed rounds,
//! model versions, the serving history, the audit log) in an embedded ACID database, and the
//! model registry ([`ModelStore`]): content-addressed versions on a local disk or in an
//! S3-compatible bucket, optionally encrypted at rest with keys from a key directory or a
//! PKCS#11 token.
//!
//! Modules, in dependency order (no cycles): [`records`] (the plain records both keep) and
//! [`error`]; [`objects`] (where registry objects live) and [`keys`] / [`pkcs11`] (key
//! providers); [`registry`]; [`backend`] (the state's transactional store) and [`state`], then [`retention`] (pruning the state's growing parts); [`settings`] (the configuration sections, and
//! opening a registry from them).

pub mod backend;
pub mod error;
pub mod keys;
pub mod objects;
pub mod pkcs11;
pub mod records;
pub mod registry;
pub mod retention;
pub mod settings;
pub mod state;

pub use error::StoreError;
pub use keys::{add_key, load_key_dir};
pub use objects::{LocalObjects, Objects, S3Config, S3Objects};
pub use records::{
    ModelManifest, ModelRef, ParticipantId, RoundClipping, RoundPrivacy, RoundSummary,
};
pub use registry::ModelStore;
pub use retention::{Pruned, Retention};
pub use settings::{OpenError, open_registry};
pub use state::{State, StateError};
