//! SCAFFOLD's participant side (Karimireddy et al., "SCAFFOLD: Stochastic Controlled
//! Averaging for Federated Learning", 2020), with the paper's option II for the control
//! variate.
//!
//! Each participant keeps a control variate `c_i` (zeros at first) from round to round; the
//! server sends its own `c` with every training task. Local training moves the weights by
//! `−η (c − c_i)` after every step, outside the optimiser's momentum
//! ([`crate::train::train_corrected`]; with plain SGD, the paper's corrected gradient step),
//! which cancels the drift of a site whose data pulls away from the federation's. After `K` local steps at learning rate `η` from the
//! global model `x` to `y`:
//!
//! ```text
//! c_i⁺ = c_i − c + (x − y) / (K η)        Δc_i = c_i⁺ − c_i = (x − y) / (K η) − c
//! ```
//!
//! `Δc_i` travels after the model update in the same vector, so secure aggregation sums it
//! like the update and the server only ever sees its mean.

use crate::train::{TrainConfig, TrainReport, train_corrected};
use crate::{ComputeDevice, Dataset, ModelError, ModelSpec};

/// What one SCAFFOLD training gives: the trained parameters, the participant's next control
/// variate and its change (what is sent).
#[derive(Debug, Clone, PartialEq)]
pub struct Corrected {
    pub params: Vec<f32>,
    pub report: TrainReport,
    /// `c_i⁺`, to keep for the participant's next round.
    pub control: Vec<f32>,
    /// `c_i⁺ − c_i`, appended to the update.
    pub control_change: Vec<f32>,
}

/// Local optimiser steps of one training task: `epochs · ⌈examples / batch_size⌉`.
pub fn local_steps(cfg: &TrainConfig, examples: usize) -> usize {
    cfg.epochs * examples.div_ceil(cfg.batch_size)
}

