//! Post-training quantization of an MLP's weights to 8 or 4 bits: symmetric or asymmetric
//! (zero point), one scale per tensor, per output channel or per group of input weights;
//! activation ranges calibrated on a sample of the training split (min/max or a percentile)
//! and stored with each integer layer, which the engine quantizes its inputs over (static
//! activations; dynamic ones use each row's range); `auto`: the fewest bits, then the
//! coarsest granularity, whose validation accuracy stays inside the budget. A pruned model
//! stays sparse: only its non-zeros are quantized and stored.
//!
//! Biases stay floating point (a few hundred values; PyTorch's dynamic int8 keeps them
//! `f32`), rounded to half precision's 11 significant bits, and scales are rounded up to
//! bfloat16: the artifact's coder then stores each in about one byte instead of three, which
//! is a tenth of a pruned and quantized model. The zero of a pruned weight is exactly
//! representable: ranges always include 0, and the zero point is rounded so that 0 maps to
//! an integer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifact::{Artifact, LayerTensors, TensorData, pack_quantized};
use crate::data::{Dataset, Splits};
use crate::engine::Engine;
use crate::eval::{Evaluation, evaluate};
use crate::kernels::ActivationGrid;

/// How many weights share a scale, coarsest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    PerTensor,
    /// One scale per output channel (a row of the `[out][in]` weight).
    PerChannel,
    /// Blocks of this many consecutive input weights of one output.
    Grouped(usize),
}

impl Granularity {
    /// Consecutive row-major elements sharing a scale in an `[n_out, n_in]` weight.
    pub fn elements_per_scale(self, n_out: usize, n_in: usize) -> usize {
        match self {
            Granularity::PerTensor => (n_out * n_in).max(1),
            Granularity::PerChannel => n_in.max(1),
            Granularity::Grouped(g) => g.max(1),
        }
    }
}

/// How the int8 engine quantizes a layer's input activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activations {
    /// Over the range calibrated on the training sample, stored in the artifact.
    Static,
    /// Over each row's own range, computed per request.
    Dynamic,
}

/// How activation ranges are calibrated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    MinMax,
    /// The given percentile (in (50, 100]) of the values and its mirror.
    Percentile(f64),
}

/// The bit width to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bits {
    Eight,
    Four,
    /// The fewest bits, then the coarsest granularity, whose validation accuracy is inside
    /// the budget (see [`QuantizeConfig::granularity`]).
    Auto,
}

/// How to quantize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizeConfig {
    pub bits: Bits,
    /// `None`: per channel for fixed bits; searched with `auto` bits, coarsest first (per
    /// tensor, per channel, groups of `group_size`, ordered by how many scales each gives
    /// the model). With `auto` bits and a granularity, only the bits are searched.
    pub granularity: Option<Granularity>,
    /// Weights per scale of the grouped candidate when the granularity is searched.
    pub group_size: usize,
    pub symmetric: bool,
    pub calibration: Calibration,
    /// Whether the served model quantizes activations over the calibrated ranges.
    pub activations: Activations,
    /// Training rows sampled (the first ones) for activation calibration.
    pub calibration_rows: usize,
    /// The largest accepted validation-accuracy drop (for `auto`).
    pub max_accuracy_drop: f64,
}

impl Default for QuantizeConfig {
    /// The job spec's defaults (`"quantize": {}` under the default budget): 8 bits per
    /// output channel, symmetric, groups of 32 for the grouped candidate of `auto`,
    /// activation ranges at the 99.99th percentile of the first 512 training rows, quantized
    /// statically, and a 0.5-point accuracy budget. `lathe-quantizer` tests that the two
    /// agree.
    fn default() -> Self {
        QuantizeConfig {
            bits: Bits::Eight,
            granularity: None,
            group_size: 32,
            symmetric: true,
            calibration: Calibration::Percentile(99.99),
            activations: Activations::Static,
            calibration_rows: 512,
            max_accuracy_drop: 0.005,
        }
    }
}

/// Why quantization could not run.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum QuantizeError {
    /// A setting is out of range.
    #[error("quantize.{field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The input model cannot be quantized.
    #[error("input model: {0}")]
    Model(String),
}

