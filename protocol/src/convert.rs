//! Conversions between the generated messages and `cohort_model`'s types (feature
//! `model`, on by default; the fuzz targets build without it, and without Burn).

use cohort_model::{Metrics, ModelSpec, Optimizer, TrainConfig};

use crate::{ProtocolError, pb};

impl From<&ModelSpec> for pb::ModelSpec {
    fn from(s: &ModelSpec) -> Self {
        let u = |v: usize| v as u32;
        match s {
            ModelSpec::Logistic { inputs, classes } => pb::ModelSpec {
                kind: "logistic".into(),
                inputs: u(*inputs),
                classes: u(*classes),
                ..Default::default()
            },
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => pb::ModelSpec {
                kind: "mlp".into(),
                inputs: u(*inputs),
                hidden: hidden.iter().map(|&h| u(h)).collect(),
                classes: u(*classes),
                ..Default::default()
            },
            ModelSpec::Cnn {
                channels,
                height,
                width,
                classes,
            } => pb::ModelSpec {
                kind: "cnn".into(),
                classes: u(*classes),
                channels: u(*channels),
                height: u(*height),
                width: u(*width),
                ..Default::default()
            },
            ModelSpec::Layers {
                inputs,
                channels,
                height,
                width,
                classes,
                layers,
            } => pb::ModelSpec {
                kind: "layers".into(),
                inputs: u(*inputs),
                classes: u(*classes),
                channels: u(*channels),
                height: u(*height),
                width: u(*width),
                layers_json: serde_json::to_string(layers).expect("layers serialise"),
                ..Default::default()
            },
            ModelSpec::Custom {
                name,
                inputs,
                channels,
                height,
                width,
                classes,
            } => pb::ModelSpec {
                kind: "custom".into(),
                name: name.clone(),
                inputs: u(*inputs),
                classes: u(*classes),
                channels: u(*channels),
                height: u(*height),
                width: u(*width),
                ..Default::default()
            },
        }
    }
}

impl TryFrom<&pb::ModelSpec> for ModelSpec {
    type Error = ProtocolError;
    fn try_from(m: &pb::ModelSpec) -> Result<Self, ProtocolError> {
        let z = |v: u32| v as usize;
        let spec = match m.kind.as_str() {
            "logistic" => ModelSpec::Logistic {
                inputs: z(m.inputs),
                classes: z(m.classes),
            },
            "mlp" => ModelSpec::Mlp {
                inputs: z(m.inputs),
                hidden: m.hidden.iter().map(|&h| z(h)).collect(),
                classes: z(m.classes),
            },
            "cnn" => ModelSpec::Cnn {
                channels: z(m.channels),
                height: z(m.height),
                width: z(m.width),
                classes: z(m.classes),
            },
            "layers" => ModelSpec::Layers {
                inputs: z(m.inputs),
                channels: z(m.channels),
                height: z(m.height),
                width: z(m.width),
                classes: z(m.classes),
                layers: serde_json::from_str(&m.layers_json)
                    .map_err(|e| ProtocolError::Malformed(format!("model layers_json: {e}")))?,
            },
            "custom" => ModelSpec::Custom {
                name: m.name.clone(),
                inputs: z(m.inputs),
                channels: z(m.channels),
                height: z(m.height),
                width: z(m.width),
                classes: z(m.classes),
            },
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown model kind {other:?}"
                )));
            }
        };
        spec.validate()
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        Ok(spec)
    }
}

impl From<&TrainConfig> for pb::TrainConfig {
    fn from(c: &TrainConfig) -> Self {
        pb::TrainConfig {
            local_epochs: c.epochs as u32,
            batch_size: c.batch_size as u32,
            learning_rate: c.learning_rate,
            optimizer: c.optimizer.to_string(),
            seed: c.seed,
            proximal_mu: c.proximal_mu,
            momentum: c.momentum,
            weight_decay: c.weight_decay,
        }
    }
}

impl TryFrom<&pb::TrainConfig> for TrainConfig {
    type Error = ProtocolError;
    fn try_from(c: &pb::TrainConfig) -> Result<Self, ProtocolError> {
        let cfg = TrainConfig {
            epochs: c.local_epochs as usize,
            batch_size: c.batch_size as usize,
            learning_rate: c.learning_rate,
            optimizer: c
                .optimizer
                .parse::<Optimizer>()
                .map_err(ProtocolError::Malformed)?,
            seed: c.seed,
            proximal_mu: c.proximal_mu,
            momentum: c.momentum,
            weight_decay: c.weight_decay,
        };
        cfg.validate()
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        Ok(cfg)
    }
}

impl From<&Metrics> for pb::Metrics {
    fn from(m: &Metrics) -> Self {
        pb::Metrics {
            loss: m.loss,
            accuracy: m.accuracy,
            auc: m.auc.unwrap_or(f64::NAN),
            num_examples: m.num_examples as u64,
        }
    }
}

impl TryFrom<&pb::Metrics> for Metrics {
    type Error = ProtocolError;
    fn try_from(m: &pb::Metrics) -> Result<Self, ProtocolError> {
        if !m.loss.is_finite() || !(0.0..=1.0).contains(&m.accuracy) {
            return Err(ProtocolError::Malformed(format!(
                "metrics out of range: loss {}, accuracy {}",
                m.loss, m.accuracy
            )));
        }
        Ok(Metrics {
            loss: m.loss,
            accuracy: m.accuracy,
            auc: m.auc.is_finite().then_some(m.auc),
            num_examples: m.num_examples as usize,
        })
    }
}
