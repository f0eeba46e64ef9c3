//! The driver's side of simulation workers: [`WorkerHub`], the state the `SimulationWorkers`
//! service shares with the engine's thread; the service itself; starting local worker
//! processes; and [`Remote`], the engine's handle on the workers' participants.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_coordinator::Orchestrator;
use cohort_coordinator::round::Task;
use cohort_protocol::pb;
use cohort_protocol::pb::simulation_workers_server::{SimulationWorkers, SimulationWorkersServer};
use tonic::{Request, Response, Status, Streaming};

use super::{RemoteParticipant, ResultParts, ShardResult, ShardStep, keys_from_pb};
use crate::simulate::client::Step;
use crate::simulate::participant_id;

/// How long the driver waits for every worker to register and prepare its data.
const READY_TIMEOUT: Duration = Duration::from_secs(900);

/// What the engine and the service share.
pub(in crate::simulate) struct WorkerHub {
    /// The plan every worker gets, but its range.
    plan: pb::WorkerPlan,
    /// Each shard's participants: indices [first, end).
    ranges: Vec<(usize, usize)>,
    /// The driver's own count of each participant's training examples, to check workers'.
    examples: Vec<u64>,
    /// Longest a step may take before the driver gives up on a silent worker.
    step_timeout: Duration,
    state: Mutex<HubState>,
    /// Wakes the engine's thread (a result arrived, a worker is ready or failed).
    engine: Condvar,
    /// Wakes the workers' held `NextStep` calls.
    workers: tokio::sync::Notify,
}

#[derive(Default)]
struct HubState {
    registered: Vec<bool>,
    ready: Vec<Option<Vec<RemoteParticipant>>>,
    step: u64,
    /// The current step's order for each shard (none: nothing for it this step).
    orders: Vec<Option<Arc<pb::WorkStep>>>,
    /// The round of the current step's orders, to read results with.
    round: u64,
    results: Vec<Option<ShardResult>>,
    finished: bool,
    failed: Option<String>,
}

impl WorkerHub {
    /// A hub for `shards` workers sharing `participants` (contiguous, as even as can be),
    /// each told `plan`; `examples` are the driver's counts of each one's training rows.
    pub(in crate::simulate) fn new(
        shards: usize,
        plan: pb::WorkerPlan,
        examples: Vec<u64>,
        step_timeout: Duration,
    ) -> Arc<Self> {
        let n = examples.len();
        let ranges = (0..shards)
            .map(|s| (s * n / shards, (s + 1) * n / shards))
            .collect();
        Arc::new(WorkerHub {
            plan,
            ranges,
            examples,
            step_timeout,
            state: Mutex::new(HubState {
                registered: vec![false; shards],
                ready: vec![None; shards],
                orders: vec![None; shards],
                results: (0..shards).map(|_| None).collect(),
                ..Default::default()
            }),
            engine: Condvar::new(),
            workers: tokio::sync::Notify::new(),
        })
    }

    pub(in crate::simulate) fn shards(&self) -> usize {
        self.ranges.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().expect("worker hub lock")
    }

    /// Ends the run with `why` (a worker failed or sent something wrong): the engine's wait
    /// returns it, and every worker is told the job is over.
    pub(in crate::simulate) fn fail(&self, why: String) {
        let mut s = self.lock();
        if s.failed.is_none() && !s.finished {
            tracing::debug!("simulation workers: {why}");
            s.failed = Some(why);
        }
        drop(s);
        self.engine.notify_all();
        self.workers.notify_waiters();
    }

    /// The job is over: workers asking for a step are told so and exit.
    pub(in crate::simulate) fn finish(&self) {
        self.lock().finished = true;
        self.workers.notify_waiters();
    }

