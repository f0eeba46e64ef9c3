//! The preprocessing every site applies: a [`Pipeline`] fitted once from the federation's
//! statistics (impute, one-hot encode, standardise) and applied identically wherever rows
//! are prepared.

use serde::{Deserialize, Serialize};

use super::{Category, Cells, Column, ColumnStats, ColumnType, Schema, Table, TableStats};
use crate::DataError;
use crate::data::{Dataset, FeatureShape};

/// How missing values are filled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Impute {
    /// Numeric: the federation's mean; categorical: the most frequent category.
    #[default]
    Mean,
    /// The most frequent category; numeric columns: the mean.
    MostFrequent,
    /// A constant (numeric columns); categorical: all zeros.
    Constant(f64),
    /// Refuse missing values (strict mode).
    Refuse,
}

impl std::str::FromStr for Impute {
    type Err = String;

    /// `mean`, `most-frequent`, `constant:VALUE` or `refuse`.
    fn from_str(s: &str) -> Result<Impute, String> {
        match s {
            "mean" => Ok(Impute::Mean),
            "most-frequent" | "most_frequent" => Ok(Impute::MostFrequent),
            "refuse" => Ok(Impute::Refuse),
            _ => match s.strip_prefix("constant:").map(str::parse::<f64>) {
                Some(Ok(v)) if v.is_finite() => Ok(Impute::Constant(v)),
                _ => Err(format!(
                    "{s:?}: expected mean, most-frequent, constant:VALUE or refuse"
                )),
            },
        }
    }
}

/// How a pipeline is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct PipelineOptions {
    pub impute: Impute,
    /// Add a 0/1 column after every used column, set where the value was missing (on every
    /// column, so that the model's input width is known from the schema before any
    /// statistics are).
    #[serde(default)]
    pub missing_indicators: bool,
}

/// One column's preprocessing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// (x − mean) / std, a missing x replaced by `fill` first.
    Standardize {
        column: String,
        mean: f64,
        std: f64,
        fill: Option<f64>,
        indicator: bool,
    },
    /// One 0/1 column per category; unknown values all zeros; a missing value is `fill`
    /// (a category index) or all zeros.
    OneHot {
        column: String,
        categories: usize,
        fill: Option<u32>,
        indicator: bool,
    },
}

/// One preprocessing for every site, fitted from the federation's statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub schema: Schema,
    pub steps: Vec<Step>,
    /// Missing values are refused instead of imputed (strict mode).
    pub refuse_missing: bool,
}

/// What a transform did besides producing features.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TransformReport {
    pub imputed: usize,
    pub unknown_categories: usize,
}

impl Pipeline {
    /// Fits the steps from the federation's statistics.
    pub fn fit(
        schema: &Schema,
        stats: &TableStats,
        opts: PipelineOptions,
    ) -> Result<Pipeline, String> {
        schema.validate()?;
        let mut steps = Vec::new();
        for (c, s) in schema.columns.iter().zip(&stats.columns) {
            match s {
                ColumnStats::Numeric(n) => {
                    let mean = n.mean().ok_or_else(|| {
                        format!(
                            "column {:?} has no value anywhere in the federation",
                            c.name
                        )
                    })?;
                    let std = n.std().filter(|s| *s > 1e-12).unwrap_or(1.0);
                    let fill = match opts.impute {
                        Impute::Mean | Impute::MostFrequent => Some(mean),
                        Impute::Constant(v) => Some(v),
                        Impute::Refuse => None,
                    };
                    steps.push(Step::Standardize {
                        column: c.name.clone(),
                        mean,
                        std,
                        fill,
                        indicator: opts.missing_indicators,
                    });
                }
                ColumnStats::Categorical(k) => {
                    let most = k
                        .counts
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                        .map(|(i, _)| i as u32);
                    let fill = match opts.impute {
                        Impute::Mean | Impute::MostFrequent => most,
                        Impute::Constant(_) | Impute::Refuse => None,
                    };
                    steps.push(Step::OneHot {
                        column: c.name.clone(),
                        categories: k.counts.len(),
                        fill,
                        indicator: opts.missing_indicators,
                    });
                }
                ColumnStats::Ignored => {}
            }
        }
        Ok(Pipeline {
            schema: schema.clone(),
            steps,
            refuse_missing: opts.impute == Impute::Refuse,
        })
    }

    /// Features per row of any pipeline fitted for `schema` with `opts`: known before the
    /// federation's statistics are, so a job's model can be built from its schema.
    pub fn width_for(schema: &Schema, opts: PipelineOptions) -> usize {
        let ind = usize::from(opts.missing_indicators);
        schema
            .columns
            .iter()
            .map(|c| match &c.kind {
                ColumnType::Numeric | ColumnType::Boolean => 1 + ind,
                ColumnType::Categorical { categories } => categories.len() + ind,
                ColumnType::Ignored => 0,
            })
            .sum()
    }

