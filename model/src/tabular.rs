//! Real tables: missing values, categories, and one preprocessing for a whole federation.
//!
//! - [`Schema`]: each column's type (numeric, categorical with its vocabulary, boolean,
//!   ignored) and the label's classes, inferred from a site's file ([`Schema::infer`]) and
//!   then fixed in the job, so every site's file is checked against the same schema
//!   ([`Table::parse`]: an error names the column and the line).
//! - [`TableStats`]: what the federation learns about the data before round 1: per numeric
//!   column the count, sum, sum of squares and missing count, per categorical column the
//!   count of each declared category, unknown and missing values, and the label counts. Every
//!   field is a sum over rows, so a federation's statistics are the sum of its sites'
//!   ([`TableStats::add`]), which secure aggregation can compute without revealing any
//!   site's own ([`TableStats::to_values`] / [`TableStats::from_values`]).
//! - [`Pipeline`]: impute (mean, most frequent or a constant, with optional missing
//!   indicators), one-hot encode categories (an unknown category is all zeros, and counted),
//!   standardise with the federation's statistics; fitted once from the federation's
//!   statistics and applied identically wherever rows are prepared.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::data::LabelColumn;

/// Cell texts read as a missing value.
pub const MISSING: &[&str] = &["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"];

fn is_missing(s: &str) -> bool {
    MISSING.contains(&s)
}

fn boolean(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "t" => Some(true),
        "false" | "no" | "n" | "f" => Some(false),
        _ => None,
    }
}

/// A column's type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ColumnType {
    Numeric,
    /// Text categories from a declared vocabulary; others are "unknown".
    Categorical {
        categories: Vec<String>,
    },
    /// true/false, yes/no, y/n, t/f (any case).
    Boolean,
    /// Present in the files, not used.
    Ignored,
}

/// One feature column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(flatten)]
    pub kind: ColumnType,
    /// Numeric columns: increasing bin edges for the federation's histogram (counts below the
    /// first, between each two, and from the last up), from which the summary's quantiles
    /// come. Empty: no histogram.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bins: Vec<f64>,
}

/// Bin edges `infer` gives a numeric column: this many, evenly spaced over the values seen.
const INFERRED_EDGES: usize = 33;

/// `INFERRED_EDGES` edges from `lo` to `hi`, at 6 significant digits (none when they are
/// equal).
fn even_edges(lo: f64, hi: f64) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return Vec::new();
    }
    let round = |x: f64| {
        if x == 0.0 {
            return 0.0;
        }
        let scale = 10f64.powi(5 - x.abs().log10().floor() as i32);
        (x * scale).round() / scale
    };
    let mut edges: Vec<f64> = (0..INFERRED_EDGES)
        .map(|j| round(lo + (hi - lo) * j as f64 / (INFERRED_EDGES - 1) as f64))
        .collect();
    edges.dedup();
    edges
}

/// The columns every site's table must have, and the label's classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    pub label: String,
    pub classes: Vec<String>,
    pub columns: Vec<Column>,
}

