//! Round 0 in plaintext jobs: what a site sends, what is refused, the sums' exactness, the
//! commit before round 1, a federation no pipeline fits, and a resumed job.

use std::path::Path;
use std::time::{Duration, Instant};

use cohort_model::tabular::{DataSpec, PipelineOptions, Schema, Table, TableStats};
use cohort_model::{LabelColumn, ModelSpec};

use super::super::*;
use crate::strategy::FedAvg;

/// Three sites' tables: ages (one missing), a stage category (one unseen value), a yes/no
/// column, and the label. Their sums are known (see the test).
pub(crate) const SITES: [&str; 3] = [
    "age,stage,smoker,status\n50,I,yes,0\nNA,II,no,1\n70.25,III,,1\n",
    "age,stage,smoker,status\n40,I,no,1\n60,IV,yes,0\n",
    "age,stage,smoker,status\n30.5,II,yes,0\n",
];

pub(crate) fn spec() -> DataSpec {
    let schema = Schema::infer(
        SITES[0],
        Path::new("site0.csv"),
        &LabelColumn::Name("status".into()),
    )
    .unwrap();
    DataSpec {
        schema,
        options: PipelineOptions::default(),
    }
}

/// Site `i`'s statistics.
pub(crate) fn site_stats(spec: &DataSpec, i: usize) -> TableStats {
    TableStats::of(&Table::parse(SITES[i], Path::new("site.csv"), &spec.schema).unwrap())
}

fn job() -> JobConfig {
    let spec = spec();
    JobConfig {
        job_id: "tables".into(),
        // age, stage (I, II, III), smoker: 5 features.
        model: ModelSpec::Logistic {
            inputs: spec.width(),
            classes: 2,
        },
        rounds: 2,
        // Training samples a third; round 0 asks everyone.
        fraction: 0.34,
        evaluate: false,
        liveness_timeout: Duration::from_secs(600),
        seed: 5,
        data: Some(spec),
        ..super::super::tests::config()
    }
}

fn start(config: JobConfig) -> (Orchestrator, Instant) {
    let now = Instant::now();
    let mut o = Orchestrator::new(config, Box::new(FedAvg::default()), None, [2; 32]).unwrap();
    for i in 0..3 {
        o.handle_join(&format!("site{i}"), format!("s{i}"), 3, now)
            .unwrap();
    }
    (o, now)
}

/// What site `i` sends in round 0: its statistics' digits, weight 1.
fn statistics_update(o: &Orchestrator, i: usize) -> Update {
    let stats = site_stats(o.data_spec().unwrap(), i);
    let codec = o.statistics_codec();
    Update {
        round: 0,
        delta: o
            .statistics_digits()
            .encode(&stats.to_values(), &codec)
            .unwrap(),
        num_examples: 1,
        train: None,
    }
}

