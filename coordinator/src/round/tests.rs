//! The round state machine on a virtual clock: no sockets, no threads, no sleeping.

use super::*;
use crate::strategy::FedAvg;
use std::time::Duration;

use cohort_model::{ModelSpec, Optimizer, TrainConfig};

mod robust;
mod strategies;

/// Drives an [`Orchestrator`] with a clock that only moves when told, committing completed
/// rounds as the coordinator's driver does, to a store that can be told to fail.
struct Harness {
    o: Orchestrator,
    start: Instant,
    now: Instant,
    /// Commit attempts so far, and the numbers (1-based) of those that fail.
    commits: usize,
    failing: BTreeSet<usize>,
}

pub(super) fn config() -> JobConfig {
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
        rounds: 3,
        min_participants: 3,
        fraction: 1.0,
        sampling: Default::default(),
        min_updates: 2,
        round_timeout: Duration::from_secs(30),
        eval_timeout: Duration::from_secs(10),
        evaluate: true,
        evaluate_fraction: 1.0,
        liveness_timeout: Duration::from_secs(20),
        seed: 7,
        secure: None,
        data: None,
        clip_norm: None,
        clip_per_layer: false,
        privacy: None,
        emulated_codec: None,
        control_variates: false,
        adaptive_clipping: None,
    }
}

const P: usize = 6; // parameters of the logistic model above

impl Harness {
    fn new(config: JobConfig) -> Self {
        let start = Instant::now();
        Harness {
            o: Orchestrator::new(config, Box::new(FedAvg::default()), None, [1; 32]).unwrap(),
            start,
            now: start,
            commits: 0,
            failing: BTreeSet::new(),
        }
    }

    /// The driver's part: commits the round the machine waits for, if any (once a call, as
    /// the real driver retries on its own timer).
    fn commit(&mut self) {
        if let Some(round) = self.o.awaiting_commit() {
            self.commits += 1;
            if self.failing.contains(&self.commits) {
                self.o
                    .commit_failed(round, format!("disk full (attempt {})", self.commits));
            } else {
                self.o.committed(round, self.now);
            }
        }
    }

    fn at(&self) -> Duration {
        self.now - self.start
    }

    fn join(&mut self, id: &str) {
        self.o
            .handle_join(id, format!("s-{id}-{:?}", self.at()), 10, self.now)
            .unwrap();
    }

    fn pass(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        // A driver calls handle_timeout whenever poll_timeout has come.
        while let Some(t) = self.o.poll_timeout() {
            if t > self.now {
                break;
            }
            self.o.handle_timeout(self.now);
        }
        self.commit();
    }

    /// Participants that are alive poll (and so heartbeat) all the time; this stands for that.
    fn beat(&mut self, who: &[&str]) {
        for id in who {
            self.o.handle_heartbeat(id, self.now).unwrap();
        }
    }

    fn update(&mut self, id: &str, round: u64, value: f32, n: u64) -> Result<(), Rejection> {
        let u = Update {
            round,
            delta: vec![value; P],
            num_examples: n,
            train: Some(Metrics {
                loss: 0.5,
                accuracy: 0.8,
                auc: None,
                num_examples: n as usize,
            }),
        };
        let r = self.o.handle_update(id, u, self.now);
        self.commit();
        r
    }

    fn eval(&mut self, id: &str, round: u64, acc: f64) -> Result<(), Rejection> {
        let m = Metrics {
            loss: 0.1,
            accuracy: acc,
            auc: None,
            num_examples: 10,
        };
        let r = self.o.handle_evaluation(id, round, m, self.now);
        self.commit();
        r
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.o.poll_event()).collect()
    }

    fn completed(&mut self) -> Vec<RoundSummary> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::RoundCompleted { summary, .. } => Some(summary),
                _ => None,
            })
            .collect()
    }
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn round_waits_for_min_participants_then_selects_all() {
    let mut h = Harness::new(config());
    h.join("a");
    h.join("b");
    assert_eq!(h.o.task_for("a"), Task::Idle);
    h.join("c");
    let started: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::RoundStarted { .. }))
        .collect();
    assert_eq!(
        started,
        vec![Event::RoundStarted {
            round: 1,
            attempt: 1,
            selected: ids(&["a", "b", "c"])
        }]
    );
    match h.o.task_for("b") {
        Task::Train {
            round: 1,
            model_version: 0,
            deadline,
            config,
            secure: None,
            clip_norm: None,
            clip_per_layer: false,
            noise_stddev: None,
            clip_indicator: None,
            control: None,
        } => {
            assert_eq!(deadline, h.start + Duration::from_secs(30));
            assert_ne!(config.seed, 1, "each participant gets its own seed");
        }
        t => panic!("expected a training task, got {t:?}"),
    }
}

