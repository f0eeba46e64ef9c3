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
    // Quantiles from the federation's histogram: ordered, and the median within a bin width
    // (plus the training split's sampling) of the whole file's.
    let radius = summary.iter().find(|c| c.column == "mean_radius").unwrap();
    let q: Vec<f64> = radius.quantiles.iter().map(|(_, v)| *v).collect();
    assert_eq!(q.len(), 5, "{radius:?}");
    assert!(q.windows(2).all(|w| w[0] <= w[1]), "{q:?}");
    let mut all: Vec<f64> = std::fs::read_to_string(&table)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .collect();
    all.sort_by(f64::total_cmp);
    let median = all[all.len() / 2];
    assert!((q[2] - median).abs() < 1.0, "median {} vs {median}", q[2]);
    let smoker = summary.iter().find(|c| c.column == "smoker").unwrap();
    assert_eq!(smoker.kind, "boolean");
    assert_eq!(summary.last().unwrap().kind, "label");
    let fed = net.federated_accuracy.unwrap();
    let central = net.centralised_accuracy.unwrap();
    assert!(fed > 0.9, "federated accuracy {fed}");
    assert!(
        (fed - central).abs() <= 0.015,
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

/// A declared model that embeds a categorical column by name trains with secure aggregation:
/// the table's schema places the block, and the model learns from the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_categorical_column_is_embedded_by_name_and_trains_under_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let table = messy_table(dir.path());
    let model = dir.path().join("embedded.toml");
    std::fs::write(
        &model,
        "kind = \"layers\"\nlayers = [\n\
         { type = \"embedding\", column = \"grade\", dim = 2 },\n\
         { type = \"linear\", units = 16 },\n{ type = \"relu\" },\n\
         { type = \"linear\", units = 2 },\n]\n",
    )
    .unwrap();
    let report = simulate(
        &dir.path().join("run"),
        &[
            "--dataset",
            table.to_str().unwrap(),
            "--label",
            "diagnosis",
            "--participants",
            "4",
            "--rounds",
            "8",
            "--custodians",
            "3",
            "--engine",
            "virtual",
            "--model",
            model.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert!(
        !report.secure_aggregation.is_null(),
        "{}",
        report.secure_aggregation
    );
    let cohort_model::ModelSpec::Layers { inputs, layers, .. } = &report.model else {
        panic!("{:?}", report.model)
    };
    // 30 numeric columns, grade's 4 categories, smoker.
    assert_eq!(*inputs, 35);
    assert_eq!(
        layers[0],
        cohort_model::layers::Layer::Embedding {
            dim: 2,
            column: Some("grade".into()),
            offset: 30,
            categories: 4,
        }
    );
    let fed = report.federated_accuracy.unwrap();
    assert!(fed > 0.9, "federated accuracy {fed}");
    // A column that is not categorical is named with the layer.
    std::fs::write(
        &model,
        std::fs::read_to_string(&model)
            .unwrap()
            .replace("\"grade\"", "\"smoker\""),
    )
    .unwrap();
    let e = simulate(
        &dir.path().join("bad"),
        &[
            "--dataset",
            table.to_str().unwrap(),
            "--label",
            "diagnosis",
            "--model",
            model.to_str().unwrap(),
        ],
    )
    .await
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("layer 0 (embedding): column \"smoker\" is boolean"),
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
    // The default (`auto`) sees sites of 4–5 rows and takes the federation's pipeline.
    assert_eq!(accuracy("100", "auto").await, tiny);
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

/// A stand-in for a 2,139-row clinical table (the size of the one the issue was found on):
/// rows of the bundled table drawn with replacement, each value jittered by 3%, 8% of the cells
/// missing, a grade category that mostly follows the label, and a yes/no column. Seeded.
fn clinical_table(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv"),
    )
    .unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let (features, label) = header.split_at(header.len() - 1);
    let mut out = format!("{},grade,smoker,{}\n", features.join(","), label[0]);
    for _ in 0..2139 {
        let r = &rows[(next() * rows.len() as f64) as usize % rows.len()];
        let (x, y) = r.split_at(r.len() - 1);
        let cells: Vec<String> = x
            .iter()
            .map(|v| {
                // Box-Muller for the jitter.
                let g = (-2.0 * next().max(1e-12).ln()).sqrt()
                    * (2.0 * std::f64::consts::PI * next()).cos();
                let v: f64 = v.parse::<f64>().unwrap() * (1.0 + 0.03 * g);
                if next() < 0.08 {
                    "NA".to_string()
                } else {
                    format!("{v:.5}")
                }
            })
            .collect();
        let pick = |u: f64, of: &[&'static str]| of[(u * of.len() as f64) as usize % of.len()];
        let mut grade = if y[0] == "1" {
            pick(next(), &["I", "II"])
        } else {
            pick(next(), &["III", "IV"])
        };
        if next() < 0.15 {
            grade = pick(next(), &["I", "II", "III", "IV"]);
        }
        if next() < 0.05 {
            grade = "";
        }
        let smoker = pick(next(), &["yes", "no"]);
        out += &format!("{},{grade},{smoker},{}\n", cells.join(","), y[0]);
    }
    let path = dir.join("clinical.csv");
    std::fs::write(&path, out).unwrap();
    path
}

/// The case: a 2,139-row table over 500 sites (about 3 training rows each) trains,
/// with the federation's pipeline, within 2 points of the same table over 3 sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_sites_of_a_clinical_sized_table_train_like_three() {
    let dir = tempfile::tempdir().unwrap();
    let table = clinical_table(dir.path());
    let accuracy = |n: &'static str| {
        let out = dir.path().join(format!("sites-{n}"));
        let table = table.to_str().unwrap().to_string();
        async move {
            simulate(
                &out,
                &[
                    "--dataset",
                    &table,
                    "--label",
                    "diagnosis",
                    "--participants",
                    n,
                    "--rounds",
                    "40",
                    "--plaintext",
                    "--no-baseline",
                ],
            )
            .await
            .unwrap()
            .federated_accuracy
            .unwrap()
        }
    };
    let few = accuracy("3").await;
    let many = accuracy("500").await;
    assert!(few > 0.9, "{few}");
    assert!(
        (few - many).abs() <= 0.02,
        "3 sites {few}, 500 sites {many}"
    );
}
