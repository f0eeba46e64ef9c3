//! The secure-aggregation half of the round state machine (protocol: docs/secure-aggregation.md).
//!
//! Training collects ciphertext bodies into a wrapping u64 [`Accumulator`] (O(model)
//! memory) and keeps each upload's signed record and sealed key pieces (O(committee · N) per
//! participant, whatever the model size). When training closes, the coordinator signs the
//! manifest and asks the committee: each piece of the key sharing is assigned to exactly one
//! member that holds it. Members that do not answer by the deadline, or refuse, have their
//! pieces reassigned to the others; once no responder holds some piece (fewer than t
//! answered), the attempt fails with nothing decrypted and the round is retried with a new
//! seed, new keys and a new committee.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use cohort_crypto::aggregation::{
    MemberInfo, RoundInfo, SealedPiece, UploadRecord, check_pieces, verify_share,
};
use cohort_crypto::policy::Manifest;
use cohort_crypto::{Accumulator, Committee, Kind, RoundSeed, decode, decode_sums};
use cohort_model::Metrics;
use rand::RngExt;

use super::{
    DecryptRequest, Event, FailureCause, Orchestrator, ParticipantId, PartyKeys, Phase, Rejection,
    RoundSummary, SecureUpdate, ShareAnswer, Task, Training,
};

/// What training gathers in a secure round.
#[derive(Debug)]
pub(super) struct SecureTraining {
    pub(super) info: Arc<RoundInfo>,
    pub(super) committee: Committee,
    pub(super) acc: Accumulator,
    /// Each accepted upload's signed record and the key that verified it.
    pub(super) records: BTreeMap<ParticipantId, (UploadRecord, PartyKeys)>,
    /// Every sealed piece, with its sender.
    pub(super) pieces: Vec<(ParticipantId, SealedPiece)>,
}

/// The committee decrypting a round's sum.
#[derive(Debug)]
pub(super) struct Decrypting {
    pub(super) round: u64,
    attempt: u32,
    started: Instant,
    pub(super) deadline: Instant,
    participants: Vec<ParticipantId>,
    stragglers: Vec<ParticipantId>,
    train_metrics: Vec<Metrics>,
    info: Arc<RoundInfo>,
    committee: Committee,
    manifest: Manifest,
    manifest_digest: [u8; 32],
    manifest_signature: [u8; 64],
    records: BTreeMap<ParticipantId, (UploadRecord, PartyKeys)>,
    pieces: Vec<(ParticipantId, SealedPiece)>,
    acc: Accumulator,
    /// Outstanding requests: member index → (request number, pieces).
    outstanding: BTreeMap<usize, (u32, Vec<usize>)>,
    /// Last request number per member.
    requests: BTreeMap<usize, u32>,
    covered: BTreeSet<usize>,
    failed: BTreeSet<usize>,
    answered: BTreeSet<usize>,
}

impl Orchestrator {
    /// The secure state of a new round over `selected` (in selection order: the committee is
    /// its first n_D).
    pub(super) fn secure_training(
        &mut self,
        round: u64,
        attempt: u32,
        selected: &[ParticipantId],
    ) -> Box<SecureTraining> {
        let sec = self
            .config
            .secure
            .clone()
            .expect("secure_training is called for secure jobs");
        let members: Vec<ParticipantId> = if sec.custodians.is_empty() {
            selected[..sec.committee_for(selected.len())].to_vec()
        } else {
            // The custodians online now (advance() checked there are enough of them).
            sec.custodians
                .iter()
                .filter(|c| self.online_with_keys(c))
                .cloned()
                .collect()
        };
        let threshold = sec.threshold_for(members.len());
        let committee: Vec<MemberInfo> = members
            .iter()
            .map(|id| {
                let keys = self.participants[id]
                    .keys
                    .clone()
                    .expect("secure jobs admit only participants with keys");
                MemberInfo {
                    id: id.clone(),
                    seal_key: keys.seal,
                    verify_key: keys.verify,
                    binding: keys.binding.clone(),
                }
            })
            .collect();
        // Examples per unit of weight, so that the declared weights add up to at most W.
        let examples: u64 = selected
            .iter()
            .map(|id| self.participants[id].num_examples.max(1))
            .sum();
        let info = RoundInfo {
            job: self.config.job_id.clone(),
            round,
            attempt,
            seed: RoundSeed(self.entropy.random()),
            committee,
            threshold,
            t_min: sec.t_min,
            codec: sec.codec,
            params: sec.params,
            // Round 0 (statistics) and jobs with differential privacy: every weight is 1.
            weight_unit: if self.config.uniform_weights(round) {
                u64::MAX
            } else {
                cohort_crypto::aggregation::weight_unit(
                    examples,
                    selected.len(),
                    sec.codec.max_total_weight,
                )
            },
        };
        let committee = info
            .validate()
            .expect("settings were validated with the job");
        let len = info.params.ciphertexts(self.update_len(round)) * info.params.polynomial_size;
        Box::new(SecureTraining {
            info: Arc::new(info),
            committee,
            acc: Accumulator::new(len),
            records: BTreeMap::new(),
            pieces: Vec::new(),
        })
    }

