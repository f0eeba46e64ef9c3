//! The inference service: the promoted global model answering `Predict`, `PredictBatch` and
//! `ModelInfo` over gRPC, in `cohort serve` or embedded in the coordinator.
//!
//! - **Workers.** Each served version runs on one OS thread that owns its Burn model (wgpu or
//!   CPU, f32 or int8). Requests reach it through a queue; the worker takes what is
//!   waiting, up to `max_batch` examples or until the oldest has waited `max_wait_us`, and
//!   runs them as one forward pass (micro-batching). Examples waiting across all workers are
//!   bounded by `queue`: past it a request is refused with `RESOURCE_EXHAUSTED` at once, so
//!   memory stays bounded and callers back off.
//! - **Hot reload.** A switch builds the new version's workers (weights read and checked from
//!   the registry, model built, one warm-up pass) before it swaps the deployment pointer. A
//!   request holds the deployment it started with, so requests in flight finish on the old
//!   version; the old workers exit when the last of them is answered. No request fails.
//! - **A/B.** With `[inference.candidate]`, a second version of the promoted job takes a
//!   fixed share of requests (a low-discrepancy sequence, so the share is exact over any
//!   window). Every answer names its version and variant; metrics are per version.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use cohort_model::{ComputeDevice, InferenceModel, Precision};
use cohort_protocol::pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tonic::{Request, Response, Status};

use crate::model_store::{ModelManifest, ModelStore};
use crate::state::ModelRef;

/// Which device serves: `auto` takes a GPU when wgpu finds one (discrete or integrated) and
/// the CPU otherwise; `wgpu` takes wgpu's default adapter, a software one included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Wgpu,
    /// Burn's flex backend (`ndarray`, the backend cohort used before, is accepted too).
    #[serde(alias = "ndarray")]
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "wgpu" | "gpu" => Ok(DeviceChoice::Wgpu),
            "cpu" | "ndarray" => Ok(DeviceChoice::Cpu),
            _ => Err(format!("unknown device {s:?}: use auto, wgpu or cpu")),
        }
    }
}

impl DeviceChoice {
    /// The device to run on; `auto` probes for a GPU adapter.
    pub fn resolve(self) -> ComputeDevice {
        match self {
            DeviceChoice::Wgpu => ComputeDevice::Wgpu,
            DeviceChoice::Cpu => ComputeDevice::Cpu,
            DeviceChoice::Auto => {
                if ComputeDevice::gpu_available() {
                    ComputeDevice::Wgpu
                } else {
                    tracing::info!("no GPU adapter found: serving on the CPU");
                    ComputeDevice::Cpu
                }
            }
        }
    }
}

fn default_max_batch() -> usize {
    32
}
fn default_max_wait_us() -> u64 {
    2_000
}
fn default_queue() -> usize {
    1_024
}

/// `[inference]`: how a version is served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceSettings {
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default)]
    pub precision: Precision,
    /// Most examples in one forward pass (1 turns micro-batching off).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest an example waits for others to share its batch, in microseconds.
    #[serde(default = "default_max_wait_us")]
    pub max_wait_us: u64,
    /// Most examples waiting at once; past it requests are refused (RESOURCE_EXHAUSTED).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// An A/B split: another version of the promoted job takes `share` of requests.
    #[serde(default)]
    pub candidate: Option<Candidate>,
    /// Examples per second one caller (one client certificate; one address without TLS) may
    /// have predicted, sustained; 0 for no limit. Bounds how fast one application can query
    /// the model (and so extract it). Over it: RESOURCE_EXHAUSTED.
    #[serde(default)]
    pub caller_rate: f64,
    /// Examples one caller may send in a burst above `caller_rate` (default: one second's).
    #[serde(default)]
    pub caller_burst: Option<f64>,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        InferenceSettings {
            device: DeviceChoice::Auto,
            precision: Precision::F32,
            max_batch: default_max_batch(),
            max_wait_us: default_max_wait_us(),
            queue: default_queue(),
            candidate: None,
            caller_rate: 0.0,
            caller_burst: None,
        }
    }
}

/// `[inference.candidate]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// A version of the promoted job.
    pub version: u64,
    /// Fraction of requests it answers, strictly between 0 and 1.
    pub share: f64,
}

