//! Declared layer stacks: a model as a list of [`Layer`]s in a job specification
//! (`kind = "layers"` and `[[model.layers]]` tables), for people who do not write Rust.
//!
//! Each layer is checked against the shape it receives, and an error names the layer by its
//! position and type (`layer 3 (conv2d): kernel 5 does not fit its 4×4 input`). The stack
//! builds a [`LayerNet`], a Burn module whose flat parameter order is the layers' order (each
//! layer's weight before its bias), so everything that works on the flat vector (secure
//! aggregation, clipping, strategies) works on a declared model unchanged.
//!
//! Batch normalisation follows the FedAvg-of-everything choice: its running mean and variance
//! are part of the flat vector (after γ and β), so the server averages them like the weights
//! and the global model serves with the federation's statistics. A participant's own
//! statistics therefore leave it, inside the (encrypted) update, like its weights do.
//!
//! Dropout draws its masks from the training task's seed (a ChaCha8 stream per step and
//! layer), so a declared model trains to the same bits in every engine; it is the identity
//! outside training.

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2dConfig, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::tensor::activation::{gelu, relu, sigmoid, tanh};
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::FeatureShape;
use crate::kernels;
use crate::kernels::linear;

/// One tensor of the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// Inputs feeding each output unit (for initialisation).
    pub fan_in: usize,
    pub init: Init,
}

/// How a parameter tensor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// U(−1/√fan_in, 1/√fan_in), PyTorch's default for linear and convolution layers.
    FanIn,
    /// N(0, 1), PyTorch's default for embeddings.
    Normal,
    Zeros,
    Ones,
}

/// One layer of a declared stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Layer {
    /// Fully connected, `units` outputs; an image input is flattened first.
    Linear {
        units: usize,
    },
    /// 2-D convolution with `channels` output channels and a square `kernel`.
    Conv2d {
        channels: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        /// Zeros added on every side (`(kernel − 1) / 2` keeps the size at stride 1).
        #[serde(default)]
        padding: usize,
    },
    /// Maximum over `size × size` windows, stride `size` (a partial window at the edge is
    /// dropped, as in PyTorch).
    MaxPool2d {
        size: usize,
    },
    /// Mean over `size × size` windows, stride `size`.
    AvgPool2d {
        size: usize,
    },
    /// Batch normalisation over the features of a flat input or the channels of an image.
    BatchNorm,
    /// Layer normalisation over the features of a flat input.
    LayerNorm,
    /// Zeroes each value with probability `p` while training (scaling the rest by
    /// `1 / (1 − p)`).
    Dropout {
        p: f64,
    },
    /// A categorical column's one-hot block of a flat row (`categories` values from
    /// `offset`) replaced, in place, by `dim` learned values: row k of a `[categories, dim]`
    /// table for category k, zeros for an unknown category. With `column`, the job's table
    /// schema gives `offset` and `categories` (the layer must then come before any other);
    /// without it they are given here, for rows encoded elsewhere.
    Embedding {
        dim: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        column: Option<String>,
        #[serde(default)]
        offset: usize,
        #[serde(default)]
        categories: usize,
    },
    /// An image as a flat row (channels, then rows, then columns).
    Flatten,
    Relu,
    Tanh,
    Sigmoid,
    Gelu,
}

fn one() -> usize {
    1
}

impl std::fmt::Display for Layer {
    /// `conv2d(6, 5×5)`, `linear(10)`, `relu`: what a summary of a stack shows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Layer::Linear { units } => write!(f, "linear({units})"),
            Layer::Conv2d {
                channels,
                kernel,
                stride,
                padding,
            } => {
                write!(f, "conv2d({channels}, {kernel}×{kernel}")?;
                if stride != 1 {
                    write!(f, ", stride {stride}")?;
                }
                if padding != 0 {
                    write!(f, ", padding {padding}")?;
                }
                f.write_str(")")
            }
            Layer::MaxPool2d { size } | Layer::AvgPool2d { size } => {
                write!(f, "{}({size})", self.kind())
            }
            Layer::Dropout { p } => write!(f, "dropout({p})"),
            Layer::Embedding {
                dim,
                ref column,
                offset,
                categories,
            } => match column {
                Some(c) => write!(f, "embedding({c}: {categories} → {dim})"),
                None => write!(f, "embedding({categories} from {offset} → {dim})"),
            },
            _ => f.write_str(self.kind()),
        }
    }
}