fn bad(path: &Path, line: usize, message: String) -> DataError {
    DataError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// A CSV row: its 1-based line number and its fields.
type Row = (usize, Vec<String>);

/// A CSV's header and rows, split on commas and unquoted.
fn rows(text: &str, path: &Path) -> Result<(Vec<String>, Vec<Row>), DataError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or_else(|| bad(path, 1, "the file is empty; expected a header line".into()))?;
    let names: Vec<String> = header.split(',').map(|s| unquote(s).to_string()).collect();
    let mut out = Vec::new();
    for (ln, line) in lines {
        let fields: Vec<String> = line.split(',').map(|s| unquote(s).to_string()).collect();
        if fields.len() != names.len() {
            return Err(bad(
                path,
                ln,
                format!(
                    "{} fields, but the header has {} columns",
                    fields.len(),
                    names.len()
                ),
            ));
        }
        out.push((ln, fields));
    }
    if out.is_empty() {
        return Err(bad(
            path,
            1,
            "the file has a header but no data rows".into(),
        ));
    }
    Ok((names, out))
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// Sorts class names as numbers when they all are, else as text.
fn sorted_classes(labels: BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<String> = labels.into_iter().collect();
    if v.iter().all(|l| l.parse::<f64>().is_ok()) {
        v.sort_by(|a, b| {
            a.parse::<f64>()
                .unwrap_or(0.0)
                .total_cmp(&b.parse::<f64>().unwrap_or(0.0))
        });
    }
    v
}

impl Schema {
    /// Infers a schema from a site's CSV: a column whose present values are all numbers is
    /// numeric, all boolean words boolean, anything else categorical with the values seen;
    /// a column with no value at all is ignored.
    pub fn infer(text: &str, path: &Path, label: &LabelColumn) -> Result<Schema, DataError> {
        let (names, rows) = rows(text, path)?;
        let label_idx = label_index(&names, label, path)?;
        let mut columns = Vec::new();
        for (c, name) in names.iter().enumerate() {
            if c == label_idx {
                continue;
            }
            let present: Vec<&str> = rows
                .iter()
                .map(|(_, f)| f[c].as_str())
                .filter(|v| !is_missing(v))
                .collect();
            let numbers: Vec<f64> = present
                .iter()
                .filter_map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite()))
                .collect();
            let mut bins = Vec::new();
            let kind = if present.is_empty() {
                ColumnType::Ignored
            } else if numbers.len() == present.len() {
                let (lo, hi) = numbers
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                        (a.min(x), b.max(x))
                    });
                bins = even_edges(lo, hi);
                ColumnType::Numeric
            } else if present.iter().all(|v| boolean(v).is_some()) {
                ColumnType::Boolean
            } else {
                let seen: BTreeSet<String> = present.iter().map(|v| v.to_string()).collect();
                ColumnType::Categorical {
                    categories: seen.into_iter().collect(),
                }
            };
            columns.push(Column {
                name: name.clone(),
                kind,
                bins,
            });
        }
        let mut labels = BTreeSet::new();
        for (ln, f) in &rows {
            let l = &f[label_idx];
            if is_missing(l) {
                return Err(bad(
                    path,
                    *ln,
                    format!("missing label in column {:?}", names[label_idx]),
                ));
            }
            labels.insert(l.clone());
        }
        Ok(Schema {
            label: names[label_idx].clone(),
            classes: sorted_classes(labels),
            columns,
        })
    }

    /// Checks the schema itself: names unique, at least one used column and two classes,
    /// categorical vocabularies non-empty and without repeats.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        for c in &self.columns {
            if !names.insert(c.name.as_str()) || c.name == self.label {
                return Err(format!("column {:?} is named twice", c.name));
            }
            if !c.bins.is_empty()
                && (c.kind != ColumnType::Numeric
                    || c.bins.iter().any(|e| !e.is_finite())
                    || c.bins.windows(2).any(|w| w[0] >= w[1]))
            {
                return Err(format!(
                    "column {:?}: bins are for numeric columns, finite and increasing",
                    c.name
                ));
            }
            if let ColumnType::Categorical { categories } = &c.kind {
                let unique: BTreeSet<&String> = categories.iter().collect();
                if categories.is_empty() || unique.len() != categories.len() {
                    return Err(format!(
                        "column {:?}: categories must be listed once each, at least one",
                        c.name
                    ));
                }
            }
        }
        if self.columns.iter().all(|c| c.kind == ColumnType::Ignored) {
            return Err("every column is ignored: nothing to learn from".into());
        }
        if self.classes.len() < 2 {
            return Err(format!(
                "label {:?} needs at least two classes, the schema has {:?}",
                self.label, self.classes
            ));
        }
        Ok(())
    }
}

fn label_index(names: &[String], label: &LabelColumn, path: &Path) -> Result<usize, DataError> {
    match label {
        LabelColumn::Name(n) => names.iter().position(|c| c == n).ok_or_else(|| {
            bad(
                path,
                1,
                format!(
                    "no column named {n:?} in the header (columns: {})",
                    names.join(", ")
                ),
            )
        }),
        LabelColumn::Index(i) if *i < names.len() => Ok(*i),
        LabelColumn::Index(i) => Err(bad(
            path,
            1,
            format!(
                "label column index {i} is out of range: {} columns",
                names.len()
            ),
        )),
        LabelColumn::Last => Ok(names.len() - 1),
    }
}

