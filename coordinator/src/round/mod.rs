//! Round orchestration as a sans-IO state machine.
//!
//! [`Orchestrator`] owns a job's participant registry, its rounds and its global model. It does
//! no I/O and reads no clock: the driver (the tonic service, or a test) feeds it inputs with the
//! current time and takes outputs.
//!
//! - **Inputs** (`handle_*`): a participant joins, polls, sends a heartbeat, submits an update
//!   or an evaluation, leaves; and [`Orchestrator::handle_timeout`] when the time given by
//!   [`Orchestrator::poll_timeout`] has come.
//! - **Queries**: [`Orchestrator::task_for`] says what a participant should do now;
//!   [`Orchestrator::global`] is the current model.
//! - **Outputs**: [`Orchestrator::poll_event`] yields what happened, in order (rounds
//!   started, completed and failed, stragglers, participants lost). The driver must drain events
//!   after every input, and call `handle_timeout` no later than `poll_timeout`.
//!
//! One round: select participants → *training* (collect updates until every selected one
//! has sent its update or the deadline passes; updates are folded into a running weighted sum,
//! so memory is O(model), not O(participants × model)) → aggregate with the strategy → new
//! global version → *evaluation* (federated: participants evaluate the new model on their own
//! held-out data) → round complete. A round with too few updates at its deadline fails and is
//! tried again (a new attempt) with whoever is available.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use cohort_model::Metrics;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;

use crate::strategy::Strategy;

mod config;
mod messages;
mod partial;
mod privacy;
mod progress;
mod secure;
mod statistics;

pub use config::{JobConfig, JobError, Sampling, SecureSettings};
pub use messages::*;
pub use statistics::FederationStatistics;

/// Identity of a participant (its configured id; the certificate subject once mTLS exists).
pub type ParticipantId = String;

#[derive(Debug, Clone)]
struct Participant {
    session: String,
    presence: Presence,
    last_seen: Instant,
    num_examples: u64,
    keys: Option<PartyKeys>,
}

#[derive(Debug)]
struct Training {
    round: u64,
    attempt: u32,
    selected: BTreeSet<ParticipantId>,
    received: BTreeSet<ParticipantId>,
    deadline: Instant,
    started: Instant,
    /// Σ w_i · Δ_i, in f64 so the order of arrival does not change the sum measurably
    /// (plaintext jobs; empty in secure ones).
    acc: Vec<f64>,
    weight: u64,
    train_metrics: Vec<Metrics>,
    /// The encrypted sum and what the committee will need (secure jobs).
    secure: Option<Box<secure::SecureTraining>>,
    /// Robust strategies: every update, in order of arrival (plaintext jobs only).
    kept: Vec<Vec<f32>>,
}

#[derive(Debug)]
struct Evaluating {
    summary: RoundSummary,
    selected: BTreeSet<ParticipantId>,
    received: BTreeMap<ParticipantId, Metrics>,
    deadline: Instant,
    started: Instant,
    params: Arc<Vec<f32>>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for enough participants to start round `round`.
    Waiting {
        round: u64,
        attempt: u32,
    },
    Training(Training),
    /// Secure jobs: the committee decrypts the sum.
    Decrypting(Box<secure::Decrypting>),
    Evaluating(Evaluating),
    /// Round `round` is complete and waits to be durably committed; `failure` holds why the
    /// last commit failed, if one did.
    Committing {
        round: u64,
        failure: Option<String>,
    },
    Finished,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Waiting { .. } => "waiting for participants",
            Phase::Training(_) => "training",
            Phase::Decrypting(_) => "decrypting",
            Phase::Evaluating(_) => "evaluating",
            Phase::Committing { failure: None, .. } => "committing",
            Phase::Committing {
                failure: Some(_), ..
            } => "paused: storage failure",
            Phase::Finished => "finished",
        }
    }
}