    /// Waits (on the engine's thread) until every worker has registered and prepared its
    /// participants; returns them by shard.
    pub(in crate::simulate) fn wait_ready(&self) -> anyhow::Result<Vec<Vec<RemoteParticipant>>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut s = self.lock();
        loop {
            if let Some(why) = &s.failed {
                bail!("{why}");
            }
            if s.ready.iter().all(Option::is_some) {
                return Ok(s
                    .ready
                    .iter()
                    .map(|r| r.clone().expect("all ready"))
                    .collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> = (0..s.ready.len())
                    .filter(|&i| s.ready[i].is_none())
                    .collect();
                bail!(
                    "simulation workers {missing:?} were not ready within {} s (not started, or \
                     cannot reach this driver?)",
                    READY_TIMEOUT.as_secs()
                );
            }
            s = self
                .engine
                .wait_timeout(s, left)
                .expect("worker hub lock")
                .0;
        }
    }

    /// Hands each shard its order (none: nothing for it) and waits (on the engine's thread)
    /// for every ordered shard's result; returns them in shard order.
    fn step(&self, orders: Vec<Option<ShardStep>>, round: u64) -> anyhow::Result<Vec<ShardResult>> {
        let mut s = self.lock();
        s.step += 1;
        s.round = round;
        let step = s.step;
        s.orders = orders
            .iter()
            .map(|o| o.as_ref().map(|o| Arc::new(o.to_pb(step))))
            .collect();
        s.results = (0..orders.len()).map(|_| None).collect();
        self.workers.notify_waiters();
        let deadline = Instant::now() + self.step_timeout;
        loop {
            if let Some(why) = &s.failed {
                bail!("{why}");
            }
            let waiting: Vec<usize> = (0..orders.len())
                .filter(|&i| s.orders[i].is_some() && s.results[i].is_none())
                .collect();
            if waiting.is_empty() {
                return Ok(s.results.iter_mut().filter_map(Option::take).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "simulation workers {waiting:?} sent no result for step {step} within {} s",
                    self.step_timeout.as_secs()
                );
            }
            s = self
                .engine
                .wait_timeout(s, left)
                .expect("worker hub lock")
                .0;
        }
    }
}

/// The engine's handle on the participants of worker processes.
pub(in crate::simulate) struct Remote<'a> {
    pub(in crate::simulate) hub: &'a WorkerHub,
    /// Each shard's participants, in order.
    pub(in crate::simulate) shards: Vec<Vec<RemoteParticipant>>,
}