    /// Ciphertext bodies a secure update of the current round must carry.
    pub fn bodies_len(&self) -> Option<usize> {
        let len = self.update_len(self.current_round());
        self.config
            .secure
            .as_ref()
            .map(|s| s.params.ciphertexts(len) * s.params.polynomial_size)
    }

    /// Values the current round's updates carry (the model's parameters, or in round 0 the
    /// statistics' digits): what a committee member's share decodes.
    pub fn current_update_len(&self) -> usize {
        self.update_len(self.current_round())
    }

    /// Checks that `id` may send a secure update of `num_bodies` bodies for `round` now,
    /// before the driver receives its data. [`Self::handle_secure_update`] checks again.
    pub fn check_secure_update(
        &self,
        id: &str,
        round: u64,
        num_bodies: usize,
    ) -> Result<(), Rejection> {
        let t = self.check_open(id, round)?;
        if t.secure.is_none() {
            return Err(Rejection::Invalid(
                "this job runs plaintext rounds: send parameters, not ciphertexts".into(),
            ));
        }
        let expected = self.bodies_len().unwrap_or(0);
        if num_bodies != expected {
            return Err(Rejection::ParameterCount {
                expected,
                got: num_bodies,
            });
        }
        Ok(())
    }

    /// A complete secure update: its signature (over the round, its declared weight, the
    /// bodies and every sealed piece) is checked and its bodies are added to the sum.
    pub fn handle_secure_update(
        &mut self,
        id: &str,
        update: SecureUpdate,
        now: Instant,
    ) -> Result<(), Rejection> {
        // `bodies_sha256` is the digest the driver computed while receiving the bodies (the
        // upload stream's own), so it is not recomputed here under the lock.
        self.check_secure_update(id, update.round, update.bodies.len())?;
        self.check_statistics_update(id, update.round, update.weight, None)?;
        let keys = self.participants[id]
            .keys
            .clone()
            .expect("secure jobs admit only participants with keys");
        let Phase::Training(t) = &mut self.phase else {
            unreachable!("check_secure_update ensured training");
        };
        let sec = t.secure.as_mut().expect("checked: secure round");
        check_pieces(&sec.info, &sec.committee, &update.pieces)
            .map_err(|e| Rejection::Invalid(e.to_string()))?;
        let record = UploadRecord {
            participant: id.to_string(),
            weight: update.weight,
            bodies_sha256: update.bodies_sha256,
            piece_hashes: update.pieces.iter().map(SealedPiece::hash).collect(),
            signature: update.signature,
        };
        record
            .verify(&sec.info, &keys.verify)
            .map_err(|e| Rejection::Invalid(format!("upload signature: {e}")))?;
        let max = sec.info.codec.max_total_weight;
        if update.weight == 0 || sec.acc.total_weight() + update.weight > max {
            return Err(Rejection::Invalid(format!(
                "declared weight {} would take the round's total to {}, over the maximum {max}",
                update.weight,
                sec.acc.total_weight() + update.weight
            )));
        }
        sec.acc
            .add(update.weight, &update.bodies)
            .map_err(|e| Rejection::Invalid(e.to_string()))?;
        sec.records.insert(id.to_string(), (record, keys));
        sec.pieces
            .extend(update.pieces.into_iter().map(|p| (id.to_string(), p)));
        self.accepted(id, update.round, update.train, now);
        Ok(())
    }

