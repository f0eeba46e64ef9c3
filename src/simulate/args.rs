//! `cohort simulate`'s command line: [`SimArgs`] and its choices.

use std::path::PathBuf;

use anyhow::bail;
use cohort_model::{ComputeDevice, Optimizer, Partition, Sharing};

use super::data;

#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of participants.
    #[arg(long, default_value_t = 3)]
    pub participants: usize,
    /// Training rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Local learning rate (default: 0.1 for sgd, 0.001 for adam).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Local optimizer: sgd or adam.
    #[arg(long, default_value = "sgd")]
    pub optimizer: Optimizer,
    /// Seed of partitioning, splits, model initialisation and shuffling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A CSV file (with --label), or an MNIST-style IDX directory such as
    /// /usr/share/datasets/fashion-mnist. Default: the bundled breast-cancer table.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// CSV label column: a name, a zero-based index, or "last".
    #[arg(long, default_value = "last")]
    pub label: String,
    /// How the data is spread: iid, roundrobin (row i to participant i mod N),
    /// dirichlet:ALPHA (label skew) or shards:K.
    #[arg(long, default_value = "iid")]
    pub partition: Partition,
    /// Share of each participant's table held out for evaluation (CSV data; IDX data uses
    /// its own test set).
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// How CSV tables are prepared: `federation` (one pipeline for every site from the
    /// federation's statistics: missing values imputed, categories one-hot encoded,
    /// standardised), `site` (each site standardises with its own statistics; numbers only),
    /// or `auto` (federation when the table has missing values or text categories, or when
    /// sites hold fewer than 50 training rows on average).
    #[arg(long, default_value = "auto")]
    pub preprocess: data::Preprocess,
    /// Refuse missing values instead of imputing them (strict mode; the same as `--impute
    /// refuse`).
    #[arg(long, conflicts_with = "impute")]
    pub no_impute: bool,
    /// How the federation's pipeline fills missing values: mean (numbers; categories take the
    /// most frequent), most-frequent, constant:VALUE (numbers; categories all zeros) or refuse.
    #[arg(long)]
    pub impute: Option<cohort_model::tabular::Impute>,
    /// Add a 0/1 feature after every column, set where the value was missing.
    #[arg(long)]
    pub missing_indicators: bool,
    /// Hidden layer sizes for tables, e.g. 32,16 (none: logistic regression).
    #[arg(long, value_delimiter = ',', conflicts_with = "model")]
    pub hidden: Vec<usize>,
    /// A model declared as a stack of layers: a TOML file with `kind = "layers"` and
    /// `[[layers]]` tables (or a job specification's `[model]` table). The input shape and
    /// the classes may be left out: they are then the dataset's. Default: a CNN for images,
    /// an MLP (`--hidden`) or logistic regression for tables.
    #[arg(long, conflicts_with = "custom_model")]
    pub model: Option<std::path::PathBuf>,
    /// A Burn module registered under this name in this process: for programs built on
    /// cohort's crates (`cohort_model::custom::register`, `examples/custom_model.rs`). Its
    /// input shape and classes are the dataset's.
    #[arg(long, conflicts_with = "hidden")]
    pub custom_model: Option<String>,
    /// Share of participants selected each round.
    #[arg(long, default_value_t = 1.0)]
    pub fraction: f64,
    /// Participants drawn a round, instead of a `--fraction` of them.
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// `uniform`: a fixed number a round, without replacement; `poisson`: each participant
    /// independently with probability `--fraction` (the round's size varies).
    #[arg(long, default_value = "uniform")]
    pub sampling: SamplingArg,
    /// Share of the participants that evaluate each round's model on their held-out rows
    /// (a seeded draw; cross-device studies evaluate on a sample).
    #[arg(long, default_value_t = 1.0)]
    pub evaluate_fraction: f64,
    /// Server strategy: fedavg, fedavgm, fedprox (with --proximal-mu), scaffold, fedadagrad,
    /// fedadam or fedyogi (each sees only the mean update, so each works with secure
    /// aggregation); with --plaintext also median, trimmed-mean, krum or multi-krum.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    #[arg(long, default_value_t = 1.0)]
    pub server_lr: f64,
    /// FedAvgM's server momentum β, in [0, 1).
    #[arg(long, default_value_t = 0.9)]
    pub server_momentum: f64,
    /// FedProx's proximal coefficient μ: local training adds μ/2 · ‖w − w_global‖² to its
    /// loss (needed by --strategy fedprox; composes with any strategy).
    #[arg(long, default_value_t = 0.0)]
    pub proximal_mu: f64,
    /// Local SGD's momentum (PyTorch's form; 0: plain SGD).
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// Local L2 weight decay λ (adds λ·w to every gradient).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Differential privacy: distributed (each participant adds discrete Gaussian noise to
    /// its encoded update inside secure aggregation) or central (the coordinator adds
    /// Gaussian noise to the aggregate). Needs --clip-norm, and --noise-multiplier or
    /// --target-epsilon.
    #[arg(long)]
    pub dp: Option<cohort_coordinator::privacy::Mechanism>,
    /// The noise's standard deviation over the clip norm (the sum's sensitivity).
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// ε the whole run may spend (at --delta): without --noise-multiplier, the smallest
    /// multiplier that keeps every round within it is chosen before the run; the job stops
    /// before a round that would exceed it.
    #[arg(long)]
    pub target_epsilon: Option<f64>,
    /// δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Clip each layer to its share of --clip-norm (√(n_l / d) of it) instead of the whole
    /// update.
    #[arg(long)]
    pub clip_per_layer: bool,
    /// Adaptive clipping: the clip norm (starting at --clip-norm) follows this quantile of
    /// the update norms, from the securely summed count of updates within it.
    #[arg(long)]
    pub clip_quantile: Option<f64>,
    /// Each participant scales its update down to this L2 norm before sending it.
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Compute device for training and evaluation: cpu or wgpu.
    #[arg(long, default_value = "cpu")]
    pub device: ComputeDevice,
    /// How participants training at the same time share this machine's cores: per-core (one
    /// training per core, each on one thread), one-at-a-time (each on all cores) or
    /// unmanaged (all at once on one pool).
    #[arg(long, default_value = "per-core")]
    pub sharing: Sharing,
    /// Seconds a round may take before stragglers are left out.
    #[arg(long, default_value_t = 600.0)]
    pub round_timeout: f64,
    /// Where model versions go (default: `runs/simulate-<time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a JSON summary here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write each participant's rows as JSON here ({"train": [[row, ...], ...], "test":
    /// [...]}, zero-based rows of the IDX training and test files, or of the CSV table), so
    /// another framework can be run on exactly the same shares.
    #[arg(long)]
    pub export_partition: Option<PathBuf>,
    /// Draw accuracy per round as an SVG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Skip the centralised baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Run plaintext rounds: no secure aggregation, the coordinator sees every update.
    /// For research comparisons only.
    #[arg(long)]
    pub plaintext: bool,
    /// Secure aggregation committee size per round (threshold: a strict majority).
    #[arg(long, default_value_t = 5)]
    pub committee: usize,
    /// Run this many dedicated key custodians (no data) as the committee, instead of
    /// drawing it from the participants.
    #[arg(long, default_value_t = 0)]
    pub custodians: usize,
    /// No progress bar or table (the report and exit code still tell the outcome).
    #[arg(long, short)]
    pub quiet: bool,
    /// How participants run: `networked` (each a gRPC client over mutual TLS to a real
    /// coordinator service), `virtual` (data shards driven in this process by the same state
    /// machine, memory O(model × cores)), or `auto` (virtual above 100 participants).
    #[arg(long, default_value = "auto")]
    pub engine: Engine,
    /// Secure aggregation as deployed (`full`: every update encrypted, the sum decrypted by
    /// the committee), or `emulated` by its exact integer arithmetic (the same codec and
    /// weights, no encryption: the same model bit for bit, much faster; virtual engine only,
    /// and the report says so).
    #[arg(long, default_value = "full")]
    pub secure: SecureMode,
    /// Append each round to this CSV file as it completes (round, participants, stragglers,
    /// losses, accuracies, AUC, seconds), for following long runs.
    #[arg(long)]
    pub rounds_log: Option<PathBuf>,
    /// Fault injection, virtual engine: each participant selected for a round drops out of it
    /// (its update never arrives) with this probability, drawn from the round's seed; the
    /// round goes on without it at its deadline, as in a real federation.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Virtual engine: an availability trace, a CSV file `participant,from_round,to_round`
    /// (inclusive intervals; a participant listed is online only in its intervals, others
    /// always): offline participants are neither selected nor asked to evaluate.
    #[arg(long)]
    pub availability: Option<PathBuf>,
    /// Run the participants in this many worker processes (virtual engine), each owning a
    /// shard of them and sending one partial sum a round over mutual-TLS gRPC; this process
    /// runs the state machine and the committee (dedicated --custodians in secure jobs).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// With --workers: listen for workers started elsewhere (`cohort sim-worker`, e.g. a
    /// Kubernetes Indexed Job) on this address instead of starting them here.
    #[arg(long)]
    pub workers_listen: Option<std::net::SocketAddr>,
    /// With --workers-listen: directory with the driver's TLS material (ca.pem, driver.pem,
    /// driver.key, and crl.pem if any).
    #[arg(long)]
    pub workers_tls: Option<PathBuf>,
    /// The cohort executable local workers run (default: this one).
    #[arg(long, hide = true)]
    pub worker_command: Option<PathBuf>,
}

/// How secure aggregation runs in a simulation (`--secure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecureMode {
    Full,
    Emulated,
}

/// How a round's participants are drawn (`--sampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplingArg {
    Uniform,
    Poisson,
}

/// How simulated participants run (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    Auto,
    Networked,
    Virtual,
}

impl Engine {
    /// Participants above which `auto` takes the virtual engine.
    pub const AUTO_VIRTUAL_ABOVE: usize = 100;

    /// The engine that runs: `auto` takes the virtual one above the threshold or when a
    /// feature only it has is asked for (`virtual_only`), which `networked` refuses.
    pub(super) fn resolve(self, participants: usize, virtual_only: bool) -> anyhow::Result<Engine> {
        Ok(match self {
            Engine::Networked if virtual_only => bail!(
                "--secure emulated, --dropout, --availability and --workers run in the virtual \
                 engine: drop --engine networked"
            ),
            Engine::Auto if virtual_only || participants > Self::AUTO_VIRTUAL_ABOVE => {
                Engine::Virtual
            }
            Engine::Auto => Engine::Networked,
            e => e,
        })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Networked => "networked",
            Engine::Virtual => "virtual",
        }
    }
}
