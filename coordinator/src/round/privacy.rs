//! Differential privacy in the round state machine: central noise on the aggregate, each
//! round's cost accounted, and the job stopped before a round would exceed its budget.
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
        let (Some(p), Some(z)) = (
            self.config.privacy,
            self.config.accounted_noise_multiplier(),
        ) else {
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
    /// standard deviation `z · C / n` (the sum's noise `z · C`, over the n participants
    /// averaged). Records the round's privacy cost in `summary`.
    pub(super) fn privatise(&mut self, summary: &mut RoundSummary, mean: &[f32]) -> Vec<f32> {
        let (Some(p), Some(z)) = (
            self.config.privacy,
            self.config.accounted_noise_multiplier(),
        ) else {
            return mean.to_vec();
        };
        let ledger = self
            .privacy
            .as_mut()
            .expect("jobs with privacy keep a ledger");
        let mut out = mean.to_vec();
        if p.mechanism == Mechanism::Central {
            let clip = self
                .config
                .clip_norm
                .expect("validated: privacy needs clip_norm");
            let n = summary.participants.len().max(1) as f64;
            let sd = p.noise_multiplier * clip / n;
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
}

#[cfg(test)]
mod tests;
