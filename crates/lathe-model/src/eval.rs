//! Evaluation of a served model on a labelled data set: accuracy, per-class precision and
//! recall, and the confusion matrix.

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::engine::{Engine, EngineError};

/// Precision, recall and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The class label.
    pub label: String,
    /// Of the rows predicted as this class, the share that are it (0 when none are).
    pub precision: f64,
    /// Of the rows of this class, the share predicted as it (0 when there are none).
    pub recall: f64,
    /// The number of rows of this class.
    pub support: u32,
}

/// How a model did on one data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The share of rows predicted correctly (0 for an empty data set).
    pub accuracy: f64,
    /// One entry per class, in class-index order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true_class][predicted_class]` row counts.
    pub confusion: Vec<Vec<u32>>,
}

impl Evaluation {
    /// The metrics of predictions against true labels, for `class_labels.len()` classes.
    /// Labels or predictions outside that range are ignored by the per-class counts but
    /// count as wrong in the accuracy.
    pub fn from_predictions(labels: &[u32], predicted: &[usize], class_labels: &[String]) -> Self {
        let n_classes = class_labels.len();
        let mut confusion = vec![vec![0u32; n_classes]; n_classes];
        let mut correct = 0usize;
        for (&truth, &guess) in labels.iter().zip(predicted) {
            let truth = truth as usize;
            if truth == guess {
                correct += 1;
            }
            if truth < n_classes && guess < n_classes {
                confusion[truth][guess] += 1;
            }
        }
        let per_class = (0..n_classes)
            .map(|c| {
                let true_positives = f64::from(confusion[c][c]);
                let support: u32 = confusion[c].iter().sum();
                let predicted: u32 = confusion.iter().map(|row| row[c]).sum();
                ClassMetrics {
                    label: class_labels[c].clone(),
                    precision: ratio(true_positives, f64::from(predicted)),
                    recall: ratio(true_positives, f64::from(support)),
                    support,
                }
            })
            .collect();
        Evaluation {
            accuracy: ratio(correct as f64, labels.len() as f64),
            per_class,
            confusion,
        }
    }
}

/// `a / b`, or 0 when `b` is 0 (scikit-learn's `zero_division=0`).
fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

/// Evaluates `engine` on `data`, whose features are raw: the engine standardises them.
///
/// A data set whose feature count differs from the engine's, or that holds non-finite
/// values, cannot be evaluated; use [`try_evaluate`] to get that as an error. `evaluate`
/// reports it as an evaluation with accuracy 0 so a caller that already validated the data
/// need not handle an impossible error.
pub fn evaluate(engine: &Engine, data: &Dataset) -> Evaluation {
    match try_evaluate(engine, data) {
        Ok(evaluation) => evaluation,
        Err(_) => Evaluation::from_predictions(
            &data.labels,
            &vec![usize::MAX; data.rows()],
            engine.class_labels(),
        ),
    }
}

/// Evaluates `engine` on `data` (raw features), or says why the data does not fit it.
pub fn try_evaluate(engine: &Engine, data: &Dataset) -> Result<Evaluation, EngineError> {
    if data.n_features != engine.n_features() {
        return Err(EngineError::FeatureCount {
            expected: engine.n_features(),
            got: data.n_features,
        });
    }
    let predicted = engine.classes_batch(&data.features, data.rows())?;
    Ok(Evaluation::from_predictions(
        &data.labels,
        &predicted,
        engine.class_labels(),
    ))
}
