//! Models that leave cohort: `cohort export` writes a version for PyTorch, and PyTorch
//! (Debian's `python3-torch`, with `safetensors` from PyPI) loads it strictly, under the same
//! tensor names as the module it builds, and gives cohort's logits on held-out data within
//! 1e-5. Checked for the CNN preset, a declared image stack and a declared stack for a table.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use cohort::simulate::{SimArgs, run};
use cohort_model::{ComputeDevice, IdxSplit, InferenceModel, LabelColumn, Precision};

mod common;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

const BIN: &str = env!("CARGO_BIN_EXE_cohort");
const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Debian's PyTorch (CPU) with `safetensors` from PyPI, in a virtual environment that sees
/// the system's packages.
fn torch_python() -> PathBuf {
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("torch-export");
    let python = venv.join("bin/python");
    let ready = venv.join("ready-safetensors-0.8.0");
    if !ready.exists() {
        for cmd in [
            Command::new("/usr/bin/python3")
                .args(["-m", "venv", "--system-site-packages"])
                .arg(&venv),
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "safetensors==0.8.0",
            ]),
        ] {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {out:?}");
        }
        std::fs::write(&ready, b"").unwrap();
    }
    python
}

/// Trains `extra` for one round, exports the version with `cohort export`, and compares
/// PyTorch's logits on `rows` with cohort's. The largest difference.
async fn export_and_compare(name: &str, extra: &[&str], rows: &[f32]) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut argv = vec![
        "simulate",
        "--quiet",
        "--no-baseline",
        "--plaintext",
        "--participants",
        "3",
        "--rounds",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    let report = run(Cli::parse_from(argv).args).await.unwrap();
    let export = dir.path().join("export");
    let status = Command::new(BIN)
        .args(["export", "simulation", "--model-dir"])
        .arg(out.join("models"))
        .arg("--out")
        .arg(&export)
        .output()
        .unwrap();
    assert!(status.status.success(), "{name}: cohort export: {status:?}");
    // cohort's logits from the version in the registry.
    let store = cohort_coordinator::ModelStore::open(out.join("models")).unwrap();
    let (manifest, params) = store.for_job("simulation").read_version(1).unwrap();
    assert_eq!(manifest.model, report.model);
    if let cohort_model::ModelSpec::Layers { layers, .. } = &manifest.model
        && let Some(e @ cohort_model::layers::Layer::Embedding { .. }) = layers.first()
    {
        // Placed by the table's schema: grade's block after the 30 numeric columns.
        assert_eq!(e.to_string(), "embedding(grade: 4 → 3)", "{name}");
        assert!(
            matches!(e, cohort_model::layers::Layer::Embedding { offset: 30, .. }),
            "{e:?}"
        );
    }
    let d = manifest.model.input_shape().len();
    let n = rows.len() / d;
    let net =
        InferenceModel::load(&manifest.model, &params, ComputeDevice::Cpu, Precision::F32).unwrap();
    let ours = net.logits(rows, n).unwrap();
    // PyTorch's, from the exported files only.
    let input = dir.path().join("rows.f32");
    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&input, bytes).unwrap();
    let script = format!(
        r#"
import sys, numpy as np, torch
sys.path.insert(0, {export:?})
import model
from safetensors.torch import load_file
net = model.load({weights:?})
assert set(load_file({weights:?})) == set(net.state_dict()), "tensor names differ"
rows = torch.from_numpy(np.fromfile({input:?}, dtype="<f4").reshape(-1, {d}))
with torch.no_grad():
    net(rows).numpy().astype("<f4").tofile({output:?})
print(sorted(net.state_dict())[:4])
"#,
        export = export.to_str().unwrap(),
        weights = export.join("model.safetensors").to_str().unwrap(),
        input = input.to_str().unwrap(),
        output = dir.path().join("logits.f32").to_str().unwrap(),
    );
    let py = Command::new(torch_python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{name}: PyTorch: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let theirs: Vec<f32> = std::fs::read(dir.path().join("logits.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(theirs.len(), ours.len(), "{name}");
    let diff = cohort_model::infer::max_abs_diff(&ours, &theirs);
    eprintln!(
        "{name}: {} logits, largest difference {diff:e}; tensors {}",
        ours.len(),
        String::from_utf8_lossy(&py.stdout).trim()
    );
    diff
}

fn fmnist_test_rows(n: usize) -> Vec<f32> {
    let test = cohort_model::data::load_idx_dir(Path::new(FMNIST), IdxSplit::Test).unwrap();
    (0..n).flat_map(|i| test.row(i).to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytorch_gives_cohorts_logits_for_exported_models() {
    assert!(Path::new(FMNIST).is_dir(), "{FMNIST} is missing");
    let dir = tempfile::tempdir().unwrap();
    let images = fmnist_test_rows(500);
    // The CNN preset, exported through its layer stack.
    let image_job = ["--dataset", FMNIST, "--epochs", "1", "--lr", "0.05"];
    let diff = export_and_compare("cnn preset", &image_job, &images).await;
    assert!(diff <= 1e-5, "cnn preset: {diff}");
    // A declared image stack with what the preset lacks: a strided, padded convolution, batch
    // norm over channels, average pooling, dropout, GELU and tanh.
    let model = dir.path().join("image.toml");
    std::fs::write(
        &model,
        r#"kind = "layers"
layers = [
  { type = "conv2d", channels = 6, kernel = 5, stride = 2, padding = 2 },
  { type = "batch_norm" },
  { type = "gelu" },
  { type = "avg_pool2d", size = 2 },
  { type = "conv2d", channels = 8, kernel = 3, padding = 1 },
  { type = "relu" },
  { type = "max_pool2d", size = 2 },
  { type = "flatten" },
  { type = "dropout", p = 0.2 },
  { type = "linear", units = 32 },
  { type = "tanh" },
  { type = "linear", units = 10 },
]
"#,
    )
    .unwrap();
    let mut job = image_job.to_vec();
    job.extend(["--model", model.to_str().unwrap()]);
    let diff = export_and_compare("declared image stack", &job, &images).await;
    assert!(diff <= 1e-5, "declared image stack: {diff}");
    // A declared stack for a table: batch norm over features, layer norm, sigmoid.
    let table = dir.path().join("table.toml");
    std::fs::write(
        &table,
        r#"kind = "layers"
layers = [
  { type = "linear", units = 16 },
  { type = "batch_norm" },
  { type = "sigmoid" },
  { type = "linear", units = 8 },
  { type = "layer_norm" },
  { type = "relu" },
  { type = "linear", units = 2 },
]
"#,
    )
    .unwrap();
    let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv");
    let mut ds =
        cohort_model::data::load_csv(&csv, &LabelColumn::Name("diagnosis".into())).unwrap();
    cohort_model::Standardizer::fit(&ds).apply(&mut ds);
    let rows: Vec<f32> = (0..ds.len()).flat_map(|i| ds.row(i).to_vec()).collect();
    let diff = export_and_compare(
        "declared table stack",
        &["--epochs", "5", "--model", table.to_str().unwrap()],
        &rows,
    )
    .await;
    assert!(diff <= 1e-5, "declared table stack: {diff}");
    // A table with a categorical column, embedded: the 30 numeric columns, then grade's
    // one-hot block (I–IV), then smoker; rows with each grade and an unknown one (zeros).
    let messy = common::messy_table(dir.path());
    let embedded = dir.path().join("embedded.toml");
    std::fs::write(
        &embedded,
        r#"kind = "layers"
layers = [
  { type = "embedding", column = "grade", dim = 3 },
  { type = "linear", units = 8 },
  { type = "relu" },
  { type = "linear", units = 2 },
]
"#,
    )
    .unwrap();
    let rows: Vec<f32> = (0..40)
        .flat_map(|i| {
            let mut row: Vec<f32> = (0..30).map(|j| ((i * 31 + j * 7) as f32).sin()).collect();
            row.extend((0..4).map(|g| if g == i % 5 { 1.0 } else { 0.0 }));
            row.push(if i % 2 == 0 { 1.0 } else { -1.0 });
            row
        })
        .collect();
    let diff = export_and_compare(
        "declared table stack with an embedding",
        &[
            "--dataset",
            messy.to_str().unwrap(),
            "--label",
            "diagnosis",
            "--epochs",
            "5",
            "--model",
            embedded.to_str().unwrap(),
        ],
        &rows,
    )
    .await;
    assert!(
        diff <= 1e-5,
        "declared table stack with an embedding: {diff}"
    );
}

/// A version that does not exist, or a registry that is not there, is named.
#[test]
fn export_errors_name_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["export", "simulation", "--model-dir"])
        .arg(dir.path().join("nowhere"))
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("nowhere") && e.contains("no such directory"),
        "{e}"
    );
}
