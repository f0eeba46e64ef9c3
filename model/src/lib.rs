//! cohort's models: Burn networks for tables and images, flat parameter vectors, seeded local
//! training and evaluation, dataset loaders (CSV, IDX) and partitioners.
//!
//! This crate knows nothing about the network, async runtimes or cryptography: it takes data,
//! parameters, seeds and a device, and returns numbers.

pub mod compute;
pub mod custom;
pub mod data;
pub mod export;
pub mod federated;
pub mod fit;
pub mod infer;
pub mod kernels;
pub mod layers;
pub mod net;
pub mod params;
pub mod partition;
pub mod quantize;
pub mod scaffold;
pub mod settings;
pub mod tabular;
pub mod train;

use std::path::PathBuf;

pub use compute::{ComputeSlots, Sharing};
pub use data::{Dataset, FeatureShape, IdxSplit, LabelColumn, Standardizer};
pub use infer::{InferenceModel, Precision};
pub use layers::Layer;
pub use net::{ModelSpec, Network};
pub use partition::{Partition, partition};
pub use train::{
    Metrics, Optimizer, TrainConfig, TrainReport, clip_l2, clip_update, evaluate, train,
    train_corrected, update_to_send,
};

/// Errors loading or validating data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Errors building, training or evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    #[error("invalid training config: {0}")]
    InvalidConfig(String),
    #[error("parameter count mismatch: expected {expected}, got {got}")]
    ParameterCount { expected: usize, got: usize },
    #[error("data does not fit the model: {0}")]
    DataMismatch(String),
    #[error("training diverged (loss is not finite) at learning rate {learning_rate}")]
    Diverged { learning_rate: f64 },
    #[error("model store: {0}")]
    Store(String),
}

/// Where tensors live: Burn's flex backend on the CPU, or wgpu (a GPU, or Mesa's software
/// Vulkan driver where there is none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    #[default]
    #[serde(alias = "ndarray")]
    Cpu,
    Wgpu,
}

impl ComputeDevice {
    /// A device for inference (no autodiff).
    pub fn inference(self) -> burn::tensor::Device {
        match self {
            ComputeDevice::Cpu => burn::tensor::Device::flex(),
            ComputeDevice::Wgpu => {
                burn::tensor::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
            }
        }
    }

    /// A device for training (autodiff).
    pub fn training(self) -> burn::tensor::Device {
        self.inference().autodiff()
    }

    /// Whether wgpu finds a discrete or integrated GPU (a software adapter such as Mesa's
    /// lavapipe does not count). Burn panics when the adapter kind asked for is missing, so
    /// each probe runs on a thread of its own.
    pub fn gpu_available() -> bool {
        use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
        // A missing adapter is an expected answer here, not a crash worth a backtrace.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let found = [DeviceKind::DiscreteGpu(0), DeviceKind::IntegratedGpu(0)]
            .into_iter()
            .any(|kind| {
                std::thread::spawn(move || {
                    let d = Device::wgpu(kind);
                    let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &d);
                    t.into_data().try_into_vec::<f32>().is_ok()
                })
                .join()
                .unwrap_or(false)
            });
        std::panic::set_hook(hook);
        found
    }
}

impl std::str::FromStr for ComputeDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "ndarray" => Ok(ComputeDevice::Cpu),
            "wgpu" | "gpu" => Ok(ComputeDevice::Wgpu),
            _ => Err(format!("unknown device {s:?}: use cpu or wgpu")),
        }
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDevice::Cpu => "cpu",
            ComputeDevice::Wgpu => "wgpu",
        })
    }
}
