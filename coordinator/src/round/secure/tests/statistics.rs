//! Round 0 through secure aggregation: each site's statistics encrypted with weight 1, the
//! committee decrypting only their sum.

use super::super::super::statistics::tests::{SITES, site_stats, spec};
use super::*;

#[test]
fn a_secure_round_zero_decrypts_exactly_the_federations_statistics() {
    let spec = spec();
    let mut config = config(3);
    config.model = ModelSpec::Logistic {
        inputs: spec.width(),
        classes: 2,
    };
    config.data = Some(spec.clone());
    config.min_participants = 3;
    let ids = ["site0", "site1", "site2"];
    let mut h = Harness::with_config(config, &ids);
    let mut want = site_stats(&spec, 0);
    for i in 1..SITES.len() {
        want.add(&site_stats(&spec, i));
    }
    for (i, id) in ids.iter().enumerate() {
        let Task::Statistics {
            secure: Some(info), ..
        } = h.o.task_for(id)
        else {
            panic!("{id}: {:?}", h.o.task_for(id));
        };
        assert_eq!(info.round, 0);
        // Every site's weight is 1, whatever its rows.
        assert_eq!(info.weight_for(1_000_000), 1);
        let values =
            h.o.statistics_digits()
                .encode(&site_stats(&spec, i).to_values(), &info.codec)
                .unwrap();
        let node = h.nodes.get_mut(*id).unwrap();
        let p = aggregation::protect(
            &info,
            id,
            &node.sign,
            &mut node.seeds,
            &values,
            1,
            &mut h.rng,
        )
        .unwrap();
        assert_eq!(p.weight, 1);
        let u = SecureUpdate {
            round: 0,
            weight: p.weight,
            bodies_sha256: p.bodies_sha256,
            bodies: p.bodies,
            pieces: p.pieces,
            signature: p.signature,
            train: None,
        };
        h.o.handle_secure_update(id, u, h.now).unwrap();
    }
    assert_eq!(h.o.phase_name(), "decrypting");
    for id in h.round_info_committee() {
        if let Some(r) = h.answer(&id) {
            r.unwrap();
        }
    }
    let stats = h
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::StatisticsCompleted { statistics, .. } => Some(statistics),
            _ => None,
        })
        .expect("round 0 completes");
    assert_eq!(stats.stats, want, "exact sums through GLWE");
    assert_eq!(stats.sites, 3);
    h.o.committed(0, h.now);
    assert!(
        matches!(h.o.task_for("site0"), Task::Train { round: 1, .. }),
        "{:?}",
        h.o.task_for("site0")
    );
}
