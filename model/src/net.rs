//! Model specifications, the Burn networks they build, and the flat parameter vector that
//! crosses the network: flatten and unflatten in one deterministic order.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use serde::{Deserialize, Serialize};

use crate::data::FeatureShape;
use crate::kernels::linear;
pub use crate::layers::{Init, ParamInfo};
use crate::layers::{Layer, LayerNet};
use crate::params::{flat, load_flat};
use crate::{ModelError, kernels};

/// What network a federation trains. Every participant builds the same one from it.
///
/// `logistic`, `mlp` and `cnn` are presets: each computes what its [`ModelSpec::as_layers`]
/// stack computes, with the same flat parameters (a test checks it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelSpec {
    /// Multinomial logistic regression (one linear layer).
    Logistic { inputs: usize, classes: usize },
    /// Fully connected network with ReLU between layers.
    Mlp {
        inputs: usize,
        hidden: Vec<usize>,
        classes: usize,
    },
    /// Two 3×3 convolutions (8 and 16 channels), each followed by ReLU and 2×2 max-pooling,
    /// then a 64-unit hidden layer. Height and width must be multiples of 4.
    Cnn {
        channels: usize,
        height: usize,
        width: usize,
        classes: usize,
    },
    /// A declared stack of [`Layer`]s ([`crate::layers`]), ending in a linear layer of
    /// `classes` units. Examples are flat rows of `inputs` values, or images of `channels ×
    /// height × width` (one or the other).
    Layers {
        #[serde(default, skip_serializing_if = "is_zero")]
        inputs: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        channels: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        height: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        width: usize,
        #[serde(default)]
        classes: usize,
        layers: Vec<Layer>,
    },
    /// A Burn module written in Rust and registered under `name` in every process that runs
    /// the job ([`crate::custom`]). Examples are flat rows of `inputs` values, or images.
    Custom {
        name: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        inputs: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        channels: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        height: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        width: usize,
        #[serde(default)]
        classes: usize,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// CNN sizes (fixed, small enough to train on CPUs in a simulation).
const CNN_C1: usize = 8;
const CNN_C2: usize = 16;
const CNN_HIDDEN: usize = 64;

impl ModelSpec {
    /// A spec that fits a dataset's shape: a CNN for images, else an MLP with `hidden`
    /// (logistic regression when `hidden` is empty).
    pub fn for_shape(shape: FeatureShape, classes: usize, hidden: &[usize]) -> ModelSpec {
        match shape {
            FeatureShape::Image {
                channels,
                height,
                width,
            } => ModelSpec::Cnn {
                channels,
                height,
                width,
                classes,
            },
            FeatureShape::Flat(inputs) if hidden.is_empty() => {
                ModelSpec::Logistic { inputs, classes }
            }
            FeatureShape::Flat(inputs) => ModelSpec::Mlp {
                inputs,
                hidden: hidden.to_vec(),
                classes,
            },
        }
    }

    /// Checks the sizes make a network.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidSpec(m));
        match self {
            ModelSpec::Logistic { inputs, classes }
            | ModelSpec::Mlp {
                inputs, classes, ..
            } => {
                if *inputs == 0 {
                    return bad("inputs must be at least 1".into());
                }
                if *classes < 2 {
                    return bad(format!("classes must be at least 2, not {classes}"));
                }
                if let ModelSpec::Mlp { hidden, .. } = self
                    && hidden.contains(&0)
                {
                    return bad(format!("hidden layer sizes must be positive: {hidden:?}"));
                }
            }
            ModelSpec::Cnn {
                channels,
                height,
                width,
                classes,
            } => {
                if *channels == 0 || *height == 0 || *width == 0 {
                    return bad("cnn channels, height and width must be positive".into());
                }
                if height % 4 != 0 || width % 4 != 0 {
                    return bad(format!(
                        "cnn height and width must be multiples of 4, not {height}x{width}"
                    ));
                }
                if *classes < 2 {
                    return bad(format!("classes must be at least 2, not {classes}"));
                }
            }
            ModelSpec::Custom { name, classes, .. } => {
                self.check_input()?;
                if *classes < 2 {
                    return bad(format!("classes must be at least 2, not {classes}"));
                }
                let model = crate::custom::lookup(name)?;
                let params = self.initial_parameters(0);
                let d = self.input_shape().len();
                let out = model.logits(&params, &vec![0.0; d], 1, crate::ComputeDevice::Cpu)?;
                if out.len() != *classes {
                    return bad(format!(
                        "custom model {name:?} gives {} logits for one example of {d} values, \
                         not the {classes} classes",
                        out.len()
                    ));
                }
            }
            ModelSpec::Layers {
                classes, layers, ..
            } => {
                self.check_input()?;
                crate::layers::check(self.input_shape(), layers, *classes)
                    .map_err(ModelError::InvalidSpec)?;
            }
        }
        Ok(())
    }

    /// A stack or custom model takes flat rows or images, one or the other.
    fn check_input(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidSpec(m));
        match *self {
            ModelSpec::Layers {
                inputs,
                channels,
                height,
                width,
                ..
            }
            | ModelSpec::Custom {
                inputs,
                channels,
                height,
                width,
                ..
            } => {
                let image = [channels, height, width];
                match (inputs > 0, image.iter().any(|&d| d > 0)) {
                    (true, true) | (false, false) => {
                        return bad(format!(
                            "a layer stack or custom model takes flat rows (inputs) or images (channels, height, \
                             width), one or the other: inputs {inputs}, channels {channels}, \
                             height {height}, width {width}"
                        ));
                    }
                    (false, true) if image.contains(&0) => {
                        return bad(format!(
                            "an image needs channels, height and width, all positive: \
                             {channels}×{height}×{width}"
                        ));
                    }
                    _ => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The feature shape an example must have.
    pub fn input_shape(&self) -> FeatureShape {
        match *self {
            ModelSpec::Logistic { inputs, .. } | ModelSpec::Mlp { inputs, .. } => {
                FeatureShape::Flat(inputs)
            }
            ModelSpec::Layers { inputs, .. } | ModelSpec::Custom { inputs, .. } if inputs > 0 => {
                FeatureShape::Flat(inputs)
            }
            ModelSpec::Layers {
                channels,
                height,
                width,
                ..
            }
            | ModelSpec::Custom {
                channels,
                height,
                width,
                ..
            } => FeatureShape::Image {
                channels,
                height,
                width,
            },
            ModelSpec::Cnn {
                channels,
                height,
                width,
                ..
            } => FeatureShape::Image {
                channels,
                height,
                width,
            },
        }
    }

    pub fn classes(&self) -> usize {
        match *self {
            ModelSpec::Logistic { classes, .. }
            | ModelSpec::Mlp { classes, .. }
            | ModelSpec::Cnn { classes, .. }
            | ModelSpec::Layers { classes, .. }
            | ModelSpec::Custom { classes, .. } => classes,
        }
    }

    /// Checks that a dataset can be trained with this spec, naming what differs.
    pub fn check_data(&self, shape: FeatureShape, classes: usize) -> Result<(), ModelError> {
        if shape.len() != self.input_shape().len() {
            return Err(ModelError::DataMismatch(format!(
                "the model takes {:?} ({} values) but the data has {:?} ({} values)",
                self.input_shape(),
                self.input_shape().len(),
                shape,
                shape.len()
            )));
        }
        if classes > self.classes() {
            return Err(ModelError::DataMismatch(format!(
                "the data has {classes} classes but the model predicts {}",
                self.classes()
            )));
        }
        Ok(())
    }

    fn linear_sizes(&self) -> Vec<(usize, usize)> {
        match self {
            ModelSpec::Logistic { inputs, classes } => vec![(*inputs, *classes)],
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let mut dims = vec![*inputs];
                dims.extend_from_slice(hidden);
                dims.push(*classes);
                dims.windows(2).map(|w| (w[0], w[1])).collect()
            }
            ModelSpec::Cnn {
                height,
                width,
                classes,
                ..
            } => vec![
                (CNN_C2 * (height / 4) * (width / 4), CNN_HIDDEN),
                (CNN_HIDDEN, *classes),
            ],
            ModelSpec::Layers { .. } | ModelSpec::Custom { .. } => Vec::new(),
        }
    }

    /// The preset as its layer stack (a `layers` spec is itself): the same function of the
    /// same flat parameters, under other tensor names.
    pub fn as_layers(&self) -> ModelSpec {
        let linear = |units| Layer::Linear { units };
        let (shape, layers) = match self {
            // A custom model has no stack; it is its own.
            ModelSpec::Layers { .. } | ModelSpec::Custom { .. } => return self.clone(),
            ModelSpec::Logistic { classes, .. } => (self.input_shape(), vec![linear(*classes)]),
            ModelSpec::Mlp {
                hidden, classes, ..
            } => {
                let mut layers = Vec::new();
                for &h in hidden {
                    layers.extend([linear(h), Layer::Relu]);
                }
                layers.push(linear(*classes));
                (self.input_shape(), layers)
            }
            ModelSpec::Cnn { classes, .. } => {
                let conv = |channels| Layer::Conv2d {
                    channels,
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                };
                let block = |c| [conv(c), Layer::Relu, Layer::MaxPool2d { size: 2 }];
                let mut layers: Vec<Layer> = block(CNN_C1).into_iter().collect();
                layers.extend(block(CNN_C2));
                layers.extend([Layer::Flatten, linear(CNN_HIDDEN), Layer::Relu]);
                layers.push(linear(*classes));
                (self.input_shape(), layers)
            }
        };
        let (inputs, channels, height, width) = match shape {
            FeatureShape::Flat(n) => (n, 0, 0, 0),
            FeatureShape::Image {
                channels,
                height,
                width,
            } => (0, channels, height, width),
        };
        ModelSpec::Layers {
            inputs,
            channels,
            height,
            width,
            classes: self.classes(),
            layers,
        }
    }

    /// The parameter tensors in the order of the flat vector (Burn's visiting order: fields in
    /// declaration order, weight before bias).
    pub fn layout(&self) -> Vec<ParamInfo> {
        let mut out = Vec::new();
        let linear = |out: &mut Vec<ParamInfo>, name: &str, (i, o): (usize, usize)| {
            out.push(ParamInfo {
                name: format!("{name}.weight"),
                shape: vec![i, o],
                fan_in: i,
                init: Init::FanIn,
            });
            out.push(ParamInfo {
                name: format!("{name}.bias"),
                shape: vec![o],
                fan_in: i,
                init: Init::FanIn,
            });
        };
        match self {
            ModelSpec::Logistic { .. } | ModelSpec::Mlp { .. } => {
                for (k, io) in self.linear_sizes().into_iter().enumerate() {
                    linear(&mut out, &format!("layers.{k}"), io);
                }
            }
            ModelSpec::Cnn { channels, .. } => {
                for (name, cin, cout) in [("conv1", *channels, CNN_C1), ("conv2", CNN_C1, CNN_C2)] {
                    out.push(ParamInfo {
                        name: format!("{name}.weight"),
                        shape: vec![cout, cin, 3, 3],
                        fan_in: cin * 9,
                        init: Init::FanIn,
                    });
                    out.push(ParamInfo {
                        name: format!("{name}.bias"),
                        shape: vec![cout],
                        fan_in: cin * 9,
                        init: Init::FanIn,
                    });
                }
                let sizes = self.linear_sizes();
                linear(&mut out, "fc1", sizes[0]);
                linear(&mut out, "fc2", sizes[1]);
            }
            ModelSpec::Layers { layers, .. } => {
                out = crate::layers::layout(self.input_shape(), layers);
            }
            ModelSpec::Custom { name, .. } => {
                out = crate::custom::lookup(name)
                    .map(|m| m.layout())
                    .unwrap_or_default();
            }
        }
        out
    }

    /// The layers (modules) in the order of the flat vector, each with its number of values
    /// (weight and bias together): what per-layer clipping clips.
    pub fn layer_sizes(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for p in self.layout() {
            let module = p.name.rsplit_once('.').map_or(p.name.as_str(), |(m, _)| m);
            let n: usize = p.shape.iter().product();
            match out.last_mut() {
                Some((m, k)) if m == module => *k += n,
                _ => out.push((module.to_string(), n)),
            }
        }
        out
    }

    /// Length of the flat parameter vector.
    pub fn num_parameters(&self) -> usize {
        self.layout()
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// Initial parameters, drawn from U(−1/√fan_in, 1/√fan_in) with a seeded generator (the
    /// PyTorch default), so every backend and every run starts from the same model.
    pub fn initial_parameters(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(self.num_parameters());
        for p in self.layout() {
            let n: usize = p.shape.iter().product();
            match p.init {
                Init::FanIn => {
                    let bound = 1.0 / (p.fan_in.max(1) as f32).sqrt();
                    let u = Uniform::new_inclusive(-bound, bound).expect("finite bound");
                    out.extend((0..n).map(|_| u.sample(&mut rng)));
                }
                Init::Normal => out.extend((0..n).map(|_| {
                    <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng)
                })),
                Init::Zeros => out.extend(std::iter::repeat_n(0.0, n)),
                Init::Ones => out.extend(std::iter::repeat_n(1.0, n)),
            }
        }
        out
    }

    /// `params` as a safetensors file (Burn's tensor names and layout): what the model
    /// registry stores.
    pub fn to_safetensors(&self, params: &[f32]) -> Result<Vec<u8>, ModelError> {
        match self {
            ModelSpec::Custom { name, .. } => crate::custom::lookup(name)?.to_safetensors(params),
            _ => self
                .build(params, &crate::ComputeDevice::Cpu.inference())?
                .to_safetensors(),
        }
    }

    /// The flat parameters of a file [`Self::to_safetensors`] wrote for this spec.
    pub fn params_from_safetensors(&self, bytes: Vec<u8>) -> Result<Vec<f32>, ModelError> {
        match self {
            ModelSpec::Custom { name, .. } => {
                crate::custom::lookup(name)?.params_from_safetensors(bytes)
            }
            _ => Ok(self
                .build(
                    &self.initial_parameters(0),
                    &crate::ComputeDevice::Cpu.inference(),
                )?
                .load_safetensors(bytes)?
                .to_flat()),
        }
    }

    /// Builds the network on `device` with the given flat parameters.
    pub fn build(&self, params: &[f32], device: &Device) -> Result<Network, ModelError> {
        self.validate()?;
        if params.len() != self.num_parameters() {
            return Err(ModelError::ParameterCount {
                expected: self.num_parameters(),
                got: params.len(),
            });
        }
        let net = match self {
            ModelSpec::Logistic { .. } | ModelSpec::Mlp { .. } => Network::Mlp(Mlp {
                layers: self
                    .linear_sizes()
                    .into_iter()
                    .map(|(i, o)| LinearConfig::new(i, o).init(device))
                    .collect(),
                act: Relu::new(),
            }),
            ModelSpec::Cnn {
                channels,
                height,
                width,
                ..
            } => {
                let sizes = self.linear_sizes();
                Network::Cnn(Cnn {
                    conv1: Conv2dConfig::new([*channels, CNN_C1], [3, 3])
                        .with_padding(PaddingConfig2d::Same)
                        .init(device),
                    conv2: Conv2dConfig::new([CNN_C1, CNN_C2], [3, 3])
                        .with_padding(PaddingConfig2d::Same)
                        .init(device),
                    fc1: LinearConfig::new(sizes[0].0, sizes[0].1).init(device),
                    fc2: LinearConfig::new(sizes[1].0, sizes[1].1).init(device),
                    pool: MaxPool2dConfig::new([2, 2]).init(),
                    act: Relu::new(),
                    shape: [*channels, *height, *width],
                })
            }
            ModelSpec::Layers { layers, .. } => {
                Network::Layers(LayerNet::new(self.input_shape(), layers, device))
            }
            ModelSpec::Custom { name, .. } => {
                return Err(ModelError::InvalidSpec(format!(
                    "custom model {name:?} is built by its registration \
                     (cohort_model::custom), not as a Network"
                )));
            }
        };
        net.load_flat(params)
    }
}

/// Fully connected layers with ReLU between them (no hidden layer: logistic regression).
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    act: Relu,
}

/// The small image CNN of [`ModelSpec::Cnn`].
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    pool: MaxPool2d,
    act: Relu,
    /// Input shape [channels, height, width]; examples arrive flattened.
    #[module(skip)]
    shape: [usize; 3],
}

