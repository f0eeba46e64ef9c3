//! A virtual participant ([`Client`]) and its work: local training with the round's seed,
//! the update encrypted under a fresh key (or quantized, when secure aggregation is
//! emulated), federated evaluation, and a committee member's decryption share, each as the
//! participant agent does it. The virtual engine and simulation workers run them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use cohort_coordinator::Orchestrator;
use cohort_coordinator::round::{PartyKeys, SecureUpdate, ShareAnswer, SignedShare, Task, Update};
use cohort_crypto::aggregation::{self, ShareRequest, UploadRecord};
use cohort_crypto::{MemberPolicy, MemberSecret, SeedLog, Signer25519, VerifyKey};
use cohort_model::ComputeDevice;
use cohort_model::tabular::{DataSpec, Pipeline, TableStats};
use cohort_participant::{Held, NotReady, SiteData};
use rand::rngs::{ChaCha8Rng, ChaCha20Rng};
use rand::{RngExt, SeedableRng};

/// Whether the participant whose round seed is `seed` drops out of the round (its update
/// never arrives) at rate `rate`: a draw from the seed alone, so the same participants drop
/// out whatever the threads.
fn drops_out(seed: u64, rate: f64) -> bool {
    rate > 0.0 && ChaCha8Rng::seed_from_u64(seed ^ 0x0d20_9f0c_a115_eed0).random::<f64>() < rate
}

/// What every participant's work in one step of the engine shares.
pub(super) struct Step<'a> {
    pub(super) spec: &'a cohort_model::ModelSpec,
    pub(super) global: &'a [f32],
    pub(super) device: ComputeDevice,
    /// Emulated secure aggregation: the codec and the round's weight unit.
    pub(super) quantize: Option<(cohort_crypto::Codec, u64)>,
    pub(super) dropout: f64,
    /// Jobs with tables: their schema (round 0), and the pipeline once it is fitted.
    pub(super) data: Option<&'a DataSpec>,
    pub(super) pipeline: Option<&'a Arc<Pipeline>>,
}

/// One virtual participant: its data (none for a key custodian) and its keys.
pub(super) struct Client {
    pub(super) id: String,
    data: Option<Held>,
    seal: MemberSecret,
    sign: Signer25519,
    policy: MemberPolicy,
    seeds: SeedLog,
    /// SCAFFOLD: this participant's control variate, once it has trained (kept by the
    /// process that owns the participant: O(model) per participant that has trained).
    control: Option<Vec<f32>>,
}

impl Client {
    /// A participant with fresh keys (they only protect; the sums they carry are exact, so
    /// their randomness changes no result).
    pub(super) fn new(id: String, data: Option<SiteData>, rng: &mut ChaCha20Rng) -> Self {
        Client {
            id,
            data: data.map(Held::new),
            seal: MemberSecret::generate(rng),
            sign: Signer25519::generate(rng),
            policy: MemberPolicy::default(),
            seeds: SeedLog::default(),
            control: None,
        }
    }

    /// Training examples (0 for a key custodian).
    pub(super) fn examples(&self) -> u64 {
        self.data.as_ref().map_or(0, Held::examples)
    }

    /// The public keys it joins a secure job with.
    pub(super) fn public_keys(&self) -> PartyKeys {
        PartyKeys {
            seal: self.seal.public(),
            verify: self.sign.verify_key(),
            binding: None,
        }
    }
}

/// What one participant's work produced, to be fed to the state machine, and the thread
/// seconds it took (training or evaluation, encryption).
pub(super) struct Work {
    pub(super) done: Done,
    pub(super) seconds: f64,
    pub(super) encrypt_seconds: f64,
}

pub(super) enum Done {
    Update(Update),
    Secure(SecureUpdate),
    Evaluated {
        round: u64,
        metrics: cohort_model::Metrics,
    },
    /// Local training or encryption failed: nothing is sent (a straggler).
    Nothing(String),
    /// Dropped out of the round on purpose (`--dropout`).
    DroppedOut,
    /// The participant's data does not fit the job (its table against the job's schema or
    /// pipeline): it cannot take part at all.
    Unfit(String),
}

