//! The simulated participants' data: the dataset loaded, partitioned among the participants
//! and split into training and held-out rows, from `DataSettings` alone, so that the
//! simulation and each of its worker processes prepare the same shares.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use cohort_model::data::{IdxSplit, load_idx_dir, parse_csv};
use cohort_model::tabular::{
    ColumnStats, ColumnType, DataSpec, Impute, Pipeline, PipelineOptions, Schema, Table, TableStats,
};
use cohort_model::{Dataset, FeatureShape, LabelColumn, Partition};
use cohort_participant::{LocalData, SiteData, SiteTables};
use serde::Serialize;

use super::{SimArgs, synthetic};

/// The bundled breast-cancer table (scikit-learn, BSD-3-Clause; see examples/data).
const BREAST_CANCER: &str = include_str!("../../examples/data/breast_cancer.csv");

/// What the participants' data is made from (the same settings give the same shares).
#[derive(Debug, Clone)]
pub(crate) struct DataSettings {
    pub(crate) participants: usize,
    pub(crate) seed: u64,
    pub(crate) dataset: Option<PathBuf>,
    pub(crate) label: String,
    pub(crate) partition: Partition,
    pub(crate) test_fraction: f64,
    pub(crate) preprocess: Preprocess,
    pub(crate) impute: Impute,
    pub(crate) missing_indicators: bool,
}

impl From<&SimArgs> for DataSettings {
    fn from(a: &SimArgs) -> Self {
        DataSettings {
            participants: a.participants,
            seed: a.seed,
            dataset: a.dataset.clone(),
            label: a.label.clone(),
            partition: a.partition,
            test_fraction: a.test_fraction,
            // Round 0's statistics are exact sums that differential privacy's ε does not
            // cover: with --dp each site prepares its own rows.
            preprocess: match (a.dp, a.preprocess) {
                (Some(_), Preprocess::Auto) => Preprocess::Site,
                (_, p) => p,
            },
            impute: if a.no_impute {
                Impute::Refuse
            } else {
                a.impute.unwrap_or_default()
            },
            missing_indicators: a.missing_indicators,
        }
    }
}

/// The data of each simulated participant, and where the pooled data for the baseline is.
pub(super) struct Prepared {
    pub(super) name: String,
    /// Each participant's data, shared with its agent or virtual participant (not copied):
    /// examples ready for the model, or (jobs with tables) its tables.
    pub(super) sites: Vec<SiteData>,
    /// Tables preprocessed by the federation: the job's schema and pipeline options (the
    /// pipeline itself is fitted from round 0's statistics).
    pub(super) spec: Option<DataSpec>,
    /// The model's input and its classes.
    pub(super) shape: FeatureShape,
    pub(super) classes: usize,
    pooled: Pooled,
    pub(super) standardize: bool,
    /// Each participant's rows of the source: (training rows, held-out rows).
    pub(super) shares: Shares,
}

/// The pooled raw training and held-out data, for the centralised baseline.
enum Pooled {
    Held(Box<(Dataset, Dataset)>),
    /// The participants' own (unstandardised) data, concatenated when asked for.
    Locals,
    /// The table and everyone's training and held-out rows, prepared by the pipeline.
    Table(Box<(Table, Vec<usize>, Vec<usize>)>),
}

impl Prepared {
    /// Each participant's examples ready for the model: tables prepared by `pipeline` (the
    /// federation's, from round 0).
    pub(super) fn locals(
        &self,
        pipeline: Option<&Pipeline>,
    ) -> anyhow::Result<Vec<Arc<LocalData>>> {
        self.sites
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                SiteData::Ready(l) => Ok(l.clone()),
                SiteData::Tables(t) => {
                    let p = pipeline.context("tables need the federation's pipeline")?;
                    Ok(Arc::new(
                        t.prepare(p)
                            .with_context(|| format!("participant {}", i + 1))?,
                    ))
                }
                SiteData::Csv(_) => bail!("participant {}: a table not read", i + 1),
            })
            .collect()
    }

    /// The pooled raw training and held-out data (tables prepared by `pipeline`, which a
    /// central party fitting on the pooled training rows would fit the same: the same sums).
    pub(super) fn pooled(&self, pipeline: Option<&Pipeline>) -> anyhow::Result<(Dataset, Dataset)> {
        Ok(match &self.pooled {
            Pooled::Held(both) => (both.0.clone(), both.1.clone()),
            Pooled::Locals => {
                let locals = self.locals(pipeline)?;
                let train: Vec<&Dataset> = locals.iter().map(|l| &l.train).collect();
                let test: Vec<&Dataset> = locals.iter().map(|l| &l.test).collect();
                (Dataset::concat(&train)?, Dataset::concat(&test)?)
            }
            Pooled::Table(t) => {
                let p = pipeline.context("tables need the federation's pipeline")?;
                let prepare = |rows: &[usize]| p.transform(&t.0.subset(rows)).map(|(d, _)| d);
                (prepare(&t.1)?, prepare(&t.2)?)
            }
        })
    }
}

