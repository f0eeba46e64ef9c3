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
        });
        out
    }
}
