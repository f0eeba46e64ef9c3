//! Server strategies in the state machine, on a virtual clock. Each round's model is the
//! strategy's rule applied to that round's example-weighted mean, with a straggler left out;
//! the strategy's state travels in `RoundCompleted`, and a job resumed from it continues
//! exactly as one that never stopped. SCAFFOLD's tasks carry the server's control variate,
//! and its updates must carry the control variates' changes.

use super::*;
use crate::strategy::{RoundContext, by_name};

const IDS: [&str; 4] = ["a", "b", "c", "d"];
const ROUNDS: u64 = 4;

fn job(control_variates: bool) -> JobConfig {
    JobConfig {
        rounds: ROUNDS,
        min_participants: 4,
        min_updates: 3,
        evaluate: false,
        control_variates,
        ..config()
    }
}

fn examples(id: &str) -> u64 {
    10 * (IDS.iter().position(|x| *x == id).unwrap() as u64 + 1)
}

/// Participant `id`'s update in `round`: `len` values, different for every one of them.
fn delta(id: &str, round: u64, len: usize) -> Vec<f32> {
    let k = IDS.iter().position(|x| *x == id).unwrap() as f32;
    (0..len)
        .map(|i| 0.05 * (i as f32 - 2.5) + 0.1 * k - 0.07 * round as f32 + 0.01 * k * i as f32)
        .collect()
}

fn harness(o: Orchestrator, now: Instant) -> Harness {
    Harness {
        o,
        start: now,
        now,
        commits: 0,
        failing: BTreeSet::new(),
    }
}

/// Plays round `round`: everyone sends, except `d` in round 2, which straggles past the
/// deadline. Returns the senders.
fn play(h: &mut Harness, round: u64, len: usize) -> Vec<&'static str> {
    let senders: Vec<&str> = IDS
        .into_iter()
        .filter(|id| !(round == 2 && *id == "d"))
        .collect();
    for id in &senders {
        let u = Update {
            round,
            delta: delta(id, round, len),
            num_examples: examples(id),
            train: None,
        };
        h.o.handle_update(id, u, h.now).unwrap();
        h.commit();
    }
    if senders.len() < IDS.len() {
        // The others stay alive (they poll) while the deadline passes.
        for _ in 0..3 {
            h.beat(&IDS);
            h.pass(11);
        }
    }
    senders
}

/// What the strategy gives, applied by hand to each round's weighted mean of its senders'
/// updates, folded in order as the machine folds them.
fn expected(strategy: &str, len: usize) -> Vec<Vec<f32>> {
    let mut s = by_name(strategy, 0.1, 0.9).unwrap();
    s.initialise(P);
    let mut global = config().model.initial_parameters(config().seed);
    let mut out = Vec::new();
    for round in 1..=ROUNDS {
        let senders: Vec<&str> = IDS
            .into_iter()
            .filter(|id| !(round == 2 && *id == "d"))
            .collect();
        let mut acc = vec![0f64; len];
        let mut weight = 0u64;
        for id in &senders {
            let w = examples(id);
            for (a, d) in acc.iter_mut().zip(delta(id, round, len)) {
                *a += w as f64 * d as f64;
            }
            weight += w;
        }
        let mean: Vec<f32> = acc.iter().map(|a| (a / weight as f64) as f32).collect();
        let ctx = RoundContext {
            round,
            contributors: senders.len(),
            population: IDS.len(),
        };
        global = s.apply(&global, &mean, &ctx);
        out.push(global.clone());
    }
    out
}

/// Runs the job; with `restart_after`, the coordinator stops after that round and a new
/// one resumes from the stored history, model and strategy state. Each round's model, and
/// SCAFFOLD's control variate as each round's tasks carried it.
fn run(strategy: &str, len: usize, restart_after: Option<u64>) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let cfg = job(strategy == "scaffold");
    let now = Instant::now();
    let o = Orchestrator::new(
        cfg.clone(),
        by_name(strategy, 0.1, 0.9).unwrap(),
        None,
        [3; 32],
    );
    let mut h = harness(o.unwrap(), now);
    for id in IDS {
        h.o.handle_join(id, format!("s-{id}"), examples(id), h.now)
            .unwrap();
    }
    let (mut models, mut controls) = (Vec::new(), Vec::new());
    let mut state = None;
    for round in 1..=ROUNDS {
        if let Task::Train {
            control, round: r, ..
        } = h.o.task_for("a")
        {
            assert_eq!(r, round);
            assert_eq!(control.is_some(), strategy == "scaffold", "{strategy}");
            controls.extend(control.map(|c| c.to_vec()));
        } else {
            panic!("{strategy}: no training task in round {round}");
        }
        play(&mut h, round, len);
        for e in h.events() {
            if let Event::RoundCompleted {
                params,
                strategy_state,
                ..
            } = e
            {
                models.push(params.to_vec());
                state = strategy_state;
            }
        }
        assert_eq!(
            models.len() as u64,
            round,
            "{strategy}: round {round} completed"
        );
        if restart_after == Some(round) {
            let mut s = by_name(strategy, 0.1, 0.9).unwrap();
            s.initialise(P);
            let mut o = Orchestrator::resume(
                cfg.clone(),
                s,
                None,
                h.o.history().to_vec(),
                h.o.global().1.to_vec(),
                2,
                [4; 32],
            )
            .unwrap();
            if let Some(st) = &state {
                o.restore_strategy_state(st).unwrap();
            }
            h = harness(o, h.now);
            for id in IDS {
                h.o.handle_join(id, format!("s2-{id}"), examples(id), h.now)
                    .unwrap();
            }
        }
    }
    assert!(h.o.is_finished());
    (models, controls)
}

