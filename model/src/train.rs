//! Seeded local training and evaluation.

use burn::tensor::Device;

use crate::data::Dataset;
use crate::fit::{batch_tensors, fit};
use crate::net::{ModelSpec, Network};
pub use crate::settings::{Metrics, Optimizer, TrainConfig, TrainReport};
use crate::{ComputeDevice, ModelError};

/// Trains from `params` on `data` and returns the new flat parameters.
///
/// Deterministic: the same inputs give the same outputs on the same device kind.
pub fn train(
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
    cfg: &TrainConfig,
    device: ComputeDevice,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    train_corrected(spec, params, data, cfg, device, None)
}

/// [`train`] with SCAFFOLD's drift correction: `correction` (the server's control variate
/// minus this participant's, flat in the model's order; see [`crate::scaffold`]) moves the
/// weights by `−lr · correction` after every optimiser step, outside SGD's momentum and
/// Adam's moments. With plain SGD this is the corrected gradient step of the paper.
pub fn train_corrected(
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
    cfg: &TrainConfig,
    device: ComputeDevice,
    correction: Option<&[f32]>,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    cfg.validate()?;
    if let Some(c) = correction
        && c.len() != params.len()
    {
        return Err(ModelError::ParameterCount {
            expected: params.len(),
            got: c.len(),
        });
    }
    spec.check_data(data.shape, data.num_classes)?;
    if data.is_empty() {
        return Err(ModelError::InvalidConfig(
            "no training examples".to_string(),
        ));
    }
    if let ModelSpec::Custom { name, .. } = spec {
        return crate::custom::lookup(name)?.train(params, data, cfg, device, correction);
    }
    let dev = device.training();
    let model = spec.build(params, &dev)?;
    fit(model, data, cfg, &dev, correction)
}

/// A participant's update as it leaves: clipped by [`clip_update`] when the task gives a clip
/// norm; then, in SCAFFOLD jobs, the change of the participant's control variate (model-sized,
/// not clipped); then, with adaptive clipping's `indicator`, one more value, the indicator
/// when the update was within the clip norm and 0 when it was clipped. Says whether it was
/// clipped.
pub fn update_to_send(
    update: &mut Vec<f32>,
    spec: &ModelSpec,
    clip_norm: Option<f64>,
    per_layer: bool,
    control_change: Option<&[f32]>,
    indicator: Option<f64>,
) -> bool {
    let clipped = clip_norm.is_some_and(|c| clip_update(update, spec, c, per_layer));
    if let Some(dc) = control_change {
        update.extend_from_slice(dc);
    }
    if let Some(b) = indicator {
        update.push(if clipped { 0.0 } else { b as f32 });
    }
    clipped
}

/// Clips a participant's update before it leaves: as a whole to L2 norm `max_norm`, or, with
/// `per_layer`, each layer (a module's weight and bias together) to `max_norm · √(n_l / d)`
/// for its n_l of the d values, so that the whole stays within `max_norm` (the sensitivity
/// differential privacy is sized from) while no single layer's scale decides the rest's.
/// Says whether anything was clipped.
pub fn clip_update(update: &mut [f32], spec: &ModelSpec, max_norm: f64, per_layer: bool) -> bool {
    if !per_layer {
        return clip_l2(update, max_norm);
    }
    let d = spec.num_parameters() as f64;
    let mut offset = 0;
    let mut clipped = false;
    for (_, n) in spec.layer_sizes() {
        let end = (offset + n).min(update.len());
        clipped |= clip_l2(&mut update[offset..end], max_norm * (n as f64 / d).sqrt());
        offset = end;
    }
    clipped
}

/// Scales `update` down to L2 norm `max_norm` when it is longer (per-update norm clipping,
/// before it leaves the participant); says whether it did.
pub fn clip_l2(update: &mut [f32], max_norm: f64) -> bool {
    let norm = update
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if norm <= max_norm || norm == 0.0 {
        return false;
    }
    let scale = (max_norm / norm) as f32;
    update.iter_mut().for_each(|x| *x *= scale);
    true
}