/// Round 0: the participant's training table's statistics as the codec's digits, weight 1,
/// encrypted for `secure` (as the participant agent sends them).
fn statistics(
    c: &mut Client,
    secure: Option<&aggregation::RoundInfo>,
    step: &Step<'_>,
    encrypt_seconds: &mut f64,
) -> Done {
    let Some(spec) = step.data else {
        return Done::Nothing("a statistics task in a job without tables".into());
    };
    let held = c.data.as_mut().expect("checked by the caller");
    let tables = match held.tables(spec) {
        Ok(t) => t,
        Err(NotReady::Data(e)) => return Done::Unfit(e.to_string()),
        Err(NotReady::Task(s)) => return Done::Nothing(s.message().to_string()),
    };
    // Plaintext and emulated jobs scale digits by the default codec, as the state machine
    // of a plaintext job does.
    let codec = secure.map(|i| i.codec).unwrap_or_default();
    let values = match cohort_crypto::DigitCodec::for_statistics(&codec)
        .and_then(|d| d.encode(&TableStats::of(&tables.train).to_values(), &codec))
    {
        Ok(v) => v,
        Err(e) => return Done::Nothing(format!("its statistics: {e}")),
    };
    let Some(info) = secure else {
        return Done::Update(Update {
            round: 0,
            delta: values,
            num_examples: 1,
            train: None,
        });
    };
    encrypt(c, info, &values, 1, None, None, encrypt_seconds)
}

/// `values` as the codec encodes them, with distributed DP's noise (standard deviation, the
/// participant's training seed) when the task asks for it.
fn messages(codec: &cohort_crypto::Codec, values: &[f32], noise: Option<(f64, u64)>) -> Vec<i64> {
    let (sd, seed) = noise.unwrap_or((0.0, 0));
    let mut rng = cohort_crypto::dp::simulation_noise_rng(seed);
    cohort_crypto::dp::noised_messages(codec, values, sd, &mut rng)
}

/// `values` encrypted for `info` as the participant agent encrypts them, with the weight the
/// round gives `examples`, on one thread (the pool already runs a participant on every core).
fn encrypt(
    c: &mut Client,
    info: &aggregation::RoundInfo,
    values: &[f32],
    examples: u64,
    train: Option<cohort_model::Metrics>,
    noise: Option<(f64, u64)>,
    encrypt_seconds: &mut f64,
) -> Done {
    let t0 = Instant::now();
    let mut rng = ChaCha20Rng::from_seed(rand::random());
    // Distributed differential privacy: (standard deviation, training seed).
    let messages = messages(&info.codec, values, noise);
    let protected = aggregation::protect_messages(
        info,
        &c.id,
        &c.sign,
        &mut c.seeds,
        &messages,
        examples,
        &mut rng,
        1,
    );
    *encrypt_seconds = t0.elapsed().as_secs_f64();
    match protected {
        Ok(p) => Done::Secure(SecureUpdate {
            round: info.round,
            weight: p.weight,
            bodies_sha256: p.bodies_sha256,
            bodies: p.bodies,
            pieces: p.pieces,
            signature: p.signature,
            train,
        }),
        Err(e) => Done::Nothing(format!("refusing to encrypt: {e}")),
    }
}

/// Participants working at once: twice the pool's threads, so that one window's updates are
/// the most held at a time.
pub(super) fn window() -> usize {
    2 * rayon::current_num_threads().max(1)
}