impl QuantizeConfig {
    /// Checks each field, naming the first bad one.
    pub fn validate(&self) -> Result<(), QuantizeError> {
        let bad = |field: &'static str, reason: String| {
            Err(QuantizeError::InvalidConfig { field, reason })
        };
        if self.granularity == Some(Granularity::Grouped(0)) || self.group_size == 0 {
            return bad("group_size", "must be at least 1, got 0".into());
        }
        if let Calibration::Percentile(p) = self.calibration
            && !(p > 50.0 && p <= 100.0)
        {
            return bad("percentile", format!("must be in (50, 100], got {p}"));
        }
        if self.calibration_rows == 0 {
            return bad("calibration_rows", "must be at least 1, got 0".into());
        }
        // A NaN would pass unseen: `auto`'s budget takes the larger of it and one
        // validation row, and `f64::max` drops a NaN.
        if !(0.0..=1.0).contains(&self.max_accuracy_drop) {
            return bad(
                "max_accuracy_drop",
                format!(
                    "must be a fraction in [0, 1], got {}",
                    self.max_accuracy_drop
                ),
            );
        }
        Ok(())
    }
}

/// The input range of one layer's activations on the calibration sample.
pub use crate::artifact::InputRange as ActivationRange;

/// One setting `auto` tried, in the order tried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AutoCandidate {
    pub bits: u8,
    pub granularity: Granularity,
    pub validation_accuracy: f64,
    /// Whether its validation accuracy is inside the budget.
    pub inside_budget: bool,
}

/// The result of [`quantize_mlp`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOutcome {
    pub artifact: Artifact,
    /// 8 or 4.
    pub bits: u8,
    /// The granularity used (searched by `auto`).
    pub granularity: Granularity,
    /// What `auto` tried (empty for fixed bits).
    pub search: Vec<AutoCandidate>,
    pub baseline_test: f64,
    pub baseline_validation: f64,
    pub test: Evaluation,
    pub validation: Evaluation,
    /// Per layer, the calibrated range of its (standardised) inputs.
    pub activation_ranges: Vec<ActivationRange>,
    /// The largest `|w − dequantized(w)|` over all weights.
    pub max_weight_error: f32,
}

/// The smallest bfloat16 value (an `f32` whose low 16 bits are zero) at least `x`, for a
/// positive finite `x`. Scales are rounded up to it: the weights are quantized with the
/// rounded scale, so nothing is lost but a fraction of a level at the top of the range
/// (rounding up keeps the largest weight inside it), and the artifact codes a scale in
/// about one byte instead of three.
pub fn round_up_to_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0xffff == 0 {
        x
    } else {
        f32::from_bits((bits & 0xffff_0000) + 0x1_0000)
    }
}

/// `x` rounded to the nearest value with 11 significant bits (IEEE half precision's), kept
/// as an `f32`. Biases of a quantized model are stored so: a relative change of at most
/// 2⁻¹¹, and the artifact's coder stores the zeroed low mantissa bits in almost nothing.
pub fn round_to_half_precision(x: f32) -> f32 {
    const DROPPED: u32 = 13;
    let bits = x.to_bits();
    let rounded = (bits + (1 << (DROPPED - 1))) & !((1 << DROPPED) - 1);
    let y = f32::from_bits(rounded);
    if y.is_finite() { y } else { x }
}

