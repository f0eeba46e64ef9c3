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
    /// Rows to predict: a CSV file with a header line, numeric features in the model's order;
    /// for a model of a job with tables, raw rows (any columns of its schema, missing values
    /// and categories as in the sites' files), which the server prepares with the version's
    /// pipeline.
    #[arg(long, conflicts_with = "idx")]
    pub csv: Option<PathBuf>,
    /// Raw rows of a model of a job with tables as JSON: an array of objects keyed by column
    /// name (values strings, numbers, booleans or null).
    #[arg(long, conflicts_with_all = ["csv", "idx"])]
    pub json: Option<PathBuf>,
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

/// Raw rows keyed by column name, for a model that prepares them with its pipeline: from a
/// CSV file with a header, or a JSON array of objects. The schema's label column, where a row
/// has it, becomes its class index.
fn raw_rows(
    a: &PredictArgs,
    schema: &cohort_model::tabular::Schema,
) -> anyhow::Result<(Vec<pb::Example>, Option<Vec<u32>>)> {
    let mut records: Vec<BTreeMap<String, String>> = Vec::new();
    let source = match (&a.csv, &a.json) {
        (Some(p), _) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            // Read as the sites read their files.
            records = cohort_model::tabular::csv_records(&text, p)?;
            p
        }
        (None, Some(p)) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of objects", p.display()))?;
            for row in rows {
                records.push(
                    row.into_iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| {
                            let cell = match v {
                                serde_json::Value::String(s) => s,
                                other => other.to_string(),
                            };
                            (k, cell)
                        })
                        .collect(),
                );
            }
            p
        }
        (None, None) => anyhow::bail!(
            "the served model prepares raw rows: give --csv FILE (with a header) or --json FILE"
        ),
    };
    let mut labels = Vec::with_capacity(records.len());
    let mut examples = Vec::with_capacity(records.len());
    for (i, mut r) in records.into_iter().enumerate() {
        let label = r.remove(&schema.label).filter(|l| !l.trim().is_empty());
        let class = match label {
            Some(l) => Some(
                schema
                    .classes
                    .iter()
                    .position(|c| *c == l)
                    .with_context(|| {
                        format!(
                            "{}: row {}: label {l:?} is not one of the model's classes {:?}",
                            source.display(),
                            i + 1,
                            schema.classes
                        )
                    })? as u32,
            ),
            None => None,
        };
        labels.push(class);
        examples.push(pb::Example {
            features: Vec::new(),
            label: class,
            raw: r.into_iter().collect(),
        });
    }
    let labels = labels
        .iter()
        .all(Option::is_some)
        .then(|| labels.into_iter().map(Option::unwrap_or_default).collect());
    Ok((examples, labels))
}

/// Examples of prepared features (standardised first with `--standardizer` if given).
fn feature_examples(a: &PredictArgs) -> anyhow::Result<(Vec<pb::Example>, Option<Vec<u32>>)> {
    if a.json.is_some() {
        anyhow::bail!(
            "--json gives raw rows, which only a model of a job with tables takes; the served \
             model takes prepared features (--csv or --idx)"
        );
    }
    let mut input = rows(a)?;
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
    let labels = input.labels.clone();
    let examples = input
        .features
        .into_iter()
        .enumerate()
        .map(|(i, f)| pb::Example {
            features: f,
            label: labels.as_ref().map(|l| l[i]),
            raw: Default::default(),
        })
        .collect();
    Ok((examples, labels))
}

pub async fn run(a: PredictArgs) -> anyhow::Result<()> {
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
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
    // A model of a job with tables takes raw rows, prepared by its pipeline on the server.
    let pipeline = info
        .variants
        .first()
        .filter(|v| !v.pipeline_json.is_empty())
        .map(|v| serde_json::from_str::<cohort_model::tabular::Pipeline>(&v.pipeline_json))
        .transpose()
        .context("the served model's pipeline")?;
    let (mut examples, mut labels) = match &pipeline {
        Some(p) if a.standardizer.is_some() || a.label.is_some() || a.idx.is_some() => {
            anyhow::bail!(
                "the served model prepares raw rows (--csv with a header, or --json) with its \
                 own pipeline: drop --standardizer, --label and --idx (its label column is {:?})",
                p.schema.label
            )
        }
        Some(p) => raw_rows(&a, &p.schema)?,
        None => feature_examples(&a)?,
    };
    if let Some(n) = a.limit {
        examples.truncate(n);
        if let Some(l) = labels.as_mut() {
            l.truncate(n);
        }
    }
    let mut answered: BTreeMap<(u64, String), usize> = BTreeMap::new();
    let (mut correct, mut shown) = (0usize, 0usize);
    println!(
        "{:>6}  {:>5}  {:>11}  {:>5}  version",
        "row", "class", "probability", "label"
    );
    // A batch larger than one request may carry is sent as several requests (a raw row
    // counted as the floats its longest encoding would take: name, text and framing).
    let features = examples
        .iter()
        .map(|e| {
            let raw: usize = e.raw.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
            e.features.len().max(raw.div_ceil(4))
        })
        .max()
        .unwrap_or(1);
    let per_request = a.batch.min(cohort_protocol::examples_per_request(features));
    for (b, chunk) in examples.chunks(per_request).enumerate() {
        let start = b * per_request;
        let r = client
            .predict_batch(pb::PredictBatchRequest {
                examples: chunk.to_vec(),
            })
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
    let n = examples.len();
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
