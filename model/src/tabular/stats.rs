//! A table's statistics, every field a sum over rows, so that a federation's are the sum of
//! its sites' ([`TableStats`]): what round 0 sums through secure aggregation.

use serde::{Deserialize, Serialize};

use super::{Category, Cells, ColumnType, Schema, Table};

/// Sums over a numeric (or boolean) column's present values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NumericStats {
    pub count: f64,
    pub sum: f64,
    pub sum_sq: f64,
    pub missing: f64,
    /// Counts per bin of the column's edges (one more than the edges; empty without bins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub histogram: Vec<f64>,
}

impl NumericStats {
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// Population standard deviation.
    pub fn std(&self) -> Option<f64> {
        let m = self.mean()?;
        Some((self.sum_sq / self.count - m * m).max(0.0).sqrt())
    }
}

/// Counts over a categorical column.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoryStats {
    /// One count per declared category.
    pub counts: Vec<f64>,
    pub unknown: f64,
    pub missing: f64,
}

/// A column's statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ColumnStats {
    Numeric(NumericStats),
    Categorical(CategoryStats),
    Ignored,
}

/// A table's (or a federation's) statistics: every field a sum over rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableStats {
    pub rows: f64,
    /// One entry per schema column.
    pub columns: Vec<ColumnStats>,
    /// One count per class.
    pub labels: Vec<f64>,
}

impl TableStats {
    /// Nothing counted yet, shaped for `schema`.
    pub fn empty(schema: &Schema) -> TableStats {
        TableStats {
            rows: 0.0,
            columns: schema
                .columns
                .iter()
                .map(|c| match &c.kind {
                    ColumnType::Numeric | ColumnType::Boolean => {
                        ColumnStats::Numeric(NumericStats {
                            histogram: if c.bins.is_empty() {
                                Vec::new()
                            } else {
                                vec![0.0; c.bins.len() + 1]
                            },
                            ..NumericStats::default()
                        })
                    }
                    ColumnType::Categorical { categories } => {
                        ColumnStats::Categorical(CategoryStats {
                            counts: vec![0.0; categories.len()],
                            ..Default::default()
                        })
                    }
                    ColumnType::Ignored => ColumnStats::Ignored,
                })
                .collect(),
            labels: vec![0.0; schema.classes.len()],
        }
    }

    /// A site's statistics of its own table.
    pub fn of(table: &Table) -> TableStats {
        let mut s = TableStats::empty(&table.schema);
        s.rows = table.len() as f64;
        for ((stats, cells), column) in s
            .columns
            .iter_mut()
            .zip(&table.columns)
            .zip(&table.schema.columns)
        {
            match (stats, cells) {
                (ColumnStats::Numeric(n), Cells::Values(v)) => {
                    for x in v {
                        match x {
                            Some(x) => {
                                n.count += 1.0;
                                n.sum += x;
                                n.sum_sq += x * x;
                                if !n.histogram.is_empty() {
                                    n.histogram[column.bins.partition_point(|e| e <= x)] += 1.0;
                                }
                            }
                            None => n.missing += 1.0,
                        }
                    }
                }
                (ColumnStats::Categorical(c), Cells::Categories(v)) => {
                    for x in v {
                        match x {
                            Some(Category::Known(k)) => c.counts[*k as usize] += 1.0,
                            Some(Category::Unknown) => c.unknown += 1.0,
                            None => c.missing += 1.0,
                        }
                    }
                }
                _ => {}
            }
        }
        for &l in &table.labels {
            s.labels[l as usize] += 1.0;
        }
        s
    }

    /// Adds another site's statistics (of the same schema).
    pub fn add(&mut self, other: &TableStats) {
        let mut mine = self.to_values();
        for (a, b) in mine.iter_mut().zip(other.to_values()) {
            *a += b;
        }
        self.set_values(&mine);
    }

    /// Every field as one vector, for summing through secure aggregation.
    pub fn to_values(&self) -> Vec<f64> {
        let mut v = vec![self.rows];
        for c in &self.columns {
            match c {
                ColumnStats::Numeric(n) => {
                    v.extend([n.count, n.sum, n.sum_sq, n.missing]);
                    v.extend(&n.histogram);
                }
                ColumnStats::Categorical(c) => {
                    v.extend(&c.counts);
                    v.extend([c.unknown, c.missing]);
                }
                ColumnStats::Ignored => {}
            }
        }
        v.extend(&self.labels);
        v
    }

    /// The statistics a summed vector of [`Self::to_values`] holds, shaped for `schema`.
    pub fn from_values(schema: &Schema, values: &[f64]) -> Result<TableStats, String> {
        let mut s = TableStats::empty(schema);
        if values.len() != s.to_values().len() {
            return Err(format!(
                "{} statistics where the schema has {}",
                values.len(),
                s.to_values().len()
            ));
        }
        s.set_values(values);
        Ok(s)
    }

    fn set_values(&mut self, values: &[f64]) {
        let mut it = values.iter().copied();
        let mut next = || it.next().expect("lengths checked");
        self.rows = next();
        for c in &mut self.columns {
            match c {
                ColumnStats::Numeric(n) => {
                    (n.count, n.sum, n.sum_sq, n.missing) = (next(), next(), next(), next());
                    for h in n.histogram.iter_mut() {
                        *h = next();
                    }
                }
                ColumnStats::Categorical(c) => {
                    for k in c.counts.iter_mut() {
                        *k = next();
                    }
                    c.unknown = next();
                    c.missing = next();
                }
                ColumnStats::Ignored => {}
            }
        }
        for l in self.labels.iter_mut() {
            *l = next();
        }
    }
}
