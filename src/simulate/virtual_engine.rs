//! The virtual-participant engine: the same [`Orchestrator`], strategies, partitions, training,
//! evaluation and secure-aggregation arithmetic as the networked engine, but participants are
//! data shards in this process, not connections.
//!
//! The engine drives the state machine as the coordinator's driver does: it asks it what each
//! participant should do ([`Orchestrator::task_for`]), runs that work, feeds the results back,
//! and commits each completed round to the model registry before telling the machine so. A
//! participant's work is what the participant agent does: local training with the round's
//! per-participant seed (from the job seed, round, attempt and id), the update encrypted with
//! `cohort_crypto::aggregation::protect` under a fresh key in secure jobs, committee members'
//! decryption shares with `aggregation::answer`, federated evaluation.
//!
//! Memory: the work of a round runs on the Rayon pool (one thread per core) in windows of
//! `2 × threads` participants, and each window's results are folded into the machine's running
//! sum in participant order before the next window starts, so at most one window of updates
//! is held at once: O(model × threads), however many participants. The fold order is fixed, so
//! results do not depend on the number of threads; in secure jobs the sum is exact integer
//! arithmetic and equals the networked engine's bit for bit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use cohort_coordinator::round::{
    PartyKeys, SecureUpdate, ShareAnswer, SignedShare, Task, Update,
};
use cohort_coordinator::{Event, Orchestrator, RoundSummary};
use cohort_crypto::aggregation::{self, ShareRequest, UploadRecord};
use cohort_crypto::{MemberPolicy, MemberSecret, SeedLog, Signer25519, VerifyKey};
use cohort_model::ComputeDevice;
use cohort_participant::LocalData;
use cohort_storage::ModelStore;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rayon::prelude::*;

/// One virtual participant: its data (none for a key custodian) and its keys.
struct Client {
    id: String,
    data: Option<Arc<LocalData>>,
    seal: MemberSecret,
    sign: Signer25519,
    policy: MemberPolicy,
    seeds: SeedLog,
}

/// What one participant's work produced, to be fed to the state machine.
enum Done {
    Update(Update),
    Secure(SecureUpdate),
    Evaluated { round: u64, metrics: cohort_model::Metrics },
    /// Local training or encryption failed: nothing is sent (a straggler).
    Nothing(String),
}

