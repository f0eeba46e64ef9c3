//! Simulation workers: the virtual engine's participants spread over separate processes
//! (`cohort simulate --workers N`, or a Kubernetes Indexed Job), each owning a contiguous
//! shard of them and speaking cohort's gRPC protocol (`SimulationWorkers`, mutual TLS) to the
//! simulation's driver, the process that runs the state machine and the committee.
//!
//! Each step of the job the driver sends every worker its participants' tasks (the round,
//! the global model, each one's training settings); the worker trains them one after another
//! on its cores, exactly as the single-process engine does, and folds their updates into one
//! partial sum in participant order, which it returns with each participant's signed record
//! (hierarchical aggregation: the encryption is additive). The driver folds the partial sums
//! in shard order. In secure and emulated jobs every sum is exact, so the model equals the
//! single-process engine's bit for bit; in plaintext jobs it is an f64 sum grouped by shard,
//! equal up to rounding.
//!
//! - `driver`: the driver's side: the service the workers dial, starting local workers,
//!   and `Remote`, through which the engine hands out a step and collects its results.
//! - `worker`: the worker process (`cohort sim-worker`, [`run_worker`]).
//! - this module: the step and its result as the engine sees them, their wire forms, and
//!   the worker's fold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use cohort_coordinator::round::{
    Contribution, PartialSum, PartialValues, PartyKeys, SecureRecord, Task,
};
use cohort_crypto::aggregation::RoundInfo;
use cohort_crypto::{Accumulator, Codec, MemberPublic, VerifyKey};
use cohort_model::tabular::{DataSpec, Pipeline};
use cohort_model::{ComputeDevice, Metrics, ModelSpec, TrainConfig};
use cohort_protocol::pb;
use cohort_protocol::secure::{
    bytes32, bytes64, round_from_pb, round_pb, sealed_from_pb, sealed_pb,
};

use super::client::{Client, Done, Step, window, work_window};

pub(super) mod driver;
mod worker;

pub(super) use driver::Remote;
pub use worker::{WorkerArgs, run_worker};

/// A participant of a worker process, as its worker announced it.
#[derive(Debug, Clone)]
pub(super) struct RemoteParticipant {
    pub(super) id: String,
    pub(super) examples: u64,
    pub(super) keys: Option<PartyKeys>,
}

/// What one worker's participants do in one step of the engine.
#[derive(Debug, Clone)]
pub(super) struct ShardStep {
    pub(super) job_id: String,
    pub(super) round: u64,
    pub(super) model_version: u64,
    pub(super) model: ModelSpec,
    pub(super) global: Arc<Vec<f32>>,
    pub(super) secure: Option<Arc<RoundInfo>>,
    /// Emulated secure aggregation: the codec and the round's weight unit.
    pub(super) emulation: Option<(Codec, u64)>,
    pub(super) train: Vec<(String, TrainConfig)>,
    pub(super) evaluate: Vec<String>,
    /// Round 0: participants that send their statistics.
    pub(super) statistics: Vec<String>,
    /// Jobs with tables: their schema, and the pipeline once round 0 fitted it.
    pub(super) data: Option<DataSpec>,
    pub(super) pipeline: Option<Arc<Pipeline>>,
    /// Updates are clipped to this L2 norm (each layer to its share of it, with
    /// `clip_per_layer`).
    pub(super) clip_norm: Option<f64>,
    pub(super) clip_per_layer: bool,
    /// Distributed differential privacy: each client's noise standard deviation.
    pub(super) noise_stddev: Option<f64>,
    /// Adaptive clipping: each client's indicator value.
    pub(super) clip_indicator: Option<f64>,
    /// SCAFFOLD: the server's control variate.
    pub(super) control: Option<Arc<Vec<f32>>>,
}

/// What one worker's participants produced in a step.
#[derive(Debug, Default)]
pub(super) struct ShardResult {
    /// The partial sum of its updates (none when nobody trained or everyone dropped out).
    pub(super) partial: Option<PartialSum>,
    /// (participant, round, metrics).
    pub(super) evaluations: Vec<(String, u64, Metrics)>,
    /// Participants that sent nothing, and why.
    pub(super) unanswered: Vec<(String, String)>,
    pub(super) train_seconds: f64,
    pub(super) encrypt_seconds: f64,
    pub(super) evaluate_seconds: f64,
}

