//! What `cohort simulate` reports: the `--report` JSON, the table of rounds, and how the
//! secure-aggregation settings are described.

use cohort_coordinator::RoundSummary;
use cohort_coordinator::round::SecureSettings;
use cohort_model::{ModelSpec, TrainConfig};
use serde::Serialize;

/// One round in the report.
#[derive(Debug, Serialize)]
pub struct RoundRow {
    pub round: u64,
    pub participants: usize,
    pub stragglers: Vec<String>,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_auc: Option<f64>,
    pub seconds: f64,
    /// Jobs with differential privacy: ε of the job after this round (at the job's δ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Adaptive clipping: the round's clip norm and the share of updates within it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unclipped_share: Option<f64>,
}

/// The `--report` JSON.
#[derive(Debug, Serialize)]
pub struct SimReport {
    pub dataset: String,
    pub participants: usize,
    pub partition: String,
    pub model: ModelSpec,
    pub train: TrainConfig,
    pub strategy: String,
    pub device: String,
    pub seed: u64,
    pub secure_aggregation: serde_json::Value,
    pub rounds: Vec<RoundRow>,
    pub federated_accuracy: Option<f64>,
    pub centralised_accuracy: Option<f64>,
    /// Where the final global model's weights are (a path, or a URL for object storage).
    pub model_path: String,
    /// Held-out rows of every participant answered by the served final model (the
    /// Inference service over mutual TLS), and the accuracy of those answers.
    pub served_rows: usize,
    pub served_accuracy: f64,
    pub federation_seconds: f64,
    pub centralised_seconds: Option<f64>,
    /// `networked` or `virtual`.
    pub engine: String,
    /// Where the virtual engine's time went.
    pub engine_seconds: Option<super::virtual_engine::EngineSeconds>,
    /// Tables prepared by the federation's pipeline: the federation's summary table (per
    /// column count, missing share, mean and std, or category shares), from its totals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_summary: Option<Vec<cohort_model::tabular::ColumnSummary>>,
    /// Jobs with differential privacy: the mechanism, its noise and the (ε, δ) spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<serde_json::Value>,
}

/// Prints the federation's summary table.
pub(super) fn print_summary(summary: &[cohort_model::tabular::ColumnSummary]) {
    println!("federation statistics (totals over every site's training rows):");
    println!(
        "{:<28} {:<12} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}  shares",
        "column", "type", "count", "missing", "mean", "std", "p25", "median", "p75"
    );
    let q = |c: &cohort_model::tabular::ColumnSummary, p: f64| {
        fmt_opt(
            c.quantiles.iter().find(|(x, _)| *x == p).map(|(_, v)| *v),
            4,
        )
    };
    for c in summary {
        let shares: Vec<String> = c
            .shares
            .iter()
            .map(|(k, s)| format!("{k} {:.0}%", s * 100.0))
            .collect();
        println!(
            "{:<28} {:<12} {:>8} {:>7.1}% {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            c.column,
            c.kind,
            c.count,
            c.missing_share * 100.0,
            fmt_opt(c.mean, 4),
            fmt_opt(c.std, 4),
            q(c, 0.25),
            q(c, 0.5),
            q(c, 0.75),
            shares.join(", ")
        );
    }
    println!();
}

pub(super) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// How the run aggregates, in words.
pub(super) fn secure_description(s: Option<&SecureSettings>, n: usize, per_round: u64) -> String {
    match s {
        None => "OFF (plaintext rounds: the coordinator sees every update)".into(),
        Some(s) => {
            let selected = (per_round as usize).clamp(1, n);
            let c = s.committee_for(selected);
            let who = if s.custodians.is_empty() {
                "committee"
            } else {
                "custodian committee"
            };
            format!(
                "on ({}: tfhe-rs GLWE N={}, fresh keys every round, {}-of-{} {who}, T_min {})",
                cohort_crypto::aggregation::SCHEME,
                s.params.polynomial_size,
                s.threshold_for(c),
                c,
                s.t_min
            )
        }
    }
}

/// The report's `secure_aggregation`: the scheme and its parameters, or `false`.
pub(super) fn secure_json(s: Option<&SecureSettings>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Bool(false),
        Some(s) => serde_json::json!({
            "scheme": cohort_crypto::aggregation::SCHEME,
            "library": "tfhe-rs 1.8.2 core_crypto",
            "glwe_dimension": 1,
            "polynomial_size": s.params.polynomial_size,
            "noise": format!("t-uniform(2^{})", s.params.noise_log2),
            "smudging": format!("uniform(±2^{})", s.params.smudging_log2),
            "committee_size": s.committee_for(usize::MAX),
            "custodians": s.custodians,
            "threshold": "strict majority",
            "t_min": s.t_min,
            "clip": s.codec.clip,
            "frac_bits": s.codec.frac_bits,
            "delta_log": s.codec.delta_log,
            "max_total_weight": s.codec.max_total_weight,
        }),
    }
}

pub(super) fn model_name(spec: &ModelSpec) -> String {
    match spec {
        ModelSpec::Logistic { .. } => "logistic regression".into(),
        ModelSpec::Mlp { hidden, .. } => format!("MLP {hidden:?}"),
        ModelSpec::Cnn { .. } => "CNN".into(),
        ModelSpec::Layers { layers, .. } => cohort_model::layers::summary(layers),
        ModelSpec::Custom { name, .. } => format!("custom model {name}"),
    }
}

pub(super) fn row(s: &RoundSummary) -> RoundRow {
    RoundRow {
        round: s.round,
        participants: s.participants.len(),
        stragglers: s.stragglers.clone(),
        train_loss: s.train.map(|m| m.loss),
        train_accuracy: s.train.map(|m| m.accuracy),
        eval_loss: s.eval.map(|m| m.loss),
        eval_accuracy: s.eval.map(|m| m.accuracy),
        eval_auc: s.eval.and_then(|m| m.auc),
        seconds: s.seconds,
        epsilon: s.privacy.map(|p| p.epsilon),
        clip_norm: s.clipping.map(|c| c.clip_norm),
        unclipped_share: s.clipping.map(|c| c.unclipped_share),
    }
}

pub(super) fn print_table(history: &[RoundSummary]) {
    let private = history.iter().any(|s| s.privacy.is_some());
    let eps = |s: &RoundSummary| {
        if private {
            format!("  {:>8}", fmt_opt(s.privacy.map(|p| p.epsilon), 3))
        } else {
            String::new()
        }
    };
    println!(
        "{:>5}  {:>12}  {:>10}  {:>17}  {:>8}{}",
        "round",
        "participants",
        "train loss",
        "held-out accuracy",
        "seconds",
        if private { "         ε" } else { "" }
    );
    for s in history {
        println!(
            "{:>5}  {:>12}  {:>10}  {:>17}  {:>8.2}{}",
            s.round,
            s.participants.len(),
            fmt_opt(s.train.map(|m| m.loss), 4),
            fmt_opt(s.eval.map(|m| m.accuracy), 4),
            s.seconds,
            eps(s)
        );
    }
}
