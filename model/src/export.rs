//! A model version for PyTorch: its weights as a safetensors file in PyTorch's layout, and a
//! Python module that builds the matching `torch.nn.Module`.
//!
//! Every model is exported through its layer stack ([`ModelSpec::as_layers`]). The module
//! holds the layers in an `nn.ModuleList` named `layers`, so a tensor is named
//! `layers.{k}.{weight|bias|running_mean|running_var|num_batches_tracked}` with `k` the
//! layer's position in the stack, the same position cohort's own names and errors use. Linear
//! weights are transposed to PyTorch's `[out, in]`; convolution weights already have its
//! `[out, in, kh, kw]`. `load_state_dict` takes the file strictly (every tensor, nothing
//! more), and the module's forward pass takes rows as cohort does (an image flattened
//! channel by channel, then row by row) and returns the same logits.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, TensorView};

use crate::layers::Layer;
use crate::{FeatureShape, ModelError, ModelSpec};

/// The two files of an export.
#[derive(Debug, Clone)]
pub struct PyTorchExport {
    /// `model.safetensors`: the state dict.
    pub safetensors: Vec<u8>,
    /// `model.py`: `build()` returns the module, `load(path)` the module with the weights.
    pub module: String,
}

/// Exports `params` of `spec` for PyTorch.
pub fn pytorch(spec: &ModelSpec, params: &[f32]) -> Result<PyTorchExport, ModelError> {
    spec.validate()?;
    if let ModelSpec::Custom { name, .. } = spec {
        return Err(ModelError::InvalidSpec(format!(
            "custom model {name:?}: cohort knows its parameters, not its PyTorch form; write \
             the matching nn.Module and load the registry's safetensors into it"
        )));
    }
    if params.len() != spec.num_parameters() {
        return Err(ModelError::ParameterCount {
            expected: spec.num_parameters(),
            got: params.len(),
        });
    }
    let stack = spec.as_layers();
    let ModelSpec::Layers { layers, .. } = &stack else {
        unreachable!("as_layers gives a stack")
    };
    // Each tensor as little-endian bytes with its PyTorch shape, by name.
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut offset = 0;
    for p in stack.layout() {
        let n: usize = p.shape.iter().product();
        let values = &params[offset..offset + n];
        offset += n;
        let mut parts = p.name.split('.');
        let (k, module, tensor) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("layers"), Some(k), Some(m), Some(t)) => (k, m, t),
            _ => unreachable!("stack tensors are named layers.k.module.tensor"),
        };
        let (shape, values): (Vec<usize>, Vec<f32>) = match (module, tensor) {
            ("linear", "weight") => {
                let (i, o) = (p.shape[0], p.shape[1]);
                let mut t = vec![0.0; n];
                for r in 0..i {
                    for c in 0..o {
                        t[c * i + r] = values[r * o + c];
                    }
                }
                (vec![o, i], t)
            }
            _ => (p.shape.clone(), values.to_vec()),
        };
        let name = match tensor {
            "gamma" => "weight",
            "beta" => "bias",
            t => t,
        };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.insert(format!("layers.{k}.{name}"), (Dtype::F32, shape, bytes));
        if tensor == "running_var" {
            // PyTorch's batch norm counts its batches; evaluation does not read the count.
            tensors.insert(
                format!("layers.{k}.num_batches_tracked"),
                (Dtype::I64, Vec::new(), 0i64.to_le_bytes().to_vec()),
            );
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Store(format!("{name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let safetensors = safetensors::serialize(views, None)
        .map_err(|e| ModelError::Store(format!("writing safetensors: {e}")))?;
    Ok(PyTorchExport {
        safetensors,
        module: module_source(spec, stack.input_shape(), layers),
    })
}

/// `model.py` for a checked stack.
fn module_source(spec: &ModelSpec, input: FeatureShape, layers: &[Layer]) -> String {
    let mut shape = input;
    let mut lines = Vec::new();
    for layer in layers {
        let features = match shape {
            FeatureShape::Flat(n) => n,
            FeatureShape::Image { channels, .. } => channels,
        };
        let image = matches!(shape, FeatureShape::Image { .. });
        lines.push(match *layer {
            Layer::Linear { units } => format!("nn.Linear({}, {units})", shape.len()),
            Layer::Conv2d {
                channels,
                kernel,
                stride,
                padding,
            } => format!(
                "nn.Conv2d({features}, {channels}, {kernel}, stride={stride}, padding={padding})"
            ),
            Layer::MaxPool2d { size } => format!("nn.MaxPool2d({size})"),
            Layer::AvgPool2d { size } => format!("nn.AvgPool2d({size})"),
            Layer::BatchNorm if image => format!("nn.BatchNorm2d({features})"),
            Layer::BatchNorm => format!("nn.BatchNorm1d({features})"),
            Layer::LayerNorm => format!("nn.LayerNorm({features})"),
            Layer::Dropout { p } => format!("nn.Dropout({p})"),
            Layer::Embedding {
                dim,
                offset,
                categories,
                ..
            } => format!("OneHotEmbedding({offset}, {categories}, {dim})"),
            Layer::Flatten => "nn.Flatten()".into(),
            Layer::Relu => "nn.ReLU()".into(),
            Layer::Tanh => "nn.Tanh()".into(),
            Layer::Sigmoid => "nn.Sigmoid()".into(),
            Layer::Gelu => "nn.GELU()".into(),
        });
        shape = crate::layers::next_shape(layer, shape);
    }
    let input = match input {
        FeatureShape::Flat(n) => format!("({n},)"),
        FeatureShape::Image {
            channels,
            height,
            width,
        } => format!("({channels}, {height}, {width})"),
    };
    let layers: String = lines
        .iter()
        .enumerate()
        .map(|(k, l)| format!("            {l},  # {k}\n"))
        .collect();
    let spec_json = serde_json::to_string(spec).expect("a spec serialises");
    format!(
        r#""""A cohort model version for PyTorch, written by `cohort export`.

    import model
    net = model.load("model.safetensors")   # in evaluation mode
    logits = net(rows)                      # rows: [batch, {len}] float32, as cohort takes them
"""

import json

import torch
from torch import nn

# The cohort model specification this module was written from.
SPEC = json.loads(r"""{spec_json}""")

INPUT = {input}


class OneHotEmbedding(nn.Embedding):
    """Replaces columns [offset, offset + categories) of a row, a category's one-hot block,
    by that category's row of the table (zeros for an unknown category)."""

    def __init__(self, offset, categories, dim):
        super().__init__(categories, dim)
        self.offset = offset

    def forward(self, x):
        a, b = self.offset, self.offset + self.num_embeddings
        return torch.cat([x[:, :a], x[:, a:b] @ self.weight, x[:, b:]], dim=1)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [
{layers}            ]
        )

    def forward(self, rows):
        x = rows.reshape(rows.shape[0], *INPUT)
        for layer in self.layers:
            if isinstance(layer, nn.Linear) and x.dim() > 2:
                x = x.flatten(1)
            x = layer(x)
        return x


def build():
    return Model()


def load(path):
    from safetensors.torch import load_file

    net = build()
    net.load_state_dict(load_file(path), strict=True)
    return net.eval()
"#,
        len = spec.input_shape().len(),
    )
}