#[test]
fn each_strategy_applies_its_rule_to_each_rounds_weighted_mean() {
    for strategy in [
        "fedavg",
        "fedavgm",
        "fedadagrad",
        "fedadam",
        "fedyogi",
        "scaffold",
    ] {
        let len = if strategy == "scaffold" { 2 * P } else { P };
        let (models, _) = run(strategy, len, None);
        assert_eq!(models, expected(strategy, len), "{strategy}");
        // A restart after round 2 changes nothing.
        let (resumed, _) = run(strategy, len, Some(2));
        assert_eq!(resumed, models, "{strategy}: resumed after round 2");
    }
}

#[test]
fn scaffold_tasks_carry_the_control_variate_and_its_updates_the_changes() {
    let (_, controls) = run("scaffold", 2 * P, None);
    // Zeros in round 1; then c += |S|/N · mean Δc (3 of 4 sent in round 2).
    assert_eq!(controls[0], vec![0.0; P]);
    let mut s = by_name("scaffold", 0.1, 0.9).unwrap();
    s.initialise(P);
    let global = vec![0.0; P];
    let mean = |round: u64, senders: &[&str]| -> Vec<f32> {
        let mut acc = [0f64; 2 * P];
        let mut w = 0u64;
        for id in senders {
            for (a, d) in acc.iter_mut().zip(delta(id, round, 2 * P)) {
                *a += examples(id) as f64 * d as f64;
            }
            w += examples(id);
        }
        acc.iter().map(|a| (a / w as f64) as f32).collect()
    };
    s.apply(&global, &mean(1, &IDS), &RoundContext::full(1, 4));
    assert_eq!(controls[1], *s.control_variate().unwrap());
    let ctx = RoundContext {
        round: 2,
        contributors: 3,
        population: 4,
    };
    s.apply(&global, &mean(2, &IDS[..3]), &ctx);
    assert_eq!(controls[2], *s.control_variate().unwrap());
    assert_ne!(controls[2], controls[1]);

    // An update without the control variate's change is refused by its length.
    let now = Instant::now();
    let o = Orchestrator::new(
        job(true),
        by_name("scaffold", 1.0, 0.9).unwrap(),
        None,
        [3; 32],
    );
    let mut h = harness(o.unwrap(), now);
    for id in IDS {
        h.o.handle_join(id, format!("s-{id}"), 10, now).unwrap();
    }
    let short = Update {
        round: 1,
        delta: vec![0.1; P],
        num_examples: 10,
        train: None,
    };
    assert_eq!(
        h.o.handle_update("a", short, now),
        Err(Rejection::ParameterCount {
            expected: 2 * P,
            got: P
        })
    );
}

#[test]
fn scaffold_and_its_job_must_agree_and_it_refuses_privacy() {
    let e = Orchestrator::new(
        job(false),
        by_name("scaffold", 1.0, 0.9).unwrap(),
        None,
        [3; 32],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("scaffold") && e.contains("control_variates"),
        "{e}"
    );
    let e = Orchestrator::new(
        job(true),
        by_name("fedavg", 1.0, 0.9).unwrap(),
        None,
        [3; 32],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("fedavg") && e.contains("control_variates = true"),
        "{e}"
    );
    let private = JobConfig {
        clip_norm: Some(1.0),
        privacy: Some(crate::privacy::PrivacySettings {
            mechanism: crate::privacy::Mechanism::Central,
            noise_multiplier: 1.0,
            delta: 1e-5,
            target_epsilon: None,
        }),
        ..job(true)
    };
    let e = Orchestrator::new(
        private,
        by_name("scaffold", 1.0, 0.9).unwrap(),
        None,
        [3; 32],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("scaffold") && e.contains("[privacy]"), "{e}");
}
