//! An operator's own program driving a job through the Admin API (gRPC, mutual TLS): create
//! it from a job specification, start it, follow its events until it finishes, then list
//! its model versions and promote the last one for serving.
//!
//! ```sh
//! cargo run --release --example admin_client -- admin.toml job.toml
//! ```
//!
//! `admin.toml` is what `cohort provision --admins ops` wrote (the coordinator's address and
//! the admin's certificate); `job.toml` a job specification (docs/operations.md). Any gRPC
//! client can do the same from the `.proto` files in `protocol/proto/cohort/v1/`.

use anyhow::{Context, bail};
use cohort_protocol::pb::admin_client::AdminClient;
use cohort_protocol::pb::{
    CreateJobRequest, JobRequest, ListModelsRequest, ModelRequest, WatchEventsRequest,
};
use cohort_protocol::tls::TlsFiles;
use serde::Deserialize;
use tonic::transport::Endpoint;

#[derive(Deserialize)]
struct AdminFile {
    coordinator: String,
    tls: TlsFiles,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, config, spec] = &args[..] else {
        bail!("usage: admin_client admin.toml job.toml");
    };
    let config = std::path::Path::new(config);
    let file: AdminFile = toml::from_str(&std::fs::read_to_string(config)?)
        .with_context(|| config.display().to_string())?;
    // [tls] paths are relative to admin.toml.
    let tls = file
        .tls
        .relative_to(config.parent().unwrap_or(".".as_ref()));
    let node = tls.node().map_err(anyhow::Error::msg)?;
    let channel = Endpoint::from_shared(file.coordinator.clone())?
        .tls_config(node.client_config())?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", file.coordinator))?;
    let mut admin = AdminClient::new(channel);

    // Subscribe first, so no event of the job is missed.
    let mut events = admin
        .watch_events(WatchEventsRequest {})
        .await?
        .into_inner();
    let job = admin
        .create_job(CreateJobRequest {
            spec_toml: std::fs::read_to_string(spec)?,
        })
        .await?
        .into_inner();
    println!(
        "created job {} ({} rounds, {})",
        job.id, job.rounds, job.model
    );
    admin
        .start_job(JobRequest {
            job_id: job.id.clone(),
        })
        .await?;
    while let Some(e) = events.message().await? {
        if e.job_id != job.id {
            continue;
        }
        match e.kind.as_str() {
            "round_completed" => println!("round {} completed: {}", e.round, e.detail),
            "job_finished" => break,
            "job_cancelled" => bail!("job {} was cancelled", job.id),
            _ => {}
        }
    }
    let status = admin
        .get_job(JobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    let record = status.job.context("a job status without its record")?;
    println!(
        "job {} {}: {} of {} rounds",
        record.id, record.state, record.rounds_completed, record.rounds
    );
    let models = admin
        .list_models(ListModelsRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    let last = models
        .models
        .iter()
        .map(|m| m.version)
        .max()
        .context("no model versions")?;
    let promoted = admin
        .promote_model(ModelRequest {
            job_id: job.id.clone(),
            version: last,
        })
        .await?
        .into_inner();
    println!("promoted version {} of job {}", promoted.version, job.id);
    Ok(())
}
