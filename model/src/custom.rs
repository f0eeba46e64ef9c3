//! Models written in Rust: any Burn module that implements [`FederatedModule`] (its forward
//! pass, and optionally its training forward and loss) and [`Build`] (how it is built on a
//! device), registered under a name with [`register`], federates like a preset or a declared
//! stack: they train in the same loop, travel as the same flat vectors, are stored as the
//! same safetensors files and are served (f32 or int8) the same way. A job names it
//! as `ModelSpec::Custom { name, … }` (`kind = "custom"`), and every process that trains,
//! evaluates, stores or serves it must have registered it: it runs in your own binary, built
//! on cohort's crates (see `examples/custom_model.rs`).
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig, Relu};
//! use burn::tensor::{Device, Tensor};
//! use cohort_model::custom::{Build, FederatedModule, register};
//!
//! #[derive(Module, Debug)]
//! struct Net {
//!     hidden: Linear,
//!     out: Linear,
//!     act: Relu,
//! }
//!
//! impl FederatedModule for Net {
//!     fn forward(&self, x: Tensor<2>) -> Tensor<2> {
//!         self.out.forward(self.act.forward(self.hidden.forward(x)))
//!     }
//! }
//!
//! impl Build for Net {
//!     fn init(device: &Device) -> Self {
//!         Net {
//!             hidden: LinearConfig::new(30, 16).init(device),
//!             out: LinearConfig::new(16, 2).init(device),
//!             act: Relu::new(),
//!         }
//!     }
//! }
//!
//! register::<Net>("doc-net");
//! let spec = cohort_model::ModelSpec::Custom {
//!     name: "doc-net".into(),
//!     inputs: 30, channels: 0, height: 0, width: 0,
//!     classes: 2,
//! };
//! assert_eq!(spec.num_parameters(), 30 * 16 + 16 + 16 * 2 + 2);
//! ```
//!
//! cohort owns the parameters' values: the initial model is drawn from the job's seed (PyTorch's
//! rule for `Linear` and `Conv*` layers, ones and zeros for normalisations), the module's own
//! initial values are replaced, and only the flat vector (the module's visiting order) travels.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use burn::module::{ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};

pub use crate::federated::{Build, FederatedModule};
use crate::fit::fit;
use crate::layers::{Init, ParamInfo};
use crate::params::{flat, load_flat};
use crate::settings::{TrainConfig, TrainReport};
use crate::{ComputeDevice, Dataset, ModelError};

/// What cohort does with a registered model, its type erased.
pub trait Registered: Send + Sync {
    /// The parameter tensors in the flat vector's order, named by their module path.
    fn layout(&self) -> Vec<ParamInfo>;
    fn train(
        &self,
        params: &[f32],
        data: &Dataset,
        cfg: &TrainConfig,
        device: ComputeDevice,
        correction: Option<&[f32]>,
    ) -> Result<(Vec<f32>, TrainReport), ModelError>;
    /// Logits, row-major `[rows, classes]`, for `x` (`rows` flattened examples), built once
    /// and asked 1,024 rows at a time.
    fn logits(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        device: ComputeDevice,
    ) -> Result<Vec<f32>, ModelError> {
        let (predictor, _) = self.predictor(params, device, crate::quantize::Precision::F32)?;
        let d = (x.len() / rows.max(1)).max(1);
        let mut out = Vec::new();
        for chunk in x.chunks(1024 * d) {
            out.extend(predictor.logits(chunk.to_vec(), chunk.len() / d)?);
        }
        Ok(out)
    }
    fn to_safetensors(&self, params: &[f32]) -> Result<Vec<u8>, ModelError>;
    fn params_from_safetensors(&self, bytes: Vec<u8>) -> Result<Vec<f32>, ModelError>;
    /// The module built once on `device` in `precision`, answering batches (serving), and
    /// the names of the tensors held as int8.
    fn predictor(
        &self,
        params: &[f32],
        device: ComputeDevice,
        precision: crate::quantize::Precision,
    ) -> Result<(Box<dyn Predictor>, Vec<String>), ModelError>;
}

/// A built custom model that answers batches of flattened examples with their logits.
pub trait Predictor: Send + Sync + std::fmt::Debug {
    fn logits(&self, x: Vec<f32>, rows: usize) -> Result<Vec<f32>, ModelError>;
}

#[derive(Debug)]
struct Built<M> {
    model: std::sync::Mutex<M>,
    device: Device,
}

impl<M: FederatedModule> Predictor for Built<M> {
    fn logits(&self, x: Vec<f32>, rows: usize) -> Result<Vec<f32>, ModelError> {
        let d = x.len() / rows.max(1);
        let t = Tensor::<2>::from_data(TensorData::new(x, [rows, d]), &self.device);
        let model = self.model.lock().expect("custom model lock");
        model
            .forward(t)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::Store(format!("reading logits: {e:?}")))
    }
}