/// A categorical cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// Index into the column's declared categories.
    Known(u32),
    /// A value outside the declared vocabulary.
    Unknown,
}

/// One column's cells (`None`: missing).
#[derive(Debug, Clone, PartialEq)]
pub enum Cells {
    /// Numeric and boolean columns (booleans as 0 and 1).
    Values(Vec<Option<f64>>),
    Categories(Vec<Option<Category>>),
    Ignored,
}

/// A site's table read against a schema: raw cells, missing values kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub schema: Schema,
    /// One entry per schema column, in the schema's order.
    pub columns: Vec<Cells>,
    /// Class indices into `schema.classes`.
    pub labels: Vec<u32>,
}

/// A CSV text's rows as maps from header name to cell (unquoted, trimmed), read as
/// [`Table::parse`] reads a file: blank lines skipped, a row with another number of fields
/// than the header refused with its line.
pub fn csv_records(
    text: &str,
    path: &Path,
) -> Result<Vec<std::collections::BTreeMap<String, String>>, DataError> {
    let (names, rows) = rows(text, path)?;
    Ok(rows
        .into_iter()
        .map(|(_, fields)| names.iter().cloned().zip(fields).collect())
        .collect())
}

impl Table {
    /// Reads `text` against `schema`: every schema column and the label must be in the
    /// header (in any order; other columns are an error), every value must fit its column's
    /// type and every label must be one of the schema's classes. Errors name the column and
    /// the line.
    pub fn parse(text: &str, path: &Path, schema: &Schema) -> Result<Table, DataError> {
        let (names, rows) = rows(text, path)?;
        Self::from_rows(&names, &rows, path, schema)
    }

