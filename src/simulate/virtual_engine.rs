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

use std::time::Instant;

use anyhow::{Context, bail};
use cohort_coordinator::round::{PartyKeys, ShareAnswer, Task};
use cohort_coordinator::{Event, Orchestrator, RoundSummary};
use cohort_crypto::aggregation;
use cohort_model::ComputeDevice;
use cohort_participant::SiteData;
use cohort_storage::ModelStore;

use super::availability::Availability;
use super::client::{Client, Done, Step, answer, decryption_input, pick_mut, window, work_window};
use super::workers::{Remote, ShardResult};
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use rayon::prelude::*;

/// Where a virtual run's time went, in seconds: thread time summed over the pool for the
/// participants' work (training, encryption, evaluation), wall time on the driving thread
/// for the rest (folding uploads into the sum, which checks every signature and sealed
/// piece; committee shares; decoding and the strategy, committing versions).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineSeconds {
    pub train: f64,
    pub encrypt: f64,
    pub evaluate: f64,
    pub aggregate: f64,
    pub decrypt: f64,
    pub commit: f64,
}

/// Secure aggregation emulated by its exact integer arithmetic: the state machine runs a
/// plaintext job, and each participant sends what the encrypted sum would carry for it: its
/// update through the codec (clipped, rounded to `frac_bits`) and its declared weight
/// instead of its examples. Every partial sum is then a multiple of 2^-f below 2^53 in an
/// f64, exact in any order, and the mean is the decrypted sum's decoding, bit for bit. No
/// encryption, no committee.
#[derive(Debug, Clone, Copy)]
pub(super) struct Emulation {
    pub(super) codec: cohort_crypto::Codec,
}

/// The state machine's clock: real time, plus every jump to a deadline the engine made when
/// nothing else could happen (participants that dropped out are then left out as stragglers,
/// without waiting out the round's timeout).
#[derive(Default)]
struct Clock {
    skipped: std::time::Duration,
}

impl Clock {
    fn now(&self) -> Instant {
        Instant::now() + self.skipped
    }

    fn jump_to(&mut self, t: Instant) {
        self.skipped += t.saturating_duration_since(self.now());
    }
}