/// Evaluates parameters on `data`: mean cross-entropy, accuracy and, for two classes, AUC.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
    device: ComputeDevice,
) -> Result<Metrics, ModelError> {
    spec.check_data(data.shape, data.num_classes)?;
    if let ModelSpec::Custom { name, .. } = spec {
        let x: Vec<f32> = (0..data.len()).flat_map(|i| data.row(i).to_vec()).collect();
        let logits = crate::custom::lookup(name)?.logits(params, &x, data.len(), device)?;
        return Ok(metrics_from_logits(&logits, &data.labels, spec.classes()));
    }
    let dev = device.inference();
    let model = spec.build(params, &dev)?;
    let logits = predict_logits(&model, data, &dev);
    Ok(metrics_from_logits(&logits, &data.labels, spec.classes()))
}

/// Logits for every example of `data`, row-major `[len, classes]`.
pub fn predict_logits(model: &Network, data: &Dataset, dev: &Device) -> Vec<f32> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::new();
    for chunk in idx.chunks(1024) {
        let (x, _) = batch_tensors(data, chunk, dev);
        out.extend(
            model
                .forward(x)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 logits"),
        );
    }
    out
}

/// Loss, accuracy and AUC from logits (row-major, `classes` per row).
pub fn metrics_from_logits(logits: &[f32], labels: &[u32], classes: usize) -> Metrics {
    let n = labels.len();
    let mut loss = 0.0f64;
    let mut correct = 0usize;
    let mut scores = Vec::with_capacity(n);
    for (row, &y) in logits.chunks(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        loss += lse - row[y as usize] as f64;
        let arg = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        correct += (arg == y as usize) as usize;
        if classes == 2 {
            scores.push((row[1] - row[0]) as f64);
        }
    }
    Metrics {
        loss: if n == 0 { 0.0 } else { loss / n as f64 },
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        auc: (classes == 2).then(|| auc(&scores, labels)).flatten(),
        num_examples: n,
    }
}

