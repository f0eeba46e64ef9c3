//! Differential privacy in the state machine, on a virtual clock: equal weights, central
//! noise of the configured size, each round accounted, the budget stop, and a resumed job's
//! spending.

use super::super::tests::config;
use super::*;
use crate::privacy::PrivacySettings;
use crate::strategy::FedAvg;

const P: usize = 6;

fn private(mechanism: Mechanism, target_epsilon: Option<f64>) -> JobConfig {
    JobConfig {
        clip_norm: Some(1.0),
        privacy: Some(PrivacySettings {
            mechanism,
            noise_multiplier: 1.5,
            delta: 1e-5,
            target_epsilon,
        }),
        evaluate: false,
        ..config()
    }
}

/// Runs rounds with a, b and c sending `delta` (weights 10, 20 and 30 examples) until the
/// job finishes; returns the events.
fn run(o: &mut Orchestrator, delta: [f32; 3]) -> Vec<Event> {
    let now = Instant::now();
    for id in ["a", "b", "c"] {
        o.handle_join(id, format!("s-{id}"), 10, now).unwrap();
    }
    let mut events = Vec::new();
    while !o.is_finished() {
        let Some(round) = o.training_round() else {
            panic!("no round under way: {events:?}")
        };
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let u = Update {
                round,
                delta: vec![delta[i]; P],
                num_examples: 10 * (i as u64 + 1),
                train: None,
            };
            o.handle_update(id, u, now).unwrap();
        }
        events.extend(std::iter::from_fn(|| o.poll_event()));
        if let Some(r) = o.awaiting_commit() {
            o.committed(r, now);
        }
        events.extend(std::iter::from_fn(|| o.poll_event()));
    }
    events
}