impl Remote<'_> {
    /// Each shard's training and evaluation tasks from the state machine, in participant
    /// order. The committee is the driver's own custodians: a worker's participant asked to
    /// decrypt is an error.
    pub(in crate::simulate) fn tasks(
        &self,
        orch: &Orchestrator,
    ) -> anyhow::Result<Vec<Vec<(String, Task)>>> {
        let mut out = Vec::with_capacity(self.shards.len());
        for (shard, ps) in self.shards.iter().enumerate() {
            let mut tasks = Vec::new();
            for p in ps {
                match orch.task_for(&p.id) {
                    t @ (Task::Train { .. } | Task::Evaluate { .. } | Task::Statistics { .. }) => {
                        tasks.push((p.id.clone(), t))
                    }
                    Task::Decrypt(_) => bail!(
                        "{} (in worker {shard}) was asked to decrypt: with workers the committee \
                         must be the driver's key custodians (--custodians)",
                        p.id
                    ),
                    Task::Idle | Task::Finished => {}
                }
            }
            out.push(tasks);
        }
        Ok(out)
    }

    /// Runs one step in the workers: each shard with tasks gets its order; returns their
    /// results in shard order.
    pub(in crate::simulate) fn run_step(
        &self,
        work: Vec<Vec<(String, Task)>>,
        step: &Step<'_>,
    ) -> anyhow::Result<Vec<ShardResult>> {
        let mut round = None;
        let mut orders = Vec::with_capacity(work.len());
        let global = Arc::new(step.global.to_vec());
        for tasks in work {
            if tasks.is_empty() {
                orders.push(None);
                continue;
            }
            let mut order = ShardStep {
                job_id: String::new(),
                round: 0,
                model_version: 0,
                model: step.spec.clone(),
                global: global.clone(),
                secure: None,
                emulation: step.quantize,
                train: Vec::new(),
                evaluate: Vec::new(),
                statistics: Vec::new(),
                data: step.data.cloned(),
                pipeline: step.pipeline.cloned(),
                clip_norm: None,
                clip_per_layer: false,
                noise_stddev: None,
                clip_indicator: None,
                control: None,
            };
            for (id, t) in tasks {
                let (r, version) = match t {
                    Task::Train {
                        round: r,
                        model_version,
                        config,
                        secure,
                        clip_norm,
                        clip_per_layer,
                        noise_stddev,
                        clip_indicator,
                        control,
                        ..
                    } => {
                        order.control = control;
                        order.clip_norm = clip_norm;
                        order.clip_per_layer = clip_per_layer;
                        order.noise_stddev = noise_stddev;
                        order.clip_indicator = clip_indicator;
                        if let Some(info) = &secure {
                            order.job_id = info.job.clone();
                        }
                        if order.secure.is_some() && order.secure != secure {
                            bail!("participants of one step encrypt for different rounds");
                        }
                        order.secure = secure;
                        order.train.push((id, config));
                        (r, model_version)
                    }
                    Task::Evaluate {
                        round: r,
                        model_version,
                        ..
                    } => {
                        order.evaluate.push(id);
                        (r, model_version)
                    }
                    Task::Statistics { secure, .. } => {
                        if let Some(info) = &secure {
                            order.job_id = info.job.clone();
                        }
                        if order.secure.is_some() && order.secure != secure {
                            bail!("participants of one step encrypt for different rounds");
                        }
                        order.secure = secure;
                        order.statistics.push(id);
                        (0, 0)
                    }
                    _ => unreachable!("tasks() keeps training and evaluation only"),
                };
                if *round.get_or_insert(r) != r {
                    bail!(
                        "participants of one step work on rounds {} and {r}",
                        round.unwrap_or(r)
                    );
                }
                order.round = r;
                order.model_version = version;
            }
            orders.push(Some(order));
        }
        self.hub.step(orders, round.unwrap_or(0))
    }
}

/// The `SimulationWorkers` service over the hub.
#[derive(Clone)]
pub(in crate::simulate) struct HubService(pub(in crate::simulate) Arc<WorkerHub>);

