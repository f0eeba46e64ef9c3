//! The served versions and hot reload. A switch builds the new version's workers (weights
//! read and checked from the registry, model built, one warm-up pass) before it swaps the
//! deployment pointer. A request holds the deployment it started with, so requests in flight
//! finish on the old version; the old workers exit when the last of them is answered. With a
//! candidate, a second version of the promoted job takes a fixed share of requests (a
//! low-discrepancy sequence, so the share is exact over any window).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cohort_model::ComputeDevice;
use cohort_protocol::pb;
use cohort_protocol::server::RateLimiter;
use cohort_storage::{ModelRef, ModelStore};

use crate::error::{Refusal, ServingError};
use crate::metrics::{
    DeviceLabel, InferenceMetrics, LabelledLabel, ReloadLabel, ServedLabel, VersionLabel,
};
use crate::settings::InferenceSettings;
use crate::worker::{Item, Variant, WorkerParams, spawn_worker};

/// A request's examples: the model's input as features, or raw table rows keyed by column
/// name, which the served version's pipeline prepares.
pub(crate) enum Rows {
    Features(Vec<f32>),
    Raw(Vec<std::collections::BTreeMap<String, String>>),
}

/// What is being served: variant a, and b when there is an A/B split.
pub(crate) struct Deployment {
    pub(crate) variants: Vec<Arc<Variant>>,
}

impl Deployment {
    /// The variant for request number `k`: b when the fractional part of k·φ falls under
    /// its share (a low-discrepancy sequence: the split is exact over any window).
    pub(crate) fn pick(&self, k: u64) -> &Arc<Variant> {
        match self.variants.as_slice() {
            [a, b] if to_candidate(k, b.share) => b,
            vs => &vs[0],
        }
    }
}

/// Whether request number `k` goes to a candidate taking `share` of requests.
pub(crate) fn to_candidate(k: u64, share: f64) -> bool {
    (k as f64 * 0.618_033_988_749_894_9).fract() < share
}

pub(crate) struct Inner {
    pub(crate) settings: InferenceSettings,
    pub(crate) device: ComputeDevice,
    pub(crate) store: ModelStore,
    pub(crate) current: RwLock<Option<Arc<Deployment>>>,
    pub(crate) switching: Mutex<()>,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) counter: AtomicU64,
    pub(crate) metrics: InferenceMetrics,
    pub(crate) require_certificates: AtomicBool,
    /// Per-caller token buckets, when `caller_rate` is set.
    pub(crate) limiter: Option<RateLimiter>,
}

