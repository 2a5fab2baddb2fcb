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
//!
//! An int8 or int4 layer (one scale per tensor, per output or per group of weights, stored
//! dense or, for a pruned model, sparse) keeps its weights as `i8` (4-bit codes two a byte
//! where the AVX2 kernel runs them, [`Engine::packed_layers`]) and runs
//! `u8 × i8` dot products with `i32` sums, one per run of inputs sharing a scale (AVX-512
//! VNNI, AVX2, or a scalar loop, all giving the same integers; [`int8_kernel`] says which
//! runs here); each row's activations are rounded to
//! `u8` over the layer's calibrated input range when the artifact stores one (static
//! quantization: one pass over the row, no range to find first), or over the row's own range
//! (dynamic, and for a row that falls off the calibrated range, which clamping would
//! distort). Rows and batches run the same arithmetic, so they give identical answers;
//! against the dequantized float model the difference is the activation rounding (the tests
//! bound it and check that the classes agree on at least 99.5 % of the digits test rows).
//! The per-row quantization and the finishing step are vectorized: before they were, they
//! took about 80 % of an int8 batch and made it 2–3× slower than the float GEMM. A pruned
//! integer model is compacted like a float one (its dequantized weights say which neurons
//! and features can go), then each kept weight is turned back into its exact code: the
//! zeros left inside the compacted layers cost a byte each on the dense integer kernels.
//! Where [`int8_sparse_max_density`] allows, a sparse enough symmetric layer (or a narrow one
//! after such a layer, [`INT8_AFTER_SPARSE_MAX_INPUTS`]) also keeps its non-zero codes, and
//! its batches multiply only those, [`kernels::SPARSE_LANES`] rows side by side, with sums
//! that are exact integers in `f32` (the same as the dense kernels').

use std::cell::RefCell;

use crate::artifact::{Artifact, ArtifactError, LayerTensors, TensorData, scale_index};
use crate::kernels::{
    self, ActivationGrid, Int8Scratch, Int8Weight, PaddedWeight, RowScratch, SPARSE_LANES,
    SparseWeight,
};

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

/// The most inputs an int8 layer may have to run its batches on the sparse integer path
/// whatever its density when the layer before it does (see [`int8_sparse_max_density`]):
/// its activations then arrive transposed, and at any density that path does as much
/// arithmetic per code as AVX2's dense kernel, without transposing 64 rows back and
/// quantizing them one at a time. Up to 128 inputs its levels for 64 rows (32 kB) stay in
/// the L1 cache. The last layer of the 90 % pruned digits model (121 inputs, 73 % non-zero
/// codes) made its batch 0.45–0.50 ms against 0.63–0.67 ms (three alternating runs); a
/// dense model's layers, whose inputs arrive row-major, measured slower on it.
pub const INT8_AFTER_SPARSE_MAX_INPUTS: usize = 128;

/// The largest share of non-zero codes at which a symmetric int8 layer's batches run on
/// the sparse integer path (`kernels::int8_sparse_layer_t`: each non-zero code times
/// [`SPARSE_LANES`] rows' levels, exact sums in `f32`), or `None` where they stay on the
/// dense integer kernels. Where those are AVX2's or the scalar loop, the sparse path does
/// as much arithmetic per stored code as they do per code, so it takes the `f32` threshold
/// ([`SPARSE_MAX_DENSITY`]): on an AVX2 machine the 90 % pruned digits model's batch of
/// 1 000 went from 1.9–2.4× the pruned `f32` model's time to 1.06–1.50× (with
/// [`INT8_AFTER_SPARSE_MAX_INPUTS`]). VNNI multiplies 64
/// codes an instruction, four times the 16 lanes of an AVX-512 multiply-add, so there the
/// sparse path only does less work below a quarter of the codes; it has not been measured
/// on a VNNI machine, so VNNI keeps the dense kernels it was measured with.
pub fn int8_sparse_max_density() -> Option<f64> {
    (kernels::IntKernel::here() != kernels::IntKernel::Vnni).then_some(SPARSE_MAX_DENSITY)
}

