//! Unit tests of the inference service: the A/B split, settings, hot reload, batching and
//! refusals, against a real registry in a temporary directory.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cohort_model::{ComputeDevice, InferenceModel, ModelSpec, Precision};
use cohort_storage::{ModelRef, ModelStore};

use super::*;
use crate::api::status;
use crate::deployment::{Rows, to_candidate};
use cohort_protocol::pb;

#[test]
fn the_candidate_share_is_exact_over_any_window() {
    for share in [0.05, 0.25, 0.5, 0.9] {
        let hits = (0..10_000u64).filter(|&k| to_candidate(k, share)).count();
        assert!(
            (hits as f64 - share * 10_000.0).abs() <= 2.0,
            "{share}: {hits}"
        );
        for start in [17u64, 5_000, 123_456] {
            let hits = (start..start + 100)
                .filter(|&k| to_candidate(k, share))
                .count();
            assert!(
                (hits as f64 - share * 100.0).abs() <= 3.0,
                "{share}: {hits}"
            );
        }
    }
}

#[test]
fn settings_are_checked_naming_the_key() {
    let bad = |f: &dyn Fn(&mut InferenceSettings)| {
        let mut s = InferenceSettings::default();
        f(&mut s);
        s.validate().unwrap_err()
    };
    assert_eq!(bad(&|s| s.max_batch = 0).key, "max_batch");
    assert!(
        bad(&|s| s.max_batch = 0)
            .to_string()
            .contains("inference.max_batch")
    );
    assert!(
        bad(&|s| s.queue = 4)
            .to_string()
            .contains("inference.queue (4)")
    );
    assert!(
        bad(&|s| s.max_wait_us = 5_000_000)
            .to_string()
            .contains("inference.max_wait_us")
    );
    let e = bad(&|s| {
        s.candidate = Some(Candidate {
            version: 1,
            share: 1.0,
        })
    });
    assert!(e.to_string().contains("inference.candidate.share"), "{e}");
    let e = toml::from_str::<InferenceSettings>("device = \"tpu\"").unwrap_err();
    assert!(e.to_string().contains("unknown variant `tpu`"), "{e}");
    let e = toml::from_str::<InferenceSettings>("max_batchh = 3").unwrap_err();
    assert!(e.to_string().contains("max_batchh"), "{e}");
}