/// A stack as one line: `conv2d(6, 5×5) → relu → … → linear(10)`.
pub fn summary(layers: &[Layer]) -> String {
    layers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" → ")
}

impl Layer {
    /// The name it has in a specification.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Linear { .. } => "linear",
            Layer::Conv2d { .. } => "conv2d",
            Layer::MaxPool2d { .. } => "max_pool2d",
            Layer::AvgPool2d { .. } => "avg_pool2d",
            Layer::BatchNorm => "batch_norm",
            Layer::LayerNorm => "layer_norm",
            Layer::Dropout { .. } => "dropout",
            Layer::Embedding { .. } => "embedding",
            Layer::Flatten => "flatten",
            Layer::Relu => "relu",
            Layer::Tanh => "tanh",
            Layer::Sigmoid => "sigmoid",
            Layer::Gelu => "gelu",
        }
    }

    /// The shape this layer gives for `input`, or why it cannot take it.
    fn output(&self, input: FeatureShape) -> Result<FeatureShape, String> {
        let image = |what: &str| match input {
            FeatureShape::Image {
                channels,
                height,
                width,
            } => Ok((channels, height, width)),
            FeatureShape::Flat(n) => Err(format!(
                "{what} needs an image (channels × height × width), and it receives a flat row \
                 of {n} values"
            )),
        };
        match *self {
            Layer::Linear { units } => {
                if units == 0 {
                    return Err("units must be at least 1".into());
                }
                Ok(FeatureShape::Flat(units))
            }
            Layer::Conv2d {
                channels,
                kernel,
                stride,
                padding,
            } => {
                let (_, h, w) = image("a convolution")?;
                if channels == 0 || kernel == 0 || stride == 0 {
                    return Err(format!(
                        "channels, kernel and stride must be at least 1 (channels {channels}, \
                         kernel {kernel}, stride {stride})"
                    ));
                }
                if kernel > h + 2 * padding || kernel > w + 2 * padding {
                    return Err(format!(
                        "kernel {kernel} does not fit its {h}×{w} input (padding {padding})"
                    ));
                }
                Ok(FeatureShape::Image {
                    channels,
                    height: (h + 2 * padding - kernel) / stride + 1,
                    width: (w + 2 * padding - kernel) / stride + 1,
                })
            }
            Layer::MaxPool2d { size } | Layer::AvgPool2d { size } => {
                let (c, h, w) = image("pooling")?;
                if size == 0 || size > h || size > w {
                    return Err(format!("size {size} does not fit its {h}×{w} input"));
                }
                Ok(FeatureShape::Image {
                    channels: c,
                    height: h / size,
                    width: w / size,
                })
            }
            Layer::LayerNorm => match input {
                FeatureShape::Flat(_) => Ok(input),
                FeatureShape::Image { .. } => Err(
                    "layer_norm normalises a flat row: put a flatten (or a linear layer) before it"
                        .into(),
                ),
            },
            Layer::Dropout { p } => {
                if !(0.0..1.0).contains(&p) {
                    return Err(format!("p must be in [0, 1), not {p}"));
                }
                Ok(input)
            }
            Layer::Embedding {
                dim,
                ref column,
                offset,
                categories,
            } => {
                let FeatureShape::Flat(n) = input else {
                    return Err(
                        "an embedding replaces part of a flat row, and it receives an image".into(),
                    );
                };
                if dim == 0 {
                    return Err("dim must be at least 1".into());
                }
                if categories == 0 {
                    return Err(match column {
                        Some(c) => format!(
                            "column {c:?} was not found in a table schema: an embedding by \
                             column needs the job's [data] schema (or give offset and \
                             categories for rows encoded elsewhere)"
                        ),
                        None => "give column (a categorical column of the job's table), or \
                                 offset and categories (at least 1)"
                            .into(),
                    });
                }
                if offset + categories > n {
                    return Err(format!(
                        "its block [{offset}, {}) does not fit a row of {n} values",
                        offset + categories
                    ));
                }
                Ok(FeatureShape::Flat(n - categories + dim))
            }
            Layer::Flatten => Ok(FeatureShape::Flat(input.len())),
            Layer::BatchNorm | Layer::Relu | Layer::Tanh | Layer::Sigmoid | Layer::Gelu => {
                Ok(input)
            }
        }
    }

    /// This layer's parameter tensors for `input`, in Burn's visiting order, named
    /// `layers.{k}.{module}.{tensor}` as Burn names them.
    fn params(&self, k: usize, input: FeatureShape) -> Vec<ParamInfo> {
        let p =
            |module: &str, tensor: &str, shape: Vec<usize>, fan_in: usize, init: Init| ParamInfo {
                name: format!("layers.{k}.{module}.{tensor}"),
                shape,
                fan_in,
                init,
            };
        let features = match input {
            FeatureShape::Flat(n) => n,
            FeatureShape::Image { channels, .. } => channels,
        };
        match *self {
            Layer::Linear { units } => {
                let n = input.len();
                vec![
                    p("linear", "weight", vec![n, units], n, Init::FanIn),
                    p("linear", "bias", vec![units], n, Init::FanIn),
                ]
            }
            Layer::Conv2d {
                channels, kernel, ..
            } => {
                let fan_in = features * kernel * kernel;
                vec![
                    p(
                        "conv2d",
                        "weight",
                        vec![channels, features, kernel, kernel],
                        fan_in,
                        Init::FanIn,
                    ),
                    p("conv2d", "bias", vec![channels], fan_in, Init::FanIn),
                ]
            }
            Layer::BatchNorm => vec![
                p("batch_norm", "gamma", vec![features], 1, Init::Ones),
                p("batch_norm", "beta", vec![features], 1, Init::Zeros),
                p("batch_norm", "running_mean", vec![features], 1, Init::Zeros),
                p("batch_norm", "running_var", vec![features], 1, Init::Ones),
            ],
            Layer::LayerNorm => vec![
                p("layer_norm", "gamma", vec![features], 1, Init::Ones),
                p("layer_norm", "beta", vec![features], 1, Init::Zeros),
            ],
            Layer::Embedding {
                dim, categories, ..
            } => vec![p(
                "embedding",
                "weight",
                vec![categories, dim],
                1,
                Init::Normal,
            )],
            _ => Vec::new(),
        }
    }
}

