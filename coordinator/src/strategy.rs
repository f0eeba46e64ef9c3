//! Aggregation strategies: what the server does with the weighted mean update of a round.
//!
//! The weighted mean itself is computed by the round state machine (or, with secure
//! aggregation, decrypted from the encrypted sum), so a mean-based strategy only ever sees the
//! mean: this keeps it compatible with secure aggregation. A robust rule ([`Robust`], plaintext
//! jobs only) gets the rule's combination of the individual updates instead.

use std::sync::Arc;

use crate::robust::RobustRule;

/// A strategy that cannot be built or restored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error(
        "unknown strategy {0:?}: use fedavg, fedavgm, fedprox, scaffold, fedadagrad, fedadam, \
         fedyogi, or (plaintext jobs) median, trimmed-mean, krum or multi-krum"
    )]
    Unknown(String),
    #[error(
        "strategy fedprox needs a proximal coefficient proximal_mu > 0 (job.train.proximal_mu, \
         --proximal-mu), not {0}"
    )]
    ProximalMu(f64),
    #[error("server_lr must be positive, not {0}")]
    ServerLr(f32),
    #[error("server_momentum must be in [0, 1), not {0}")]
    ServerMomentum(f32),
    #[error("{strategy} state of {bytes} bytes is not {expected}")]
    State {
        strategy: &'static str,
        bytes: usize,
        expected: &'static str,
    },
}

/// What the server knows of the round whose mean it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundContext {
    pub round: u64,
    /// Updates in the mean.
    pub contributors: usize,
    /// Participants of the federation, key custodians excepted (SCAFFOLD's N).
    pub population: usize,
}

impl RoundContext {
    /// Round `round` with every one of `n` participants contributing.
    pub fn full(round: u64, n: usize) -> Self {
        RoundContext {
            round,
            contributors: n,
            population: n,
        }
    }
}

/// A server-side update rule. `apply` gets the current global parameters and the
/// example-weighted mean of participants' updates (local minus global) and returns the new
/// global parameters. With control variates ([`Strategy::control_variate`]) the mean carries
/// the mean change of the participants' control variates after the model's values.
pub trait Strategy: Send {
    fn name(&self) -> &'static str;
    fn apply(&mut self, global: &[f32], mean_update: &[f32], round: &RoundContext) -> Vec<f32>;
    /// Called once with the model's size before the first round (and before a restore).
    fn initialise(&mut self, _num_parameters: usize) {}
    /// SCAFFOLD: the server's control variate, which every training task carries; its
    /// participants append their own control variate's change to the update.
    fn control_variate(&self) -> Option<Arc<Vec<f32>>> {
        None
    }
    /// Server state that must survive a coordinator restart (little-endian bytes), if any.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Restores what [`Self::save_state`] saved.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), StrategyError> {
        Ok(())
    }
    /// Robust rules combine the individual updates themselves (and so need each one in the
    /// clear); `apply` then gets their combination instead of the mean.
    fn robust_rule(&self) -> Option<RobustRule> {
        None
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
    fn apply(&mut self, global: &[f32], mean_update: &[f32], _round: &RoundContext) -> Vec<f32> {
        global
            .iter()
            .zip(mean_update)
            .map(|(g, d)| g + self.server_lr * d)
            .collect()
    }
}

/// FedProx (Li et al., 2020) on the server: FedAvg. Its difference lives in the
/// participants' local objective (`TrainConfig::proximal_mu`, sent with every training task),
/// so it composes with secure aggregation like FedAvg does.
#[derive(Debug, Clone)]
pub struct FedProx(pub FedAvg);

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }
    fn apply(&mut self, global: &[f32], mean_update: &[f32], round: &RoundContext) -> Vec<f32> {
        self.0.apply(global, mean_update, round)
    }
}

/// SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
/// Learning", 2020) on the server. Participants correct their local gradients by `c − c_i`
/// (`cohort_model::scaffold`) and send `[Δy_i, Δc_i]`; the server moves the model by
/// `server_lr · mean Δy` and its control variate by `|S|/N · mean Δc`.
///
/// Both means are the round's one weighted mean (secure aggregation sums one vector with one
/// weight per participant), so `c` tracks the example-weighted mean of the participants'
/// control variates: the gradient of the example-weighted objective FedAvg optimises. The
/// paper's unweighted mean is the same when sites hold equal amounts of data.
#[derive(Debug, Clone)]
pub struct Scaffold {
    pub server_lr: f32,
    control: Arc<Vec<f32>>,
}

