//! `cohort export`: a model version for PyTorch, as `model.safetensors` (PyTorch's layout and
//! names) and `model.py` (the module that loads it), from a registry on disk or the one a
//! coordinator's configuration names (S3 and encryption at rest included).

use std::path::PathBuf;

use anyhow::{Context, bail};
use cohort_coordinator::{CoordinatorConfig, ModelStore};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The job whose model to export (a simulation's is `simulation`).
    pub job: String,
    /// The version (default: the newest).
    #[arg(long)]
    pub version: Option<u64>,
    /// A model registry directory: a simulation's `<out>/models`, or a coordinator's
    /// unencrypted `model_dir`.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    pub model_dir: Option<PathBuf>,
    /// The coordinator's configuration: its registry (`model_dir` or `[model_store.s3]`) and
    /// its `[at_rest]` keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The directory to write `model.safetensors` and `model.py` into (created if need be).
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the export; the version exported.
pub fn run(args: &ExportArgs) -> anyhow::Result<u64> {
    let store = match (&args.model_dir, &args.config) {
        (Some(dir), _) => {
            if !dir.is_dir() {
                bail!("--model-dir {}: no such directory", dir.display());
            }
            ModelStore::open(dir).with_context(|| format!("--model-dir {}", dir.display()))?
        }
        (None, Some(c)) => CoordinatorConfig::load(c)
            .map_err(anyhow::Error::msg)?
            .open_model_store()
            .map_err(anyhow::Error::msg)?,
        (None, None) => bail!("give --model-dir or --config"),
    }
    .for_job(&args.job);
    let version = match args.version {
        Some(v) => v,
        None => *store
            .versions()
            .with_context(|| format!("job {}'s versions", args.job))?
            .last()
            .with_context(|| format!("job {} has no model versions", args.job))?,
    };
    let (manifest, params) = store
        .read_version(version)
        .with_context(|| format!("job {} version {version}", args.job))?;
    let export = cohort_model::export::pytorch(&manifest.model, &params)?;
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    for (name, bytes) in [
        ("model.safetensors", &export.safetensors[..]),
        ("model.py", export.module.as_bytes()),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).with_context(|| path.display().to_string())?;
    }
    Ok(version)
}
