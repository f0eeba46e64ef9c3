//! Secure rounds on a virtual clock, with the participants' and members' side run by the
//! real `cohort_crypto` functions (no network).

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_crypto::aggregation::{self, ShareRequest};
use cohort_crypto::{MemberPolicy, MemberSecret, SeedLog, Signer25519, VerifyKey};
use cohort_model::{ModelSpec, Optimizer, TrainConfig};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use super::super::{
    Contribution, JobConfig, PartialSum, PartialValues, PartyKeys, SecureRecord, SecureSettings,
    SignedShare, Update,
};
use super::*;
use crate::strategy::FedAvg;

const P: usize = 6; // logistic regression, 2 inputs, 2 classes

struct Node {
    seal: MemberSecret,
    sign: Signer25519,
    policy: MemberPolicy,
    seeds: SeedLog,
}

struct Harness {
    o: Orchestrator,
    now: Instant,
    nodes: BTreeMap<String, Node>,
    rng: ChaCha8Rng,
}

fn config(committee: usize) -> JobConfig {
    JobConfig {
        job_id: "job".into(),
        model: ModelSpec::Logistic {
            inputs: 2,
            classes: 2,
        },
        train: TrainConfig {
            epochs: 1,
            batch_size: 4,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            seed: 1,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        rounds: 2,
        min_participants: 4,
        fraction: 1.0,
        sampling: Default::default(),
        min_updates: 2,
        round_timeout: Duration::from_secs(30),
        eval_timeout: Duration::from_secs(10),
        evaluate: false,
        evaluate_fraction: 1.0,
        liveness_timeout: Duration::from_secs(600),
        seed: 7,
        secure: Some(SecureSettings {
            committee_size: committee,
            t_min: 2,
            decrypt_timeout: Duration::from_secs(5),
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

impl Harness {
    fn new(committee: usize, ids: &[&str]) -> Self {
        Self::with_config(config(committee), ids)
    }

    fn with_config(config: JobConfig, ids: &[&str]) -> Self {
        let mut h = Harness {
            o: Orchestrator::new(config, Box::new(FedAvg::default()), None, [3; 32]).unwrap(),
            now: Instant::now(),
            nodes: BTreeMap::new(),
            rng: ChaCha8Rng::seed_from_u64(1),
        };
        for id in ids {
            let node = Node {
                seal: MemberSecret::generate(&mut h.rng),
                sign: Signer25519::generate(&mut h.rng),
                policy: MemberPolicy::default(),
                seeds: SeedLog::default(),
            };
            let keys = PartyKeys {
                seal: node.seal.public(),
                verify: node.sign.verify_key(),
                binding: None,
            };
            h.o.handle_join_with_keys(id, format!("s-{id}"), 100, Some(keys), h.now)
                .unwrap();
            h.nodes.insert(id.to_string(), node);
        }
        h
    }

    fn pass(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        while let Some(t) = self.o.poll_timeout() {
            if t > self.now {
                break;
            }
            self.o.handle_timeout(self.now);
        }
    }

    fn round_info(&self, id: &str) -> Arc<RoundInfo> {
        match self.o.task_for(id) {
            Task::Train {
                secure: Some(info), ..
            } => info,
            t => panic!("expected a secure training task for {id}, got {t:?}"),
        }
    }

    /// `id` encrypts `value` in every coordinate and uploads it.
    fn upload(&mut self, id: &str, value: f32, examples: u64) -> Result<(), Rejection> {
        let round = self.round_info(id).round;
        let p = self.protected(id, value, examples);
        let u = SecureUpdate {
            round,
            weight: p.weight,
            bodies_sha256: p.bodies_sha256,
            bodies: p.bodies,
            pieces: p.pieces,
            signature: p.signature,
            train: None,
        };
        self.o.handle_secure_update(id, u, self.now)
    }

    /// Member `id` answers its open decryption task, if it has one.
    fn answer(&mut self, id: &str) -> Option<Result<(), Rejection>> {
        let Task::Decrypt(req) = self.o.task_for(id) else {
            return None;
        };
        let (records, pieces) = self
            .o
            .decryption_input(id, req.info.round, req.info.attempt)
            .unwrap();
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
        assert_eq!(manifest.digest(), req.manifest_digest);
        cohort_crypto::sign::verify(
            &req.coordinator_key,
            Kind::Manifest,
            &req.manifest_digest,
            &req.manifest_signature,
        )
        .unwrap();
        let node = self.nodes.get_mut(id).unwrap();
        let share = aggregation::answer(
            &ShareRequest {
                info: &req.info,
                manifest: &manifest,
                uploads: &records,
                keys: &keys,
                pieces: &pieces,
                assigned: &req.pieces,
                len: self.o.current_update_len(),
            },
            id,
            &node.seal,
            &node.sign,
            &mut node.policy,
            &mut self.rng,
        )
        .map(|(values, signature)| SignedShare {
            sha256: cohort_crypto::sign::share_sha256(&values),
            values,
            signature,
        })
        .map_err(|e| e.to_string());
        let answer = ShareAnswer {
            round: req.info.round,
            attempt: req.info.attempt,
            request: req.request,
            pieces: req.pieces.clone(),
            share,
        };
        Some(self.o.handle_share(id, answer, self.now))
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.o.poll_event()).collect()
    }
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

#[test]
fn a_secure_round_gives_the_weighted_mean_of_the_updates() {
    let mut h = Harness::new(3, &IDS);
    let before = h.o.global().1;
    // Weights: 100 examples each → equal weights; the mean of 1, 2, 3, 6 is 3.
    for (id, v) in IDS.iter().zip([1.0, 2.0, 3.0, 6.0]) {
        h.upload(id, v, 100).unwrap();
    }
    assert_eq!(h.o.phase_name(), "decrypting");
    let committee = h.round_info_committee();
    assert_eq!(committee.len(), 3);
    // Each piece goes to exactly one member; a member with none gets no task.
    let asked = committee
        .iter()
        .filter(|id| matches!(h.o.task_for(id), Task::Decrypt(_)))
        .count();
    assert!(asked >= 2, "a 2-of-3 committee needs at least two members");
    for id in &committee {
        if let Some(r) = h.answer(id) {
            r.unwrap();
        }
    }
    let (version, after) = h.o.global();
    assert_eq!(version, 1);
    for (a, b) in after.iter().zip(before.iter()) {
        assert!((a - b - 3.0).abs() < 1e-4, "{a} − {b} should be 3");
    }
    let events = h.events();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::DecryptionStarted {
            participants: 4,
            ..
        }
    )));
}

impl Harness {
    fn round_info_committee(&self) -> Vec<String> {
        match &self.o.phase {
            Phase::Decrypting(d) => d.info.committee.iter().map(|m| m.id.clone()).collect(),
            Phase::Training(t) => t
                .secure
                .as_ref()
                .unwrap()
                .info
                .committee
                .iter()
                .map(|m| m.id.clone())
                .collect(),
            _ => panic!("not in a secure round"),
        }
    }
}

#[test]
fn a_silent_member_has_its_pieces_reassigned() {
    let mut h = Harness::new(5, &IDS[..4]);
    for (id, v) in IDS.iter().zip([1.0, 1.0, 4.0, 2.0]) {
        h.upload(id, v, 100).unwrap();
    }
    // Committee of 4 (all selected), threshold 3: one member stays silent.
    let committee = h.round_info_committee();
    assert_eq!(committee.len(), 4);
    let silent = committee
        .iter()
        .find(|id| matches!(h.o.task_for(id), Task::Decrypt(_)))
        .unwrap()
        .clone();
    let others: Vec<String> = committee
        .iter()
        .filter(|id| **id != silent)
        .cloned()
        .collect();
    for id in &others {
        if let Some(r) = h.answer(id) {
            r.unwrap();
        }
    }
    assert_eq!(
        h.o.phase_name(),
        "decrypting",
        "the silent member's pieces are missing"
    );
    h.pass(6);
    let failed: Vec<Event> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::MemberFailed { .. }))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        h.answer(&silent).is_none(),
        "a failed member gets no new task"
    );
    for id in &others {
        if let Some(r) = h.answer(id) {
            r.unwrap();
        }
    }
    let (version, after) = h.o.global();
    assert_eq!(version, 1);
    let before = Orchestrator::new(config(5), Box::new(FedAvg::default()), None, [3; 32])
        .unwrap()
        .global()
        .1;
    assert!((after[0] - before[0] - 2.0).abs() < 1e-4);
}