/// A job's round orchestration. See the module documentation for the contract.
pub struct Orchestrator {
    config: JobConfig,
    strategy: Box<dyn Strategy>,
    /// Ids allowed to join; `None` admits anyone (development only).
    allowed: Option<BTreeSet<ParticipantId>>,
    participants: BTreeMap<ParticipantId, Participant>,
    sessions: BTreeMap<String, ParticipantId>,
    phase: Phase,
    global: Arc<Vec<f32>>,
    version: u64,
    completed: Vec<RoundSummary>,
    events: VecDeque<Event>,
    /// Round seeds: a CSPRNG seeded from the operating system.
    entropy: ChaCha20Rng,
    /// Signs manifests.
    signer: cohort_crypto::Signer25519,
    /// No new round starts while paused (an operator's choice).
    paused: bool,
    /// Set when an operator cancelled the job.
    cancelled: bool,
    /// Why the job stopped on its own, if it did.
    failure: Option<String>,
    /// Round 0's outcome, in jobs with tables.
    statistics: Option<FederationStatistics>,
    /// Jobs with differential privacy: the accountant and the central noise's key.
    privacy: Option<privacy::Ledger>,
    /// The clip norm of the next round (adaptive clipping moves it).
    clip: Option<f64>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("job", &self.config.job_id)
            .field("phase", &self.phase.name())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// A job starting from the seeded initial model of `config.model`.
    ///
    /// `entropy` seeds the machine's own randomness (round seeds of secure aggregation, its
    /// signing key): the driver draws it from the operating system, tests pass a constant.
    /// The machine reads no other source of randomness, and no clock.
    pub fn new(
        config: JobConfig,
        mut strategy: Box<dyn Strategy>,
        allowed: Option<BTreeSet<ParticipantId>>,
        entropy: [u8; 32],
    ) -> Result<Self, JobError> {
        config.validate()?;
        strategy.initialise(config.model.num_parameters());
        config.check_strategy(strategy.as_ref())?;
        let first_round = if config.data.is_some() { 0 } else { 1 };
        let global = Arc::new(config.model.initial_parameters(config.seed));
        let mut entropy = ChaCha20Rng::from_seed(entropy);
        let signer = cohort_crypto::Signer25519::generate(&mut entropy);
        let privacy = config.privacy.map(|_| privacy::Ledger::new(&mut entropy));
        Ok(Orchestrator {
            privacy,
            clip: config.clip_norm,
            entropy,
            signer,
            config,
            strategy,
            allowed,
            participants: BTreeMap::new(),
            sessions: BTreeMap::new(),
            // Jobs with tables start with the federation's statistics.
            phase: Phase::Waiting {
                round: first_round,
                attempt: 1,
            },
            global,
            version: 0,
            completed: Vec::new(),
            events: VecDeque::new(),
            paused: false,
            cancelled: false,
            failure: None,
            statistics: None,
        })
    }

    /// A job resumed after a restart: `history` holds its completed rounds (oldest first,
    /// numbered from 1 without gaps), `global` the model version of the last one. The next
    /// round starts as attempt `attempt`, so nothing about the interrupted attempt is reused
    /// (its round seed in particular: the driver passes fresh `entropy` at every start).
    pub fn resume(
        config: JobConfig,
        strategy: Box<dyn Strategy>,
        allowed: Option<BTreeSet<ParticipantId>>,
        history: Vec<RoundSummary>,
        global: Vec<f32>,
        attempt: u32,
        entropy: [u8; 32],
    ) -> Result<Self, JobError> {
        let mut o = Orchestrator::new(config, strategy, allowed, entropy)?;
        if global.len() != o.global.len() {
            return Err(JobError::Resume(format!(
                "the last model version has {} parameters, the job's model {}",
                global.len(),
                o.global.len()
            )));
        }
        for (i, s) in history.iter().enumerate() {
            if s.round != i as u64 + 1 {
                return Err(JobError::Resume(format!(
                    "completed rounds are not contiguous: round {} where {} was expected",
                    s.round,
                    i + 1
                )));
            }
        }
        let done = history.len() as u64;
        if done > o.config.rounds {
            return Err(JobError::Resume(format!(
                "{done} rounds completed, but the job has only {}",
                o.config.rounds
            )));
        }
        o.global = Arc::new(global);
        o.version = done;
        if let Some(l) = &mut o.privacy {
            l.replay(&history);
        }
        if let Some(c) = history.iter().rev().find_map(|s| s.clipping) {
            o.clip = Some(c.next_clip_norm);
        }
        o.completed = history;
        o.phase = if done == o.config.rounds {
            Phase::Finished
        } else {
            // A job with tables resumed before round 0 was committed does it again
            // ([`Self::restore_statistics`] skips it when its statistics were stored).
            let round0 = done == 0 && o.config.data.is_some();
            Phase::Waiting {
                round: if round0 { 0 } else { done + 1 },
                attempt: attempt.max(1),
            }
        };
        Ok(o)
    }

