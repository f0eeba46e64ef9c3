//! The soak bench (`benches/soak.rs`) run as its command runs, shortened: one real
//! coordinator process, jobs one after another under secure aggregation, participants
//! joining and leaving at random and an admin acting meanwhile, with `[retention]` on. What
//! retention bounds is checked exactly; memory flatness is the bench's figure, not a test's.

use clap::Parser;

#[path = "../benches/soak.rs"]
#[allow(dead_code)]
mod soak;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_long_run_keeps_only_what_retention_allows() {
    let args = soak::Args::parse_from([
        "soak",
        "--rounds",
        "120",
        "--rounds-per-job",
        "40",
        "--participants",
        "8",
        "--per-round",
        "4",
        "--sample-every",
        "40",
        "--online-secs",
        "2",
        "--offline-secs",
        "0.5",
        "--admin-every-ms",
        "200",
        "--keep-versions",
        "3",
        "--keep-rounds",
        "4",
        "--keep-audit",
        "15",
        "--timeout",
        "400",
    ]);
    let r = soak::run(args).await.unwrap();
    assert_eq!((r.rounds, r.jobs), (120, 3), "{r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.leaves > 0, "participants left and came back: {r:?}");
    assert!(r.admin_actions > 10, "{r:?}");
    let (versions, rounds, audit) = (3, 4, 15);
    // Each job keeps its newest `versions`; the serving history keeps its newest `versions`
    // promotions, whose versions stay whatever their age. Each of the 3 jobs wrote 41.
    let kept = r.model_versions_kept as u64;
    assert!(
        (3 * versions..=3 * versions + versions).contains(&kept),
        "{kept} versions kept: {r:?}"
    );
    assert_eq!(r.finished_job_rounds_kept as u64, rounds, "{r:?}");
    assert_eq!(r.audit_entries_kept as u64, audit, "{r:?}");
    // Weights no kept version names are gone: at most one object a kept version.
    assert!(r.weights_objects <= r.model_versions_kept, "{r:?}");
    let first = &r.samples[0];
    let last = r.samples.last().unwrap();
    assert!(last.state_bytes > 0 && first.registry_files > 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retention_every_version_and_round_is_kept() {
    let args = soak::Args::parse_from([
        "soak",
        "--rounds",
        "30",
        "--rounds-per-job",
        "15",
        "--participants",
        "6",
        "--per-round",
        "4",
        "--sample-every",
        "15",
        "--admin-every-ms",
        "200",
        "--no-retention",
        "--timeout",
        "300",
    ]);
    let r = soak::run(args).await.unwrap();
    assert_eq!((r.rounds, r.jobs, r.errors), (30, 2, 0), "{r:?}");
    // Each job's initial model and one version a round.
    assert_eq!(r.model_versions_kept, 2 * 16, "{r:?}");
    assert_eq!(r.finished_job_rounds_kept, 15, "{r:?}");
}
