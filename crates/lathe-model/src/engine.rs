//! The inference engine the deployer serves: a hand-written forward pass over an artifact's
//! weights, without burn, sized for single requests and for batches.
//!
//! At load, the artifact's standardiser is folded into the first layer
//! (`w' = w / scale`, `b' = b - Σ w · mean / scale`), so a request pays nothing for
//! preprocessing. Every weight is laid out `[in][out]` for the crate's private `kernels`
//! module: a single row then runs as broadcast-multiply-adds over weight rows, skipping the
//! rows of zero inputs, which measured 2.7 µs against 5.1 µs for dot products over
//! `[out][in]` rows (64-256-128-10, AVX-512); batches go through a GEMM.

use std::cell::RefCell;

use crate::artifact::{Artifact, ArtifactError, TensorData};
use crate::kernels::{self, RowScratch};

thread_local! {
    /// Per-thread scratch for single-row requests: activations of two consecutive layers
    /// and the kernel's list of non-zero inputs, kept between calls so a request allocates
    /// nothing but its answer.
    static ROW_SCRATCH: RefCell<(Vec<f32>, Vec<f32>, RowScratch)> = RefCell::default();
}

/// Rows per GEMM call in the batch path: the hidden activations of a chunk stay in the L2
/// cache instead of streaming the whole batch through memory once per layer.
const BATCH_CHUNK_ROWS: usize = 256;

/// Why the engine could not load a model or answer a request.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The artifact is inconsistent.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// A layer uses a storage this engine cannot run.
    #[error("layer {layer} {tensor} is stored as {kind}, which this engine cannot run")]
    UnsupportedTensor {
        layer: usize,
        tensor: &'static str,
        kind: &'static str,
    },
    /// A request row has the wrong number of features.
    #[error("expected {expected} features, got {got}")]
    FeatureCount { expected: usize, got: usize },
    /// A batch's value count is not `n_rows × n_features`.
    #[error("a batch of {n_rows} rows of {n_features} features needs {expected} values, got {got}")]
    BatchShape {
        n_rows: usize,
        n_features: usize,
        expected: usize,
        got: usize,
    },
    /// A feature value is NaN or infinite.
    #[error("row {row}, feature {feature} ({name}): {value} is not a finite number")]
    NonFinite {
        row: usize,
        feature: usize,
        name: String,
        value: String,
    },
}

/// The engine's answer for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The index of the most probable class (into [`Engine::class_labels`]).
    pub class: usize,
    /// The softmax probability of each class.
    pub probabilities: Vec<f32>,
}

/// One linear layer ready to run.
#[derive(Debug, Clone)]
struct Layer {
    /// Inputs (the previous layer's outputs, or the raw features).
    n_in: usize,
    /// Outputs.
    n_out: usize,
    /// The weight, `[n_in][n_out]` row-major (transposed from the artifact's `[out][in]`;
    /// see `kernels` for why), with the standardiser folded into the first layer.
    wt: Vec<f32>,
    /// The bias, with the standardiser's shift folded into the first layer's.
    bias: Vec<f32>,
}

/// A loaded model. It is immutable, `Send` and `Sync`: one engine serves any number of
/// concurrent requests.
#[derive(Debug, Clone)]
pub struct Engine {
    layers: Vec<Layer>,
    feature_names: Vec<String>,
    class_labels: Vec<String>,
    /// The widest layer output, for sizing scratch space.
    max_width: usize,
}

impl Engine {
    /// Builds the engine from an artifact, validating it first.
    pub fn from_artifact(artifact: &Artifact) -> Result<Engine, EngineError> {
        artifact.validate()?;
        let pre = &artifact.preprocessing;
        let mut layers = Vec::with_capacity(artifact.layers.len());
        for (index, layer) in artifact.layers.iter().enumerate() {
            let weight = dense(index, "weight", &layer.weight)?;
            let bias = dense(index, "bias", &layer.bias)?;
            // validate() checked that every weight is [out, in]; this only satisfies the
            // pattern without a panic path.
            let &[n_out, n_in] = layer.weight.shape() else {
                return Err(EngineError::UnsupportedTensor {
                    layer: index,
                    tensor: "weight",
                    kind: "a tensor that is not two-dimensional",
                });
            };
            let mut wt = vec![0f32; n_in * n_out];
            let mut folded_bias = bias.to_vec();
            for o in 0..n_out {
                let row = &weight[o * n_in..(o + 1) * n_in];
                let mut shift = 0f64;
                for (i, &w) in row.iter().enumerate() {
                    let w = if index == 0 {
                        // Fold standardisation: w·(x - m)/s = (w/s)·x - w·m/s.
                        let scaled = f64::from(w) / f64::from(pre.scale[i]);
                        shift += scaled * f64::from(pre.mean[i]);
                        scaled as f32
                    } else {
                        w
                    };
                    wt[i * n_out + o] = w;
                }
                folded_bias[o] = (f64::from(folded_bias[o]) - shift) as f32;
            }
            layers.push(Layer {
                n_in,
                n_out,
                wt,
                bias: folded_bias,
            });
        }
        let max_width = layers.iter().map(|l| l.n_out).max().unwrap_or(0);
        Ok(Engine {
            layers,
            feature_names: artifact.feature_names.clone(),
            class_labels: artifact.class_labels.clone(),
            max_width,
        })
    }

    /// The number of raw features a row must have.
    pub fn n_features(&self) -> usize {
        self.layers.first().map_or(0, |l| l.n_in)
    }