thread_local! {
    /// Per-thread scratch for int8 layers (quantized activations, integer sums, ...),
    /// reused between calls.
    static INT8_SCRATCH: RefCell<Int8Scratch> = RefCell::default();

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
    /// for why), each row padded with zeros to a multiple of 16 outputs.
    Dense(PaddedWeight),
    /// Only the non-zeros, for the sparse kernels.
    Sparse(SparseWeight),
    /// Both: dense for single rows, sparse for batches.
    Both(PaddedWeight, SparseWeight),
    /// Int8 weights with a scale and zero point per output and segment of inputs (one
    /// segment unless the scales are grouped; the weight is `scale[s][o] · (q − zero[s][o])`),
    /// run as `u8 × i8` dot products with `i32` sums: each row's activations are quantized
    /// to `u8` on the fly, over the layer's calibrated range (static) or the row's own
    /// (dynamic), so the weights stay one byte each in memory and in the kernel. See
    /// `kernels::int8_layer`.
    Int8 {
        /// The codes and each segment's scales.
        w: Int8Weight,
        /// `[segment][n_out]`, or empty when every zero point is 0 (symmetric).
        zero: Vec<f32>,
        /// For the first layer: `1 / standardiser scale` per input, applied to each request
        /// before quantization (the standardiser cannot be folded into integer weights).
        input_scale: Option<Vec<f32>>,
        /// The calibrated input grid (static quantization), or `None` for each row's own.
        grid: Option<ActivationGrid>,
    },
}

impl Weight {
    /// Whether batches run this weight on a sparse kernel (over transposed activations).
    fn sparse_batches(&self) -> bool {
        match self {
            Weight::Sparse(_) | Weight::Both(..) => true,
            Weight::Int8 { w, .. } => w.sparse_batches(),
            Weight::Dense(_) => false,
        }
    }

    /// Runs an int8 layer on `rows` rows of `x` into `y` (row-major); `None` when the
    /// weight is not int8.
    fn run_int8(
        &self,
        bias: &[f32],
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        relu: bool,
    ) -> Option<()> {
        let Weight::Int8 {
            w,
            zero,
            input_scale,
            grid,
        } = self
        else {
            return None;
        };
        INT8_SCRATCH.with(|cell| {
            kernels::int8_layer(
                w,
                zero,
                input_scale.as_deref(),
                *grid,
                bias,
                x,
                rows,
                y,
                relu,
                &mut cell.borrow_mut(),
            );
        });
        Some(())
    }
}

/// The shortest run of inputs sharing a scale (see [`segment_length`]) that a layer with
/// grouped scales runs on the integer kernels with: each run costs a scale, a zero point and
/// an integer sum per output (12 bytes), against a byte per code, so shorter runs would hold
/// more bytes than the float weights. A layer whose rows share one scale always qualifies.
pub const MIN_INT8_SEGMENT: usize = 8;

/// Whether the engine runs a layer with this weight on the integer kernels (quantizing its
/// input): a quantized weight with one scale per tensor, per output, or per group of weights
/// whose boundaries leave runs of at least [`MIN_INT8_SEGMENT`] inputs in every row, stored
/// dense or sparse (a pruned model's). Other grouped weights are dequantized onto the `f32`
/// kernels at load.
pub fn runs_on_int8_kernels(weight: &TensorData) -> bool {
    match weight {
        TensorData::QuantizedInt {
            shape,
            group,
            row_groups,
            ..
        } => match shape.as_slice() {
            &[_, n_in] => {
                let d = segment_length(*group, n_in, *row_groups);
                d == n_in || d >= MIN_INT8_SEGMENT
            }
            _ => false,
        },
        _ => false,
    }
}

