//! `cohort schema`: a job's `[data]` section inferred from one site's table, to paste into the
//! job specification (docs/tabular.md). Every site's file is then read against it.

use std::path::PathBuf;

use anyhow::Context;
use cohort_model::LabelColumn;
use cohort_model::tabular::{DataSpec, Impute, PipelineOptions, Schema};

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// A site's CSV table (with a header line).
    pub file: PathBuf,
    /// The label column: a name, a 0-based index, or "last".
    #[arg(long, default_value = "last")]
    pub label: String,
    /// Refuse missing values instead of imputing them (strict mode).
    #[arg(long, conflicts_with = "impute")]
    pub no_impute: bool,
    /// How missing values are filled: mean, most-frequent, constant:VALUE or refuse.
    #[arg(long)]
    pub impute: Option<Impute>,
    /// Add a 0/1 feature after every column, set where the value was missing.
    #[arg(long)]
    pub missing_indicators: bool,
    /// Print the section for coordinator.toml's `[job]` (`[job.data.…]`) instead of a
    /// stand-alone job specification (`[data.…]`).
    #[arg(long)]
    pub in_coordinator_toml: bool,
}

/// The `[data]` section for `a.file` and the model input width it gives.
pub fn section(a: &SchemaArgs) -> anyhow::Result<(String, usize)> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let label: LabelColumn = a.label.parse().expect("infallible");
    let schema = Schema::infer(&text, &a.file, &label)?;
    schema.validate().map_err(anyhow::Error::msg)?;
    let spec = DataSpec {
        schema,
        options: PipelineOptions {
            impute: if a.no_impute {
                Impute::Refuse
            } else {
                a.impute.unwrap_or_default()
            },
            missing_indicators: a.missing_indicators,
        },
    };
    #[derive(serde::Serialize)]
    struct Data<'a> {
        data: &'a DataSpec,
    }
    #[derive(serde::Serialize)]
    struct Job<'a> {
        job: Data<'a>,
    }
    let toml = if a.in_coordinator_toml {
        toml::to_string(&Job {
            job: Data { data: &spec },
        })
    } else {
        toml::to_string(&Data { data: &spec })
    }?;
    let width = spec.width();
    let header = format!(
        "# Inferred from {} ({} columns). Every site's table is read against this schema;\n\
         # categories outside a vocabulary count as unknown. The job's model takes {width}\n\
         # inputs and {} classes.\n",
        a.file.display(),
        spec.schema.columns.len(),
        spec.schema.classes.len()
    );
    Ok((header + &toml, width))
}