fn summaries(events: &[Event]) -> Vec<RoundSummary> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RoundCompleted { summary, .. } => Some(summary.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn central_noise_is_added_to_the_unweighted_mean_and_accounted() {
    let mut o = Orchestrator::new(
        private(Mechanism::Central, None),
        Box::new(FedAvg::default()),
        None,
        [3; 32],
    )
    .unwrap();
    let events = run(&mut o, [0.3, 0.6, 0.9]);
    let rounds = summaries(&events);
    assert_eq!(rounds.len(), 3);
    // Equal weights: the weight of a round is its participants, not their examples.
    assert!(rounds.iter().all(|s| s.total_examples == 3));
    // Each round's ε is that of the Gaussian mechanism at z = 1.5, q = 1, composed.
    for (k, s) in rounds.iter().enumerate() {
        let p = s.privacy.unwrap();
        assert_eq!(
            (p.sampling_rate, p.noise_multiplier, p.delta),
            (1.0, 1.5, 1e-5)
        );
        let mut a = Accountant::default();
        a.compose_gaussian(1.0, 1.5, k as u64 + 1);
        assert_eq!(p.epsilon, a.epsilon(1e-5).0);
    }
    assert_eq!(
        o.epsilon(),
        Some((rounds[2].privacy.unwrap().epsilon, 1e-5))
    );
    // The model moved by three unweighted means (0.6 each) plus noise of standard deviation
    // z·C/n = 0.5 per round: 18 noise draws (6 values, 3 rounds) have a sample deviation
    // near √3 · 0.5.
    let (_, global) = o.global();
    let initial = config().model.initial_parameters(config().seed);
    let noise: Vec<f64> = global
        .iter()
        .zip(&initial)
        .map(|(g, i)| (g - i - 1.8) as f64)
        .collect();
    let sd = (noise.iter().map(|x| x * x).sum::<f64>() / noise.len() as f64).sqrt();
    assert!(
        (0.4..1.4).contains(&sd),
        "noise deviation {sd}, expected about 0.87"
    );
    // Keyed by the machine's secret: the same entropy gives the same noise, another does not.
    let mut again = Orchestrator::new(
        private(Mechanism::Central, None),
        Box::new(FedAvg::default()),
        None,
        [3; 32],
    )
    .unwrap();
    run(&mut again, [0.3, 0.6, 0.9]);
    assert_eq!(again.global().1, global);
    let mut other = Orchestrator::new(
        private(Mechanism::Central, None),
        Box::new(FedAvg::default()),
        None,
        [4; 32],
    )
    .unwrap();
    run(&mut other, [0.3, 0.6, 0.9]);
    assert_ne!(other.global().1, global);
}

#[test]
fn the_job_stops_before_a_round_that_would_exceed_its_budget() {
    // Two rounds at z = 1.5, q = 1 cost less than ε = 5, three more.
    let eps = |t| {
        let mut a = Accountant::default();
        a.compose_gaussian(1.0, 1.5, t);
        a.epsilon(1e-5).0
    };
    assert!(eps(2) < 5.0 && eps(3) > 5.0, "{} {}", eps(2), eps(3));
    let cfg = private(Mechanism::Central, Some(5.0));
    let mut o = Orchestrator::new(cfg.clone(), Box::new(FedAvg::default()), None, [3; 32]).unwrap();
    let events = run(&mut o, [0.1, 0.1, 0.1]);
    assert_eq!(summaries(&events).len(), 2);
    let spent = events
        .iter()
        .find_map(|e| match e {
            Event::PrivacyBudgetSpent {
                round,
                epsilon,
                next,
                target,
            } => Some((*round, *epsilon, *next, *target)),
            _ => None,
        })
        .expect("the budget stop is reported");
    assert_eq!(spent, (3, eps(2), eps(3), 5.0));
    assert!(events.contains(&Event::JobFinished { rounds: 2 }));
    assert_eq!(o.task_for("a"), Task::Finished);
    // A coordinator restarted after round 2 replays what was spent, and stops the same way.
    let history = o.history().to_vec();
    let mut resumed = Orchestrator::resume(
        cfg,
        Box::new(FedAvg::default()),
        None,
        history,
        o.global().1.to_vec(),
        1,
        [5; 32],
    )
    .unwrap();
    assert_eq!(resumed.epsilon(), Some((eps(2), 1e-5)));
    let now = Instant::now();
    for id in ["a", "b", "c"] {
        resumed.handle_join(id, format!("s-{id}"), 10, now).unwrap();
    }
    assert!(resumed.is_finished());
    let again: Vec<Event> = std::iter::from_fn(|| resumed.poll_event()).collect();
    assert!(
        again
            .iter()
            .any(|e| matches!(e, Event::PrivacyBudgetSpent { round: 3, .. }))
    );
}

#[test]
fn privacy_settings_that_cannot_work_are_refused_by_name() {
    let no_clip = JobConfig {
        clip_norm: None,
        ..private(Mechanism::Central, None)
    };
    let e = no_clip.validate().unwrap_err().to_string();
    assert!(e.contains("privacy needs clip_norm"), "{e}");
    // Distributed noise lives inside secure aggregation: this job has none.
    let e = private(Mechanism::Distributed, None)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mechanism = \"distributed\"") && e.contains("secure_aggregation.enabled"),
        "{e}"
    );
    let mut secure = private(Mechanism::Distributed, None);
    secure.secure = Some(SecureSettings::default());
    secure.validate().unwrap();
    // The participants' noise is sized so that T_min of them carry z · C′.
    let sd = secure.participant_noise(1.0).unwrap();
    let c = cohort_crypto::dp::encoded_sensitivity(1.0, P, &cohort_crypto::Codec::default());
    assert!((sd - 1.5 * c / 2f64.sqrt()).abs() < 1e-12);
    let z = secure.accounted_noise_multiplier(1.0).unwrap();
    assert!((z - 1.5).abs() < 1e-9, "{z}");
    secure.clip_norm = Some(40.0);
    let e = secure.validate().unwrap_err().to_string();
    assert!(
        e.contains("clip_norm 40 is above the codec's per-value bound 32"),
        "{e}"
    );
    let mut bad = private(Mechanism::Central, Some(-1.0));
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("target_epsilon")
    );
    bad.privacy = Some(PrivacySettings {
        delta: 1.0,
        ..bad.privacy.unwrap()
    });
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("privacy.delta")
    );
}