/// A registered module type, and its layout once first asked for (`num_parameters` and the
/// capacity checks ask often; the layout needs the module built).
struct Entry<M> {
    layout: std::sync::OnceLock<Vec<ParamInfo>>,
    module: PhantomData<fn() -> M>,
}

impl<M: Build> Entry<M> {
    fn build(params: &[f32], device: &Device) -> Result<M, ModelError> {
        load_flat(M::init(device), params)
    }
}

impl<M: Build> Registered for Entry<M> {
    fn layout(&self) -> Vec<ParamInfo> {
        self.layout
            .get_or_init(|| {
                let mut v = Layout::default();
                M::init(&ComputeDevice::Cpu.inference()).visit(&mut v);
                v.out
            })
            .clone()
    }

    fn train(
        &self,
        params: &[f32],
        data: &Dataset,
        cfg: &TrainConfig,
        device: ComputeDevice,
        correction: Option<&[f32]>,
    ) -> Result<(Vec<f32>, TrainReport), ModelError> {
        let dev = device.training();
        let model = Self::build(params, &dev)?;
        fit(model, data, cfg, &dev, correction)
    }

    fn predictor(
        &self,
        params: &[f32],
        compute: ComputeDevice,
        precision: crate::quantize::Precision,
    ) -> Result<(Box<dyn Predictor>, Vec<String>), ModelError> {
        let device = compute.inference();
        let mut model = Self::build(params, &device)?;
        let mut quantized = Vec::new();
        if precision == crate::quantize::Precision::Int8 {
            (model, quantized) = crate::quantize::quantize_int8(model, &device, compute);
        }
        Ok((
            Box::new(Built {
                model: std::sync::Mutex::new(model),
                device,
            }),
            quantized,
        ))
    }

    fn to_safetensors(&self, params: &[f32]) -> Result<Vec<u8>, ModelError> {
        crate::params::to_safetensors(&Self::build(params, &ComputeDevice::Cpu.inference())?)
    }

    fn params_from_safetensors(&self, bytes: Vec<u8>) -> Result<Vec<f32>, ModelError> {
        let mut model = M::init(&ComputeDevice::Cpu.inference());
        crate::params::load_safetensors(&mut model, bytes)?;
        Ok(flat(&model))
    }
}

/// The module's parameter tensors with their paths, and how cohort initialises each: by the
/// module that holds it (`Linear`: fan-in is the weight's first dimension, Burn's `[in,
/// out]`; `Conv*`: all but the first; biases share their weight's fan-in; normalisations:
/// scale and variance 1, shift and mean 0); elsewhere, fan-in is all but the first dimension
/// (a vector starts at 0).
#[derive(Default)]
struct Layout {
    path: Vec<(String, String)>,
    fan_in: BTreeMap<String, usize>,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for Layout {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.push((name.to_string(), container.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let shape = p.lazy_shape().dims::<D>().to_vec();
        let name: Vec<&str> = self.path.iter().map(|(n, _)| n.as_str()).collect();
        let name = name.join(".");
        let (module, tensor) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let container = self
            .path
            .iter()
            .rev()
            .nth(1)
            .map(|(_, c)| c.as_str())
            .unwrap_or("");
        let rest: usize = shape.iter().skip(1).product();
        let (fan_in, init) = match (container, tensor, shape.len()) {
            (c, "gamma" | "running_var", _) if c.contains("Norm") => (1, Init::Ones),
            (c, "beta" | "running_mean", _) if c.contains("Norm") => (1, Init::Zeros),
            ("Linear", "weight", 2) => (shape[0], Init::FanIn),
            ("Embedding", "weight", _) => (1, Init::Normal),
            (c, "weight", _) if c.starts_with("Conv") => (rest, Init::FanIn),
            (_, "bias", _) => match self.fan_in.get(module) {
                Some(&f) => (f, Init::FanIn),
                None => (1, Init::Zeros),
            },
            (_, _, 1) => (1, Init::Zeros),
            _ => (rest.max(1), Init::FanIn),
        };
        self.fan_in.insert(module.to_string(), fan_in);
        self.out.push(ParamInfo {
            name,
            shape,
            fan_in,
            init,
        });
    }
}

type Registry = RwLock<BTreeMap<String, Arc<dyn Registered>>>;

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Registers `M` under `name` in this process (again: replaced).
pub fn register<M: Build>(name: &str) {
    registry().write().expect("model registry lock").insert(
        name.to_string(),
        Arc::new(Entry::<M> {
            layout: Default::default(),
            module: PhantomData,
        }),
    );
}

/// The model registered under `name`.
pub fn lookup(name: &str) -> Result<Arc<dyn Registered>, ModelError> {
    let r = registry().read().expect("model registry lock");
    r.get(name).cloned().ok_or_else(|| {
        ModelError::InvalidSpec(format!(
            "no model {name:?} is registered in this process (registered: {:?}); a custom \
             model runs in a binary that calls cohort_model::custom::register",
            r.keys().collect::<Vec<_>>()
        ))
    })
}