/// Quantizes `values` (row-major over `shape`) with one scale per `group` elements; zeros
/// stay exact. When `sparse`, only non-zeros are stored. A group shorter than a row that
/// does not divide it restarts at every row (`row_groups`): over the row-major elements its
/// boundaries would fall at a different input in every row, and a kernel could not share
/// one integer sum per group between the outputs.
pub fn quantize_tensor(
    shape: Vec<usize>,
    values: &[f32],
    bits: u8,
    group: usize,
    symmetric: bool,
    sparse: bool,
) -> TensorData {
    let group = group.max(1);
    let (q_min, q_max) = if bits == 4 {
        (-8i32, 7i32)
    } else {
        (-128, 127)
    };
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let row_groups = crate::artifact::groups_restart_per_row(group, cols);
    // Each group's first position and values.
    let chunks: Vec<(usize, &[f32])> = if row_groups {
        values
            .chunks(cols)
            .enumerate()
            .flat_map(|(r, row)| {
                row.chunks(group)
                    .enumerate()
                    .map(move |(k, c)| (r * cols + k * group, c))
            })
            .collect()
    } else {
        values
            .chunks(group)
            .enumerate()
            .map(|(g, c)| (g * group, c))
            .collect()
    };
    let mut scales = Vec::with_capacity(chunks.len());
    let mut zero_points = Vec::new();
    let mut quantized: Vec<i8> = Vec::with_capacity(values.len());
    let mut indices = Vec::new();
    for (first, chunk) in chunks {
        // Ranges include 0 so a pruned (zero) weight stays exactly zero.
        let lo = chunk.iter().copied().fold(0f32, f32::min);
        let hi = chunk.iter().copied().fold(0f32, f32::max);
        let (scale, zero) = if symmetric {
            let m = lo.abs().max(hi.abs());
            (
                if m > 0.0 {
                    round_up_to_bf16(m / q_max as f32)
                } else {
                    1.0
                },
                0i32,
            )
        } else {
            let span = hi - lo;
            let scale = if span > 0.0 {
                round_up_to_bf16(span / (q_max - q_min) as f32)
            } else {
                1.0
            };
            let zero = (q_min as f32 - lo / scale).round() as i32;
            (scale, zero.clamp(q_min, q_max))
        };
        scales.push(scale);
        if !symmetric {
            zero_points.push(zero as i8);
        }
        for (k, &v) in chunk.iter().enumerate() {
            if sparse && v == 0.0 {
                continue;
            }
            if sparse {
                indices.push((first + k) as u32);
            }
            let q = ((v / scale).round() as i32 + zero).clamp(q_min, q_max);
            quantized.push(q as i8);
        }
    }
    TensorData::QuantizedInt {
        shape,
        bits,
        group,
        row_groups,
        scales,
        zero_points,
        sparse,
        indices,
        data: pack_quantized(&quantized, bits),
    }
}

/// Per layer, the range of its inputs on the first `rows` training rows, as the int8 engine
/// quantizes them (see [`layer_inputs`]): min/max, or the given percentile and its mirror.
pub fn calibrate(
    artifact: &Artifact,
    splits: &Splits,
    calibration: Calibration,
    rows: usize,
) -> Vec<ActivationRange> {
    layer_inputs(artifact, &splits.train, rows)
        .iter()
        .map(|x| range_of(x, calibration))
        .collect()
}

/// Per layer, its inputs for the first `rows` rows of `data` (row-major), computed in `f32`
/// with the artifact's (dequantized) weights, as the int8 engine quantizes them (see
/// [`crate::artifact::LayerTensors::input_range`]): for the first layer the raw features
/// divided by the standardiser's scale (the engine folds the mean into the bias), then each
/// hidden layer's ReLU outputs.
pub fn layer_inputs(artifact: &Artifact, data: &Dataset, rows: usize) -> Vec<Vec<f32>> {
    let n = rows.min(data.rows());
    let pre = &artifact.preprocessing;
    let width = data.n_features.max(1);
    // The first layer's input as the engine computes it: each feature times 1 / scale.
    let inverse: Vec<f32> = pre.scale.iter().map(|s| 1.0 / s).collect();
    let mut inputs: Vec<Vec<f32>> = vec![
        data.features[..n * data.n_features]
            .chunks_exact(width)
            .flat_map(|row| row.iter().zip(&inverse).map(|(v, i)| v * i))
            .collect(),
    ];
    // The forward pass runs on the standardised features; each hidden layer's ReLU output
    // is the next layer's input (the last layer's output is no one's).
    let mut standardised = pre.transform(data);
    standardised.truncate(n * data.n_features);
    let dims = artifact.mlp_config().layer_dims();
    let hidden = artifact.layers.len().saturating_sub(1);
    for (index, (layer, &(n_in, n_out))) in artifact.layers[..hidden].iter().zip(&dims).enumerate()
    {
        let x = if index == 0 {
            &standardised
        } else {
            &inputs[index]
        };
        let w = layer.weight.to_dense_values();
        let b = layer.bias.to_dense_values();
        let y: Vec<f32> = x
            .chunks_exact(n_in.max(1))
            .flat_map(|row| {
                w.chunks_exact(n_in.max(1))
                    .zip(&b)
                    .map(move |(weights, bias)| {
                        let s: f32 = weights.iter().zip(row).map(|(a, b)| a * b).sum();
                        (s + bias).max(0.0)
                    })
            })
            .collect();
        debug_assert_eq!(y.len(), n * n_out);
        inputs.push(y);
    }
    inputs
}