#[test]
fn too_few_members_fail_the_attempt_and_the_retry_has_a_new_seed() {
    let mut h = Harness::new(3, &IDS);
    for id in IDS {
        h.upload(id, 1.0, 100).unwrap();
    }
    let first_seed = match &h.o.phase {
        Phase::Decrypting(d) => d.info.seed,
        _ => unreachable!(),
    };
    // Only one member of a 2-of-3 committee answers; one refuses, one is silent.
    let committee = h.round_info_committee();
    let asked: Vec<String> = committee
        .iter()
        .filter(|id| matches!(h.o.task_for(id), Task::Decrypt(_)))
        .cloned()
        .collect();
    h.answer(&asked[0]).unwrap().unwrap();
    let Task::Decrypt(req) = h.o.task_for(&asked[1]) else {
        panic!()
    };
    h.o.handle_share(
        &asked[1],
        ShareAnswer {
            round: 1,
            attempt: 1,
            request: req.request,
            pieces: req.pieces,
            share: Err("not today".into()),
        },
        h.now,
    )
    .unwrap();
    h.pass(6);
    let events = h.events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::RoundFailed {
                round: 1,
                attempt: 1,
                cause: FailureCause::CommitteeUnavailable { .. }
            }
        )),
        "{events:?}"
    );
    assert_eq!(h.o.global().0, 0, "nothing was decrypted");
    let retry = h.round_info("a");
    assert_eq!(retry.attempt, 2);
    assert_ne!(retry.seed, first_seed, "a retry never reuses the seed");
}