/// A registry with versions 0 and 1 of a small CNN.
fn registry(dir: &std::path::Path) -> (ModelStore, ModelSpec) {
    let spec = ModelSpec::Cnn {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let store = ModelStore::open(dir).unwrap();
    for v in 0..2 {
        store
            .for_job("j")
            .write(
                "j",
                &spec,
                "fedavg",
                v,
                &spec.initial_parameters(v),
                None,
                0,
            )
            .unwrap();
    }
    (store, spec)
}

fn version(v: u64) -> ModelRef {
    ModelRef {
        job_id: "j".into(),
        version: v,
    }
}

fn settings(max_batch: usize, max_wait_us: u64, queue: usize) -> InferenceSettings {
    InferenceSettings {
        device: DeviceChoice::Cpu,
        max_batch,
        max_wait_us,
        queue,
        ..InferenceSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_resource_exhausted_and_answers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = registry(dir.path());
    let inf = Inference::new(store, settings(2, 0, 4), InferenceMetrics::new()).unwrap();
    inf.switch(&version(0)).unwrap();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let inf = inf.clone();
            tokio::spawn(async move {
                inf.run(Rows::Features(vec![0.5; 784]), 1)
                    .await
                    .map(|r| r.1.len())
                    .map_err(status)
            })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(n) => {
                assert_eq!(n, 10);
                ok += 1;
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("of 4 examples waiting"), "{s:?}");
                exhausted += 1;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert!(ok > 0 && exhausted > 0, "ok {ok}, exhausted {exhausted}");
    assert_eq!(inf.inner.queued.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_before_a_switch_is_answered_by_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let (store, spec) = registry(dir.path());
    // A batch waits up to 1 s for company: the request below sits in version 0's
    // queue while version 1 is loaded and swapped in.
    let inf = Inference::new(store, settings(64, 1_000_000, 64), InferenceMetrics::new()).unwrap();
    inf.switch(&version(0)).unwrap();
    let x: Vec<f32> = (0..784).map(|i| (i % 7) as f32 / 7.0).collect();
    let waiting = {
        let (inf, x) = (inf.clone(), x.clone());
        tokio::spawn(async move { inf.run(Rows::Features(x), 1).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let i2 = inf.clone();
    tokio::task::spawn_blocking(move || i2.switch(&version(1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inf.serving(), Some(version(1)));
    let (v, logits, _, _) = waiting.await.unwrap().unwrap();
    assert_eq!(v.model, version(0));
    let want = InferenceModel::load(
        &spec,
        &spec.initial_parameters(0),
        ComputeDevice::Cpu,
        Precision::F32,
    )
    .unwrap()
    .logits(&x, 1)
    .unwrap();
    assert_eq!(logits, want, "answered by version 0's weights");
    let (v, _, _, _) = inf.run(Rows::Features(x), 1).await.unwrap();
    assert_eq!(v.model, version(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_is_refused_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = registry(dir.path());
    let mut s = settings(8, 0, 64);
    s.caller_rate = 1.0;
    s.caller_burst = Some(5.0);
    let inf = Inference::new(store, s, InferenceMetrics::new()).unwrap();
    inf.switch(&version(0)).unwrap();
    // A burst of 5 examples, then nothing until the bucket refills (1 a second).
    inf.limit("app-1", 3).unwrap();
    inf.limit("app-1", 2).unwrap();
    let e = inf.limit("app-1", 1).unwrap_err();
    assert!(matches!(e, Refusal::OverRate { .. }), "{e:?}");
    let e = status(e);
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("app-1: over the limit of 1 examples per second"),
        "{e:?}"
    );
    // Another caller has its own bucket; a batch larger than the burst never passes.
    inf.limit("app-2", 5).unwrap();
    assert!(inf.limit("app-3", 6).is_err());
    let mut bad = settings(8, 0, 64);
    bad.caller_rate = -1.0;
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("inference.caller_rate")
    );
}

#[test]
fn a_missing_version_is_named_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = registry(dir.path());
    let m = InferenceMetrics::new();
    let inf = Inference::new(store, settings(4, 0, 8), m).unwrap();
    inf.switch(&version(0)).unwrap();
    let e = inf.switch(&version(9)).unwrap_err();
    assert!(matches!(e, ServingError::Read { version: 9, .. }), "{e:?}");
    assert!(e.to_string().contains("version 9 of job \"j\""), "{e}");
    assert_eq!(inf.serving(), Some(version(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_rows_need_a_version_with_a_pipeline_and_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = registry(dir.path());
    let inf = Inference::new(store, settings(4, 0, 64), InferenceMetrics::new()).unwrap();
    inf.switch(&version(1)).unwrap();
    let row: std::collections::BTreeMap<String, String> =
        [("age".to_string(), "40".to_string())].into();
    let Err(e) = inf.run(Rows::Raw(vec![row]), 1).await else {
        panic!("raw rows answered by a version without a pipeline");
    };
    let e = status(e);
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("takes prepared features, not raw rows"),
        "{}",
        e.message()
    );
    // A request mixing the two kinds is refused before any version is asked.
    let mixed = crate::api::rows_of(vec![
        pb::Example {
            features: vec![0.5; 784],
            ..Default::default()
        },
        pb::Example {
            raw: [("age".to_string(), "40".to_string())].into(),
            ..Default::default()
        },
    ])
    .err()
    .unwrap();
    assert!(
        mixed.message().contains("either features or raw"),
        "{mixed}"
    );
}