/// Each participant's rows of the source data, for `--export-partition` (synthetic data:
/// rows of the participants' data concatenated in order).
#[derive(Debug, Serialize)]
pub(super) struct Shares {
    train: Vec<Vec<usize>>,
    test: Vec<Vec<usize>>,
}

/// The loaded source and how it is split, from which each participant's data is built.
enum Source {
    /// An IDX directory: the training set partitioned, the test set shared out.
    Idx {
        train: Dataset,
        test: Dataset,
        parts: Vec<Vec<usize>>,
        test_parts: Vec<Vec<usize>>,
    },
    /// A table: partitioned, then each share split into training and held-out rows.
    Table { ds: Dataset, parts: Vec<Vec<usize>> },
    /// LEAF's Synthetic(α, β): each participant's data generated for it.
    Synthetic(synthetic::Synthetic),
    /// A table with missing values or categories (or `--preprocess federation`): one
    /// pipeline for everyone, fitted from the participants' statistics summed in round 0.
    Tabular(Box<Tabular>),
}

/// A table read against its schema, and each participant's split.
struct Tabular {
    table: Table,
    /// Each participant's (training, held-out) rows.
    splits: Vec<(Vec<usize>, Vec<usize>)>,
    spec: DataSpec,
}

/// Below this many training rows a site on average, `--preprocess auto` takes the
/// federation's pipeline for numeric tables too: a site's own mean and spread over a few rows
/// are noise (100 sites of 4–5 rows: 0.835 held-out accuracy with their own, 0.975 with the
/// federation's).
const SMALL_SITE_ROWS: usize = 50;

/// How tables are preprocessed (`--preprocess`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preprocess {
    /// One pipeline from the federation's statistics when the table has missing values or
    /// non-numeric columns, or when sites hold fewer than 50 training rows on average;
    /// otherwise each site standardises with its own statistics.
    Auto,
    /// Each site standardises with its own training statistics (numeric tables only).
    Site,
    /// One pipeline for every site from the federation's statistics (imputation, one-hot
    /// encoding, standardisation).
    Federation,
}