/// One window of participants' work, each on its own thread of the pool (`chunk`'s indices
/// strictly increasing); the results come back in the window's order, which is participant
/// order: (id, whether it trained, its work).
pub(super) fn work_window(
    clients: &mut [Client],
    chunk: &[(usize, Task)],
    step: &Step<'_>,
) -> Vec<(String, bool, Work)> {
    use rayon::prelude::*;
    pick_mut(clients, chunk.iter().map(|(i, t)| (*i, t)))
        .into_par_iter()
        .map(|(c, t)| {
            let training = matches!(t, Task::Train { .. } | Task::Statistics { .. });
            (c.id.clone(), training, work_of(c, t, step))
        })
        .collect()
}

/// Mutable borrows of the items at `picked`'s indices (strictly increasing), each with its
/// companion value, so that each can be worked on by another thread.
pub(super) fn pick_mut<T, U>(
    items: &mut [T],
    picked: impl IntoIterator<Item = (usize, U)>,
) -> Vec<(&mut T, U)> {
    let mut out = Vec::new();
    let mut rest = items;
    let mut offset = 0;
    for (i, u) in picked {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
        let (item, tail) = tail
            .split_first_mut()
            .expect("indices increase and are in range");
        out.push((item, u));
        rest = tail;
        offset = i + 1;
    }
    out
}

/// A participant's training or evaluation task, as the participant agent does it.
pub(super) fn work_of(c: &mut Client, t: &Task, step: &Step<'_>) -> Work {
    let started = Instant::now();
    let mut encrypt_seconds = 0.0;
    let done = match t {
        Task::Train { config, .. } if drops_out(config.seed, step.dropout) => Done::DroppedOut,
        _ => work_done(c, t, step, &mut encrypt_seconds),
    };
    Work {
        done,
        seconds: started.elapsed().as_secs_f64() - encrypt_seconds,
        encrypt_seconds,
    }
}

fn work_done(c: &mut Client, t: &Task, step: &Step<'_>, encrypt_seconds: &mut f64) -> Done {
    let Step {
        spec,
        global,
        device,
        ..
    } = *step;
    let Some(held) = c.data.as_mut() else {
        return Done::Nothing("a key custodian holds no data".into());
    };
    if let Task::Statistics { secure, .. } = t {
        return statistics(c, secure.as_deref(), step, encrypt_seconds);
    }
    let data = match held.ready_with(step.pipeline) {
        Ok(d) => d,
        Err(NotReady::Data(e)) => return Done::Unfit(e.to_string()),
        Err(NotReady::Task(s)) => return Done::Nothing(s.message().to_string()),
    };
    match t {
        Task::Train {
            round,
            config,
            secure,
            clip_norm,
            clip_per_layer,
            noise_stddev,
            clip_indicator,
            control,
            ..
        } => {
            let trained = match control {
                None => cohort_model::train(spec, global, &data.train, config, device)
                    .map(|(p, r)| (p, r, None)),
                Some(server) => {
                    let local = c.control.as_deref();
                    cohort_model::scaffold::train(
                        spec,
                        global,
                        &data.train,
                        config,
                        device,
                        server,
                        local,
                    )
                    .map(|s| (s.params, s.report, Some((s.control, s.control_change))))
                }
            };
            let (params, report, scaffold) = match trained {
                Ok(x) => x,
                Err(e) => return Done::Nothing(format!("local training failed: {e}")),
            };
            let mut delta: Vec<f32> = params.iter().zip(global).map(|(p, g)| p - g).collect();
            cohort_model::update_to_send(
                &mut delta,
                spec,
                *clip_norm,
                *clip_per_layer,
                scaffold.as_ref().map(|(_, dc)| &dc[..]),
                *clip_indicator,
            );
            if let Some((next, _)) = scaffold {
                c.control = Some(next);
            }
            let train = Some(cohort_model::Metrics {
                loss: *report.epoch_loss.last().unwrap_or(&f64::NAN),
                accuracy: report.last_epoch_accuracy,
                auc: None,
                num_examples: report.num_examples,
            });
            let n = report.num_examples as u64;
            match (secure, step.quantize) {
                // What the encrypted sum would carry: the declared weight, and each value as
                // the codec encodes and decodes it.
                (None, Some((codec, unit))) => {
                    // The same noise, from the same seed, as an encrypting participant's.
                    let noise = noise_stddev.map(|sd| (sd, config.seed));
                    let messages = messages(&codec, &delta, noise);
                    Done::Update(Update {
                        round: *round,
                        num_examples: aggregation::weight_for(n, unit, codec.max_total_weight),
                        delta: messages.iter().map(|&m| codec.mean(m, 1)).collect(),
                        train: train.filter(|_| noise_stddev.is_none()),
                    })
                }
                (None, None) => Done::Update(Update {
                    round: *round,
                    num_examples: n,
                    delta,
                    train,
                }),
                (Some(info), _) => {
                    let noise = noise_stddev.map(|sd| (sd, config.seed));
                    // Under distributed DP only the noised update leaves (as a participant).
                    let train = train.filter(|_| noise.is_none());
                    encrypt(c, info, &delta, n, train, noise, encrypt_seconds)
                }
            }
        }
        Task::Evaluate { round, .. } => {
            match cohort_model::evaluate(spec, global, &data.test, device) {
                Ok(metrics) => Done::Evaluated {
                    round: *round,
                    metrics,
                },
                Err(e) => Done::Nothing(format!("evaluation failed: {e}")),
            }
        }
        _ => Done::Nothing("not a training or evaluation task".into()),
    }
}

