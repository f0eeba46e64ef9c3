//! A cohort participant inside another Rust program: a hospital's own service that already
//! holds its records hands them to the agent in memory, instead of pointing `cohort
//! participant` at a file.
//!
//! ```sh
//! cargo run --release --example embedded_participant -- participant.toml records.csv
//! ```
//!
//! `participant.toml` is the one `cohort provision` wrote for this node (coordinator address,
//! identity, [tls]); its [data] section, if any, is not read. `records.csv` stands for the
//! program's own data source: a numeric table whose column `diagnosis` is the label.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use cohort_model::{Dataset, FeatureShape};
use cohort_participant::{LocalData, ParticipantConfig};

/// The program's own records: here read from a CSV file by hand, as rows of numbers and a
/// 0/1 label (any source would do: a database, a message queue, an EHR export).
fn records(path: &PathBuf) -> anyhow::Result<Dataset> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("an empty table")?.split(',').collect();
    let label = header
        .iter()
        .position(|h| *h == "diagnosis")
        .context("no diagnosis column")?;
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in lines.enumerate() {
        for (j, cell) in line.split(',').enumerate() {
            let v: f32 = cell
                .parse()
                .with_context(|| format!("row {}, column {j}: {cell:?}", i + 2))?;
            if j == label {
                labels.push(v as u32);
            } else {
                features.push(v);
            }
        }
    }
    let d = header.len() - 1;
    Ok(Dataset::new(features, labels, FeatureShape::Flat(d), 2)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, config, table] = &args[..] else {
        bail!("usage: embedded_participant participant.toml records.csv");
    };
    let cfg = ParticipantConfig::load(config.as_ref()).map_err(anyhow::Error::msg)?;
    let mut opts = cfg.options();
    let tls = cfg
        .tls
        .as_ref()
        .context("participant.toml has no [tls] section: use the one `cohort provision` wrote")?;
    opts.tls = Some(tls.node().map_err(anyhow::Error::msg)?);
    // A held-out fifth for federated evaluation; standardised with this site's own statistics.
    let data = LocalData::prepare(records(&PathBuf::from(table))?, 0.2, true, 1)?;
    println!(
        "{}: {} training and {} held-out records",
        cfg.id,
        data.train.len(),
        data.test.len()
    );
    let report = cohort_participant::run(opts, Arc::new(data)).await?;
    println!(
        "{}: trained {} rounds, {} evaluations",
        cfg.id, report.rounds_trained, report.evaluations
    );
    Ok(())
}
