//! In-memory datasets and the loaders for the real formats: CSV tables and IDX image files
//! (raw or gzipped), plus standardisation and seeded stratified splits.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;

use crate::DataError;

/// The shape of one example's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FeatureShape {
    /// A row of `d` numeric features.
    Flat(usize),
    /// An image, channels × height × width.
    Image {
        channels: usize,
        height: usize,
        width: usize,
    },
}

impl FeatureShape {
    /// Number of f32 values per example.
    pub fn len(&self) -> usize {
        match *self {
            FeatureShape::Flat(d) => d,
            FeatureShape::Image {
                channels,
                height,
                width,
            } => channels * height * width,
        }
    }

    /// True when an example has no features at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A labelled dataset held in memory, features row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len() * shape.len()` values, one example after another.
    pub features: Vec<f32>,
    /// Class index of each example, `< num_classes`.
    pub labels: Vec<u32>,
    pub shape: FeatureShape,
    pub num_classes: usize,
    /// Names of the classes, index = class id (from the file where it has them).
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Builds a dataset, checking that the parts agree.
    pub fn new(
        features: Vec<f32>,
        labels: Vec<u32>,
        shape: FeatureShape,
        num_classes: usize,
    ) -> Result<Self, DataError> {
        let d = shape.len();
        if d == 0 || features.len() != labels.len() * d {
            return Err(DataError::Invalid(format!(
                "{} feature values do not make {} examples of {} features",
                features.len(),
                labels.len(),
                d
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= num_classes) {
            return Err(DataError::Invalid(format!(
                "label {bad} is not below the class count {num_classes}"
            )));
        }
        Ok(Dataset {
            features,
            labels,
            shape,
            num_classes,
            class_names: (0..num_classes).map(|c| c.to_string()).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features of example `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        let d = self.shape.len();
        &self.features[i * d..(i + 1) * d]
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let d = self.shape.len();
        let mut features = Vec::with_capacity(indices.len() * d);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            features,
            labels,
            shape: self.shape,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
        }
    }

    /// All examples of `parts`, concatenated (they must share shape and classes).
    pub fn concat(parts: &[&Dataset]) -> Result<Dataset, DataError> {
        let first = parts
            .first()
            .ok_or_else(|| DataError::Invalid("nothing to concatenate".into()))?;
        let mut out = Dataset {
            features: Vec::new(),
            labels: Vec::new(),
            shape: first.shape,
            num_classes: first.num_classes,
            class_names: first.class_names.clone(),
        };
        for p in parts {
            if p.shape != first.shape || p.num_classes != first.num_classes {
                return Err(DataError::Invalid(
                    "datasets to concatenate differ in shape or classes".into(),
                ));
            }
            out.features.extend_from_slice(&p.features);
            out.labels.extend_from_slice(&p.labels);
        }
        Ok(out)
    }

    /// Count of examples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.num_classes];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// Seeded, stratified split: about `test_fraction` of each class goes to the second set.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset), DataError> {
        let (train, test) = self.split_indices(test_fraction, seed)?;
        Ok((self.subset(&train), self.subset(&test)))
    }

    /// The row indices [`Self::split`] puts in each set, in that order.
    pub fn split_indices(
        &self,
        test_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<usize>, Vec<usize>), DataError> {
        stratified_split(&self.labels, self.num_classes, test_fraction, seed)
    }
}

/// Indices of examples labelled `labels` (each below `num_classes`) into training and
/// held-out parts: `test_fraction` of each class held out, seeded, shuffled.
pub fn stratified_split(
    labels: &[u32],
    num_classes: usize,
    test_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), DataError> {
    if !(0.0..1.0).contains(&test_fraction) {
        return Err(DataError::Invalid(format!(
            "test fraction {test_fraction} is not in [0, 1)"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for mut idx in by_class {
        idx.shuffle(&mut rng);
        let n_test = (idx.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        train.extend_from_slice(&idx[n_test..]);
    }
    train.shuffle(&mut rng);
    test.shuffle(&mut rng);
    Ok((train, test))
}

/// Which CSV column holds the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    Name(String),
    Index(usize),
    /// The last column.
    Last,
}

impl std::str::FromStr for LabelColumn {
    type Err = std::convert::Infallible;
    /// A number is a zero-based column index, `last` the last column, anything else a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "last" {
            LabelColumn::Last
        } else if let Ok(i) = s.parse::<usize>() {
            LabelColumn::Index(i)
        } else {
            LabelColumn::Name(s.to_string())
        })
    }
}

fn unquote(field: &str) -> &str {
    let f = field.trim();
    f.strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(f)
}

/// Loads a CSV table with a header line of column names. Every column but the label must be
/// numeric. Label values that are all non-negative integers are class ids; otherwise each
/// distinct value becomes a class, numbered in sorted order.
///
/// Errors name the file, the line and the column of the first bad value.
pub fn load_csv(path: &Path, label: &LabelColumn) -> Result<Dataset, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    parse_csv(&text, path, label)
}

/// Parses CSV text (see [`load_csv`]); `path` is only used in error messages.
pub fn parse_csv(text: &str, path: &Path, label: &LabelColumn) -> Result<Dataset, DataError> {
    let bad = |line: usize, message: String| DataError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let (hline, header) = lines
        .next()
        .ok_or_else(|| bad(1, "the file is empty; expected a header line".into()))?;
    let names: Vec<String> = header.split(',').map(|s| unquote(s).to_string()).collect();
    let label_idx = match label {
        LabelColumn::Name(n) => names.iter().position(|c| c == n).ok_or_else(|| {
            bad(
                hline,
                format!(
                    "no column named {n:?} in the header (columns: {})",
                    names.join(", ")
                ),
            )
        })?,
        LabelColumn::Index(i) if *i < names.len() => *i,
        LabelColumn::Index(i) => {
            return Err(bad(
                hline,
                format!(
                    "label column index {i} is out of range: the header has {} columns",
                    names.len()
                ),
            ));
        }
        LabelColumn::Last => names.len() - 1,
    };
    if names.len() < 2 {
        return Err(bad(
            hline,
            "the header has fewer than two columns (features and a label)".into(),
        ));
    }
    let d = names.len() - 1;
    let mut features = Vec::new();
    let mut raw_labels = Vec::new();
    for (ln, line) in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != names.len() {
            return Err(bad(
                ln,
                format!(
                    "{} fields, but the header has {} columns",
                    fields.len(),
                    names.len()
                ),
            ));
        }
        for (c, f) in fields.iter().enumerate() {
            let f = unquote(f);
            if c == label_idx {
                if f.is_empty() {
                    return Err(bad(ln, format!("missing label in column {:?}", names[c])));
                }
                raw_labels.push(f.to_string());
                continue;
            }
            if f.is_empty() {
                return Err(bad(ln, format!("missing value in column {:?}", names[c])));
            }
            let v: f32 = f.parse().map_err(|_| {
                bad(
                    ln,
                    format!("value {f:?} in column {:?} is not a number", names[c]),
                )
            })?;
            if !v.is_finite() {
                return Err(bad(
                    ln,
                    format!("value {f:?} in column {:?} is not finite", names[c]),
                ));
            }
            features.push(v);
        }
    }
    if raw_labels.is_empty() {
        return Err(bad(hline, "the file has a header but no data rows".into()));
    }
    let as_ints: Option<Vec<u32>> = raw_labels.iter().map(|l| l.parse::<u32>().ok()).collect();
    let (labels, class_names) = match as_ints {
        Some(ints) => {
            let k = *ints.iter().max().unwrap_or(&0) as usize + 1;
            (ints, (0..k).map(|c| c.to_string()).collect::<Vec<_>>())
        }
        None => {
            let classes: BTreeMap<&str, u32> = raw_labels
                .iter()
                .map(|s| s.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .enumerate()
                .map(|(i, s)| (s, i as u32))
                .collect();
            let labels = raw_labels.iter().map(|l| classes[l.as_str()]).collect();
            (labels, classes.keys().map(|s| s.to_string()).collect())
        }
    };
    if class_names.len() < 2 {
        return Err(bad(
            hline,
            format!(
                "the label column {:?} has fewer than two classes",
                names[label_idx]
            ),
        ));
    }
    let mut ds = Dataset::new(features, labels, FeatureShape::Flat(d), class_names.len())?;
    ds.class_names = class_names;
    Ok(ds)
}

/// Which half of an IDX dataset directory to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxSplit {
    Train,
    Test,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Parse {
                path: path.to_path_buf(),
                line: 0,
                message: format!("gzip stream is corrupt: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes; returns its dimensions and data.
fn parse_idx_u8(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |message: String| DataError::Parse {
        path: path.to_path_buf(),
        line: 0,
        message,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(bad("IDX header is truncated".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header != n {
        return Err(bad(format!(
            "IDX dimensions {dims:?} need {n} data bytes, the file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Loads an IDX image file and its label file (each raw or gzipped). Pixels are scaled to
/// [0, 1]. Ten classes are assumed unless the labels need more.
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let (idims, pixels) = parse_idx_u8(&read_maybe_gz(images)?, images)?;
    let (ldims, lbytes) = parse_idx_u8(&read_maybe_gz(labels)?, labels)?;
    let parse_err = |path: &Path, message: String| DataError::Parse {
        path: path.to_path_buf(),
        line: 0,
        message,
    };
    if idims.len() != 3 {
        return Err(parse_err(
            images,
            format!("expected 3 dimensions (count, rows, columns), found {idims:?}"),
        ));
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(parse_err(
            labels,
            format!("{} labels for {} images", ldims[0], idims[0]),
        ));
    }
    let classes = (*lbytes.iter().max().unwrap_or(&9) as usize + 1).max(10);
    let features = pixels.iter().map(|&p| p as f32 / 255.0).collect();
    let shape = FeatureShape::Image {
        channels: 1,
        height: idims[1],
        width: idims[2],
    };
    Dataset::new(
        features,
        lbytes.iter().map(|&l| l as u32).collect(),
        shape,
        classes,
    )
}

/// Loads the train or test half of an MNIST-style directory (`train-images-idx3-ubyte[.gz]`,
/// `train-labels-idx1-ubyte[.gz]`, `t10k-…`), as shipped by Debian's dataset-fashion-mnist.
pub fn load_idx_dir(dir: &Path, split: IdxSplit) -> Result<Dataset, DataError> {
    let prefix = match split {
        IdxSplit::Train => "train",
        IdxSplit::Test => "t10k",
    };
    let find = |stem: String| -> Result<PathBuf, DataError> {
        for name in [format!("{stem}.gz"), stem.clone()] {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(DataError::Invalid(format!(
            "{} has no {stem} or {stem}.gz (an MNIST-style IDX directory is expected)",
            dir.display()
        )))
    };
    load_idx(
        &find(format!("{prefix}-images-idx3-ubyte"))?,
        &find(format!("{prefix}-labels-idx1-ubyte"))?,
    )
}

/// Per-feature standardisation (zero mean, unit variance), fitted on one party's data.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Fits the statistics of `data`; a constant feature gets a scale of 1.
    pub fn fit(data: &Dataset) -> Standardizer {
        let d = data.shape.len();
        let n = data.len().max(1) as f64;
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for i in 0..data.len() {
            for (j, &v) in data.row(i).iter().enumerate() {
                mean[j] += v as f64;
                sq[j] += (v as f64) * (v as f64);
            }
        }
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                if var.sqrt() < 1e-12 {
                    1.0
                } else {
                    var.sqrt() as f32
                }
            })
            .collect();
        Standardizer {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }

    /// Applies the fitted statistics in place.
    pub fn apply(&self, data: &mut Dataset) {
        let d = self.mean.len();
        for row in data.features.chunks_mut(d) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) / self.std[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str, label: &str) -> Result<Dataset, DataError> {
        parse_csv(text, Path::new("t.csv"), &label.parse().unwrap())
    }

    #[test]
    fn csv_by_name_and_index() {
        let ds = csv("a,y,b\n1,0,2\n3,1,4\n", "y").unwrap();
        assert_eq!(ds.features, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ds.labels, vec![0, 1]);
        assert_eq!(ds.shape, FeatureShape::Flat(2));
        assert_eq!(csv("a,y,b\n1,0,2\n3,1,4\n", "1").unwrap(), ds);
        let last = csv("a,b,y\n1,2,0\n3,4,1\n", "last").unwrap();
        assert_eq!(last.features, ds.features);
    }

    #[test]
    fn csv_string_labels_become_sorted_classes() {
        let ds = csv("x,d\n1,M\n2,B\n3,M\n", "d").unwrap();
        assert_eq!(ds.labels, vec![1, 0, 1]);
        assert_eq!(ds.class_names, vec!["B", "M"]);
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let e = csv("a,y\n1,0\n,1\n", "y").unwrap_err().to_string();
        assert!(e.contains("t.csv:3") && e.contains("missing value") && e.contains("\"a\""));
        let e = csv("a,y\n1,0\nx1,1\n", "y").unwrap_err().to_string();
        assert!(e.contains("t.csv:3") && e.contains("not a number"), "{e}");
        let e = csv("a,y\n1,0\n1,0,5\n", "y").unwrap_err().to_string();
        assert!(e.contains("t.csv:3") && e.contains("3 fields"), "{e}");
        let e = csv("a,y\n1,0\n", "z").unwrap_err().to_string();
        assert!(e.contains("no column named \"z\""), "{e}");
        let e = csv("a,y\n1,0\n2,0\n", "y").unwrap_err().to_string();
        assert!(e.contains("fewer than two classes"), "{e}");
        assert!(csv("", "y").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn bundled_breast_cancer_table_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/breast_cancer.csv");
        let ds = load_csv(&p, &LabelColumn::Name("diagnosis".into())).unwrap();
        assert_eq!(ds.len(), 569);
        assert_eq!(ds.shape, FeatureShape::Flat(30));
        assert_eq!(ds.class_counts(), vec![212, 357]);
    }

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn idx_raw_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let img = idx_bytes(&[2, 2, 2], &[0, 255, 51, 102, 1, 2, 3, 4]);
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &img).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx_bytes(&[2], &[3, 7])).unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        let ds = load_idx_dir(dir.path(), IdxSplit::Test).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.labels, vec![3, 7]);
        assert_eq!(&ds.row(0)[..2], &[0.0, 1.0]);
        assert_eq!(ds.num_classes, 10);
        let e = load_idx_dir(dir.path(), IdxSplit::Train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    }

    #[test]
    fn idx_truncated_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, idx_bytes(&[3, 2, 2], &[0; 11])).unwrap();
        let e = load_idx(&p, &p).unwrap_err().to_string();
        assert!(e.contains("need 12 data bytes"), "{e}");
    }

    #[test]
    fn split_is_stratified_and_seeded() {
        let labels: Vec<u32> = (0..100).map(|i| (i % 4 == 0) as u32).collect();
        let ds = Dataset::new(
            (0..100).map(|i| i as f32).collect(),
            labels,
            FeatureShape::Flat(1),
            2,
        )
        .unwrap();
        let (tr, te) = ds.split(0.2, 7).unwrap();
        assert_eq!((tr.len(), te.len()), (80, 20));
        assert_eq!(te.class_counts(), vec![15, 5]);
        assert_eq!(ds.split(0.2, 7).unwrap().1, te);
        assert_ne!(ds.split(0.2, 8).unwrap().1, te);
        let mut all: Vec<f32> = tr.features.iter().chain(&te.features).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, ds.features);
    }

    #[test]
    fn standardizer_centres_and_scales() {
        let mut ds = Dataset::new(
            vec![1.0, 5.0, 3.0, 5.0],
            vec![0, 1],
            FeatureShape::Flat(2),
            2,
        )
        .unwrap();
        let s = Standardizer::fit(&ds);
        assert_eq!(s.mean, vec![2.0, 5.0]);
        assert_eq!(s.std, vec![1.0, 1.0]);
        s.apply(&mut ds);
        assert_eq!(ds.features, vec![-1.0, 0.0, 1.0, 0.0]);
    }
}