#[test]
fn full_job_aggregates_weighted_mean_and_evaluates() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    let (_, g0) = h.o.global();
    h.update("a", 1, 1.0, 10).unwrap();
    h.update("b", 1, 2.0, 30).unwrap();
    assert_eq!(h.o.training_round(), Some(1), "still waiting for c");
    h.update("c", 1, -1.0, 60).unwrap();
    // All three arrived: aggregated without waiting for the deadline.
    let (v, g1) = h.o.global();
    assert_eq!(v, 1);
    // Weights 10, 30, 60 on updates 1, 2, -1.
    let mean = (10.0 + 30.0 * 2.0 - 60.0) / 100.0;
    for (a, b) in g1.iter().zip(g0.iter()) {
        assert!((a - (b + mean)).abs() < 1e-6);
    }
    assert!(matches!(
        h.o.task_for("a"),
        Task::Evaluate {
            round: 1,
            model_version: 1,
            ..
        }
    ));
    h.eval("a", 1, 0.9).unwrap();
    h.eval("b", 1, 0.6).unwrap();
    h.eval("c", 1, 0.6).unwrap();
    let done = h.completed();
    assert_eq!(done.len(), 1);
    let s = &done[0];
    assert_eq!(s.participants, ids(&["a", "b", "c"]));
    assert_eq!(s.total_examples, 100);
    assert_eq!(s.evaluated_by, 3);
    assert!((s.eval.unwrap().accuracy - 0.7).abs() < 1e-12);
    assert!(matches!(h.o.task_for("c"), Task::Train { round: 2, .. }));
    for r in 2..=3 {
        for p in ["a", "b", "c"] {
            h.update(p, r, 0.0, 10).unwrap();
        }
        for p in ["a", "b", "c"] {
            h.eval(p, r, 0.9).unwrap();
        }
    }
    assert!(h.events().contains(&Event::JobFinished { rounds: 3 }));
    assert!(h.o.is_finished());
    assert_eq!(h.o.task_for("a"), Task::Finished);
    assert_eq!(h.o.history().len(), 3);
}

#[test]
fn stragglers_are_left_out_at_the_deadline() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    h.update("a", 1, 1.0, 10).unwrap();
    h.pass(10);
    h.update("b", 1, 3.0, 10).unwrap();
    h.beat(&["a", "c"]); // c is alive, only slow
    h.events();
    h.pass(19); // t = 29 s: still open
    assert_eq!(h.o.training_round(), Some(1));
    h.beat(&["a", "b", "c"]);
    h.pass(1); // t = 30 s: deadline
    let ev = h.events();
    assert!(ev.contains(&Event::StragglersDropped {
        round: 1,
        ids: ids(&["c"])
    }));
    let (v, g) = h.o.global();
    assert_eq!(v, 1);
    let g0 = config().model.initial_parameters(7);
    assert!((g[0] - (g0[0] + 2.0)).abs() < 1e-6, "mean of a and b only");
    // The straggler's update, arriving late, is refused and changes nothing.
    assert_eq!(
        h.update("c", 1, 100.0, 10),
        Err(Rejection::RoundClosed {
            round: 1,
            current: 1,
            phase: "evaluating"
        })
    );
    assert_eq!(h.o.global().1, g);
    // Evaluation deadline: summary reports the straggler.
    h.pass(10);
    let s = h.completed();
    assert_eq!(s[0].stragglers, ids(&["c"]));
    assert_eq!(s[0].participants, ids(&["a", "b"]));
    assert_eq!(s[0].evaluated_by, 0);
}

#[test]
fn duplicate_updates_are_refused_and_counted_once() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    h.update("a", 1, 1.0, 10).unwrap();
    assert_eq!(
        h.update("a", 1, 1.0, 10),
        Err(Rejection::Duplicate("a".into(), 1))
    );
    h.update("b", 1, 1.0, 10).unwrap();
    h.pass(30);
    let g0 = config().model.initial_parameters(7);
    assert!((h.o.global().1[0] - (g0[0] + 1.0)).abs() < 1e-6);
    h.pass(10);
    assert_eq!(h.completed()[0].total_examples, 20);
}