/// The shape `layer` gives for `input`, in a checked stack.
pub(crate) fn next_shape(layer: &Layer, input: FeatureShape) -> FeatureShape {
    layer.output(input).expect("a checked stack")
}

/// Checks a stack for `input` examples and `classes` outputs; the input shape of every layer,
/// or an error naming the first layer that does not fit.
pub fn check(
    input: FeatureShape,
    layers: &[Layer],
    classes: usize,
) -> Result<Vec<FeatureShape>, String> {
    if input.is_empty() {
        return Err("the input must have at least one value".into());
    }
    if classes < 2 {
        return Err(format!("classes must be at least 2, not {classes}"));
    }
    let mut shapes = Vec::with_capacity(layers.len());
    let mut shape = input;
    for (k, layer) in layers.iter().enumerate() {
        shapes.push(shape);
        shape = layer
            .output(shape)
            .map_err(|e| format!("layer {k} ({}): {e}", layer.kind()))?;
    }
    match (shape, layers.last()) {
        (_, None) => Err(format!(
            "no layers: a stack ends with a linear layer of {classes} units (the classes)"
        )),
        (FeatureShape::Flat(n), _) if n == classes => Ok(shapes),
        (out, Some(last)) => Err(format!(
            "layer {} ({}) gives {} values, not the {classes} classes: end the stack with a \
             linear layer of {classes} units",
            layers.len() - 1,
            last.kind(),
            out.len()
        )),
    }
}