/// The inference service. Cheap to clone.
#[derive(Clone)]
pub struct Inference {
    pub(crate) inner: Arc<Inner>,
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
    ) -> Result<Self, ServingError> {
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
            RateLimiter::new(
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

    pub(crate) fn deployment(&self) -> Option<Arc<Deployment>> {
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
    pub fn switch(&self, to: &ModelRef) -> Result<(), ServingError> {
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

    fn build(&self, to: &ModelRef) -> Result<Deployment, ServingError> {
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

    fn variant(
        &self,
        name: &'static str,
        m: &ModelRef,
        share: f64,
    ) -> Result<Variant, ServingError> {
        let inner = &self.inner;
        let store = inner.store.for_job(&m.job_id);
        let (manifest, params) =
            store
                .read_version(m.version)
                .map_err(|source| ServingError::Read {
                    job: m.job_id.clone(),
                    version: m.version,
                    source,
                })?;
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
                    .map_err(|e| (None, ServingError::Pointer(e).to_string()))?;
                match to {
                    Some(to)
                        if !skip
                            .as_ref()
                            .is_some_and(|(f, at)| *f == to && at.elapsed() < RELOAD_RETRY) =>
                    {
                        me.switch(&to).map_err(|e| (Some(to), e.to_string()))
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
    pub(crate) fn limit(&self, caller: &str, rows: usize) -> Result<(), Refusal> {
        let Some(l) = &self.inner.limiter else {
            return Ok(());
        };
        if l.allow_n(caller, Instant::now(), rows as f64) {
            return Ok(());
        }
        self.inner.metrics.outcome(None, "limited");
        tracing::warn!(%caller, rows, "refused: over the inference rate limit");
        Err(Refusal::OverRate {
            caller: caller.to_string(),
            rate: self.inner.settings.caller_rate,
        })
    }

    /// Queues `rows` examples on one variant and waits for their logits; raw rows are
    /// prepared first by that variant's pipeline (their labels, where they carry the label
    /// column, come back with the logits).
    #[allow(clippy::type_complexity)]
    pub(crate) async fn run(
        &self,
        x: Rows,
        rows: usize,
    ) -> Result<(Arc<Variant>, Vec<f32>, Instant, Vec<Option<u32>>), Refusal> {
        let started = Instant::now();
        let inner = &self.inner;
        let dep = self.deployment().ok_or_else(|| {
            inner.metrics.outcome(None, "unavailable");
            Refusal::NoVersion
        })?;
        let k = inner.counter.fetch_add(1, Ordering::Relaxed);
        let v = dep.pick(k).clone();
        // The deployment is no longer needed: the variant keeps its worker alive.
        drop(dep);
        let (x, labels) = match x {
            Rows::Features(x) => (x, Vec::new()),
            Rows::Raw(records) => {
                let Some(p) = &v.manifest.pipeline else {
                    inner.metrics.outcome(Some(&v.label()), "invalid");
                    return Err(Refusal::Invalid(format!(
                        "version {} of job {} takes prepared features, not raw rows (its \
                         job declared no tables)",
                        v.model.version, v.model.job_id
                    )));
                };
                match p.transform_records(&records) {
                    Ok((ds, labels, _)) => (ds.features, labels),
                    Err(e) => {
                        inner.metrics.outcome(Some(&v.label()), "invalid");
                        return Err(Refusal::Invalid(e.to_string()));
                    }
                }
            }
        };
        if x.len() != rows * v.input_len {
            inner.metrics.outcome(Some(&v.label()), "invalid");
            return Err(Refusal::Invalid(format!(
                "each example must have {} features (the model's input); got {} values for {rows} \
                 example(s)",
                v.input_len,
                x.len()
            )));
        }
        if let Some(i) = x.iter().position(|f| !f.is_finite()) {
            inner.metrics.outcome(Some(&v.label()), "invalid");
            return Err(Refusal::Invalid(format!(
                "feature {} of example {} is not a finite number",
                i % v.input_len,
                i / v.input_len
            )));
        }
        let cap = inner.settings.queue;
        let before = inner.queued.fetch_add(rows, Ordering::SeqCst);
        if before + rows > cap {
            inner.queued.fetch_sub(rows, Ordering::SeqCst);
            inner.metrics.outcome(Some(&v.label()), "exhausted");
            return Err(Refusal::QueueFull {
                waiting: before,
                capacity: cap,
            });
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
            inner.metrics.outcome(Some(&v.label()), "error");
            return Err(Refusal::WorkerStopped);
        }
        match answer.await {
            Ok(Ok(logits)) => Ok((v, logits, started, labels)),
            Ok(Err(e)) => {
                inner.metrics.outcome(Some(&v.label()), "error");
                Err(Refusal::Failed(e))
            }
            Err(_) => {
                inner.metrics.outcome(Some(&v.label()), "error");
                Err(Refusal::WorkerStopped)
            }
        }
    }

    pub(crate) fn answered(&self, v: &Variant, started: Instant, examples: usize) {
        let m = &self.inner.metrics;
        let l = v.label();
        m.outcome(Some(&l), "ok");
        m.examples.get_or_create(&l).inc_by(examples as u64);
        m.latency
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    pub(crate) fn count_labels(
        &self,
        v: &Variant,
        preds: &[pb::Prediction],
        labels: &[Option<u32>],
    ) {
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
}
