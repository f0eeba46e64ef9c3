//! The networked engine: a coordinator service on a loopback socket with mutual TLS, and one
//! participant agent (a gRPC client, the code of `cohort participant`) per participant.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_coordinator::{Coordinator, Event, ModelStore, Orchestrator, RoundSummary};
use cohort_model::ComputeSlots;
use cohort_participant::AgentOptions;

use super::progress::Progress;
use super::served::SimPki;
use super::{Prepared, SimArgs, participant_id};

/// What the networked engine needs.
pub(super) struct NetworkedRun<'a> {
    pub(super) args: &'a SimArgs,
    pub(super) prep: &'a Prepared,
    pub(super) orch: Orchestrator,
    pub(super) store: &'a ModelStore,
    pub(super) pki: &'a SimPki,
    pub(super) custodian_ids: &'a [String],
    pub(super) progress: Progress,
}

/// The networked engine: a coordinator service on a loopback socket with mutual TLS, and one
/// participant agent (a gRPC client) per participant. Returns the completed rounds and the
/// federation's seconds.
pub(super) async fn networked(run: NetworkedRun<'_>) -> anyhow::Result<(Vec<RoundSummary>, f64)> {
    let NetworkedRun {
        args,
        prep,
        orch,
        store,
        pki,
        custodian_ids,
        mut progress,
    } = run;
    let n = args.participants;
    let coordinator = Coordinator::start(orch, store.clone()).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let (c, files) = (coordinator.clone(), pki.coordinator.clone());
        tokio::spawn(async move {
            c.serve_tls(listener, files, Duration::from_secs(3600), async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let mut events = coordinator.subscribe();
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    // Two descriptors a participant (its end and the coordinator's), in this one process.
    if let Err(e) = cohort_coordinator::raise_open_files_limit() {
        tracing::warn!(error = %e, "could not raise the open files limit");
    }
    let compute = ComputeSlots::for_this_machine(args.sharing)
        .context("starting the training thread pools")?;
    for (i, site) in prep.sites.iter().enumerate() {
        let opts = AgentOptions {
            id: participant_id(i),
            coordinator: format!("https://{addr}"),
            device: args.device,
            poll_wait: Duration::from_secs(10),
            reconnect_for: Duration::from_secs(30),
            faults: Default::default(),
            tls: Some(pki.client(&participant_id(i))?),
            stay_between_jobs: false,
            compute: Some(compute.clone()),
            min_noise_multiplier: None,
            state_dir: None,
        };
        let data = site.clone();
        agents.spawn(async move { (i + 1, cohort_participant::run(opts, data).await) });
    }
    for (k, id) in custodian_ids.iter().enumerate() {
        let opts = AgentOptions {
            id: id.clone(),
            coordinator: format!("https://{addr}"),
            device: args.device,
            poll_wait: Duration::from_secs(10),
            reconnect_for: Duration::from_secs(30),
            faults: Default::default(),
            tls: Some(pki.client(id)?),
            stay_between_jobs: false,
            compute: None,
            min_noise_multiplier: None,
            state_dir: None,
        };
        agents.spawn(async move { (n + k + 1, cohort_participant::run_custodian(opts).await) });
    }
    let progress = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            progress.on(&ev);
            if matches!(ev, Event::JobFinished { .. }) {
                break;
            }
        }
    });
    // Participants end when the job is finished (they are told so) or when they fail; a
    // failure ends the simulation at once (dropping the set aborts the others).
    while let Some(joined) = agents.join_next().await {
        match joined {
            Ok((_, Ok(_))) => {}
            Ok((i, Err(e))) => bail!("participant {i} failed: {e}"),
            Err(e) => bail!("a participant panicked: {e}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), coordinator.finished())
        .await
        .context("all participants ended but the job did not finish")?;
    let federation_seconds = started.elapsed().as_secs_f64();
    let _ = progress.await;
    let history = coordinator.history();
    let _ = stop_tx.send(());
    server.await?.map_err(anyhow::Error::msg)?;
    Ok((history, federation_seconds))
}