/// The worker's side of a step: its participants work on the Rayon pool in windows of twice
/// the thread count, as in the single-process engine, and their updates are folded into one
/// partial sum in participant order.
pub(super) fn work_shard(
    clients: &mut [Client],
    index: &HashMap<String, usize>,
    step: &ShardStep,
    device: ComputeDevice,
    dropout: f64,
) -> anyhow::Result<ShardResult> {
    let deadline = Instant::now();
    let mut tasks: Vec<(usize, Task)> = Vec::new();
    let position = |id: &str| {
        index
            .get(id)
            .copied()
            .with_context(|| format!("the driver sent a task for {id}, not this worker's"))
    };
    for (id, config) in &step.train {
        tasks.push((
            position(id)?,
            Task::Train {
                round: step.round,
                model_version: step.model_version,
                config: config.clone(),
                deadline,
                secure: step.secure.clone(),
                clip_norm: step.clip_norm,
                clip_per_layer: step.clip_per_layer,
                noise_stddev: step.noise_stddev,
                clip_indicator: step.clip_indicator,
                control: step.control.clone(),
            },
        ));
    }
    for id in &step.statistics {
        tasks.push((
            position(id)?,
            Task::Statistics {
                attempt: step.secure.as_ref().map_or(1, |i| i.attempt),
                deadline,
                secure: step.secure.clone(),
            },
        ));
    }
    for id in &step.evaluate {
        tasks.push((
            position(id)?,
            Task::Evaluate {
                round: step.round,
                model_version: step.model_version,
                deadline,
            },
        ));
    }
    tasks.sort_by_key(|(i, _)| *i);
    if tasks.windows(2).any(|w| w[0].0 == w[1].0) {
        bail!("the driver sent one participant two tasks in a step");
    }
    let work = Step {
        spec: &step.model,
        global: &step.global,
        device,
        quantize: step.emulation,
        dropout,
        data: step.data.as_ref(),
        pipeline: step.pipeline.as_ref(),
    };
    let mut out = ShardResult::default();
    let mut contributions = Vec::new();
    let mut plain: Option<Vec<f64>> = None;
    let mut secure: Option<Accumulator> = None;
    for chunk in tasks.chunks(window()) {
        for (id, training, w) in work_window(clients, chunk, &work) {
            if training {
                out.train_seconds += w.seconds;
            } else {
                out.evaluate_seconds += w.seconds;
            }
            out.encrypt_seconds += w.encrypt_seconds;
            match w.done {
                // The same arithmetic as the state machine's fold of one update.
                Done::Update(u) => {
                    let sum = plain.get_or_insert_with(|| vec![0.0; u.delta.len()]);
                    let weight = u.num_examples as f64;
                    for (a, d) in sum.iter_mut().zip(&u.delta) {
                        *a += weight * *d as f64;
                    }
                    contributions.push(Contribution {
                        id,
                        weight: u.num_examples,
                        train: u.train,
                        secure: None,
                    });
                }
                Done::Secure(u) => {
                    secure
                        .get_or_insert_with(|| Accumulator::new(u.bodies.len()))
                        .add(u.weight, &u.bodies)?;
                    contributions.push(Contribution {
                        id,
                        weight: u.weight,
                        train: u.train,
                        secure: Some(SecureRecord {
                            bodies_sha256: u.bodies_sha256,
                            pieces: u.pieces,
                            signature: u.signature,
                        }),
                    });
                }
                Done::Evaluated { round, metrics } => out.evaluations.push((id, round, metrics)),
                Done::Nothing(why) => out.unanswered.push((id, why)),
                Done::Unfit(why) => bail!("{id}: its data does not fit the job: {why}"),
                Done::DroppedOut => out.unanswered.push((id, "dropped out".into())),
            }
        }
    }
    let values = match (plain, secure) {
        (Some(p), None) => Some(PartialValues::Plain(p)),
        (None, Some(a)) => Some(PartialValues::Secure(a.sum().to_vec())),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("plaintext and encrypted updates in one step"),
    };
    out.partial = values.map(|values| PartialSum {
        round: step.round,
        contributions,
        values,
    });
    Ok(out)
}

// The wire forms.

pub(super) fn keys_pb(k: &PartyKeys) -> pb::SecureKeys {
    pb::SecureKeys {
        seal_key: k.seal.0.to_vec(),
        verify_key: k.verify.0.to_vec(),
        binding: Vec::new(),
    }
}

pub(super) fn keys_from_pb(k: &pb::SecureKeys) -> anyhow::Result<PartyKeys> {
    Ok(PartyKeys {
        seal: MemberPublic(bytes32(&k.seal_key, "seal_key")?),
        verify: VerifyKey(bytes32(&k.verify_key, "verify_key")?),
        binding: None,
    })
}