    /// Pauses (no new round starts; a round under way completes) or resumes.
    pub fn set_paused(&mut self, paused: bool, now: Instant) {
        if self.paused == paused || self.is_finished() {
            return;
        }
        self.paused = paused;
        self.events.push_back(Event::Paused(paused));
        self.advance(now);
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether an operator cancelled the job.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// Why the job stopped on its own before its last round, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Stops the job for good; a round under way is abandoned (nothing of it is kept).
    pub fn cancel(&mut self) {
        if self.is_finished() {
            return;
        }
        let round = self.current_round();
        self.phase = Phase::Finished;
        self.cancelled = true;
        self.events.push_back(Event::JobCancelled { round });
    }

    /// The strategy's server state to persist with the current model version.
    pub fn strategy_state(&self) -> Option<Vec<u8>> {
        self.strategy.save_state()
    }

    /// Restores the strategy's state saved with the version a job resumes from.
    pub fn restore_strategy_state(&mut self, state: &[u8]) -> Result<(), JobError> {
        Ok(self.strategy.restore_state(state)?)
    }

    // ----- getters -----

    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    /// Name of the aggregation strategy (recorded in each model version's manifest).
    /// SCAFFOLD: the server's control variate of the current global version.
    pub fn control_variate(&self) -> Option<Arc<Vec<f32>>> {
        self.strategy.control_variate()
    }

    pub fn strategy_name(&self) -> &'static str {
        self.strategy.name()
    }

    /// The current global model and its version (0 = initial, r = after round r).
    pub fn global(&self) -> (u64, Arc<Vec<f32>>) {
        (self.version, self.global.clone())
    }