/// Adaptive clipping: each participant appends its indicator; the state machine takes the
/// indicators' mean off the update, moves the clip norm geometrically towards the target
/// quantile, tells the next round's participants, and a restarted coordinator goes on from
/// the stored clip norm.
#[test]
fn adaptive_clipping_moves_the_clip_norm_from_the_summed_indicators() {
    let cfg = JobConfig {
        clip_norm: Some(2.0),
        adaptive_clipping: Some(crate::privacy::AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.2,
        }),
        evaluate: false,
        rounds: 2,
        ..config()
    };
    assert_eq!(cfg.training_len(), P + 1);
    assert_eq!(
        cfg.indicator_scale(2.0),
        Some(1.0),
        "exact counts without DP"
    );
    let mut o = Orchestrator::new(cfg.clone(), Box::new(FedAvg::default()), None, [3; 32]).unwrap();
    let now = Instant::now();
    for id in ["a", "b", "c"] {
        o.handle_join(id, format!("s-{id}"), 10, now).unwrap();
    }
    let Task::Train {
        clip_norm,
        clip_indicator,
        ..
    } = o.task_for("a")
    else {
        panic!("a trains")
    };
    assert_eq!((clip_norm, clip_indicator), (Some(2.0), Some(1.0)));
    // a and b were within the clip norm, c was clipped: b̄ = 2/3.
    for (id, within) in [("a", 1.0f32), ("b", 1.0), ("c", 0.0)] {
        let mut delta = vec![0.3f32; P];
        delta.push(within);
        let u = Update {
            round: 1,
            delta,
            num_examples: 10,
            train: None,
        };
        o.handle_update(id, u, now).unwrap();
    }
    let events: Vec<Event> = std::iter::from_fn(|| o.poll_event()).collect();
    let summary = summaries(&events).remove(0);
    let c = summary.clipping.unwrap();
    let want = 2.0 * (-0.2f64 * (2.0 / 3.0 - 0.5)).exp();
    assert_eq!(c.clip_norm, 2.0);
    assert!((c.unclipped_share - 2.0 / 3.0).abs() < 1e-6);
    assert!((c.next_clip_norm - want).abs() < 1e-6);
    // The model moved by the update's mean only, the indicator not applied to it.
    let initial = config().model.initial_parameters(config().seed);
    let moved: Vec<f32> = o
        .global()
        .1
        .iter()
        .zip(&initial)
        .map(|(g, i)| g - i)
        .collect();
    assert_eq!(moved.len(), P);
    assert!(moved.iter().all(|d| (d - 0.3).abs() < 1e-6), "{moved:?}");
    o.committed(1, now);
    let Task::Train { clip_norm, .. } = o.task_for("a") else {
        panic!("a trains round 2")
    };
    assert_eq!(clip_norm, Some(c.next_clip_norm));
    // A participant that leaves the indicator out sends the wrong length.
    assert_eq!(
        o.check_update("a", 2, P).unwrap_err(),
        Rejection::ParameterCount {
            expected: P + 1,
            got: P
        }
    );
    // Restarted after round 1: round 2 clips at the stored norm.
    let resumed = Orchestrator::resume(
        cfg,
        Box::new(FedAvg::default()),
        None,
        o.history().to_vec(),
        o.global().1.to_vec(),
        1,
        [5; 32],
    )
    .unwrap();
    let mut resumed = resumed;
    for id in ["a", "b", "c"] {
        resumed.handle_join(id, format!("s-{id}"), 10, now).unwrap();
    }
    let Task::Train { clip_norm, .. } = resumed.task_for("a") else {
        panic!("a trains round 2 after the restart")
    };
    assert_eq!(clip_norm, Some(c.next_clip_norm));
}