impl ShardStep {
    pub(super) fn to_pb(&self, step: u64) -> pb::WorkStep {
        pb::WorkStep {
            step,
            finished: false,
            round: self.round,
            model_version: self.model_version,
            global: cohort_protocol::f32_bytes(&self.global),
            secure: self.secure.as_deref().map(round_pb),
            emulation: self.emulation.map(|(c, unit)| pb::Emulation {
                delta_log: c.delta_log,
                frac_bits: c.frac_bits,
                clip: c.clip,
                max_total_weight: c.max_total_weight,
                weight_unit: unit,
            }),
            train: self
                .train
                .iter()
                .map(|(id, config)| pb::ClientTraining {
                    participant_id: id.clone(),
                    config: Some(config.into()),
                })
                .collect(),
            evaluate: self.evaluate.clone(),
            job_id: self.job_id.clone(),
            model: Some((&self.model).into()),
            statistics: self.statistics.clone(),
            clip_norm: self.clip_norm,
            clip_per_layer: self.clip_per_layer,
            noise_stddev: self.noise_stddev,
            clip_indicator: self.clip_indicator,
            control: self
                .control
                .as_deref()
                .map(|c| cohort_protocol::f32_bytes(c))
                .unwrap_or_default(),
            data_spec_json: self
                .data
                .as_ref()
                .map(|d| serde_json::to_string(d).expect("a data spec serialises"))
                .unwrap_or_default(),
            pipeline_json: self
                .pipeline
                .as_ref()
                .map(|p| serde_json::to_string(&**p).expect("a pipeline serialises"))
                .unwrap_or_default(),
        }
    }

    pub(super) fn from_pb(m: &pb::WorkStep) -> anyhow::Result<Self> {
        if !m.global.len().is_multiple_of(4) {
            bail!(
                "a global model of {} bytes (not whole f32s)",
                m.global.len()
            );
        }
        let global = f32s(&m.global);
        if !m.control.is_empty() && m.control.len() != m.global.len() {
            bail!(
                "a control variate of {} bytes for a model of {}",
                m.control.len(),
                m.global.len()
            );
        }
        let model = m.model.as_ref().context("a step without its model")?;
        Ok(ShardStep {
            job_id: m.job_id.clone(),
            round: m.round,
            model_version: m.model_version,
            model: ModelSpec::try_from(model).map_err(anyhow::Error::msg)?,
            global: Arc::new(global),
            secure: m
                .secure
                .as_ref()
                .map(|s| round_from_pb(&m.job_id, m.round, s).map(Arc::new))
                .transpose()?,
            emulation: m.emulation.as_ref().map(|e| {
                (
                    Codec {
                        delta_log: e.delta_log,
                        frac_bits: e.frac_bits,
                        clip: e.clip,
                        max_total_weight: e.max_total_weight,
                    },
                    e.weight_unit,
                )
            }),
            train: m
                .train
                .iter()
                .map(|t| {
                    let config = t.config.as_ref().context("training without its settings")?;
                    Ok((
                        t.participant_id.clone(),
                        TrainConfig::try_from(config).map_err(anyhow::Error::msg)?,
                    ))
                })
                .collect::<anyhow::Result<_>>()?,
            evaluate: m.evaluate.clone(),
            statistics: m.statistics.clone(),
            clip_norm: m.clip_norm,
            clip_per_layer: m.clip_per_layer,
            noise_stddev: m.noise_stddev,
            clip_indicator: m.clip_indicator,
            control: (!m.control.is_empty()).then(|| Arc::new(f32s(&m.control))),
            data: (!m.data_spec_json.is_empty())
                .then(|| serde_json::from_str(&m.data_spec_json))
                .transpose()
                .context("the step's data spec")?,
            pipeline: (!m.pipeline_json.is_empty())
                .then(|| serde_json::from_str(&m.pipeline_json).map(Arc::new))
                .transpose()
                .context("the step's pipeline")?,
        })
    }
}

/// Little-endian f32 values (whole ones: checked by the caller).
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// Contributions a result part carries at most (their sealed pieces make each a few KB).
const CONTRIBUTIONS_PER_PART: usize = 256;