#[test]
fn malformed_updates_are_refused_and_the_round_goes_on() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    let bad = Update {
        round: 1,
        delta: vec![0.0; P + 1],
        num_examples: 5,
        train: None,
    };
    assert_eq!(
        h.o.handle_update("a", bad, h.now),
        Err(Rejection::ParameterCount {
            expected: P,
            got: P + 1
        })
    );
    let nan = Update {
        round: 1,
        delta: vec![f32::NAN; P],
        num_examples: 5,
        train: None,
    };
    assert!(matches!(
        h.o.handle_update("a", nan, h.now),
        Err(Rejection::Invalid(_))
    ));
    assert!(matches!(
        h.update("a", 1, 1.0, 0),
        Err(Rejection::Invalid(_))
    ));
    assert_eq!(
        h.update("zed", 1, 1.0, 1),
        Err(Rejection::UnknownParticipant("zed".into()))
    );
    assert!(matches!(
        h.update("a", 2, 1.0, 1),
        Err(Rejection::RoundClosed { round: 2, .. })
    ));
    // The refusals left the round intact: a's real update is still accepted.
    for p in ["a", "b", "c"] {
        h.update(p, 1, 1.0, 1).unwrap();
    }
    assert_eq!(h.o.global().0, 1);
}

#[test]
fn too_few_updates_fails_the_round_and_retries_with_a_new_attempt() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    let seed1 = match h.o.task_for("a") {
        Task::Train { config, .. } => config.seed,
        t => panic!("{t:?}"),
    };
    h.update("a", 1, 1.0, 10).unwrap();
    h.events();
    h.pass(15);
    h.beat(&["a", "b", "c"]); // b and c are alive but never send their updates
    h.pass(15);
    let ev = h.events();
    assert!(ev.contains(&Event::RoundFailed {
        round: 1,
        attempt: 1,
        cause: FailureCause::TooFewUpdates {
            received: 1,
            needed: 2
        }
    }));
    // Everyone is still online (within liveness), so attempt 2 starts at once.
    assert!(ev.contains(&Event::RoundStarted {
        round: 1,
        attempt: 2,
        selected: ids(&["a", "b", "c"])
    }));
    assert_eq!(h.o.global().0, 0, "nothing was aggregated");
    match h.o.task_for("a") {
        Task::Train {
            round: 1, config, ..
        } => assert_ne!(config.seed, seed1),
        t => panic!("{t:?}"),
    }
    h.o.handle_heartbeat("a", h.now).unwrap();
    for p in ["a", "b", "c"] {
        h.update(p, 1, 1.0, 10).unwrap();
    }
    for p in ["a", "b", "c"] {
        h.eval(p, 1, 1.0).unwrap();
    }
    assert_eq!(h.completed()[0].attempts, 2);
}

#[test]
fn participants_rejoin_between_and_within_rounds() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    // c crashes mid-round and rejoins with a new session: it keeps its place.
    let old =
        h.o.participants()
            .iter()
            .find(|p| p.id == "c")
            .map(|_| "s-c-0ns".to_string())
            .unwrap();
    assert_eq!(h.o.participant_for_session(&old), Some(&"c".to_string()));
    h.pass(5);
    h.join("c");
    assert_eq!(h.o.participant_for_session(&old), None, "old session ended");
    assert!(h.events().contains(&Event::ParticipantJoined {
        id: "c".into(),
        rejoined: true
    }));
    assert!(matches!(h.o.task_for("c"), Task::Train { round: 1, .. }));
    for p in ["a", "b", "c"] {
        h.update(p, 1, 0.0, 1).unwrap();
    }
    // b leaves during evaluation; round 2 needs three online participants and waits.
    h.o.handle_leave("b", h.now).unwrap();
    h.eval("a", 1, 1.0).unwrap();
    h.eval("c", 1, 1.0).unwrap();
    h.pass(10); // evaluation deadline (b never evaluates)
    assert_eq!(h.completed().len(), 1);
    assert_eq!(h.o.task_for("a"), Task::Idle);
    assert_eq!(h.o.training_round(), None);
    h.pass(5);
    h.join("b");
    assert!(h.events().contains(&Event::RoundStarted {
        round: 2,
        attempt: 1,
        selected: ids(&["a", "b", "c"])
    }));
}

