//! The rules that make the threshold scheme safe against a dishonest coordinator, as pure
//! state: a committee member answers at most one manifest per round seed, only for at least
//! T_min participants, only with the weights the participants themselves declared; a
//! participant never encrypts twice under one seed.
//!
//! This state lives exactly as long as the keys it protects. cohort's participants keep their
//! sealing key, signing key, `MemberPolicy` and `SeedLog` in memory only: a member that
//! restarts has forgotten which manifests it answered, but it has also lost the key that opens
//! the pieces sealed to it, so a second manifest for an old seed cannot be decrypted with its
//! help. A deployment that persists member keys must persist this state with them, durably,
//! before an answer leaves the member.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::params::RoundSeed;

/// What the coordinator asks the committee to decrypt: the participants whose ciphertexts
/// are in the sum, with their weights, for one round seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub job: String,
    pub round: u64,
    pub attempt: u32,
    pub seed: RoundSeed,
    /// (participant, weight), in any order; no participant twice.
    pub entries: Vec<(String, u64)>,
}

impl Manifest {
    /// SHA-256 of a canonical encoding (entries sorted by participant).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"cohort.v1/manifest");
        let field = |h: &mut Sha256, b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(&mut h, self.job.as_bytes());
        h.update(self.round.to_le_bytes());
        h.update(self.attempt.to_le_bytes());
        h.update(self.seed.0.to_le_bytes());
        let mut entries = self.entries.clone();
        entries.sort();
        h.update((entries.len() as u64).to_le_bytes());
        for (p, w) in &entries {
            field(&mut h, p.as_bytes());
            h.update(w.to_le_bytes());
        }
        h.finalize().into()
    }

    /// Σ w_i.
    pub fn total_weight(&self) -> u64 {
        self.entries.iter().map(|e| e.1).sum()
    }
}

/// Why a committee member refuses to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("manifest lists {got} participants, fewer than T_min = {t_min}")]
    TooFewParticipants { got: usize, t_min: usize },
    #[error("manifest is for seed {got:032x}, but this round's seed is {expected:032x}")]
    WrongSeed { expected: u128, got: u128 },
    #[error("participant {0:?} appears twice in the manifest")]
    DuplicateParticipant(String),
    #[error(
        "participant {participant:?} declared weight {declared:?}, the manifest says {claimed}"
    )]
    WeightMismatch {
        participant: String,
        declared: Option<u64>,
        claimed: u64,
    },
    #[error("total weight {total} exceeds the configured maximum {max}")]
    WeightTooLarge { total: u64, max: u64 },
    #[error("already answered a different manifest for seed {0:032x}: one decryption per seed")]
    DifferentManifest(u128),
}

/// One committee member's memory of what it has answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberPolicy {
    answered: BTreeMap<RoundSeed, [u8; 32]>,
}

impl MemberPolicy {
    /// Decides whether to answer `manifest`. `declared` holds the weight each participant
    /// itself declared (and signed) with its upload for this seed. On success the manifest
    /// is recorded as this seed's one answer; asking again with the same manifest is allowed
    /// (a retransmission), with a different one is refused.
    pub fn admit(
        &mut self,
        manifest: &Manifest,
        round_seed: RoundSeed,
        declared: &BTreeMap<String, u64>,
        t_min: usize,
        max_total_weight: u64,
    ) -> Result<(), Refusal> {
        if manifest.seed != round_seed {
            return Err(Refusal::WrongSeed {
                expected: round_seed.0,
                got: manifest.seed.0,
            });
        }
        let mut seen = BTreeSet::new();
        for (p, w) in &manifest.entries {
            if !seen.insert(p) {
                return Err(Refusal::DuplicateParticipant(p.clone()));
            }
            if declared.get(p) != Some(w) {
                return Err(Refusal::WeightMismatch {
                    participant: p.clone(),
                    declared: declared.get(p).copied(),
                    claimed: *w,
                });
            }
        }
        if manifest.entries.len() < t_min {
            return Err(Refusal::TooFewParticipants {
                got: manifest.entries.len(),
                t_min,
            });
        }
        let total = manifest.total_weight();
        if total > max_total_weight {
            return Err(Refusal::WeightTooLarge {
                total,
                max: max_total_weight,
            });
        }
        let digest = manifest.digest();
        match self.answered.get(&manifest.seed) {
            Some(d) if *d != digest => Err(Refusal::DifferentManifest(manifest.seed.0)),
            _ => {
                self.answered.insert(manifest.seed, digest);
                Ok(())
            }
        }
    }
}