impl InferenceSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.max_batch > 4096 {
            return Err(format!(
                "inference.max_batch must be 1 to 4096, not {}",
                self.max_batch
            ));
        }
        if self.queue < self.max_batch {
            return Err(format!(
                "inference.queue ({}) must be at least inference.max_batch ({})",
                self.queue, self.max_batch
            ));
        }
        if self.max_wait_us > 1_000_000 {
            return Err(format!(
                "inference.max_wait_us must be at most 1000000 (1 s), not {}",
                self.max_wait_us
            ));
        }
        if !(self.caller_rate >= 0.0 && self.caller_rate.is_finite()) {
            return Err(format!(
                "inference.caller_rate must be 0 (no limit) or a positive number, not {}",
                self.caller_rate
            ));
        }
        if let Some(b) = self.caller_burst
            && !(b >= 1.0 && b.is_finite())
        {
            return Err(format!(
                "inference.caller_burst must be at least 1, not {b}"
            ));
        }
        if let Some(c) = &self.candidate
            && !(c.share > 0.0 && c.share < 1.0)
        {
            return Err(format!(
                "inference.candidate.share must be strictly between 0 and 1, not {}",
                c.share
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Metrics

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    variant: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    variant: String,
    version: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LabelledLabel {
    variant: String,
    version: String,
    correct: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
    precision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServedLabel {
    variant: String,
    job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabel {
    outcome: String,
}

/// The inference service's metrics (registered by [`crate::metrics::Metrics`]).
#[derive(Clone)]
pub struct InferenceMetrics {
    requests: Family<OutcomeLabel, Counter>,
    examples: Family<VersionLabel, Counter>,
    latency: Family<VersionLabel, Histogram, fn() -> Histogram>,
    batch_size: Family<VersionLabel, Histogram, fn() -> Histogram>,
    labelled: Family<LabelledLabel, Counter>,
    queued: Gauge,
    device: Family<DeviceLabel, Gauge>,
    served: Family<ServedLabel, Gauge>,
    reloads: Family<ReloadLabel, Counter>,
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
    ])
}

fn batch_buckets() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
}

impl InferenceMetrics {
    pub fn new() -> Self {
        InferenceMetrics {
            requests: Family::default(),
            examples: Family::default(),
            latency: Family::new_with_constructor(latency_buckets),
            batch_size: Family::new_with_constructor(batch_buckets),
            labelled: Family::default(),
            queued: Gauge::default(),
            device: Family::default(),
            served: Family::default(),
            reloads: Family::default(),
        }
    }

    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "inference_requests",
            "Inference requests answered, by variant, version and outcome (ok, invalid, \
             exhausted, limited, unavailable, error)",
            self.requests.clone(),
        );
        r.register(
            "inference_examples",
            "Examples predicted, by variant and version",
            self.examples.clone(),
        );
        r.register_with_unit(
            "inference_request_duration",
            "Time from a request's arrival to its answer",
            prometheus_client::registry::Unit::Seconds,
            self.latency.clone(),
        );
        r.register(
            "inference_batch_size",
            "Examples per forward pass",
            self.batch_size.clone(),
        );
        r.register(
            "inference_labelled",
            "Examples sent with their true class, by version and whether the prediction was \
             correct",
            self.labelled.clone(),
        );
        r.register(
            "inference_queued_examples",
            "Examples waiting for a forward pass",
            self.queued.clone(),
        );
        r.register(
            "inference_device",
            "The device and precision the inference service runs on (value 1)",
            self.device.clone(),
        );
        r.register(
            "inference_serving_version",
            "The model version each variant serves",
            self.served.clone(),
        );
        r.register(
            "inference_reloads",
            "Switches to another model version, by outcome",
            self.reloads.clone(),
        );
    }

    fn version(v: &Variant) -> VersionLabel {
        VersionLabel {
            variant: v.name.into(),
            version: v.model.version.to_string(),
        }
    }

    fn outcome(&self, v: Option<&Variant>, outcome: &str) {
        let (variant, version) = match v {
            Some(v) => (v.name.to_string(), v.model.version.to_string()),
            None => (String::new(), String::new()),
        };
        self.requests
            .get_or_create(&OutcomeLabel {
                variant,
                version,
                outcome: outcome.into(),
            })
            .inc();
    }
}

// ---------------------------------------------------------------------------------------
// Workers

type Reply = tokio::sync::oneshot::Sender<Result<Vec<f32>, String>>;

struct Item {
    x: Vec<f32>,
    rows: usize,
    enqueued: Instant,
    reply: Reply,
}

/// One served version: a worker thread and what callers need to know about it.
struct Variant {
    name: &'static str,
    model: ModelRef,
    manifest: ModelManifest,
    share: f64,
    input_len: usize,
    classes: usize,
    quantized: Vec<String>,
    tx: mpsc::Sender<Item>,
}

