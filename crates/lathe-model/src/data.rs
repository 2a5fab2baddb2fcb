//! Datasets: the built-in digits, CSV and IDX parsing, seeded stratified splits, and the
//! standardiser fitted on the training split.
//!
//! Every parser reports bad input as a [`DataError`] whose message names the row, the column
//! or the field that is wrong and why; nothing here panics on user data.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// The built-in data sets, as `(name, train CSV, test CSV)`. The files are embedded so that a
/// job naming `builtin:digits` needs no download and no file on the worker.
const BUILTINS: &[(&str, &[u8], &[u8])] = &[(
    "digits",
    include_bytes!("../../../data/digits_train.csv"),
    include_bytes!("../../../data/digits_test.csv"),
)];

/// The label column of the built-in CSV files.
const BUILTIN_LABEL_COLUMN: &str = "label";

/// Everything that can be wrong with a data set or a split request.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DataError {
    /// The name given to [`builtin`] is not one of the embedded data sets.
    #[error("unknown built-in dataset {name:?}: the built-ins are {available}")]
    UnknownBuiltin { name: String, available: String },
    /// The CSV input has no header row at all.
    #[error("the CSV file is empty: a header row naming the columns is required")]
    Empty,
    /// The CSV has a header but no data row.
    #[error("the CSV file has a header but no data rows")]
    NoRows,
    /// The CSV has a label column but no feature column.
    #[error("the CSV file has no feature columns besides the label column {label_column:?}")]
    NoFeatures { label_column: String },
    /// The requested label column is not in the header.
    #[error("label column {label_column:?} not found; the columns are {found:?}")]
    LabelColumnMissing {
        label_column: String,
        found: Vec<String>,
    },
    /// The label column name appears more than once in the header.
    #[error("label column {label_column:?} appears {count} times in the header")]
    LabelColumnAmbiguous { label_column: String, count: usize },
    /// A data row has a different number of fields than the header.
    #[error("data row {row}: expected {expected} fields (as in the header), found {found}")]
    RaggedRow {
        row: usize,
        expected: usize,
        found: usize,
    },
    /// A feature cell does not parse as a number.
    #[error("data row {row}, column {column:?}: {value:?} is not a number")]
    NotANumber {
        row: usize,
        column: String,
        value: String,
    },
    /// A feature cell parses but is NaN or infinite, which training cannot use.
    #[error("data row {row}, column {column:?}: {value:?} is not a finite number")]
    NonFinite {
        row: usize,
        column: String,
        value: String,
    },
    /// A label cell is empty.
    #[error("data row {row}, column {column:?}: the label is empty")]
    EmptyLabel { row: usize, column: String },
    /// The CSV reader could not read a row (for example invalid UTF-8).
    #[error("data row {row}: {reason}")]
    Csv { row: usize, reason: String },
    /// An IDX file starts with the wrong magic number.
    #[error("IDX {file} file: magic number is {found:#010x}, expected {expected:#010x}")]
    IdxBadMagic {
        file: &'static str,
        expected: u32,
        found: u32,
    },
    /// An IDX file is shorter than its header says.
    #[error("IDX {file} file is truncated: {expected} bytes needed, {found} present")]
    IdxTruncated {
        file: &'static str,
        expected: usize,
        found: usize,
    },
    /// An IDX file has bytes after the data its header announces.
    #[error("IDX {file} file has {extra} unexpected bytes after the data")]
    IdxTrailingBytes { file: &'static str, extra: usize },
    /// The IDX image and label files disagree on the number of items.
    #[error("IDX files disagree: {images} images but {labels} labels")]
    IdxCountMismatch { images: usize, labels: usize },
    /// An IDX image file declares images of zero pixels.
    #[error("IDX images file declares {rows}x{columns} images, which have no pixels")]
    IdxNoPixels { rows: usize, columns: usize },
    /// A split fraction is out of range.
    #[error("{field} must be a finite number in [0, 1), got {value}")]
    BadFraction { field: &'static str, value: f32 },
    /// The validation and test fractions together leave nothing to train on.
    #[error(
        "validation_fraction ({validation}) + test_fraction ({test}) must be below 1 to leave training rows"
    )]
    FractionsTooLarge { validation: f32, test: f32 },
    /// The given test set does not have the training data's number of features.
    #[error("test set has {found} features but the training data has {expected}")]
    TestFeatureCount { expected: usize, found: usize },
    /// The given test set names a feature column differently from the training data.
    #[error("test set feature {index} is named {found:?} but the training data's is {expected:?}")]
    TestFeatureName {
        index: usize,
        expected: String,
        found: String,
    },
    /// The test set has a class label that the training data never shows.
    #[error(
        "test set class label {label:?} does not occur in the training data (classes: {known:?})"
    )]
    UnknownTestLabel { label: String, known: Vec<String> },
    /// A split or dataset ended up with no training rows.
    #[error("the training split is empty")]
    EmptyTrainSplit,
}