/// The flat layout of a checked stack.
pub(crate) fn layout(input: FeatureShape, layers: &[Layer]) -> Vec<ParamInfo> {
    let mut shape = input;
    let mut out = Vec::new();
    for (k, layer) in layers.iter().enumerate() {
        out.extend(layer.params(k, shape));
        shape = layer.output(shape).expect("a checked stack");
    }
    out
}

/// The modules of one layer (at most one is set; none for layers without parameters).
#[derive(Module, Debug)]
pub struct LayerModule {
    linear: Option<Linear>,
    conv2d: Option<Conv2d>,
    batch_norm: Option<BatchNorm>,
    layer_norm: Option<LayerNorm>,
    embedding: Option<Embedding>,
}

/// The network a declared stack builds.
#[derive(Module, Debug)]
pub struct LayerNet {
    layers: Vec<LayerModule>,
    #[module(skip)]
    plan: Vec<Layer>,
    #[module(skip)]
    input: FeatureShape,
}

/// A value in flight between layers.
enum Flow {
    Flat(Tensor<2>),
    Image(Tensor<4>),
}

impl Flow {
    fn flat(self) -> Tensor<2> {
        match self {
            Flow::Flat(x) => x,
            Flow::Image(x) => x.flatten(1, 3),
        }
    }
    fn image(self) -> Tensor<4> {
        match self {
            Flow::Image(x) => x,
            Flow::Flat(_) => unreachable!("a checked stack gives images to image layers"),
        }
    }
    fn map(
        self,
        f2: impl FnOnce(Tensor<2>) -> Tensor<2>,
        f4: impl FnOnce(Tensor<4>) -> Tensor<4>,
    ) -> Flow {
        match self {
            Flow::Flat(x) => Flow::Flat(f2(x)),
            Flow::Image(x) => Flow::Image(f4(x)),
        }
    }
}

impl LayerNet {
    /// The modules of a checked stack, freshly initialised (the caller loads its parameters).
    pub(crate) fn new(input: FeatureShape, layers: &[Layer], device: &Device) -> Self {
        let mut shape = input;
        let mut modules = Vec::with_capacity(layers.len());
        for layer in layers {
            let features = match shape {
                FeatureShape::Flat(n) => n,
                FeatureShape::Image { channels, .. } => channels,
            };
            let mut m = LayerModule {
                linear: None,
                conv2d: None,
                batch_norm: None,
                layer_norm: None,
                embedding: None,
            };
            match *layer {
                Layer::Linear { units } => {
                    m.linear = Some(LinearConfig::new(shape.len(), units).init(device));
                }
                Layer::Conv2d {
                    channels,
                    kernel,
                    stride,
                    padding,
                } => {
                    m.conv2d = Some(
                        Conv2dConfig::new([features, channels], [kernel, kernel])
                            .with_stride([stride, stride])
                            .with_padding(PaddingConfig2d::Explicit(
                                padding, padding, padding, padding,
                            ))
                            .init(device),
                    );
                }
                Layer::BatchNorm => {
                    m.batch_norm = Some(BatchNormConfig::new(features).init(device))
                }
                Layer::LayerNorm => {
                    m.layer_norm = Some(LayerNormConfig::new(features).init(device))
                }
                Layer::Embedding {
                    dim, categories, ..
                } => m.embedding = Some(EmbeddingConfig::new(categories, dim).init(device)),
                _ => {}
            }
            modules.push(m);
            shape = layer.output(shape).expect("a checked stack");
        }
        LayerNet {
            layers: modules,
            plan: layers.to_vec(),
            input,
        }
    }