impl Scaffold {
    pub fn new(server_lr: f32) -> Self {
        Scaffold {
            server_lr,
            control: Arc::new(Vec::new()),
        }
    }
}

impl Strategy for Scaffold {
    fn name(&self) -> &'static str {
        "scaffold"
    }
    fn apply(&mut self, global: &[f32], mean: &[f32], round: &RoundContext) -> Vec<f32> {
        let d = global.len();
        assert_eq!(
            mean.len(),
            2 * d,
            "SCAFFOLD's mean carries the model and Δc"
        );
        self.initialise(d);
        let share = (round.contributors as f64 / round.population.max(1) as f64).min(1.0) as f32;
        let control = Arc::make_mut(&mut self.control);
        for (c, dc) in control.iter_mut().zip(&mean[d..]) {
            *c += share * dc;
        }
        global
            .iter()
            .zip(&mean[..d])
            .map(|(g, u)| g + self.server_lr * u)
            .collect()
    }
    fn initialise(&mut self, num_parameters: usize) {
        if self.control.len() != num_parameters {
            self.control = Arc::new(vec![0.0; num_parameters]);
        }
    }
    fn control_variate(&self) -> Option<Arc<Vec<f32>>> {
        Some(self.control.clone())
    }
    /// The control variate `c`.
    fn save_state(&self) -> Option<Vec<u8>> {
        save_vectors(&[self.control.as_ref()])
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        let [c] = restore_vectors::<1>("scaffold", state)?;
        self.control = Arc::new(c);
        Ok(())
    }
}

/// Reddi et al.'s adaptive server optimisers ("Adaptive Federated Optimization", 2021), with
/// the mean update Δ as the pseudo-gradient, as Flower states them:
/// `m ← β₁ m + (1 − β₁) Δ`, the second moment `v` by the rule, then
/// `global + server_lr · m / (√v + τ)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveRule {
    /// `v ← v + Δ²` (β₁ = 0, τ = 10⁻⁹).
    Adagrad,
    /// `v ← β₂ v + (1 − β₂) Δ²` (β₁ = 0.9, β₂ = 0.99, τ = 10⁻³).
    Adam,
    /// `v ← v − (1 − β₂) Δ² sign(v − Δ²)` (β₁ = 0.9, β₂ = 0.99, τ = 10⁻³).
    Yogi,
}