    /// The number of classes (logits per row).
    pub fn n_classes(&self) -> usize {
        self.class_labels.len()
    }

    /// The class label of each output index.
    pub fn class_labels(&self) -> &[String] {
        &self.class_labels
    }

    /// The input column names, in order.
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// Checks a batch's length and that every value is finite.
    fn check_rows(&self, rows: &[f32], n_rows: usize) -> Result<(), EngineError> {
        let n_features = self.n_features();
        let expected = n_rows.saturating_mul(n_features);
        if rows.len() != expected {
            return Err(if n_rows == 1 {
                EngineError::FeatureCount {
                    expected: n_features,
                    got: rows.len(),
                }
            } else {
                EngineError::BatchShape {
                    n_rows,
                    n_features,
                    expected,
                    got: rows.len(),
                }
            });
        }
        // One pass to find out whether anything is wrong; the position is only looked up
        // on the error path, so a valid batch pays for a single vectorized scan.
        if !rows.iter().all(|v| v.is_finite()) {
            let at = rows.iter().position(|v| !v.is_finite()).unwrap_or(0);
            let feature = at % n_features.max(1);
            return Err(EngineError::NonFinite {
                row: at / n_features.max(1),
                feature,
                name: self.feature_names.get(feature).cloned().unwrap_or_default(),
                value: rows[at].to_string(),
            });
        }
        Ok(())
    }

    /// The logits of one raw (unstandardised) row.
    pub fn logits(&self, row: &[f32]) -> Result<Vec<f32>, EngineError> {
        self.check_rows(row, 1)?;
        ROW_SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (current, next, scratch) = &mut *guard;
            current.resize(self.max_width, 0.0);
            next.resize(self.max_width, 0.0);
            let last = self.layers.len() - 1;
            for (i, layer) in self.layers.iter().enumerate() {
                let input: &[f32] = if i == 0 { row } else { &current[..layer.n_in] };
                let output = &mut next[..layer.n_out];
                kernels::dense_row(&layer.wt, &layer.bias, input, output, i < last, scratch);
                std::mem::swap(current, next);
            }
            Ok(current[..self.n_classes()].to_vec())
        })
    }

    /// The class and class probabilities of one raw row.
    pub fn predict(&self, row: &[f32]) -> Result<Prediction, EngineError> {
        let logits = self.logits(row)?;
        Ok(prediction(&logits))
    }

    /// The logits of `n_rows` raw rows laid out row-major in `rows`; the result is
    /// `n_rows × n_classes()`, row-major.
    pub fn logits_batch(&self, rows: &[f32], n_rows: usize) -> Result<Vec<f32>, EngineError> {
        self.check_rows(rows, n_rows)?;
        let n_features = self.n_features();
        let n_classes = self.n_classes();
        let mut logits = vec![0f32; n_rows * n_classes];
        let chunk = BATCH_CHUNK_ROWS.min(n_rows.max(1));
        let mut current = vec![0f32; chunk * self.max_width];
        let mut next = vec![0f32; chunk * self.max_width];
        let last = self.layers.len() - 1;
        let stride = chunk * n_features.max(1);
        for (input_rows, out_logits) in rows
            .chunks(stride)
            .zip(logits.chunks_mut(chunk * n_classes.max(1)))
        {
            let n = input_rows.len() / n_features.max(1);
            for (i, layer) in self.layers.iter().enumerate() {
                let input: &[f32] = if i == 0 {
                    input_rows
                } else {
                    &current[..n * layer.n_in]
                };
                if i == last {
                    kernels::dense_batch(
                        input,
                        n,
                        layer.n_in,
                        &layer.wt,
                        &layer.bias,
                        out_logits,
                        false,
                    );
                } else {
                    let out = &mut next[..n * layer.n_out];
                    kernels::dense_batch(input, n, layer.n_in, &layer.wt, &layer.bias, out, true);
                    std::mem::swap(&mut current, &mut next);
                }
            }
        }
        Ok(logits)
    }

    /// The most probable class of each of `n_rows` raw rows.
    pub fn classes_batch(&self, rows: &[f32], n_rows: usize) -> Result<Vec<usize>, EngineError> {
        let logits = self.logits_batch(rows, n_rows)?;
        Ok(logits
            .chunks_exact(self.n_classes().max(1))
            .map(argmax)
            .collect())
    }

    /// The class and probabilities of each of `n_rows` raw rows.
    pub fn predict_batch(
        &self,
        rows: &[f32],
        n_rows: usize,
    ) -> Result<Vec<Prediction>, EngineError> {
        let logits = self.logits_batch(rows, n_rows)?;
        Ok(logits
            .chunks_exact(self.n_classes().max(1))
            .map(prediction)
            .collect())
    }
}

/// The dense values of a tensor, or the error naming its unsupported storage.
fn dense<'a>(
    layer: usize,
    tensor: &'static str,
    data: &'a TensorData,
) -> Result<&'a [f32], EngineError> {
    data.dense_values().ok_or(EngineError::UnsupportedTensor {
        layer,
        tensor,
        kind: data.kind(),
    })
}

/// The index of the largest logit; the first one on ties, and NaN never wins.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best
}

/// Softmax probabilities and the winning class.
fn prediction(logits: &[f32]) -> Prediction {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probabilities: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = probabilities.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        for p in &mut probabilities {
            *p /= sum;
        }
    }
    Prediction {
        class: argmax(logits),
        probabilities,
    }
}