/// Per layer with a stored input range, how many rows of `data` have an input more than
/// half a step off that range's grid, which the engine quantizes over their own range
/// instead (`None` for a layer without one). Computed from the `f32` forward pass of
/// [`layer_inputs`], so a row at the very edge may count differently than in the engine.
pub fn rows_off_range(artifact: &Artifact, data: &Dataset) -> Vec<Option<usize>> {
    let inputs = layer_inputs(artifact, data, data.rows());
    artifact
        .layers
        .iter()
        .zip(&inputs)
        .map(|(layer, x)| {
            let range = layer.input_range?;
            let grid = ActivationGrid::spanning(range.min, range.max);
            let width = x.len() / data.rows().max(1);
            Some(
                x.chunks_exact(width.max(1))
                    .filter(|row| row.iter().any(|&v| !grid.holds(v)))
                    .count(),
            )
        })
        .collect()
}

fn range_of(values: &[f32], calibration: Calibration) -> ActivationRange {
    if values.is_empty() {
        return ActivationRange { min: 0.0, max: 0.0 };
    }
    match calibration {
        Calibration::MinMax => ActivationRange {
            min: values.iter().copied().fold(f32::INFINITY, f32::min),
            max: values.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        },
        Calibration::Percentile(p) => {
            let mut sorted = values.to_vec();
            sorted.sort_by(f32::total_cmp);
            let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
            ActivationRange {
                min: at(1.0 - p / 100.0),
                max: at(p / 100.0),
            }
        }
    }
}

/// Per tensor, per channel and grouped, ordered by how many scales each gives the layers of
/// these `(inputs, outputs)` dimensions, fewest first (ties keep that order): groups of
/// `group_size` are finer than channels only when they are shorter than a layer's rows.
fn coarsest_first(dims: &[(usize, usize)], group_size: usize) -> [Granularity; 3] {
    let scales = |g: &Granularity| -> usize {
        dims.iter()
            .map(|&(n_in, n_out)| {
                let group = g.elements_per_scale(n_out, n_in);
                let row_groups = crate::artifact::groups_restart_per_row(group, n_in);
                crate::artifact::scale_count(n_out * n_in, group, n_in, row_groups)
            })
            .sum()
    };
    let mut order = [
        Granularity::PerTensor,
        Granularity::PerChannel,
        Granularity::Grouped(group_size),
    ];
    order.sort_by_key(scales);
    order
}

/// A quantized model and its largest weight error.
type Quantized = (Artifact, f32);

