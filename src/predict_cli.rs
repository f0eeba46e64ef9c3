//! `cohort predict …`: a client of the Inference service for the shell. It sends the rows of a
//! CSV file or the images of an MNIST-style IDX directory in batches, prints the predictions
//! and, when the input has labels, their accuracy and which versions answered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use cohort_model::data::{IdxSplit, LabelColumn, load_csv, load_idx_dir};
use cohort_protocol::pb::{self, inference_client::InferenceClient};

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// client.toml as `cohort provision --inference …` writes it (server address and the
    /// inference certificate).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The inference server's address (overrides the configuration's).
    #[arg(long)]
    pub server: Option<String>,
    /// Connect without TLS (a server started with --insecure-dev). Development only.
    #[arg(long)]
    pub insecure_dev: bool,
    /// Rows to predict: a CSV file with a header line, numeric features in the model's order.
    #[arg(long, conflicts_with = "idx")]
    pub csv: Option<PathBuf>,
    /// The CSV column holding the true class, if any (a name, a zero-based index or `last`):
    /// left out of the features, used to report accuracy.
    #[arg(long, requires = "csv")]
    pub label: Option<LabelColumn>,
    /// Images to predict: an MNIST-style IDX directory (its test half, with labels).
    #[arg(long)]
    pub idx: Option<PathBuf>,
    /// Standardise each row with these statistics first, as the site that wrote them
    /// (`cohort participant --export-standardizer FILE`) prepares its training data.
    #[arg(long)]
    pub standardizer: Option<PathBuf>,
    /// Predict at most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rows per PredictBatch call (fewer where that many would not fit in one message).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Print each row's prediction (otherwise only the first 10).
    #[arg(long)]
    pub all: bool,
}

/// Features row by row, and labels where the input has them.
struct Rows {
    features: Vec<Vec<f32>>,
    labels: Option<Vec<u32>>,
}

