//! A model loaded for serving: built once on a device, optionally int8-quantized, then asked
//! for logits of batches of examples.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, Quantizer};
use burn::tensor::quantization::{Calibration, QuantStore, QuantValue};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::net::{ModelSpec, Network};
use crate::{ComputeDevice, ModelError};

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

/// A network ready to answer: built on its device, in its precision.
#[derive(Debug)]
pub struct InferenceModel {
    spec: ModelSpec,
    net: Held,
    device: Device,
    compute: ComputeDevice,
    precision: Precision,
    quantized: Vec<String>,
}

/// The network, or a custom model built by its registration.
// One per served version, built once: the size difference costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Held {
    Net(Network),
    Custom(Box<dyn crate::custom::Predictor>),
}

impl InferenceModel {
    /// Builds `spec` with `params` on `compute`, quantized if `precision` is int8.
    ///
    /// On the CPU the linear layers' weights are quantized (the convolutions' few weights and
    /// the biases stay f32). On wgpu Burn stores int8 values packed four to a `u32` along the
    /// innermost dimension, so a tensor is quantized when that dimension is a multiple of 4
    /// and stays f32 otherwise. Which ones were is in [`Self::quantized_tensors`].
    pub fn load(
        spec: &ModelSpec,
        params: &[f32],
        compute: ComputeDevice,
        precision: Precision,
    ) -> Result<InferenceModel, ModelError> {
        let device = compute.inference();
        let mut quantized = Vec::new();
        let net = match spec {
            ModelSpec::Custom { name, .. } => {
                let predictor;
                (predictor, quantized) =
                    crate::custom::lookup(name)?.predictor(params, compute, precision)?;
                Held::Custom(predictor)
            }
            _ => {
                let mut net = spec.build(params, &device)?;
                if precision == Precision::Int8 {
                    (net, quantized) = quantize_int8(net, &device, compute);
                }
                Held::Net(net)
            }
        };
        Ok(InferenceModel {
            spec: spec.clone(),
            net,
            device,
            compute,
            precision,
            quantized,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn device(&self) -> ComputeDevice {
        self.compute
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Names of the tensors held as int8 (empty for f32).
    pub fn quantized_tensors(&self) -> &[String] {
        &self.quantized
    }

    /// Number of values one example has.
    pub fn input_len(&self) -> usize {
        self.spec.input_shape().len()
    }

    /// Logits for every example in `x` (laid end to end), `per_pass` examples per forward
    /// pass.
    pub fn logits_in_passes(&self, x: &[f32], per_pass: usize) -> Result<Vec<f32>, ModelError> {
        let d = self.input_len();
        let mut out = Vec::with_capacity(x.len() / d.max(1) * self.spec.classes());
        for chunk in x.chunks(d * per_pass.max(1)) {
            out.extend(self.logits(chunk, chunk.len() / d)?);
        }
        Ok(out)
    }

    /// Logits, row-major `[rows, classes]`, for `rows` examples laid end to end in `x`.
    pub fn logits(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        self.logits_vec(x.to_vec(), rows)
    }

    /// [`Self::logits`] taking the input buffer, which becomes the tensor's without a copy.
    pub fn logits_vec(&self, x: Vec<f32>, rows: usize) -> Result<Vec<f32>, ModelError> {
        let d = self.input_len();
        if rows == 0 || x.len() != rows * d {
            return Err(ModelError::DataMismatch(format!(
                "{} values do not make {rows} examples of {d}",
                x.len()
            )));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::DataMismatch(format!(
                "value {i} of the input is not finite"
            )));
        }
        let net = match &self.net {
            Held::Net(net) => net,
            Held::Custom(p) => return p.logits(x, rows),
        };
        let t = Tensor::<2>::from_data(TensorData::new(x, [rows, d]), &self.device);
        net.forward(t)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::Store(format!("reading logits: {e:?}")))
    }
}

/// The largest absolute difference between two equally long slices (0 for empty ones).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "comparing slices of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
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

/// `net` with its weights quantized to int8 as [`InferenceModel::load`] says, and the
/// quantized tensors' names: any module, cohort's networks and registered custom ones alike.
pub(crate) fn quantize_int8<M: Module>(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cnn() -> ModelSpec {
        ModelSpec::Cnn {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        }
    }

    fn inputs(n: usize, d: usize) -> Vec<f32> {
        (0..n * d)
            .map(|i| ((i * 7919) % 256) as f32 / 255.0)
            .collect()
    }

    #[test]
    fn int8_on_the_cpu_quantizes_the_linear_weights_and_stays_close() {
        let spec = cnn();
        let p = spec.initial_parameters(5);
        let f = InferenceModel::load(&spec, &p, ComputeDevice::Cpu, Precision::F32).unwrap();
        let q = InferenceModel::load(&spec, &p, ComputeDevice::Cpu, Precision::Int8).unwrap();
        assert_eq!(
            q.quantized_tensors(),
            ["Cnn.fc1.weight", "Cnn.fc2.weight"],
            "{:?}",
            q.quantized_tensors()
        );
        let x = inputs(16, 784);
        let (a, b) = (f.logits(&x, 16).unwrap(), q.logits(&x, 16).unwrap());
        let d = max_abs_diff(&a, &b);
        assert!(d > 0.0, "int8 changed nothing: was it quantized?");
        assert!(d < 0.05, "int8 logits differ by {d}");
    }

    #[test]
    fn int8_answers_one_example_as_it_answers_a_batch() {
        // One to four examples take the direct int8 kernel; 16 take Burn's path.
        for spec in [
            cnn(),
            ModelSpec::Mlp {
                inputs: 784,
                hidden: vec![32],
                classes: 10,
            },
        ] {
            let p = spec.initial_parameters(2);
            let q = InferenceModel::load(&spec, &p, ComputeDevice::Cpu, Precision::Int8).unwrap();
            let x = inputs(16, 784);
            let batch = q.logits(&x, 16).unwrap();
            let one_by_one = q.logits_in_passes(&x, 1).unwrap();
            let d = max_abs_diff(&batch, &one_by_one);
            assert!(
                d < 1e-4,
                "{spec:?}: int8 logits differ by {d} between paths"
            );
        }
    }

    #[test]
    fn bad_input_is_named() {
        let spec = cnn();
        let m = InferenceModel::load(
            &spec,
            &spec.initial_parameters(1),
            ComputeDevice::Cpu,
            Precision::F32,
        )
        .unwrap();
        let e = m.logits(&[0.0; 783], 1).unwrap_err().to_string();
        assert!(
            e.contains("783 values do not make 1 examples of 784"),
            "{e}"
        );
        let mut x = vec![0.0; 784];
        x[9] = f32::NAN;
        let e = m.logits(&x, 1).unwrap_err().to_string();
        assert!(e.contains("value 9"), "{e}");
    }
}