impl Source {
    fn load(args: &DataSettings) -> anyhow::Result<(Source, String)> {
        let n = args.participants;
        if n == 0 {
            bail!("--participants must be at least 1");
        }
        if let Some(spec) = args
            .dataset
            .as_ref()
            .and_then(|d| d.to_str())
            .and_then(|d| d.strip_prefix("synthetic:"))
        {
            if args.partition != Partition::Iid {
                bail!(
                    "--partition {} does not apply to synthetic data: each participant's data \
                     is generated for it (skewed by α and β)",
                    args.partition
                );
            }
            let s = synthetic::Synthetic::parse(spec, args.seed)?;
            let name = format!("synthetic({spec}), LEAF-style, generated");
            return Ok((Source::Synthetic(s), name));
        }
        match &args.dataset {
            Some(dir) if dir.is_dir() => {
                let train = load_idx_dir(dir, IdxSplit::Train)?;
                let test = load_idx_dir(dir, IdxSplit::Test)?;
                let parts = cohort_model::partition(
                    &train.labels,
                    train.num_classes,
                    n,
                    args.partition,
                    args.seed,
                )?;
                // Each participant's held-out share of the test set: iid, or round-robin when
                // there are too few test images for two each (cross-device runs: 10,000
                // participants of Fashion-MNIST hold one test image each).
                let test_parts = if test.len() >= 2 * n {
                    cohort_model::partition(
                        &test.labels,
                        test.num_classes,
                        n,
                        Partition::Iid,
                        args.seed + 1,
                    )?
                } else if test.len() >= n {
                    (0..n)
                        .map(|p| (p..test.len()).step_by(n).collect())
                        .collect()
                } else {
                    bail!(
                        "{} test images are too few for {n} participants (at least one each)",
                        test.len()
                    );
                };
                let name = dir.display().to_string();
                Ok((
                    Source::Idx {
                        train,
                        test,
                        parts,
                        test_parts,
                    },
                    name,
                ))
            }
            source => {
                let label: LabelColumn = args.label.parse().expect("infallible");
                let (text, path, label, name) = match source {
                    Some(path) => (
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?,
                        path.clone(),
                        label,
                        path.display().to_string(),
                    ),
                    None => (
                        BREAST_CANCER.to_string(),
                        PathBuf::from("breast_cancer.csv (bundled)"),
                        LabelColumn::Name("diagnosis".into()),
                        "breast_cancer.csv (bundled, scikit-learn)".to_string(),
                    ),
                };
                let schema = Schema::infer(&text, &path, &label)?;
                let table = Table::parse(&text, &path, &schema)?;
                let raw = TableStats::of(&table);
                let needs_pipeline = schema
                    .columns
                    .iter()
                    .any(|c| !matches!(c.kind, ColumnType::Numeric | ColumnType::Ignored))
                    || raw.columns.iter().any(|c| match c {
                        ColumnStats::Numeric(n) => n.missing > 0.0,
                        _ => false,
                    });
                // Sites too small to standardise on their own rows.
                let small_sites = (table.len() as f64 * (1.0 - args.test_fraction))
                    < (SMALL_SITE_ROWS * n) as f64;
                let federation = match args.preprocess {
                    Preprocess::Federation => true,
                    Preprocess::Site if needs_pipeline => bail!(
                        "{name} has missing values or non-numeric columns, which only \
                         --preprocess federation handles (the default)"
                    ),
                    Preprocess::Site => false,
                    Preprocess::Auto => needs_pipeline || small_sites,
                };
                if !federation {
                    let ds = parse_csv(&text, &path, &label)?;
                    let parts = cohort_model::partition(
                        &ds.labels,
                        ds.num_classes,
                        n,
                        args.partition,
                        args.seed,
                    )?;
                    return Ok((Source::Table { ds, parts }, name));
                }
                let parts = cohort_model::partition(
                    &table.labels,
                    schema.classes.len(),
                    n,
                    args.partition,
                    args.seed,
                )?;
                // Each participant's split as in the numeric path; the federation's statistics
                // are summed from each participant's training rows in round 0.
                let mut splits = Vec::with_capacity(n);
                for (i, p) in parts.iter().enumerate() {
                    let labels: Vec<u32> = p.iter().map(|&r| table.labels[r]).collect();
                    let (tr, te) = cohort_model::data::stratified_split(
                        &labels,
                        schema.classes.len(),
                        args.test_fraction,
                        args.seed + i as u64,
                    )?;
                    let tr: Vec<usize> = tr.iter().map(|&r| p[r]).collect();
                    let te: Vec<usize> = te.iter().map(|&r| p[r]).collect();
                    splits.push((tr, te));
                }
                let spec = DataSpec {
                    schema,
                    options: PipelineOptions {
                        impute: args.impute,
                        missing_indicators: args.missing_indicators,
                    },
                };
                let name = format!(
                    "{name} (federation preprocessing: {} columns → {} features)",
                    spec.schema.columns.len(),
                    spec.width()
                );
                Ok((
                    Source::Tabular(Box::new(Tabular {
                        table,
                        splits,
                        spec,
                    })),
                    name,
                ))
            }
        }
    }