impl ShardResult {
    /// The result as the parts of a `SubmitStep` stream, made as they are sent: the first
    /// carries the sum, the seconds and the evaluations; contributions follow in parts of
    /// bounded size (a worker's thousands of sealed key pieces are never copied at once).
    pub(super) fn into_parts(
        self,
        shard: u32,
        step: u64,
    ) -> impl Iterator<Item = pb::StepResult> + Send + 'static {
        let mut first = pb::StepResult {
            shard,
            step,
            evaluations: self
                .evaluations
                .iter()
                .map(|(id, _, m)| pb::WorkerEvaluation {
                    participant_id: id.clone(),
                    metrics: Some(m.into()),
                })
                .collect(),
            unanswered: self
                .unanswered
                .iter()
                .map(|(id, why)| pb::Unanswered {
                    participant_id: id.clone(),
                    dropped_out: why == "dropped out",
                    reason: why.clone(),
                })
                .collect(),
            train_seconds: self.train_seconds,
            encrypt_seconds: self.encrypt_seconds,
            evaluate_seconds: self.evaluate_seconds,
            ..Default::default()
        };
        let contributions = match self.partial {
            None => Vec::new(),
            Some(p) => {
                match &p.values {
                    PartialValues::Plain(v) => {
                        first.plain_sum = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    }
                    PartialValues::Secure(v) => {
                        first.secure_sum = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    }
                }
                p.contributions
            }
        };
        let mut rest = contributions.into_iter().peekable();
        let more = std::iter::from_fn(move || {
            rest.peek()?;
            let contributions = rest
                .by_ref()
                .take(CONTRIBUTIONS_PER_PART)
                .map(|c| {
                    let (bodies_sha256, pieces, signature) = match c.secure {
                        Some(s) => (
                            s.bodies_sha256.to_vec(),
                            s.pieces.iter().map(sealed_pb).collect(),
                            s.signature.to_vec(),
                        ),
                        None => Default::default(),
                    };
                    pb::Contribution {
                        participant_id: c.id,
                        weight: c.weight,
                        train: c.train.as_ref().map(Into::into),
                        bodies_sha256,
                        pieces,
                        signature,
                    }
                })
                .collect();
            Some(pb::StepResult {
                shard,
                step,
                contributions,
                ..Default::default()
            })
        });
        std::iter::once(first).chain(more)
    }
}

/// A result reassembled part by part as it arrives (each part converted and dropped).
pub(super) struct ResultParts {
    out: ShardResult,
    values: Option<PartialValues>,
    round: u64,
    contributions: Vec<Contribution>,
}

impl ResultParts {
    /// From the first part; `round` is the step's.
    pub(super) fn first(first: pb::StepResult, round: u64) -> anyhow::Result<Self> {
        let mut out = ShardResult {
            train_seconds: first.train_seconds,
            encrypt_seconds: first.encrypt_seconds,
            evaluate_seconds: first.evaluate_seconds,
            ..Default::default()
        };
        let words = |b: &[u8], what: &str| -> anyhow::Result<Vec<[u8; 8]>> {
            if !b.len().is_multiple_of(8) {
                bail!("{what} of {} bytes (not whole 8-byte words)", b.len());
            }
            Ok(b.chunks_exact(8)
                .map(|w| w.try_into().expect("8 bytes"))
                .collect())
        };
        let values = match (first.plain_sum.is_empty(), first.secure_sum.is_empty()) {
            (true, true) => None,
            (false, true) => Some(PartialValues::Plain(
                words(&first.plain_sum, "plain_sum")?
                    .into_iter()
                    .map(f64::from_le_bytes)
                    .collect(),
            )),
            (true, false) => Some(PartialValues::Secure(
                words(&first.secure_sum, "secure_sum")?
                    .into_iter()
                    .map(u64::from_le_bytes)
                    .collect(),
            )),
            (false, false) => bail!("a result with both a plaintext and a secure sum"),
        };
        for e in &first.evaluations {
            let m = e
                .metrics
                .as_ref()
                .context("an evaluation without metrics")?;
            out.evaluations.push((
                e.participant_id.clone(),
                round,
                Metrics::try_from(m).map_err(anyhow::Error::msg)?,
            ));
        }
        out.unanswered = first
            .unanswered
            .iter()
            .map(|u| (u.participant_id.clone(), u.reason.clone()))
            .collect();
        let mut parts = ResultParts {
            out,
            values,
            round,
            contributions: Vec::new(),
        };
        parts.push(first)?;
        Ok(parts)
    }

    /// A further part's contributions.
    pub(super) fn push(&mut self, part: pb::StepResult) -> anyhow::Result<()> {
        for c in part.contributions {
            let secure = if c.signature.is_empty() {
                None
            } else {
                Some(SecureRecord {
                    bodies_sha256: bytes32(&c.bodies_sha256, "bodies_sha256")?,
                    pieces: c
                        .pieces
                        .iter()
                        .map(sealed_from_pb)
                        .collect::<Result<_, _>>()?,
                    signature: bytes64(&c.signature, "signature")?,
                })
            };
            self.contributions.push(Contribution {
                train: c
                    .train
                    .as_ref()
                    .map(Metrics::try_from)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                id: c.participant_id,
                weight: c.weight,
                secure,
            });
        }
        Ok(())
    }

    pub(super) fn finish(self) -> anyhow::Result<ShardResult> {
        let mut out = self.out;
        out.partial = match self.values {
            Some(values) => Some(PartialSum {
                round: self.round,
                contributions: self.contributions,
                values,
            }),
            None if self.contributions.is_empty() => None,
            None => bail!("contributions without a sum"),
        };
        Ok(out)
    }
}