    /// Training closed with enough updates: sign the manifest and ask the committee.
    pub(super) fn start_decryption(
        &mut self,
        t: Training,
        stragglers: Vec<ParticipantId>,
        now: Instant,
    ) {
        let sec = *t.secure.expect("secure round");
        let manifest = sec.info.manifest(
            sec.records
                .values()
                .map(|(r, _)| (r.participant.clone(), r.weight))
                .collect(),
        );
        let manifest_digest = manifest.digest();
        let manifest_signature = self.signer.sign(Kind::Manifest, &manifest_digest);
        self.events.push_back(Event::DecryptionStarted {
            round: t.round,
            attempt: t.attempt,
            participants: sec.records.len(),
            committee: sec.info.committee.iter().map(|m| m.id.clone()).collect(),
        });
        let mut d = Decrypting {
            round: t.round,
            attempt: t.attempt,
            started: t.started,
            deadline: now,
            participants: t.received.iter().cloned().collect(),
            stragglers,
            train_metrics: t.train_metrics,
            info: sec.info,
            committee: sec.committee,
            manifest,
            manifest_digest,
            manifest_signature,
            records: sec.records,
            pieces: sec.pieces,
            acc: sec.acc,
            outstanding: BTreeMap::new(),
            requests: BTreeMap::new(),
            covered: BTreeSet::new(),
            failed: BTreeSet::new(),
            answered: BTreeSet::new(),
        };
        // Members that are gone already get nothing.
        for (m, member) in d.info.committee.iter().enumerate() {
            if !self.is_online(&member.id) {
                d.failed.insert(m);
            }
        }
        self.phase = Phase::Decrypting(Box::new(d));
        self.reassign(now);
    }

    fn is_online(&self, id: &str) -> bool {
        self.participants
            .get(id)
            .is_some_and(|p| p.presence == super::Presence::Online)
    }

    /// Assigns every uncovered, unassigned piece to a member that has not failed; fails the
    /// attempt when some piece has no such holder.
    fn reassign(&mut self, now: Instant) {
        let decrypt_timeout = self
            .config
            .secure
            .as_ref()
            .map(|s| s.decrypt_timeout)
            .unwrap_or_default();
        let Phase::Decrypting(d) = &mut self.phase else {
            return;
        };
        let pending: BTreeSet<usize> = d
            .outstanding
            .values()
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        let todo: Vec<usize> = (0..d.committee.pieces())
            .filter(|k| !d.covered.contains(k) && !pending.contains(k))
            .collect();
        if todo.is_empty() {
            return;
        }
        let responders: Vec<usize> = (0..d.committee.size())
            .filter(|m| !d.failed.contains(m))
            .collect();
        match d.committee.assign_pieces(&todo, &responders) {
            Ok(assignment) => {
                let mut by_member: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for (k, m) in assignment {
                    by_member.entry(m).or_default().push(k);
                }
                for (m, pieces) in by_member {
                    let r = d.requests.entry(m).or_insert(0);
                    *r += 1;
                    let entry = d.outstanding.entry(m).or_insert((*r, Vec::new()));
                    entry.0 = *r;
                    entry.1.extend(pieces);
                }
                d.deadline = now + decrypt_timeout;
            }
            Err(_) => {
                let (round, attempt) = (d.round, d.attempt);
                let cause = FailureCause::CommitteeUnavailable {
                    answered: d.answered.len(),
                    needed: d.committee.threshold(),
                };
                self.fail_attempt(round, attempt, cause, now);
            }
        }
    }

    pub(super) fn decrypt_task_for(&self, d: &Decrypting, id: &str) -> Task {
        let Some(m) = d.info.member_index(id) else {
            return Task::Idle;
        };
        match d.outstanding.get(&m) {
            Some((request, pieces)) => Task::Decrypt(DecryptRequest {
                info: d.info.clone(),
                manifest_digest: d.manifest_digest,
                manifest_participants: d.manifest.entries.len(),
                manifest_signature: d.manifest_signature,
                coordinator_key: self.signer.verify_key(),
                pieces: pieces.clone(),
                request: *request,
                deadline: d.deadline,
            }),
            None => Task::Idle,
        }
    }

    /// What member `id` needs to answer: the manifest's signed upload records (with the
    /// keys that verified them) and the pieces sealed to it.
    #[allow(clippy::type_complexity)]
    pub fn decryption_input(
        &self,
        id: &str,
        round: u64,
        attempt: u32,
    ) -> Result<
        (
            Vec<(UploadRecord, PartyKeys)>,
            Vec<(ParticipantId, SealedPiece)>,
        ),
        Rejection,
    > {
        let d = self.decrypting(id, round, attempt)?;
        Ok((
            d.records.values().cloned().collect(),
            d.pieces
                .iter()
                .filter(|(_, p)| p.recipient == id)
                .cloned()
                .collect(),
        ))
    }

    fn decrypting(&self, id: &str, round: u64, attempt: u32) -> Result<&Decrypting, Rejection> {
        if !self.participants.contains_key(id) {
            return Err(Rejection::UnknownParticipant(id.to_string()));
        }
        match &self.phase {
            Phase::Decrypting(d) if d.round == round && d.attempt == attempt => {
                if d.info.member_index(id).is_none() {
                    return Err(Rejection::NotSelected(id.to_string(), round));
                }
                Ok(d)
            }
            _ => Err(Rejection::RoundClosed {
                round,
                current: self.current_round(),
                phase: self.phase.name(),
            }),
        }
    }