    /// Rows given as maps from column name to cell text (a JSON object a row, or a CSV row
    /// with its header), read against `schema` exactly as [`Self::parse`] reads a file: a
    /// column left out is missing; a name outside the schema is an error. Rows without the
    /// label get class 0 (their label is `None` in the second vector). `source` names them
    /// in errors (row `i` is "line" `i + 1`).
    pub fn from_records(
        records: &[std::collections::BTreeMap<String, String>],
        source: &Path,
        schema: &Schema,
    ) -> Result<(Table, Vec<Option<u32>>), DataError> {
        let mut names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        names.push(schema.label.clone());
        let mut labelled = Vec::with_capacity(records.len());
        let mut rows = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            if let Some(extra) = r.keys().find(|k| !names.contains(k)) {
                return Err(bad(
                    source,
                    i + 1,
                    format!("column {extra:?} is not in the model's schema"),
                ));
            }
            let label = r.get(&schema.label).filter(|l| !is_missing(l));
            labelled.push(label.is_some());
            let mut fields: Vec<String> = schema
                .columns
                .iter()
                .map(|c| r.get(&c.name).cloned().unwrap_or_default())
                .collect();
            fields.push(
                label
                    .cloned()
                    .or_else(|| schema.classes.first().cloned())
                    .unwrap_or_default(),
            );
            rows.push((i + 1, fields));
        }
        let table = Self::from_rows(&names, &rows, source, schema)?;
        let labels = table
            .labels
            .iter()
            .zip(labelled)
            .map(|(&l, known)| known.then_some(l))
            .collect();
        Ok((table, labels))
    }

    fn from_rows(
        names: &[String],
        rows: &[Row],
        path: &Path,
        schema: &Schema,
    ) -> Result<Table, DataError> {
        let position = |n: &str| names.iter().position(|c| c == n);
        let label_idx = position(&schema.label).ok_or_else(|| {
            bad(
                path,
                1,
                format!("the label column {:?} is missing", schema.label),
            )
        })?;
        let mut idx = Vec::with_capacity(schema.columns.len());
        for c in &schema.columns {
            idx.push(position(&c.name).ok_or_else(|| {
                bad(
                    path,
                    1,
                    format!("column {:?} of the job's schema is missing", c.name),
                )
            })?);
        }
        if let Some(extra) = names
            .iter()
            .find(|n| **n != schema.label && !schema.columns.iter().any(|c| &c.name == *n))
        {
            return Err(bad(
                path,
                1,
                format!(
                    "column {extra:?} is not in the job's schema (declare it, as \"ignored\" \
                     if it should not be used)"
                ),
            ));
        }
        let mut columns = Vec::with_capacity(schema.columns.len());
        for (c, &i) in schema.columns.iter().zip(&idx) {
            let cells = rows.iter().map(|(ln, f)| (*ln, f[i].as_str()));
            columns.push(match &c.kind {
                ColumnType::Ignored => Cells::Ignored,
                ColumnType::Numeric => Cells::Values(
                    cells
                        .map(|(ln, v)| {
                            if is_missing(v) {
                                return Ok(None);
                            }
                            match v.parse::<f64>() {
                                Ok(x) if x.is_finite() => Ok(Some(x)),
                                _ => Err(bad(
                                    path,
                                    ln,
                                    format!(
                                        "value {v:?} in numeric column {:?} is not a number",
                                        c.name
                                    ),
                                )),
                            }
                        })
                        .collect::<Result<_, _>>()?,
                ),
                ColumnType::Boolean => {
                    Cells::Values(
                        cells
                            .map(|(ln, v)| {
                                if is_missing(v) {
                                    return Ok(None);
                                }
                                boolean(v).map(|b| Some(f64::from(u8::from(b)))).ok_or_else(|| {
                                bad(
                                    path,
                                    ln,
                                    format!(
                                        "value {v:?} in boolean column {:?} is not true/false, \
                                         yes/no, y/n or t/f",
                                        c.name
                                    ),
                                )
                            })
                            })
                            .collect::<Result<_, _>>()?,
                    )
                }
                ColumnType::Categorical { categories } => {
                    let lookup: BTreeMap<&str, u32> = categories
                        .iter()
                        .enumerate()
                        .map(|(k, s)| (s.as_str(), k as u32))
                        .collect();
                    Cells::Categories(
                        cells
                            .map(|(_, v)| {
                                (!is_missing(v)).then(|| {
                                    lookup
                                        .get(v)
                                        .map_or(Category::Unknown, |&k| Category::Known(k))
                                })
                            })
                            .collect(),
                    )
                }
            });
        }
        let classes: BTreeMap<&str, u32> = schema
            .classes
            .iter()
            .enumerate()
            .map(|(k, s)| (s.as_str(), k as u32))
            .collect();
        let labels = rows
            .iter()
            .map(|(ln, f)| {
                let l = f[label_idx].as_str();
                classes.get(l).copied().ok_or_else(|| {
                    bad(
                        path,
                        *ln,
                        format!(
                            "label {l:?} in column {:?} is not one of the job's classes {:?}",
                            schema.label, schema.classes
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Table {
            schema: schema.clone(),
            columns,
            labels,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Row indices into training and held-out parts, stratified by label and seeded, as
    /// [`crate::Dataset::split_indices`] splits examples.
    pub fn split_indices(
        &self,
        test_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<usize>, Vec<usize>), DataError> {
        crate::data::stratified_split(&self.labels, self.schema.classes.len(), test_fraction, seed)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Table {
        let pick = |c: &Cells| match c {
            Cells::Values(v) => Cells::Values(indices.iter().map(|&i| v[i]).collect()),
            Cells::Categories(v) => Cells::Categories(indices.iter().map(|&i| v[i]).collect()),
            Cells::Ignored => Cells::Ignored,
        };
        Table {
            schema: self.schema.clone(),
            columns: self.columns.iter().map(pick).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

mod pipeline;
mod spec;
mod stats;
mod summary;

pub use pipeline::{Impute, Pipeline, PipelineOptions, Step, TransformReport};
pub use spec::DataSpec;
pub use stats::{CategoryStats, ColumnStats, NumericStats, TableStats};
pub use summary::{ColumnSummary, QUANTILES, quantiles};

#[cfg(test)]
mod tests;