/// What a committee member needs to answer its decryption request, from the state machine.
pub(super) struct DecryptionInput {
    req: cohort_coordinator::round::DecryptRequest,
    records: Vec<UploadRecord>,
    keys: BTreeMap<String, VerifyKey>,
    pieces: Vec<(String, cohort_crypto::aggregation::SealedPiece)>,
}

pub(super) fn decryption_input(
    orch: &Orchestrator,
    c: &Client,
    req: &cohort_coordinator::round::DecryptRequest,
) -> anyhow::Result<DecryptionInput> {
    let (records, pieces) = orch
        .decryption_input(&c.id, req.info.round, req.info.attempt)
        .map_err(|e| anyhow::anyhow!("{}: decryption input: {e}", c.id))?;
    let keys: BTreeMap<String, VerifyKey> = records
        .iter()
        .map(|(r, k)| (r.participant.clone(), k.verify))
        .collect();
    Ok(DecryptionInput {
        req: req.clone(),
        records: records.into_iter().map(|(r, _)| r).collect(),
        keys,
        pieces,
    })
}

/// A committee member's decryption share, checked as the participant agent checks it (the
/// coordinator's signature on the manifest, every upload's signature, the member's policy).
pub(super) fn answer(
    c: &mut Client,
    input: DecryptionInput,
    len: usize,
    threads: usize,
) -> ShareAnswer {
    let DecryptionInput {
        req,
        records,
        keys,
        pieces,
    } = input;
    let manifest = req.info.manifest(
        records
            .iter()
            .map(|r| (r.participant.clone(), r.weight))
            .collect(),
    );
    let signed = cohort_crypto::sign::verify_manifest(
        &manifest,
        &req.manifest_digest,
        req.manifest_participants,
        &req.coordinator_key,
        &req.manifest_signature,
    );
    let mut rng = ChaCha20Rng::from_seed(rand::random());
    let share = match signed {
        Ok(()) => aggregation::answer_on(
            &ShareRequest {
                info: &req.info,
                manifest: &manifest,
                uploads: &records,
                keys: &keys,
                pieces: &pieces,
                assigned: &req.pieces,
                len,
            },
            &c.id,
            &c.seal,
            &c.sign,
            &mut c.policy,
            &mut rng,
            threads,
        )
        .map(|(values, signature)| SignedShare {
            sha256: cohort_crypto::sign::share_sha256(&values),
            values,
            signature,
        })
        .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    ShareAnswer {
        round: req.info.round,
        attempt: req.info.attempt,
        request: req.request,
        pieces: req.pieces.clone(),
        share,
    }
}