#[test]
fn silent_participants_are_lost_and_come_back_with_a_heartbeat() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    h.events();
    h.pass(15);
    h.o.handle_heartbeat("a", h.now).unwrap();
    h.o.handle_heartbeat("b", h.now).unwrap();
    h.pass(5); // c silent for 20 s
    assert_eq!(h.events(), vec![Event::ParticipantLost { id: "c".into() }]);
    h.o.handle_heartbeat("c", h.now).unwrap();
    assert_eq!(
        h.events(),
        vec![Event::ParticipantJoined {
            id: "c".into(),
            rejoined: true
        }]
    );
    h.o.handle_leave("c", h.now).unwrap();
    assert_eq!(
        h.o.handle_heartbeat("c", h.now),
        Err(Rejection::UnknownParticipant("c".into()))
    );
}

#[test]
fn fraction_selects_a_seeded_subset_and_others_are_refused() {
    let mut cfg = config();
    cfg.fraction = 0.5;
    cfg.min_participants = 2;
    let pick = |cfg: JobConfig| {
        let mut h = Harness::new(cfg);
        for p in ["a", "b", "c", "d"] {
            h.o.handle_join(p, p.into(), 1, h.now).unwrap();
        }
        // The round starts as soon as two are online; count only the first start.
        h.events()
            .into_iter()
            .find_map(|e| match e {
                Event::RoundStarted { selected, .. } => Some(selected),
                _ => None,
            })
            .unwrap()
    };
    let first = pick(cfg.clone());
    assert_eq!(first.len(), 2);
    assert_eq!(pick(cfg.clone()), first, "same seed, same selection");

    let mut h = Harness::new(cfg);
    for p in ["a", "b", "c", "d"] {
        h.join(p);
    }
    let selected = match h
        .events()
        .into_iter()
        .find(|e| matches!(e, Event::RoundStarted { .. }))
    {
        Some(Event::RoundStarted { selected, .. }) => selected,
        _ => unreachable!(),
    };
    let other = ["a", "b", "c", "d"]
        .into_iter()
        .find(|p| !selected.contains(&p.to_string()))
        .unwrap();
    assert_eq!(h.o.task_for(other), Task::Idle);
    assert_eq!(
        h.update(other, 1, 1.0, 1),
        Err(Rejection::NotSelected(other.into(), 1))
    );
}

#[test]
fn allowlist_refuses_strangers() {
    let allowed = ["a".to_string()].into_iter().collect();
    let mut o = Orchestrator::new(
        config(),
        Box::new(FedAvg::default()),
        Some(allowed),
        [1; 32],
    )
    .unwrap();
    let now = Instant::now();
    assert!(o.handle_join("a", "s1".into(), 1, now).is_ok());
    assert_eq!(
        o.handle_join("mallory", "s2".into(), 1, now),
        Err(Rejection::NotAllowed("mallory".into()))
    );
}

#[test]
fn poll_timeout_names_the_next_deadline() {
    let mut h = Harness::new(config());
    assert_eq!(h.o.poll_timeout(), None);
    h.join("a");
    assert_eq!(h.o.poll_timeout(), Some(h.start + Duration::from_secs(20)));
    h.join("b");
    h.join("c");
    h.pass(3);
    for p in ["a", "b", "c"] {
        h.o.handle_heartbeat(p, h.now).unwrap();
    }
    assert_eq!(h.o.poll_timeout(), Some(h.start + Duration::from_secs(23)));
}

#[test]
fn invalid_job_configs_name_the_setting() {
    let mut c = config();
    c.min_updates = 4;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("min_updates")
    );
    let mut c = config();
    c.fraction = 0.0;
    assert!(c.validate().unwrap_err().to_string().contains("fraction"));
    let mut c = config();
    c.rounds = 0;
    assert!(c.validate().unwrap_err().to_string().contains("rounds"));
    for reserved in ["objects", "serving.json"] {
        let mut c = config();
        c.job_id = reserved.into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("reserved by the model registry"), "{e}");
    }
}

#[test]
fn fraction_is_of_those_online_with_at_least_min_updates() {
    // Everyone must be online to start (min_participants 4), but only a quarter is selected,
    // raised to min_updates (2).
    let mut cfg = config();
    cfg.min_participants = 4;
    cfg.fraction = 0.25;
    let mut h = Harness::new(cfg);
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    assert!(
        !h.events()
            .iter()
            .any(|e| matches!(e, Event::RoundStarted { .. }))
    );
    h.join("d");
    let started = h
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::RoundStarted { selected, .. } => Some(selected),
            _ => None,
        })
        .expect("the round starts once four are online");
    assert_eq!(started.len(), 2);
}

