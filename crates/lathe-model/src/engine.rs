//! The inference engine the deployer serves: a hand-written forward pass over an artifact's
//! weights, without burn, sized for single requests and for batches.
//!
//! At load, the artifact's standardiser is folded into the first layer
//! (`w' = w / scale`, `b' = b - Σ w · mean / scale`), so a request pays nothing for
//! preprocessing. Every weight is laid out `[in][out]` for the crate's private `kernels`
//! module: a single row then runs as broadcast-multiply-adds over weight rows, skipping the
//! rows of zero inputs, which measured 2.7 µs against 5.1 µs for dot products over
//! `[out][in]` rows (64-256-128-10, AVX-512); batches go through a GEMM.
//!
//! A pruned layer whose share of non-zero weights is at most [`SPARSE_MAX_DENSITY`] runs on
//! sparse kernels instead (whatever its storage in the artifact): single rows scatter each
//! non-zero input's weights, batches run [`kernels::SPARSE_LANES`] rows side by side over
//! transposed activations. Layers of one model may mix both; the batch path transposes the
//! activations between a sparse and a dense layer.

use std::cell::RefCell;

use crate::artifact::{Artifact, ArtifactError, TensorData};
use crate::kernels::{self, RowScratch, SPARSE_LANES, SparseWeight};

/// The largest share of non-zero weights at which a layer's batches run on the sparse batch
/// kernel. It does about a third more work per stored weight than the GEMM (an index load,
/// no register blocking across outputs), so below this density it does less work in total;
/// `lathe-compress-bench` measures both on the digits MLP (2.2× faster at 90 % sparsity).
pub const SPARSE_MAX_DENSITY: f64 = 0.35;
/// The largest share of non-zero weights at which a layer's single rows run on the sparse
/// row kernel. The scatter costs a scalar load, multiply-add and store per stored weight
/// where the dense row kernel (which already skips zero inputs) does sixteen outputs per
/// vector instruction: on the digits MLP the scatter was still about 1 µs slower per row at
/// 5 % density. Between the two thresholds a layer keeps the dense form for rows and the
/// by-output sparse form for batches (about 10 % more memory than dense, for 2× faster
/// batches at equal row latency).
pub const ROW_SPARSE_MAX_DENSITY: f64 = 0.02;

