//! The simulated participants' data: the dataset loaded, partitioned among the participants
//! and split into training and held-out rows, from [`DataSettings`] alone, so that the
//! simulation and each of its worker processes prepare the same shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use cohort_model::data::{IdxSplit, load_csv, load_idx_dir, parse_csv};
use cohort_model::{Dataset, LabelColumn, Partition};
use cohort_participant::LocalData;
use serde::Serialize;

use super::SimArgs;

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
        }
    }
}

/// The data of each simulated participant, plus the pooled raw splits for the baseline.
pub(super) struct Prepared {
    pub(super) name: String,
    /// Each participant's data, shared with its agent or virtual participant (not copied).
    pub(super) locals: Vec<Arc<LocalData>>,
    pub(super) pooled_train: Dataset,
    pub(super) pooled_test: Dataset,
    pub(super) standardize: bool,
    /// Each participant's rows of the source: (training rows, held-out rows).
    pub(super) shares: Shares,
}

/// Each participant's rows of the source data, for `--export-partition`.
#[derive(Debug, Serialize)]
pub(super) struct Shares {
    train: Vec<Vec<usize>>,
    test: Vec<Vec<usize>>,
}

pub(super) fn prepare(args: &DataSettings) -> anyhow::Result<Prepared> {
    let n = args.participants;
    if n == 0 {
        bail!("--participants must be at least 1");
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
            let locals = parts
                .iter()
                .zip(&test_parts)
                .map(|(p, t)| {
                    Arc::new(LocalData {
                        train: train.subset(p),
                        test: test.subset(t),
                        standardizer: None,
                    })
                })
                .collect();
            Ok(Prepared {
                name: dir.display().to_string(),
                locals,
                pooled_train: train,
                pooled_test: test,
                standardize: false,
                shares: Shares {
                    train: parts,
                    test: test_parts,
                },
            })
        }
        source => {
            let label: LabelColumn = args.label.parse().expect("infallible");
            let (ds, name) = match source {
                Some(path) => (load_csv(path, &label)?, path.display().to_string()),
                None => (
                    parse_csv(
                        BREAST_CANCER,
                        Path::new("breast_cancer.csv (bundled)"),
                        &LabelColumn::Name("diagnosis".into()),
                    )?,
                    "breast_cancer.csv (bundled, scikit-learn)".to_string(),
                ),
            };
            let parts =
                cohort_model::partition(&ds.labels, ds.num_classes, n, args.partition, args.seed)?;
            let mut locals = Vec::with_capacity(n);
            let (mut trains, mut tests) = (Vec::new(), Vec::new());
            let mut shares = Shares {
                train: Vec::with_capacity(n),
                test: Vec::with_capacity(n),
            };
            for (i, p) in parts.iter().enumerate() {
                let (tr, te) = ds
                    .subset(p)
                    .split_indices(args.test_fraction, args.seed + i as u64)?;
                shares.train.push(tr.iter().map(|&r| p[r]).collect());
                shares.test.push(te.iter().map(|&r| p[r]).collect());
                let (tr, te) = (
                    ds.subset(shares.train.last().unwrap()),
                    ds.subset(shares.test.last().unwrap()),
                );
                trains.push(tr.clone());
                tests.push(te.clone());
                locals.push(Arc::new(LocalData::from_split(tr, te, true)));
            }
            Ok(Prepared {
                name,
                locals,
                pooled_train: Dataset::concat(&trains.iter().collect::<Vec<_>>())?,
                pooled_test: Dataset::concat(&tests.iter().collect::<Vec<_>>())?,
                standardize: true,
                shares,
            })
        }
    }
}