/// Runs round `round` to completion with a, b and c.
fn complete_round(h: &mut Harness, round: u64) {
    for p in ["a", "b", "c"] {
        h.update(p, round, 1.0, 10).unwrap();
    }
    for p in ["a", "b", "c"] {
        h.eval(p, round, 0.9).unwrap();
    }
}

#[test]
fn a_paused_job_finishes_its_round_then_starts_no_other_until_resumed() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    h.o.set_paused(true, h.now);
    assert_eq!(h.o.training_round(), Some(1), "the round under way goes on");
    complete_round(&mut h, 1);
    assert_eq!(h.o.global().0, 1);
    assert_eq!(h.o.phase_name(), "paused");
    assert_eq!(h.o.task_for("a"), Task::Idle);
    h.pass(5);
    h.beat(&["a", "b", "c"]);
    assert_eq!(h.o.training_round(), None, "no round starts while paused");
    h.events();
    h.o.set_paused(false, h.now);
    let ev = h.events();
    assert!(ev.contains(&Event::Paused(false)), "{ev:?}");
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::RoundStarted { round: 2, .. })),
        "resuming starts the next round: {ev:?}"
    );
}

#[test]
fn a_cancelled_job_abandons_its_round_and_refuses_updates() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    h.update("a", 1, 1.0, 10).unwrap();
    h.o.cancel();
    assert!(h.o.is_finished() && h.o.is_cancelled());
    assert_eq!(h.o.phase_name(), "cancelled");
    assert_eq!(h.o.task_for("b"), Task::Finished);
    assert!(matches!(
        h.update("b", 1, 1.0, 10),
        Err(Rejection::RoundClosed { .. })
    ));
    assert_eq!(h.o.global().0, 0, "nothing of the abandoned round is kept");
    assert!(h.events().contains(&Event::JobCancelled { round: 1 }));
}

#[test]
fn a_resumed_job_continues_from_its_last_completed_round_with_a_new_attempt() {
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    complete_round(&mut h, 1);
    let history = h.o.history().to_vec();
    let (_, global) = h.o.global();
    // The process dies during round 2; a new one resumes from round 1's version.
    let o = Orchestrator::resume(
        config(),
        Box::new(FedAvg::default()),
        None,
        history.clone(),
        global.to_vec(),
        2,
        [2; 32],
    )
    .unwrap();
    let mut h2 = Harness {
        o,
        start: h.start,
        now: h.now,
        commits: 0,
        failing: BTreeSet::new(),
    };
    assert_eq!(h2.o.global().0, 1);
    assert_eq!(h2.o.history(), &history[..]);
    for p in ["a", "b", "c"] {
        h2.join(p);
    }
    assert!(h2.events().iter().any(|e| matches!(
        e,
        Event::RoundStarted {
            round: 2,
            attempt: 2,
            ..
        }
    )));
    complete_round(&mut h2, 2);
    complete_round(&mut h2, 3);
    assert!(h2.o.is_finished());
    // Gaps, too many rounds and a model of the wrong size are refused.
    let resume = |hist: Vec<RoundSummary>, g: Vec<f32>| {
        Orchestrator::resume(
            config(),
            Box::new(FedAvg::default()),
            None,
            hist,
            g,
            2,
            [2; 32],
        )
    };
    let mut gap = history.clone();
    gap[0].round = 2;
    assert!(
        resume(gap, global.to_vec())
            .unwrap_err()
            .to_string()
            .contains("contiguous")
    );
    assert!(
        resume(history.clone(), vec![0.0; 3])
            .unwrap_err()
            .to_string()
            .contains("parameters")
    );
    let four: Vec<RoundSummary> = (1..=4)
        .map(|r| RoundSummary {
            round: r,
            ..history[0].clone()
        })
        .collect();
    assert!(
        resume(four, global.to_vec())
            .unwrap_err()
            .to_string()
            .contains("only 3")
    );
}

/// Completes round `round` with a, b and c (each updating and evaluating).
fn finish_round(h: &mut Harness, round: u64) {
    for id in ["a", "b", "c"] {
        h.update(id, round, 0.1, 10).unwrap();
    }
    for id in ["a", "b", "c"] {
        h.eval(id, round, 0.9).unwrap();
    }
}