/// Trains from `global` with the gradient corrected by `server − local` (`local`: this
/// participant's control variate, `None` before its first round, i.e. zeros), and computes
/// the control variate's next value and change by option II.
pub fn train(
    spec: &ModelSpec,
    global: &[f32],
    data: &Dataset,
    cfg: &TrainConfig,
    device: ComputeDevice,
    server: &[f32],
    local: Option<&[f32]>,
) -> Result<Corrected, ModelError> {
    for (what, len) in [
        ("server", server.len()),
        ("local", local.map_or(0, <[f32]>::len)),
    ] {
        if len != global.len() && !(what == "local" && local.is_none()) {
            return Err(ModelError::InvalidConfig(format!(
                "SCAFFOLD's {what} control variate has {len} values, the model {}",
                global.len()
            )));
        }
    }
    let correction: Vec<f32> = match local {
        Some(l) => server.iter().zip(l).map(|(c, ci)| c - ci).collect(),
        None => server.to_vec(),
    };
    let (params, report) = train_corrected(spec, global, data, cfg, device, Some(&correction))?;
    let scale = 1.0 / (local_steps(cfg, report.num_examples) as f64 * cfg.learning_rate);
    let control_change: Vec<f32> = global
        .iter()
        .zip(&params)
        .zip(server)
        .map(|((x, y), c)| ((*x as f64 - *y as f64) * scale) as f32 - c)
        .collect();
    let control = match local {
        Some(l) => l.iter().zip(&control_change).map(|(a, d)| a + d).collect(),
        None => control_change.clone(),
    };
    Ok(Corrected {
        params,
        report,
        control,
        control_change,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Optimizer;
    use crate::{FeatureShape, train::train as plain_train};

    fn data() -> Dataset {
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..8u32 {
            let x = i as f32 / 8.0;
            features.extend_from_slice(&[x, 1.0 - x, (i % 3) as f32 / 3.0]);
            labels.push(u32::from(i % 2 == 0));
        }
        Dataset::new(features, labels, FeatureShape::Flat(3), 2).unwrap()
    }

    fn cfg(epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: 8,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            seed: 3,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }

    /// One full-batch SGD step with correction `k` lands at the plain step minus `lr · k`;
    /// the control variate then equals the gradient at the global model (option II with
    /// K = 1 recovers ∇f_i(x)), so its change is `∇f_i(x) − c`.
    #[test]
    fn the_correction_shifts_every_step_and_option_ii_recovers_the_gradient() {
        let spec = ModelSpec::Logistic {
            inputs: 3,
            classes: 2,
        };
        let (ds, global) = (data(), spec.initial_parameters(5));
        let (plain, _) = plain_train(&spec, &global, &ds, &cfg(1), ComputeDevice::Cpu).unwrap();
        let server: Vec<f32> = (0..global.len()).map(|i| 0.05 * i as f32 - 0.1).collect();
        let local: Vec<f32> = (0..global.len()).map(|i| 0.02 * (i % 3) as f32).collect();
        let out = train(
            &spec,
            &global,
            &ds,
            &cfg(1),
            ComputeDevice::Cpu,
            &server,
            Some(&local),
        )
        .unwrap();
        for i in 0..global.len() {
            let k = server[i] - local[i];
            assert!(
                (out.params[i] - (plain[i] - 0.1 * k)).abs() < 1e-5,
                "{i}: {} vs {}",
                out.params[i],
                plain[i] - 0.1 * k
            );
            // (x − y)/η is the corrected gradient g + k, so c_i⁺ = c_i − c + g + k = g.
            let grad = (global[i] - plain[i]) / 0.1;
            assert!((out.control[i] - grad).abs() < 1e-3, "{i}");
            assert!((out.control_change[i] - (out.control[i] - local[i])).abs() < 1e-6);
        }
        assert_eq!(local_steps(&cfg(3), 8), 3);
        assert_eq!(local_steps(&cfg(2), 9), 4);
        let short = train(
            &spec,
            &global,
            &ds,
            &cfg(1),
            ComputeDevice::Cpu,
            &[0.0],
            None,
        );
        assert!(
            short
                .unwrap_err()
                .to_string()
                .contains("server control variate")
        );
    }

    /// The correction is outside the optimiser: with Adam (and with SGD's momentum) a step
    /// with correction k lands at the uncorrected step minus lr · k, not at Adam's step of a
    /// shifted gradient; and momentum training with SCAFFOLD stays finite over many steps.
    #[test]
    fn the_correction_bypasses_the_optimisers_state() {
        let spec = ModelSpec::Logistic {
            inputs: 3,
            classes: 2,
        };
        let (ds, global) = (data(), spec.initial_parameters(5));
        let adam = TrainConfig {
            optimizer: Optimizer::Adam,
            learning_rate: 0.01,
            ..cfg(1)
        };
        let (plain, _) = plain_train(&spec, &global, &ds, &adam, ComputeDevice::Cpu).unwrap();
        let server: Vec<f32> = (0..global.len()).map(|i| 0.3 * i as f32 - 0.5).collect();
        let out = train(
            &spec,
            &global,
            &ds,
            &adam,
            ComputeDevice::Cpu,
            &server,
            None,
        )
        .unwrap();
        for i in 0..global.len() {
            let want = plain[i] - 0.01 * server[i];
            assert!(
                (out.params[i] - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                out.params[i]
            );
        }
        // Many momentum steps with a large control variate: no divergence.
        let momentum = TrainConfig {
            epochs: 30,
            batch_size: 2,
            momentum: 0.9,
            ..cfg(1)
        };
        let big: Vec<f32> = server.iter().map(|c| 5.0 * c).collect();
        let out = train(
            &spec,
            &global,
            &ds,
            &momentum,
            ComputeDevice::Cpu,
            &big,
            None,
        )
        .unwrap();
        assert!(out.params.iter().all(|p| p.is_finite()));
        assert!(out.control.iter().all(|c| c.is_finite()));
    }
}