impl Cnn {
    /// Convolution, ReLU, 2×2 max-pooling. On the CPU (f32 weights) through cohort's kernels
    /// ([`crate::kernels`]), elsewhere through Burn's modules; both compute the same function.
    /// (Int8 serving leaves the convolutions' weights in f32, see [`crate::infer`].)
    fn block(&self, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let weight = conv.weight.val();
        match conv.bias.as_ref().map(|b| b.val()) {
            Some(bias)
                if kernels::supported(&x)
                    && kernels::supported(&weight)
                    && kernels::supported(&bias) =>
            {
                kernels::max_pool2x2(self.act.forward(kernels::conv2d(x, weight, bias, 1)))
            }
            _ => self.pool.forward(self.act.forward(conv.forward(x))),
        }
    }
}

/// A network built from a [`ModelSpec`].
// Built once per task and never moved in a hot loop, so the variants' size difference costs
// nothing worth a Box (which Burn's derive would have to see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Network {
    Mlp(Mlp),
    Cnn(Cnn),
    Layers(LayerNet),
}

/// cohort's own networks federate through the same trait as a user's module: the training
/// loop, the flat vectors and serving take them alike.
impl crate::federated::FederatedModule for Network {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_seeded(x, None)
    }
    fn forward_train(&self, x: Tensor<2>, seed: u64) -> Tensor<2> {
        self.forward_seeded(x, Some(seed))
    }
}