/// Runs `orch`'s job to its end with `clients` (id, data; `None` for a key custodian) in
/// this process and, with `remote`, the participants of worker processes, writing every
/// committed version to `store` (version 0 first). `on_event` sees every event of the
/// machine, in order. Returns the completed rounds.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    mut orch: Orchestrator,
    store: &ModelStore,
    clients: Vec<(String, Option<SiteData>)>,
    remote: Option<Remote<'_>>,
    device: ComputeDevice,
    emulation: Option<Emulation>,
    conditions: &Conditions,
    mut on_event: impl FnMut(&Event),
) -> anyhow::Result<(Vec<RoundSummary>, EngineSeconds)> {
    let mut time = EngineSeconds::default();
    let mut clock = Clock::default();
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
    let mut rng = ChaCha20Rng::from_seed(rand::random());
    let mut clients: Vec<Client> = clients
        .into_iter()
        .map(|(id, data)| Client::new(id, data, &mut rng))
        .collect();
    let secure = cfg.secure.is_some();
    // Everyone joins with its keys (the participants of worker processes with the keys their
    // workers made); with an availability trace the machine is held while they do, and
    // those offline in round 1 leave before it starts.
    let mut roster = Roster::default();
    for c in &clients {
        roster.add(&c.id, c.examples(), secure.then(|| c.public_keys()));
    }
    for p in remote.iter().flat_map(|r| r.shards.iter().flatten()) {
        roster.add(
            &p.id,
            p.examples,
            if secure { p.keys.clone() } else { None },
        );
    }
    if conditions.availability.is_some() {
        orch.set_paused(true, clock.now());
    }
    for id in roster.members.keys() {
        roster.join(&mut orch, id, clock.now())?;
    }
    if let Some(av) = &conditions.availability {
        roster.apply(&mut orch, (av.offline(1), Vec::new()), clock.now())?;
        orch.set_paused(false, clock.now());
    }
    loop {
        // Events first: a completed round is committed before anything else happens.
        while let Some(ev) = orch.poll_event() {
            on_event(&ev);
            if let Event::StatisticsCompleted { .. } = &ev {
                // Round 0 keeps nothing of its own in the registry: the statistics travel
                // with the report, the pipeline with the state machine.
                orch.committed(0, clock.now());
            }
            if let Event::RoundCompleted {
                summary,
                params,
                pipeline,
                ..
            } = &ev
            {
                let t0 = Instant::now();
                job_store
                    .write_with_pipeline(
                        &cfg.job_id,
                        &cfg.model,
                        strategy,
                        summary.round,
                        params,
                        Some(summary),
                        cohort_storage::state::unix_ms(),
                        pipeline.as_deref(),
                    )
                    .with_context(|| format!("committing round {}", summary.round))?;
                if let Some(av) = &conditions.availability {
                    // Who is online for the next round, before it starts.
                    roster.apply(&mut orch, av.changes(summary.round + 1), clock.now())?;
                }
                orch.committed(summary.round, clock.now());
                time.commit += t0.elapsed().as_secs_f64();
            }
        }
        if orch.is_finished() {
            return Ok((orch.history().to_vec(), time));
        }
        let tasks: Vec<(usize, Task)> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (i, orch.task_for(&c.id)))
            .filter(|(_, t)| !matches!(t, Task::Idle))
            .collect();
        let remote_work = match &remote {
            Some(r) => r.tasks(&orch)?,
            None => Vec::new(),
        };
        if tasks.is_empty() && remote_work.iter().all(|w| w.is_empty()) {
            if conditions.availability.is_some() && orch.phase_name() == "waiting" {
                bail!(
                    "round {} cannot start: too few participants are online in it (the \
                     availability trace) for the participants a round needs",
                    orch.history().len() + 1
                );
            }
            bail!(
                "the job is stuck in phase {} with nothing for any participant to do",
                orch.phase_name()
            );
        }
        let global = orch.global().1;
        let mut progressed = false;
        // Decryption first: the committee members' inputs come from the state machine, their
        // shares are computed at once (one member a thread), then handed back in order.
        let t0 = Instant::now();
        let mut inputs = Vec::new();
        for (i, t) in &tasks {
            if let Task::Decrypt(req) = t {
                inputs.push((*i, decryption_input(&orch, &clients[*i], req)?));
            }
        }
        if !inputs.is_empty() {
            // The model's parameters, or round 0's statistics digits.
            let len = orch.current_update_len();
            let members = pick_mut(&mut clients, inputs);
            // Members answer at once, one a thread, each share on the threads left over.
            let threads = (rayon::current_num_threads() / members.len()).max(1);
            let answers: Vec<(String, ShareAnswer)> = members
                .into_par_iter()
                .map(|(c, input)| (c.id.clone(), answer(c, input, len, threads)))
                .collect();
            for (id, a) in answers {
                orch.handle_share(&id, a, clock.now())
                    .map_err(|e| anyhow::anyhow!("{id}: share refused: {e}"))?;
                progressed = true;
            }
            time.decrypt += t0.elapsed().as_secs_f64();
        }
        let work: Vec<(usize, Task)> = tasks
            .into_iter()
            .filter(|(_, t)| {
                matches!(
                    t,
                    Task::Train { .. } | Task::Evaluate { .. } | Task::Statistics { .. }
                )
            })
            .collect();
        // Emulated secure aggregation: the weight unit the secure round would announce, from
        // everyone asked to train now (the round's selection).
        let quantize = emulation.map(|e| {
            let training: Vec<u64> = work
                .iter()
                .filter(|(_, t)| matches!(t, Task::Train { .. }))
                .map(|(i, _)| clients[*i].examples())
                .chain(
                    remote_work
                        .iter()
                        .flatten()
                        .filter(|(_, t)| matches!(t, Task::Train { .. }))
                        .map(|(id, _)| roster.members[id].0),
                )
                .collect();
            let total: u64 = training.iter().map(|n| n.max(&1)).sum();
            // Every update weighs 1 where the round says so (differential privacy).
            let unit = if cfg.uniform_weights(orch.training_round().unwrap_or(1)) {
                u64::MAX
            } else {
                aggregation::weight_unit(total, training.len(), e.codec.max_total_weight)
            };
            (e.codec, unit)
        });
        let pipeline = orch.statistics().map(|s| s.pipeline.clone());
        let step = Step {
            spec: &cfg.model,
            global: &global,
            device,
            quantize,
            dropout: conditions.dropout,
            data: cfg.data.as_ref(),
            pipeline: pipeline.as_ref(),
        };
        for chunk in work.chunks(window()) {
            for (id, training, w) in work_window(&mut clients, chunk, &step) {
                if training {
                    time.train += w.seconds;
                } else {
                    time.evaluate += w.seconds;
                }
                time.encrypt += w.encrypt_seconds;
                let (now, t0) = (clock.now(), Instant::now());
                let fed = match w.done {
                    Done::Update(u) => orch.handle_update(&id, u, now),
                    Done::Secure(u) => orch.handle_secure_update(&id, u, now),
                    Done::Evaluated { round, metrics } => {
                        orch.handle_evaluation(&id, round, metrics, now)
                    }
                    Done::DroppedOut => {
                        tracing::debug!(participant = %id, "dropped out of the round");
                        continue;
                    }
                    Done::Nothing(why) => {
                        tracing::warn!(participant = %id, "sends nothing this round: {why}");
                        continue;
                    }
                    Done::Unfit(why) => bail!("{id}: its data does not fit the job: {why}"),
                };
                fed.map_err(|e| anyhow::anyhow!("{id}: refused: {e}"))?;
                if training {
                    // Folding (and the checks before it), and for the last update of a
                    // round, closing it: the decoding and the strategy.
                    time.aggregate += t0.elapsed().as_secs_f64();
                }
                progressed = true;
            }
        }
        if let Some(r) = &remote
            && remote_work.iter().any(|w| !w.is_empty())
        {
            // Each worker's participants work in its process; its partial sum comes back as
            // one, folded in shard order.
            for result in r.run_step(remote_work, &step)? {
                time.train += result.train_seconds;
                time.encrypt += result.encrypt_seconds;
                time.evaluate += result.evaluate_seconds;
                progressed |= feed_shard(&mut orch, result, clock.now(), &mut time)?;
            }
        }
        if !progressed {
            // Everyone still asked has answered or dropped out: the state machine's next
            // deadline comes now (stragglers are left out, or the attempt fails and is
            // retried, as in a real federation).
            match orch.poll_timeout() {
                Some(t) => {
                    clock.jump_to(t);
                    // Virtual participants are alive throughout (a dropout loses one update,
                    // not the participant): they answer for the time skipped.
                    let now = clock.now();
                    for id in roster.members.keys() {
                        let _ = orch.handle_heartbeat(id, now);
                    }
                    orch.handle_timeout(now);
                }
                None => bail!(
                    "no participant could make progress in phase {}",
                    orch.phase_name()
                ),
            }
        }
    }
}

