//! The worker process (`cohort sim-worker`): dials the simulation's driver over mutual TLS,
//! prepares its shard of the participants from the simulation's data settings, and answers
//! each step with one partial sum until the job is over.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use cohort_model::ComputeDevice;
use cohort_protocol::pb;
use cohort_protocol::pb::simulation_workers_client::SimulationWorkersClient;
use rand::SeedableRng;
use rand::rngs::ChaCha20Rng;
use tonic::transport::Channel;

use super::{ShardStep, keys_pb, work_shard};
use crate::simulate::client::Client;
use crate::simulate::data::{DataSettings, prepare_shard};
use crate::simulate::participant_id;

/// `cohort sim-worker`: one worker of a simulation run with `--workers` (started by
/// `cohort simulate` itself on one machine, or as a Kubernetes Indexed Job).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The simulation driver's address, e.g. https://cohort-sim-driver:7700.
    #[arg(long)]
    pub driver: String,
    /// This worker's shard, 0-based (a Kubernetes Indexed Job's completion index).
    #[arg(long)]
    pub shard: u32,
    /// How many workers the simulation has.
    #[arg(long)]
    pub shards: u32,
    /// Directory with ca.pem (the simulation's CA), worker.pem and worker.key.
    #[arg(long)]
    pub tls: PathBuf,
    /// The name the driver's certificate is issued to.
    #[arg(long, default_value = "coordinator")]
    pub server_name: String,
}

/// How long a `NextStep` call may be held open by the driver.
const WAIT_MS: u32 = 20_000;

/// Runs the worker to the end of the job.
pub async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let tls = cohort_protocol::tls::TlsFiles {
        ca: args.tls.join("ca.pem"),
        cert: args.tls.join("worker.pem"),
        key: args.tls.join("worker.key"),
        crl: None,
        server_name: Some(args.server_name.clone()),
        key_passphrase_env: None,
    }
    .node()?;
    let channel = connect(&args.driver, &tls).await?;
    let mut driver = SimulationWorkersClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let plan = driver
        .register(pb::RegisterWorkerRequest {
            shard: args.shard,
            shards: args.shards,
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
        .context("registering with the driver")?
        .into_inner();
    let (first, end) = (plan.first as usize, plan.end as usize);
    let data = DataSettings {
        participants: plan.participants as usize,
        seed: plan.seed,
        dataset: (!plan.dataset.is_empty()).then(|| PathBuf::from(&plan.dataset)),
        label: plan.label.clone(),
        partition: plan.partition.parse().map_err(anyhow::Error::msg)?,
        test_fraction: plan.test_fraction,
        preprocess: clap::ValueEnum::from_str(&plan.preprocess, false)
            .map_err(|e| anyhow::anyhow!("preprocess {:?}: {e}", plan.preprocess))?,
        impute: if plan.no_impute {
            cohort_model::tabular::Impute::Refuse
        } else {
            cohort_model::tabular::Impute::Mean
        },
        missing_indicators: plan.missing_indicators,
    };
    let device: ComputeDevice = plan.device.parse().map_err(anyhow::Error::msg)?;
    if end > data.participants || first > end {
        bail!(
            "the driver gave shard [{first}, {end}) of {} participants",
            data.participants
        );
    }
    // The partition as the driver made it; only this worker's shard is built.
    let locals = tokio::task::spawn_blocking(move || prepare_shard(&data, first..end)).await??;
    let mut rng = ChaCha20Rng::from_seed(rand::random());
    let mut clients: Vec<Client> = locals
        .into_iter()
        .enumerate()
        .map(|(k, site)| Client::new(participant_id(first + k), Some(site), &mut rng))
        .collect();
    let mut index: HashMap<String, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    driver
        .ready(pb::WorkerReady {
            shard: args.shard,
            participants: clients
                .iter()
                .map(|c| pb::WorkerParticipant {
                    participant_id: c.id.clone(),
                    train_examples: c.examples(),
                    keys: Some(keys_pb(&c.public_keys())),
                })
                .collect(),
        })
        .await
        .context("announcing this worker's participants")?;
    tracing::info!(
        shard = args.shard,
        participants = end - first,
        "worker ready"
    );
    let mut after = 0;
    loop {
        let order = driver
            .next_step(pb::NextStepRequest {
                shard: args.shard,
                after,
                wait_ms: WAIT_MS,
            })
            .await
            .context("asking the driver for the next step")?
            .into_inner();
        if order.finished {
            return Ok(());
        }
        if order.step == 0 {
            continue;
        }
        let step = ShardStep::from_pb(&order)?;
        let dropout = plan.dropout;
        let (result, back) = tokio::task::spawn_blocking(move || {
            let r = work_shard(&mut clients, &index, &step, device, dropout);
            (r, (clients, index))
        })
        .await?;
        (clients, index) = back;
        let parts = result?.into_parts(args.shard, order.step);
        driver
            .submit_step(tokio_stream::iter(parts))
            .await
            .with_context(|| format!("sending step {}'s result", order.step))?;
        after = order.step;
    }
}

/// Connects to the driver, retrying for a while: workers may start before it listens.
async fn connect(url: &str, tls: &cohort_protocol::tls::NodeTls) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("driver address {url:?}"))?
        .tls_config(tls.client_config())?
        .connect_timeout(Duration::from_secs(5));
    let mut last = None;
    for _ in 0..120 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(anyhow::anyhow!(
        "cannot reach the simulation driver at {url}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}