/// A CSV file of numeric columns without a label column; errors name the line and column.
fn unlabelled_csv(path: &Path) -> anyhow::Result<Rows> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .with_context(|| format!("{}: empty; expected a header line", path.display()))?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let mut features = Vec::new();
    for (i, line) in lines {
        let row: Vec<f32> = line
            .split(',')
            .enumerate()
            .map(|(k, v)| {
                v.trim().trim_matches('"').parse::<f32>().map_err(|_| {
                    anyhow::anyhow!(
                        "{}:{}: column {} ({:?}) is not a number: {v:?}",
                        path.display(),
                        i + 1,
                        k + 1,
                        names.get(k).copied().unwrap_or("?")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        if row.len() != names.len() {
            anyhow::bail!(
                "{}:{}: {} values for {} columns",
                path.display(),
                i + 1,
                row.len(),
                names.len()
            );
        }
        features.push(row);
    }
    Ok(Rows {
        features,
        labels: None,
    })
}

fn rows(a: &PredictArgs) -> anyhow::Result<Rows> {
    let ds = match (&a.csv, &a.label, &a.idx) {
        (Some(p), None, _) => return unlabelled_csv(p),
        (Some(p), Some(label), _) => load_csv(p, label)?,
        (None, _, Some(dir)) => load_idx_dir(dir, IdxSplit::Test)?,
        (None, _, None) => anyhow::bail!("give --csv FILE or --idx DIR"),
    };
    Ok(Rows {
        features: (0..ds.len()).map(|i| ds.row(i).to_vec()).collect(),
        labels: Some(ds.labels),
    })
}

async fn connect(a: &PredictArgs) -> anyhow::Result<InferenceClient<tonic::transport::Channel>> {
    let cfg = a
        .config
        .as_deref()
        .map(crate::admin_cli::ClientFile::load)
        .transpose()?;
    let url = a
        .server
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.server.clone()))
        .ok_or_else(|| anyhow::anyhow!("give --config client.toml or --server URL"))?;
    let channel = crate::admin_cli::channel(
        &url,
        cfg.as_ref().and_then(|c| c.tls.as_ref()),
        a.insecure_dev,
        "use the client.toml `cohort provision --inference` wrote",
    )
    .await?;
    Ok(InferenceClient::new(channel)
        .max_decoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES))
}

pub async fn run(a: PredictArgs) -> anyhow::Result<()> {
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let mut input = rows(&a)?;
    if let Some(n) = a.limit {
        input.features.truncate(n);
        if let Some(l) = input.labels.as_mut() {
            l.truncate(n);
        }
    }
    if let Some(p) = &a.standardizer {
        let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let st: cohort_model::Standardizer = serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a standardizer: {e}", p.display()))?;
        for (i, row) in input.features.iter_mut().enumerate() {
            if row.len() != st.mean.len() {
                anyhow::bail!(
                    "row {} has {} features; {} standardises {}",
                    i + 1,
                    row.len(),
                    p.display(),
                    st.mean.len()
                );
            }
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - st.mean[j]) / st.std[j];
            }
        }
    }
    let mut client = connect(&a).await?;
    let info = client
        .model_info(pb::ModelInfoRequest {})
        .await
        .map_err(crate::admin_cli::status_err)?
        .into_inner();
    for v in &info.variants {
        let m = v.model.clone().unwrap_or_default();
        println!(
            "serving {} v{} (variant {}, {:.0}% of requests) on {}, {}",
            m.job_id,
            m.version,
            m.variant,
            v.share * 100.0,
            m.device,
            m.precision
        );
    }
    let labels = input.labels.clone();
    let mut answered: BTreeMap<(u64, String), usize> = BTreeMap::new();
    let (mut correct, mut shown) = (0usize, 0usize);
    println!(
        "{:>6}  {:>5}  {:>11}  {:>5}  version",
        "row", "class", "probability", "label"
    );
    // A batch larger than one request may carry is sent as several requests.
    let features = input.features.first().map_or(1, Vec::len);
    let per_request = a.batch.min(cohort_protocol::examples_per_request(features));
    for (b, chunk) in input.features.chunks(per_request).enumerate() {
        let start = b * per_request;
        let examples = chunk
            .iter()
            .enumerate()
            .map(|(k, f)| pb::Example {
                features: f.clone(),
                label: labels.as_ref().map(|l| l[start + k]),
            })
            .collect();
        let r = client
            .predict_batch(pb::PredictBatchRequest { examples })
            .await
            .map_err(crate::admin_cli::status_err)
            .with_context(|| format!("rows {}..{}", start + 1, start + chunk.len()))?
            .into_inner();
        let m = r.model.unwrap_or_default();
        *answered.entry((m.version, m.variant.clone())).or_default() += chunk.len();
        for (k, p) in r.predictions.iter().enumerate() {
            let i = start + k;
            let label = labels.as_ref().map(|l| l[i]);
            correct += usize::from(label == Some(p.class));
            if a.all || shown < 10 {
                let prob = p
                    .probabilities
                    .get(p.class as usize)
                    .copied()
                    .unwrap_or(0.0);
                println!(
                    "{:>6}  {:>5}  {:>11.4}  {:>5}  v{} ({})",
                    i + 1,
                    p.class,
                    prob,
                    label.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    m.version,
                    m.variant
                );
                shown += 1;
            }
        }
    }
    let n = input.features.len();
    if shown < n {
        println!("   … {} more rows (--all prints every one)", n - shown);
    }
    let by: Vec<String> = answered
        .iter()
        .map(|((v, variant), c)| format!("v{v} ({variant}): {c}"))
        .collect();
    println!("{n} rows answered; by version: {}", by.join(", "));
    if labels.is_some() && n > 0 {
        println!(
            "accuracy {:.4} ({correct} of {n})",
            correct as f64 / n as f64
        );
    }
    Ok(())
}
