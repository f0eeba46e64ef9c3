//! `[inference]`: how a version is served (device, precision, micro-batching, queue, A/B
//! split, per-caller rate), checked with errors that name the key.

use cohort_model::{ComputeDevice, Precision};
use serde::Deserialize;

/// A setting out of its range: `inference.<key> <rule>`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("inference.{key} {rule}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub rule: String,
}

impl InvalidSetting {
    fn new(key: &'static str, rule: String) -> Self {
        InvalidSetting { key, rule }
    }
}

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
    /// Checks the settings; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_batch == 0 || self.max_batch > 4096 {
            return Err(InvalidSetting::new(
                "max_batch",
                format!("must be 1 to 4096, not {}", self.max_batch),
            ));
        }
        if self.queue < self.max_batch {
            return Err(InvalidSetting::new(
                "queue",
                format!(
                    "({}) must be at least inference.max_batch ({})",
                    self.queue, self.max_batch
                ),
            ));
        }
        if self.max_wait_us > 1_000_000 {
            return Err(InvalidSetting::new(
                "max_wait_us",
                format!("must be at most 1000000 (1 s), not {}", self.max_wait_us),
            ));
        }
        if !(self.caller_rate >= 0.0 && self.caller_rate.is_finite()) {
            return Err(InvalidSetting::new(
                "caller_rate",
                format!(
                    "must be 0 (no limit) or a positive number, not {}",
                    self.caller_rate
                ),
            ));
        }
        if let Some(b) = self.caller_burst
            && !(b >= 1.0 && b.is_finite())
        {
            return Err(InvalidSetting::new(
                "caller_burst",
                format!("must be at least 1, not {b}"),
            ));
        }
        if let Some(c) = &self.candidate
            && !(c.share > 0.0 && c.share < 1.0)
        {
            return Err(InvalidSetting::new(
                "candidate.share",
                format!("must be strictly between 0 and 1, not {}", c.share),
            ));
        }
        Ok(())
    }
}