/// What is being served: variant a, and b when there is an A/B split.
struct Deployment {
    variants: Vec<Arc<Variant>>,
}

impl Deployment {
    /// The variant for request number `k`: b when the fractional part of k·φ falls under
    /// its share (a low-discrepancy sequence: the split is exact over any window).
    fn pick(&self, k: u64) -> &Arc<Variant> {
        match self.variants.as_slice() {
            [a, b] if to_candidate(k, b.share) => b,
            vs => &vs[0],
        }
    }
}

/// Whether request number `k` goes to a candidate taking `share` of requests.
fn to_candidate(k: u64, share: f64) -> bool {
    (k as f64 * 0.618_033_988_749_894_9).fract() < share
}

struct WorkerParams {
    max_batch: usize,
    max_wait: Duration,
    queued: Arc<AtomicUsize>,
    metrics: InferenceMetrics,
    label: VersionLabel,
}

/// Starts a worker thread for `params`; returns once the model is built and warmed up.
fn spawn_worker(
    manifest: &ModelManifest,
    params: Vec<f32>,
    device: ComputeDevice,
    precision: Precision,
    wp: WorkerParams,
) -> Result<(mpsc::Sender<Item>, Vec<String>), String> {
    let (tx, rx) = mpsc::channel::<Item>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<String>, String>>();
    let spec = manifest.model.clone();
    let name = format!("infer-{}-v{}", manifest.job_id, manifest.version);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let model = match InferenceModel::load(&spec, &params, device, precision) {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            drop(params);
            // Warm up: the first pass of each shape compiles wgpu's kernels.
            let d = model.input_len();
            for rows in [1, wp.max_batch] {
                if let Err(e) = model.logits(&vec![0.0; rows * d], rows) {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(model.quantized_tensors().to_vec()));
            worker_loop(&model, rx, &wp);
        })
        .map_err(|e| format!("starting an inference worker: {e}"))?;
    let quantized = ready_rx
        .recv()
        .map_err(|_| "the inference worker stopped while loading".to_string())??;
    Ok((tx, quantized))
}

