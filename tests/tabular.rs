//! Real tables in `cohort simulate`: missing values, text categories and booleans train with
//! one preprocessing for every site, fitted from the federation's statistics; many tiny
//! sites no longer break training.

use clap::Parser;
use cohort::simulate::{SimArgs, SimReport, run};

mod common;
use common::messy_table;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

async fn simulate(out: &std::path::Path, extra: &[&str]) -> anyhow::Result<SimReport> {
    let mut argv = vec!["simulate", "--quiet", "--out", out.to_str().unwrap()];
    argv.extend_from_slice(extra);
    run(Cli::parse_from(argv).args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messy_table_trains_with_one_pipeline_in_both_engines_and_in_workers() {
    let dir = tempfile::tempdir().unwrap();
    let table = messy_table(dir.path());
    let job = |engine: &'static str| {
        vec![
            "--dataset",
            Box::leak(table.to_str().unwrap().to_string().into_boxed_str()),
            "--label",
            "diagnosis",
            "--participants",
            "4",
            "--rounds",
            "10",
            "--custodians",
            "3",
            "--engine",
            engine,
        ]
    };
    let net = simulate(&dir.path().join("n"), &job("networked"))
        .await
        .unwrap();
    assert!(
        net.dataset.contains("federation preprocessing"),
        "{}",
        net.dataset
    );
    // The federation's summary table, from its totals: a row per used column and the label.
    let summary = net.data_summary.as_ref().unwrap();
    let grade = summary.iter().find(|c| c.column == "grade").unwrap();
    assert_eq!(grade.kind, "categorical");
    assert!(
        grade.missing_share > 0.0 && grade.shares.len() == 4,
        "{grade:?}"
    );
    let smoker = summary.iter().find(|c| c.column == "smoker").unwrap();
    assert_eq!(smoker.kind, "boolean");
    assert_eq!(summary.last().unwrap().kind, "label");
    let fed = net.federated_accuracy.unwrap();
    let central = net.centralised_accuracy.unwrap();
    assert!(fed > 0.9, "federated accuracy {fed}");
    assert!(
        (fed - central).abs() <= 0.035,
        "federated {fed} vs centralised {central} with the same preprocessing"
    );
    let vir = simulate(&dir.path().join("v"), &job("virtual"))
        .await
        .unwrap();
    assert_eq!(
        net.model_path.rsplit('/').next(),
        vir.model_path.rsplit('/').next()
    );
    let mut with_workers = job("virtual");
    with_workers.extend([
        "--workers",
        "2",
        "--worker-command",
        env!("CARGO_BIN_EXE_cohort"),
    ]);
    let w = simulate(&dir.path().join("w"), &with_workers)
        .await
        .unwrap();
    assert_eq!(
        vir.model_path.rsplit('/').next(),
        w.model_path.rsplit('/').next()
    );
    // The served model answers every participant's prepared held-out rows alike.
    assert_eq!(net.served_accuracy, fed);

    // Strict mode refuses the missing values, naming a column; site standardisation cannot
    // read the table at all, and says which flag can.
    let mut strict = job("virtual");
    strict.push("--no-impute");
    let e = simulate(&dir.path().join("s"), &strict).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("missing value in column"),
        "{e:#}"
    );
    let mut site = job("virtual");
    site.extend(["--preprocess", "site"]);
    let e = simulate(&dir.path().join("p"), &site).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("--preprocess federation"),
        "{e:#}"
    );
}

/// 100 sites of five or six rows each: standardising each with its own rows breaks
/// training; one pipeline from the federation's statistics trains as well as three sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tiny_sites_train_as_well_as_a_few_with_the_federations_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let accuracy = |n: &'static str, preprocess: &'static str| {
        let out = dir.path().join(format!("{n}-{preprocess}"));
        async move {
            simulate(
                &out,
                &[
                    "--participants",
                    n,
                    "--rounds",
                    "40",
                    "--plaintext",
                    "--no-baseline",
                    "--preprocess",
                    preprocess,
                ],
            )
            .await
            .unwrap()
            .federated_accuracy
            .unwrap()
        }
    };
    let few = accuracy("3", "federation").await;
    let tiny = accuracy("100", "federation").await;
    let tiny_site = accuracy("100", "site").await;
    assert!(few > 0.95, "{few}");
    assert!(
        (few - tiny).abs() <= 0.02,
        "3 sites {few}, 100 sites {tiny}"
    );
    assert!(
        tiny_site < tiny - 0.05,
        "site standardisation of 5-row sites: {tiny_site} (federation: {tiny})"
    );
}
