//! The coordinator load generator (`benches/federation_load.rs`) run as its command runs,
//! with a small federation: every participant its own certificate and mutual-TLS connection
//! to a real coordinator process, secure rounds, figures read from /proc and the Admin API.

use clap::Parser;

#[path = "../benches/federation_load.rs"]
#[allow(dead_code)]
mod federation_load;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_runs_secure_rounds_over_a_connection_per_participant() {
    let args = federation_load::Args::parse_from([
        "federation_load",
        "--participants",
        "30",
        "--per-round",
        "10",
        "--rounds",
        "3",
        "--committee",
        "3",
        "--timeout",
        "120",
    ]);
    let rows = federation_load::run(args).await.unwrap();
    let [r] = &rows[..] else { panic!("{rows:?}") };
    assert_eq!(
        (r.participants, r.per_round, r.rounds),
        (30, 10, 3),
        "{r:?}"
    );
    assert_eq!(r.agent_errors, 0, "{r:?}");
    assert_eq!(r.failed_rounds, 0, "{r:?}");
    // A socket a participant (and the admin's), held by the coordinator process.
    assert!(r.coordinator_peak_sockets >= 30, "{r:?}");
    assert!(
        r.coordinator_peak_rss_mb > 1.0 && r.rounds_per_second > 0.0,
        "{r:?}"
    );
    assert!(r.round_p50_seconds <= r.round_p99_seconds, "{r:?}");
    assert!(r.coordinator_cpu_seconds > 0.0, "{r:?}");
}