/// Quantizes every weight of `input` (biases stay `f32`) and evaluates the result.
pub fn quantize_mlp(
    input: &Artifact,
    splits: &Splits,
    cfg: &QuantizeConfig,
) -> Result<QuantizeOutcome, QuantizeError> {
    cfg.validate()?;
    input
        .validate()
        .map_err(|e| QuantizeError::Model(e.to_string()))?;
    let baseline = Engine::from_artifact(input).map_err(|e| QuantizeError::Model(e.to_string()))?;
    let baseline_test = evaluate(&baseline, &splits.test).accuracy;
    let baseline_validation = evaluate(&baseline, &splits.validation).accuracy;
    let activation_ranges = calibrate(input, splits, cfg.calibration, cfg.calibration_rows);
    // validate() checked that each weight is `[outputs, inputs]` of these dimensions.
    let dims = input.mlp_config().layer_dims();
    let build = |bits: u8, granularity: Granularity| -> Result<Quantized, QuantizeError> {
        let mut artifact = input.clone();
        let mut max_error = 0f32;
        artifact.layers = input
            .layers
            .iter()
            .zip(&activation_ranges)
            .zip(&dims)
            .map(|((layer, range), &(n_in, n_out))| {
                let shape = layer.weight.shape().to_vec();
                let values = layer.weight.to_dense_values();
                let group = granularity.elements_per_scale(n_out, n_in);
                let nonzero = values.iter().filter(|v| **v != 0.0).count();
                // Positions cost about a byte each: worth it below ~60 % non-zeros.
                let sparse = (nonzero as f64) <= 0.6 * values.len() as f64;
                let weight = quantize_tensor(shape, &values, bits, group, cfg.symmetric, sparse);
                let back = weight.to_dense_values();
                for (a, b) in values.iter().zip(&back) {
                    max_error = max_error.max((a - b).abs());
                }
                // The range is stored only where the engine quantizes the layer's input.
                let input_range = (cfg.activations == Activations::Static
                    && crate::engine::runs_on_int8_kernels(&weight))
                .then_some(*range);
                LayerTensors {
                    weight,
                    bias: TensorData::DenseF32 {
                        shape: vec![layer.bias.element_count()],
                        values: layer
                            .bias
                            .to_dense_values()
                            .into_iter()
                            .map(round_to_half_precision)
                            .collect(),
                    },
                    input_range,
                }
            })
            .collect();
        artifact.validate().map_err(|e| {
            QuantizeError::Model(format!("the quantized model is inconsistent: {e}"))
        })?;
        Ok((artifact, max_error))
    };
    let validation_of = |a: &Artifact| -> Result<f64, QuantizeError> {
        let engine = Engine::from_artifact(a).map_err(|e| QuantizeError::Model(e.to_string()))?;
        Ok(evaluate(&engine, &splits.validation).accuracy)
    };
    let fixed = |bits: u8| (bits, cfg.granularity.unwrap_or(Granularity::PerChannel));
    let candidates: Vec<(u8, Granularity)> = match (cfg.bits, cfg.granularity) {
        (Bits::Eight, _) => vec![fixed(8)],
        (Bits::Four, _) => vec![fixed(4)],
        (Bits::Auto, Some(g)) => vec![(4, g), (8, g)],
        (Bits::Auto, None) => {
            let order = coarsest_first(&dims, cfg.group_size);
            [4, 8]
                .into_iter()
                .flat_map(|bits| order.map(|g| (bits, g)))
                .collect()
        }
    };
    let mut search = Vec::new();
    let (bits, granularity, (artifact, max_weight_error)) =
        if let [(bits, granularity)] = candidates[..] {
            (bits, granularity, build(bits, granularity)?)
        } else {
            // As in pruning: a validation split too small to resolve the budget allows one row.
            let one_row = 1.0 / splits.validation.rows().max(1) as f64;
            let allowed = cfg
                .max_accuracy_drop
                .max(one_row.min(2.0 * cfg.max_accuracy_drop));
            // The first candidate inside the budget; when none is, the most accurate (the
            // earlier, smaller one on a tie).
            let mut best: Option<(AutoCandidate, Quantized)> = None;
            for (bits, granularity) in candidates {
                let built = build(bits, granularity)?;
                let validation_accuracy = validation_of(&built.0)?;
                let tried = AutoCandidate {
                    bits,
                    granularity,
                    validation_accuracy,
                    inside_budget: validation_accuracy + 1e-9 >= baseline_validation - allowed,
                };
                search.push(tried);
                let better = best
                    .as_ref()
                    .is_none_or(|(b, _)| validation_accuracy > b.validation_accuracy);
                if tried.inside_budget || better {
                    best = Some((tried, built));
                }
                if tried.inside_budget {
                    break;
                }
            }
            let (tried, built) =
                best.ok_or_else(|| QuantizeError::Model("no quantization setting to try".into()))?;
            (tried.bits, tried.granularity, built)
        };
    let engine =
        Engine::from_artifact(&artifact).map_err(|e| QuantizeError::Model(e.to_string()))?;
    let test = evaluate(&engine, &splits.test);
    let validation = evaluate(&engine, &splits.validation);
    Ok(QuantizeOutcome {
        artifact,
        bits,
        granularity,
        search,
        baseline_test,
        baseline_validation,
        test,
        validation,
        activation_ranges,
        max_weight_error,
    })
}