/// A classification data set held in memory: row-major `f32` features and class indices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    /// Feature values, row-major, `rows() × n_features` long. Raw values: preprocessing is
    /// applied by the trainer and the engine, never stored here.
    pub features: Vec<f32>,
    /// One class index per row, indexing `class_labels`.
    pub labels: Vec<u32>,
    /// The number of feature columns; the row stride of `features`.
    pub n_features: usize,
    /// One name per feature column, in column order (the CSV header without the label).
    pub feature_names: Vec<String>,
    /// The class label strings; class index `i` means `class_labels[i]`.
    pub class_labels: Vec<String>,
}

impl Dataset {
    /// The number of rows (examples).
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The features of row `i`. Panics if `i >= rows()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.n_features..(i + 1) * self.n_features]
    }

    /// The number of classes (the length of `class_labels`), whether or not every class has
    /// a row in this particular data set.
    pub fn n_classes(&self) -> usize {
        self.class_labels.len()
    }

    /// A new data set with the given rows of this one, in the given order, sharing its
    /// column names and class labels.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            features,
            labels,
            n_features: self.n_features,
            feature_names: self.feature_names.clone(),
            class_labels: self.class_labels.clone(),
        }
    }

    /// How many rows each class has, indexed like `class_labels`.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.n_classes()];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(label as usize) {
                *count += 1;
            }
        }
        counts
    }
}

/// The names of the embedded data sets, for help texts and error messages.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(name, _, _)| *name).collect()
}

/// Loads an embedded data set as `(train, test)`.
///
/// `"digits"` is the UCI optical digits set (8×8 pixels, values 0–16, 10 classes) in the
/// scikit-learn 80/20 stratified split the PyTorch peer uses: 1 437 train rows, 360 test rows.
pub fn builtin(name: &str) -> Result<(Dataset, Dataset), DataError> {
    let Some((_, train, test)) = BUILTINS.iter().find(|(n, _, _)| *n == name) else {
        return Err(DataError::UnknownBuiltin {
            name: name.to_string(),
            available: builtin_names().join(", "),
        });
    };
    let train = parse_csv(train, BUILTIN_LABEL_COLUMN)?;
    let test = parse_csv(test, BUILTIN_LABEL_COLUMN)?;
    // The two files are parsed separately, so their class lists are aligned here the same
    // way a user-supplied test set is.
    let test = align_test_set(&train, test)?;
    Ok((train, test))
}

/// Parses a CSV file with a header row. `label_column` names the class column, which may be
/// at any position; every other column must be numeric and becomes a feature.
///
/// Class labels are the distinct label strings, sorted numerically when all of them are
/// integers and lexicographically otherwise. Row numbers in errors count data rows from 1
/// (the header is not a data row).
pub fn parse_csv(bytes: &[u8], label_column: &str) -> Result<Dataset, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        // Ragged rows are reported by us, with the row number and both counts.
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);

    let header = reader
        .headers()
        .map_err(|e| DataError::Csv {
            row: 0,
            reason: format!("cannot read the header: {e}"),
        })?
        .clone();
    if header.is_empty() || (header.len() == 1 && header.get(0) == Some("")) {
        return Err(DataError::Empty);
    }
    let columns: Vec<String> = header.iter().map(str::to_string).collect();
    let label_positions: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, name)| name.as_str() == label_column)
        .map(|(i, _)| i)
        .collect();
    let label_index = match label_positions.as_slice() {
        [] => {
            return Err(DataError::LabelColumnMissing {
                label_column: label_column.to_string(),
                found: columns,
            });
        }
        [index] => *index,
        many => {
            return Err(DataError::LabelColumnAmbiguous {
                label_column: label_column.to_string(),
                count: many.len(),
            });
        }
    };
    let n_features = columns.len() - 1;
    if n_features == 0 {
        return Err(DataError::NoFeatures {
            label_column: label_column.to_string(),
        });
    }
    let feature_names: Vec<String> = columns
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != label_index)
        .map(|(_, name)| name.clone())
        .collect();

    let mut features = Vec::new();
    let mut label_strings: Vec<String> = Vec::new();
    let mut record = csv::StringRecord::new();
    let mut row = 0;
    loop {
        row += 1;
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                return Err(DataError::Csv {
                    row,
                    reason: e.to_string(),
                });
            }
        }
        if record.len() != columns.len() {
            return Err(DataError::RaggedRow {
                row,
                expected: columns.len(),
                found: record.len(),
            });
        }
        for (column_index, cell) in record.iter().enumerate() {
            if column_index == label_index {
                if cell.is_empty() {
                    return Err(DataError::EmptyLabel {
                        row,
                        column: label_column.to_string(),
                    });
                }
                label_strings.push(cell.to_string());
                continue;
            }
            let value: f32 = cell.parse().map_err(|_| DataError::NotANumber {
                row,
                column: columns[column_index].clone(),
                value: cell.to_string(),
            })?;
            if !value.is_finite() {
                return Err(DataError::NonFinite {
                    row,
                    column: columns[column_index].clone(),
                    value: cell.to_string(),
                });
            }
            features.push(value);
        }
    }
    if label_strings.is_empty() {
        return Err(DataError::NoRows);
    }

    let class_labels = sorted_class_labels(label_strings.iter().map(String::as_str));
    let index_of: BTreeMap<&str, u32> = class_labels
        .iter()
        .enumerate()
        .map(|(i, label)| (label.as_str(), i as u32))
        .collect();
    let labels = label_strings
        .iter()
        .map(|label| index_of[label.as_str()])
        .collect();
    Ok(Dataset {
        features,
        labels,
        n_features,
        feature_names,
        class_labels,
    })
}

/// The distinct labels, sorted numerically when every one is an integer (so "10" follows
/// "9") and lexicographically otherwise.
fn sorted_class_labels<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let distinct: std::collections::BTreeSet<&str> = labels.collect();
    let integers: Option<Vec<(i128, &str)>> = distinct
        .iter()
        .map(|label| label.parse::<i128>().ok().map(|n| (n, *label)))
        .collect();
    match integers {
        Some(mut numbered) => {
            // Ties ("1" and "01") are broken by the string so the order is still total.
            numbered.sort();
            numbered.into_iter().map(|(_, s)| s.to_string()).collect()
        }
        None => distinct.into_iter().map(str::to_string).collect(),
    }
}

/// The IDX magic number for an unsigned-byte tensor of rank 3 (images).
const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// The IDX magic number for an unsigned-byte tensor of rank 1 (labels).
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads the big-endian `u32` at `offset`, or reports the file as truncated.
fn read_be_u32(bytes: &[u8], offset: usize, file: &'static str) -> Result<u32, DataError> {
    bytes
        .get(offset..offset + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(DataError::IdxTruncated {
            file,
            expected: offset + 4,
            found: bytes.len(),
        })
}

/// Checks that `bytes` holds exactly `expected` bytes.
fn check_idx_length(bytes: &[u8], expected: usize, file: &'static str) -> Result<(), DataError> {
    match bytes.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(DataError::IdxTruncated {
            file,
            expected,
            found: bytes.len(),
        }),
        std::cmp::Ordering::Greater => Err(DataError::IdxTrailingBytes {
            file,
            extra: bytes.len() - expected,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Parses the MNIST IDX format: an images file (magic `0x00000803`, dimensions n × rows ×
/// columns, one unsigned byte per pixel) and a labels file (magic `0x00000801`, n bytes).
///
/// Features are the pixel values as `f32` (0–255, not scaled); feature names are `p0`,
/// `p1`, … in row-major pixel order; class labels are the distinct label values present,
/// sorted numerically.
pub fn parse_idx(images: &[u8], labels: &[u8]) -> Result<Dataset, DataError> {
    let image_magic = read_be_u32(images, 0, "images")?;
    if image_magic != IDX_IMAGES_MAGIC {
        return Err(DataError::IdxBadMagic {
            file: "images",
            expected: IDX_IMAGES_MAGIC,
            found: image_magic,
        });
    }
    let label_magic = read_be_u32(labels, 0, "labels")?;
    if label_magic != IDX_LABELS_MAGIC {
        return Err(DataError::IdxBadMagic {
            file: "labels",
            expected: IDX_LABELS_MAGIC,
            found: label_magic,
        });
    }
    let n_images = read_be_u32(images, 4, "images")? as usize;
    let rows = read_be_u32(images, 8, "images")? as usize;
    let columns = read_be_u32(images, 12, "images")? as usize;
    let n_labels = read_be_u32(labels, 4, "labels")? as usize;
    if n_images != n_labels {
        return Err(DataError::IdxCountMismatch {
            images: n_images,
            labels: n_labels,
        });
    }
    let pixels = rows.saturating_mul(columns);
    if pixels == 0 {
        return Err(DataError::IdxNoPixels { rows, columns });
    }
    let image_bytes = n_images
        .checked_mul(pixels)
        .and_then(|n| n.checked_add(16))
        .unwrap_or(usize::MAX);
    check_idx_length(images, image_bytes, "images")?;
    check_idx_length(labels, n_labels.saturating_add(8), "labels")?;
    if n_images == 0 {
        return Err(DataError::NoRows);
    }

    let raw_labels = &labels[8..];
    let mut present = [false; 256];
    for &label in raw_labels {
        present[label as usize] = true;
    }
    let mut index_of = [0u32; 256];
    let mut class_labels = Vec::new();
    for (value, _) in present.iter().enumerate().filter(|(_, p)| **p) {
        index_of[value] = class_labels.len() as u32;
        class_labels.push(value.to_string());
    }
    Ok(Dataset {
        features: images[16..].iter().map(|&p| f32::from(p)).collect(),
        labels: raw_labels.iter().map(|&l| index_of[l as usize]).collect(),
        n_features: pixels,
        feature_names: (0..pixels).map(|i| format!("p{i}")).collect(),
        class_labels,
    })
}

/// The three parts a job trains, selects and reports on. All three share the training
/// data's `class_labels` and `feature_names`, so a class index means the same everywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    /// Rows the optimiser sees; the standardiser is fitted on these only.
    pub train: Dataset,
    /// Rows for early stopping and model selection, drawn from the training part.
    pub validation: Dataset,
    /// Held-out rows for the reported accuracy.
    pub test: Dataset,
}

/// Checks that a split fraction is finite and in `[0, 1)`.
fn check_fraction(field: &'static str, value: f32) -> Result<(), DataError> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(DataError::BadFraction { field, value })
    }
}

/// Re-expresses a separately parsed test set in the training data's class indices, after
/// checking that its columns match.
fn align_test_set(train: &Dataset, mut test: Dataset) -> Result<Dataset, DataError> {
    if test.n_features != train.n_features {
        return Err(DataError::TestFeatureCount {
            expected: train.n_features,
            found: test.n_features,
        });
    }
    if !train.feature_names.is_empty() && !test.feature_names.is_empty() {
        for (index, (expected, found)) in train
            .feature_names
            .iter()
            .zip(&test.feature_names)
            .enumerate()
        {
            if expected != found {
                return Err(DataError::TestFeatureName {
                    index,
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
        }
    }
    let mut mapping = Vec::with_capacity(test.class_labels.len());
    for label in &test.class_labels {
        match train.class_labels.iter().position(|l| l == label) {
            Some(index) => mapping.push(index as u32),
            None => {
                return Err(DataError::UnknownTestLabel {
                    label: label.clone(),
                    known: train.class_labels.clone(),
                });
            }
        }
    }
    for label in &mut test.labels {
        // A label index outside the test set's own class list cannot be mapped; it can
        // only come from a hand-built Dataset, and it is reported like an unknown label.
        *label = *mapping
            .get(*label as usize)
            .ok_or_else(|| DataError::UnknownTestLabel {
                label: format!("#{label}"),
                known: train.class_labels.clone(),
            })?;
    }
    test.class_labels = train.class_labels.clone();
    test.feature_names = train.feature_names.clone();
    Ok(test)
}

/// Splits `data` into train, validation and test parts, stratified by class and
/// deterministic for a given `seed`.
///
/// When `test` is given it is the test set as-is (its columns must match and its class
/// labels must all occur in `data`; they are re-indexed onto `data`'s) and `test_fraction`
/// is not used. The validation part is always drawn from the training part. Per class,
/// `round(count × fraction)` rows go to each held-out part, but every class keeps at least
/// one training row. Rows keep their original order within each part.
pub fn split(
    data: Dataset,
    test: Option<Dataset>,
    validation_fraction: f32,
    test_fraction: f32,
    seed: u64,
) -> Result<Splits, DataError> {
    check_fraction("validation_fraction", validation_fraction)?;
    let test_fraction = if test.is_some() { 0.0 } else { test_fraction };
    check_fraction("test_fraction", test_fraction)?;
    if validation_fraction + test_fraction >= 1.0 {
        return Err(DataError::FractionsTooLarge {
            validation: validation_fraction,
            test: test_fraction,
        });
    }
    let given_test = test.map(|t| align_test_set(&data, t)).transpose()?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.n_classes()];
    for (row, &label) in data.labels.iter().enumerate() {
        if let Some(rows) = by_class.get_mut(label as usize) {
            rows.push(row);
        }
    }
    let (mut train_rows, mut validation_rows, mut test_rows) = (Vec::new(), Vec::new(), Vec::new());
    for mut rows in by_class {
        rows.shuffle(&mut rng);
        let count = rows.len();
        let held_out_cap = count.saturating_sub(1);
        let n_test = ((count as f64 * f64::from(test_fraction)).round() as usize).min(held_out_cap);
        let n_validation = ((count as f64 * f64::from(validation_fraction)).round() as usize)
            .min(held_out_cap - n_test);
        test_rows.extend_from_slice(&rows[..n_test]);
        validation_rows.extend_from_slice(&rows[n_test..n_test + n_validation]);
        train_rows.extend_from_slice(&rows[n_test + n_validation..]);
    }
    if train_rows.is_empty() {
        return Err(DataError::EmptyTrainSplit);
    }
    train_rows.sort_unstable();
    validation_rows.sort_unstable();
    test_rows.sort_unstable();
    Ok(Splits {
        train: data.subset(&train_rows),
        validation: data.subset(&validation_rows),
        test: match given_test {
            Some(test) => test,
            None => data.subset(&test_rows),
        },
    })
}

/// Per-column standardisation `(x - mean) / scale`, fitted on the training split only.
///
/// It matches scikit-learn's `StandardScaler` as the PyTorch peer uses it: the population
/// standard deviation, and a scale of 1 for columns that are constant in the training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    /// The training mean of each feature column.
    pub mean: Vec<f32>,
    /// The training population standard deviation of each column (1 where it is zero).
    pub scale: Vec<f32>,
}

impl Standardizer {
    /// Fits the standardiser on `data` (pass the training split). Sums run in `f64` so a
    /// large data set does not lose precision.
    pub fn fit(data: &Dataset) -> Standardizer {
        let n_features = data.n_features;
        let n = data.rows().max(1) as f64;
        let mut sum = vec![0f64; n_features];
        for row in data.features.chunks_exact(n_features.max(1)) {
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += f64::from(x);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let mut squares = vec![0f64; n_features];
        for row in data.features.chunks_exact(n_features.max(1)) {
            for ((s, &x), m) in squares.iter_mut().zip(row).zip(&mean) {
                let d = f64::from(x) - m;
                *s += d * d;
            }
        }
        let scale = squares
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let variance = s / n;
                // scikit-learn's constant-feature test: a variance within the rounding
                // error of the mean counts as zero, and the column is left unscaled.
                let bound = n * f64::EPSILON * variance + (n * m * f64::EPSILON).powi(2);
                if variance <= bound {
                    1.0
                } else {
                    variance.sqrt() as f32
                }
            })
            .collect();
        Standardizer {
            mean: mean.iter().map(|&m| m as f32).collect(),
            scale,
        }
    }

    /// The number of columns this standardiser expects.
    pub fn n_features(&self) -> usize {
        self.mean.len()
    }

    /// Standardises one row in place. The row should have `n_features()` values; extra
    /// values are left as they are.
    pub fn apply(&self, row: &mut [f32]) {
        for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.scale) {
            *x = (*x - m) / s;
        }
    }

    /// The standardised copy of all of `data`'s features, row-major.
    pub fn transform(&self, data: &Dataset) -> Vec<f32> {
        let mut features = data.features.clone();
        for row in features.chunks_exact_mut(data.n_features.max(1)) {
            self.apply(row);
        }
        features
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_labels_sort_numerically_and_others_lexicographically() {
        let labels = sorted_class_labels(["10", "9", "1"].into_iter());
        assert_eq!(labels, ["1", "9", "10"]);
        let labels = sorted_class_labels(["b", "10", "a"].into_iter());
        assert_eq!(labels, ["10", "a", "b"]);
    }

    #[test]
    fn constant_columns_get_scale_one() {
        let data = Dataset {
            features: vec![1.0, 5.0, 1.0, 7.0],
            labels: vec![0, 0],
            n_features: 2,
            feature_names: vec!["a".into(), "b".into()],
            class_labels: vec!["x".into()],
        };
        let s = Standardizer::fit(&data);
        assert_eq!(s.mean, [1.0, 6.0]);
        assert_eq!(s.scale, [1.0, 1.0]);
        let mut row = [1.0, 8.0];
        s.apply(&mut row);
        assert_eq!(row, [0.0, 2.0]);
    }
}
