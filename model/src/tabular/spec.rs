//! What a job declares about its participants' tables (`[job.data]` in a job specification):
//! the schema every site's file is read against and how the federation's pipeline is fitted.

use serde::{Deserialize, Serialize};

use super::{ColumnType, Pipeline, PipelineOptions, Schema, TableStats};
use crate::layers::Layer;

/// A job's tables: their schema and the pipeline's options. Every site reads its file against
/// the schema (a mismatch names the column and line, and the site is not admitted); the
/// federation's statistics (round 0) are summed in the schema's layout; the pipeline fitted
/// from them prepares every row the job's models see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub schema: Schema,
    #[serde(default)]
    pub options: PipelineOptions,
}

impl DataSpec {
    /// Checks the schema (see [`Schema::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        self.schema.validate()
    }

    /// The model's input width (see [`Pipeline::width_for`]).
    pub fn width(&self) -> usize {
        Pipeline::width_for(&self.schema, self.options)
    }

    /// Fills in `offset` and `categories` of every embedding layer of `layers` that names a
    /// column, from where the pipeline puts that column's one-hot block. Such layers come
    /// first in the stack, where the row is still the table's columns (each one embedding
    /// one column, and moving the blocks after it by `dim − categories`). An error names the
    /// layer and the column.
    pub fn resolve_embeddings(&self, layers: &mut [Layer]) -> Result<(), String> {
        let ind = usize::from(self.options.missing_indicators);
        // Each used column: its name, its categories while not yet embedded, its width now.
        let mut blocks: Vec<(&str, &ColumnType, Option<usize>, usize)> = self
            .schema
            .columns
            .iter()
            .filter_map(|c| match &c.kind {
                ColumnType::Ignored => None,
                ColumnType::Categorical { categories } => Some((
                    c.name.as_str(),
                    &c.kind,
                    Some(categories.len()),
                    categories.len() + ind,
                )),
                kind => Some((c.name.as_str(), kind, None, 1 + ind)),
            })
            .collect();
        let mut leading = true;
        for (k, layer) in layers.iter_mut().enumerate() {
            let Layer::Embedding {
                dim,
                column: Some(column),
                offset,
                categories,
            } = layer
            else {
                leading = false;
                continue;
            };
            let at = |e: String| format!("layer {k} (embedding): {e}");
            if !leading {
                return Err(at(format!(
                    "column {column:?}: an embedding by column comes before every other layer, \
                     where the row is still the table's columns"
                )));
            }
            let Some(i) = blocks.iter().position(|b| b.0 == column.as_str()) else {
                let categorical: Vec<&str> = self
                    .schema
                    .columns
                    .iter()
                    .filter(|c| matches!(c.kind, ColumnType::Categorical { .. }))
                    .map(|c| c.name.as_str())
                    .collect();
                return Err(at(format!(
                    "no used column {column:?} in the table schema (its categorical columns: {})",
                    if categorical.is_empty() {
                        "none".to_string()
                    } else {
                        categorical.join(", ")
                    }
                )));
            };
            let (_, kind, cats, width) = blocks[i];
            let Some(cats) = cats else {
                return Err(at(match kind {
                    ColumnType::Categorical { .. } => {
                        format!("column {column:?} is embedded by an earlier layer already")
                    }
                    ColumnType::Boolean => format!("column {column:?} is boolean, not categorical"),
                    _ => format!("column {column:?} is numeric, not categorical"),
                }));
            };
            *offset = blocks[..i].iter().map(|b| b.3).sum();
            *categories = cats;
            blocks[i].2 = None;
            blocks[i].3 = width - cats + *dim;
        }
        Ok(())
    }

    /// Statistics a site contributes: the length of [`TableStats::to_values`] for the schema.
    pub fn statistics_len(&self) -> usize {
        TableStats::empty(&self.schema).to_values().len()
    }

    /// The pipeline fitted from the federation's summed statistics (`values` in the layout of
    /// [`TableStats::to_values`]).
    pub fn fit(&self, values: &[f64]) -> Result<(TableStats, Pipeline), String> {
        let stats = TableStats::from_values(&self.schema, values)?;
        let pipeline = Pipeline::fit(&self.schema, &stats, self.options)?;
        Ok((stats, pipeline))
    }
}