/// Runs `orch`'s job to its end with `clients` (id, data; `None` for a key custodian),
/// writing every committed version to `store` (version 0 first). `on_event` sees every
/// event of the machine, in order. Returns the completed rounds.
pub(super) fn run(
    mut orch: Orchestrator,
    store: &ModelStore,
    clients: Vec<(String, Option<Arc<LocalData>>)>,
    device: ComputeDevice,
    mut on_event: impl FnMut(&Event),
) -> anyhow::Result<Vec<RoundSummary>> {
    let cfg = orch.config().clone();
    let strategy = orch.strategy_name();
    let job_store = store.for_job(&cfg.job_id);
    let (v0, p0) = orch.global();
    job_store
        .write(
            &cfg.job_id,
            &cfg.model,
            strategy,
            v0,
            &p0,
            None,
            cohort_storage::state::unix_ms(),
        )
        .context("writing the initial model")?;
    // Keys only protect; the sums they carry are exact, so their randomness does not change
    // any result.
    let mut rng = ChaCha20Rng::from_seed(rand::random());
    let mut clients: Vec<Client> = clients
        .into_iter()
        .map(|(id, data)| Client {
            id,
            data,
            seal: MemberSecret::generate(&mut rng),
            sign: Signer25519::generate(&mut rng),
            policy: MemberPolicy::default(),
            seeds: SeedLog::default(),
        })
        .collect();
    let secure = cfg.secure.is_some();
    for c in &clients {
        let n = c.data.as_ref().map_or(0, |d| d.train.len() as u64);
        let keys = secure.then(|| PartyKeys {
            seal: c.seal.public(),
            verify: c.sign.verify_key(),
            binding: None,
        });
        orch.handle_join_with_keys(&c.id, format!("virtual-{}", c.id), n, keys, Instant::now())
            .map_err(|e| anyhow::anyhow!("{}: {e}", c.id))?;
    }
    let window = 2 * rayon::current_num_threads().max(1);
    loop {
        // Events first: a completed round is committed before anything else happens.
        while let Some(ev) = orch.poll_event() {
            on_event(&ev);
            if let Event::RoundCompleted {
                summary, params, ..
            } = &ev
            {
                job_store
                    .write(
                        &cfg.job_id,
                        &cfg.model,
                        strategy,
                        summary.round,
                        params,
                        Some(summary),
                        cohort_storage::state::unix_ms(),
                    )
                    .with_context(|| format!("committing round {}", summary.round))?;
                orch.committed(summary.round, Instant::now());
            }
        }
        if orch.is_finished() {
            return Ok(orch.history().to_vec());
        }
        let tasks: Vec<(usize, Task)> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (i, orch.task_for(&c.id)))
            .filter(|(_, t)| !matches!(t, Task::Idle))
            .collect();
        if tasks.is_empty() {
            bail!(
                "the job is stuck in phase {} with nothing for any participant to do",
                orch.phase_name()
            );
        }
        let global = orch.global().1;
        let mut progressed = false;
        // Decryption first: a committee member's answer needs only the state machine.
        for (i, t) in &tasks {
            if let Task::Decrypt(_) = t {
                let answer = decrypt(&orch, &mut clients[*i], global.len())?;
                if let Some(a) = answer {
                    let id = clients[*i].id.clone();
                    orch.handle_share(&id, a, Instant::now())
                        .map_err(|e| anyhow::anyhow!("{id}: share refused: {e}"))?;
                    progressed = true;
                }
            }
        }
        let work: Vec<(usize, Task)> = tasks
            .into_iter()
            .filter(|(_, t)| matches!(t, Task::Train { .. } | Task::Evaluate { .. }))
            .collect();
        for chunk in work.chunks(window) {
            // Each client of the window works on its own thread; results come back in the
            // window's order, which is participant order.
            let mut slots: Vec<(&mut Client, &Task)> = Vec::with_capacity(chunk.len());
            let mut rest: &mut [Client] = &mut clients;
            let mut offset = 0;
            for (i, t) in chunk {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
                let (c, tail) = tail.split_first_mut().expect("index in range");
                slots.push((c, t));
                rest = tail;
                offset = i + 1;
            }
            let done: Vec<(String, Done)> = slots
                .into_par_iter()
                .map(|(c, t)| (c.id.clone(), work_of(c, t, &cfg.model, &global, device)))
                .collect();
            for (id, d) in done {
                let now = Instant::now();
                let fed = match d {
                    Done::Update(u) => orch.handle_update(&id, u, now),
                    Done::Secure(u) => orch.handle_secure_update(&id, u, now),
                    Done::Evaluated { round, metrics } => {
                        orch.handle_evaluation(&id, round, metrics, now)
                    }
                    Done::Nothing(why) => {
                        tracing::warn!(participant = %id, "sends nothing this round: {why}");
                        continue;
                    }
                };
                fed.map_err(|e| anyhow::anyhow!("{id}: refused: {e}"))?;
                progressed = true;
            }
        }
        if !progressed {
            bail!(
                "no participant could make progress in phase {}",
                orch.phase_name()
            );
        }
    }
}

