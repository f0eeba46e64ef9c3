//! How a round moves on: selecting participants, closing training, aggregating the mean
//! update with the strategy, closing evaluation, and holding a completed round until the
//! driver says it is durably committed.

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::*;

impl Orchestrator {
    /// What participant `id` should do now.
    pub fn task_for(&self, id: &str) -> Task {
        match &self.phase {
            Phase::Finished => Task::Finished,
            Phase::Training(t)
                if t.round == 0 && t.selected.contains(id) && !t.received.contains(id) =>
            {
                Task::Statistics {
                    attempt: t.attempt,
                    deadline: t.deadline,
                    secure: t.secure.as_ref().map(|s| s.info.clone()),
                }
            }
            Phase::Training(t) if t.selected.contains(id) && !t.received.contains(id) => {
                let mut config = self.config.train.clone();
                config.seed = participant_seed(self.config.train.seed, t.round, t.attempt, id);
                Task::Train {
                    round: t.round,
                    model_version: self.version,
                    config,
                    deadline: t.deadline,
                    secure: t.secure.as_ref().map(|s| s.info.clone()),
                    clip_norm: self.clip,
                    clip_per_layer: self.config.clip_per_layer,
                    noise_stddev: self.clip.and_then(|c| self.config.participant_noise(c)),
                    clip_indicator: self.clip.and_then(|c| self.config.indicator_scale(c)),
                    control: self.strategy.control_variate(),
                }
            }
            Phase::Decrypting(d) => self.decrypt_task_for(d, id),
            Phase::Evaluating(e) if e.selected.contains(id) && !e.received.contains_key(id) => {
                Task::Evaluate {
                    round: e.summary.round,
                    model_version: self.version,
                    deadline: e.deadline,
                }
            }
            _ => Task::Idle,
        }
    }

    pub(super) fn current_round(&self) -> u64 {
        match &self.phase {
            Phase::Waiting { round, .. } => *round,
            Phase::Training(t) => t.round,
            Phase::Decrypting(d) => d.round,
            Phase::Evaluating(e) => e.summary.round,
            Phase::Committing { round, .. } => *round,
            Phase::Finished => self.config.rounds,
        }
    }

    pub(super) fn is_custodian(&self, id: &str) -> bool {
        self.config
            .secure
            .as_ref()
            .is_some_and(|s| s.is_custodian(id))
    }

    pub(super) fn online_with_keys(&self, id: &str) -> bool {
        self.participants
            .get(id)
            .is_some_and(|p| p.presence == Presence::Online && p.keys.is_some())
    }

    /// Updates a round needs: `min_updates`, and at least T_min in secure jobs.
    pub(super) fn needed_updates(&self) -> usize {
        let t_min = self.config.secure.as_ref().map_or(0, |s| s.t_min);
        self.config.min_updates.max(t_min)
    }

