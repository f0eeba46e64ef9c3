//! The gRPC edge of the inference service: `Predict`, `PredictBatch` and `ModelInfo`, the
//! caller's identity (inference and admin certificates under mutual TLS), and the one mapping
//! of a [`Refusal`] to its gRPC status.

use std::sync::atomic::Ordering;

use cohort_model::{ComputeDevice, Precision};
use cohort_protocol::pb;
use tonic::{Request, Response, Status};

use crate::deployment::Inference;
use crate::error::Refusal;
use crate::worker::Variant;

/// The gRPC status of a refusal.
pub fn status(r: Refusal) -> Status {
    let msg = r.to_string();
    match r {
        Refusal::NoVersion => Status::unavailable(msg),
        Refusal::Invalid(_) => Status::invalid_argument(msg),
        Refusal::QueueFull { .. } | Refusal::OverRate { .. } => Status::resource_exhausted(msg),
        Refusal::Failed(_) | Refusal::WorkerStopped => Status::internal(msg),
    }
}

impl Inference {
    /// The tonic service.
    pub fn service(&self) -> pb::inference_server::InferenceServer<InferenceApi> {
        pb::inference_server::InferenceServer::new(InferenceApi(self.clone()))
            .max_decoding_message_size(cohort_protocol::MAX_MESSAGE_BYTES)
    }

    /// The caller's identity (its certificate's, or its address on a plaintext listener),
    /// once its role is checked.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        use cohort_crypto::pki::Role;
        if !self.inner.require_certificates.load(Ordering::SeqCst) {
            return Ok(req
                .remote_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into()));
        }
        cohort_protocol::server::certificate_identity(
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

/// A request's examples: all features, or all raw rows (keyed by column name).
pub(crate) fn rows_of(examples: Vec<pb::Example>) -> Result<crate::deployment::Rows, Status> {
    let raw = examples.iter().filter(|e| !e.raw.is_empty()).count();
    if raw == 0 {
        return Ok(crate::deployment::Rows::Features(
            examples.into_iter().flat_map(|e| e.features).collect(),
        ));
    }
    if raw != examples.len() || examples.iter().any(|e| !e.features.is_empty()) {
        return Err(Status::invalid_argument(
            "every example of a request is either features or raw (a row keyed by column \
             name), not both",
        ));
    }
    Ok(crate::deployment::Rows::Raw(
        examples
            .into_iter()
            .map(|e| e.raw.into_iter().collect())
            .collect(),
    ))
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
        self.0.limit(&caller, 1).map_err(status)?;
        let ex = req
            .into_inner()
            .example
            .ok_or_else(|| Status::invalid_argument("the request has no example"))?;
        let (v, logits, started, raw_labels) = self
            .0
            .run(rows_of(vec![ex.clone()])?, 1)
            .await
            .map_err(status)?;
        let mut preds = predictions(&logits, v.classes);
        self.0.count_labels(
            &v,
            &preds,
            &[ex.label.or(raw_labels.first().copied().flatten())],
        );
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
        self.0.limit(&caller, rows).map_err(status)?;
        let mut labels: Vec<Option<u32>> = examples.iter().map(|e| e.label).collect();
        let x = rows_of(examples)?;
        let (v, logits, started, raw_labels) = self.0.run(x, rows).await.map_err(status)?;
        for (l, r) in labels.iter_mut().zip(raw_labels) {
            *l = l.or(r);
        }
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
                        pipeline_json: v
                            .manifest
                            .pipeline
                            .as_ref()
                            .and_then(|p| serde_json::to_string(p).ok())
                            .unwrap_or_default(),
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
