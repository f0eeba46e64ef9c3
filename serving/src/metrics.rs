//! The inference service's Prometheus metrics: requests by outcome, examples, latency and
//! batch size per version, labelled-example accuracy, queue depth, device, the served
//! versions and reloads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VersionLabel {
    pub(crate) variant: String,
    pub(crate) version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) variant: String,
    pub(crate) version: String,
    pub(crate) outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LabelledLabel {
    pub(crate) variant: String,
    pub(crate) version: String,
    pub(crate) correct: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeviceLabel {
    pub(crate) device: String,
    pub(crate) precision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServedLabel {
    pub(crate) variant: String,
    pub(crate) job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReloadLabel {
    pub(crate) outcome: String,
}

/// The inference service's metrics. The coordinator registers them with its own
/// ([`Self::register`]); `cohort serve` exports them alone ([`Self::exporter`]).
#[derive(Clone)]
pub struct InferenceMetrics {
    pub(crate) requests: Family<OutcomeLabel, Counter>,
    pub(crate) examples: Family<VersionLabel, Counter>,
    pub(crate) latency: Family<VersionLabel, Histogram, fn() -> Histogram>,
    pub(crate) batch_size: Family<VersionLabel, Histogram, fn() -> Histogram>,
    pub(crate) labelled: Family<LabelledLabel, Counter>,
    pub(crate) queued: Gauge,
    pub(crate) device: Family<DeviceLabel, Gauge>,
    pub(crate) served: Family<ServedLabel, Gauge>,
    pub(crate) reloads: Family<ReloadLabel, Counter>,
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

    /// These metrics alone, prefixed `cohort_`, in the OpenMetrics text format: what `cohort
    /// serve` exports on `/metrics`.
    pub fn exporter(&self) -> impl Fn() -> String + Clone + Send + Sync + 'static {
        let mut r = Registry::with_prefix("cohort");
        self.register(&mut r);
        let r = std::sync::Arc::new(r);
        move || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &r)
                .expect("writing to a String cannot fail");
            out
        }
    }

    /// Registers every inference metric with `r`.
    pub fn register(&self, r: &mut Registry) {
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

    /// Counts a request's outcome, for a version (`None`: before one was picked).
    pub(crate) fn outcome(&self, v: Option<&VersionLabel>, outcome: &str) {
        let (variant, version) = match v {
            Some(v) => (v.variant.clone(), v.version.clone()),
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

impl Default for InferenceMetrics {
    fn default() -> Self {
        Self::new()
    }
}