/// The metrics a stage records for a quantization outcome.
pub fn outcome_metrics(o: &QuantizeOutcome) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::from([
        ("test_accuracy".to_string(), o.test.accuracy),
        ("validation_accuracy".to_string(), o.validation.accuracy),
        ("baseline_test_accuracy".to_string(), o.baseline_test),
        (
            "accuracy_drop".to_string(),
            o.baseline_test - o.test.accuracy,
        ),
        ("bits".to_string(), f64::from(o.bits)),
        (
            "max_weight_error".to_string(),
            f64::from(o.max_weight_error),
        ),
        (
            "parameters".to_string(),
            o.artifact.nonzero_param_count() as f64,
        ),
    ]);
    for (i, r) in o.activation_ranges.iter().enumerate() {
        m.insert(format!("activation_min.layer{i}"), f64::from(r.min));
        m.insert(format!("activation_max.layer{i}"), f64::from(r.max));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scales_of(t: &TensorData) -> Vec<f32> {
        match t {
            TensorData::QuantizedInt { scales, .. } => scales.clone(),
            other => panic!("not quantized: {}", other.kind()),
        }
    }

    #[test]
    fn scales_are_rounded_up_to_bfloat16_and_biases_to_half_precision() {
        for x in [1e-3f32, 0.0123, 0.5, 1.0, 3.3e-7, 7.77e4] {
            let s = round_up_to_bf16(x);
            assert_eq!(s.to_bits() & 0xffff, 0, "{x} → {s}");
            assert!(s >= x && (s - x) / x < 1.0 / 128.0, "{x} → {s}");
            let h = round_to_half_precision(x);
            assert_eq!(h.to_bits() & 0x1fff, 0, "{x} → {h}");
            assert!(((h - x) / x).abs() <= 1.0 / 2048.0, "{x} → {h}");
            assert_eq!(round_to_half_precision(-x), -h);
        }
        assert_eq!(round_to_half_precision(0.0), 0.0);
        // A quantized tensor's scales are bfloat16 and still hold the largest weight.
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 77.0)
            .collect();
        let t = quantize_tensor(vec![4, 16], &values, 8, 16, true, false);
        for (row, s) in values.chunks(16).zip(scales_of(&t)) {
            assert_eq!(s.to_bits() & 0xffff, 0);
            let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(m / s <= 127.0 + 1e-3, "{m} / {s}");
        }
    }

    #[test]
    fn dequantization_error_is_at_most_half_a_scale() {
        let values: Vec<f32> = (0..640)
            .map(|k| ((k * 37 % 101) as f32 - 50.0) / 17.0 + if k % 9 == 0 { 3.0 } else { 0.0 })
            .collect();
        for bits in [8u8, 4] {
            for symmetric in [true, false] {
                // Per tensor, per channel, groups that divide a row, groups of 24 (which
                // restart at every row of 64) and of 96 (which run across rows).
                for group in [640usize, 64, 16, 24, 96] {
                    let t = quantize_tensor(vec![10, 64], &values, bits, group, symmetric, false);
                    let TensorData::QuantizedInt { row_groups, .. } = t else {
                        panic!("quantized");
                    };
                    assert_eq!(row_groups, group == 24);
                    let scales = scales_of(&t);
                    let back = t.to_dense_values();
                    // Stored sparse, the same values.
                    let sparse =
                        quantize_tensor(vec![10, 64], &values, bits, group, symmetric, true);
                    assert_eq!(sparse.to_dense_values(), back);
                    for (k, (a, b)) in values.iter().zip(&back).enumerate() {
                        let s = scales[crate::artifact::scale_index(k, group, 64, row_groups)];
                        assert!(
                            (a - b).abs() <= s / 2.0 + 1e-6,
                            "bits {bits} symmetric {symmetric} group {group}: {a} vs {b}, scale {s}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn per_channel_beats_per_tensor_when_one_channel_has_a_large_range() {
        let mut values: Vec<f32> = (0..8 * 32)
            .map(|k| ((k % 13) as f32 - 6.0) * 0.01)
            .collect();
        for v in &mut values[3 * 32..4 * 32] {
            *v *= 100.0;
        }
        // Squared error over all weights, and over the 7 ordinary channels.
        let error = |group: usize| {
            let t = quantize_tensor(vec![8, 32], &values, 8, group, true, false);
            let back = t.to_dense_values();
            let sq = |k: usize| f64::from((values[k] - back[k]).powi(2));
            let all: f64 = (0..values.len()).map(sq).sum();
            let ordinary: f64 = (0..values.len()).filter(|k| k / 32 != 3).map(sq).sum();
            (all, ordinary)
        };
        let (per_tensor, per_channel) = (error(8 * 32), error(32));
        assert!(
            per_channel.0 < per_tensor.0,
            "{per_channel:?} vs {per_tensor:?}"
        );
        // The large channel no longer sets the step of the others.
        assert!(
            per_channel.1 * 100.0 < per_tensor.1,
            "{per_channel:?} vs {per_tensor:?}"
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let good = QuantizeConfig {
            bits: Bits::Auto,
            ..QuantizeConfig::default()
        };
        assert_eq!(good.validate(), Ok(()));
        let cases = [
            (
                QuantizeConfig {
                    group_size: 0,
                    ..good
                },
                "quantize.group_size must be at least 1, got 0",
            ),
            (
                QuantizeConfig {
                    calibration: Calibration::Percentile(40.0),
                    ..good
                },
                "quantize.percentile must be in (50, 100], got 40",
            ),
            (
                QuantizeConfig {
                    calibration_rows: 0,
                    ..good
                },
                "quantize.calibration_rows must be at least 1, got 0",
            ),
            (
                QuantizeConfig {
                    max_accuracy_drop: f64::NAN,
                    ..good
                },
                "quantize.max_accuracy_drop must be a fraction in [0, 1], got NaN",
            ),
            (
                QuantizeConfig {
                    max_accuracy_drop: 1.5,
                    ..good
                },
                "quantize.max_accuracy_drop must be a fraction in [0, 1], got 1.5",
            ),
        ];
        for (cfg, message) in cases {
            assert_eq!(cfg.validate().unwrap_err().to_string(), message);
        }
    }

    /// A digits MLP with these hidden widths trained for `epochs`, and its splits.
    fn trained_digits(hidden: Vec<usize>, epochs: usize) -> (Artifact, Splits) {
        use crate::data::{builtin, split};
        use crate::mlp::MlpConfig;
        use crate::train::{TrainConfig, train_mlp};
        let (train, test) = builtin("digits").unwrap();
        let splits = split(train, Some(test), 0.1, 0.0, 0).unwrap();
        let cfg = TrainConfig {
            epochs,
            ..TrainConfig::default()
        };
        let trained = train_mlp(&splits, &MlpConfig::new(64, hidden, 10), &cfg, &mut |_| {});
        (trained.unwrap().artifact, splits)
    }

    #[test]
    fn the_int8_engine_matches_the_dequantized_model_and_holds_a_quarter_of_the_bytes() {
        use crate::engine::KernelChoice;
        let (artifact, splits) = trained_digits(vec![256, 128], 8);
        // (bits, granularity, symmetric, activations, the most resident bytes in percent of
        // the float engine's). A quarter, plus per-output scales, zero points and integer
        // sums, and the padding of the 10 outputs to a vector of 16: 0.28 on this model.
        // Grouped scales run on the integer kernels too, with those per group: groups of 32
        // start every 32 inputs of every layer (0.36). Groups of 6 cut every row into runs
        // of 2 inputs (6 and 64 share a factor of 2): held as integers, their scales would
        // take more memory than the float weights, so they run on the float kernels.
        for (bits, granularity, symmetric, activations, most) in [
            (Bits::Eight, None, true, Activations::Static, 30),
            (Bits::Eight, None, false, Activations::Static, 30),
            (Bits::Eight, None, true, Activations::Dynamic, 30),
            (
                Bits::Four,
                Some(Granularity::Grouped(32)),
                false,
                Activations::Static,
                40,
            ),
            (
                Bits::Eight,
                Some(Granularity::Grouped(6)),
                true,
                Activations::Static,
                101,
            ),
        ] {
            let on_integers = most < 100;
            let q = quantize_mlp(
                &artifact,
                &splits,
                &QuantizeConfig {
                    bits,
                    granularity,
                    group_size: 32,
                    symmetric,
                    calibration: Calibration::MinMax,
                    activations,
                    calibration_rows: 100,
                    max_accuracy_drop: 0.005,
                },
            )
            .unwrap();
            // Static quantization stores each layer's calibrated input range; dynamic none.
            for (layer, range) in q.artifact.layers.iter().zip(&q.activation_ranges) {
                let stored = (activations == Activations::Static && on_integers).then_some(*range);
                assert_eq!(layer.input_range, stored);
            }
            let back = Artifact::from_bytes(&q.artifact.to_bytes()).unwrap();
            assert_eq!(back, q.artifact);
            let int8 = Engine::from_artifact(&back).unwrap();
            assert_eq!(int8.int8_layers(), [on_integers; 3], "{granularity:?}");
            let float = Engine::with_kernels(&back, KernelChoice::DenseOnly).unwrap();
            let original = Engine::from_artifact(&artifact).unwrap();
            eprintln!(
                "{bits:?} {granularity:?}: resident {} of {} bytes",
                int8.resident_weight_bytes(),
                original.resident_weight_bytes()
            );
            // 4-bit codes are held two a byte where the AVX2 kernel runs them: a little
            // over half of the 4-bit engine's bytes then (0.21 of the float engine's here).
            let packed = bits == Bits::Four && crate::engine::int8_kernel() == "avx2";
            assert_eq!(
                int8.packed_layers(),
                [packed; 3],
                "{bits:?} {granularity:?}"
            );
            let most = if packed { 25 } else { most };
            assert!(
                int8.resident_weight_bytes() * 100 < original.resident_weight_bytes() * most,
                "{} vs {}",
                int8.resident_weight_bytes(),
                original.resident_weight_bytes()
            );
            let n = splits.test.rows();
            let a = int8.logits_batch(&splits.test.features, n).unwrap();
            let b = float.logits_batch(&splits.test.features, n).unwrap();
            // The int8 engine also rounds each row's activations to 8 bits (over the
            // calibrated range, or a row's own when it is off that range or the quantization
            // is dynamic), so it is close to the dequantized float model, not equal to it:
            // within 3 % of the row's largest logit (2.1 % static on 100 calibration rows
            // with min/max, 1.4 % dynamic), and the same class on at least 99.5 % of the
            // test rows.
            let mut same_class = 0;
            let mut worst = 0f32;
            for (x, y) in a.chunks_exact(10).zip(b.chunks_exact(10)) {
                let size = 1.0 + y.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (p, q) in x.iter().zip(y) {
                    worst = worst.max((p - q).abs() / size);
                    assert!((p - q).abs() <= 0.03 * size, "{activations:?}: {p} vs {q}");
                }
                same_class += usize::from(crate::engine::argmax(x) == crate::engine::argmax(y));
            }
            eprintln!(
                "{activations:?}, symmetric {symmetric}: int8 vs dequantized float: same \
                 class on {same_class} of {n} rows, largest logit error {worst:.4} of the row's"
            );
            assert!(same_class * 1000 >= n * 995, "{same_class} of {n} agree");
            // Rows and batches run the same integer arithmetic: identical answers (the
            // float kernels' sums are ordered differently).
            for r in (0..n).filter(|_| on_integers) {
                let row = int8.logits(splits.test.row(r)).unwrap();
                assert_eq!(row, a[r * 10..(r + 1) * 10], "row {r}");
            }
            assert!(
                q.test.accuracy >= q.baseline_test - 0.01,
                "{} vs {}",
                q.test.accuracy,
                q.baseline_test
            );
        }
    }

    #[test]
    fn rows_beyond_a_min_max_calibration_are_counted_off_its_range_and_no_others() {
        let (mut model, splits) = trained_digits(vec![32], 3);
        let ranges = calibrate(&model, &splits, Calibration::MinMax, 100);
        assert_eq!(rows_off_range(&model, &splits.train), vec![None, None]);
        for (layer, range) in model.layers.iter_mut().zip(ranges) {
            layer.input_range = Some(range);
        }
        // The calibration rows themselves are inside; a row with one pixel at 10 times its
        // largest value is off the first layer's range.
        let first: Vec<usize> = (0..100).collect();
        let mut sample = splits.train.subset(&first);
        assert_eq!(rows_off_range(&model, &sample), vec![Some(0), Some(0)]);
        let brightest = sample.features.iter().fold(0f32, |m, v| m.max(*v));
        sample.features[5 * 64 + 20] = 10.0 * brightest;
        let off = rows_off_range(&model, &sample);
        assert_eq!(off[0], Some(1), "{off:?}");
    }

    #[test]
    fn auto_orders_the_granularities_by_their_number_of_scales() {
        use Granularity::*;
        let digits = [(64, 256), (256, 128), (128, 10)];
        assert_eq!(
            coarsest_first(&digits, 32),
            [PerTensor, PerChannel, Grouped(32)]
        );
        // Groups longer than every row give fewer scales than channels.
        assert_eq!(
            coarsest_first(&digits, 1024),
            [PerTensor, Grouped(1024), PerChannel]
        );
        // One group per layer counts as many scales as per tensor, which stays first.
        assert_eq!(
            coarsest_first(&[(4, 4)], 16),
            [PerTensor, Grouped(16), PerChannel]
        );
    }

    #[test]
    fn sparse_quantization_keeps_zeros_exact_and_stores_only_non_zeros() {
        let values: Vec<f32> = (0..100)
            .map(|k| {
                if k % 10 == 0 {
                    k as f32 * 0.1 - 3.05
                } else {
                    0.0
                }
            })
            .collect();
        for symmetric in [true, false] {
            let t = quantize_tensor(vec![10, 10], &values, 8, 10, symmetric, true);
            let back = t.to_dense_values();
            for (a, b) in values.iter().zip(&back) {
                if *a == 0.0 {
                    assert_eq!(*b, 0.0);
                }
            }
            let TensorData::QuantizedInt { data, indices, .. } = &t else {
                panic!("quantized")
            };
            assert_eq!((data.len(), indices.len()), (10, 10));
        }
    }
}