impl Network {
    /// Logits `[batch, classes]` for flattened examples `[batch, features]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_seeded(x, None)
    }

    /// [`Self::forward`] in training: dropout layers draw their masks from `seed` (a training
    /// step's own).
    pub fn forward_train(&self, x: Tensor<2>, seed: u64) -> Tensor<2> {
        self.forward_seeded(x, Some(seed))
    }

    fn forward_seeded(&self, x: Tensor<2>, dropout_seed: Option<u64>) -> Tensor<2> {
        match self {
            Network::Layers(m) => m.forward(x, dropout_seed),
            Network::Mlp(m) => {
                let mut x = x;
                let last = m.layers.len() - 1;
                for (k, layer) in m.layers.iter().enumerate() {
                    x = linear(layer, x);
                    if k < last {
                        x = m.act.forward(x);
                    }
                }
                x
            }
            Network::Cnn(m) => {
                let [c, h, w] = m.shape;
                let b = x.dims()[0];
                let x: Tensor<4> = x.reshape([b, c, h, w]);
                let x = m.block(&m.conv1, x);
                let x = m.block(&m.conv2, x);
                let x: Tensor<2> = x.flatten(1, 3);
                linear(&m.fc2, m.act.forward(linear(&m.fc1, x)))
            }
        }
    }

    /// All parameters as one f32 vector, in [`ModelSpec::layout`] order.
    pub fn to_flat(&self) -> Vec<f32> {
        flat(self)
    }

    /// Replaces every parameter with values from `params` (same order as [`Self::to_flat`]),
    /// keeping parameter ids, devices and gradient requirements.
    pub fn load_flat(self, params: &[f32]) -> Result<Network, ModelError> {
        load_flat(self, params)
    }

    /// Replaces every parameter with the tensors of a safetensors file written by
    /// [`Self::to_safetensors`] for the same spec.
    pub fn load_safetensors(mut self, bytes: Vec<u8>) -> Result<Network, ModelError> {
        // The inner module, so that the names are the layout's (no variant in the path).
        match &mut self {
            Network::Mlp(m) => crate::params::load_safetensors(m, bytes),
            Network::Cnn(m) => crate::params::load_safetensors(m, bytes),
            Network::Layers(m) => crate::params::load_safetensors(m, bytes),
        }?;
        Ok(self)
    }

    /// The weights as a safetensors file (tensor names as in [`ModelSpec::layout`]).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        match self {
            Network::Mlp(m) => crate::params::to_safetensors(m),
            Network::Cnn(m) => crate::params::to_safetensors(m),
            Network::Layers(m) => crate::params::to_safetensors(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ModelSpec> {
        vec![
            ModelSpec::Logistic {
                inputs: 30,
                classes: 2,
            },
            ModelSpec::Mlp {
                inputs: 8,
                hidden: vec![16, 4],
                classes: 3,
            },
            ModelSpec::Cnn {
                channels: 1,
                height: 28,
                width: 28,
                classes: 10,
            },
        ]
    }

    #[test]
    fn layout_matches_burn_and_round_trips_exactly() {
        let dev = crate::ComputeDevice::Cpu.inference();
        for spec in specs() {
            let params = spec.initial_parameters(3);
            assert_eq!(params.len(), spec.num_parameters());
            let net = spec.build(&params, &dev).unwrap();
            assert_eq!(net.num_params(), spec.num_parameters(), "{spec:?}");
            assert_eq!(
                net.to_flat(),
                params,
                "{spec:?}: flatten(unflatten(p)) != p"
            );
        }
        assert_eq!(specs()[0].num_parameters(), 62);
        assert_eq!(specs()[2].num_parameters(), 80 + 1168 + 784 * 64 + 64 + 650);
    }

    #[test]
    fn initial_parameters_are_seeded_and_bounded() {
        let s = &specs()[1];
        assert_eq!(s.initial_parameters(1), s.initial_parameters(1));
        assert_ne!(s.initial_parameters(1), s.initial_parameters(2));
        let bound = 1.0 / (8f32).sqrt();
        assert!(
            s.initial_parameters(1)[..8 * 16]
                .iter()
                .all(|v| v.abs() <= bound)
        );
    }

    #[test]
    fn wrong_parameter_count_is_refused() {
        let dev = crate::ComputeDevice::Cpu.inference();
        let e = specs()[0].build(&[0.0; 61], &dev).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameter count mismatch: expected 62, got 61"
        );
    }

    #[test]
    fn invalid_specs_are_named() {
        let e = ModelSpec::Cnn {
            channels: 1,
            height: 30,
            width: 28,
            classes: 10,
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("multiples of 4"), "{e}");
        let spec = ModelSpec::Logistic {
            inputs: 4,
            classes: 2,
        };
        assert!(
            spec.check_data(FeatureShape::Flat(5), 2)
                .unwrap_err()
                .to_string()
                .contains("5 values")
        );
    }

    #[test]
    fn safetensors_export_names_tensors() {
        let dev = crate::ComputeDevice::Cpu.inference();
        let spec = &specs()[1];
        let bytes = spec
            .build(&spec.initial_parameters(0), &dev)
            .unwrap()
            .to_safetensors()
            .unwrap();
        let text = String::from_utf8_lossy(&bytes[..200.min(bytes.len())]).to_string();
        assert!(text.contains("layers.0.weight"), "{text}");
    }

    #[test]
    fn spec_toml_form() {
        let s: ModelSpec =
            serde_json::from_str(r#"{"kind":"mlp","inputs":30,"hidden":[16],"classes":2}"#)
                .unwrap();
        assert_eq!(
            s,
            ModelSpec::Mlp {
                inputs: 30,
                hidden: vec![16],
                classes: 2
            }
        );
    }
}