    /// Logits for flattened examples. `dropout_seed`: training (dropout masks drawn from it);
    /// `None`: inference (dropout is the identity).
    pub(crate) fn forward(&self, x: Tensor<2>, dropout_seed: Option<u64>) -> Tensor<2> {
        let mut flow = match self.input {
            FeatureShape::Flat(_) => Flow::Flat(x),
            FeatureShape::Image {
                channels,
                height,
                width,
            } => {
                let b = x.dims()[0];
                Flow::Image(x.reshape([b, channels, height, width]))
            }
        };
        for (k, (layer, m)) in self.plan.iter().zip(&self.layers).enumerate() {
            flow = match *layer {
                Layer::Linear { .. } => {
                    Flow::Flat(linear(m.linear.as_ref().expect("built"), flow.flat()))
                }
                Layer::Conv2d {
                    stride, padding, ..
                } => {
                    let conv = m.conv2d.as_ref().expect("built");
                    let x = flow.image();
                    let (w, b) = (conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
                    Flow::Image(match b {
                        // cohort's CPU kernel for convolutions of stride 1.
                        Some(b)
                            if stride == 1
                                && kernels::supported(&x)
                                && kernels::supported(&w)
                                && kernels::supported(&b) =>
                        {
                            kernels::conv2d(x, w, b, padding)
                        }
                        _ => conv.forward(x),
                    })
                }
                Layer::MaxPool2d { size } => {
                    let x = flow.image();
                    Flow::Image(if size == 2 && kernels::supported(&x) {
                        kernels::max_pool2x2(x)
                    } else {
                        MaxPool2dConfig::new([size, size])
                            .with_strides([size, size])
                            .init()
                            .forward(x)
                    })
                }
                Layer::AvgPool2d { size } => Flow::Image(
                    AvgPool2dConfig::new([size, size])
                        .with_strides([size, size])
                        .init()
                        .forward(flow.image()),
                ),
                Layer::BatchNorm => {
                    let bn = m.batch_norm.as_ref().expect("built");
                    flow.map(|x| bn.forward(x), |x| bn.forward(x))
                }
                Layer::LayerNorm => {
                    Flow::Flat(m.layer_norm.as_ref().expect("built").forward(flow.flat()))
                }
                Layer::Dropout { p } => match dropout_seed {
                    Some(seed) if p > 0.0 => {
                        let mix = seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        flow.map(|x| dropout(x, p, mix), |x| dropout(x, p, mix))
                    }
                    _ => flow,
                },
                Layer::Embedding {
                    offset, categories, ..
                } => {
                    let table = m.embedding.as_ref().expect("built").weight.val();
                    Flow::Flat(embed(flow.flat(), table, offset, categories))
                }
                Layer::Flatten => Flow::Flat(flow.flat()),
                Layer::Relu => flow.map(relu, relu),
                Layer::Tanh => flow.map(tanh, tanh),
                Layer::Sigmoid => flow.map(sigmoid, sigmoid),
                Layer::Gelu => flow.map(gelu, gelu),
            };
        }
        flow.flat()
    }
}

/// `x` with columns `[offset, offset + categories)` replaced by their product with `table`
/// (`[categories, dim]`): a one-hot block becomes its category's row.
fn embed(x: Tensor<2>, table: Tensor<2>, offset: usize, categories: usize) -> Tensor<2> {
    let [b, n] = x.dims();
    let end = offset + categories;
    let block = x.clone().slice([0..b, offset..end]).matmul(table);
    let mut parts = Vec::with_capacity(3);
    if offset > 0 {
        parts.push(x.clone().slice([0..b, 0..offset]));
    }
    parts.push(block);
    if end < n {
        parts.push(x.slice([0..b, end..n]));
    }
    Tensor::cat(parts, 1)
}

/// Inverted dropout with a mask drawn from `seed`: each value kept with probability `1 − p`
/// and scaled by `1 / (1 − p)`.
fn dropout<const D: usize>(x: Tensor<D>, p: f64, seed: u64) -> Tensor<D> {
    let shape = x.shape();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..shape.num_elements())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
    x * mask
}
