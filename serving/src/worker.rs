//! Workers: each served version runs on one OS thread that owns its Burn model. Requests
//! reach it through a queue; it takes what is waiting, up to `max_batch` examples or until the
//! oldest has waited `max_wait_us`, and runs them as one forward pass (micro-batching).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use cohort_model::{ComputeDevice, InferenceModel, Precision};
use cohort_storage::{ModelManifest, ModelRef};

use crate::error::ServingError;
use crate::metrics::{InferenceMetrics, VersionLabel};

pub(crate) type Reply = tokio::sync::oneshot::Sender<Result<Vec<f32>, String>>;

pub(crate) struct Item {
    pub(crate) x: Vec<f32>,
    pub(crate) rows: usize,
    pub(crate) enqueued: Instant,
    pub(crate) reply: Reply,
}

/// One served version: a worker thread and what callers need to know about it.
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) model: ModelRef,
    pub(crate) manifest: ModelManifest,
    pub(crate) share: f64,
    pub(crate) input_len: usize,
    pub(crate) classes: usize,
    pub(crate) quantized: Vec<String>,
    pub(crate) tx: mpsc::Sender<Item>,
}

impl Variant {
    /// Its metrics label.
    pub(crate) fn label(&self) -> VersionLabel {
        VersionLabel {
            variant: self.name.into(),
            version: self.model.version.to_string(),
        }
    }
}

pub(crate) struct WorkerParams {
    pub(crate) max_batch: usize,
    pub(crate) max_wait: Duration,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) metrics: InferenceMetrics,
    pub(crate) label: VersionLabel,
}

/// Starts a worker thread for `params`; returns once the model is built and warmed up.
pub(crate) fn spawn_worker(
    manifest: &ModelManifest,
    params: Vec<f32>,
    device: ComputeDevice,
    precision: Precision,
    wp: WorkerParams,
) -> Result<(mpsc::Sender<Item>, Vec<String>), ServingError> {
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
        .map_err(ServingError::Thread)?;
    let model_error = |message: String| ServingError::Model {
        job: manifest.job_id.clone(),
        version: manifest.version,
        message,
    };
    let quantized = ready_rx
        .recv()
        .map_err(|_| model_error("the worker stopped while loading".into()))?
        .map_err(model_error)?;
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
