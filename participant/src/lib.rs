//! The cohort participant: a node agent that runs next to its data, dials out to the
//! coordinator, trains in the rounds it is given, and sends back only its update and metrics.
//!
//! [`LocalData::prepare`] holds out a test split and standardises with statistics fitted on
//! this participant's own training data only. [`run`] is the agent loop: join, long-poll for
//! tasks, fetch the global model, train or evaluate, upload; reconnect and rejoin when the
//! coordinator goes away; leave when the job is finished.
//!
//! Layout: `agent` (the loop and task dispatch), `session` (connecting, fetching the model,
//! heartbeats), `training` (local training and evaluation tasks, the upload), `committee`
//! (this node's secure-aggregation keys and its answers as a committee member), `controls`
//! (SCAFFOLD's control variates, kept between rounds), `data`
//! (the local split), `config` (`participant.toml`). The modules share this file's imports.

mod agent;
mod committee;
pub mod config;
mod controls;
mod data;
mod session;
mod training;

use agent::agent;
use committee::*;
use controls::Controls;
pub use data::{Held, LocalData, NotReady, SiteCsv, SiteData, SiteTables};
use session::*;
use training::*;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_crypto::aggregation::{self, ShareRequest};
use cohort_crypto::{MemberPolicy, MemberSecret, RoundSeed, SeedLog, Signer25519};
use cohort_protocol::secure::{bytes32, bytes64, record_from_pb, round_from_pb, sealed_from_pb};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

use cohort_model::{
    ComputeDevice, ComputeSlots, Dataset, Metrics, ModelSpec, Standardizer, TrainConfig,
};
use cohort_protocol::pb::federation_client::FederationClient;
use cohort_protocol::pb::{self, task::Kind};
use cohort_protocol::{MAX_MESSAGE_BYTES, ParamAssembler};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use config::ParticipantConfig;

/// Errors that end the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("coordinator address {0:?} is not a valid URI: {1}")]
    Address(String, String),
    #[error("coordinator refused: {0}")]
    Refused(Status),
    /// This node's own certificate has expired (or cannot be read): the coordinator would
    /// refuse every connection, so the node stops at once, saying so.
    #[error("{0}")]
    Certificate(String),
    #[error("{0}")]
    Model(#[from] cohort_model::ModelError),
    #[error("{0}")]
    Data(#[from] cohort_model::DataError),
    #[error("protocol: {0}")]
    Protocol(#[from] cohort_protocol::ProtocolError),
    #[error("stopped before the job finished")]
    Stopped,
}

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub id: String,
    /// e.g. "http://127.0.0.1:7400".
    pub coordinator: String,
    pub device: ComputeDevice,
    /// How long each PollTask may wait on the coordinator.
    pub poll_wait: Duration,
    /// Give up after failing to reach the coordinator for this long.
    pub reconnect_for: Duration,
    /// Deliberate misbehaviour for fault-injection tests; none in normal operation.
    pub faults: Faults,
    /// Mutual TLS towards the coordinator (`https://` addresses); also binds this node's
    /// secure-aggregation keys to its certificate and checks other nodes' bindings. `None`
    /// only for development against an `--insecure-dev` coordinator.
    pub tls: Option<cohort_protocol::tls::NodeTls>,
    /// When a job finishes, wait for the coordinator's next job instead of exiting (a node
    /// of a long-running federation).
    pub stay_between_jobs: bool,
    /// Cores shared with other participants training in the same process (a simulation);
    /// `None`: train on the process-wide pool, every core (a node of its own).
    pub compute: Option<Arc<ComputeSlots>>,
    /// Refuse to train for a task whose distributed differential-privacy noise is absent or
    /// below this noise multiplier (a participant's own floor: the coordinator sizes the
    /// noise, and one that asked for less would weaken everyone's guarantee).
    pub min_noise_multiplier: Option<f64>,
    /// Where this node keeps what it must remember between rounds (SCAFFOLD's control
    /// variate, one file per job); `None`: in memory only, so a restarted node starts its
    /// control variate again from zeros.
    pub state_dir: Option<std::path::PathBuf>,
}

/// Deliberate misbehaviour (`[faults]`), for fault-injection tests; none by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Wait this long after training before each upload (a slow link or a straggler).
    pub upload_delay: Duration,
    /// As a committee member, wait this long after each decryption request before fetching
    /// its input and answering (a custodian whose link fails while it decrypts).
    pub answer_delay: Duration,
}

/// How often a node between jobs asks whether a new one has started.
const BETWEEN_JOBS_POLL: Duration = Duration::from_secs(2);

/// What the agent did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReport {
    pub rounds_trained: u64,
    pub evaluations: u64,
    pub updates_refused: u64,
    /// Decryption shares sent as a committee member.
    pub shares_sent: u64,
}

/// The agent loop. Returns when the job is finished, or with an error when the coordinator
/// refuses this participant or cannot be reached for `reconnect_for`.
/// `data` is a [`LocalData`] ready for the model, or a job's [`SiteTables`] (prepared once
/// the job's round 0 has fitted the federation's pipeline).
pub async fn run(opts: AgentOptions, data: impl Into<SiteData>) -> Result<AgentReport, AgentError> {
    agent(opts, Some(data.into())).await
}

/// A dedicated key custodian: joins with its keys, holds no data, and only answers the
/// committee's decryption requests. Returns when the job is finished.
pub async fn run_custodian(opts: AgentOptions) -> Result<AgentReport, AgentError> {
    agent(opts, None).await
}
