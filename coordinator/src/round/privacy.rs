//! Differential privacy and adaptive clipping in the round state machine: central noise on
//! the aggregate, each round's cost accounted, the job stopped before a round would exceed
//! its budget, and the clip norm moved from the summed indicators.
//!
//! Distributed noise needs nothing here beyond equal weights: participants add it
//! ([`JobConfig::participant_noise`] travels in every training task) and the decrypted mean
//! already carries it.

use rand::rngs::ChaCha20Rng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::*;
use crate::privacy::{Accountant, Mechanism};
use cohort_storage::RoundPrivacy;

/// A job's privacy state: its accountant, the secret that keys the central noise, and the
/// sampling rate of the round under way.
pub(super) struct Ledger {
    accountant: Accountant,
    noise_key: [u8; 32],
    sampling_rate: f64,
}

impl Ledger {
    pub(super) fn new(entropy: &mut ChaCha20Rng) -> Self {
        let mut noise_key = [0u8; 32];
        entropy.fill_bytes(&mut noise_key);
        Ledger {
            accountant: Accountant::default(),
            noise_key,
            sampling_rate: 1.0,
        }
    }

    /// A resumed job's spending so far, from its completed rounds.
    pub(super) fn replay(&mut self, history: &[RoundSummary]) {
        for p in history.iter().filter_map(|s| s.privacy) {
            self.accountant
                .compose_gaussian(p.sampling_rate, p.noise_multiplier, 1);
        }
    }
}

impl Orchestrator {
    /// The job's (ε, δ) so far, when it has differential privacy.
    pub fn epsilon(&self) -> Option<(f64, f64)> {
        let delta = self.config.privacy?.delta;
        Some((self.privacy.as_ref()?.accountant.epsilon(delta).0, delta))
    }

    /// Whether round `round`, at sampling rate `q`, would take the job past its target ε;
    /// if so the job finishes here. Remembers `q` for the round's accounting.
    pub(super) fn budget_spent(&mut self, round: u64, q: f64) -> bool {
        let z = self
            .clip
            .and_then(|c| self.config.accounted_noise_multiplier(c));
        let (Some(p), Some(z)) = (self.config.privacy, z) else {
            return false;
        };
        let Some(ledger) = self.privacy.as_mut() else {
            return false;
        };
        ledger.sampling_rate = q;
        let Some(target) = p.target_epsilon else {
            return false;
        };
        let mut next = ledger.accountant.clone();
        next.compose_gaussian(q, z, 1);
        let epsilon = next.epsilon(p.delta).0;
        if epsilon <= target {
            return false;
        }
        let spent = ledger.accountant.epsilon(p.delta).0;
        self.phase = Phase::Finished;
        self.events.push_back(Event::PrivacyBudgetSpent {
            round,
            epsilon: spent,
            next: epsilon,
            target,
        });
        self.events
            .push_back(Event::JobFinished { rounds: round - 1 });
        true
    }

    /// The mean update as the strategy may see it: with central noise, plus Gaussian noise of
    /// standard deviation `z · S / n` (the sum's noise `z · S`, S its sensitivity at the
    /// round's clip norm, over the n participants averaged). Records the round's privacy
    /// cost in `summary`.
    pub(super) fn privatise(&mut self, summary: &mut RoundSummary, mean: &[f32]) -> Vec<f32> {
        let z = self
            .clip
            .and_then(|c| self.config.accounted_noise_multiplier(c));
        let (Some(p), Some(z)) = (self.config.privacy, z) else {
            return mean.to_vec();
        };
        let ledger = self
            .privacy
            .as_mut()
            .expect("jobs with privacy keep a ledger");
        let mut out = mean.to_vec();
        if p.mechanism == Mechanism::Central {
            let clip = self.clip.expect("validated: privacy needs clip_norm");
            let n = summary.participants.len().max(1) as f64;
            let sd = p.noise_multiplier * self.config.sensitivity(clip) / n;
            // Keyed by the job's secret and the round: the same round gives the same noise.
            let mut seed = ledger.noise_key;
            for (b, r) in seed.iter_mut().zip(summary.round.to_le_bytes()) {
                *b ^= r;
            }
            let mut rng = ChaCha20Rng::from_seed(seed);
            let normal = Normal::new(0.0, sd).expect("a positive, finite deviation");
            for x in &mut out {
                *x = (*x as f64 + normal.sample(&mut rng)) as f32;
            }
        }
        ledger
            .accountant
            .compose_gaussian(ledger.sampling_rate, z, 1);
        summary.privacy = Some(RoundPrivacy {
            sampling_rate: ledger.sampling_rate,
            noise_multiplier: z,
            epsilon: ledger.accountant.epsilon(p.delta).0,
            delta: p.delta,
        });
        out
    }

    /// Adaptive clipping: takes the indicators' mean off the end of `mean` (what the strategy
    /// must not see), records the round's clipping and moves the clip norm for the next round
    /// (never past the codec's per-value bound under distributed DP).
    pub(super) fn adapt_clip(&mut self, summary: &mut RoundSummary, mean: &mut Vec<f32>) {
        let (Some(a), Some(clip)) = (self.config.adaptive_clipping, self.clip) else {
            return;
        };
        let scale = self.config.indicator_scale(clip).unwrap_or(1.0);
        let unclipped = mean.pop().map_or(0.0, |b| b as f64 / scale);
        let mut next = a.next(clip, unclipped);
        if let Some(max) = self.config.max_clip_norm() {
            next = next.min(max);
        }
        self.clip = Some(next);
        summary.clipping = Some(cohort_storage::RoundClipping {
            clip_norm: clip,
            unclipped_share: unclipped,
            next_clip_norm: next,
        });
    }
}

#[cfg(test)]
mod tests;
