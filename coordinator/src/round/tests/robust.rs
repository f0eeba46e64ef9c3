//! Robust strategies in the state machine, on a virtual clock: an attacker's update does not
//! move the model, and the combinations that cannot work are refused by name.

use super::*;
use crate::strategy::by_name;

/// One round of five participants, the last of them sending `attack` in every value; the
/// model version it produces.
fn one_round(strategy: &str, attack: f32) -> Vec<f32> {
    let cfg = JobConfig {
        rounds: 1,
        min_participants: 5,
        min_updates: 5,
        evaluate: false,
        ..config()
    };
    let mut o =
        Orchestrator::new(cfg, by_name(strategy, 1.0, 0.9).unwrap(), None, [2; 32]).unwrap();
    let now = Instant::now();
    let ids = ["a", "b", "c", "d", "e"];
    for id in ids {
        o.handle_join(id, format!("s-{id}"), 10, now).unwrap();
    }
    let honest = [0.10f32, 0.12, 0.08, 0.11];
    for (i, id) in ids.into_iter().enumerate() {
        let value = honest.get(i).copied().unwrap_or(attack);
        let u = Update {
            round: 1,
            delta: vec![value; 6],
            num_examples: 10,
            train: None,
        };
        o.handle_update(id, u, now).unwrap();
    }
    assert_eq!(o.awaiting_commit(), Some(1));
    o.committed(1, now);
    assert!(o.is_finished());
    let initial = config().model.initial_parameters(config().seed);
    o.global()
        .1
        .iter()
        .zip(&initial)
        .map(|(g, i)| g - i)
        .collect()
}

#[test]
fn robust_rules_keep_an_attacker_from_moving_the_model() {
    // FedAvg: the attacker drags every parameter by 100 / 5.
    let avg = one_round("fedavg", 100.0);
    assert!(
        avg.iter().all(|&d| (d - (0.41 + 100.0) / 5.0).abs() < 1e-4),
        "{avg:?}"
    );
    for (rule, want) in [
        ("median", 0.11f32),
        ("trimmed-mean", (0.10 + 0.11 + 0.12) / 3.0),
        ("krum", 0.11),
        ("multi-krum", 0.1025),
    ] {
        let moved = one_round(rule, 100.0);
        assert!(
            moved.iter().all(|&d| (d - want).abs() < 1e-5),
            "{rule}: {moved:?}, want {want}"
        );
        // However large the attack.
        assert_eq!(one_round(rule, 1e6), moved, "{rule}");
    }
}

#[test]
fn robust_rules_are_refused_where_they_cannot_see_the_updates() {
    let secure = JobConfig {
        secure: Some(SecureSettings::default()),
        ..config()
    };
    let e = Orchestrator::new(secure, by_name("median", 1.0, 0.9).unwrap(), None, [2; 32])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("strategy = \"median\"") && e.contains("secure_aggregation.enabled"),
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
        ..config()
    };
    let e = Orchestrator::new(private, by_name("krum", 1.0, 0.9).unwrap(), None, [2; 32])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("strategy = \"krum\"") && e.contains("[privacy]"),
        "{e}"
    );
    // FedProx needs its proximal term; any strategy may take one.
    let mu = |m: f64| JobConfig {
        train: TrainConfig {
            proximal_mu: m,
            momentum: 0.0,
            weight_decay: 0.0,
            ..config().train
        },
        ..config()
    };
    let e = mu(0.0)
        .check_strategy(by_name("fedprox", 1.0, 0.9).unwrap().as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("fedprox") && e.contains("proximal_mu"), "{e}");
    assert!(
        mu(0.01)
            .check_strategy(by_name("fedprox", 1.0, 0.9).unwrap().as_ref())
            .is_ok()
    );
    assert!(
        mu(0.01)
            .check_strategy(by_name("fedadam", 1.0, 0.9).unwrap().as_ref())
            .is_ok()
    );
    assert!(
        mu(0.0)
            .check_strategy(by_name("fedavg", 1.0, 0.9).unwrap().as_ref())
            .is_ok()
    );
    // Every mean-based strategy runs under secure aggregation.
    for name in ["fedavg", "fedavgm", "fedadam"] {
        let secure = JobConfig {
            secure: Some(SecureSettings::default()),
            ..config()
        };
        Orchestrator::new(secure, by_name(name, 0.1, 0.9).unwrap(), None, [2; 32]).unwrap();
    }
}