/// What the engine injects into a run: participants dropping out of rounds, and an
/// availability trace.
#[derive(Debug, Default)]
pub(super) struct Conditions {
    pub(super) dropout: f64,
    pub(super) availability: Option<Availability>,
}

/// Every participant's training examples and public keys, to join (and rejoin) with.
#[derive(Default)]
struct Roster {
    members: BTreeMap<String, (u64, Option<PartyKeys>)>,
}

impl Roster {
    fn add(&mut self, id: &str, examples: u64, keys: Option<PartyKeys>) {
        self.members.insert(id.to_string(), (examples, keys));
    }

    fn join(&self, orch: &mut Orchestrator, id: &str, now: Instant) -> anyhow::Result<()> {
        let (examples, keys) = self.members[id].clone();
        orch.handle_join_with_keys(id, format!("virtual-{id}"), examples, keys, now)
            .map_err(|e| anyhow::anyhow!("{id}: {e}"))
    }

    /// Takes `gone` out of the federation and brings `back` in.
    fn apply(
        &self,
        orch: &mut Orchestrator,
        (gone, back): (Vec<&str>, Vec<&str>),
        now: Instant,
    ) -> anyhow::Result<()> {
        for id in gone {
            orch.handle_leave(id, now)
                .map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
        }
        for id in back {
            self.join(orch, id, now)?;
        }
        Ok(())
    }
}

