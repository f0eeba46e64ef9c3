//! cohort's training loop, for any Burn module: the task's shuffled mini-batches,
//! cross-entropy, FedProx's proximal term and SCAFFOLD's correction on the autodiff graph,
//! and SGD (momentum, weight decay) or Adam. Presets, declared stacks and custom modules all
//! train here.

use std::time::Instant;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;

use crate::ModelError;
use crate::data::Dataset;
use crate::federated::FederatedModule;
use crate::settings::{Optimizer, TrainConfig, TrainReport};

pub(crate) fn batch_tensors(
    data: &Dataset,
    idx: &[usize],
    device: &Device,
) -> (Tensor<2>, Tensor<1, Int>) {
    let d = data.shape.len();
    let mut x = Vec::with_capacity(idx.len() * d);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend_from_slice(data.row(i));
        y.push(data.labels[i] as i64);
    }
    (
        Tensor::<2>::from_data(TensorData::new(x, [idx.len(), d]), device),
        Tensor::<1, Int>::from_data(TensorData::new(y, [idx.len()]), device),
    )
}

/// cohort's training loop for any module: shuffled mini-batches of cross-entropy, FedProx's
/// and SCAFFOLD's terms when the task asks for them, SGD (momentum, weight decay) or Adam.
/// The module gives the logits of a batch in training ([`FederatedModule::forward_train`],
/// with the step's seed) and its loss ([`FederatedModule::loss`]).
pub(crate) fn fit<M: FederatedModule>(
    mut model: M,
    data: &Dataset,
    cfg: &TrainConfig,
    dev: &Device,
    correction: Option<&[f32]>,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    let start = Instant::now();
    let dev = dev.clone();
    let decay = (cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32));
    let mut opt = match cfg.optimizer {
        Optimizer::Sgd => SgdConfig::new()
            .with_momentum((cfg.momentum > 0.0).then(|| {
                // PyTorch's form: no dampening, the first step's velocity is its gradient.
                MomentumConfig::new()
                    .with_momentum(cfg.momentum)
                    .with_dampening(0.0)
            }))
            .with_weight_decay(decay)
            .init(),
        Optimizer::Adam => AdamConfig::new().with_weight_decay(decay).init(),
    };
    // FedProx: the global model's parameters, fixed, in the order the model visits its own.
    let anchor = (cfg.proximal_mu > 0.0).then(|| {
        let mut g = Anchor(Vec::new());
        model.visit(&mut g);
        g.0
    });
    let correction = correction.map(|c| {
        let mut split = Split {
            flat: c,
            offset: 0,
            out: Vec::new(),
            device: dev.clone(),
        };
        model.visit(&mut split);
        split.out
    });
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut epoch_loss = Vec::with_capacity(cfg.epochs);
    let mut correct = 0i64;
    let mut step = 0u64;
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut total = 0.0f64;
        for batch in order.chunks(cfg.batch_size) {
            let (x, y) = batch_tensors(data, batch, &dev);
            // Each step's dropout masks come from the task's seed and the step.
            step += 1;
            let logits =
                model.forward_train(x, cfg.seed ^ step.wrapping_mul(0xa076_1d64_78bd_642f));
            if epoch + 1 == cfg.epochs {
                let n = batch.len();
                let hits: i64 = logits
                    .clone()
                    .argmax(1)
                    .reshape([n])
                    .equal(y.clone())
                    .int()
                    .sum()
                    .into_scalar();
                correct += hits;
            }
            let mut loss = model.loss(logits, y);
            let l: f32 = loss.clone().into_scalar();
            total += l as f64 * batch.len() as f64;
            if let Some(anchor) = &anchor {
                let mut prox = Proximal {
                    anchor,
                    next: 0,
                    sum: None,
                };
                model.visit(&mut prox);
                if let Some(sq) = prox.sum {
                    loss = loss + sq.mul_scalar(cfg.proximal_mu / 2.0);
                }
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(cfg.learning_rate, model, grads);
            if let Some(correction) = &correction {
                // SCAFFOLD moves the weights by −lr · (c − c_i) after every step, outside the
                // optimiser's momentum and moments (the paper's SGD step, and NIID-Bench's with
                // momentum): through the gradient, momentum would amplify the correction
                // tenfold at 0.9 and the next control variates with it, until training diverges.
                model = model.map(&mut Shift {
                    by: correction,
                    next: 0,
                    scale: cfg.learning_rate,
                });
            }
        }
        let mean = total / data.len() as f64;
        if !mean.is_finite() {
            return Err(ModelError::Diverged {
                learning_rate: cfg.learning_rate,
            });
        }
        epoch_loss.push(mean);
    }
    let out = crate::params::flat(&model.valid());
    Ok((
        out,
        TrainReport {
            epoch_loss,
            last_epoch_accuracy: correct as f64 / data.len() as f64,
            num_examples: data.len(),
            seconds: start.elapsed().as_secs_f64(),
        },
    ))
}

/// Every parameter of a model, flattened and cut from the autodiff graph.
struct Anchor(Vec<Tensor<1>>);

impl ModuleVisitor for Anchor {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let n = p.val().shape().num_elements();
        self.0.push(p.val().reshape([n]).detach());
    }
}

/// ‖w − anchor‖² over every parameter, on the autodiff graph (its gradient is FedProx's
/// `μ (w − w_global)` once scaled by μ/2).
struct Proximal<'a> {
    anchor: &'a [Tensor<1>],
    next: usize,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for Proximal<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let w = p.val();
        let n = w.shape().num_elements();
        let sq = (w.reshape([n]) - self.anchor[self.next].clone())
            .square()
            .sum();
        self.next += 1;
        self.sum = Some(match self.sum.take() {
            Some(s) => s + sq,
            None => sq,
        });
    }
}

/// A flat vector cut into one detached tensor per parameter, in the order the model visits
/// its parameters (the flat order).
struct Split<'a> {
    flat: &'a [f32],
    offset: usize,
    out: Vec<Tensor<1>>,
    device: Device,
}

impl ModuleVisitor for Split<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let n = p.val().shape().num_elements();
        let part = self.flat[self.offset..self.offset + n].to_vec();
        self.offset += n;
        self.out.push(Tensor::<1>::from_data(
            TensorData::new(part, [n]),
            &self.device,
        ));
    }
}

/// Every trained parameter moved by `−scale · by` (running statistics, which take no
/// gradient, are left alone), keeping ids, devices and gradient requirements.
struct Shift<'a> {
    by: &'a [Tensor<1>],
    next: usize,
    scale: f64,
}

impl ModuleMapper for Shift<'_> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let k = self.by[self.next].clone();
        self.next += 1;
        let v = p.val();
        if !v.is_require_grad() {
            return p;
        }
        let t = (v.clone().detach() - k.reshape(v.shape()).mul_scalar(self.scale)).detach();
        let id = p.id;
        p.transform_for_load(t, id)
    }
}