/// A participant's training or evaluation task, as the participant agent does it.
fn work_of(
    c: &mut Client,
    t: &Task,
    spec: &cohort_model::ModelSpec,
    global: &[f32],
    device: ComputeDevice,
) -> Done {
    let Some(data) = c.data.clone() else {
        return Done::Nothing("a key custodian holds no data".into());
    };
    match t {
        Task::Train {
            round,
            config,
            secure,
            ..
        } => {
            let (params, report) = match cohort_model::train(spec, global, &data.train, config, device)
            {
                Ok(x) => x,
                Err(e) => return Done::Nothing(format!("local training failed: {e}")),
            };
            let delta: Vec<f32> = params.iter().zip(global).map(|(p, g)| p - g).collect();
            let train = Some(cohort_model::Metrics {
                loss: *report.epoch_loss.last().unwrap_or(&f64::NAN),
                accuracy: report.last_epoch_accuracy,
                auc: None,
                num_examples: report.num_examples,
            });
            let n = report.num_examples as u64;
            match secure {
                None => Done::Update(Update {
                    round: *round,
                    num_examples: n,
                    delta,
                    train,
                }),
                Some(info) => {
                    let mut rng = ChaCha20Rng::from_seed(rand::random());
                    match aggregation::protect(
                        info, &c.id, &c.sign, &mut c.seeds, &delta, n, &mut rng,
                    ) {
                        Ok(p) => Done::Secure(SecureUpdate {
                            round: *round,
                            weight: p.weight,
                            bodies_sha256: aggregation::bodies_sha256(&p.bodies),
                            bodies: p.bodies,
                            pieces: p.pieces,
                            signature: p.signature,
                            train,
                        }),
                        Err(e) => Done::Nothing(format!("refusing to encrypt: {e}")),
                    }
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

/// A committee member's decryption share for its open request, checked as the participant
/// agent checks it (the coordinator's signature on the manifest, every upload's signature,
/// the member's policy). `None` when it has no open request.
fn decrypt(
    orch: &Orchestrator,
    c: &mut Client,
    len: usize,
) -> anyhow::Result<Option<ShareAnswer>> {
    let Task::Decrypt(req) = orch.task_for(&c.id) else {
        return Ok(None);
    };
    let (records, pieces) = orch
        .decryption_input(&c.id, req.info.round, req.info.attempt)
        .map_err(|e| anyhow::anyhow!("{}: decryption input: {e}", c.id))?;
    let keys: BTreeMap<String, VerifyKey> = records
        .iter()
        .map(|(r, k)| (r.participant.clone(), k.verify))
        .collect();
    let records: Vec<UploadRecord> = records.into_iter().map(|(r, _)| r).collect();
    let manifest = req.info.manifest(
        records
            .iter()
            .map(|r| (r.participant.clone(), r.weight))
            .collect(),
    );
    let signed = manifest.digest() == req.manifest_digest
        && cohort_crypto::sign::verify(
            &req.coordinator_key,
            cohort_crypto::sign::Kind::Manifest,
            &req.manifest_digest,
            &req.manifest_signature,
        )
        .is_ok();
    let mut rng = ChaCha20Rng::from_seed(rand::random());
    let share = if signed {
        aggregation::answer(
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
        )
        .map(|(values, signature)| SignedShare {
            sha256: cohort_crypto::sign::share_sha256(&values),
            values,
            signature,
        })
        .map_err(|e| e.to_string())
    } else {
        Err("the manifest does not match the coordinator's signature".into())
    };
    Ok(Some(ShareAnswer {
        round: req.info.round,
        attempt: req.info.attempt,
        request: req.request,
        pieces: req.pieces.clone(),
        share,
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cohort_coordinator::JobConfig;
    use cohort_coordinator::round::SecureSettings;
    use cohort_model::{Dataset, FeatureShape, ModelSpec, Optimizer, TrainConfig};

    use super::*;

    fn job(secure: bool) -> JobConfig {
        JobConfig {
            job_id: "virtual".into(),
            model: ModelSpec::Mlp {
                inputs: 4,
                hidden: vec![8],
                classes: 3,
            },
            train: TrainConfig {
                epochs: 2,
                batch_size: 4,
                learning_rate: 0.1,
                optimizer: Optimizer::Sgd,
                seed: 5,
            },
            rounds: 3,
            min_participants: 9,
            fraction: 0.7,
            min_updates: 1,
            round_timeout: Duration::from_secs(60),
            eval_timeout: Duration::from_secs(60),
            evaluate: true,
            liveness_timeout: Duration::from_secs(60),
            seed: 11,
            secure: secure.then(|| SecureSettings {
                committee_size: 3,
                t_min: 2,
                ..SecureSettings::default()
            }),
        }
    }

    fn clients() -> Vec<(String, Option<Arc<LocalData>>)> {
        (0..9)
            .map(|i| {
                let rows = 12 + i;
                let x: Vec<f32> = (0..rows * 4)
                    .map(|k| ((k * 37 + i * 11) % 23) as f32 / 23.0 - 0.5)
                    .collect();
                let y: Vec<u32> = (0..rows).map(|k| ((k + i) % 3) as u32).collect();
                let ds = Dataset::new(x, y, FeatureShape::Flat(4), 3).unwrap();
                let data = LocalData::prepare(ds, 0.25, true, i as u64).unwrap();
                (format!("p{i}"), Some(Arc::new(data)))
            })
            .collect()
    }

    /// The final parameters of a run on a pool of `threads`.
    fn final_params(secure: bool, threads: usize) -> Vec<f32> {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let orch = Orchestrator::new(
            job(secure),
            cohort_coordinator::strategy::by_name("fedavg", 1.0).unwrap(),
            None,
            [9; 32],
        )
        .unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut events = Vec::new();
        let history = pool
            .install(|| {
                run(orch, &store, clients(), ComputeDevice::Cpu, |e| {
                    events.push(format!("{e:?}").chars().take(40).collect::<String>())
                })
            })
            .unwrap();
        assert_eq!(history.len(), 3);
        let sizes: Vec<usize> = history.iter().map(|s| s.participants.len()).collect();
        assert_eq!(sizes, [7, 7, 7], "⌈9 × 0.7⌉ selected a round");
        assert!(history.iter().all(|s| s.eval.is_some()));
        assert!(events.iter().any(|e| e.starts_with("RoundCompleted")));
        store.for_job("virtual").read_params(3).unwrap()
    }

    #[test]
    fn the_model_does_not_depend_on_the_number_of_threads() {
        for secure in [false, true] {
            let one = final_params(secure, 1);
            let two = final_params(secure, 2);
            let three = final_params(secure, 3);
            assert!(one == two && two == three, "secure {secure}");
        }
        // And the secure run computes the plaintext run's model: the encrypted sum decodes
        // to the fixed-point mean (within the codec's resolution).
        let (p, s) = (final_params(false, 2), final_params(true, 2));
        let d = p.iter().zip(&s).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d < 1e-3, "secure and plaintext models differ by {d}");
    }
}