thread_local! {
    /// Per-thread scratch for batches through int8 layers: the standardised first-layer
    /// input and each int8 layer widened to `f32` for the GEMM. Reused between calls, so a
    /// batch pays for the widening (tens of µs) but not for fresh pages each time; it is
    /// transient working memory, the model itself stays int8.
    static INT8_BATCH_SCRATCH: RefCell<(Vec<f32>, Vec<Vec<f32>>)> = RefCell::default();

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

/// How a layer's weight is held for computing.
#[derive(Debug, Clone)]
enum Weight {
    /// `[n_in][n_out]` row-major (transposed from the artifact's `[out][in]`; see `kernels`
    /// for why).
    Dense(Vec<f32>),
    /// Only the non-zeros, for the sparse kernels.
    Sparse(SparseWeight),
    /// Both: dense for single rows, sparse for batches.
    Both(Vec<f32>, SparseWeight),
    /// Int8 values `[n_in][n_out]` with a scale and zero point per output: the weight is
    /// `scale[o] · (q − zero[o])`. Batches widen it to `f32` for the GEMM per call; what the
    /// engine holds stays one byte per weight.
    Int8 {
        q: Vec<i8>,
        scale: Vec<f32>,
        zero: Vec<f32>,
        /// For the first layer: `1 / standardiser scale` per input, applied to each request
        /// (the standardiser cannot be folded into per-output integer weights).
        input_scale: Option<Vec<f32>>,
    },
}

impl Weight {
    /// Writes the weight as `f32` `[n_in][n_out]` for the GEMM into `wt` when it is stored
    /// as int8 (else leaves `wt` empty).
    fn widen_into(&self, n_out: usize, wt: &mut Vec<f32>) {
        wt.clear();
        let Weight::Int8 { q, scale, zero, .. } = self else {
            return;
        };
        // Row by row, so the per-output factors line up without a division per weight and
        // the loop vectorizes.
        wt.resize(q.len(), 0.0);
        for (out, row) in wt
            .chunks_exact_mut(n_out.max(1))
            .zip(q.chunks_exact(n_out.max(1)))
        {
            for (((w, &v), s), z) in out.iter_mut().zip(row).zip(scale).zip(zero) {
                *w = s * (f32::from(v) - z);
            }
        }
    }
}

/// An int8 engine layer from a quantized artifact weight with one scale per output (or per
/// tensor), or `None` when the storage needs another form (grouped, sparse).
fn int8_layer(
    index: usize,
    data: &TensorData,
    pre: &crate::data::Standardizer,
) -> Option<(Weight, Vec<f32>)> {
    let TensorData::QuantizedInt {
        shape,
        bits,
        group,
        scales,
        zero_points,
        sparse: false,
        data,
        ..
    } = data
    else {
        return None;
    };
    let &[n_out, n_in] = shape.as_slice() else {
        return None;
    };
    let per_tensor = *group == n_in * n_out;
    if !(per_tensor || *group == n_in) {
        return None;
    }
    let g = |o: usize| if per_tensor { 0 } else { o };
    let scale: Vec<f32> = (0..n_out).map(|o| scales[g(o)]).collect();
    let zero: Vec<f32> = (0..n_out)
        .map(|o| zero_points.get(g(o)).map_or(0.0, |z| f32::from(*z)))
        .collect();
    let mut q = vec![0i8; n_in * n_out];
    // The standardiser's shift moves into the bias: Σ w·(x − m)/s = Σ (w/s)·x − Σ w·m/s.
    let mut shift = vec![0f32; n_out];
    for o in 0..n_out {
        let mut acc = 0f64;
        for i in 0..n_in {
            let v = crate::artifact::quantized_value(data, *bits, o * n_in + i);
            q[i * n_out + o] = v;
            if index == 0 {
                let w = f64::from(scale[o]) * (f64::from(v) - f64::from(zero[o]));
                acc += w * f64::from(pre.mean[i]) / f64::from(pre.scale[i]);
            }
        }
        shift[o] = acc as f32;
    }
    let input_scale = (index == 0).then(|| pre.scale.iter().map(|s| 1.0 / s).collect());
    Some((
        Weight::Int8 {
            q,
            scale,
            zero,
            input_scale,
        },
        shift,
    ))
}

/// One linear layer ready to run.
#[derive(Debug, Clone)]
struct Layer {
    /// Inputs (the previous layer's outputs, or the raw features).
    n_in: usize,
    /// Outputs.
    n_out: usize,
    /// The weight, with the standardiser folded into the first layer.
    weight: Weight,
    /// The bias, with the standardiser's shift folded into the first layer's.
    bias: Vec<f32>,
}

/// Which kernels the engine may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// Sparse kernels for layers at most [`SPARSE_MAX_DENSITY`] dense, dense ones otherwise.
    Auto,
    /// Dense kernels for every layer (for comparisons).
    DenseOnly,
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
    /// Builds the engine from an artifact, validating it first; sparse layers run on the
    /// sparse kernels (see [`KernelChoice::Auto`]).
    pub fn from_artifact(artifact: &Artifact) -> Result<Engine, EngineError> {
        Engine::with_kernels(artifact, KernelChoice::Auto)
    }

    /// Builds the engine from an artifact with the given kernel policy.
    pub fn with_kernels(artifact: &Artifact, choice: KernelChoice) -> Result<Engine, EngineError> {
        artifact.validate()?;
        let pre = &artifact.preprocessing;
        let mut layers = Vec::with_capacity(artifact.layers.len());
        for (index, layer) in artifact.layers.iter().enumerate() {
            if choice == KernelChoice::Auto
                && let Some((weight, shift)) = int8_layer(index, &layer.weight, pre)
            {
                let bias = f32_values(index, "bias", &layer.bias)?;
                let &[n_out, n_in] = layer.weight.shape() else {
                    continue;
                };
                layers.push(Layer {
                    n_in,
                    n_out,
                    weight,
                    bias: bias.iter().zip(&shift).map(|(b, s)| b - s).collect(),
                });
                continue;
            }
            let weight_values = f32_values(index, "weight", &layer.weight)?;
            let bias_values = f32_values(index, "bias", &layer.bias)?;
            let (weight, bias) = (weight_values.as_slice(), bias_values.as_slice());
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
            let nonzero = wt.iter().filter(|w| **w != 0.0).count();
            let density = nonzero as f64 / wt.len().max(1) as f64;
            let weight = if choice == KernelChoice::DenseOnly || density > SPARSE_MAX_DENSITY {
                Weight::Dense(wt)
            } else if density <= ROW_SPARSE_MAX_DENSITY {
                Weight::Sparse(SparseWeight::from_in_out(&wt, n_in, n_out, true))
            } else {
                let sparse = SparseWeight::from_in_out(&wt, n_in, n_out, false);
                Weight::Both(wt, sparse)
            };
            layers.push(Layer {
                n_in,
                n_out,
                weight,
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

    /// For each layer, whether its batches run on the sparse kernel.
    pub fn sparse_layers(&self) -> Vec<bool> {
        self.layers
            .iter()
            .map(|l| !matches!(l.weight, Weight::Dense(_)))
            .collect()
    }

    /// Bytes of weights and biases the engine holds in memory.
    pub fn resident_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                4 * l.bias.len()
                    + match &l.weight {
                        Weight::Dense(wt) => 4 * wt.len(),
                        Weight::Sparse(w) => w.resident_bytes(),
                        Weight::Both(wt, w) => 4 * wt.len() + w.resident_bytes(),
                        Weight::Int8 {
                            q,
                            scale,
                            zero,
                            input_scale,
                        } => {
                            q.len()
                                + 4 * (scale.len()
                                    + zero.len()
                                    + input_scale.as_ref().map_or(0, Vec::len))
                        }
                    }
            })
            .sum()
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
            current.resize(self.max_width.max(row.len()), 0.0);
            next.resize(self.max_width, 0.0);
            let last = self.layers.len() - 1;
            for (i, layer) in self.layers.iter().enumerate() {
                // An int8 first layer takes the standardised row, written into `current`
                // (free until the first layer's output is swapped in).
                let first_int8_scale = match &layer.weight {
                    Weight::Int8 {
                        input_scale: Some(inv),
                        ..
                    } if i == 0 => Some(inv),
                    _ => None,
                };
                if let Some(inv) = first_int8_scale {
                    for ((c, x), s) in current.iter_mut().zip(row).zip(inv) {
                        *c = x * s;
                    }
                }
                let input: &[f32] = if i == 0 && first_int8_scale.is_none() {
                    row
                } else {
                    &current[..layer.n_in]
                };
                let output = &mut next[..layer.n_out];
                match &layer.weight {
                    Weight::Dense(wt) | Weight::Both(wt, _) => {
                        kernels::dense_row(wt, &layer.bias, input, output, i < last, scratch)
                    }
                    Weight::Sparse(w) => {
                        kernels::sparse_row(w, &layer.bias, input, output, i < last, scratch)
                    }
                    Weight::Int8 { q, scale, zero, .. } => kernels::int8_row(
                        q,
                        scale,
                        zero,
                        &layer.bias,
                        input,
                        output,
                        i < last,
                        scratch,
                    ),
                }
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
        if !self
            .layers
            .iter()
            .any(|l| matches!(l.weight, Weight::Int8 { .. }))
        {
            return Ok(self.logits_batch_prepared(rows, n_rows, &[]));
        }
        let (mut scaled, mut widened) =
            INT8_BATCH_SCRATCH.with(|c| std::mem::take(&mut *c.borrow_mut()));
        widened.resize_with(self.layers.len(), Vec::new);
        for (layer, buf) in self.layers.iter().zip(widened.iter_mut()) {
            layer.weight.widen_into(layer.n_out, buf);
        }
        let logits = match self.layers.first().map(|l| &l.weight) {
            Some(Weight::Int8 {
                input_scale: Some(inv),
                ..
            }) => {
                scaled.clear();
                for row in rows.chunks_exact(inv.len().max(1)) {
                    scaled.extend(row.iter().zip(inv).map(|(x, s)| x * s));
                }
                self.logits_batch_prepared(&scaled, n_rows, &widened)
            }
            _ => self.logits_batch_prepared(rows, n_rows, &widened),
        };
        INT8_BATCH_SCRATCH.with(|c| *c.borrow_mut() = (scaled, widened));
        Ok(logits)
    }

    /// The batch path once int8 layers are widened (`widened[i]` non-empty for them) and
    /// the first layer's input is standardised where the layer cannot fold it.
    fn logits_batch_prepared(&self, rows: &[f32], n_rows: usize, widened: &[Vec<f32>]) -> Vec<f32> {
        if self
            .layers
            .iter()
            .any(|l| matches!(l.weight, Weight::Sparse(_) | Weight::Both(..)))
        {
            return self.logits_batch_mixed(rows, n_rows, widened);
        }
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
                // Only reached when every layer is dense or int8 (checked above).
                let wt: &[f32] = match (&layer.weight, widened.get(i)) {
                    (Weight::Dense(wt), _) => wt,
                    (_, Some(w)) => w,
                    _ => continue,
                };
                let input: &[f32] = if i == 0 {
                    input_rows
                } else {
                    &current[..n * layer.n_in]
                };
                if i == last {
                    kernels::dense_batch(input, n, layer.n_in, wt, &layer.bias, out_logits, false);
                } else {
                    let out = &mut next[..n * layer.n_out];
                    kernels::dense_batch(input, n, layer.n_in, wt, &layer.bias, out, true);
                    std::mem::swap(&mut current, &mut next);
                }
            }
        }
        logits
    }

    /// The batch path for a model with sparse layers: chunks of [`SPARSE_LANES`] rows; the
    /// activations are kept transposed (`[feature][lane]`) through sparse layers and
    /// row-major through dense ones, transposed only where the kind changes.
    fn logits_batch_mixed(&self, rows: &[f32], n_rows: usize, widened: &[Vec<f32>]) -> Vec<f32> {
        let n_features = self.n_features().max(1);
        let n_classes = self.n_classes();
        let mut logits = vec![0f32; n_rows * n_classes];
        let width = self.max_width.max(n_features);
        let mut current = vec![0f32; SPARSE_LANES * width];
        let mut next = vec![0f32; SPARSE_LANES * width];
        let last = self.layers.len() - 1;
        for (input_rows, out_logits) in rows
            .chunks(SPARSE_LANES * n_features)
            .zip(logits.chunks_mut(SPARSE_LANES * n_classes.max(1)))
        {
            let n = input_rows.len() / n_features;
            current[..input_rows.len()].copy_from_slice(input_rows);
            // Whether `current` holds `[feature][lane]` (true) or `[row][feature]`.
            let mut transposed = false;
            for (i, layer) in self.layers.iter().enumerate() {
                let relu = i < last;
                match &layer.weight {
                    Weight::Sparse(w) | Weight::Both(_, w) => {
                        if !transposed {
                            to_lanes(&current[..n * layer.n_in], n, layer.n_in, &mut next);
                            std::mem::swap(&mut current, &mut next);
                            transposed = true;
                        }
                        kernels::sparse_batch_t(
                            w,
                            &layer.bias,
                            &current[..layer.n_in * SPARSE_LANES],
                            &mut next[..layer.n_out * SPARSE_LANES],
                            relu,
                        );
                    }
                    Weight::Dense(_) | Weight::Int8 { .. } => {
                        let wt: &[f32] = match (&layer.weight, widened.get(i)) {
                            (Weight::Dense(wt), _) => wt,
                            (_, Some(w)) => w,
                            _ => &[],
                        };
                        if transposed {
                            from_lanes(&current, n, layer.n_in, &mut next);
                            std::mem::swap(&mut current, &mut next);
                            transposed = false;
                        }
                        kernels::dense_batch(
                            &current[..n * layer.n_in],
                            n,
                            layer.n_in,
                            wt,
                            &layer.bias,
                            &mut next[..n * layer.n_out],
                            relu,
                        );
                    }
                }
                std::mem::swap(&mut current, &mut next);
            }
            if transposed {
                from_lanes(&current, n, n_classes, out_logits);
            } else {
                out_logits.copy_from_slice(&current[..n * n_classes]);
            }
        }
        logits
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

/// Every value of an `f32` tensor (dense or sparse storage), or the error naming a storage
/// this engine cannot run.
fn f32_values(
    layer: usize,
    tensor: &'static str,
    data: &TensorData,
) -> Result<Vec<f32>, EngineError> {
    match data {
        // Quantized storage the int8 kernels cannot take (grouped scales, sparse) is
        // dequantized here and runs on the f32 kernels.
        TensorData::DenseF32 { .. }
        | TensorData::SparseF32 { .. }
        | TensorData::QuantizedInt { .. } => Ok(data.to_dense_values()),
        #[allow(unreachable_patterns)]
        other => Err(EngineError::UnsupportedTensor {
            layer,
            tensor,
            kind: other.kind(),
        }),
    }
}

/// `[n][width]` rows → `[width][SPARSE_LANES]` lanes; lanes past `n` are zero.
fn to_lanes(rows: &[f32], n: usize, width: usize, lanes: &mut [f32]) {
    lanes[..width * SPARSE_LANES].fill(0.0);
    for r in 0..n {
        for (f, &v) in rows[r * width..(r + 1) * width].iter().enumerate() {
            lanes[f * SPARSE_LANES + r] = v;
        }
    }
}

/// `[width][SPARSE_LANES]` lanes → `[n][width]` rows (the first `n` lanes).
fn from_lanes(lanes: &[f32], n: usize, width: usize, rows: &mut [f32]) {
    for r in 0..n {
        for (f, v) in rows[r * width..(r + 1) * width].iter_mut().enumerate() {
            *v = lanes[f * SPARSE_LANES + r];
        }
    }
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