    /// Completed rounds, oldest first.
    pub fn history(&self) -> &[RoundSummary] {
        &self.completed
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Name of the current phase, for status displays.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Waiting { .. } if self.paused => "paused",
            Phase::Finished if self.cancelled => "cancelled",
            Phase::Finished if self.failure.is_some() => "failed",
            _ => self.phase.name(),
        }
    }

    /// The participant holding `session`, if the session is current.
    pub fn participant_for_session(&self, session: &str) -> Option<&ParticipantId> {
        self.sessions.get(session)
    }

    pub fn participants(&self) -> Vec<ParticipantInfo> {
        self.participants
            .iter()
            .map(|(id, p)| ParticipantInfo {
                id: id.clone(),
                presence: p.presence,
                num_examples: p.num_examples,
                last_seen: p.last_seen,
            })
            .collect()
    }

    /// Round number a new update must carry, if training is under way.
    pub fn training_round(&self) -> Option<u64> {
        match &self.phase {
            Phase::Training(t) => Some(t.round),
            _ => None,
        }
    }

    // ----- inputs -----

    /// A participant joins (or rejoins) with a fresh `session` chosen by the driver. A rejoin
    /// replaces the old session; a participant selected for the open round keeps its place.
    pub fn handle_join(
        &mut self,
        id: &str,
        session: String,
        num_examples: u64,
        now: Instant,
    ) -> Result<(), Rejection> {
        self.handle_join_with_keys(id, session, num_examples, None, now)
    }

    /// [`Self::handle_join`] with the participant's secure-aggregation keys, which a secure
    /// job requires.
    pub fn handle_join_with_keys(
        &mut self,
        id: &str,
        session: String,
        num_examples: u64,
        keys: Option<PartyKeys>,
        now: Instant,
    ) -> Result<(), Rejection> {
        if id.is_empty() {
            return Err(Rejection::Invalid("participant id is empty".into()));
        }
        if self.config.secure.is_some() && keys.is_none() {
            return Err(Rejection::Invalid(
                "this job aggregates securely: join with seal and verify keys".into(),
            ));
        }
        if let Some(allowed) = &self.allowed
            && !allowed.contains(id)
            && !self.is_custodian(id)
        {
            return Err(Rejection::NotAllowed(id.to_string()));
        }
        let rejoined = if let Some(old) = self.participants.get(id) {
            self.sessions.remove(&old.session);
            true
        } else {
            false
        };
        self.sessions.insert(session.clone(), id.to_string());
        self.participants.insert(
            id.to_string(),
            Participant {
                session,
                presence: Presence::Online,
                last_seen: now,
                num_examples,
                keys,
            },
        );
        self.events.push_back(Event::ParticipantJoined {
            id: id.to_string(),
            rejoined,
        });
        self.advance(now);
        Ok(())
    }

    /// Any sign of life (a poll or heartbeat) from a participant.
    pub fn handle_heartbeat(&mut self, id: &str, now: Instant) -> Result<(), Rejection> {
        let p = self
            .participants
            .get_mut(id)
            .filter(|p| p.presence != Presence::Left)
            .ok_or_else(|| Rejection::UnknownParticipant(id.to_string()))?;
        p.last_seen = now;
        if p.presence == Presence::Lost {
            p.presence = Presence::Online;
            self.events.push_back(Event::ParticipantJoined {
                id: id.to_string(),
                rejoined: true,
            });
            self.advance(now);
        }
        Ok(())
    }

    /// A participant leaves; its session ends. Its pending work in the open round, if any,
    /// will count as missing at the deadline.
    pub fn handle_leave(&mut self, id: &str, now: Instant) -> Result<(), Rejection> {
        let p = self
            .participants
            .get_mut(id)
            .ok_or_else(|| Rejection::UnknownParticipant(id.to_string()))?;
        p.presence = Presence::Left;
        let session = p.session.clone();
        self.sessions.remove(&session);
        self.events
            .push_back(Event::ParticipantLeft { id: id.to_string() });
        self.advance(now);
        Ok(())
    }

    /// Checks that `id` may send an update for `round` now: it is known, selected, and has
    /// not sent one yet.
    fn check_open(&self, id: &str, round: u64) -> Result<&Training, Rejection> {
        if !self.participants.contains_key(id) {
            return Err(Rejection::UnknownParticipant(id.to_string()));
        }
        let t = match &self.phase {
            Phase::Training(t) if t.round == round => t,
            _ => {
                return Err(Rejection::RoundClosed {
                    round,
                    current: self.current_round(),
                    phase: self.phase.name(),
                });
            }
        };
        if !t.selected.contains(id) {
            return Err(Rejection::NotSelected(id.to_string(), round));
        }
        if t.received.contains(id) {
            return Err(Rejection::Duplicate(id.to_string(), round));
        }
        Ok(t)
    }

    /// Checks that `id` may send a plaintext update of `num_parameters` for `round` now,
    /// before the driver receives its data. [`Self::handle_update`] checks again.
    pub fn check_update(
        &self,
        id: &str,
        round: u64,
        num_parameters: usize,
    ) -> Result<(), Rejection> {
        let t = self.check_open(id, round)?;
        if t.secure.is_some() {
            return Err(Rejection::Invalid(
                "this round is securely aggregated: send encrypted bodies, not plaintext".into(),
            ));
        }
        let expected = self.update_len(round);
        if num_parameters != expected {
            return Err(Rejection::ParameterCount {
                expected,
                got: num_parameters,
            });
        }
        Ok(())
    }

    /// A complete update arrives. It is folded into the round's running sum at once; when
    /// every selected participant has sent one, the round aggregates without waiting for the
    /// deadline.
    pub fn handle_update(
        &mut self,
        id: &str,
        update: Update,
        now: Instant,
    ) -> Result<(), Rejection> {
        self.check_update(id, update.round, update.delta.len())?;
        if update.num_examples == 0 {
            return Err(Rejection::Invalid("num_examples is 0".into()));
        }
        if let Some(i) = update.delta.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::Invalid(format!("parameter {i} is not finite")));
        }
        self.check_statistics_update(id, update.round, update.num_examples, Some(&update.delta))?;
        // Differential privacy: every update weighs the same.
        let n = if self.config.uniform_weights(update.round) {
            1
        } else {
            update.num_examples
        };
        let Phase::Training(t) = &mut self.phase else {
            unreachable!("check_update ensured training");
        };
        let w = n as f64;
        for (a, d) in t.acc.iter_mut().zip(&update.delta) {
            *a += w * *d as f64;
        }
        t.weight += n;
        if self.strategy.robust_rule().is_some() {
            t.kept.push(update.delta);
        }
        self.accepted(id, update.round, update.train, now);
        Ok(())
    }

    /// Records an update already folded into the sum; closes training when every selected
    /// participant has sent one.
    fn accepted(&mut self, id: &str, round: u64, train: Option<Metrics>, now: Instant) {
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen = now;
        }
        let Phase::Training(t) = &mut self.phase else {
            unreachable!("called while training");
        };
        t.received.insert(id.to_string());
        t.train_metrics.extend(train);
        self.events.push_back(Event::UpdateAccepted {
            round,
            id: id.to_string(),
        });
        if t.received.len() == t.selected.len() {
            self.close_training(now);
        }
    }

    /// A participant's evaluation of the model of `round`.
    pub fn handle_evaluation(
        &mut self,
        id: &str,
        round: u64,
        metrics: Metrics,
        now: Instant,
    ) -> Result<(), Rejection> {
        if !self.participants.contains_key(id) {
            return Err(Rejection::UnknownParticipant(id.to_string()));
        }
        let current = self.current_round();
        let phase = self.phase.name();
        let Phase::Evaluating(e) = &mut self.phase else {
            return Err(Rejection::RoundClosed {
                round,
                current,
                phase,
            });
        };
        if e.summary.round != round {
            return Err(Rejection::RoundClosed {
                round,
                current,
                phase,
            });
        }
        if !e.selected.contains(id) {
            return Err(Rejection::NotSelected(id.to_string(), round));
        }
        if e.received.contains_key(id) {
            return Err(Rejection::Duplicate(id.to_string(), round));
        }
        e.received.insert(id.to_string(), metrics);
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen = now;
        }
        if e.received.len() == e.selected.len() {
            self.close_evaluation(now);
        }
        Ok(())
    }

    /// Time has come: marks silent participants lost, closes phases whose deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let liveness = self.config.liveness_timeout;
        for (id, p) in self.participants.iter_mut() {
            if p.presence == Presence::Online && now.duration_since(p.last_seen) >= liveness {
                p.presence = Presence::Lost;
                self.events
                    .push_back(Event::ParticipantLost { id: id.clone() });
            }
        }
        match &self.phase {
            Phase::Training(t) if now >= t.deadline => self.close_training(now),
            Phase::Decrypting(d) if now >= d.deadline => self.decrypt_deadline(now),
            Phase::Evaluating(e) if now >= e.deadline => self.close_evaluation(now),
            _ => {}
        }
        self.advance(now);
    }

    // ----- outputs -----

    /// Whether [`Self::poll_event`] has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next thing that happened, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Training(t) => Some(t.deadline),
            Phase::Decrypting(d) => Some(d.deadline),
            Phase::Evaluating(e) => Some(e.deadline),
            _ => None,
        };
        let liveness = self
            .participants
            .values()
            .filter(|p| p.presence == Presence::Online)
            .map(|p| p.last_seen + self.config.liveness_timeout)
            .min();
        [phase, liveness].into_iter().flatten().min()
    }
}

/// Seed of a participant's local shuffling in one round attempt.
pub fn participant_seed(base: u64, round: u64, attempt: u32, id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a over the id, mixed with the rest.
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    splitmix(base ^ splitmix(round.wrapping_mul(1_000_003) ^ attempt as u64) ^ h)
}

fn selection_seed(base: u64, round: u64, attempt: u32) -> u64 {
    splitmix(base.wrapping_add(0x005e_1ec7) ^ splitmix(round << 16 | attempt as u64))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