    /// Features per row after the pipeline.
    pub fn width(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Standardize { indicator, .. } => 1 + usize::from(*indicator),
                Step::OneHot {
                    categories,
                    indicator,
                    ..
                } => categories + usize::from(*indicator),
            })
            .sum()
    }

    /// The features' names, in order.
    pub fn feature_names(&self) -> Vec<String> {
        let cats = |column: &str| match self.schema.columns.iter().find(|c| c.name == column) {
            Some(Column {
                kind: ColumnType::Categorical { categories },
                ..
            }) => categories.clone(),
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for s in &self.steps {
            match s {
                Step::Standardize {
                    column, indicator, ..
                } => {
                    out.push(column.clone());
                    if *indicator {
                        out.push(format!("{column}=missing"));
                    }
                }
                Step::OneHot {
                    column, indicator, ..
                } => {
                    out.extend(cats(column).iter().map(|k| format!("{column}={k}")));
                    if *indicator {
                        out.push(format!("{column}=missing"));
                    }
                }
            }
        }
        out
    }

    /// The model's input for raw rows keyed by column name (see [`Table::from_records`]),
    /// prepared exactly as a site prepares its file's rows; with each row's label where it
    /// has one.
    pub fn transform_records(
        &self,
        records: &[std::collections::BTreeMap<String, String>],
    ) -> Result<(Dataset, Vec<Option<u32>>, TransformReport), DataError> {
        let (table, labels) =
            Table::from_records(records, std::path::Path::new("request"), &self.schema)?;
        let (ds, report) = self.transform(&table)?;
        Ok((ds, labels, report))
    }

    /// The model's input for `table` (read against this pipeline's schema).
    pub fn transform(&self, table: &Table) -> Result<(Dataset, TransformReport), DataError> {
        if table.schema != self.schema {
            return Err(DataError::Invalid(
                "the table was read against another schema than the pipeline's".into(),
            ));
        }
        let width = self.width();
        let n = table.len();
        let mut features = vec![0f32; n * width];
        let mut report = TransformReport::default();
        let mut offset = 0;
        let cells = |name: &str| {
            let i = self
                .schema
                .columns
                .iter()
                .position(|c| c.name == name)
                .expect("steps are of schema columns");
            &table.columns[i]
        };
        for s in &self.steps {
            match (s, cells(step_column(s))) {
                (
                    Step::Standardize {
                        column,
                        mean,
                        std,
                        fill,
                        indicator,
                    },
                    Cells::Values(v),
                ) => {
                    for (r, x) in v.iter().enumerate() {
                        let row = &mut features[r * width + offset..];
                        let x = match (x, fill) {
                            (Some(x), _) => *x,
                            (None, Some(f)) => {
                                report.imputed += 1;
                                if *indicator {
                                    row[1] = 1.0;
                                }
                                *f
                            }
                            (None, None) => {
                                return Err(DataError::Invalid(format!(
                                    "row {}: missing value in column {column:?}, and missing \
                                     values are refused (strict mode)",
                                    r + 1
                                )));
                            }
                        };
                        row[0] = ((x - mean) / std) as f32;
                    }
                    offset += 1 + usize::from(*indicator);
                }
                (
                    Step::OneHot {
                        categories,
                        fill,
                        indicator,
                        column,
                    },
                    Cells::Categories(v),
                ) => {
                    for (r, x) in v.iter().enumerate() {
                        let row = &mut features[r * width + offset..];
                        match x {
                            Some(Category::Known(k)) => row[*k as usize] = 1.0,
                            Some(Category::Unknown) => report.unknown_categories += 1,
                            None => {
                                if *indicator {
                                    row[*categories] = 1.0;
                                }
                                match fill {
                                    Some(k) => {
                                        report.imputed += 1;
                                        row[*k as usize] = 1.0;
                                    }
                                    None if self.refuse_missing => {
                                        return Err(DataError::Invalid(format!(
                                            "row {}: missing value in column {column:?}, and \
                                             missing values are refused (strict mode)",
                                            r + 1
                                        )));
                                    }
                                    None => {}
                                }
                            }
                        }
                    }
                    offset += categories + usize::from(*indicator);
                }
                _ => unreachable!("a step's column has the step's kind"),
            }
        }
        let ds = Dataset::new(
            features,
            table.labels.clone(),
            FeatureShape::Flat(width),
            self.schema.classes.len(),
        )?;
        Ok((
            Dataset {
                class_names: self.schema.classes.clone(),
                ..ds
            },
            report,
        ))
    }
}

fn step_column(s: &Step) -> &str {
    match s {
        Step::Standardize { column, .. } | Step::OneHot { column, .. } => column,
    }
}
