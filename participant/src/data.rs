//! The participant's data: split, and standardised with its own training statistics only.

use super::*;
use cohort_model::tabular::{DataSpec, Pipeline, Table};

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

/// A site's table read against its job's schema, split into training and held-out rows,
/// before the federation's pipeline exists (jobs with tables): round 0 sums its training
/// rows' statistics, and the pipeline fitted from the federation's prepares both splits.
#[derive(Debug, Clone)]
pub struct SiteTables {
    pub train: Table,
    pub test: Table,
}

impl SiteTables {
    /// Reads `text` against `spec`'s schema (a mismatch names the column and line) and holds
    /// out `test_fraction` of the rows (stratified by label, seeded).
    pub fn read(
        text: &str,
        path: &std::path::Path,
        spec: &DataSpec,
        test_fraction: f64,
        seed: u64,
    ) -> Result<SiteTables, cohort_model::DataError> {
        let table = Table::parse(text, path, &spec.schema)?;
        let (train, test) = table.split_indices(test_fraction, seed)?;
        if train.is_empty() {
            return Err(cohort_model::DataError::Invalid(format!(
                "{}: no training rows left after the test split",
                path.display()
            )));
        }
        Ok(SiteTables {
            train: table.subset(&train),
            test: table.subset(&test),
        })
    }

    /// Both splits prepared by the federation's pipeline.
    pub fn prepare(&self, pipeline: &Pipeline) -> Result<LocalData, cohort_model::DataError> {
        Ok(LocalData {
            train: pipeline.transform(&self.train)?.0,
            test: pipeline.transform(&self.test)?.0,
            standardizer: None,
        })
    }
}

/// A site's CSV file as it is on disk, read against its job's schema when the job's first
/// task names it (a file that does not match is refused, naming the column and line).
#[derive(Debug, Clone)]
pub struct SiteCsv {
    pub text: String,
    pub path: std::path::PathBuf,
    pub test_fraction: f64,
    pub seed: u64,
}

impl SiteCsv {
    pub fn read(&self, spec: &DataSpec) -> Result<SiteTables, cohort_model::DataError> {
        SiteTables::read(&self.text, &self.path, spec, self.test_fraction, self.seed)
    }

    /// Data rows (lines after the header that are not blank), announced when joining.
    pub fn rows(&self) -> u64 {
        self.text
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count() as u64
    }
}

/// What a participant holds.
#[derive(Debug, Clone)]
pub enum SiteData {
    /// Examples ready for the model (images; numeric tables standardised locally).
    Ready(Arc<LocalData>),
    /// A table read against the job's schema, waiting for its job's pipeline.
    Tables(Arc<SiteTables>),
    /// A table file not read yet: the job's schema comes with its first task.
    Csv(Arc<SiteCsv>),
}

impl SiteData {
    /// Training examples (rows), announced when joining; for a file not read yet, all of its
    /// rows.
    pub fn examples(&self) -> u64 {
        match self {
            SiteData::Ready(d) => d.train.len() as u64,
            SiteData::Tables(t) => t.train.len() as u64,
            SiteData::Csv(c) => c.rows(),
        }
    }
}

/// Why the node's data is not ready for a task.
#[derive(Debug)]
pub enum NotReady {
    /// This site's file does not fit the job (its schema, or its pipeline's strict mode):
    /// the node cannot take part in the job, and says why naming the column and line.
    Data(cohort_model::DataError),
    /// The task itself is wrong; refused, and the node goes on.
    Task(Status),
}

/// The node's data as its job's tasks make it ready: a table file read against the job's
/// schema once, and prepared once by each pipeline the job sends.
pub struct Held {
    data: SiteData,
    tables: Option<Arc<SiteTables>>,
    /// The pipeline and the examples it prepared.
    prepared: Option<(Arc<Pipeline>, Arc<LocalData>)>,
    /// The last pipeline received as JSON, parsed.
    received: Option<(String, Arc<Pipeline>)>,
}

impl Held {
    pub fn new(data: SiteData) -> Held {
        Held {
            data,
            tables: None,
            prepared: None,
            received: None,
        }
    }

    pub fn examples(&self) -> u64 {
        self.data.examples()
    }

    /// This site's tables, read against `spec`'s schema.
    pub fn tables(&mut self, spec: &DataSpec) -> Result<Arc<SiteTables>, NotReady> {
        match &self.data {
            SiteData::Ready(_) => Err(NotReady::Task(Status::aborted(
                "this job declares its tables, but this node holds prepared examples: give it \
                 its table with format = \"table\"",
            ))),
            SiteData::Tables(t) if t.train.schema != spec.schema => {
                Err(NotReady::Data(cohort_model::DataError::Invalid(
                    "this site's table was read against another schema than the job's".into(),
                )))
            }
            SiteData::Tables(t) => Ok(t.clone()),
            SiteData::Csv(c) => {
                if let Some(t) = &self.tables
                    && t.train.schema == spec.schema
                {
                    return Ok(t.clone());
                }
                let t = Arc::new(c.read(spec).map_err(NotReady::Data)?);
                self.tables = Some(t.clone());
                Ok(t)
            }
        }
    }

    /// Examples ready for the model: as given, or prepared by the job's pipeline
    /// (`pipeline_json` as a task carries it; empty in jobs without tables).
    pub(crate) fn ready(&mut self, pipeline_json: &str) -> Result<Arc<LocalData>, NotReady> {
        if pipeline_json.is_empty() {
            return self.ready_with(None);
        }
        let pipeline = match &self.received {
            Some((json, p)) if json == pipeline_json => p.clone(),
            _ => {
                let p: Arc<Pipeline> =
                    Arc::new(serde_json::from_str(pipeline_json).map_err(|e| {
                        NotReady::Task(Status::invalid_argument(format!(
                            "the task's pipeline: {e}"
                        )))
                    })?);
                self.received = Some((pipeline_json.to_string(), p.clone()));
                p
            }
        };
        self.ready_with(Some(&pipeline))
    }

    /// Examples ready for the model: as given, or prepared by `pipeline` (once for each
    /// pipeline).
    pub fn ready_with(
        &mut self,
        pipeline: Option<&Arc<Pipeline>>,
    ) -> Result<Arc<LocalData>, NotReady> {
        let Some(pipeline) = pipeline else {
            return match &self.data {
                SiteData::Ready(d) => Ok(d.clone()),
                _ => Err(NotReady::Task(Status::aborted(
                    "this node holds a table, but the job sent no pipeline to prepare it with",
                ))),
            };
        };
        if let Some((p, d)) = &self.prepared
            && (Arc::ptr_eq(p, pipeline) || **p == **pipeline)
        {
            return Ok(d.clone());
        }
        let spec = DataSpec {
            schema: pipeline.schema.clone(),
            options: Default::default(),
        };
        let tables = self.tables(&spec)?;
        let d = Arc::new(tables.prepare(pipeline).map_err(NotReady::Data)?);
        self.prepared = Some((pipeline.clone(), d.clone()));
        Ok(d)
    }
}

impl From<Arc<SiteCsv>> for SiteData {
    fn from(c: Arc<SiteCsv>) -> Self {
        SiteData::Csv(c)
    }
}

impl From<Arc<LocalData>> for SiteData {
    fn from(d: Arc<LocalData>) -> Self {
        SiteData::Ready(d)
    }
}

impl From<Arc<SiteTables>> for SiteData {
    fn from(t: Arc<SiteTables>) -> Self {
        SiteData::Tables(t)
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