/// What an integer layer keeps beside its dequantized weights until its kernels are chosen
/// (after compaction, which drops inputs and outputs): per segment of inputs and output the
/// scale and zero point that turn each weight back into its exact code.
#[derive(Debug, Clone)]
struct Int8Meta {
    /// Each input's segment: the run of inputs sharing each output's scale (see
    /// [`segment_length`]).
    segment: Vec<u32>,
    /// `[segment][n_out]`.
    scale: Vec<f32>,
    /// `[segment][n_out]`.
    zero: Vec<f32>,
    /// For the first layer: `1 / standardiser scale` per input (see `Weight::Int8`).
    input_scale: Option<Vec<f32>>,
    /// The calibrated input grid (static quantization), or `None` for each row's own.
    grid: Option<ActivationGrid>,
}

/// The length of the runs of inputs that share each output's scale when one scale covers
/// `group` consecutive weights of a row-major `[n_out][n_in]` tensor: with `row_groups`,
/// `group` (the last run of a row shorter); else the whole row when `group` is a multiple
/// of `n_in` (per tensor, per channel, whole rows), and otherwise the greatest common
/// divisor of the two: a row starts at a multiple of that length and so does every group,
/// so no run crosses a group's boundary.
fn segment_length(group: usize, n_in: usize, row_groups: bool) -> usize {
    let (mut a, mut b) = (group.max(1), n_in.max(1));
    if row_groups {
        return a.min(b);
    }
    if a % b == 0 {
        return b;
    }
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The integer form of a quantized artifact weight, or `None` when it is not one (see
/// [`runs_on_int8_kernels`]). Its inputs are quantized over the layer's calibrated range
/// when the artifact has one.
fn int8_meta(
    index: usize,
    layer: &LayerTensors,
    pre: &crate::data::Standardizer,
) -> Option<Int8Meta> {
    if !runs_on_int8_kernels(&layer.weight) {
        return None;
    }
    let TensorData::QuantizedInt {
        shape,
        group,
        row_groups,
        scales,
        zero_points,
        ..
    } = &layer.weight
    else {
        return None;
    };
    let &[n_out, n_in] = shape.as_slice() else {
        return None;
    };
    let d = segment_length(*group, n_in, *row_groups);
    let n_seg = n_in.div_ceil(d).max(1);
    // The scale index of segment s of output o: the group holding its first weight.
    let at = |s: usize, o: usize| scale_index(o * n_in + s * d, *group, n_in, *row_groups);
    let mut scale = Vec::with_capacity(n_seg * n_out);
    let mut zero = Vec::with_capacity(n_seg * n_out);
    for s in 0..n_seg {
        for o in 0..n_out {
            scale.push(scales.get(at(s, o)).copied().unwrap_or(1.0));
            zero.push(zero_points.get(at(s, o)).map_or(0.0, |z| f32::from(*z)));
        }
    }
    Some(Int8Meta {
        segment: (0..n_in).map(|i| (i / d) as u32).collect(),
        scale,
        zero,
        input_scale: (index == 0).then(|| pre.scale.iter().map(|s| 1.0 / s).collect()),
        grid: layer
            .input_range
            .map(|r| ActivationGrid::spanning(r.min, r.max)),
    })
}

/// The codes of dequantized `[n_in][n_out]` weights `wt`: each weight is
/// `scale[s][o] · (q − zero[s][o])` (`s` its input's segment) with an integer `q` of at most
/// 8 bits, so `w / scale + zero` lands within a rounding error of `q` and rounds back to it
/// exactly.
fn int8_codes(wt: &[f32], n_out: usize, meta: &Int8Meta) -> Vec<i8> {
    wt.iter()
        .enumerate()
        .map(|(k, &w)| {
            let at = meta.segment[k / n_out] as usize * n_out + k % n_out;
            let (s, z) = (meta.scale[at], meta.zero[at]);
            let q = if s > 0.0 { w / s + z } else { z };
            q.round().clamp(-128.0, 127.0) as i8
        })
        .collect()
}

/// An `f32` layer before the choice of kernels: `wt` is `[n_in][n_out]`.
#[derive(Debug, Clone)]
struct F32Layer {
    n_in: usize,
    n_out: usize,
    wt: Vec<f32>,
    bias: Vec<f32>,
    /// For a layer that runs on the integer kernels: `wt` holds its dequantized weights
    /// (for the first layer without the standardiser, which its inputs get instead).
    int8: Option<Int8Meta>,
}

impl F32Layer {
    /// Keeps only the listed inputs (in order).
    fn keep_inputs(&mut self, keep: &[usize]) {
        let mut wt = Vec::with_capacity(keep.len() * self.n_out);
        for &i in keep {
            wt.extend_from_slice(&self.wt[i * self.n_out..(i + 1) * self.n_out]);
        }
        self.wt = wt;
        self.n_in = keep.len();
        if let Some(m) = self.int8.as_mut() {
            m.segment = keep.iter().map(|&i| m.segment[i]).collect();
            if let Some(s) = m.input_scale.as_mut() {
                *s = keep.iter().map(|&i| s[i]).collect();
            }
        }
    }

    /// Keeps only the listed outputs (in order).
    fn keep_outputs(&mut self, keep: &[usize]) {
        let mut wt = Vec::with_capacity(self.n_in * keep.len());
        for i in 0..self.n_in {
            wt.extend(keep.iter().map(|&o| self.wt[i * self.n_out + o]));
        }
        self.wt = wt;
        self.bias = keep.iter().map(|&o| self.bias[o]).collect();
        let n_out = self.n_out.max(1);
        self.n_out = keep.len();
        if let Some(m) = self.int8.as_mut() {
            let by_segment = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(n_out)
                    .flat_map(|row| keep.iter().map(|&o| row[o]))
                    .collect()
            };
            m.scale = by_segment(&m.scale);
            m.zero = by_segment(&m.zero);
        }
    }
}

/// Compacts a pruned model without changing what it computes: the hidden neurons that
/// cannot change an output go ([`crate::neurons`]), then a raw feature that no weight reads
/// is dropped from the first layer. Returns the features the first layer still reads when
/// some were dropped. A narrower layer is faster for every kernel: this is what makes single
/// rows of a pruned model faster than the dense model's, not only batches.
fn compact(layers: &mut [F32Layer]) -> Option<Vec<u32>> {
    crate::neurons::remove_dead_neurons(layers);
    let first = layers.first_mut()?;
    let mut used: Vec<usize> = (0..first.n_in)
        .filter(|&i| {
            first.wt[i * first.n_out..(i + 1) * first.n_out]
                .iter()
                .any(|w| *w != 0.0)
        })
        .collect();
    if used.is_empty() && first.n_in > 0 {
        // The batch path walks rows by their input width, which must not be 0.
        used.push(0);
    }
    if used.len() == first.n_in {
        return None;
    }
    first.keep_inputs(&used);
    Some(used.iter().map(|&i| i as u32).collect())
}

/// The engine's transposed layers (`wt[i * n_out + o]`) as neuron removal sees them.
impl crate::neurons::NeuronLayers for [F32Layer] {
    fn depth(&self) -> usize {
        self.len()
    }
    fn n_in(&self, l: usize) -> usize {
        self[l].n_in
    }
    fn n_out(&self, l: usize) -> usize {
        self[l].n_out
    }
    fn weight(&self, l: usize, o: usize, i: usize) -> f32 {
        self[l].wt[i * self[l].n_out + o]
    }
    fn bias(&self, l: usize, o: usize) -> f32 {
        self[l].bias[o]
    }
    fn add_to_bias(&mut self, l: usize, o: usize, v: f32) {
        self[l].bias[o] += v;
    }
    fn keep_outputs(&mut self, l: usize, keep: &[usize]) {
        self[l].keep_outputs(keep);
    }
    fn keep_inputs(&mut self, l: usize, keep: &[usize]) {
        self[l].keep_inputs(keep);
    }
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
    /// The raw features a row has.
    n_features: usize,
    /// The features the first layer reads, when compaction dropped features no weight
    /// uses (else every feature, in order).
    input_map: Option<Vec<u32>>,
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
        // Every layer as `[n_in][n_out]` weights and folded biases, before compaction and the
        // choice of kernels; an integer layer keeps what turns its weights back into codes.
        let mut built: Vec<F32Layer> = Vec::with_capacity(artifact.layers.len());
        for (index, layer) in artifact.layers.iter().enumerate() {
            let int8 = match choice {
                KernelChoice::Auto => int8_meta(index, layer, pre),
                KernelChoice::DenseOnly => None,
            };
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
                    wt[i * n_out + o] = if index == 0 {
                        // Fold standardisation: w·(x - m)/s = (w/s)·x - w·m/s. An integer
                        // layer keeps w, and its inputs are multiplied by 1/s instead (the
                        // standardiser cannot be folded into integer weights).
                        let scaled = f64::from(w) / f64::from(pre.scale[i]);
                        shift += scaled * f64::from(pre.mean[i]);
                        if int8.is_some() { w } else { scaled as f32 }
                    } else {
                        w
                    };
                }
                folded_bias[o] = (f64::from(folded_bias[o]) - shift) as f32;
            }
            built.push(F32Layer {
                n_in,
                n_out,
                wt,
                bias: folded_bias,
                int8,
            });
        }
        let n_features = artifact.mlp_config().input;
        let input_map = match choice {
            KernelChoice::Auto => compact(&mut built),
            KernelChoice::DenseOnly => None,
        };
        for F32Layer {
            n_in,
            n_out,
            wt,
            bias,
            int8,
        } in built
        {
            let weight = if let Some(meta) = int8 {
                // A pruned integer layer's rows run on the dense integer kernels after
                // compaction: its zeros cost a byte each there, against 4 bytes and an index
                // for each non-zero on the sparse f32 kernels. Its batches may also keep the
                // non-zero codes (below).
                let w = Int8Weight::with_segments(
                    &int8_codes(&wt, n_out, &meta),
                    n_in,
                    n_out,
                    &meta.segment,
                    meta.scale.len() / n_out.max(1),
                    &meta.scale,
                );
                // Symmetric weights need no zero-point term, and only they keep their
                // non-zero codes for sparse batches (a pruned weight's zero is its zero
                // point's code, not 0, when it has one).
                let symmetric = meta.zero.iter().all(|z| *z == 0.0);
                // 4-bit codes are held two a byte where the AVX2 kernel runs them (it
                // unpacks them as it loads them); VNNI's kernel reads one a byte.
                let w = if kernels::IntKernel::here() == kernels::IntKernel::Avx2 {
                    w.with_packed_nibbles()
                } else {
                    w
                };
                Weight::Int8 {
                    w: match int8_sparse_max_density() {
                        Some(max) if symmetric => {
                            let follows = layers
                                .last()
                                .is_some_and(|l: &Layer| l.weight.sparse_batches())
                                && n_in <= INT8_AFTER_SPARSE_MAX_INPUTS;
                            w.with_sparse_batches(if follows { 1.0 } else { max })
                        }
                        _ => w,
                    },
                    zero: if symmetric { Vec::new() } else { meta.zero },
                    input_scale: meta.input_scale,
                    grid: meta.grid,
                }
            } else {
                let nonzero = wt.iter().filter(|w| **w != 0.0).count();
                let density = nonzero as f64 / wt.len().max(1) as f64;
                if choice == KernelChoice::DenseOnly || density > SPARSE_MAX_DENSITY {
                    Weight::Dense(kernels::pad_columns(&wt, n_in, n_out))
                } else if density <= ROW_SPARSE_MAX_DENSITY {
                    Weight::Sparse(SparseWeight::from_in_out(&wt, n_in, n_out, true))
                } else {
                    let sparse = SparseWeight::from_in_out(&wt, n_in, n_out, false);
                    Weight::Both(kernels::pad_columns(&wt, n_in, n_out), sparse)
                }
            };
            layers.push(Layer {
                n_in,
                n_out,
                weight,
                bias,
            });
        }
        let max_width = layers.iter().map(|l| l.n_out).max().unwrap_or(0);
        Ok(Engine {
            layers,
            n_features,
            input_map,
            feature_names: artifact.feature_names.clone(),
            class_labels: artifact.class_labels.clone(),
            max_width,
        })
    }

    /// For each layer, its `(inputs, outputs)` as the engine runs it: after compaction a
    /// pruned model's hidden layers can be narrower than the artifact's.
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        self.layers.iter().map(|l| (l.n_in, l.n_out)).collect()
    }

    /// For each layer, whether its batches run on the sparse kernel.
    pub fn sparse_layers(&self) -> Vec<bool> {
        self.layers
            .iter()
            .map(|l| l.weight.sparse_batches())
            .collect()
    }

    /// For each layer, whether it runs on the integer kernels (its weights held as codes).
    pub fn int8_layers(&self) -> Vec<bool> {
        self.layers
            .iter()
            .map(|l| matches!(l.weight, Weight::Int8 { .. }))
            .collect()
    }

    /// For each layer, whether its codes are 4-bit ones held two a byte (where the AVX2
    /// integer kernel runs them).
    pub fn packed_layers(&self) -> Vec<bool> {
        self.layers
            .iter()
            .map(|l| matches!(&l.weight, Weight::Int8 { w, .. } if w.packed_nibbles()))
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
                            w,
                            zero,
                            input_scale,
                            ..
                        } => {
                            w.resident_bytes()
                                + 4 * (zero.len() + input_scale.as_ref().map_or(0, Vec::len))
                        }
                    }
            })
            .sum()
    }

    /// The number of raw features a row must have.
    pub fn n_features(&self) -> usize {
        self.n_features
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
        // on the error path, so a valid batch pays for a single vectorized scan. Folded
        // over blocks without an early exit inside them, which vectorizes (`all`'s exit at
        // each value did not, and cost about a tenth of a pruned model's batch).
        if !rows
            .chunks(256)
            .all(|block| block.iter().fold(true, |ok, v| ok & v.is_finite()))
        {
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
            if let Some(map) = &self.input_map {
                for (c, &f) in current.iter_mut().zip(map) {
                    *c = row[f as usize];
                }
            }
            for (i, layer) in self.layers.iter().enumerate() {
                let input: &[f32] = match (i, &self.input_map) {
                    (0, None) => row,
                    _ => &current[..layer.n_in],
                };
                let output = &mut next[..layer.n_out];
                match &layer.weight {
                    Weight::Dense(wt) | Weight::Both(wt, _) => kernels::dense_row(
                        wt.as_slice(),
                        &layer.bias,
                        input,
                        output,
                        i < last,
                        scratch,
                    ),
                    Weight::Sparse(w) => {
                        kernels::sparse_row(w, &layer.bias, input, output, i < last, scratch)
                    }
                    Weight::Int8 { .. } => {
                        layer
                            .weight
                            .run_int8(&layer.bias, input, 1, output, i < last);
                    }
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
        Ok(self.logits_batch_checked(rows, n_rows))
    }

    /// The batch path on checked rows: chunks of rows through GEMMs and int8 kernels, or
    /// the mixed path when a layer is sparse.
    fn logits_batch_checked(&self, rows: &[f32], n_rows: usize) -> Vec<f32> {
        if self.layers.iter().any(|l| l.weight.sparse_batches()) {
            return self.logits_batch_mixed(rows, n_rows);
        }
        if let Some(map) = &self.input_map {
            let mut gathered = vec![0f32; n_rows * map.len()];
            gather(rows, self.n_features, map, &mut gathered);
            return self.logits_batch_layers(&gathered, n_rows);
        }
        self.logits_batch_layers(rows, n_rows)
    }

    /// The batch path on rows of the first layer's inputs when no layer is sparse.
    fn logits_batch_layers(&self, rows: &[f32], n_rows: usize) -> Vec<f32> {
        let n_features = self.layers.first().map_or(0, |l| l.n_in);
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
                let out: &mut [f32] = if i == last {
                    &mut *out_logits
                } else {
                    &mut next[..n * layer.n_out]
                };
                // Only reached when every layer is dense or int8 (checked above).
                match &layer.weight {
                    Weight::Dense(wt) => kernels::dense_batch(
                        input,
                        n,
                        layer.n_in,
                        wt.as_slice(),
                        &layer.bias,
                        out,
                        i < last,
                    ),
                    other => {
                        other.run_int8(&layer.bias, input, n, out, i < last);
                    }
                }
                if i < last {
                    std::mem::swap(&mut current, &mut next);
                }
            }
        }
        logits
    }

    /// The batch path for a model with sparse layers: chunks of [`SPARSE_LANES`] rows; the
    /// activations are kept transposed (`[feature][lane]`) through sparse layers and
    /// row-major through dense ones, transposed only where the kind changes.
    fn logits_batch_mixed(&self, rows: &[f32], n_rows: usize) -> Vec<f32> {
        let n_raw = self.n_features.max(1);
        let n_features = self.layers.first().map_or(0, |l| l.n_in).max(1);
        let n_classes = self.n_classes();
        let mut logits = vec![0f32; n_rows * n_classes];
        let width = self.max_width.max(n_features);
        let mut current = vec![0f32; SPARSE_LANES * width];
        let mut next = vec![0f32; SPARSE_LANES * width];
        let last = self.layers.len() - 1;
        let map = self.input_map.as_deref();
        let first_sparse = self
            .layers
            .first()
            .is_some_and(|l| l.weight.sparse_batches());
        for (input_rows, out_logits) in rows
            .chunks(SPARSE_LANES * n_raw)
            .zip(logits.chunks_mut(SPARSE_LANES * n_classes.max(1)))
        {
            let n = input_rows.len() / n_raw;
            // The raw rows go straight to the first layer's layout, picking the features
            // it reads on the way (one pass instead of a gather and a transpose).
            if first_sparse {
                to_lanes(input_rows, n, n_raw, map, &mut current);
            } else if let Some(map) = map {
                gather(input_rows, n_raw, map, &mut current[..n * map.len()]);
            } else {
                current[..input_rows.len()].copy_from_slice(input_rows);
            }
            // Whether `current` holds `[feature][lane]` (true) or `[row][feature]`.
            let mut transposed = first_sparse;
            for (i, layer) in self.layers.iter().enumerate() {
                let relu = i < last;
                let sparse = layer.weight.sparse_batches();
                if sparse && !transposed {
                    to_lanes(&current[..n * layer.n_in], n, layer.n_in, None, &mut next);
                    std::mem::swap(&mut current, &mut next);
                    transposed = true;
                }
                let (xt, yt) = (
                    &current[..layer.n_in * SPARSE_LANES],
                    &mut next[..layer.n_out * SPARSE_LANES],
                );
                match &layer.weight {
                    Weight::Sparse(w) | Weight::Both(_, w) => {
                        kernels::sparse_batch_t(w, &layer.bias, xt, yt, relu);
                    }
                    Weight::Int8 {
                        w,
                        input_scale,
                        grid,
                        ..
                    } if sparse => INT8_SCRATCH.with(|cell| {
                        kernels::int8_sparse_layer_t(
                            w,
                            input_scale.as_deref(),
                            *grid,
                            &layer.bias,
                            xt,
                            yt,
                            relu,
                            &mut cell.borrow_mut(),
                        );
                    }),
                    Weight::Dense(_) | Weight::Int8 { .. } => {
                        if transposed {
                            from_lanes(&current, n, layer.n_in, &mut next);
                            std::mem::swap(&mut current, &mut next);
                            transposed = false;
                        }
                        let (input, out) =
                            (&current[..n * layer.n_in], &mut next[..n * layer.n_out]);
                        match &layer.weight {
                            Weight::Dense(wt) => kernels::dense_batch(
                                input,
                                n,
                                layer.n_in,
                                wt.as_slice(),
                                &layer.bias,
                                out,
                                relu,
                            ),
                            other => {
                                other.run_int8(&layer.bias, input, n, out, relu);
                            }
                        }
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
        // Quantized storage is dequantized here too: compaction reads the dequantized
        // weights, and an integer layer's kept weights are turned back into their codes.
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

/// `[n][row_len]` rows → `[width][SPARSE_LANES]` lanes of the features `map` picks (all of
/// them, in order, without one; `width` is how many); lanes past `n` are zero.
fn to_lanes(rows: &[f32], n: usize, row_len: usize, map: Option<&[u32]>, lanes: &mut [f32]) {
    let width = map.map_or(row_len, <[u32]>::len);
    let rows = &rows[..n * row_len];
    // Feature by feature: each lane vector is written whole, the rows (a few kB, in the L1
    // cache) read across.
    for (f, lane) in lanes[..width * SPARSE_LANES]
        .chunks_exact_mut(SPARSE_LANES)
        .enumerate()
    {
        let from = map.map_or(f, |m| m[f] as usize);
        for (v, row) in lane.iter_mut().zip(rows.chunks_exact(row_len.max(1))) {
            *v = row[from];
        }
        lane[n..].fill(0.0);
    }
}

/// The features `map` picks of each `[row_len]` row of `rows`, row-major into `out`.
fn gather(rows: &[f32], row_len: usize, map: &[u32], out: &mut [f32]) {
    for (picked, row) in out
        .chunks_exact_mut(map.len().max(1))
        .zip(rows.chunks_exact(row_len.max(1)))
    {
        for (v, &from) in picked.iter_mut().zip(map) {
            *v = row[from as usize];
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

/// The kernel int8 layers run on here: `"avx512-vnni"` (`u8 × i8` dot products, 64 a
/// instruction), `"avx2"` (`i16` pair products, 16 an instruction) or `"scalar"` (the same
/// integers, computed portably).
pub fn int8_kernel() -> &'static str {
    kernels::IntKernel::here().name()
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rows_go_to_lanes_picking_the_features_a_map_names() {
        // Three rows of five features; the map keeps features 4, 0 and 2.
        let rows: Vec<f32> = (0..15).map(|v| v as f32).collect();
        let map = [4u32, 0, 2];
        let mut lanes = vec![f32::NAN; 5 * SPARSE_LANES];
        to_lanes(&rows, 3, 5, Some(&map), &mut lanes);
        for (f, &from) in map.iter().enumerate() {
            let lane = &lanes[f * SPARSE_LANES..(f + 1) * SPARSE_LANES];
            assert_eq!(
                lane[..3],
                [from as f32, 5.0 + from as f32, 10.0 + from as f32]
            );
            assert!(
                lane[3..].iter().all(|&v| v == 0.0),
                "lanes past the rows are zero"
            );
        }
        to_lanes(&rows, 2, 5, None, &mut lanes);
        assert_eq!(
            lanes[4 * SPARSE_LANES..4 * SPARSE_LANES + 3],
            [4.0, 9.0, 0.0]
        );
        let mut picked = vec![0f32; 9];
        gather(&rows, 5, &map, &mut picked);
        assert_eq!(picked, [4.0, 0.0, 2.0, 9.0, 5.0, 7.0, 14.0, 10.0, 12.0]);
    }

    proptest! {
        /// A weight dequantized as the artifact does it (`scale · (q − zero)` in `f32`) turns
        /// back into exactly its code, for any 8-bit code and zero point and any normal scale.
        #[test]
        fn dequantized_weights_turn_back_into_their_exact_codes(
            cols in proptest::collection::vec(
                (1e-6f32..10.0, any::<i8>(), proptest::collection::vec(any::<i8>(), 5)),
                1..8,
            ),
        ) {
            let n_out = cols.len();
            let meta = Int8Meta {
                segment: vec![0; 5],
                scale: cols.iter().map(|c| c.0).collect(),
                zero: cols.iter().map(|c| f32::from(c.1)).collect(),
                input_scale: None,
                grid: None,
            };
            // `[n_in][n_out]`, as the engine holds weights.
            let mut codes = vec![0i8; 5 * n_out];
            let mut wt = vec![0f32; 5 * n_out];
            for (o, (s, z, qs)) in cols.iter().enumerate() {
                for (i, &q) in qs.iter().enumerate() {
                    codes[i * n_out + o] = q;
                    wt[i * n_out + o] = s * (i32::from(q) - i32::from(*z)) as f32;
                }
            }
            prop_assert_eq!(int8_codes(&wt, n_out, &meta), codes);
        }
    }
}