fn worker_loop(model: &InferenceModel, rx: mpsc::Receiver<Item>, wp: &WorkerParams) {
    let mut carried: Option<Item> = None;
    loop {
        let first = match carried.take() {
            Some(i) => i,
            None => match rx.recv() {
                Ok(i) => i,
                // Every sender is gone: this version is no longer served and nothing waits.
                Err(_) => return,
            },
        };
        // The oldest example waits at most `max_wait` for company.
        let deadline = first.enqueued + wp.max_wait;
        let mut rows = first.rows;
        let mut items = vec![first];
        while rows < wp.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if left.is_zero() {
                rx.try_recv().ok()
            } else {
                rx.recv_timeout(left).ok()
            };
            match next {
                Some(i) if rows + i.rows <= wp.max_batch => {
                    rows += i.rows;
                    items.push(i);
                }
                Some(i) => {
                    carried = Some(i);
                    break;
                }
                None => break,
            }
        }
        let x: Vec<f32> = match items.as_mut_slice() {
            // One request: its buffer is the batch.
            [only] => std::mem::take(&mut only.x),
            all => all.iter().flat_map(|i| i.x.iter().copied()).collect(),
        };
        wp.metrics
            .batch_size
            .get_or_create(&wp.label)
            .observe(rows as f64);
        // A panic inside Burn fails this batch's requests, not the worker.
        let out =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.logits_vec(x, rows)))
                .unwrap_or_else(|_| {
                    Err(cohort_model::ModelError::Store(
                        "the forward pass panicked".into(),
                    ))
                });
        wp.queued.fetch_sub(rows, Ordering::SeqCst);
        wp.metrics
            .queued
            .set(wp.queued.load(Ordering::SeqCst) as i64);
        let classes = model.spec().classes();
        match out {
            Ok(logits) => {
                let mut at = 0;
                for i in items {
                    let n = i.rows * classes;
                    let _ = i.reply.send(Ok(logits[at..at + n].to_vec()));
                    at += n;
                }
            }
            Err(e) => {
                for i in items {
                    let _ = i.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The server

struct Inner {
    settings: InferenceSettings,
    device: ComputeDevice,
    store: ModelStore,
    current: RwLock<Option<Arc<Deployment>>>,
    switching: Mutex<()>,
    queued: Arc<AtomicUsize>,
    counter: AtomicU64,
    metrics: InferenceMetrics,
    require_certificates: AtomicBool,
    /// Per-caller token buckets, when `caller_rate` is set.
    limiter: Option<crate::service::RateLimiter>,
}

/// The inference service. Cheap to clone.
#[derive(Clone)]
pub struct Inference {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("device", &self.inner.device)
            .field("serving", &self.serving())
            .finish()
    }
}

impl Inference {
    /// A service reading versions from `store` (the registry root, not one job's), serving
    /// nothing until [`Self::switch`].
    pub fn new(
        store: ModelStore,
        settings: InferenceSettings,
        metrics: InferenceMetrics,
    ) -> Result<Self, String> {
        settings.validate()?;
        let device = settings.device.resolve();
        metrics
            .device
            .get_or_create(&DeviceLabel {
                device: device.to_string(),
                precision: settings.precision.to_string(),
            })
            .set(1);
        tracing::info!(%device, precision = %settings.precision, "inference service");
        let limiter = (settings.caller_rate > 0.0).then(|| {
            crate::service::RateLimiter::new(
                settings.caller_rate,
                settings
                    .caller_burst
                    .unwrap_or(settings.caller_rate.max(1.0)),
            )
        });
        Ok(Inference {
            inner: Arc::new(Inner {
                settings,
                device,
                store,
                current: RwLock::new(None),
                switching: Mutex::new(()),
                queued: Arc::new(AtomicUsize::new(0)),
                counter: AtomicU64::new(0),
                metrics,
                require_certificates: AtomicBool::new(false),
                limiter,
            }),
        })
    }

    pub fn device(&self) -> ComputeDevice {
        self.inner.device
    }

    /// The version variant a serves, if any.
    pub fn serving(&self) -> Option<ModelRef> {
        self.deployment().map(|d| d.variants[0].model.clone())
    }

    fn deployment(&self) -> Option<Arc<Deployment>> {
        self.inner.current.read().expect("deployment lock").clone()
    }

    /// Every call must then come from an inference or admin certificate.
    pub fn require_certificates(&self) {
        self.inner
            .require_certificates
            .store(true, Ordering::SeqCst);
    }

    /// Serves `to` (and the configured candidate of its job): loads and warms the new
    /// workers, then swaps them in. Blocking (reads weights, builds models). Requests keep
    /// being answered by the old version until the swap, and those under way finish on it.
    pub fn switch(&self, to: &ModelRef) -> Result<(), String> {
        let inner = &self.inner;
        let _one_at_a_time = inner.switching.lock().expect("switch lock");
        if self.serving().as_ref() == Some(to) {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.build(to);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        inner
            .metrics
            .reloads
            .get_or_create(&ReloadLabel {
                outcome: outcome.into(),
            })
            .inc();
        let dep = result?;
        inner.metrics.served.clear();
        for v in &dep.variants {
            inner
                .metrics
                .served
                .get_or_create(&ServedLabel {
                    variant: v.name.into(),
                    job_id: v.model.job_id.clone(),
                })
                .set(v.model.version as i64);
        }
        let versions: Vec<String> = dep
            .variants
            .iter()
            .map(|v| format!("{}=v{}", v.name, v.model.version))
            .collect();
        *inner.current.write().expect("deployment lock") = Some(Arc::new(dep));
        tracing::info!(
            job = %to.job_id,
            versions = %versions.join(" "),
            seconds = started.elapsed().as_secs_f64(),
            "serving"
        );
        Ok(())
    }

    fn build(&self, to: &ModelRef) -> Result<Deployment, String> {
        let inner = &self.inner;
        let mut variants = vec![Arc::new(self.variant("a", to, 1.0)?)];
        if let Some(c) = &inner.settings.candidate
            && c.version != to.version
        {
            let b = ModelRef {
                job_id: to.job_id.clone(),
                version: c.version,
            };
            match self.variant("b", &b, c.share) {
                Ok(v) => {
                    variants.push(Arc::new(v));
                }
                Err(e) => {
                    // The promoted version is served alone rather than not at all.
                    tracing::error!(
                        candidate = c.version,
                        error = %e,
                        "the A/B candidate cannot be served; serving the promoted version alone"
                    );
                }
            }
        }
        Ok(Deployment { variants })
    }

    fn variant(&self, name: &'static str, m: &ModelRef, share: f64) -> Result<Variant, String> {
        let inner = &self.inner;
        let store = inner.store.for_job(&m.job_id);
        let what = |e: crate::model_store::StoreError| {
            format!("version {} of job {:?}: {e}", m.version, m.job_id)
        };
        let (manifest, params) = store.read_version(m.version).map_err(what)?;
        let wp = WorkerParams {
            max_batch: inner.settings.max_batch,
            max_wait: Duration::from_micros(inner.settings.max_wait_us),
            queued: inner.queued.clone(),
            metrics: inner.metrics.clone(),
            label: VersionLabel {
                variant: name.into(),
                version: m.version.to_string(),
            },
        };
        let (tx, quantized) = spawn_worker(
            &manifest,
            params,
            inner.device,
            inner.settings.precision,
            wp,
        )?;
        Ok(Variant {
            name,
            model: m.clone(),
            input_len: manifest.model.input_shape().len(),
            classes: manifest.model.classes(),
            manifest,
            share,
            quantized,
            tx,
        })
    }

    /// Follows the registry's serving pointer (written by the coordinator on promote and
    /// rollback), checking every `interval`. A version that failed to load is tried again
    /// only after `RELOAD_RETRY` (or once the pointer moves), not at every check. Runs until
    /// the task is dropped.
    pub async fn follow_registry(self, interval: Duration) {
        const RELOAD_RETRY: Duration = Duration::from_secs(30);
        let mut failed: Option<(ModelRef, Instant)> = None;
        let mut last_error = String::new();
        loop {
            let me = self.clone();
            let skip = failed.clone();
            let r = tokio::task::spawn_blocking(move || {
                let to = me
                    .inner
                    .store
                    .read_serving()
                    .map_err(|e| (None, e.to_string()))?;
                match to {
                    Some(to)
                        if !skip
                            .as_ref()
                            .is_some_and(|(f, at)| *f == to && at.elapsed() < RELOAD_RETRY) =>
                    {
                        me.switch(&to).map_err(|e| (Some(to), e))
                    }
                    _ => Ok(()),
                }
            })
            .await
            .unwrap_or_else(|e| Err((None, e.to_string())));
            match r {
                Ok(()) => last_error.clear(),
                Err((to, e)) => {
                    if let Some(to) = to {
                        failed = Some((to, Instant::now()));
                    }
                    if e != last_error {
                        tracing::error!(error = %e, "following the promoted version");
                        last_error = e;
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Refuses `caller` when `rows` more examples would take it over its rate.
    fn limit(&self, caller: &str, rows: usize) -> Result<(), Status> {
        let Some(l) = &self.inner.limiter else {
            return Ok(());
        };
        if l.allow_n(caller, Instant::now(), rows as f64) {
            return Ok(());
        }
        self.inner.metrics.outcome(None, "limited");
        tracing::warn!(%caller, rows, "refused: over the inference rate limit");
        Err(Status::resource_exhausted(format!(
            "{caller}: over the limit of {} examples per second; slow down",
            self.inner.settings.caller_rate
        )))
    }

    /// Queues `rows` examples on one variant and waits for their logits.
    async fn run(
        &self,
        x: Vec<f32>,
        rows: usize,
    ) -> Result<(Arc<Variant>, Vec<f32>, Instant), Status> {
        let started = Instant::now();
        let inner = &self.inner;
        let dep = self.deployment().ok_or_else(|| {
            inner.metrics.outcome(None, "unavailable");
            Status::unavailable("no model version has been promoted for serving yet")
        })?;
        let k = inner.counter.fetch_add(1, Ordering::Relaxed);
        let v = dep.pick(k).clone();
        // The deployment is no longer needed: the variant keeps its worker alive.
        drop(dep);
        if x.len() != rows * v.input_len {
            inner.metrics.outcome(Some(&v), "invalid");
            return Err(Status::invalid_argument(format!(
                "each example must have {} features (the model's input); got {} values for {rows} \
                 example(s)",
                v.input_len,
                x.len()
            )));
        }
        if let Some(i) = x.iter().position(|f| !f.is_finite()) {
            inner.metrics.outcome(Some(&v), "invalid");
            return Err(Status::invalid_argument(format!(
                "feature {} of example {} is not a finite number",
                i % v.input_len,
                i / v.input_len
            )));
        }
        let cap = inner.settings.queue;
        let before = inner.queued.fetch_add(rows, Ordering::SeqCst);
        if before + rows > cap {
            inner.queued.fetch_sub(rows, Ordering::SeqCst);
            inner.metrics.outcome(Some(&v), "exhausted");
            return Err(Status::resource_exhausted(format!(
                "the inference queue is full ({before} of {cap} examples waiting); retry with \
                 backoff"
            )));
        }
        inner.metrics.queued.set((before + rows) as i64);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = v.tx.send(Item {
            x,
            rows,
            enqueued: Instant::now(),
            reply,
        });
        if sent.is_err() {
            inner.queued.fetch_sub(rows, Ordering::SeqCst);
            inner.metrics.outcome(Some(&v), "error");
            return Err(Status::internal("the inference worker has stopped"));
        }
        match answer.await {
            Ok(Ok(logits)) => Ok((v, logits, started)),
            Ok(Err(e)) => {
                inner.metrics.outcome(Some(&v), "error");
                Err(Status::internal(format!("inference failed: {e}")))
            }
            Err(_) => {
                inner.metrics.outcome(Some(&v), "error");
                Err(Status::internal("the inference worker has stopped"))
            }
        }
    }

    fn answered(&self, v: &Variant, started: Instant, examples: usize) {
        let m = &self.inner.metrics;
        let l = InferenceMetrics::version(v);
        m.outcome(Some(v), "ok");
        m.examples.get_or_create(&l).inc_by(examples as u64);
        m.latency
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    fn count_labels(&self, v: &Variant, preds: &[pb::Prediction], labels: &[Option<u32>]) {
        for (p, l) in preds.iter().zip(labels) {
            if let Some(l) = l {
                self.inner
                    .metrics
                    .labelled
                    .get_or_create(&LabelledLabel {
                        variant: v.name.into(),
                        version: v.model.version.to_string(),
                        correct: (p.class == *l).to_string(),
                    })
                    .inc();
            }
        }
    }

    /// The tonic service.
    pub fn service(&self) -> pb::inference_server::InferenceServer<InferenceApi> {
        pb::inference_server::InferenceServer::new(InferenceApi(self.clone()))
            .max_decoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES)
    }

    /// The caller's identity (its certificate's, or its address on a plaintext listener),
    /// once its role is checked.
    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        use cohort_crypto::pki::Role;
        if !self.inner.require_certificates.load(Ordering::SeqCst) {
            return Ok(req
                .remote_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into()));
        }
        crate::service::certificate_identity(
            req,
            &[Role::Inference, Role::Admin],
            "the Inference service is for inference clients and admins",
        )
    }
}

fn served(v: &Variant, device: ComputeDevice, precision: Precision) -> pb::ServedModel {
    pb::ServedModel {
        job_id: v.model.job_id.clone(),
        version: v.model.version,
        variant: v.name.into(),
        precision: precision.to_string(),
        device: device.to_string(),
    }
}

fn predictions(logits: &[f32], classes: usize) -> Vec<pb::Prediction> {
    logits
        .chunks(classes)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let class = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, v)| if *v > row[best] { i } else { best });
            pb::Prediction {
                class: class as u32,
                probabilities: exp.iter().map(|e| e / sum).collect(),
                logits: row.to_vec(),
            }
        })
        .collect()
}

/// The gRPC face of [`Inference`].
#[derive(Clone)]
pub struct InferenceApi(Inference);

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceApi {
    async fn predict(
        &self,
        req: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let caller = self.0.caller(&req)?;
        self.0.limit(&caller, 1)?;
        let ex = req
            .into_inner()
            .example
            .ok_or_else(|| Status::invalid_argument("the request has no example"))?;
        let (v, logits, started) = self.0.run(ex.features, 1).await?;
        let mut preds = predictions(&logits, v.classes);
        self.0.count_labels(&v, &preds, &[ex.label]);
        self.0.answered(&v, started, 1);
        let i = &self.0.inner;
        Ok(Response::new(pb::PredictResponse {
            prediction: preds.pop(),
            model: Some(served(&v, i.device, i.settings.precision)),
        }))
    }

    async fn predict_batch(
        &self,
        req: Request<pb::PredictBatchRequest>,
    ) -> Result<Response<pb::PredictBatchResponse>, Status> {
        let caller = self.0.caller(&req)?;
        let examples = req.into_inner().examples;
        let rows = examples.len();
        let cap = self.0.inner.settings.queue;
        if rows == 0 {
            return Err(Status::invalid_argument("the batch has no examples"));
        }
        if rows > cap {
            return Err(Status::invalid_argument(format!(
                "a batch may hold at most {cap} examples (the queue's capacity), not {rows}"
            )));
        }
        self.0.limit(&caller, rows)?;
        let labels: Vec<Option<u32>> = examples.iter().map(|e| e.label).collect();
        let x: Vec<f32> = examples.into_iter().flat_map(|e| e.features).collect();
        let (v, logits, started) = self.0.run(x, rows).await?;
        let preds = predictions(&logits, v.classes);
        self.0.count_labels(&v, &preds, &labels);
        self.0.answered(&v, started, rows);
        let i = &self.0.inner;
        Ok(Response::new(pb::PredictBatchResponse {
            predictions: preds,
            model: Some(served(&v, i.device, i.settings.precision)),
        }))
    }

    async fn model_info(
        &self,
        req: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        self.0.caller(&req)?;
        let i = &self.0.inner;
        let variants = self
            .0
            .deployment()
            .map(|d| {
                let total_b: f64 = d.variants.iter().skip(1).map(|v| v.share).sum();
                d.variants
                    .iter()
                    .enumerate()
                    .map(|(k, v)| pb::VariantInfo {
                        model: Some(served(v, i.device, i.settings.precision)),
                        share: if k == 0 { 1.0 - total_b } else { v.share },
                        spec_json: serde_json::to_string(&v.manifest.model).unwrap_or_default(),
                        input_len: v.input_len as u32,
                        classes: v.classes as u32,
                        round: v.manifest.round,
                        eval_accuracy: v.manifest.eval.as_ref().map(|m| m.accuracy),
                        eval_loss: v.manifest.eval.as_ref().map(|m| m.loss),
                        quantized_tensors: v.quantized.clone(),
                        params_digest: v.manifest.params_digest.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::ModelInfoResponse {
            variants,
            device: i.device.to_string(),
            max_batch: i.settings.max_batch as u32,
            max_wait_us: i.settings.max_wait_us,
            queue_capacity: i.settings.queue as u32,
        }))
    }
}

impl Default for InferenceMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves the Inference service alone (`cohort serve`) on `listener`, with grpc.health.v1
/// (SERVING once a version is loaded) and server reflection: with mutual TLS when `tls` is
/// given (inference and admin certificates only; the CRL re-read every `crl_poll`).
pub async fn serve_alone(
    inference: Inference,
    listener: tokio::net::TcpListener,
    tls: Option<cohort_protocol::tls::TlsFiles>,
    crl_poll: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<pb::inference_server::InferenceServer<InferenceApi>>()
        .await;
    let watch = inference.clone();
    let health_task = tokio::spawn(async move {
        loop {
            if watch.serving().is_some() {
                health
                    .set_serving::<pb::inference_server::InferenceServer<InferenceApi>>()
                    .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (v1, v1alpha) = crate::service::reflection();
    let router = tonic::transport::Server::builder()
        .add_service(inference.service())
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha);
    let served = match tls {
        Some(tls) => {
            let (incoming, tasks) = crate::listener::incoming(listener, tls, crl_poll)?;
            inference.require_certificates();
            let r = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(|e| e.to_string());
            for t in tasks {
                t.abort();
            }
            r
        }
        None => router
            .serve_with_incoming_shutdown(crate::listener::nodelay(listener), shutdown)
            .await
            .map_err(|e| e.to_string()),
    };
    health_task.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_model::ModelSpec;

    #[test]
    fn the_candidate_share_is_exact_over_any_window() {
        for share in [0.05, 0.25, 0.5, 0.9] {
            let hits = (0..10_000u64).filter(|&k| to_candidate(k, share)).count();
            assert!(
                (hits as f64 - share * 10_000.0).abs() <= 2.0,
                "{share}: {hits}"
            );
            for start in [17u64, 5_000, 123_456] {
                let hits = (start..start + 100)
                    .filter(|&k| to_candidate(k, share))
                    .count();
                assert!(
                    (hits as f64 - share * 100.0).abs() <= 3.0,
                    "{share}: {hits}"
                );
            }
        }
    }

    #[test]
    fn settings_are_checked_naming_the_key() {
        let bad = |f: &dyn Fn(&mut InferenceSettings)| {
            let mut s = InferenceSettings::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(bad(&|s| s.max_batch = 0).contains("inference.max_batch"));
        assert!(bad(&|s| s.queue = 4).contains("inference.queue (4)"));
        assert!(bad(&|s| s.max_wait_us = 5_000_000).contains("inference.max_wait_us"));
        let e = bad(&|s| {
            s.candidate = Some(Candidate {
                version: 1,
                share: 1.0,
            })
        });
        assert!(e.contains("inference.candidate.share"), "{e}");
        let e = toml::from_str::<InferenceSettings>("device = \"tpu\"").unwrap_err();
        assert!(e.to_string().contains("unknown variant `tpu`"), "{e}");
        let e = toml::from_str::<InferenceSettings>("max_batchh = 3").unwrap_err();
        assert!(e.to_string().contains("max_batchh"), "{e}");
    }

    /// A registry with versions 0 and 1 of a small CNN.
    fn registry(dir: &std::path::Path) -> (ModelStore, ModelSpec) {
        let spec = ModelSpec::Cnn {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        let store = ModelStore::open(dir).unwrap();
        for v in 0..2 {
            store
                .for_job("j")
                .write(
                    "j",
                    &spec,
                    "fedavg",
                    v,
                    &spec.initial_parameters(v),
                    None,
                    0,
                )
                .unwrap();
        }
        (store, spec)
    }

    fn version(v: u64) -> ModelRef {
        ModelRef {
            job_id: "j".into(),
            version: v,
        }
    }

    fn settings(max_batch: usize, max_wait_us: u64, queue: usize) -> InferenceSettings {
        InferenceSettings {
            device: DeviceChoice::Cpu,
            max_batch,
            max_wait_us,
            queue,
            ..InferenceSettings::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_with_resource_exhausted_and_answers_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = registry(dir.path());
        let inf = Inference::new(store, settings(2, 0, 4), InferenceMetrics::new()).unwrap();
        inf.switch(&version(0)).unwrap();
        let calls: Vec<_> = (0..200)
            .map(|_| {
                let inf = inf.clone();
                tokio::spawn(async move { inf.run(vec![0.5; 784], 1).await.map(|r| r.1.len()) })
            })
            .collect();
        let (mut ok, mut exhausted) = (0, 0);
        for c in calls {
            match c.await.unwrap() {
                Ok(n) => {
                    assert_eq!(n, 10);
                    ok += 1;
                }
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    assert!(s.message().contains("of 4 examples waiting"), "{s:?}");
                    exhausted += 1;
                }
                Err(s) => panic!("{s:?}"),
            }
        }
        assert!(ok > 0 && exhausted > 0, "ok {ok}, exhausted {exhausted}");
        assert_eq!(inf.inner.queued.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_queued_before_a_switch_is_answered_by_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let (store, spec) = registry(dir.path());
        // A batch waits up to 1 s for company: the request below sits in version 0's
        // queue while version 1 is loaded and swapped in.
        let inf =
            Inference::new(store, settings(64, 1_000_000, 64), InferenceMetrics::new()).unwrap();
        inf.switch(&version(0)).unwrap();
        let x: Vec<f32> = (0..784).map(|i| (i % 7) as f32 / 7.0).collect();
        let waiting = {
            let (inf, x) = (inf.clone(), x.clone());
            tokio::spawn(async move { inf.run(x, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let i2 = inf.clone();
        tokio::task::spawn_blocking(move || i2.switch(&version(1)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inf.serving(), Some(version(1)));
        let (v, logits, _) = waiting.await.unwrap().unwrap();
        assert_eq!(v.model, version(0));
        let want = InferenceModel::load(
            &spec,
            &spec.initial_parameters(0),
            ComputeDevice::Cpu,
            Precision::F32,
        )
        .unwrap()
        .logits(&x, 1)
        .unwrap();
        assert_eq!(logits, want, "answered by version 0's weights");
        let (v, _, _) = inf.run(x, 1).await.unwrap();
        assert_eq!(v.model, version(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_over_its_rate_is_refused_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = registry(dir.path());
        let mut s = settings(8, 0, 64);
        s.caller_rate = 1.0;
        s.caller_burst = Some(5.0);
        let inf = Inference::new(store, s, InferenceMetrics::new()).unwrap();
        inf.switch(&version(0)).unwrap();
        // A burst of 5 examples, then nothing until the bucket refills (1 a second).
        inf.limit("app-1", 3).unwrap();
        inf.limit("app-1", 2).unwrap();
        let e = inf.limit("app-1", 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message()
                .contains("app-1: over the limit of 1 examples per second"),
            "{e:?}"
        );
        // Another caller has its own bucket; a batch larger than the burst never passes.
        inf.limit("app-2", 5).unwrap();
        assert!(inf.limit("app-3", 6).is_err());
        let mut bad = settings(8, 0, 64);
        bad.caller_rate = -1.0;
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("inference.caller_rate")
        );
    }

    #[test]
    fn a_missing_version_is_named_and_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = registry(dir.path());
        let m = InferenceMetrics::new();
        let inf = Inference::new(store, settings(4, 0, 8), m).unwrap();
        inf.switch(&version(0)).unwrap();
        let e = inf.switch(&version(9)).unwrap_err();
        assert!(e.contains("version 9 of job \"j\""), "{e}");
        assert_eq!(inf.serving(), Some(version(0)));
    }
}