    /// Participant `i`'s data and its rows of the source (training, held out).
    fn local(
        &self,
        i: usize,
        args: &DataSettings,
    ) -> anyhow::Result<(SiteData, Vec<usize>, Vec<usize>)> {
        if let Source::Tabular(t) = self {
            let (tr, te) = &t.splits[i];
            let tables = SiteTables {
                train: t.table.subset(tr),
                test: t.table.subset(te),
            };
            return Ok((SiteData::Tables(Arc::new(tables)), tr.clone(), te.clone()));
        }
        let (local, tr, te) = match self {
            Source::Idx {
                train,
                test,
                parts,
                test_parts,
            } => (
                LocalData {
                    train: train.subset(&parts[i]),
                    test: test.subset(&test_parts[i]),
                    standardizer: None,
                },
                parts[i].clone(),
                test_parts[i].clone(),
            ),
            Source::Table { ds, parts } => {
                let p = &parts[i];
                let (tr, te) = ds
                    .subset(p)
                    .split_indices(args.test_fraction, args.seed + i as u64)?;
                let tr: Vec<usize> = tr.iter().map(|&r| p[r]).collect();
                let te: Vec<usize> = te.iter().map(|&r| p[r]).collect();
                (
                    LocalData::from_split(ds.subset(&tr), ds.subset(&te), true),
                    tr,
                    te,
                )
            }
            Source::Synthetic(s) => {
                let (train, test) = s.participant(i, args.test_fraction)?;
                let (a, b) = (train.len(), test.len());
                (
                    LocalData {
                        train,
                        test,
                        standardizer: None,
                    },
                    (0..a).collect(),
                    (0..b).collect(),
                )
            }
            Source::Tabular(_) => unreachable!("returned above"),
        };
        Ok((SiteData::Ready(Arc::new(local)), tr, te))
    }
}

/// Every participant's data, the pooled data and the shares.
pub(super) fn prepare(args: &DataSettings) -> anyhow::Result<Prepared> {
    let (source, name) = Source::load(args)?;
    let n = args.participants;
    let mut sites = Vec::with_capacity(n);
    let mut shares = Shares {
        train: Vec::with_capacity(n),
        test: Vec::with_capacity(n),
    };
    let (mut offset_train, mut offset_test) = (0, 0);
    for i in 0..n {
        let (site, mut tr, mut te) = source.local(i, args)?;
        if let SiteData::Ready(local) = &site
            && matches!(source, Source::Synthetic(_))
        {
            // Rows of the concatenation of everyone's generated data.
            tr.iter_mut().for_each(|r| *r += offset_train);
            te.iter_mut().for_each(|r| *r += offset_test);
            offset_train += local.train.len();
            offset_test += local.test.len();
        }
        shares.train.push(tr);
        shares.test.push(te);
        sites.push(site);
    }
    let (shape, classes) = match (&source, &sites[0]) {
        (Source::Tabular(t), _) => (
            FeatureShape::Flat(t.spec.width()),
            t.spec.schema.classes.len(),
        ),
        (_, SiteData::Ready(l)) => (l.train.shape, l.train.num_classes),
        _ => unreachable!("only tables wait for a pipeline"),
    };
    let (pooled, standardize, spec) = match source {
        Source::Idx { train, test, .. } => (Pooled::Held(Box::new((train, test))), false, None),
        Source::Table { ds, .. } => (
            Pooled::Held(Box::new((
                ds.subset(&shares.train.concat()),
                ds.subset(&shares.test.concat()),
            ))),
            true,
            None,
        ),
        Source::Synthetic(_) => (Pooled::Locals, false, None),
        Source::Tabular(t) => {
            let t = *t;
            let rows = |k: usize| -> Vec<usize> {
                t.splits
                    .iter()
                    .flat_map(|s| if k == 0 { &s.0 } else { &s.1 })
                    .copied()
                    .collect()
            };
            let (train, test) = (rows(0), rows(1));
            (
                Pooled::Table(Box::new((t.table, train, test))),
                false,
                Some(t.spec),
            )
        }
    };
    Ok(Prepared {
        name,
        sites,
        spec,
        shape,
        classes,
        pooled,
        standardize,
        shares,
    })
}

/// The data of participants `range` only (a simulation worker's shard), built as
/// [`prepare`] builds theirs.
pub(super) fn prepare_shard(
    args: &DataSettings,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<SiteData>> {
    let (source, _) = Source::load(args)?;
    range.map(|i| Ok(source.local(i, args)?.0)).collect()
}
