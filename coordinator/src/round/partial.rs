//! Partial sums from hierarchical aggregators: many participants' updates folded elsewhere
//! and sent as one ([`PartialSum`]). Every contribution is checked as its own update would
//! be (known, selected, not yet received; in secure rounds its pieces and its signature over
//! the round, its weight, its bodies' digest and its pieces), all before anything is folded:
//! a partial sum is taken whole or refused whole.
//!
//! What cannot be checked here is that the sum is the sum of the bodies the records sign;
//! that is the aggregator's part, so partial sums come only from aggregators the driver
//! trusts with it (a simulation's own worker processes over mutual TLS), never from
//! participants.

use std::collections::BTreeSet;
use std::time::Instant;

use cohort_crypto::Accumulator;
use cohort_crypto::aggregation::{SealedPiece, UploadRecord, check_pieces};

use super::{Contribution, Orchestrator, PartialSum, PartialValues, Phase, Rejection};

impl Orchestrator {
    /// Folds a partial sum into the round's running sum and accepts each of its
    /// participants, in order (the round closes when the last selected one is in).
    pub fn handle_partial_sum(
        &mut self,
        partial: PartialSum,
        now: Instant,
    ) -> Result<(), Rejection> {
        let PartialSum {
            round,
            mut contributions,
            values,
        } = partial;
        if contributions.is_empty() {
            return Err(Rejection::Invalid(
                "a partial sum of no participants".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for c in &contributions {
            if !seen.insert(c.id.as_str()) {
                return Err(Rejection::Duplicate(c.id.clone(), round));
            }
            if c.weight == 0 {
                return Err(Rejection::Invalid(format!("{}: weight 0", c.id)));
            }
            self.check_statistics_update(&c.id, round, c.weight, None)?;
            if c.weight != 1 && self.config.uniform_weights(round) {
                return Err(Rejection::Invalid(format!(
                    "{}: every update weighs 1 in a job with differential privacy, not {}",
                    c.id, c.weight
                )));
            }
        }
        if let Some(rule) = self.strategy.robust_rule() {
            return Err(Rejection::Invalid(format!(
                "strategy {} combines individual updates, which a partial sum has already \
                 added up: simulation workers cannot run it",
                rule.name()
            )));
        }
        let weight: u64 = contributions.iter().map(|c| c.weight).sum();
        match values {
            PartialValues::Plain(sum) => {
                for c in &contributions {
                    self.check_update(&c.id, round, sum.len())?;
                }
                if let Some(i) = sum.iter().position(|v| !v.is_finite()) {
                    return Err(Rejection::Invalid(format!(
                        "partial sum: parameter {i} is not finite"
                    )));
                }
                let Phase::Training(t) = &mut self.phase else {
                    unreachable!("check_update ensured training");
                };
                for (a, s) in t.acc.iter_mut().zip(&sum) {
                    *a += s;
                }
                t.weight += weight;
            }
            PartialValues::Secure(sum) => {
                let records = self.check_secure_contributions(round, &contributions, sum.len())?;
                let Phase::Training(t) = &mut self.phase else {
                    unreachable!("checked: training");
                };
                let sec = t.secure.as_mut().expect("checked: secure round");
                let max = sec.info.codec.max_total_weight;
                if sec.acc.total_weight() + weight > max {
                    return Err(Rejection::Invalid(format!(
                        "the partial sum's weight {weight} would take the round's total to {}, \
                         over the maximum {max}",
                        sec.acc.total_weight() + weight
                    )));
                }
                sec.acc
                    .add_partial(&Accumulator::from_parts(sum, weight, contributions.len()))
                    .map_err(|e| Rejection::Invalid(e.to_string()))?;
                for (c, record) in contributions.iter_mut().zip(records) {
                    sec.records.insert(c.id.clone(), record);
                    // Checked above: every secure contribution carries its record.
                    let pieces = c.secure.take().map(|r| r.pieces).unwrap_or_default();
                    sec.pieces
                        .extend(pieces.into_iter().map(|p| (c.id.clone(), p)));
                }
            }
        }
        for c in contributions {
            self.accepted(&c.id, round, c.train, now);
        }
        Ok(())
    }

    /// Each contribution's record, checked as [`Self::handle_secure_update`] checks one
    /// upload's, with the key that verified it.
    fn check_secure_contributions(
        &self,
        round: u64,
        contributions: &[Contribution],
        num_bodies: usize,
    ) -> Result<Vec<(UploadRecord, super::PartyKeys)>, Rejection> {
        let mut out = Vec::with_capacity(contributions.len());
        for c in contributions {
            self.check_secure_update(&c.id, round, num_bodies)?;
            let Some(record) = &c.secure else {
                return Err(Rejection::Invalid(format!(
                    "{}: a secure round's contribution without its signed record",
                    c.id
                )));
            };
            let Phase::Training(t) = &self.phase else {
                unreachable!("check_secure_update ensured training");
            };
            let sec = t.secure.as_ref().expect("checked: secure round");
            check_pieces(&sec.info, &sec.committee, &record.pieces)
                .map_err(|e| Rejection::Invalid(format!("{}: {e}", c.id)))?;
            let keys = self.participants[&c.id]
                .keys
                .clone()
                .expect("secure jobs admit only participants with keys");
            let upload = UploadRecord {
                participant: c.id.clone(),
                weight: c.weight,
                bodies_sha256: record.bodies_sha256,
                piece_hashes: record.pieces.iter().map(SealedPiece::hash).collect(),
                signature: record.signature,
            };
            upload
                .verify(&sec.info, &keys.verify)
                .map_err(|e| Rejection::Invalid(format!("{}: upload signature: {e}", c.id)))?;
            out.push((upload, keys));
        }
        Ok(out)
    }
}
