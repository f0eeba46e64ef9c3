//! Serving precision: [`Precision`], and int8 post-training quantization of any Burn module's
//! weights ([`quantize_int8`]), for cohort's networks and registered custom models alike.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, Quantizer};
use burn::tensor::quantization::{Calibration, QuantStore, QuantValue};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ComputeDevice;

/// Numeric precision of a served model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The weights as trained.
    #[default]
    F32,
    /// Post-training quantization: weights stored as symmetric 8-bit integers with one f32
    /// scale per tensor (min-max calibration), dequantized in the forward pass.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("unknown precision {s:?}: use f32 or int8")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        })
    }
}

/// Collects each float parameter's id, path and shape.
#[derive(Default)]
struct Shapes {
    path: Vec<String>,
    out: Vec<(burn::module::ParamId, String, Vec<usize>)>,
}

impl ModuleVisitor for Shapes {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let shape = p.lazy_shape().dims::<D>().to_vec();
        self.out.push((p.id, self.path.join("."), shape));
    }
}

/// `net` with its weights quantized to int8 as [`crate::InferenceModel::load`] says, and the
/// quantized tensors' names: any module, cohort's networks and registered custom ones alike.
pub fn quantize_int8<M: Module>(
    net: M,
    device: &Device,
    compute: ComputeDevice,
) -> (M, Vec<String>) {
    let mut shapes = Shapes::default();
    net.visit(&mut shapes);
    // Group the parameters by the store each needs.
    let mut groups: Vec<(QuantStore, Vec<burn::module::ParamId>)> = Vec::new();
    let mut names = Vec::new();
    for (id, name, shape) in shapes.out {
        // Normalisation layers' scales and statistics stay f32 (few values, read every pass).
        if name.contains("_norm") {
            continue;
        }
        let store = match compute {
            // The linear layers' weights (97% of the CNN's parameters, all of an MLP's but
            // the biases): cohort's CPU kernel reads them as int8 directly. Convolution
            // weights and biases would be dequantized at every pass, so they stay f32.
            ComputeDevice::Cpu => (shape.len() == 2).then_some(QuantStore::Native),
            // Packed along the innermost dimension. (Packing along another one compiles but
            // gave wrong logits in Burn 0.22.1: 17% accuracy instead of 82% on Fashion-MNIST.)
            ComputeDevice::Wgpu => shape
                .last()
                .is_some_and(|d| d % 4 == 0)
                .then_some(QuantStore::PackedU32(0)),
        };
        if let Some(store) = store {
            names.push(name);
            match groups.iter_mut().find(|(s, _)| *s == store) {
                Some((_, ids)) => ids.push(id),
                None => groups.push((store, vec![id])),
            }
        }
    }
    let base = device
        .settings()
        .quantization
        .scheme
        .with_value(QuantValue::Q8S);
    let mut net = net;
    for (store, ids) in groups {
        let mut q = Quantizer::new(Calibration::MinMax, base.with_store(store));
        net = net.quantize_weights_group(&mut q, ParamGroup::from_ids(ids));
    }
    (net, names)
}