#[test]
fn round_zero_sums_every_sites_statistics_exactly_before_round_one() {
    let (mut o, now) = start(job());
    // Everyone online is asked, whatever the training fraction.
    for i in 0..3 {
        assert!(
            matches!(
                o.task_for(&format!("site{i}")),
                Task::Statistics { secure: None, .. }
            ),
            "{:?}",
            o.task_for(&format!("site{i}"))
        );
    }
    // A weight other than 1, and values that are not the codec's digits, are refused.
    let mut u = statistics_update(&o, 0);
    u.num_examples = 3;
    let e = o.handle_update("site0", u, now).unwrap_err().to_string();
    assert!(e.contains("weight 1, not 3"), "{e}");
    let mut u = statistics_update(&o, 0);
    u.delta[4] = 0.3;
    let e = o.handle_update("site0", u, now).unwrap_err().to_string();
    assert!(e.contains("statistics value 4"), "{e}");
    let mut u = statistics_update(&o, 0);
    u.delta.pop();
    let e = o.handle_update("site0", u, now).unwrap_err();
    assert!(matches!(e, Rejection::ParameterCount { .. }), "{e}");
    for i in 0..3 {
        o.handle_update(&format!("site{i}"), statistics_update(&o, i), now)
            .unwrap();
    }
    let events: Vec<Event> = std::iter::from_fn(|| o.poll_event()).collect();
    let stats = events
        .iter()
        .find_map(|e| match e {
            Event::StatisticsCompleted {
                statistics,
                participants,
                ..
            } => {
                assert_eq!(participants.len(), 3);
                Some(statistics.clone())
            }
            _ => None,
        })
        .expect("round 0 completes");
    // The sums, exactly: 6 rows; ages 50 + 70.25 + 40 + 60 + 30.5 over 5 present, one
    // missing; stages I ×2, II ×2, III ×1, one unknown (IV); smokers 3 yes of 5.
    let mut want = site_stats(o.data_spec().unwrap(), 0);
    want.add(&site_stats(o.data_spec().unwrap(), 1));
    want.add(&site_stats(o.data_spec().unwrap(), 2));
    assert_eq!(stats.stats, want);
    assert_eq!(stats.stats.rows, 6.0);
    assert_eq!(stats.sites, 3);
    let ages = match &stats.stats.columns[0] {
        cohort_model::tabular::ColumnStats::Numeric(n) => n.clone(),
        c => panic!("{c:?}"),
    };
    assert_eq!((ages.count, ages.sum, ages.missing), (5.0, 250.75, 1.0));
    assert_eq!(
        ages.sum_sq,
        50.0f64.powi(2) + 70.25f64.powi(2) + 40.0f64.powi(2) + 60.0f64.powi(2) + 30.5f64.powi(2)
    );
    assert_eq!(stats.pipeline.width(), 5);
    // Nothing starts before round 0 is committed.
    assert_eq!(o.awaiting_commit(), Some(0));
    assert!(matches!(o.task_for("site0"), Task::Idle));
    o.committed(0, now);
    assert_eq!(o.training_round(), Some(1));
    assert_eq!(o.statistics().unwrap().stats, want);
}

#[test]
fn statistics_no_pipeline_fits_stop_the_job_saying_why() {
    let (mut o, now) = start(job());
    // Every site says it has no age at all.
    for i in 0..3 {
        let mut stats = site_stats(o.data_spec().unwrap(), i);
        if let cohort_model::tabular::ColumnStats::Numeric(n) = &mut stats.columns[0] {
            n.missing += n.count;
            (n.count, n.sum, n.sum_sq) = (0.0, 0.0, 0.0);
        }
        let codec = o.statistics_codec();
        let delta = o
            .statistics_digits()
            .encode(&stats.to_values(), &codec)
            .unwrap();
        let u = Update {
            round: 0,
            delta,
            num_examples: 1,
            train: None,
        };
        o.handle_update(&format!("site{i}"), u, now).unwrap();
    }
    let events: Vec<Event> = std::iter::from_fn(|| o.poll_event()).collect();
    let reason = events
        .iter()
        .find_map(|e| match e {
            Event::JobFailed { reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("the job fails");
    assert!(reason.contains("\"age\" has no value anywhere"), "{reason}");
    assert!(o.is_finished());
    assert_eq!(o.phase_name(), "failed");
    assert_eq!(o.failure(), Some(reason.as_str()));
}

#[test]
fn a_resumed_job_with_stored_statistics_skips_round_zero() {
    let spec = spec();
    let mut want = site_stats(&spec, 0);
    want.add(&site_stats(&spec, 1));
    let now = Instant::now();
    let mut o = Orchestrator::resume(
        job(),
        Box::new(FedAvg::default()),
        None,
        Vec::new(),
        job().model.initial_parameters(5),
        1,
        [4; 32],
    )
    .unwrap();
    assert_eq!(o.current_round(), 0, "nothing stored: round 0 again");
    o.restore_statistics(&want, 2, now).unwrap();
    assert_eq!(o.current_round(), 1);
    assert_eq!(o.statistics().unwrap().stats, want);
    for i in 0..3 {
        o.handle_join(&format!("site{i}"), format!("s{i}"), 3, now)
            .unwrap();
    }
    assert!(matches!(o.task_for("site0"), Task::Train { round: 1, .. }));
}

#[test]
fn a_job_whose_model_does_not_fit_its_tables_is_refused() {
    let mut bad = job();
    bad.model = ModelSpec::Logistic {
        inputs: 4,
        classes: 2,
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("gives 5 features a row"), "{e}");
}