/// ROC AUC by the rank-sum (Mann–Whitney) statistic, ties counted half. `None` when one class
/// is absent.
pub fn auc(scores: &[f64], labels: &[u32]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l == 1).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = labels
        .iter()
        .zip(&ranks)
        .filter(|(l, _)| **l == 1)
        .map(|(_, r)| r)
        .sum();
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_long_updates_down_to_the_norm_and_leaves_short_ones() {
        let mut long = vec![3.0f32, 4.0];
        assert!(clip_l2(&mut long, 1.0));
        assert!(
            (long[0] - 0.6).abs() < 1e-7 && (long[1] - 0.8).abs() < 1e-7,
            "{long:?}"
        );
        let mut short = vec![0.3f32, 0.4];
        assert!(!clip_l2(&mut short, 1.0));
        assert_eq!(short, [0.3, 0.4]);
    }
    use crate::data::{FeatureShape, LabelColumn, Standardizer, load_csv};

    #[test]
    fn auc_known_values() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]), Some(0.75));
        assert_eq!(auc(&[1.0, 2.0], &[0, 1]), Some(1.0));
        assert_eq!(auc(&[1.0, 1.0], &[0, 1]), Some(0.5));
        assert_eq!(auc(&[1.0, 2.0], &[1, 1]), None);
    }

    #[test]
    fn metrics_from_known_logits() {
        let m = metrics_from_logits(&[0.0, 0.0, 2.0, 0.0], &[1, 0], 2);
        assert_eq!(m.accuracy, 1.0); // tie goes to the last max: class 1
        let expected = (2f64.ln() + (1.0 + (-2f64).exp()).ln()) / 2.0;
        assert!((m.loss - expected).abs() < 1e-9);
    }

    fn breast_cancer() -> Dataset {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/data/breast_cancer.csv");
        let mut ds = load_csv(&p, &LabelColumn::Name("diagnosis".into())).unwrap();
        let s = Standardizer::fit(&ds);
        s.apply(&mut ds);
        ds
    }

    #[test]
    fn logistic_regression_learns_breast_cancer_deterministically() {
        let ds = breast_cancer();
        let (tr, te) = ds.split(0.25, 1).unwrap();
        let spec = ModelSpec::for_shape(FeatureShape::Flat(30), 2, &[]);
        let p0 = spec.initial_parameters(0);
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 32,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            seed: 9,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let before = evaluate(&spec, &p0, &te, ComputeDevice::Cpu).unwrap();
        let (p1, rep) = train(&spec, &p0, &tr, &cfg, ComputeDevice::Cpu).unwrap();
        let after = evaluate(&spec, &p1, &te, ComputeDevice::Cpu).unwrap();
        assert!(after.accuracy > 0.93, "accuracy {}", after.accuracy);
        assert!(after.loss < before.loss);
        assert!(after.auc.unwrap() > 0.97);
        assert!(rep.epoch_loss.last() < rep.epoch_loss.first());
        let (p2, _) = train(&spec, &p0, &tr, &cfg, ComputeDevice::Cpu).unwrap();
        assert_eq!(p1, p2, "same seed, same result");
    }

    #[test]
    fn adam_trains_an_mlp() {
        let ds = breast_cancer();
        let spec = ModelSpec::for_shape(FeatureShape::Flat(30), 2, &[8]);
        let cfg = TrainConfig {
            epochs: 3,
            batch_size: 64,
            learning_rate: 0.01,
            optimizer: Optimizer::Adam,
            seed: 1,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let (p, rep) = train(
            &spec,
            &spec.initial_parameters(1),
            &ds,
            &cfg,
            ComputeDevice::Cpu,
        )
        .unwrap();
        assert_eq!(p.len(), spec.num_parameters());
        assert!(rep.epoch_loss[2] < rep.epoch_loss[0]);
    }

    fn distance(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// FedProx's gradient is μ (w − w_global): with SGD and lr · μ = 1 the second full-batch
    /// step lands at `w_global − lr ∇L(w₁)`, which plain training gives as `w₂ − w₁ + w_global`.
    /// Full-batch SGD with PyTorch's momentum: the second step is the plain one plus μ times
    /// the first (`w₂ = p(w₁) − μ (w₀ − w₁)`); weight decay λ adds `λ w` to the gradient.
    #[test]
    fn momentum_and_weight_decay_follow_pytorchs_sgd() {
        let ds = breast_cancer();
        let spec = ModelSpec::for_shape(FeatureShape::Flat(30), 2, &[8]);
        let w0 = spec.initial_parameters(3);
        let cfg = |epochs, momentum, weight_decay| TrainConfig {
            epochs,
            batch_size: ds.len(),
            learning_rate: 0.5,
            optimizer: Optimizer::Sgd,
            seed: 4,
            proximal_mu: 0.0,
            momentum,
            weight_decay,
        };
        let run = |c: &TrainConfig| train(&spec, &w0, &ds, c, ComputeDevice::Cpu).unwrap().0;
        let (w1, w2) = (run(&cfg(1, 0.0, 0.0)), run(&cfg(2, 0.0, 0.0)));
        assert_eq!(
            run(&cfg(1, 0.5, 0.0)),
            w1,
            "the first step has no velocity yet"
        );
        let m2 = run(&cfg(2, 0.5, 0.0));
        let d1 = run(&cfg(1, 0.0, 0.1));
        for i in 0..w0.len() {
            let want = w2[i] - 0.5 * (w0[i] - w1[i]);
            assert!((m2[i] - want).abs() < 1e-5, "{i}: {} vs {want}", m2[i]);
            let want = w1[i] - 0.5 * 0.1 * w0[i];
            assert!((d1[i] - want).abs() < 1e-5, "{i}: {} vs {want}", d1[i]);
        }
        for (m, d) in [(1.0, 0.0), (-0.1, 0.0), (0.0, -1.0), (0.0, f64::NAN)] {
            assert!(
                cfg(1, m, d).validate().is_err(),
                "momentum {m}, weight decay {d}"
            );
        }
    }

    #[test]
    fn proximal_term_adds_mu_times_the_distance_to_the_global_model() {
        let ds = breast_cancer();
        let spec = ModelSpec::for_shape(FeatureShape::Flat(30), 2, &[8]);
        let g = spec.initial_parameters(3);
        let cfg = |epochs, proximal_mu| TrainConfig {
            epochs,
            batch_size: ds.len(),
            learning_rate: 0.5,
            optimizer: Optimizer::Sgd,
            seed: 4,
            proximal_mu,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let run = |c: &TrainConfig| train(&spec, &g, &ds, c, ComputeDevice::Cpu).unwrap().0;
        let w1 = run(&cfg(1, 0.0));
        assert_eq!(
            run(&cfg(1, 2.0)),
            w1,
            "no pull on the first step: w = w_global"
        );
        let w2 = run(&cfg(2, 0.0));
        let prox = run(&cfg(2, 2.0));
        for i in 0..g.len() {
            let want = w2[i] - w1[i] + g[i];
            assert!((prox[i] - want).abs() < 1e-5, "{i}: {} vs {want}", prox[i]);
        }
        // And over real mini-batch training, a larger μ keeps the model nearer the global one.
        let mini = |mu| {
            let c = TrainConfig {
                batch_size: 32,
                ..cfg(3, mu)
            };
            distance(&run(&c), &g)
        };
        let (d0, d1, d10) = (mini(0.0), mini(0.1), mini(1.0));
        assert!(d0 > d1 && d1 > d10, "{d0} > {d1} > {d10}");
        let mut bad = cfg(1, -0.1);
        assert!(
            train(&spec, &g, &ds, &bad, ComputeDevice::Cpu)
                .unwrap_err()
                .to_string()
                .contains("proximal_mu")
        );
        bad.proximal_mu = f64::INFINITY;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn per_layer_clipping_keeps_each_layer_within_its_share_and_the_whole_within_the_norm() {
        let spec = ModelSpec::for_shape(FeatureShape::Flat(4), 2, &[3]);
        // layers.0: 4 × 3 + 3 = 15 values; layers.1: 3 × 2 + 2 = 8.
        let layers: Vec<usize> = spec.layer_sizes().iter().map(|(_, n)| *n).collect();
        assert_eq!(layers, [15, 8]);
        assert_eq!(spec.layer_sizes()[1].0, "layers.1");
        let d = 23.0f64;
        // The first layer large, the second small: only the first is clipped.
        let mut u: Vec<f32> = (0..23).map(|i| if i < 15 { 1.0 } else { 0.01 }).collect();
        let before = u.clone();
        assert!(clip_update(&mut u, &spec, 1.0, true));
        let norm = |s: &[f32]| s.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm(&u[..15]) - (15.0 / d).sqrt()).abs() < 1e-6);
        assert_eq!(u[15..], before[15..], "the small layer is left alone");
        assert!(norm(&u) <= 1.0 + 1e-6);
        // The whole-update rule scales everything by one factor instead.
        let mut w = before.clone();
        assert!(clip_update(&mut w, &spec, 1.0, false));
        assert!((norm(&w) - 1.0).abs() < 1e-6);
        assert!((w[15] / before[15] - w[0] / before[0]).abs() < 1e-6);
        // Within every share: nothing changes.
        let mut small = vec![0.01f32; 23];
        assert!(!clip_update(&mut small, &spec, 1.0, true));
    }

    #[test]
    fn bad_config_is_refused() {
        let ds = breast_cancer();
        let spec = ModelSpec::for_shape(FeatureShape::Flat(30), 2, &[]);
        let mut cfg = TrainConfig {
            epochs: 1,
            batch_size: 0,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            seed: 0,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let p = spec.initial_parameters(0);
        assert!(
            train(&spec, &p, &ds, &cfg, ComputeDevice::Cpu)
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
        cfg.batch_size = 8;
        cfg.learning_rate = f64::NAN;
        assert!(train(&spec, &p, &ds, &cfg, ComputeDevice::Cpu).is_err());
    }
}
