//! The participant's data: split, and standardised with its own training statistics only.

use super::*;

/// This participant's data, split and standardised locally.
#[derive(Debug, Clone)]
pub struct LocalData {
    pub train: Dataset,
    pub test: Dataset,
    /// Statistics fitted on `train` (and applied to both), if standardising.
    pub standardizer: Option<Standardizer>,
}

impl LocalData {
    /// Holds out `test_fraction` (stratified, seeded) and, if `standardize`, fits a
    /// standardiser on the training part only.
    pub fn prepare(
        data: Dataset,
        test_fraction: f64,
        standardize: bool,
        seed: u64,
    ) -> Result<Self, cohort_model::DataError> {
        let (train, test) = data.split(test_fraction, seed)?;
        if train.is_empty() {
            return Err(cohort_model::DataError::Invalid(
                "no training examples left after the test split".into(),
            ));
        }
        Ok(Self::from_split(train, test, standardize))
    }

    /// Uses a given train/test split; if `standardize`, fits on `train` and applies to both.
    pub fn from_split(mut train: Dataset, mut test: Dataset, standardize: bool) -> Self {
        let standardizer = standardize.then(|| {
            let s = Standardizer::fit(&train);
            s.apply(&mut train);
            s.apply(&mut test);
            s
        });
        LocalData {
            train,
            test,
            standardizer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_model::FeatureShape;

    /// 40 rows of two features (the second on a large scale), two balanced classes.
    fn table() -> Dataset {
        let features = (0..40)
            .flat_map(|i| [i as f32, 1000.0 + 10.0 * (i % 7) as f32])
            .collect();
        let labels = (0..40).map(|i| (i % 2) as u32).collect();
        Dataset::new(features, labels, FeatureShape::Flat(2), 2).unwrap()
    }

    #[test]
    fn standardises_both_splits_with_the_training_statistics_only() {
        let raw = table();
        let d = LocalData::prepare(raw.clone(), 0.25, true, 3).unwrap();
        let (train, test) = raw.split(0.25, 3).unwrap();
        assert_eq!((d.train.len(), d.test.len()), (train.len(), test.len()));
        let s = d.standardizer.as_ref().unwrap();
        assert_eq!(
            *s,
            Standardizer::fit(&train),
            "fitted on the training rows only"
        );
        for (i, row) in d.test.features.chunks(2).enumerate() {
            for (j, v) in row.iter().enumerate() {
                let expected = (test.row(i)[j] - s.mean[j]) / s.std[j];
                assert!((v - expected).abs() < 1e-5);
            }
        }
        let mean0: f32 = d.train.features.iter().step_by(2).sum::<f32>() / d.train.len() as f32;
        assert!(mean0.abs() < 1e-4, "training mean {mean0}");
        let plain = LocalData::prepare(raw, 0.25, false, 3).unwrap();
        assert!(plain.standardizer.is_none());
        assert_eq!(
            plain.test.features, test.features,
            "unchanged without standardising"
        );
    }

    #[test]
    fn a_split_that_leaves_no_training_rows_is_refused() {
        let e = LocalData::prepare(table(), 0.99, true, 1).unwrap_err();
        assert!(e.to_string().contains("no training examples"), "{e}");
    }
}
