//! Local-training speed: one participant's `cohort_model::train` on real data, timed per
//! image, then the trained model's test accuracy. The cohort side of
//! `benches/compare_pytorch.sh`, which runs PyTorch on the same images, network and
//! hyper-parameters right after it.
//!
//! `cargo bench --bench train_speed -- --model cnn --threads 1 [--epochs 1] [--limit N]`
//! `cargo bench --bench train_speed -- --model mlp --threads 2 --epochs 200`
//!
//! `--model cnn`: the Fashion-MNIST CNN (`ModelSpec::Cnn`, 52,138 parameters) on Debian's
//! dataset-fashion-mnist. `--model mlp`: an MLP (30-64-64-2) on the bundled breast-cancer
//! table, standardised, 20% held out. `--threads` sizes the compute pool (Rayon) for the run.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use cohort_model::data::{IdxSplit, LabelColumn, Standardizer, load_csv, load_idx_dir};
use cohort_model::{ComputeDevice, Dataset, ModelSpec, Optimizer, TrainConfig};

#[derive(Parser)]
struct Args {
    /// cnn (Fashion-MNIST) or mlp (breast-cancer table).
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Compute threads for the whole run.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    #[arg(long, default_value = "sgd")]
    optimizer: Optimizer,
    /// Train on the first N training examples only (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// `cpu` or `wgpu`.
    #[arg(long, default_value = "cpu")]
    device: ComputeDevice,
    /// Fashion-MNIST directory (IDX files).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(serde::Serialize)]
struct Out {
    system: &'static str,
    model: String,
    device: String,
    threads: usize,
    images: usize,
    epochs: usize,
    seconds: f64,
    ms_per_image: f64,
    images_per_second: f64,
    first_epoch_loss: f64,
    last_epoch_loss: f64,
    test_accuracy: f64,
}

fn data(args: &Args) -> anyhow::Result<(Dataset, Dataset, ModelSpec)> {
    match args.model.as_str() {
        "cnn" => {
            let tr = load_idx_dir(&args.data, IdxSplit::Train)?;
            let te = load_idx_dir(&args.data, IdxSplit::Test)?;
            let spec = ModelSpec::for_shape(tr.shape, tr.num_classes, &[]);
            Ok((tr, te, spec))
        }
        "mlp" => {
            let p =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/breast_cancer.csv");
            let ds = load_csv(&p, &LabelColumn::Last)?;
            let (mut tr, mut te) = ds.split(0.2, 7)?;
            let s = Standardizer::fit(&tr);
            s.apply(&mut tr);
            s.apply(&mut te);
            let spec = ModelSpec::for_shape(tr.shape, tr.num_classes, &[64, 64]);
            Ok((tr, te, spec))
        }
        m => anyhow::bail!("unknown --model {m:?}: use cnn or mlp"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()?;
    let (mut tr, te, spec) = data(&args)?;
    if args.limit > 0 && args.limit < tr.len() {
        tr = tr.subset(&(0..args.limit).collect::<Vec<_>>());
    }
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        optimizer: args.optimizer,
        seed: 1,
        proximal_mu: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let p0 = spec.initial_parameters(0);
    // Warm-up (first-touch allocations, wgpu shader compilation) on a few batches.
    let warm = tr.subset(&(0..(args.batch_size * 4).min(tr.len())).collect::<Vec<_>>());
    let _ = cohort_model::train(&spec, &p0, &warm, &cfg_one(&cfg), args.device)?;
    let t0 = Instant::now();
    let (p, rep) = cohort_model::train(&spec, &p0, &tr, &cfg, args.device)?;
    let seconds = t0.elapsed().as_secs_f64();
    let m = cohort_model::evaluate(&spec, &p, &te, args.device)?;
    let images = tr.len() * args.epochs;
    let out = Out {
        system: "cohort",
        model: args.model.clone(),
        device: args.device.to_string(),
        threads: args.threads,
        images,
        epochs: args.epochs,
        seconds,
        ms_per_image: seconds * 1e3 / images as f64,
        images_per_second: images as f64 / seconds,
        first_epoch_loss: rep.epoch_loss[0],
        last_epoch_loss: *rep.epoch_loss.last().unwrap(),
        test_accuracy: m.accuracy,
    };
    println!("{}", serde_json::to_string(&out)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

fn cfg_one(cfg: &TrainConfig) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        ..cfg.clone()
    }
}
