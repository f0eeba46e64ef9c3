//! What local training is asked to do ([`TrainConfig`], [`Optimizer`]) and what it and
//! evaluation report ([`TrainReport`], [`Metrics`]).

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Local optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    Sgd,
    Adam,
}

impl std::str::FromStr for Optimizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(Optimizer::Sgd),
            "adam" => Ok(Optimizer::Adam),
            _ => Err(format!("unknown optimizer {s:?}: use sgd or adam")),
        }
    }
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optimizer::Sgd => "sgd",
            Optimizer::Adam => "adam",
        })
    }
}

/// Hyper-parameters of one participant's local training in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: Optimizer,
    /// Seed of the shuffling order.
    #[serde(default)]
    pub seed: u64,
    /// FedProx's proximal coefficient μ (Li et al., "Federated Optimization in Heterogeneous
    /// Networks", 2020): local training minimises the loss plus μ/2 · ‖w − w_global‖², which
    /// keeps participants with skewed data near the global model. 0 is plain local training.
    #[serde(default)]
    pub proximal_mu: f64,
    /// SGD's momentum in PyTorch's form (`v ← μ v + g`, `w ← w − lr · v`); 0 is plain SGD.
    /// Ignored by Adam, which has its own moments.
    #[serde(default)]
    pub momentum: f64,
    /// L2 weight decay λ: `λ · w` is added to every gradient.
    #[serde(default)]
    pub weight_decay: f64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.epochs == 0 {
            return Err(ModelError::InvalidConfig(
                "epochs must be at least 1".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(ModelError::InvalidConfig(
                "batch_size must be at least 1".into(),
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(ModelError::InvalidConfig(format!(
                "learning_rate must be a positive number, not {}",
                self.learning_rate
            )));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(ModelError::InvalidConfig(format!(
                "momentum must be in [0, 1), not {}",
                self.momentum
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(ModelError::InvalidConfig(format!(
                "weight_decay must be a number ≥ 0, not {}",
                self.weight_decay
            )));
        }
        if !(self.proximal_mu >= 0.0 && self.proximal_mu.is_finite()) {
            return Err(ModelError::InvalidConfig(format!(
                "proximal_mu must be a number ≥ 0, not {}",
                self.proximal_mu
            )));
        }
        Ok(())
    }
}

/// Loss, accuracy and (binary tasks) AUC over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    pub accuracy: f64,
    /// Area under the ROC curve for binary tasks, `None` otherwise.
    pub auc: Option<f64>,
    pub num_examples: usize,
}

impl Metrics {
    /// Example-weighted mean of several parties' metrics (AUC averaged the same way, as an
    /// approximation, where every party has one).
    pub fn weighted_mean(items: &[Metrics]) -> Option<Metrics> {
        let n: usize = items.iter().map(|m| m.num_examples).sum();
        if n == 0 {
            return None;
        }
        let w = |f: &dyn Fn(&Metrics) -> f64| {
            items
                .iter()
                .map(|m| f(m) * m.num_examples as f64)
                .sum::<f64>()
                / n as f64
        };
        let auc = if items.iter().all(|m| m.auc.is_some()) {
            Some(w(&|m| m.auc.unwrap_or(0.0)))
        } else {
            None
        };
        Some(Metrics {
            loss: w(&|m| m.loss),
            accuracy: w(&|m| m.accuracy),
            auc,
            num_examples: n,
        })
    }
}

/// What local training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Mean loss over each epoch's batches.
    pub epoch_loss: Vec<f64>,
    /// Accuracy on the training batches of the last epoch, as they were seen.
    pub last_epoch_accuracy: f64,
    pub num_examples: usize,
    pub seconds: f64,
}
