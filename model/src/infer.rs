//! A model loaded for serving: built once on a device, optionally int8-quantized, then asked
//! for logits of batches of examples.

use burn::tensor::{Device, Tensor, TensorData};

use crate::net::{ModelSpec, Network};
pub use crate::quantize::Precision;
use crate::quantize::quantize_int8;
use crate::{ComputeDevice, ModelError};

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