#[test]
fn a_round_whose_commit_fails_is_held_and_no_round_builds_on_it_until_storage_works() {
    let mut h = Harness::new(config());
    h.failing = [2, 3].into(); // the second commit (round 2) fails twice
    for id in ["a", "b", "c"] {
        h.join(id);
    }
    finish_round(&mut h, 1);
    assert_eq!(
        h.o.training_round(),
        Some(2),
        "round 1 committed, round 2 started"
    );
    h.events();
    finish_round(&mut h, 2);
    // Round 2 completed but its commit failed: nothing starts, the status says why.
    let ev = h.events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::RoundCompleted { summary, .. } if summary.round == 2)),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::CommitFailed { round: 2, reason } if reason.contains("disk full"))),
        "{ev:?}"
    );
    assert!(
        !ev.iter().any(|e| matches!(e, Event::RoundStarted { .. })),
        "{ev:?}"
    );
    assert_eq!(h.o.awaiting_commit(), Some(2));
    assert_eq!(h.o.phase_name(), "paused: storage failure");
    assert!(h.o.commit_failure().unwrap().contains("disk full"));
    for id in ["a", "b", "c"] {
        assert_eq!(
            h.o.task_for(id),
            Task::Idle,
            "no work while the round is held"
        );
    }
    // Time passes; participants stay; the driver retries (and fails once more: no new event
    // for the same reason... the reason names the attempt, so one more event).
    h.pass(5);
    h.beat(&["a", "b", "c"]);
    assert_eq!(h.o.awaiting_commit(), Some(2));
    assert_eq!(h.o.training_round(), None);
    // Storage works again: round 2 is committed and round 3 starts from version 2.
    h.pass(5);
    let ev = h.events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::CommitRecovered { round: 2 })),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::RoundStarted {
                round: 3,
                attempt: 1,
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(h.o.global().0, 2);
    assert_eq!(h.commits, 4);
    finish_round(&mut h, 3);
    assert!(h.o.is_finished());
    assert!(
        h.events()
            .iter()
            .any(|e| matches!(e, Event::JobFinished { rounds: 3 }))
    );
}

#[test]
fn the_last_round_finishes_the_job_only_once_committed() {
    let mut h = Harness::new(config());
    h.failing = [3].into();
    for id in ["a", "b", "c"] {
        h.join(id);
    }
    for round in 1..=3 {
        finish_round(&mut h, round);
    }
    assert!(!h.o.is_finished(), "round 3 is not stored yet");
    assert!(
        !h.events()
            .iter()
            .any(|e| matches!(e, Event::JobFinished { .. }))
    );
    h.pass(1);
    assert!(h.o.is_finished());
    assert!(
        h.events()
            .iter()
            .any(|e| matches!(e, Event::JobFinished { rounds: 3 }))
    );
    // Reports for rounds the machine does not wait for change nothing.
    h.o.commit_failed(2, "late".into());
    h.o.committed(1, h.now);
    assert!(h.o.is_finished() && h.events().is_empty());
}

