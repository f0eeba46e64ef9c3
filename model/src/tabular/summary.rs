//! The federation's summary table: per column the count, missing share, mean and standard
//! deviation, or each category's share, from the federation's totals alone.

use serde::{Deserialize, Serialize};

use super::{ColumnStats, ColumnType, Schema, TableStats};

/// One column of the federation's summary table ([`TableStats::summary`]): what a site's
/// operator may look at before training, computed from the federation's totals only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSummary {
    pub column: String,
    /// "numeric", "boolean", "categorical" or "label".
    pub kind: String,
    /// Rows with a value.
    pub count: f64,
    /// Share of rows without one.
    pub missing_share: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    /// Each category's (or class's) share of the rows with a value; "(unknown)" for values
    /// outside the vocabulary.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<(String, f64)>,
    /// Numeric columns with bins: (p, value) for p = 0.05, 0.25, 0.5, 0.75 and 0.95, from
    /// the federation's histogram (linear within a bin; a quantile in a tail below the first
    /// or above the last edge is that edge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantiles: Vec<(f64, f64)>,
}

/// The probabilities the summary gives quantiles for.
pub const QUANTILES: [f64; 5] = [0.05, 0.25, 0.5, 0.75, 0.95];

/// Quantiles from a histogram over `edges` (counts below the first edge, between each two,
/// from the last up).
pub fn quantiles(edges: &[f64], histogram: &[f64]) -> Vec<(f64, f64)> {
    let total: f64 = histogram.iter().sum();
    if edges.is_empty() || histogram.len() != edges.len() + 1 || total <= 0.0 {
        return Vec::new();
    }
    QUANTILES
        .iter()
        .map(|&p| {
            let target = p * total;
            let mut below = 0.0;
            for (b, &n) in histogram.iter().enumerate() {
                if n > 0.0 && below + n >= target {
                    let value = match b {
                        0 => edges[0],
                        b if b == edges.len() => edges[edges.len() - 1],
                        b => {
                            let (lo, hi) = (edges[b - 1], edges[b]);
                            lo + (hi - lo) * ((target - below) / n).clamp(0.0, 1.0)
                        }
                    };
                    return (p, value);
                }
                below += n;
            }
            (p, edges[edges.len() - 1])
        })
        .collect()
}

impl TableStats {
    /// The federation's summary table, a row per used column and one for the label.
    pub fn summary(&self, schema: &Schema) -> Vec<ColumnSummary> {
        let share = |k: f64, of: f64| if of > 0.0 { k / of } else { 0.0 };
        let mut out = Vec::new();
        for (c, s) in schema.columns.iter().zip(&self.columns) {
            match (s, &c.kind) {
                (ColumnStats::Numeric(n), kind) => out.push(ColumnSummary {
                    column: c.name.clone(),
                    kind: if *kind == ColumnType::Boolean {
                        "boolean"
                    } else {
                        "numeric"
                    }
                    .into(),
                    count: n.count,
                    missing_share: share(n.missing, n.count + n.missing),
                    mean: n.mean(),
                    std: n.std(),
                    shares: Vec::new(),
                    quantiles: quantiles(&c.bins, &n.histogram),
                }),
                (ColumnStats::Categorical(k), ColumnType::Categorical { categories }) => {
                    let present = k.counts.iter().sum::<f64>() + k.unknown;
                    let mut shares: Vec<(String, f64)> = categories
                        .iter()
                        .zip(&k.counts)
                        .map(|(name, n)| (name.clone(), share(*n, present)))
                        .collect();
                    if k.unknown > 0.0 {
                        shares.push(("(unknown)".into(), share(k.unknown, present)));
                    }
                    out.push(ColumnSummary {
                        column: c.name.clone(),
                        kind: "categorical".into(),
                        count: present,
                        missing_share: share(k.missing, present + k.missing),
                        mean: None,
                        std: None,
                        shares,
                        quantiles: Vec::new(),
                    });
                }
                _ => {}
            }
        }
        let total: f64 = self.labels.iter().sum();
        out.push(ColumnSummary {
            column: schema.label.clone(),
            kind: "label".into(),
            count: total,
            missing_share: 0.0,
            mean: None,
            std: None,
            shares: schema
                .classes
                .iter()
                .zip(&self.labels)
                .map(|(c, n)| (c.clone(), share(*n, total)))
                .collect(),
            quantiles: Vec::new(),
        });
        out
    }
}
