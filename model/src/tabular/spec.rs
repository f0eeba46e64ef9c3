//! What a job declares about its participants' tables (`[job.data]` in a job specification):
//! the schema every site's file is read against and how the federation's pipeline is fitted.

use serde::{Deserialize, Serialize};

use super::{Pipeline, PipelineOptions, Schema, TableStats};

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
