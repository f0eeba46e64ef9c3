//! Aggregation strategies: what the server does with the weighted mean update of a round.
//!
//! The weighted mean itself is computed by the round state machine (or, with secure
//! aggregation, decrypted from the encrypted sum), so a strategy only ever sees the mean: this
//! keeps every strategy compatible with secure aggregation.

/// A strategy that cannot be built or restored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error("unknown strategy {0:?}: use fedavg or fedadam")]
    Unknown(String),
    #[error("server_lr must be positive, not {0}")]
    ServerLr(f32),
    #[error("{strategy} state of {bytes} bytes is not {expected}")]
    State {
        strategy: &'static str,
        bytes: usize,
        expected: &'static str,
    },
}

/// A server-side update rule. `apply` gets the current global parameters and the
/// example-weighted mean of participants' updates (local minus global) and returns the new
/// global parameters.
pub trait Strategy: Send {
    fn name(&self) -> &'static str;
    fn apply(&mut self, global: &[f32], mean_update: &[f32], round: u64) -> Vec<f32>;
    /// Server state that must survive a coordinator restart (little-endian bytes), if any.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Restores what [`Self::save_state`] saved.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), StrategyError> {
        Ok(())
    }
}

/// Federated averaging (McMahan et al., 2017): the new model is the weighted mean of the
/// participants' models, i.e. `global + server_lr · mean_update` with `server_lr = 1`.
#[derive(Debug, Clone)]
pub struct FedAvg {
    pub server_lr: f32,
}

impl Default for FedAvg {
    fn default() -> Self {
        FedAvg { server_lr: 1.0 }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }
    fn apply(&mut self, global: &[f32], mean_update: &[f32], _round: u64) -> Vec<f32> {
        global
            .iter()
            .zip(mean_update)
            .map(|(g, d)| g + self.server_lr * d)
            .collect()
    }
}

/// FedAdam (Reddi et al., "Adaptive Federated Optimization", 2021): Adam on the server with
/// the mean update as the pseudo-gradient.
#[derive(Debug, Clone)]
pub struct FedAdam {
    pub server_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Adaptivity (the paper's τ).
    pub tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedAdam {
    pub fn new(server_lr: f32) -> Self {
        FedAdam {
            server_lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl Strategy for FedAdam {
    fn name(&self) -> &'static str {
        "fedadam"
    }
    fn apply(&mut self, global: &[f32], d: &[f32], _round: u64) -> Vec<f32> {
        if self.m.len() != d.len() {
            self.m = vec![0.0; d.len()];
            self.v = vec![0.0; d.len()];
        }
        let mut out = Vec::with_capacity(global.len());
        for i in 0..d.len() {
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * d[i];
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * d[i] * d[i];
            out.push(global[i] + self.server_lr * self.m[i] / (self.v[i].sqrt() + self.tau));
        }
        out
    }
    /// The moments m and v, one after the other.
    fn save_state(&self) -> Option<Vec<u8>> {
        (!self.m.is_empty()).then(|| {
            self.m
                .iter()
                .chain(&self.v)
                .flat_map(|x| x.to_le_bytes())
                .collect()
        })
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        if !state.len().is_multiple_of(8) {
            return Err(StrategyError::State {
                strategy: "fedadam",
                bytes: state.len(),
                expected: "two f32 vectors of one length",
            });
        }
        let xs: Vec<f32> = state
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let (m, v) = xs.split_at(xs.len() / 2);
        self.m = m.to_vec();
        self.v = v.to_vec();
        Ok(())
    }
}

/// A strategy by name: `fedavg` or `fedadam` (with `server_lr`).
pub fn by_name(name: &str, server_lr: f32) -> Result<Box<dyn Strategy>, StrategyError> {
    if !(server_lr > 0.0 && server_lr.is_finite()) {
        return Err(StrategyError::ServerLr(server_lr));
    }
    match name {
        "fedavg" => Ok(Box::new(FedAvg { server_lr })),
        "fedadam" => Ok(Box::new(FedAdam::new(server_lr))),
        _ => Err(StrategyError::Unknown(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_adds_the_mean_update() {
        let mut s = FedAvg::default();
        assert_eq!(s.apply(&[1.0, 2.0], &[0.5, -1.0], 1), vec![1.5, 1.0]);
        let mut half = FedAvg { server_lr: 0.5 };
        assert_eq!(half.apply(&[1.0, 2.0], &[0.5, -1.0], 1), vec![1.25, 1.5]);
    }

    #[test]
    fn fedadam_first_step_moves_by_about_lr_in_the_update_direction() {
        let mut s = FedAdam::new(0.1);
        let out = s.apply(&[0.0, 0.0], &[2.0, -0.5], 1);
        // First step: m = 0.1 d, v = 0.01 d², so the step is lr · d / (|d| + 10 τ), close to
        // lr · sign(d) for |d| ≫ τ.
        let expect = |d: f32| 0.1 * d / (d.abs() + 10.0 * 1e-3);
        assert!((out[0] - expect(2.0)).abs() < 1e-6, "{out:?}");
        assert!((out[1] - expect(-0.5)).abs() < 1e-6, "{out:?}");
        let second = s.apply(&out, &[2.0, -0.5], 2);
        assert!(
            second[0] > out[0] && second[1] < out[1],
            "keeps moving: {second:?}"
        );
    }

    #[test]
    fn fedadam_restored_from_its_state_continues_exactly() {
        let g = vec![0.5f32, -1.0, 2.0];
        let (d1, d2) = (vec![0.1f32, -0.2, 0.3], vec![-0.05f32, 0.4, 0.0]);
        let mut a = FedAdam::new(0.1);
        let g1 = a.apply(&g, &d1, 1);
        let mut b = FedAdam::new(0.1);
        b.restore_state(&a.save_state().unwrap()).unwrap();
        assert_eq!(a.apply(&g1, &d2, 2), b.apply(&g1, &d2, 2));
        assert!(FedAdam::new(0.1).restore_state(&[0; 12]).is_err());
        assert_eq!(FedAvg::default().save_state(), None);
    }

    #[test]
    fn by_name_refuses_unknown() {
        assert_eq!(
            by_name("fedprox", 1.0).err(),
            Some(StrategyError::Unknown("fedprox".into()))
        );
        assert!(
            by_name("fedprox", 1.0)
                .err()
                .unwrap()
                .to_string()
                .contains("fedavg")
        );
        assert!(by_name("fedavg", 0.0).is_err());
        assert_eq!(by_name("fedadam", 0.1).unwrap().name(), "fedadam");
    }
}