#[test]
fn bad_secure_uploads_are_refused_and_not_added() {
    let mut h = Harness::new(3, &IDS);
    // A plaintext update in a secure round.
    let plain = Update {
        round: 1,
        delta: vec![1.0; P],
        num_examples: 10,
        train: None,
    };
    assert!(matches!(
        h.o.handle_update("a", plain, h.now),
        Err(Rejection::Invalid(_))
    ));
    // A weight the participant did not sign.
    let info = h.round_info("a");
    let node = h.nodes.get_mut("a").unwrap();
    let p = aggregation::protect(
        &info,
        "a",
        &node.sign,
        &mut node.seeds,
        &[1.0; P],
        100,
        &mut h.rng,
    )
    .unwrap();
    let mut u = SecureUpdate {
        round: 1,
        weight: p.weight + 500,
        bodies_sha256: aggregation::bodies_sha256(&p.bodies),
        bodies: p.bodies.clone(),
        pieces: p.pieces.clone(),
        signature: p.signature,
        train: None,
    };
    let e = h.o.handle_secure_update("a", u.clone(), h.now).unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
    // Bodies that are not the ones signed.
    u.weight = p.weight;
    u.bodies[0] ^= 1 << 40;
    u.bodies_sha256 = aggregation::bodies_sha256(&u.bodies);
    assert!(h.o.handle_secure_update("a", u.clone(), h.now).is_err());
    // A missing sealed piece.
    u.bodies = p.bodies.clone();
    u.bodies_sha256 = aggregation::bodies_sha256(&u.bodies);
    u.pieces.pop();
    assert!(h.o.handle_secure_update("a", u, h.now).is_err());
    // None of it counted: "a" can still send its real update.
    h.upload("b", 1.0, 100).unwrap();
    assert!(matches!(h.o.phase, Phase::Training(ref t) if t.received.len() == 1));
    // Joining a secure job without keys is refused.
    let e = h.o.handle_join("e", "s-e".into(), 1, h.now).unwrap_err();
    assert!(e.to_string().contains("keys"), "{e}");
}

#[test]
fn dedicated_custodians_form_the_committee_and_never_train() {
    let mut cfg = config(5);
    cfg.secure.as_mut().unwrap().custodians = ids_of(&["k1", "k2", "k3"]);
    // Three data holders and the custodians join; min_participants (4) counts data holders
    // only, so nothing starts until a fourth one joins.
    let h = Harness::with_config(cfg.clone(), &["a", "b", "c", "k1", "k2", "k3"]);
    assert_eq!(h.o.phase_name(), "waiting for participants");
    let mut h = Harness::with_config(cfg, &["a", "b", "c", "d", "k1", "k2"]);
    // Two of three custodians online is a majority: the round starts with them.
    assert_eq!(h.o.phase_name(), "training");
    assert_eq!(h.round_info_committee(), ids_of(&["k1", "k2"]));
    assert_eq!(
        h.round_info("a").threshold,
        2,
        "a majority of the three configured"
    );
    for k in ["k1", "k2"] {
        assert_eq!(h.o.task_for(k), Task::Idle, "custodians never train");
    }
    for id in IDS {
        h.upload(id, 2.0, 100).unwrap();
    }
    for k in ["a", "b", "c", "d"] {
        assert!(
            !matches!(h.o.task_for(k), Task::Decrypt(_)),
            "data holders never decrypt"
        );
    }
    for k in ["k1", "k2"] {
        if let Some(r) = h.answer(k) {
            r.unwrap();
        }
    }
    assert_eq!(h.o.global().0, 1);
}

#[test]
fn without_a_majority_of_custodians_no_round_starts() {
    let mut cfg = config(5);
    cfg.secure.as_mut().unwrap().custodians = ids_of(&["k1", "k2", "k3"]);
    let h = Harness::with_config(cfg, &["a", "b", "c", "d", "k1"]);
    assert_eq!(h.o.phase_name(), "waiting for participants");
}