impl HubService {
    pub(in crate::simulate) fn server(self) -> SimulationWorkersServer<HubService> {
        SimulationWorkersServer::new(self)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    fn shard(&self, shard: u32) -> Result<usize, Status> {
        let s = shard as usize;
        if s >= self.0.shards() {
            return Err(Status::invalid_argument(format!(
                "shard {shard}: this simulation has {} workers (shards 0 to {})",
                self.0.shards(),
                self.0.shards() - 1
            )));
        }
        Ok(s)
    }
}

#[tonic::async_trait]
impl SimulationWorkers for HubService {
    async fn register(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::WorkerPlan>, Status> {
        let r = req.into_inner();
        let hub = &self.0;
        if r.version != env!("CARGO_PKG_VERSION") {
            return Err(Status::failed_precondition(format!(
                "worker version {} differs from the driver's {}",
                r.version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        if r.shards as usize != hub.shards() {
            return Err(Status::invalid_argument(format!(
                "the worker expects {} shards, the simulation has {}",
                r.shards,
                hub.shards()
            )));
        }
        let s = self.shard(r.shard)?;
        let mut st = hub.lock();
        if st.registered[s] {
            // A restarted worker would bring new keys into a running job.
            return Err(Status::already_exists(format!(
                "shard {s} has a worker already; a worker cannot rejoin a running simulation"
            )));
        }
        st.registered[s] = true;
        let (first, end) = hub.ranges[s];
        Ok(Response::new(pb::WorkerPlan {
            first: first as u32,
            end: end as u32,
            ..hub.plan.clone()
        }))
    }

    async fn ready(
        &self,
        req: Request<pb::WorkerReady>,
    ) -> Result<Response<pb::WorkerReadyResponse>, Status> {
        let r = req.into_inner();
        let hub = &self.0;
        let s = self.shard(r.shard)?;
        let (first, end) = hub.ranges[s];
        let mut participants = Vec::with_capacity(end - first);
        let mismatch = |why: String| {
            let why = format!("worker {s}'s data differs from the driver's: {why}");
            hub.fail(why.clone());
            Status::failed_precondition(why)
        };
        if r.participants.len() != end - first {
            return Err(mismatch(format!(
                "{} participants, expected {}",
                r.participants.len(),
                end - first
            )));
        }
        for (i, p) in (first..end).zip(&r.participants) {
            if p.participant_id != participant_id(i) {
                return Err(mismatch(format!(
                    "it announced {} where {} belongs",
                    p.participant_id,
                    participant_id(i)
                )));
            }
            if p.train_examples != hub.examples[i] {
                return Err(mismatch(format!(
                    "{} has {} training rows in the worker and {} here (the same dataset at \
                     the same path?)",
                    p.participant_id, p.train_examples, hub.examples[i]
                )));
            }
            participants.push(RemoteParticipant {
                id: p.participant_id.clone(),
                examples: p.train_examples,
                keys: p.keys.as_ref().map(keys_from_pb).transpose().map_err(|e| {
                    Status::invalid_argument(format!("{}: keys: {e}", p.participant_id))
                })?,
            });
        }
        let mut st = hub.lock();
        if !st.registered[s] || st.ready[s].is_some() {
            return Err(Status::failed_precondition(format!(
                "shard {s}: ready before registering, or twice"
            )));
        }
        st.ready[s] = Some(participants);
        drop(st);
        hub.engine.notify_all();
        Ok(Response::new(pb::WorkerReadyResponse {}))
    }

    async fn next_step(
        &self,
        req: Request<pb::NextStepRequest>,
    ) -> Result<Response<pb::WorkStep>, Status> {
        let r = req.into_inner();
        let hub = &self.0;
        let s = self.shard(r.shard)?;
        let wait = Duration::from_millis(u64::from(r.wait_ms).min(60_000));
        let notified = hub.workers.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let pending = || -> Option<pb::WorkStep> {
            let st = hub.lock();
            if st.finished || st.failed.is_some() {
                return Some(pb::WorkStep {
                    finished: true,
                    ..Default::default()
                });
            }
            st.orders[s]
                .as_ref()
                .filter(|o| o.step > r.after && st.results[s].is_none())
                .map(|o| (**o).clone())
        };
        if let Some(step) = pending() {
            return Ok(Response::new(step));
        }
        let _ = tokio::time::timeout(wait, notified).await;
        Ok(Response::new(pending().unwrap_or_default()))
    }

    async fn submit_step(
        &self,
        req: Request<Streaming<pb::StepResult>>,
    ) -> Result<Response<pb::StepResultResponse>, Status> {
        let mut stream = req.into_inner();
        let hub = &self.0;
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("an empty result"));
        };
        let (s, step) = (self.shard(first.shard)?, first.step);
        let round = {
            let st = hub.lock();
            let current = st.orders[s].as_ref().map(|o| o.step);
            if current != Some(step) || st.results[s].is_some() {
                return Err(Status::failed_precondition(format!(
                    "shard {s}: a result for step {step}, which is not open for it"
                )));
            }
            st.round
        };
        let malformed = |e: anyhow::Error| {
            let why = format!("worker {s} sent a malformed result: {e:#}");
            hub.fail(why.clone());
            Status::invalid_argument(why)
        };
        let mut parts = ResultParts::first(first, round).map_err(malformed)?;
        while let Some(part) = stream.message().await? {
            if (part.shard, part.step) != (s as u32, step) {
                return Err(malformed(anyhow::anyhow!(
                    "a part of shard {} step {} in the stream of shard {s} step {step}",
                    part.shard,
                    part.step
                )));
            }
            parts.push(part).map_err(malformed)?;
        }
        let result = parts.finish().map_err(malformed)?;
        hub.lock().results[s] = Some(result);
        hub.engine.notify_all();
        Ok(Response::new(pb::StepResultResponse {}))
    }
}

/// Local worker processes (`cohort simulate --workers N` on one machine): `exe sim-worker …`
/// for every shard, each on its share of the cores, with the simulation's throw-away TLS
/// material. A worker that exits before the job is over fails the run with its status.
pub(in crate::simulate) fn spawn_local(
    exe: &std::path::Path,
    hub: &Arc<WorkerHub>,
    driver: std::net::SocketAddr,
    tls_dir: &std::path::Path,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let shards = hub.shards();
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / shards).max(1);
    let mut watchers = Vec::with_capacity(shards);
    for shard in 0..shards {
        let mut child = tokio::process::Command::new(exe)
            .arg("sim-worker")
            .args(["--driver", &format!("https://{driver}")])
            .args([
                "--shard",
                &shard.to_string(),
                "--shards",
                &shards.to_string(),
            ])
            .arg("--tls")
            .arg(tls_dir)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {shard} ({})", exe.display()))?;
        let hub = hub.clone();
        watchers.push(tokio::spawn(async move {
            match child.wait().await {
                Ok(status) if status.success() => {}
                Ok(status) => hub.fail(format!("worker {shard} exited with {status}")),
                Err(e) => hub.fail(format!("worker {shard}: {e}")),
            }
        }));
    }
    Ok(watchers)
}

/// Each participant's training examples, by index, for checking workers' data.
pub(in crate::simulate) fn examples_of(sites: &[cohort_participant::SiteData]) -> Vec<u64> {
    sites.iter().map(|s| s.examples()).collect()
}

/// The driver's running side of the workers: the hub, its service, and local workers.
pub(in crate::simulate) struct Workers {
    pub(in crate::simulate) hub: Arc<WorkerHub>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    tls_tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// Longest one step may take in the workers before the driver gives up on them.
const STEP_TIMEOUT: Duration = Duration::from_secs(3600);

impl Workers {
    /// Serves `SimulationWorkers` over mutual TLS on `listen` with `tls` and, unless the
    /// workers are started elsewhere (`exe` none), starts them from `exe` with `worker_tls`.
    pub(in crate::simulate) async fn start(
        shards: usize,
        plan: pb::WorkerPlan,
        examples: Vec<u64>,
        listen: std::net::SocketAddr,
        tls: cohort_protocol::tls::TlsFiles,
        local: Option<(&std::path::Path, &std::path::Path)>,
    ) -> anyhow::Result<Self> {
        let hub = WorkerHub::new(shards, plan, examples, STEP_TIMEOUT);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening for simulation workers on {listen}"))?;
        let addr = listener.local_addr()?;
        let (incoming, tls_tasks) =
            cohort_protocol::server::incoming(listener, tls, Duration::from_secs(30))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HubService(hub.clone()).server())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        let watchers = match local {
            Some((exe, worker_tls)) => spawn_local(exe, &hub, addr, worker_tls)?,
            None => {
                tracing::info!(%addr, shards, "waiting for simulation workers to dial in");
                Vec::new()
            }
        };
        Ok(Workers {
            hub,
            watchers,
            server,
            tls_tasks,
            stop,
        })
    }

    /// Lets the workers see the end of the job and exit (killing any still running after a
    /// grace period), then stops the service.
    pub(in crate::simulate) async fn stop(self) {
        for w in self.watchers {
            let abort = w.abort_handle();
            if tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .is_err()
            {
                abort.abort(); // drops the child: killed
            }
        }
        let _ = self.stop.send(());
        let _ = self.server.await;
        for t in self.tls_tasks {
            t.abort();
        }
    }
}
