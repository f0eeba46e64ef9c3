//! An application asking the served global model for predictions over the Inference API
//! (gRPC, mutual TLS): rows of numbers in, the most probable class and its probability out.
//!
//! ```sh
//! cargo run --release --example predict_client -- client.toml rows.csv [label-column]
//! ```
//!
//! `client.toml` is what `cohort provision --inference app` wrote (the server's address and
//! the application's certificate). `rows.csv` has a header and numeric columns in the
//! model's feature order; a label column, if named, is left out of the features and sent as
//! the true class, which the server counts in its quality metrics.

use anyhow::{Context, bail};
use cohort_protocol::pb::inference_client::InferenceClient;
use cohort_protocol::pb::{Example, PredictBatchRequest};
use cohort_protocol::tls::TlsFiles;
use serde::Deserialize;
use tonic::transport::Endpoint;

#[derive(Deserialize)]
struct ClientFile {
    server: String,
    tls: TlsFiles,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (config, rows, label) = match &args[..] {
        [_, c, r] => (c, r, None),
        [_, c, r, l] => (c, r, Some(l.as_str())),
        _ => bail!("usage: predict_client client.toml rows.csv [label-column]"),
    };
    let config = std::path::Path::new(config);
    let file: ClientFile = toml::from_str(&std::fs::read_to_string(config)?)
        .with_context(|| config.display().to_string())?;
    let tls = file
        .tls
        .relative_to(config.parent().unwrap_or(".".as_ref()));
    let node = tls.node().map_err(anyhow::Error::msg)?;
    let channel = Endpoint::from_shared(file.server.clone())?
        .tls_config(node.client_config())?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", file.server))?;
    let mut client = InferenceClient::new(channel);

    let text = std::fs::read_to_string(rows).with_context(|| rows.clone())?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("an empty table")?.split(',').collect();
    let label_at = match label {
        Some(l) => Some(
            header
                .iter()
                .position(|h| h == &l)
                .with_context(|| format!("no column {l:?} in {rows}"))?,
        ),
        None => None,
    };
    let mut examples = Vec::new();
    for (i, line) in lines.enumerate() {
        let mut example = Example::default();
        for (j, cell) in line.split(',').enumerate() {
            let v: f32 = cell
                .trim()
                .parse()
                .with_context(|| format!("{rows}: row {}, column {j}: {cell:?}", i + 2))?;
            if Some(j) == label_at {
                example.label = Some(v as u32);
            } else {
                example.features.push(v);
            }
        }
        examples.push(example);
    }
    let n = examples.len();
    let answer = client
        .predict_batch(PredictBatchRequest { examples })
        .await?
        .into_inner();
    let model = answer.model.context("an answer without its model")?;
    for (i, p) in answer.predictions.iter().enumerate().take(5) {
        let prob = p
            .probabilities
            .get(p.class as usize)
            .copied()
            .unwrap_or(f32::NAN);
        println!("row {i}: class {} (probability {prob:.3})", p.class);
    }
    println!(
        "answered {} of {n} rows with job {} version {} ({}, {})",
        answer.predictions.len(),
        model.job_id,
        model.version,
        model.precision,
        model.device
    );
    Ok(())
}