    pub(super) fn online(&self) -> Vec<ParticipantId> {
        self.participants
            .iter()
            .filter(|(_, p)| p.presence == Presence::Online)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Starts a round when waiting and enough participants are online.
    pub(super) fn advance(&mut self, now: Instant) {
        let Phase::Waiting { round, attempt } = self.phase else {
            return;
        };
        if self.paused || self.participants.len() < self.config.min_participants {
            // Cheap first: a federation filling up (100,000 joins) does not list everyone
            // online at every join.
            return;
        }
        let mut online: Vec<ParticipantId> = self
            .online()
            .into_iter()
            .filter(|id| !self.is_custodian(id))
            .collect();
        if online.len() < self.config.min_participants {
            return;
        }
        if let Some(sec) = &self.config.secure
            && !sec.custodians.is_empty()
        {
            let ready = sec
                .custodians
                .iter()
                .filter(|c| self.online_with_keys(c))
                .count();
            if ready < sec.threshold_for(ready) {
                return; // not enough custodians to ever decrypt
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(selection_seed(self.config.seed, round, attempt));
        online.shuffle(&mut rng);
        let drawn = match self.config.sampling {
            // The statistics are the whole federation's: everyone online.
            _ if round == 0 => online.len(),
            Sampling::Fraction => (online.len() as f64 * self.config.fraction).ceil() as usize,
            Sampling::Count(k) => k,
            Sampling::Poisson => {
                // Each one's coin, in the seeded order; the chosen ones first.
                let coins: Vec<bool> = online
                    .iter()
                    .map(|_| rng.random::<f64>() < self.config.fraction)
                    .collect();
                let mut order: Vec<usize> = (0..online.len()).collect();
                order.sort_by_key(|&i| !coins[i]);
                online = order.iter().map(|&i| online[i].clone()).collect();
                coins.iter().filter(|c| **c).count()
            }
        };
        // Never fewer than a round needs to aggregate.
        let mut want = drawn.max(self.needed_updates()).min(online.len());
        if let Some(sec) = &self.config.secure {
            // Every participant's weight is at least 1.
            want = want.min(sec.codec.max_total_weight as usize);
        }
        if round > 0 && self.privacy.is_some() {
            let q = match self.config.sampling {
                Sampling::Poisson => self.config.fraction,
                _ => want as f64 / online.len() as f64,
            };
            if self.budget_spent(round, q) {
                return;
            }
        }
        online.truncate(want);
        let secure = self
            .config
            .secure
            .is_some()
            .then(|| self.secure_training(round, attempt, &online));
        let selected: BTreeSet<ParticipantId> = online.into_iter().collect();
        self.events.push_back(Event::RoundStarted {
            round,
            attempt,
            selected: selected.iter().cloned().collect(),
        });
        self.phase = Phase::Training(Training {
            round,
            attempt,
            selected,
            received: BTreeSet::new(),
            deadline: now + self.config.round_timeout,
            started: now,
            acc: if secure.is_some() {
                Vec::new()
            } else {
                vec![0.0; self.update_len(round)]
            },
            weight: 0,
            train_metrics: Vec::new(),
            secure,
            kept: Vec::new(),
        });
    }

    pub(super) fn close_training(&mut self, now: Instant) {
        let Phase::Training(t) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        let stragglers: Vec<ParticipantId> = t.selected.difference(&t.received).cloned().collect();
        if !stragglers.is_empty() {
            self.events.push_back(Event::StragglersDropped {
                round: t.round,
                ids: stragglers.clone(),
            });
        }
        let needed = self.needed_updates();
        if t.received.len() < needed {
            let cause = FailureCause::TooFewUpdates {
                received: t.received.len(),
                needed,
            };
            self.fail_attempt(t.round, t.attempt, cause, now);
            return;
        }
        if t.secure.is_some() {
            self.start_decryption(t, stragglers, now);
            return;
        }
        if t.round == 0 {
            // Whole multiples of the codec's unit (checked with each update): exact sums.
            let unit = (1u64 << self.statistics_codec().frac_bits) as f64;
            let sums: Vec<i64> = t.acc.iter().map(|a| (a * unit).round() as i64).collect();
            let closed = statistics::Closed {
                attempt: t.attempt,
                participants: t.received.iter().cloned().collect(),
                stragglers,
                started: t.started,
            };
            self.finish_statistics(closed, &sums, now);
            return;
        }
        let w = t.weight as f64;
        let mean: Vec<f32> = match self.strategy.robust_rule() {
            // Robust rules: the rule's combination of the updates, not their mean.
            Some(rule) => rule.combine(&t.kept),
            None => t.acc.iter().map(|a| (a / w) as f32).collect(),
        };
        let summary = RoundSummary {
            round: t.round,
            attempts: t.attempt,
            participants: t.received.iter().cloned().collect(),
            stragglers,
            total_examples: t.weight,
            train: Metrics::weighted_mean(&t.train_metrics),
            eval: None,
            evaluated_by: 0,
            seconds: 0.0,
            privacy: None,
            clipping: None,
        };
        self.apply_mean(summary, &mean, t.started, now);
    }

    /// Applies the strategy to the mean update: new global version, then evaluation.
    pub(super) fn apply_mean(
        &mut self,
        mut summary: RoundSummary,
        mean: &[f32],
        started: Instant,
        now: Instant,
    ) {
        let noised;
        let mean = if self.privacy.is_some() || self.config.adaptive_clipping.is_some() {
            let mut m = self.privatise(&mut summary, mean);
            self.adapt_clip(&mut summary, &mut m);
            noised = m;
            &noised[..]
        } else {
            mean
        };
        let round = crate::strategy::RoundContext {
            round: summary.round,
            contributors: summary.participants.len(),
            population: self
                .participants
                .keys()
                .filter(|id| !self.is_custodian(id))
                .count(),
        };
        let new_global = self.strategy.apply(&self.global, mean, &round);
        self.global = Arc::new(new_global);
        self.version = summary.round;
        summary.seconds = now.duration_since(started).as_secs_f64();
        let mut evaluators: Vec<ParticipantId> = self
            .online()
            .into_iter()
            .filter(|id| !self.is_custodian(id))
            .collect();
        if self.config.evaluate_fraction < 1.0 {
            // A seeded sample, drawn apart from the round's training selection.
            let mut rng = ChaCha8Rng::seed_from_u64(
                selection_seed(self.config.seed, summary.round, summary.attempts)
                    ^ 0x00e7_a1ba_7e00_5eed,
            );
            evaluators.shuffle(&mut rng);
            let k = (evaluators.len() as f64 * self.config.evaluate_fraction).ceil() as usize;
            evaluators.truncate(k.max(1));
        }
        let evaluators: BTreeSet<ParticipantId> = evaluators.into_iter().collect();
        if !self.config.evaluate || evaluators.is_empty() {
            self.complete(summary, self.global.clone());
            return;
        }
        self.phase = Phase::Evaluating(Evaluating {
            summary,
            selected: evaluators,
            received: BTreeMap::new(),
            deadline: now + self.config.eval_timeout,
            started,
            params: self.global.clone(),
        });
    }

    /// A failed attempt: the round is tried again with whoever is available.
    pub(super) fn fail_attempt(
        &mut self,
        round: u64,
        attempt: u32,
        cause: FailureCause,
        now: Instant,
    ) {
        self.events.push_back(Event::RoundFailed {
            round,
            attempt,
            cause,
        });
        self.phase = Phase::Waiting {
            round,
            attempt: attempt + 1,
        };
        self.advance(now);
    }

    pub(super) fn close_evaluation(&mut self, now: Instant) {
        let Phase::Evaluating(e) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        let mut summary = e.summary;
        let metrics: Vec<Metrics> = e.received.values().copied().collect();
        summary.eval = Metrics::weighted_mean(&metrics);
        summary.evaluated_by = metrics.len();
        summary.seconds = now.duration_since(e.started).as_secs_f64();
        self.complete(summary, e.params);
    }

    pub(super) fn complete(&mut self, summary: RoundSummary, params: Arc<Vec<f32>>) {
        let round = summary.round;
        self.completed.push(summary.clone());
        self.events.push_back(Event::RoundCompleted {
            summary,
            params,
            strategy_state: self.strategy.save_state(),
            pipeline: self.statistics.as_ref().map(|s| s.pipeline.clone()),
        });
        self.phase = Phase::Committing {
            round,
            failure: None,
        };
    }

    /// The round whose commit the machine waits for, if any.
    pub fn awaiting_commit(&self) -> Option<u64> {
        match self.phase {
            Phase::Committing { round, .. } => Some(round),
            _ => None,
        }
    }

    /// Why the last commit of the waiting round failed, if it did.
    pub fn commit_failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Committing { failure, .. } => failure.as_deref(),
            _ => None,
        }
    }

    /// Committing round `round` failed: the job holds the round and starts nothing until a
    /// later commit of it succeeds. Ignored unless the machine waits for that round.
    pub fn commit_failed(&mut self, round: u64, reason: String) {
        if let Phase::Committing {
            round: waiting,
            failure,
        } = &mut self.phase
            && *waiting == round
        {
            if failure.as_deref() != Some(reason.as_str()) {
                self.events.push_back(Event::CommitFailed {
                    round,
                    reason: reason.clone(),
                });
            }
            *failure = Some(reason);
        }
    }

    /// Round `round` is durably committed: the next round may start (or the job finishes).
    /// Ignored unless the machine waits for that round.
    pub fn committed(&mut self, round: u64, now: Instant) {
        let Phase::Committing {
            round: waiting,
            failure,
        } = &self.phase
        else {
            return;
        };
        if *waiting != round {
            return;
        }
        if failure.is_some() {
            self.events.push_back(Event::CommitRecovered { round });
        }
        if round >= self.config.rounds && round > 0 {
            self.phase = Phase::Finished;
            self.events.push_back(Event::JobFinished { rounds: round });
        } else {
            self.phase = Phase::Waiting {
                round: round + 1,
                attempt: 1,
            };
            self.advance(now);
        }
    }
}