/// Feeds one worker's results to the state machine: its partial sum, its participants'
/// evaluations; says whether anything was fed.
fn feed_shard(
    orch: &mut Orchestrator,
    result: ShardResult,
    now: Instant,
    time: &mut EngineSeconds,
) -> anyhow::Result<bool> {
    let mut fed = false;
    for (id, why) in &result.unanswered {
        tracing::debug!(participant = %id, "sends nothing this round: {why}");
    }
    if let Some(partial) = result.partial {
        let t0 = Instant::now();
        let who = partial.contributions.len();
        orch.handle_partial_sum(partial, now)
            .map_err(|e| anyhow::anyhow!("a worker's partial sum of {who} updates refused: {e}"))?;
        time.aggregate += t0.elapsed().as_secs_f64();
        fed = true;
    }
    for (id, round, metrics) in result.evaluations {
        orch.handle_evaluation(&id, round, metrics, now)
            .map_err(|e| anyhow::anyhow!("{id}: evaluation refused: {e}"))?;
        fed = true;
    }
    Ok(fed)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use cohort_participant::LocalData;

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
                proximal_mu: 0.0,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            rounds: 3,
            min_participants: 9,
            fraction: 0.7,
            sampling: Default::default(),
            min_updates: 1,
            round_timeout: Duration::from_secs(60),
            eval_timeout: Duration::from_secs(60),
            evaluate: true,
            evaluate_fraction: 1.0,
            liveness_timeout: Duration::from_secs(60),
            seed: 11,
            secure: secure.then(|| SecureSettings {
                committee_size: 3,
                t_min: 2,
                ..SecureSettings::default()
            }),
            data: None,
            clip_norm: None,
            clip_per_layer: false,
            privacy: None,
            emulated_codec: None,
            control_variates: false,
            adaptive_clipping: None,
        }
    }

    fn clients() -> Vec<(String, Option<SiteData>)> {
        (0..9)
            .map(|i| {
                let rows = 12 + i;
                let x: Vec<f32> = (0..rows * 4)
                    .map(|k| ((k * 37 + i * 11) % 23) as f32 / 23.0 - 0.5)
                    .collect();
                let y: Vec<u32> = (0..rows).map(|k| ((k + i) % 3) as u32).collect();
                let ds = Dataset::new(x, y, FeatureShape::Flat(4), 3).unwrap();
                let data = LocalData::prepare(ds, 0.25, true, i as u64).unwrap();
                (format!("p{i}"), Some(SiteData::Ready(Arc::new(data))))
            })
            .collect()
    }

    /// The final parameters of a run on a pool of `threads`.
    fn final_params(secure: bool, threads: usize) -> Vec<f32> {
        run_with(job(secure), None, threads)
    }

    fn run_with(job: JobConfig, emulation: Option<Emulation>, threads: usize) -> Vec<f32> {
        run_dropping(job, emulation, threads, 0.0).0
    }

    /// The final parameters and the rounds of a run where participants drop out at `dropout`.
    fn run_dropping(
        job: JobConfig,
        emulation: Option<Emulation>,
        threads: usize,
        dropout: f64,
    ) -> (Vec<f32>, Vec<RoundSummary>) {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let orch = Orchestrator::new(
            job,
            cohort_coordinator::strategy::by_name("fedavg", 1.0, 0.0).unwrap(),
            None,
            [9; 32],
        )
        .unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut events = Vec::new();
        let (history, _) = pool
            .install(|| {
                run(
                    orch,
                    &store,
                    clients(),
                    None,
                    ComputeDevice::Cpu,
                    emulation,
                    &Conditions {
                        dropout,
                        availability: None,
                    },
                    |e| events.push(format!("{e:?}").chars().take(40).collect::<String>()),
                )
            })
            .unwrap();
        assert_eq!(history.len(), 3);
        let sizes: Vec<usize> = history
            .iter()
            .map(|s| s.participants.len() + s.stragglers.len())
            .collect();
        assert_eq!(sizes, [7, 7, 7], "⌈9 × 0.7⌉ selected a round");
        assert!(history.iter().all(|s| s.eval.is_some()));
        assert!(events.iter().any(|e| e.starts_with("RoundCompleted")));
        (store.for_job("virtual").read_params(3).unwrap(), history)
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
        let d = p
            .iter()
            .zip(&s)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-3, "secure and plaintext models differ by {d}");
    }

    #[test]
    fn emulated_secure_aggregation_gives_the_encrypted_sums_model_bit_for_bit() {
        let secure = job(true);
        let codec = secure.secure.as_ref().unwrap().codec;
        let mut plain = job(false);
        plain.min_updates = 2; // the secure job's t_min
        let emulated = run_with(plain, Some(Emulation { codec }), 2);
        assert_eq!(emulated, run_with(secure, None, 2));
        // A codec for larger rounds (fewer fractional bits) still agrees.
        let budget = cohort_crypto::GlweParams::default().budget(3);
        let wide = cohort_crypto::Codec::for_total_weight(20_000, &budget).unwrap();
        let mut secure = job(true);
        secure.secure.as_mut().unwrap().codec = wide;
        let mut plain = job(false);
        plain.min_updates = 2;
        let emulated = run_with(plain, Some(Emulation { codec: wide }), 1);
        assert_eq!(emulated, run_with(secure, None, 2));
    }

    /// Distributed DP: the encrypted sum of noised updates and the plaintext emulation of the
    /// same integers (the same noise, from the same seeds) give the same model, bit for bit;
    /// the noise is there (the model is not the noiseless one) and every round is accounted.
    #[test]
    fn secure_distributed_noise_equals_plaintext_with_the_same_noise() {
        let private = |mut j: JobConfig| {
            j.clip_norm = Some(1.0);
            j.adaptive_clipping = Some(cohort_coordinator::privacy::AdaptiveClipping {
                target_quantile: 0.5,
                learning_rate: 0.2,
            });
            j.privacy = Some(cohort_coordinator::privacy::PrivacySettings {
                mechanism: cohort_coordinator::privacy::Mechanism::Distributed,
                noise_multiplier: 0.8,
                delta: 1e-5,
                target_epsilon: None,
            });
            j
        };
        let secure = private(job(true));
        let codec = secure.secure.as_ref().unwrap().codec;
        let mut plain = private(job(false));
        plain.min_updates = 2; // the secure job's t_min
        plain.emulated_codec = Some(codec);
        assert_eq!(
            secure.participant_noise(1.0),
            plain.participant_noise(1.0),
            "the same noise is asked of each participant"
        );
        let (emulated, rounds) = run_dropping(plain, Some(Emulation { codec }), 2, 0.0);
        let (encrypted, again) = run_dropping(secure, None, 1, 0.0);
        assert_eq!(emulated, encrypted);
        let mut noiseless = job(true);
        noiseless.clip_norm = Some(1.0);
        assert_ne!(
            encrypted,
            run_with(noiseless, None, 2),
            "no noise was added"
        );
        // The clip norm moved with the noised share of updates within it, the same way.
        let clips: Vec<_> = rounds.iter().map(|s| s.clipping.unwrap()).collect();
        assert_eq!(
            clips,
            again
                .iter()
                .map(|s| s.clipping.unwrap())
                .collect::<Vec<_>>()
        );
        assert!(
            clips.iter().all(|c| c.next_clip_norm != c.clip_norm),
            "{clips:?}"
        );
        let eps: Vec<f64> = rounds.iter().map(|s| s.privacy.unwrap().epsilon).collect();
        assert!(eps.windows(2).all(|w| w[0] < w[1]), "ε grows: {eps:?}");
        assert_eq!(
            eps,
            again
                .iter()
                .map(|s| s.privacy.unwrap().epsilon)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn dropped_participants_are_left_out_the_same_way_whatever_the_threads() {
        for secure in [false, true] {
            let (one, rounds) = run_dropping(job(secure), None, 1, 0.3);
            let (two, again) = run_dropping(job(secure), None, 2, 0.3);
            assert_eq!(one, two, "secure {secure}");
            let left_out: Vec<&Vec<String>> = rounds.iter().map(|s| &s.stragglers).collect();
            assert_eq!(
                left_out,
                again.iter().map(|s| &s.stragglers).collect::<Vec<_>>()
            );
            assert!(
                left_out.iter().any(|s| !s.is_empty()),
                "at 30%, someone of 21 drops out"
            );
            assert_ne!(
                one,
                run_with(job(secure), None, 2),
                "the dropouts changed the model"
            );
        }
    }
}