/// A participant's record of the seeds it has encrypted under: reusing a seed with another
/// key would still be safe, but with the same key it leaks Δ·(m − m′), and keys are
/// single-use only if seeds are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedLog {
    used: BTreeSet<RoundSeed>,
}

impl SeedLog {
    /// Records `seed`; refuses one seen before.
    pub fn use_seed(&mut self, seed: RoundSeed) -> Result<(), crate::CryptoError> {
        if self.used.insert(seed) {
            Ok(())
        } else {
            Err(crate::CryptoError::Committee(format!(
                "round seed {:032x} was already used: refusing to encrypt under it again",
                seed.0
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(entries: &[(&str, u64)]) -> Manifest {
        Manifest {
            job: "j".into(),
            round: 1,
            attempt: 1,
            seed: RoundSeed(7),
            entries: entries.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
        }
    }

    fn declared() -> BTreeMap<String, u64> {
        [("a", 10), ("b", 20), ("c", 30)]
            .iter()
            .map(|(p, w)| (p.to_string(), *w))
            .collect()
    }

    #[test]
    fn admits_a_good_manifest_and_its_retransmission() {
        let mut m = MemberPolicy::default();
        let good = manifest(&[("a", 10), ("b", 20), ("c", 30)]);
        m.admit(&good, RoundSeed(7), &declared(), 3, 1024).unwrap();
        let reordered = manifest(&[("c", 30), ("a", 10), ("b", 20)]);
        assert_eq!(good.digest(), reordered.digest());
        m.admit(&reordered, RoundSeed(7), &declared(), 3, 1024)
            .unwrap();
    }

    #[test]
    fn refuses_a_second_different_manifest_for_the_same_seed() {
        let mut m = MemberPolicy::default();
        m.admit(
            &manifest(&[("a", 10), ("b", 20)]),
            RoundSeed(7),
            &declared(),
            2,
            1024,
        )
        .unwrap();
        let e = m
            .admit(
                &manifest(&[("a", 10), ("c", 30)]),
                RoundSeed(7),
                &declared(),
                2,
                1024,
            )
            .unwrap_err();
        assert_eq!(e, Refusal::DifferentManifest(7));
    }

    #[test]
    fn refuses_too_few_wrong_seed_and_chosen_weights() {
        let mut m = MemberPolicy::default();
        let d = declared();
        assert_eq!(
            m.admit(&manifest(&[("a", 10)]), RoundSeed(7), &d, 2, 1024),
            Err(Refusal::TooFewParticipants { got: 1, t_min: 2 })
        );
        assert!(matches!(
            m.admit(
                &manifest(&[("a", 10), ("b", 20)]),
                RoundSeed(8),
                &d,
                2,
                1024
            ),
            Err(Refusal::WrongSeed { .. })
        ));
        // A coordinator that picks weights (here: one participant blown up to read its update
        // from the high bits of the sum) is refused.
        assert!(matches!(
            m.admit(
                &manifest(&[("a", 1 << 20), ("b", 20)]),
                RoundSeed(7),
                &d,
                2,
                u64::MAX
            ),
            Err(Refusal::WeightMismatch { .. })
        ));
        assert!(matches!(
            m.admit(
                &manifest(&[("a", 10), ("zed", 1)]),
                RoundSeed(7),
                &d,
                2,
                1024
            ),
            Err(Refusal::WeightMismatch { declared: None, .. })
        ));
        assert_eq!(
            m.admit(
                &manifest(&[("a", 10), ("a", 10)]),
                RoundSeed(7),
                &d,
                2,
                1024
            ),
            Err(Refusal::DuplicateParticipant("a".into()))
        );
        assert_eq!(
            m.admit(&manifest(&[("a", 10), ("b", 20)]), RoundSeed(7), &d, 2, 25),
            Err(Refusal::WeightTooLarge { total: 30, max: 25 })
        );
        // None of the refusals counted as this seed's answer.
        m.admit(
            &manifest(&[("b", 20), ("c", 30)]),
            RoundSeed(7),
            &d,
            2,
            1024,
        )
        .unwrap();
    }

    #[test]
    fn participants_refuse_a_repeated_seed() {
        let mut log = SeedLog::default();
        log.use_seed(RoundSeed(1)).unwrap();
        log.use_seed(RoundSeed(2)).unwrap();
        let e = log.use_seed(RoundSeed(1)).unwrap_err().to_string();
        assert!(e.contains("already used"), "{e}");
    }
}