    /// A committee member's answer: a share (checked against the member's signature and
    /// added to the sum) or a refusal (its pieces go to others at once).
    pub fn handle_share(
        &mut self,
        id: &str,
        answer: ShareAnswer,
        now: Instant,
    ) -> Result<(), Rejection> {
        let len = self.bodies_len().unwrap_or(0);
        let d = self.decrypting(id, answer.round, answer.attempt)?;
        let m = d.info.member_index(id).expect("checked by decrypting");
        let Some((request, pieces)) = d.outstanding.get(&m) else {
            return Err(Rejection::Duplicate(id.to_string(), answer.round));
        };
        if *request != answer.request || *pieces != answer.pieces {
            return Err(Rejection::Invalid(format!(
                "answer to request {} for pieces {:?}; the open request is {request} for {pieces:?}",
                answer.request, answer.pieces
            )));
        }
        if let Some(p) = self.participants.get_mut(id) {
            p.last_seen = now;
        }
        let Phase::Decrypting(d) = &mut self.phase else {
            unreachable!("checked by decrypting");
        };
        match answer.share {
            Ok(share) => {
                if share.values.len() != len {
                    return Err(Rejection::ParameterCount {
                        expected: len,
                        got: share.values.len(),
                    });
                }
                verify_share(
                    &d.manifest,
                    id,
                    &d.info.committee[m].verify_key,
                    &share.sha256,
                    &share.signature,
                )
                .map_err(|e| Rejection::Invalid(e.to_string()))?;
                d.acc
                    .add_share(&share.values)
                    .map_err(|e| Rejection::Invalid(e.to_string()))?;
                let (_, pieces) = d.outstanding.remove(&m).expect("checked above");
                d.covered.extend(pieces);
                d.answered.insert(m);
                if d.covered.len() == d.committee.pieces() {
                    self.finish_decryption(now);
                }
            }
            Err(reason) => {
                d.outstanding.remove(&m);
                d.failed.insert(m);
                self.events.push_back(Event::MemberFailed {
                    round: answer.round,
                    id: id.to_string(),
                    reason: format!("refused: {reason}"),
                });
                self.reassign(now);
            }
        }
        Ok(())
    }

    /// The decryption deadline passed: members with open requests have failed.
    pub(super) fn decrypt_deadline(&mut self, now: Instant) {
        let Phase::Decrypting(d) = &mut self.phase else {
            return;
        };
        let late: Vec<usize> = d.outstanding.keys().copied().collect();
        for m in late {
            d.outstanding.remove(&m);
            d.failed.insert(m);
            self.events.push_back(Event::MemberFailed {
                round: d.round,
                id: d.info.committee[m].id.clone(),
                reason: "no answer before the deadline".into(),
            });
        }
        self.reassign(now);
    }

    fn finish_decryption(&mut self, now: Instant) {
        let Phase::Decrypting(d) = std::mem::replace(&mut self.phase, Phase::Finished) else {
            return;
        };
        if d.round == 0 {
            let len = self.update_len(0);
            match decode_sums(&d.acc, &[], len, &d.info.codec) {
                Ok(sums) => {
                    let closed = super::statistics::Closed {
                        attempt: d.attempt,
                        participants: d.participants,
                        stragglers: d.stragglers,
                        started: d.started,
                    };
                    self.finish_statistics(closed, &sums, now);
                }
                Err(e) => {
                    let cause = FailureCause::Undecodable {
                        reason: e.to_string(),
                    };
                    self.fail_attempt(d.round, d.attempt, cause, now);
                }
            }
            return;
        }
        let mean = match decode(&d.acc, &[], self.update_len(d.round), &d.info.codec) {
            Ok(m) => m,
            Err(e) => {
                let cause = FailureCause::Undecodable {
                    reason: e.to_string(),
                };
                self.fail_attempt(d.round, d.attempt, cause, now);
                return;
            }
        };
        let summary = RoundSummary {
            round: d.round,
            attempts: d.attempt,
            participants: d.participants,
            stragglers: d.stragglers,
            total_examples: d.acc.total_weight() * d.info.weight_unit,
            train: Metrics::weighted_mean(&d.train_metrics),
            eval: None,
            evaluated_by: 0,
            seconds: 0.0,
            privacy: None,
            clipping: None,
        };
        self.apply_mean(summary, &mean, d.started, now);
    }
}

#[cfg(test)]
mod tests;