/// The participants selected for the first round when `n` join at once (the round starts
/// when the last one joins).
fn first_selection(cfg: JobConfig, n: usize) -> Vec<ParticipantId> {
    let mut h = Harness::new(cfg);
    for i in 0..n {
        let id = format!("p{i:02}");
        h.o.handle_join(&id, id.clone(), 1, h.now).unwrap();
    }
    h.events()
        .into_iter()
        .find_map(|e| match e {
            Event::RoundStarted { selected, .. } => Some(selected),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_count_of_clients_per_round_is_drawn_exactly() {
    let mut cfg = config();
    cfg.min_participants = 20;
    cfg.min_updates = 1;
    cfg.sampling = Sampling::Count(5);
    let picked = first_selection(cfg.clone(), 20);
    assert_eq!(picked.len(), 5);
    assert_eq!(first_selection(cfg.clone(), 20), picked, "seeded");
    cfg.seed += 1;
    assert_ne!(
        first_selection(cfg.clone(), 20),
        picked,
        "another seed, another draw"
    );
    // Never fewer than a round needs, never more than are there.
    cfg.min_updates = 7;
    assert_eq!(first_selection(cfg.clone(), 20).len(), 7);
    cfg.sampling = Sampling::Count(50);
    assert_eq!(first_selection(cfg.clone(), 20).len(), 20);
    cfg.sampling = Sampling::Count(0);
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("clients_per_round")
    );
}

#[test]
fn poisson_sampling_draws_each_participant_with_the_fraction() {
    let mut cfg = config();
    cfg.min_participants = 40;
    cfg.min_updates = 1;
    cfg.fraction = 0.25;
    cfg.sampling = Sampling::Poisson;
    let sizes: Vec<usize> = (0..40)
        .map(|seed| {
            let mut c = cfg.clone();
            c.seed = seed;
            first_selection(c, 40).len()
        })
        .collect();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    assert!(
        (mean - 10.0).abs() < 1.5,
        "mean round size {mean}, expected 40 × 0.25"
    );
    assert!(
        sizes.iter().min() != sizes.iter().max(),
        "the size varies: {sizes:?}"
    );
    // A draw smaller than a round needs is topped up.
    cfg.min_updates = 30;
    assert!(first_selection(cfg, 40).len() >= 30);
}

#[test]
fn a_plaintext_partial_sum_counts_as_its_participants_updates() {
    let contribution = |id: &str, weight: u64| Contribution {
        id: id.into(),
        weight,
        train: None,
        secure: None,
    };
    let mut h = Harness::new(config());
    for p in ["a", "b", "c"] {
        h.join(p);
    }
    let (_, g0) = h.o.global();
    // "a" and "b" (weights 10 and 30, updates 1 and 2) summed by an aggregator.
    let partial = |ids: &[(&str, u64)], sum: f64| PartialSum {
        round: 1,
        contributions: ids.iter().map(|(id, w)| contribution(id, *w)).collect(),
        values: PartialValues::Plain(vec![sum; P]),
    };
    // Non-finite sums, wrong lengths and strangers are refused whole.
    assert!(
        h.o.handle_partial_sum(partial(&[("a", 10), ("b", 30)], f64::NAN), h.now)
            .is_err()
    );
    let mut short = partial(&[("a", 10)], 10.0);
    short.values = PartialValues::Plain(vec![10.0; P - 1]);
    assert!(matches!(
        h.o.handle_partial_sum(short, h.now),
        Err(Rejection::ParameterCount { .. })
    ));
    assert!(matches!(
        h.o.handle_partial_sum(partial(&[("a", 10), ("nobody", 1)], 10.0), h.now),
        Err(Rejection::UnknownParticipant(_))
    ));
    assert!(matches!(h.o.phase, Phase::Training(ref t) if t.received.is_empty()));
    h.o.handle_partial_sum(partial(&[("a", 10), ("b", 30)], 70.0), h.now)
        .unwrap();
    assert_eq!(h.o.training_round(), Some(1), "still waiting for c");
    h.update("c", 1, -1.0, 60).unwrap();
    let (v, g1) = h.o.global();
    assert_eq!(v, 1);
    // What full_job_aggregates_weighted_mean_and_evaluates gets from three updates.
    let mean = (10.0 + 30.0 * 2.0 - 60.0) / 100.0;
    for (a, b) in g1.iter().zip(g0.iter()) {
        assert!((a - (b + mean)).abs() < 1e-6);
    }
}

#[test]
fn a_fraction_of_the_participants_evaluates_each_model() {
    let mut cfg = config();
    cfg.min_participants = 4;
    cfg.evaluate_fraction = 0.5;
    let mut h = Harness::new(cfg);
    for p in ["a", "b", "c", "d"] {
        h.join(p);
    }
    for p in ["a", "b", "c", "d"] {
        h.update(p, 1, 0.5, 10).unwrap();
    }
    let asked: Vec<&str> = ["a", "b", "c", "d"]
        .into_iter()
        .filter(|p| matches!(h.o.task_for(p), Task::Evaluate { .. }))
        .collect();
    assert_eq!(asked.len(), 2, "⌈4 × 0.5⌉ evaluate: {asked:?}");
    for p in &asked {
        h.eval(p, 1, 0.5).unwrap();
    }
    let done = h.completed();
    assert_eq!(
        done[0].evaluated_by, 2,
        "the round completes with the sample's answers"
    );
    let mut bad = config();
    bad.evaluate_fraction = 0.0;
    assert!(
        Orchestrator::new(bad, Box::new(FedAvg::default()), None, [1; 32])
            .unwrap_err()
            .to_string()
            .contains("evaluate_fraction")
    );
}