fn ids_of(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_round_interrupted_by_a_restart_starts_again_with_a_fresh_seed_and_attempt() {
    let ids = ["a", "b", "c", "d"];
    let before = Harness::new(3, &ids);
    let interrupted = before.round_info("a");
    // The process dies mid-round; its successor resumes the job with no round completed.
    let (_, global) = before.o.global();
    let mut after = Harness::with_config(config(3), &[]);
    after.o = Orchestrator::resume(
        config(3),
        Box::new(FedAvg::default()),
        None,
        Vec::new(),
        global.to_vec(),
        2,
        [4; 32],
    )
    .unwrap();
    for id in ids {
        let node = &before.nodes[id];
        let keys = PartyKeys {
            seal: node.seal.public(),
            verify: node.sign.verify_key(),
            binding: None,
        };
        after
            .o
            .handle_join_with_keys(id, format!("s2-{id}"), 100, Some(keys), after.now)
            .unwrap();
    }
    let restarted = after.round_info("a");
    assert_eq!((restarted.round, restarted.attempt), (1, 2));
    assert_ne!(restarted.seed, interrupted.seed, "a fresh round seed");
    // A participant that encrypted under the old seed can encrypt under the new one.
    let mut seeds = SeedLog::default();
    seeds.use_seed(interrupted.seed).unwrap();
    seeds.use_seed(restarted.seed).unwrap();
}

impl Harness {
    /// `id`'s encrypted upload of `value`, not yet sent.
    fn protected(&mut self, id: &str, value: f32, examples: u64) -> aggregation::ProtectedUpdate {
        let info = self.round_info(id);
        let node = self.nodes.get_mut(id).unwrap();
        aggregation::protect(
            &info,
            id,
            &node.sign,
            &mut node.seeds,
            &[value; P],
            examples,
            &mut self.rng,
        )
        .unwrap()
    }
}

/// A partial sum of `uploads` as a simulation worker folds it.
fn partial_of(uploads: &[(&str, aggregation::ProtectedUpdate)]) -> PartialSum {
    let mut acc = cohort_crypto::Accumulator::new(uploads[0].1.bodies.len());
    let contributions = uploads
        .iter()
        .map(|(id, p)| {
            acc.add(p.weight, &p.bodies).unwrap();
            Contribution {
                id: id.to_string(),
                weight: p.weight,
                train: None,
                secure: Some(SecureRecord {
                    bodies_sha256: aggregation::bodies_sha256(&p.bodies),
                    pieces: p.pieces.clone(),
                    signature: p.signature,
                }),
            }
        })
        .collect();
    PartialSum {
        round: 1,
        contributions,
        values: PartialValues::Secure(acc.sum().to_vec()),
    }
}

#[test]
fn partial_sums_give_the_model_of_the_single_uploads_and_are_checked_whole() {
    // The same uploads, sent one by one or as two partial sums: the same model, bit for bit.
    let run = |partial: bool| {
        let mut h = Harness::new(3, &IDS);
        let uploads: Vec<(&str, aggregation::ProtectedUpdate)> = IDS
            .iter()
            .zip([1.0, 2.0, 3.0, 6.0])
            .map(|(id, v)| (*id, h.protected(id, v, 100)))
            .collect();
        if partial {
            // A record whose weight is not the signed one: the whole partial sum is refused
            // and nothing of it counted.
            let mut bad = partial_of(&uploads[..2]);
            bad.contributions[1].weight += 1;
            let e = h.o.handle_partial_sum(bad, h.now).unwrap_err();
            assert!(e.to_string().contains("signature"), "{e}");
            assert!(matches!(h.o.phase, Phase::Training(ref t) if t.received.is_empty()));
            // A participant twice in one sum.
            let mut twice = partial_of(&uploads[..2]);
            twice.contributions[1].id = "a".into();
            assert!(matches!(
                h.o.handle_partial_sum(twice, h.now),
                Err(Rejection::Duplicate(..))
            ));
            h.o.handle_partial_sum(partial_of(&uploads[..2]), h.now)
                .unwrap();
            // A participant already in: refused.
            assert!(matches!(
                h.o.handle_partial_sum(partial_of(&uploads[1..3]), h.now),
                Err(Rejection::Duplicate(..))
            ));
            h.o.handle_partial_sum(partial_of(&uploads[2..]), h.now)
                .unwrap();
        } else {
            for (id, p) in uploads {
                let u = SecureUpdate {
                    round: 1,
                    weight: p.weight,
                    bodies_sha256: aggregation::bodies_sha256(&p.bodies),
                    bodies: p.bodies,
                    pieces: p.pieces,
                    signature: p.signature,
                    train: None,
                };
                h.o.handle_secure_update(id, u, h.now).unwrap();
            }
        }
        assert_eq!(h.o.phase_name(), "decrypting");
        for id in h.round_info_committee() {
            if let Some(r) = h.answer(&id) {
                r.unwrap();
            }
        }
        let (version, params) = h.o.global();
        assert_eq!(version, 1);
        params
    };
    let (one_by_one, partial) = (run(false), run(true));
    assert_eq!(one_by_one, partial);
}

mod statistics;