/// FedAdagrad, FedAdam or FedYogi: one of the [`AdaptiveRule`]s with its moments.
#[derive(Debug, Clone)]
pub struct FedOpt {
    pub rule: AdaptiveRule,
    pub server_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Adaptivity (the paper's τ).
    pub tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedOpt {
    /// The rule with Flower's defaults.
    pub fn new(rule: AdaptiveRule, server_lr: f32) -> Self {
        let (beta1, tau) = match rule {
            AdaptiveRule::Adagrad => (0.0, 1e-9),
            AdaptiveRule::Adam | AdaptiveRule::Yogi => (0.9, 1e-3),
        };
        FedOpt {
            rule,
            server_lr,
            beta1,
            beta2: 0.99,
            tau,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &'static str {
        match self.rule {
            AdaptiveRule::Adagrad => "fedadagrad",
            AdaptiveRule::Adam => "fedadam",
            AdaptiveRule::Yogi => "fedyogi",
        }
    }
    fn apply(&mut self, global: &[f32], d: &[f32], _round: &RoundContext) -> Vec<f32> {
        if self.m.len() != d.len() {
            self.m = vec![0.0; d.len()];
            self.v = vec![0.0; d.len()];
        }
        let mut out = Vec::with_capacity(global.len());
        for i in 0..d.len() {
            let d2 = d[i] * d[i];
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * d[i];
            self.v[i] = match self.rule {
                AdaptiveRule::Adagrad => self.v[i] + d2,
                // The same rounding as before the rules shared this loop.
                AdaptiveRule::Adam => self.beta2 * self.v[i] + (1.0 - self.beta2) * d[i] * d[i],
                AdaptiveRule::Yogi => {
                    let sign = (self.v[i] - d2).signum() * f32::from(self.v[i] != d2);
                    self.v[i] - (1.0 - self.beta2) * d2 * sign
                }
            };
            out.push(global[i] + self.server_lr * self.m[i] / (self.v[i].sqrt() + self.tau));
        }
        out
    }
    /// The moments m and v, one after the other.
    fn save_state(&self) -> Option<Vec<u8>> {
        save_vectors(&[&self.m, &self.v])
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        let [m, v] = restore_vectors::<2>(self.name(), state)?;
        (self.m, self.v) = (m, v);
        Ok(())
    }
}

/// Vectors of one length, one after the other, as little-endian f32 (none before the first
/// round).
fn save_vectors(vs: &[&Vec<f32>]) -> Option<Vec<u8>> {
    (!vs[0].is_empty()).then(|| {
        vs.iter()
            .flat_map(|v| v.iter())
            .flat_map(|x| x.to_le_bytes())
            .collect()
    })
}

/// What [`save_vectors`] saved of `N` vectors.
fn restore_vectors<const N: usize>(
    strategy: &'static str,
    state: &[u8],
) -> Result<[Vec<f32>; N], StrategyError> {
    if !state.len().is_multiple_of(4 * N) {
        return Err(StrategyError::State {
            strategy,
            bytes: state.len(),
            expected: if N == 1 {
                "one f32 vector"
            } else {
                "f32 vectors of one length"
            },
        });
    }
    let xs: Vec<f32> = state
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let n = xs.len() / N;
    Ok(std::array::from_fn(|k| xs[k * n..(k + 1) * n].to_vec()))
}

/// FedAvg with server momentum (FedAvgM; Hsu et al., "Measuring the Effects of Non-Identical
/// Data Distribution for Federated Visual Classification", 2019): `v ← β v + Δ`, then
/// `global + server_lr · v` (as Flower's FedAvgM, whose pseudo-gradient is −Δ).
#[derive(Debug, Clone)]
pub struct FedAvgM {
    pub server_lr: f32,
    pub momentum: f32,
    v: Vec<f32>,
}

impl FedAvgM {
    pub fn new(server_lr: f32, momentum: f32) -> Self {
        FedAvgM {
            server_lr,
            momentum,
            v: Vec::new(),
        }
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }
    fn apply(&mut self, global: &[f32], d: &[f32], _round: &RoundContext) -> Vec<f32> {
        if self.v.len() != d.len() {
            // The first round's velocity is its update.
            self.v = d.to_vec();
        } else {
            for (v, d) in self.v.iter_mut().zip(d) {
                *v = self.momentum * *v + d;
            }
        }
        global
            .iter()
            .zip(&self.v)
            .map(|(g, v)| g + self.server_lr * v)
            .collect()
    }
    fn save_state(&self) -> Option<Vec<u8>> {
        save_vectors(&[&self.v])
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StrategyError> {
        let [v] = restore_vectors::<1>("fedavgm", state)?;
        self.v = v;
        Ok(())
    }
}

/// A robust rule as the job's strategy: the global model moves by the combined update.
#[derive(Debug, Clone)]
pub struct Robust {
    pub rule: RobustRule,
    pub server_lr: f32,
}

impl Strategy for Robust {
    fn name(&self) -> &'static str {
        self.rule.name()
    }
    fn apply(&mut self, global: &[f32], combined: &[f32], round: &RoundContext) -> Vec<f32> {
        FedAvg {
            server_lr: self.server_lr,
        }
        .apply(global, combined, round)
    }
    fn robust_rule(&self) -> Option<RobustRule> {
        Some(self.rule)
    }
}

/// A strategy by name: `fedavg`, `fedavgm` (with `server_momentum`), `fedprox`, `scaffold`,
/// `fedadagrad`, `fedadam` or `fedyogi`, each with `server_lr`, which see only the mean update
/// and so work under secure aggregation; or a robust rule (plaintext jobs only).
pub fn by_name(
    name: &str,
    server_lr: f32,
    server_momentum: f32,
) -> Result<Box<dyn Strategy>, StrategyError> {
    if !(server_lr > 0.0 && server_lr.is_finite()) {
        return Err(StrategyError::ServerLr(server_lr));
    }
    if !(0.0..1.0).contains(&server_momentum) {
        return Err(StrategyError::ServerMomentum(server_momentum));
    }
    match name {
        "fedavg" => Ok(Box::new(FedAvg { server_lr })),
        "fedavgm" => Ok(Box::new(FedAvgM::new(server_lr, server_momentum))),
        "fedprox" => Ok(Box::new(FedProx(FedAvg { server_lr }))),
        "scaffold" => Ok(Box::new(Scaffold::new(server_lr))),
        "fedadagrad" => Ok(Box::new(FedOpt::new(AdaptiveRule::Adagrad, server_lr))),
        "fedadam" => Ok(Box::new(FedOpt::new(AdaptiveRule::Adam, server_lr))),
        "fedyogi" => Ok(Box::new(FedOpt::new(AdaptiveRule::Yogi, server_lr))),
        _ => match crate::robust::RobustRule::by_name(name) {
            Some(rule) => Ok(Box::new(Robust { rule, server_lr })),
            None => Err(StrategyError::Unknown(name.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(round: u64) -> RoundContext {
        RoundContext::full(round, 1)
    }

    #[test]
    fn fedavg_adds_the_mean_update() {
        let mut s = FedAvg::default();
        assert_eq!(s.apply(&[1.0, 2.0], &[0.5, -1.0], &at(1)), vec![1.5, 1.0]);
        let mut half = FedAvg { server_lr: 0.5 };
        assert_eq!(
            half.apply(&[1.0, 2.0], &[0.5, -1.0], &at(1)),
            vec![1.25, 1.5]
        );
    }

    #[test]
    fn fedadam_first_step_moves_by_about_lr_in_the_update_direction() {
        let mut s = FedOpt::new(AdaptiveRule::Adam, 0.1);
        let out = s.apply(&[0.0, 0.0], &[2.0, -0.5], &at(1));
        // First step: m = 0.1 d, v = 0.01 d², so the step is lr · d / (|d| + 10 τ), close to
        // lr · sign(d) for |d| ≫ τ.
        let expect = |d: f32| 0.1 * d / (d.abs() + 10.0 * 1e-3);
        assert!((out[0] - expect(2.0)).abs() < 1e-6, "{out:?}");
        assert!((out[1] - expect(-0.5)).abs() < 1e-6, "{out:?}");
        let second = s.apply(&out, &[2.0, -0.5], &at(2));
        assert!(
            second[0] > out[0] && second[1] < out[1],
            "keeps moving: {second:?}"
        );
    }

    #[test]
    fn fedadam_restored_from_its_state_continues_exactly() {
        let g = vec![0.5f32, -1.0, 2.0];
        let (d1, d2) = (vec![0.1f32, -0.2, 0.3], vec![-0.05f32, 0.4, 0.0]);
        let mut a = FedOpt::new(AdaptiveRule::Adam, 0.1);
        let g1 = a.apply(&g, &d1, &at(1));
        let mut b = FedOpt::new(AdaptiveRule::Adam, 0.1);
        b.restore_state(&a.save_state().unwrap()).unwrap();
        assert_eq!(a.apply(&g1, &d2, &at(2)), b.apply(&g1, &d2, &at(2)));
        assert!(
            FedOpt::new(AdaptiveRule::Adam, 0.1)
                .restore_state(&[0; 12])
                .is_err()
        );
        assert_eq!(FedAvg::default().save_state(), None);
    }

    #[test]
    fn by_name_refuses_unknown() {
        assert_eq!(
            by_name("fedmedian", 1.0, 0.9).err(),
            Some(StrategyError::Unknown("fedmedian".into()))
        );
        assert!(
            by_name("fedmedian", 1.0, 0.9)
                .err()
                .unwrap()
                .to_string()
                .contains("fedavg")
        );
        assert!(by_name("fedavg", 0.0, 0.9).is_err());
        assert!(by_name("fedavgm", 1.0, 1.0).is_err());
        for name in [
            "fedavg",
            "fedavgm",
            "fedprox",
            "scaffold",
            "fedadagrad",
            "fedadam",
            "fedyogi",
        ] {
            assert_eq!(by_name(name, 0.1, 0.9).unwrap().name(), name);
        }
    }

    /// Two rounds of updates, by hand from each rule's formulas (Flower's).
    #[test]
    fn fedavgm_fedadagrad_and_fedyogi_follow_their_rules() {
        let (g, d1, d2) = ([0.0f32, 1.0], [0.5f32, -0.2], [0.1f32, 0.3]);
        // FedAvgM, β = 0.9, lr 1: v1 = d1, v2 = 0.9 d1 + d2.
        let mut s = FedAvgM::new(1.0, 0.9);
        let g1 = s.apply(&g, &d1, &at(1));
        assert_eq!(g1, [0.5, 0.8]);
        let g2 = s.apply(&g1, &d2, &at(2));
        for (i, want) in [0.5 + 0.9 * 0.5 + 0.1, 0.8 + 0.9 * -0.2 + 0.3]
            .into_iter()
            .enumerate()
        {
            assert!((g2[i] - want).abs() < 1e-6, "{g2:?}");
        }
        // FedAdagrad, lr 0.1: m = d (β₁ = 0), v accumulates d².
        let mut s = FedOpt::new(AdaptiveRule::Adagrad, 0.1);
        let g1 = s.apply(&g, &d1, &at(1));
        let g2 = s.apply(&g1, &d2, &at(2));
        for i in 0..2 {
            let v2 = d1[i] * d1[i] + d2[i] * d2[i];
            let want = g[i] + 0.1 * d1[i] / (d1[i].abs() + 1e-9) + 0.1 * d2[i] / (v2.sqrt() + 1e-9);
            assert!((g2[i] - want).abs() < 1e-6, "{g2:?} vs {want}");
        }
        // FedYogi, lr 0.01: v starts at 0, so v1 = (1 − β₂) d1² (sign(0 − d²) = −1), then
        // v2 = v1 − (1 − β₂) d2² sign(v1 − d2²).
        let mut s = FedOpt::new(AdaptiveRule::Yogi, 0.01);
        let g1 = s.apply(&g, &d1, &at(1));
        let g2 = s.apply(&g1, &d2, &at(2));
        for i in 0..2 {
            let m1 = 0.1 * d1[i];
            let v1 = 0.01 * d1[i] * d1[i];
            let step1 = 0.01 * m1 / (v1.sqrt() + 1e-3);
            let m2 = 0.9 * m1 + 0.1 * d2[i];
            let v2 = v1 - 0.01 * d2[i] * d2[i] * (v1 - d2[i] * d2[i]).signum();
            let want = g[i] + step1 + 0.01 * m2 / (v2.sqrt() + 1e-3);
            assert!((g2[i] - want).abs() < 1e-6, "{g2:?} vs {want}");
        }
    }

    #[test]
    fn every_stateful_strategy_continues_exactly_after_a_restore() {
        let g = vec![0.5f32, -1.0, 2.0];
        let (d1, d2) = (vec![0.1f32, -0.2, 0.3], vec![-0.05f32, 0.4, 0.0]);
        for name in ["fedavgm", "fedadagrad", "fedadam", "fedyogi", "scaffold"] {
            let (g, d1, d2) = if name == "scaffold" {
                // SCAFFOLD's mean carries Δc after the model's values.
                (g[..1].to_vec(), d1[..2].to_vec(), d2[..2].to_vec())
            } else {
                (g.clone(), d1.clone(), d2.clone())
            };
            let mut a = by_name(name, 0.1, 0.9).unwrap();
            let g1 = a.apply(&g, &d1, &at(1));
            let mut b = by_name(name, 0.1, 0.9).unwrap();
            b.restore_state(&a.save_state().unwrap()).unwrap();
            assert_eq!(
                a.apply(&g1, &d2, &at(2)),
                b.apply(&g1, &d2, &at(2)),
                "{name}"
            );
            assert_eq!(a.save_state(), b.save_state(), "{name}");
            assert!(b.restore_state(&[0; 6]).is_err(), "{name}");
        }
    }

    /// SCAFFOLD moves the model by the mean update and its control variate by |S|/N of the
    /// mean Δc, which the next tasks carry; its state is the control variate.
    #[test]
    fn scaffold_moves_the_model_and_its_control_variate() {
        let mut s = Scaffold::new(1.0);
        s.initialise(2);
        assert_eq!(*s.control_variate().unwrap(), vec![0.0, 0.0]);
        let round = RoundContext {
            round: 1,
            contributors: 2,
            population: 8,
        };
        let g1 = s.apply(&[1.0, 2.0], &[0.5, -1.0, 4.0, -8.0], &round);
        assert_eq!(g1, vec![1.5, 1.0]);
        assert_eq!(*s.control_variate().unwrap(), vec![1.0, -2.0]);
        let g2 = s.apply(&g1, &[0.0, 0.0, 4.0, 4.0], &RoundContext::full(2, 8));
        assert_eq!(g2, g1);
        assert_eq!(*s.control_variate().unwrap(), vec![5.0, 2.0]);
        let mut t = Scaffold::new(1.0);
        t.restore_state(&s.save_state().unwrap()).unwrap();
        t.initialise(2);
        assert_eq!(t.control_variate(), s.control_variate());
    }
}
