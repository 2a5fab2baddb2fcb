//! The model artifact: what a pipeline stage writes and the deployer serves, and its byte
//! format (versions 2 and 3; version 1 is still read).
//!
//! # Byte layout
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `LATHEART` |
//! | 2 | format version, little-endian `u16` (2, or 3 when a tensor has groups per row) |
//! | 1 | body encoding: 0 = MessagePack, 1 = zstd-compressed MessagePack |
//! | 8 | body length in bytes, little-endian `u64` |
//! | n | body: the [`Artifact`] as MessagePack with named fields (rmp-serde) |
//! | 32 | SHA-256 of every byte before it |
//!
//! The writer keeps whichever body encoding is smaller. The body length lets a reader tell a
//! truncated file from a corrupted one.
//!
//! # Tensors (version 2)
//!
//! Every tensor's numbers are entropy-coded, each stream on its own, by the crate's
//! `codec` module (an adaptive binary range coder), losslessly:
//! - `f32` values (dense weights, the non-zeros of sparse ones, biases, quantization scales)
//!   as four byte planes, each with its own order-0 model: the sign/exponent plane of
//!   trained weights costs about two bits a value, the low mantissa planes are stored raw;
//! - the positions of a sparse tensor's non-zeros as a bitmap with one adaptive context
//!   per input column, which costs about the bitmap's entropy (≈ 0.47 bits an element at
//!   10 % density) and less where pruning emptied whole inputs;
//! - int8/int4 data as one byte stream with an order-0 model.
//!
//! Version 1 stored the same tensors as MessagePack byte strings (values as byte planes,
//! positions as varint gaps) and relied on zstd over the whole body, which shares one
//! literal table between all of them; version 2 artifacts of pruned and quantized models
//! are about a fifth smaller. Version 1 also kept 200 raw training rows as the drift
//! reference; version 2 keeps per-feature quantile bins ([`DriftReference`]), and a
//! version-1 reference is converted to them when read.
//!
//! Version 3 is version 2 plus one field, `row_groups`, on quantized tensors whose groups of
//! scales restart at every row; the writer stamps 3 only on an artifact with such a tensor
//! ([`Artifact::format_version`]), so a version-2 build reads everything else and refuses
//! that, instead of reading its groups as running over the row-major elements.
//!
//! Tensors are an enum ([`TensorData`]); a reader that meets a variant it does not know
//! reports a malformed body instead of misreading it.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::Standardizer;
use crate::mlp::MlpConfig;

/// The first bytes of every artifact.
pub const MAGIC: &[u8; 8] = b"LATHEART";
/// The newest format version this build reads. It writes the oldest version an artifact
/// needs ([`Artifact::format_version`]): 2, or 3 for groups of scales per row.
pub const FORMAT_VERSION: u16 = 3;
/// The oldest format version this build still reads.
pub const OLDEST_READABLE_VERSION: u16 = 1;
/// The number of quantile bins [`DriftReference`] aims at per feature (fewer when values
/// repeat): 5 % of the training distribution each.
pub const REFERENCE_BINS: usize = 20;

/// Magic, version, encoding and body length.
const HEADER_LEN: usize = 8 + 2 + 1 + 8;
/// The trailing SHA-256.
const DIGEST_LEN: usize = 32;
/// Body encodings (the byte after the version).
const ENCODING_MSGPACK: u8 = 0;
const ENCODING_ZSTD_MSGPACK: u8 = 1;
/// zstd level: within a few percent of the maximum ratio on weights, and fast enough for a
/// stage that writes one artifact.
const ZSTD_LEVEL: i32 = 9;
/// A decompressed body larger than this is refused rather than allocated.
const MAX_BODY_BYTES: u64 = 1 << 31;

/// Why bytes could not be read as an artifact, or why an artifact is inconsistent.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ArtifactError {
    /// The bytes do not start with the artifact magic.
    #[error("not a lathe artifact: the first bytes are not the magic \"LATHEART\"")]
    NotAnArtifact,
    /// The bytes end before the header, body or digest does.
    #[error("artifact is truncated: {expected} bytes expected, {found} present")]
    Truncated { expected: u64, found: u64 },
    /// The SHA-256 at the end does not match the content.
    #[error("artifact is corrupted: its SHA-256 is {computed} but it records {recorded}")]
    DigestMismatch { recorded: String, computed: String },
    /// The artifact was written by a newer lathe.
    #[error("artifact format version {found} is newer than this build supports ({FORMAT_VERSION})")]
    NewerVersion { found: u16 },
    /// Version 0 was never written by any lathe.
    #[error(
        "artifact format version 0 is not a valid version (the oldest readable is {OLDEST_READABLE_VERSION})"
    )]
    InvalidVersion,
    /// The body encoding byte is not one this version defines.
    #[error("artifact body encoding {found} is unknown (0 = MessagePack, 1 = zstd)")]
    UnknownEncoding { found: u8 },
    /// There are bytes after the digest.
    #[error("artifact has {extra} unexpected bytes after its digest")]
    TrailingBytes { extra: u64 },
    /// The body does not decode as an artifact.
    #[error("artifact body is malformed: {reason}")]
    Malformed { reason: String },
    /// The body decodes but its parts do not fit together.
    #[error("artifact field {field} is invalid: {reason}")]
    Invalid { field: String, reason: String },
}

/// The network family and its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Architecture {
    /// A multilayer perceptron with ReLU activations.
    Mlp(MlpConfig),
}

/// How one tensor's values are stored (in memory; see the module docs for the bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Every value as an `f32`, row-major over `shape`.
    DenseF32 {
        /// The dimensions, outermost first (`[out, in]` for a weight).
        shape: Vec<usize>,
        /// `shape.iter().product()` values, row-major.
        values: Vec<f32>,
    },
    /// Only the non-zero values of an `f32` tensor, with their positions: the storage of a
    /// pruned weight, whose size is proportional to its non-zeros, not to its shape.
    ///
    /// `indices` are positions in the row-major dense tensor, strictly increasing; they are
    /// written as a bitmap coded with one adaptive context per column (module docs).
    SparseF32 {
        /// The logical dimensions, outermost first (`[out, in]` for a weight).
        shape: Vec<usize>,
        /// Row-major positions of the stored values, strictly increasing.
        indices: Vec<u32>,
        /// The values at `indices` (exact zeros are not stored, but allowed).
        values: Vec<f32>,
    },
    /// Integer-quantized values: `value = scale · (q − zero_point)`, with one scale (and
    /// zero point) per `group` consecutive row-major elements — `group` = the row length is
    /// per output channel, = the element count is per tensor — or, with `row_groups`, per
    /// `group` consecutive elements of each row (the last group of a row shorter; see
    /// [`scale_index`]). 8-bit values are one `i8` a byte; 4-bit values (−8…7) are packed two
    /// a byte, the first in the low nibble. When `sparse`, only the elements at `indices` are
    /// stored (the rest are exactly 0.0), for a pruned and quantized weight.
    QuantizedInt {
        shape: Vec<usize>,
        /// 8 or 4.
        bits: u8,
        /// Elements per scale.
        group: usize,
        /// Whether groups restart at every row (format version 3): set only where that
        /// differs from groups over the row-major elements, i.e. where `group` is shorter
        /// than a row and does not divide it (a pruned layer 255 inputs wide, groups of 32).
        row_groups: bool,
        scales: Vec<f32>,
        /// One per scale; empty for symmetric quantization (zero point 0).
        zero_points: Vec<i8>,
        /// Whether only `indices` are stored.
        sparse: bool,
        /// Row-major positions of the stored values when `sparse` (else empty).
        indices: Vec<u32>,
        /// The quantized values, packed.
        data: Vec<u8>,
    },
}

/// The scale (and zero point) index of the element at row-major `position` of a quantized
/// tensor whose rows are `cols` long: `position / group`, or with `row_groups`
/// `row · ⌈cols / group⌉ + col / group`.
pub fn scale_index(position: usize, group: usize, cols: usize, row_groups: bool) -> usize {
    let group = group.max(1);
    if row_groups {
        let cols = cols.max(1);
        (position / cols) * cols.div_ceil(group) + (position % cols) / group
    } else {
        position / group
    }
}

/// Whether groups of `group` scales restart at every row of `cols` (`row_groups`): only
/// where that differs from groups over the row-major elements, a group shorter than a row
/// that does not divide it.
pub fn groups_restart_per_row(group: usize, cols: usize) -> bool {
    group < cols && !cols.is_multiple_of(group.max(1))
}

/// The number of scales of a quantized tensor of `elements` in rows of `cols` (see
/// [`scale_index`]).
pub fn scale_count(elements: usize, group: usize, cols: usize, row_groups: bool) -> usize {
    let group = group.max(1);
    if row_groups {
        let cols = cols.max(1);
        (elements / cols) * cols.div_ceil(group)
    } else {
        elements.div_ceil(group)
    }
}

/// The `k`-th signed value of packed quantized data.
pub fn quantized_value(data: &[u8], bits: u8, k: usize) -> i8 {
    if bits == 4 {
        let byte = data[k / 2];
        let nibble = if k.is_multiple_of(2) {
            byte & 0x0f
        } else {
            byte >> 4
        };
        // Sign-extend the 4-bit two's complement value.
        ((nibble << 4) as i8) >> 4
    } else {
        data[k] as i8
    }
}

/// Packs signed values of `bits` (8, or 4 with values in −8…7) into bytes.
pub fn pack_quantized(values: &[i8], bits: u8) -> Vec<u8> {
    if bits == 4 {
        values
            .chunks(2)
            .map(|pair| {
                let low = (pair[0] as u8) & 0x0f;
                let high = pair.get(1).map_or(0, |v| (*v as u8) & 0x0f);
                low | (high << 4)
            })
            .collect()
    } else {
        values.iter().map(|v| *v as u8).collect()
    }
}

impl TensorData {
    /// A short name of the storage kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            TensorData::DenseF32 { .. } => "dense f32",
            TensorData::SparseF32 { .. } => "sparse f32",
            TensorData::QuantizedInt {
                bits: 4,
                sparse: false,
                ..
            } => "int4",
            TensorData::QuantizedInt { sparse: false, .. } => "int8",
            TensorData::QuantizedInt { bits: 4, .. } => "sparse int4",
            TensorData::QuantizedInt { .. } => "sparse int8",
        }
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            TensorData::DenseF32 { shape, .. }
            | TensorData::SparseF32 { shape, .. }
            | TensorData::QuantizedInt { shape, .. } => shape,
        }
    }

    /// The sparse encoding of `values` (row-major over `shape`): every non-zero value and
    /// its position. Fails when the tensor has more elements than a `u32` position can
    /// address or `values` does not fill `shape`.
    pub fn sparse_from_dense(
        shape: Vec<usize>,
        values: &[f32],
    ) -> Result<TensorData, ArtifactError> {
        let expected: usize = shape.iter().product();
        if values.len() != expected {
            return Err(invalid(
                "sparse tensor",
                format!(
                    "shape {shape:?} needs {expected} values, {} given",
                    values.len()
                ),
            ));
        }
        if u32::try_from(expected).is_err() {
            return Err(invalid(
                "sparse tensor",
                format!("{expected} elements exceed the u32 positions of the sparse encoding"),
            ));
        }
        let (indices, kept): (Vec<u32>, Vec<f32>) = values
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, v)| (i as u32, *v))
            .unzip();
        Ok(TensorData::SparseF32 {
            shape,
            indices,
            values: kept,
        })
    }

    /// Every logical value, row-major over the shape (zeros filled in for a sparse
    /// tensor). Only meaningful on a validated tensor; positions out of range are skipped.
    pub fn to_dense_values(&self) -> Vec<f32> {
        match self {
            TensorData::DenseF32 { values, .. } => values.clone(),
            TensorData::SparseF32 {
                indices, values, ..
            } => {
                let mut dense = vec![0f32; self.element_count()];
                for (&i, &v) in indices.iter().zip(values) {
                    if let Some(slot) = dense.get_mut(i as usize) {
                        *slot = v;
                    }
                }
                dense
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
                data,
            } => {
                let n = self.element_count();
                let cols = shape.last().copied().unwrap_or(1);
                let mut dense = vec![0f32; n];
                let value = |k: usize, position: usize| {
                    let g = scale_index(position, *group, cols, *row_groups);
                    let q = i32::from(quantized_value(data, *bits, k));
                    let z = zero_points.get(g).map_or(0, |z| i32::from(*z));
                    scales.get(g).map_or(0.0, |s| s * (q - z) as f32)
                };
                if *sparse {
                    for (k, &p) in indices.iter().enumerate() {
                        if let Some(slot) = dense.get_mut(p as usize) {
                            *slot = value(k, p as usize);
                        }
                    }
                } else {
                    for (k, slot) in dense.iter_mut().enumerate() {
                        *slot = value(k, k);
                    }
                }
                dense
            }
        }
    }

    /// The number of non-zero values.
    pub fn nonzero_count(&self) -> usize {
        match self {
            TensorData::DenseF32 { values, .. } | TensorData::SparseF32 { values, .. } => {
                values.iter().filter(|v| **v != 0.0).count()
            }
            TensorData::QuantizedInt { .. } => {
                self.to_dense_values().iter().filter(|v| **v != 0.0).count()
            }
        }
    }

    /// The number of logical elements (the product of the shape).
    pub fn element_count(&self) -> usize {
        self.shape().iter().product()
    }

    /// The values when stored densely as `f32`.
    pub fn dense_values(&self) -> Option<&[f32]> {
        match self {
            TensorData::DenseF32 { values, .. } => Some(values),
            TensorData::SparseF32 { .. } | TensorData::QuantizedInt { .. } => None,
        }
    }

    /// Checks that the storage is consistent with the shape and holds only finite values.
    fn validate(&self, field: &str) -> Result<(), ArtifactError> {
        match self {
            TensorData::DenseF32 { shape, values } => {
                let expected = shape
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| invalid(field, format!("shape {shape:?} overflows")))?;
                if values.len() != expected {
                    return Err(invalid(
                        field,
                        format!(
                            "shape {shape:?} needs {expected} values, {} stored",
                            values.len()
                        ),
                    ));
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(invalid(field, format!("value {i} is not finite")));
                }
                Ok(())
            }
            TensorData::SparseF32 {
                shape,
                indices,
                values,
            } => {
                let elements = shape
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| invalid(field, format!("shape {shape:?} overflows")))?;
                if indices.len() != values.len() {
                    return Err(invalid(
                        field,
                        format!(
                            "{} positions but {} values stored",
                            indices.len(),
                            values.len()
                        ),
                    ));
                }
                if let Some(k) = indices.windows(2).position(|w| w[0] >= w[1]) {
                    return Err(invalid(
                        field,
                        format!(
                            "position {} ({}) does not increase on position {k} ({})",
                            k + 1,
                            indices[k + 1],
                            indices[k]
                        ),
                    ));
                }
                if let Some(&last) = indices.last()
                    && last as usize >= elements
                {
                    return Err(invalid(
                        field,
                        format!("position {last} is outside shape {shape:?} ({elements} elements)"),
                    ));
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(invalid(field, format!("value {i} is not finite")));
                }
                Ok(())
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
                data,
            } => {
                let elements = shape
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| invalid(field, format!("shape {shape:?} overflows")))?;
                if *bits != 8 && *bits != 4 {
                    return Err(invalid(field, format!("{bits} bits (8 or 4 are stored)")));
                }
                if *group == 0 {
                    return Err(invalid(field, "group of 0 elements per scale"));
                }
                let cols = shape.last().copied().unwrap_or(0);
                if *row_groups && cols == 0 {
                    return Err(invalid(field, "groups per row of a tensor without rows"));
                }
                let groups = scale_count(elements, *group, cols, *row_groups);
                if scales.len() != groups {
                    return Err(invalid(
                        field,
                        format!("{} scales for {groups} groups of {group}", scales.len()),
                    ));
                }
                if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(invalid(
                        field,
                        format!("scale {i} is not a positive finite number"),
                    ));
                }
                if !zero_points.is_empty() && zero_points.len() != groups {
                    return Err(invalid(
                        field,
                        format!("{} zero points for {groups} groups", zero_points.len()),
                    ));
                }
                if *bits == 4
                    && let Some(i) = zero_points.iter().position(|z| !(-8..=7).contains(z))
                {
                    return Err(invalid(field, format!("zero point {i} is outside 4 bits")));
                }
                let count = if *sparse {
                    if let Some(k) = indices.windows(2).position(|w| w[0] >= w[1]) {
                        return Err(invalid(
                            field,
                            format!("position {} does not increase", k + 1),
                        ));
                    }
                    if let Some(&last) = indices.last()
                        && last as usize >= elements
                    {
                        return Err(invalid(
                            field,
                            format!("position {last} is outside shape {shape:?}"),
                        ));
                    }
                    indices.len()
                } else {
                    if !indices.is_empty() {
                        return Err(invalid(field, "positions stored for a dense tensor"));
                    }
                    elements
                };
                let bytes = if *bits == 4 { count.div_ceil(2) } else { count };
                if data.len() != bytes {
                    return Err(invalid(
                        field,
                        format!(
                            "{} data bytes for {count} {bits}-bit values (need {bytes})",
                            data.len()
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The tensors of one linear layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTensors {
    /// The weight, `[out, in]` (PyTorch's layout).
    pub weight: TensorData,
    /// The bias, `[out]`.
    pub bias: TensorData,
    /// The calibrated range of this layer's input, for static activation quantization: an
    /// int8 engine layer then rounds its input to `u8` over this fixed range instead of each
    /// row's own. The input is as the engine sees it: for the first layer the raw features
    /// divided by the standardiser's scale (its mean is folded into the bias), for the
    /// others the previous layer's ReLU outputs. Absent for float layers, and for dynamic
    /// quantization; artifacts written before it read as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_range: Option<InputRange>,
}

/// A closed range of a layer's input values (see [`LayerTensors::input_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputRange {
    pub min: f32,
    pub max: f32,
}

/// One pipeline stage that shaped this artifact, oldest first in [`Artifact::lineage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageEntry {
    /// The stage name, e.g. `train`, `prune`, `quantize`, `import`.
    pub stage: String,
    /// The stage's settings as given, so a result can be reproduced.
    pub params: serde_json::Value,
    /// What the stage measured, e.g. `test_accuracy`.
    pub metrics: BTreeMap<String, f64>,
    /// When the stage finished, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// The training distribution a monitor compares live traffic against (feature and
/// prediction drift), summarised per feature as quantile bins.
///
/// For each input feature, the values of the whole training split are cut at their
/// quantiles 0, 1/[`REFERENCE_BINS`], …, 1 (rounded up to bfloat16, repeated edges merged), and
/// the share of training values in each resulting bin is kept. That is exactly what the
/// population stability index needs ([`FeatureProfile::psi`]: live values binned on the same
/// edges), and it gives the training CDF at every edge, so a Kolmogorov–Smirnov statistic is
/// the largest CDF gap over the edges ([`FeatureProfile::ks`]): exact for features whose
/// values all fall on edges (such as digits' pixel levels), otherwise a lower bound of the
/// full statistic within one bin's mass (5 %). [`DriftReference::rows`] gives the training
/// sample size for a KS p-value.
///
/// Version 1 stored 200 raw training rows instead (about 7.4 KB on the digits model,
/// more than the weights of a pruned and quantized one); these bins take about 1 KB and
/// describe the whole split rather than a sample. Shares are kept in 16-bit fixed point
/// (multiples of 1/65 535), edges as bfloat16, both rounded up front so a round trip
/// through bytes gives back exactly what is in memory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DriftReference {
    /// The number of training rows summarised.
    pub rows: u64,
    /// One profile per input feature, in input order (empty when there is no reference).
    pub features: Vec<FeatureProfile>,
    /// The share of each class among the model's predictions on the training split,
    /// indexed like `class_labels` (empty when there is no reference).
    pub predicted_class_frequencies: Vec<f64>,
}

/// One feature's training distribution as quantile bins (see [`DriftReference`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeatureProfile {
    /// Strictly increasing bin edges (bfloat16 values). Bin 0 is `(−∞, edges[0]]`, bin `j`
    /// is `(edges[j−1], edges[j]]`, the last bin is `(edges[last], +∞)`.
    pub edges: Vec<f32>,
    /// The share of training values in each bin: `edges.len() + 1` multiples of 1/65 535
    /// summing to 1.
    pub proportions: Vec<f32>,
}

/// The fixed-point unit of [`FeatureProfile::proportions`].
const SHARE_UNIT: f32 = 65_535.0;

impl FeatureProfile {
    /// The profile of one feature's training values.
    pub fn from_values(values: &[f32]) -> FeatureProfile {
        let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return FeatureProfile::default();
        }
        sorted.sort_by(f32::total_cmp);
        let n = sorted.len();
        let mut edges: Vec<f32> = (0..=REFERENCE_BINS)
            .map(|j| bf16_at_or_above(sorted[(j * (n - 1) + REFERENCE_BINS / 2) / REFERENCE_BINS]))
            .collect();
        edges.dedup();
        // Cumulative counts at each edge, then 16-bit fixed-point shares whose sum is exact.
        let mut previous = 0u32;
        let mut proportions = Vec::with_capacity(edges.len() + 1);
        for k in 0..=edges.len() {
            let at_or_below = match edges.get(k) {
                Some(e) => sorted.partition_point(|v| v <= e),
                None => n,
            };
            let cumulative =
                ((at_or_below as f64 / n as f64) * f64::from(SHARE_UNIT)).round() as u32;
            proportions.push((cumulative - previous) as f32 / SHARE_UNIT);
            previous = cumulative;
        }
        FeatureProfile { edges, proportions }
    }

    /// The bin a value falls in.
    pub fn bin_of(&self, value: f32) -> usize {
        self.edges.partition_point(|e| *e < value)
    }

    /// The share of each bin among `live` values (non-finite values are skipped).
    pub fn live_proportions(&self, live: &[f32]) -> Vec<f64> {
        let mut counts = vec![0usize; self.edges.len() + 1];
        let mut n = 0usize;
        for &v in live.iter().filter(|v| v.is_finite()) {
            counts[self.bin_of(v)] += 1;
            n += 1;
        }
        counts.iter().map(|&c| c as f64 / n.max(1) as f64).collect()
    }

    /// The population stability index of `live` against the training bins,
    /// `Σ (live − train) · ln(live / train)`, with shares floored at 10⁻⁴ so an empty bin
    /// counts as rare rather than impossible.
    pub fn psi(&self, live: &[f32]) -> f64 {
        const FLOOR: f64 = 1e-4;
        self.live_proportions(live)
            .iter()
            .zip(&self.proportions)
            .map(|(&a, &e)| {
                let (a, e) = (a.max(FLOOR), f64::from(e).max(FLOOR));
                (a - e) * (a / e).ln()
            })
            .sum()
    }

    /// The Kolmogorov–Smirnov statistic of `live` against the training distribution,
    /// evaluated at the bin edges (see [`DriftReference`]).
    pub fn ks(&self, live: &[f32]) -> f64 {
        let live = self.live_proportions(live);
        let (mut a, mut e, mut worst) = (0f64, 0f64, 0f64);
        for (l, t) in live.iter().zip(&self.proportions).take(self.edges.len()) {
            a += l;
            e += f64::from(*t);
            worst = worst.max((a - e).abs());
        }
        worst
    }

    fn validate(&self, field: &str) -> Result<(), ArtifactError> {
        if self.proportions.len() != self.edges.len() + 1 {
            return Err(invalid(
                field,
                format!(
                    "{} shares for {} edges (need one more)",
                    self.proportions.len(),
                    self.edges.len()
                ),
            ));
        }
        if let Some(k) = self
            .edges
            .windows(2)
            .position(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(invalid(field, format!("edge {} does not increase", k + 1)));
        }
        if let Some(k) = self.edges.iter().position(|e| !e.is_finite()) {
            return Err(invalid(field, format!("edge {k} is not finite")));
        }
        let units: f64 = self
            .proportions
            .iter()
            .map(|p| f64::from(*p) * f64::from(SHARE_UNIT))
            .sum();
        if (units - f64::from(SHARE_UNIT)).abs() > 0.5 {
            return Err(invalid(
                field,
                format!("shares sum to {:.4}, not 1", units / f64::from(SHARE_UNIT)),
            ));
        }
        Ok(())
    }
}

impl DriftReference {
    /// The reference of `n_rows` raw training rows (row-major in `rows`, `n_features` a
    /// row) and the model's class mix on them.
    pub fn from_rows(
        rows: &[f32],
        n_features: usize,
        predicted_class_frequencies: Vec<f64>,
    ) -> DriftReference {
        let n_rows = rows.len().checked_div(n_features).unwrap_or(0);
        let features = (0..n_features)
            .map(|f| {
                let column: Vec<f32> = (0..n_rows).map(|r| rows[r * n_features + f]).collect();
                FeatureProfile::from_values(&column)
            })
            .collect();
        DriftReference {
            rows: n_rows as u64,
            features,
            predicted_class_frequencies,
        }
    }

    /// Whether there is a reference at all (imported models have none).
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }
}

/// The stored form of [`DriftReference`]: all features' edges as one coded stream of
/// bfloat16 bits (two byte planes), each feature's edge count, and all shares as one coded
/// stream of 16-bit units.
#[derive(Serialize, Deserialize)]
struct StoredReference {
    rows: u64,
    #[serde(with = "byte_vec")]
    edge_counts: Vec<u8>,
    #[serde(with = "byte_vec")]
    edges: Vec<u8>,
    #[serde(with = "byte_vec")]
    shares: Vec<u8>,
    predicted_class_frequencies: Vec<f64>,
}

impl Serialize for DriftReference {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut edge_counts = Vec::new();
        let (mut edge_lo, mut edge_hi, mut share_lo, mut share_hi) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for f in &self.features {
            crate::codec::put_varint(&mut edge_counts, f.edges.len() as u64);
            for e in &f.edges {
                let [lo, hi] = f32_to_bf16_bits(*e).to_le_bytes();
                edge_lo.push(lo);
                edge_hi.push(hi);
            }
            for p in &f.proportions {
                let [lo, hi] = ((p * SHARE_UNIT).round() as u16).to_le_bytes();
                share_lo.push(lo);
                share_hi.push(hi);
            }
        }
        let pair = |a: &[u8], b: &[u8]| {
            let mut out = crate::codec::encode_bytes(a);
            out.extend_from_slice(&crate::codec::encode_bytes(b));
            out
        };
        StoredReference {
            rows: self.rows,
            edge_counts: crate::codec::encode_bytes(&edge_counts),
            edges: pair(&edge_lo, &edge_hi),
            shares: pair(&share_lo, &share_hi),
            predicted_class_frequencies: self.predicted_class_frequencies.clone(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DriftReference {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let stored = StoredReference::deserialize(deserializer)?;
        let err = |what: &str, e: crate::codec::CodecError| {
            D::Error::custom(format!("reference {what}: {e}"))
        };
        let counts = crate::codec::decode_bytes(&mut stored.edge_counts.as_slice())
            .map_err(|e| err("edge counts", e))?;
        let two = |bytes: &[u8], what: &str| -> Result<(Vec<u8>, Vec<u8>), D::Error> {
            let mut input = bytes;
            let lo = crate::codec::decode_bytes(&mut input).map_err(|e| err(what, e))?;
            let hi = crate::codec::decode_bytes(&mut input).map_err(|e| err(what, e))?;
            if lo.len() != hi.len() || !input.is_empty() {
                return Err(D::Error::custom(format!("reference {what}: planes differ")));
            }
            Ok((lo, hi))
        };
        let (edge_lo, edge_hi) = two(&stored.edges, "edges")?;
        let (share_lo, share_hi) = two(&stored.shares, "shares")?;
        let mut counts_input = counts.as_slice();
        let (mut e_at, mut s_at) = (0usize, 0usize);
        let mut features = Vec::new();
        while !counts_input.is_empty() {
            let k = crate::codec::take_varint(&mut counts_input)
                .map_err(|e| err("edge counts", e))? as usize;
            if k > edge_lo.len() - e_at || k + 1 > share_lo.len() - s_at {
                return Err(D::Error::custom(
                    "reference: the edge counts exceed the stored edges",
                ));
            }
            let edges = (e_at..e_at + k)
                .map(|i| bf16_bits_to_f32(u16::from_le_bytes([edge_lo[i], edge_hi[i]])))
                .collect();
            let proportions = (s_at..s_at + k + 1)
                .map(|i| f32::from(u16::from_le_bytes([share_lo[i], share_hi[i]])) / SHARE_UNIT)
                .collect();
            e_at += k;
            s_at += k + 1;
            features.push(FeatureProfile { edges, proportions });
        }
        if e_at != edge_lo.len() || s_at != share_lo.len() {
            return Err(D::Error::custom(
                "reference: more edges or shares stored than the counts use",
            ));
        }
        Ok(DriftReference {
            rows: stored.rows,
            features,
            predicted_class_frequencies: stored.predicted_class_frequencies,
        })
    }
}

/// The stored (version 2) form of [`TensorData`]: every number stream coded by
/// [`crate::codec`].
#[derive(Serialize, Deserialize)]
enum StoredTensor {
    DenseF32 {
        shape: Vec<usize>,
        #[serde(with = "byte_vec")]
        values: Vec<u8>,
    },
    SparseF32 {
        shape: Vec<usize>,
        #[serde(with = "byte_vec")]
        positions: Vec<u8>,
        #[serde(with = "byte_vec")]
        values: Vec<u8>,
    },
    QuantizedInt {
        shape: Vec<usize>,
        bits: u8,
        group: usize,
        /// Written only when true, in a version-3 file (see [`Artifact::format_version`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        row_groups: bool,
        #[serde(with = "byte_vec")]
        scales: Vec<u8>,
        zero_points: Vec<i8>,
        sparse: bool,
        #[serde(with = "byte_vec")]
        positions: Vec<u8>,
        #[serde(with = "byte_vec")]
        data: Vec<u8>,
    },
}

/// The most elements one stored tensor may declare: 2^27 (512 MiB as `f32`), far above any
/// model lathe trains. A sparse or quantized tensor of a few bytes can declare any shape, and
/// the engine expands some tensors to their dense size, so a damaged or hostile artifact
/// must be refused on reading rather than allowed to ask for gigabytes.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 27;

/// A value's MessagePack size, for [`Artifact::byte_breakdown`].
fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    rmp_serde::to_vec_named(value).map_or(0, |b| b.len())
}

/// A weight's stored bytes as (values, non-zero positions, scales and zero points), read
/// off the same stored form the artifact writes.
fn tensor_parts(t: &TensorData) -> (usize, usize, usize) {
    match t.stored() {
        StoredTensor::DenseF32 { values, .. } => (values.len(), 0, 0),
        StoredTensor::SparseF32 {
            positions, values, ..
        } => (values.len(), positions.len(), 0),
        StoredTensor::QuantizedInt {
            scales,
            zero_points,
            positions,
            data,
            ..
        } => (
            data.len(),
            positions.len(),
            scales.len() + encoded_len(&zero_points),
        ),
    }
}

/// The element count of `shape` and its row length (the last dimension), refusing shapes
/// whose count overflows or exceeds [`MAX_TENSOR_ELEMENTS`] (which a `u32` position can
/// address).
fn shape_extent(shape: &[usize]) -> Result<(usize, usize), String> {
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has more elements than a u32 can address"))?;
    if elements > MAX_TENSOR_ELEMENTS {
        return Err(format!(
            "shape {shape:?} declares {elements} elements, more than the {MAX_TENSOR_ELEMENTS} \
             a stored tensor may hold"
        ));
    }
    Ok((elements, shape.last().copied().unwrap_or(1)))
}

impl TensorData {
    /// The tensor as the artifact stores it: each stream entropy-coded (module docs).
    fn stored(&self) -> StoredTensor {
        use crate::codec::{encode_bytes, encode_f32, encode_positions};
        let positions = |shape: &[usize], indices: &[u32]| {
            let (elements, cols) = shape_extent(shape).unwrap_or((0, 1));
            encode_positions(indices, elements, cols)
        };
        match self {
            TensorData::DenseF32 { shape, values } => StoredTensor::DenseF32 {
                shape: shape.clone(),
                values: encode_f32(values),
            },
            TensorData::SparseF32 {
                shape,
                indices,
                values,
            } => StoredTensor::SparseF32 {
                shape: shape.clone(),
                positions: positions(shape, indices),
                values: encode_f32(values),
            },
            TensorData::QuantizedInt {
                shape,
                bits,
                group,
                row_groups,
                scales,
                zero_points,
                sparse,
                indices,
                data,
            } => StoredTensor::QuantizedInt {
                shape: shape.clone(),
                bits: *bits,
                group: *group,
                row_groups: *row_groups,
                scales: encode_f32(scales),
                zero_points: zero_points.clone(),
                sparse: *sparse,
                positions: if *sparse {
                    positions(shape, indices)
                } else {
                    Vec::new()
                },
                data: encode_bytes(data),
            },
        }
    }
}

impl Serialize for TensorData {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.stored().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use crate::codec::{decode_bytes, decode_f32, decode_positions};
        use serde::de::Error;
        let f32s = |bytes: &[u8], what: &str| -> Result<Vec<f32>, D::Error> {
            let mut input = bytes;
            let values =
                decode_f32(&mut input).map_err(|e| D::Error::custom(format!("{what}: {e}")))?;
            if !input.is_empty() {
                return Err(D::Error::custom(format!("{what}: trailing bytes")));
            }
            Ok(values)
        };
        let positions = |shape: &[usize], bytes: &[u8]| -> Result<Vec<u32>, D::Error> {
            let (elements, cols) = shape_extent(shape).map_err(D::Error::custom)?;
            decode_positions(bytes, elements, cols)
                .map_err(|e| D::Error::custom(format!("sparse positions: {e}")))
        };
        Ok(match StoredTensor::deserialize(deserializer)? {
            StoredTensor::DenseF32 { shape, values } => TensorData::DenseF32 {
                shape,
                values: f32s(&values, "dense values")?,
            },
            StoredTensor::SparseF32 {
                shape,
                positions: p,
                values,
            } => TensorData::SparseF32 {
                indices: positions(&shape, &p)?,
                values: f32s(&values, "sparse values")?,
                shape,
            },
            StoredTensor::QuantizedInt {
                shape,
                bits,
                group,
                row_groups,
                scales,
                zero_points,
                sparse,
                positions: p,
                data,
            } => {
                let mut input = data.as_slice();
                let data = decode_bytes(&mut input)
                    .map_err(|e| D::Error::custom(format!("quantized data: {e}")))?;
                if !input.is_empty() {
                    return Err(D::Error::custom("quantized data: trailing bytes"));
                }
                TensorData::QuantizedInt {
                    indices: if sparse {
                        positions(&shape, &p)?
                    } else {
                        Vec::new()
                    },
                    shape,
                    bits,
                    group,
                    row_groups,
                    scales: f32s(&scales, "quantization scales")?,
                    zero_points,
                    sparse,
                    data,
                }
            }
        })
    }
}

/// The version-1 body, read only: the same artifact with tensors as MessagePack byte
/// strings and a reference of raw rows.
mod v1 {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::{
        Architecture, Artifact, DriftReference, LayerTensors, LineageEntry, TensorData,
        bf16_bits_to_f32, byte_vec, f32_bytes, index_gaps,
    };
    use crate::data::Standardizer;

    #[derive(Deserialize)]
    enum Tensor {
        DenseF32 {
            shape: Vec<usize>,
            #[serde(with = "f32_bytes")]
            values: Vec<f32>,
        },
        SparseF32 {
            shape: Vec<usize>,
            #[serde(with = "index_gaps")]
            indices: Vec<u32>,
            #[serde(with = "f32_bytes")]
            values: Vec<f32>,
        },
        QuantizedInt {
            shape: Vec<usize>,
            bits: u8,
            group: usize,
            scales: Vec<f32>,
            zero_points: Vec<i8>,
            sparse: bool,
            #[serde(with = "index_gaps")]
            indices: Vec<u32>,
            #[serde(with = "byte_vec")]
            data: Vec<u8>,
        },
    }

    impl From<Tensor> for TensorData {
        fn from(t: Tensor) -> TensorData {
            match t {
                Tensor::DenseF32 { shape, values } => TensorData::DenseF32 { shape, values },
                Tensor::SparseF32 {
                    shape,
                    indices,
                    values,
                } => TensorData::SparseF32 {
                    shape,
                    indices,
                    values,
                },
                Tensor::QuantizedInt {
                    shape,
                    bits,
                    group,
                    scales,
                    zero_points,
                    sparse,
                    indices,
                    data,
                } => TensorData::QuantizedInt {
                    shape,
                    bits,
                    group,
                    row_groups: false,
                    scales,
                    zero_points,
                    sparse,
                    indices,
                    data,
                },
            }
        }
    }

    #[derive(Deserialize)]
    struct Layer {
        weight: Tensor,
        bias: Tensor,
    }

    #[derive(Deserialize)]
    struct Row(#[serde(with = "byte_vec")] Vec<u8>);

    #[derive(Deserialize)]
    struct Reference {
        rows: Vec<Row>,
        predicted_class_frequencies: Vec<f64>,
    }

    #[derive(Deserialize)]
    pub(super) struct Body {
        architecture: Architecture,
        layers: Vec<Layer>,
        preprocessing: Standardizer,
        feature_names: Vec<String>,
        class_labels: Vec<String>,
        lineage: Vec<LineageEntry>,
        reference: Reference,
        metrics: BTreeMap<String, f64>,
    }

    impl Body {
        /// The artifact, with the reference rows summarised as quantile bins.
        pub(super) fn into_artifact(self) -> Result<Artifact, String> {
            let width = self.feature_names.len();
            let mut flat = Vec::new();
            for (i, Row(bytes)) in self.reference.rows.iter().enumerate() {
                if bytes.len() != 2 * width {
                    return Err(format!(
                        "reference row {i} holds {} bytes, not {width} bfloat16 values",
                        bytes.len()
                    ));
                }
                flat.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))),
                );
            }
            let reference = if self.reference.rows.is_empty() {
                DriftReference {
                    predicted_class_frequencies: self.reference.predicted_class_frequencies,
                    ..DriftReference::default()
                }
            } else {
                DriftReference::from_rows(&flat, width, self.reference.predicted_class_frequencies)
            };
            Ok(Artifact {
                architecture: self.architecture,
                layers: self
                    .layers
                    .into_iter()
                    .map(|l| LayerTensors {
                        weight: l.weight.into(),
                        bias: l.bias.into(),
                        input_range: None,
                    })
                    .collect(),
                preprocessing: self.preprocessing,
                feature_names: self.feature_names,
                class_labels: self.class_labels,
                lineage: self.lineage,
                reference,
                metrics: self.metrics,
            })
        }
    }
}

/// The bfloat16 bit pattern nearest to `value` (round half to even); NaN stays NaN.
fn f32_to_bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        // Keep the sign and force a quiet-NaN payload so rounding cannot turn it into inf.
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// The smallest bfloat16 at or above `value` (the value itself near `f32::MAX`): a bin edge
/// rounded this way keeps the quantile's own value in the bin below it.
fn bf16_at_or_above(value: f32) -> f32 {
    let high = (value.to_bits() >> 16) as u16;
    let truncated = bf16_bits_to_f32(high);
    if truncated >= value {
        return truncated;
    }
    // Only a positive value truncates below itself: one step up in magnitude.
    let up = bf16_bits_to_f32(high.wrapping_add(1));
    if up.is_finite() { up } else { truncated }
}

/// The `f32` with the given bfloat16 bits.
fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `value` rounded to the nearest bfloat16.
#[cfg(test)]
fn round_to_bf16(value: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(value))
}

/// A trained (or imported, or compressed) model with everything needed to serve, audit and
/// monitor it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// The network family and shape; inference rebuilds the network from it.
    pub architecture: Architecture,
    /// One entry per linear layer, input to output.
    pub layers: Vec<LayerTensors>,
    /// The standardisation fitted on the training split; applied to raw request features.
    pub preprocessing: Standardizer,
    /// The input columns in order, so a request or a CSV can be checked against them.
    pub feature_names: Vec<String>,
    /// The class label of each output index.
    pub class_labels: Vec<String>,
    /// Every stage that produced this artifact, oldest first.
    pub lineage: Vec<LineageEntry>,
    /// The drift baseline (see [`DriftReference`]; also [`Artifact::drift_reference`]).
    pub reference: DriftReference,
    /// The latest headline figures (e.g. `test_accuracy`), for registries and gates.
    pub metrics: BTreeMap<String, f64>,
}

/// Shorthand for [`ArtifactError::Invalid`].
fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Frames a body as an artifact file of the given format version, zstd-compressing it when
/// that is smaller.
fn seal(version: u16, body: &[u8]) -> Vec<u8> {
    let compressed = zstd::encode_all(body, ZSTD_LEVEL).ok();
    match &compressed {
        Some(c) if c.len() < body.len() => frame_version(version, ENCODING_ZSTD_MSGPACK, c),
        _ => frame_version(version, ENCODING_MSGPACK, body),
    }
}

/// The file around a stored body: magic, version, the given encoding byte, the body's
/// length, the body as given, and the SHA-256 of all of it (module docs). The writer's own
/// framing; public so that tools (the fuzz target) can seal bodies they made or damaged.
pub fn frame(encoding: u8, body: &[u8]) -> Vec<u8> {
    frame_version(FORMAT_VERSION, encoding, body)
}

/// [`frame`] with the given format version.
fn frame_version(version: u16, encoding: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len() + DIGEST_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.push(encoding);
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(body);
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    bytes
}

/// The SHA-256 of `bytes` as lowercase hex: the digest the object store and task messages
/// carry for an artifact file.
pub fn digest_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The current time in milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Artifact {
    /// An artifact for weights that came from elsewhere (e.g. [`crate::interop`]), with a
    /// standardiser the caller fitted on the job's training split. It starts with an
    /// `import` lineage entry, no reference sample and no metrics.
    pub fn from_imported(
        config: MlpConfig,
        layers: Vec<LayerTensors>,
        preprocessing: Standardizer,
        feature_names: Vec<String>,
        class_labels: Vec<String>,
    ) -> Result<Artifact, ArtifactError> {
        let params = serde_json::json!({
            "input": config.input,
            "hidden": config.hidden,
            "classes": config.classes,
        });
        let mut artifact = Artifact {
            architecture: Architecture::Mlp(config),
            layers,
            preprocessing,
            feature_names,
            class_labels,
            lineage: Vec::new(),
            reference: DriftReference::default(),
            metrics: BTreeMap::new(),
        };
        artifact.push_lineage("import", params, BTreeMap::new());
        artifact.validate()?;
        Ok(artifact)
    }

    /// The MLP shape.
    pub fn mlp_config(&self) -> &MlpConfig {
        match &self.architecture {
            Architecture::Mlp(config) => config,
        }
    }

    /// Appends a lineage entry stamped with the current time.
    pub fn push_lineage(
        &mut self,
        stage: impl Into<String>,
        params: serde_json::Value,
        metrics: BTreeMap<String, f64>,
    ) {
        self.lineage.push(LineageEntry {
            stage: stage.into(),
            params,
            metrics,
            created_unix_ms: now_unix_ms(),
        });
    }

    /// The number of weights and biases (logical elements, whatever their storage).
    pub fn param_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.weight.element_count() + l.bias.element_count())
            .sum()
    }

    /// The number of non-zero weights and biases: what a pruned model keeps. The stages
    /// after pruning (prune, quantize, deploy) record this as their `parameters`, so a pruned
    /// model's count does not grow back to its dense shape at a later step.
    pub fn nonzero_param_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.weight.nonzero_count() + l.bias.nonzero_count())
            .sum()
    }

    /// Checks that every part fits the architecture: the layer shapes chain from the input
    /// to the classes, the preprocessing, names, labels and reference rows have matching
    /// lengths, and all numbers are finite.
    pub fn validate(&self) -> Result<(), ArtifactError> {
        let config = self.mlp_config();
        config
            .validate()
            .map_err(|e| invalid("architecture", e.to_string()))?;
        let dims = config.layer_dims();
        if dims.len() != self.layers.len() {
            return Err(invalid(
                "layers",
                format!(
                    "the architecture has {} linear layers but {} are stored",
                    dims.len(),
                    self.layers.len()
                ),
            ));
        }
        for (index, ((fan_in, fan_out), layer)) in dims.iter().zip(&self.layers).enumerate() {
            let weight_field = format!("layers[{index}].weight");
            let bias_field = format!("layers[{index}].bias");
            if layer.weight.shape() != [*fan_out, *fan_in] {
                return Err(invalid(
                    weight_field,
                    format!(
                        "shape {:?} does not chain: expected [{fan_out}, {fan_in}]",
                        layer.weight.shape()
                    ),
                ));
            }
            if layer.bias.shape() != [*fan_out] {
                return Err(invalid(
                    bias_field,
                    format!(
                        "shape {:?} does not match the layer's {fan_out} outputs",
                        layer.bias.shape()
                    ),
                ));
            }
            layer.weight.validate(&weight_field)?;
            layer.bias.validate(&bias_field)?;
            if let Some(r) = layer.input_range
                && !(r.min.is_finite() && r.max.is_finite() && r.min <= r.max)
            {
                return Err(invalid(
                    format!("layers[{index}].input_range"),
                    format!(
                        "[{}, {}] is not a finite range with min <= max",
                        r.min, r.max
                    ),
                ));
            }
        }
        let input = config.input;
        let pre = &self.preprocessing;
        if pre.mean.len() != input || pre.scale.len() != input {
            return Err(invalid(
                "preprocessing",
                format!(
                    "{} means and {} scales for {input} input features",
                    pre.mean.len(),
                    pre.scale.len()
                ),
            ));
        }
        if let Some(i) = pre.mean.iter().position(|m| !m.is_finite()) {
            return Err(invalid(format!("preprocessing.mean[{i}]"), "not finite"));
        }
        if let Some(i) = pre.scale.iter().position(|s| !s.is_finite() || *s <= 0.0) {
            return Err(invalid(
                format!("preprocessing.scale[{i}]"),
                format!("{} is not a positive finite number", pre.scale[i]),
            ));
        }
        if self.feature_names.len() != input {
            return Err(invalid(
                "feature_names",
                format!(
                    "{} names for {input} input features",
                    self.feature_names.len()
                ),
            ));
        }
        if self.class_labels.len() != config.classes {
            return Err(invalid(
                "class_labels",
                format!(
                    "{} labels for {} classes",
                    self.class_labels.len(),
                    config.classes
                ),
            ));
        }
        let profiles = &self.reference.features;
        if !profiles.is_empty() && profiles.len() != input {
            return Err(invalid(
                "reference.features",
                format!(
                    "{} feature profiles for {input} input features",
                    profiles.len()
                ),
            ));
        }
        for (i, profile) in profiles.iter().enumerate() {
            profile.validate(&format!("reference.features[{i}]"))?;
        }
        let frequencies = &self.reference.predicted_class_frequencies;
        if !frequencies.is_empty() && frequencies.len() != config.classes {
            return Err(invalid(
                "reference.predicted_class_frequencies",
                format!(
                    "{} values for {} classes",
                    frequencies.len(),
                    config.classes
                ),
            ));
        }
        Ok(())
    }

    /// The drift baseline: per-feature quantile bins of the training split and the model's
    /// class mix on it (empty for an imported model).
    pub fn drift_reference(&self) -> &DriftReference {
        &self.reference
    }

    /// Where an artifact's bytes go: each part's share of the encoded file — per layer its
    /// weight values, the weight's non-zero positions, its
    /// scales (and zero points), and its bias; then the preprocessing, the drift reference,
    /// the lineage and metrics, the names, and the framing (header, digest, MessagePack field
    /// names). Each part is measured as its MessagePack encoding; when the file's body is
    /// zstd-compressed, the parts are scaled to the compressed size, so the shares always sum
    /// to [`Artifact::to_bytes`]'s length.
    pub fn byte_breakdown(&self) -> Vec<(String, usize)> {
        let mut parts: Vec<(String, usize)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let (values, positions, scales) = tensor_parts(&l.weight);
            parts.push((format!("layer {i} weight values"), values));
            if positions > 0 {
                parts.push((format!("layer {i} weight positions"), positions));
            }
            if scales > 0 {
                parts.push((format!("layer {i} weight scales"), scales));
            }
            parts.push((format!("layer {i} bias"), encoded_len(&l.bias)));
        }
        parts.push(("preprocessing".into(), encoded_len(&self.preprocessing)));
        parts.push(("drift reference".into(), encoded_len(&self.reference)));
        parts.push((
            "lineage and metrics".into(),
            encoded_len(&self.lineage) + encoded_len(&self.metrics),
        ));
        parts.push((
            "feature names and class labels".into(),
            encoded_len(&self.feature_names) + encoded_len(&self.class_labels),
        ));
        let body = self.body();
        let total = seal(self.format_version(), &body).len();
        let stored_body = total - HEADER_LEN - DIGEST_LEN;
        if stored_body < body.len() {
            // zstd shrank the body: scale the parts to what they take in it.
            let f = stored_body as f64 / body.len().max(1) as f64;
            for (_, n) in &mut parts {
                *n = (*n as f64 * f).round() as usize;
            }
        }
        let counted: usize = parts.iter().map(|(_, n)| n).sum();
        parts.push(("framing".into(), total.saturating_sub(counted)));
        parts
    }

    /// Encodes the artifact in the current byte format (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        seal(self.format_version(), &self.body())
    }

    /// The version this artifact is written as: the oldest whose readers read it right, so
    /// that a build one version behind still reads every artifact that needs nothing newer.
    /// Version 3 added groups of scales that restart at every row (`row_groups`); a version-2
    /// reader would take them for groups over the row-major elements, and refuses the file
    /// instead.
    pub fn format_version(&self) -> u16 {
        let row_groups = self
            .layers
            .iter()
            .flat_map(|l| [&l.weight, &l.bias])
            .any(|t| {
                matches!(
                    t,
                    TensorData::QuantizedInt {
                        row_groups: true,
                        ..
                    }
                )
            });
        if row_groups { 3 } else { 2 }
    }

    /// The body: the artifact as MessagePack with named fields.
    fn body(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self)
            // Every field is a plain struct, enum, string, number or map with string keys,
            // which MessagePack always encodes.
            .expect("artifact serializes to MessagePack")
    }

    /// Decodes and validates an artifact. Checks, in order: the magic, the version, the
    /// length, the digest, the body, and the consistency of its parts.
    pub fn from_bytes(bytes: &[u8]) -> Result<Artifact, ArtifactError> {
        let found = bytes.len() as u64;
        if bytes.len() < MAGIC.len() {
            return Err(if MAGIC.starts_with(bytes) {
                ArtifactError::Truncated {
                    expected: (HEADER_LEN + DIGEST_LEN) as u64,
                    found,
                }
            } else {
                ArtifactError::NotAnArtifact
            });
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(ArtifactError::NotAnArtifact);
        }
        if bytes.len() < HEADER_LEN {
            return Err(ArtifactError::Truncated {
                expected: (HEADER_LEN + DIGEST_LEN) as u64,
                found,
            });
        }
        // The version is checked before the digest: a newer format may place its digest
        // elsewhere, and "newer version" is the useful message for it.
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version > FORMAT_VERSION {
            return Err(ArtifactError::NewerVersion { found: version });
        }
        if version < OLDEST_READABLE_VERSION {
            return Err(ArtifactError::InvalidVersion);
        }
        let encoding = bytes[10];
        let mut length = [0u8; 8];
        length.copy_from_slice(&bytes[11..HEADER_LEN]);
        let body_len = u64::from_le_bytes(length);
        let expected = body_len
            .checked_add((HEADER_LEN + DIGEST_LEN) as u64)
            .ok_or_else(|| ArtifactError::Malformed {
                reason: format!("body length {body_len} is impossible"),
            })?;
        if found < expected {
            return Err(ArtifactError::Truncated { expected, found });
        }
        if found > expected {
            return Err(ArtifactError::TrailingBytes {
                extra: found - expected,
            });
        }
        let digest_at = bytes.len() - DIGEST_LEN;
        let computed = Sha256::digest(&bytes[..digest_at]);
        if computed.as_slice() != &bytes[digest_at..] {
            return Err(ArtifactError::DigestMismatch {
                recorded: hex::encode(&bytes[digest_at..]),
                computed: hex::encode(computed),
            });
        }
        let body = &bytes[HEADER_LEN..digest_at];
        let artifact: Artifact = match encoding {
            ENCODING_MSGPACK => decode_body(body, version)?,
            ENCODING_ZSTD_MSGPACK => {
                let mut decoded = Vec::new();
                zstd::stream::read::Decoder::new(body)
                    .and_then(|d| d.take(MAX_BODY_BYTES + 1).read_to_end(&mut decoded))
                    .map_err(|e| ArtifactError::Malformed {
                        reason: format!("zstd: {e}"),
                    })?;
                if decoded.len() as u64 > MAX_BODY_BYTES {
                    return Err(ArtifactError::Malformed {
                        reason: format!("body decompresses to more than {MAX_BODY_BYTES} bytes"),
                    });
                }
                decode_body(&decoded, version)?
            }
            other => return Err(ArtifactError::UnknownEncoding { found: other }),
        };
        artifact.validate()?;
        Ok(artifact)
    }
}

/// Decodes the MessagePack body of the given format version.
fn decode_body(body: &[u8], version: u16) -> Result<Artifact, ArtifactError> {
    let malformed = |reason: String| ArtifactError::Malformed { reason };
    if version == 1 {
        let old: v1::Body = rmp_serde::from_slice(body).map_err(|e| malformed(e.to_string()))?;
        return old
            .into_artifact()
            .map_err(|reason| malformed(format!("version 1 body: {reason}")));
    }
    let artifact: Artifact = rmp_serde::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    if artifact.format_version() > version {
        return Err(malformed(format!(
            "groups of scales per row need format version {}, the file says {version}",
            artifact.format_version()
        )));
    }
    Ok(artifact)
}

/// Serde for a `Vec<u8>` as one byte string (MessagePack `bin`) rather than an array.
mod byte_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(ByteVisitor)
    }

    /// Accepts a byte string, or a sequence of bytes (what JSON gives back).
    struct ByteVisitor;

    impl<'de> serde::de::Visitor<'de> for ByteVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            Ok(bytes)
        }
    }
}

/// Version 1's serde for strictly increasing `u32` positions as one byte string of LEB128
/// varints (read for old artifacts; written only by tests): the
/// first position, then each gap to the next. A decreasing or repeated position cannot be
/// written this way, so the writer stores the gap as 0 and the reader's validation (which
/// requires strictly increasing positions) rejects the artifact rather than misplacing values.
mod index_gaps {
    use serde::Deserializer;
    #[cfg(test)]
    use serde::Serializer;

    #[cfg(test)]
    pub fn serialize<S: Serializer>(indices: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(indices.len() + 4);
        let mut previous = 0u32;
        for (k, &index) in indices.iter().enumerate() {
            let mut gap = if k == 0 {
                index
            } else {
                index.saturating_sub(previous)
            };
            previous = index;
            loop {
                let low = (gap & 0x7f) as u8;
                gap >>= 7;
                if gap == 0 {
                    bytes.push(low);
                    break;
                }
                bytes.push(low | 0x80);
            }
        }
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        let bytes = super::byte_vec::deserialize(deserializer)?;
        let mut indices = Vec::with_capacity(bytes.len());
        let mut position = 0u64;
        let mut gap = 0u64;
        let mut shift = 0u32;
        for &b in &bytes {
            if shift > 28 {
                return Err(serde::de::Error::custom(
                    "a sparse position gap is longer than a u32 varint",
                ));
            }
            gap |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                position = if indices.is_empty() {
                    gap
                } else {
                    position + gap
                };
                let index = u32::try_from(position).map_err(|_| {
                    serde::de::Error::custom(format!("sparse position {position} exceeds u32"))
                })?;
                indices.push(index);
                gap = 0;
                shift = 0;
            } else {
                shift += 7;
            }
        }
        if shift != 0 {
            return Err(serde::de::Error::custom(
                "the sparse positions end inside a varint",
            ));
        }
        Ok(indices)
    }
}

/// Version 1's serde (read for old artifacts; written only by tests) for a `Vec<f32>` as one
/// byte string of four byte planes: the lowest byte of every
/// value, then every second byte, and so on (little-endian order within a value). The high
/// planes (sign and exponent) of trained weights are repetitive; grouped, zstd shrinks a
/// trained dense layer by about 14 % instead of 7 % for interleaved floats.
mod f32_bytes {
    use serde::Deserializer;
    #[cfg(test)]
    use serde::Serializer;

    #[cfg(test)]
    pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let n = values.len();
        let mut bytes = vec![0u8; n * 4];
        for (i, v) in values.iter().enumerate() {
            for (plane, b) in v.to_le_bytes().into_iter().enumerate() {
                bytes[plane * n + i] = b;
            }
        }
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        let bytes = super::byte_vec::deserialize(deserializer)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(format!(
                "{} bytes is not a whole number of f32 values",
                bytes.len()
            )));
        }
        let n = bytes.len() / 4;
        Ok((0..n)
            .map(|i| {
                f32::from_le_bytes([bytes[i], bytes[n + i], bytes[2 * n + i], bytes[3 * n + i]])
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sparse_encoding_round_trips_exactly_and_grows_with_the_non_zeros() {
        // Gaps of 1, of 127/128 (the one- and two-byte varint edge), a long run, and
        // values whose bits (negative zero excepted) must survive unchanged.
        let mut dense = vec![0f32; 70_000];
        for (k, i) in [0usize, 1, 128, 256, 383, 20_000, 69_999]
            .into_iter()
            .enumerate()
        {
            dense[i] = (k as f32 + 0.123_456_7) * if k % 2 == 0 { 1.0 } else { -1e-7 };
        }
        let sparse = TensorData::sparse_from_dense(vec![700, 100], &dense).unwrap();
        sparse.validate("t").unwrap();
        assert_eq!(sparse.nonzero_count(), 7);
        let bytes = rmp_serde::to_vec_named(&sparse).unwrap();
        let back: TensorData = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, sparse);
        let restored = back.to_dense_values();
        assert!(
            restored
                .iter()
                .zip(&dense)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // 7 values: a few dozen bytes, not the 280 000 of the dense tensor.
        assert!(bytes.len() < 120, "{} bytes", bytes.len());
    }

    /// A weight of `rows × cols` with about `density` of its values non-zero, whole columns
    /// (inputs) empty as pruning leaves them, and trained-looking magnitudes.
    fn pruned(rows: usize, cols: usize, density: f64, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(3);
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..rows * cols)
            .map(|k| {
                let live_column = !(k % cols).is_multiple_of(5);
                if live_column && next() < density * 1.25 {
                    ((next() - 0.5) * 0.2) as f32
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn version_2_sparse_storage_is_proportional_to_the_non_zeros_and_beats_version_1() {
        let v1_size = |t: &TensorData| {
            #[derive(Serialize)]
            struct V1 {
                #[serde(with = "index_gaps")]
                indices: Vec<u32>,
                #[serde(with = "f32_bytes")]
                values: Vec<f32>,
            }
            let TensorData::SparseF32 {
                indices, values, ..
            } = t
            else {
                panic!("sparse")
            };
            let body = rmp_serde::to_vec_named(&V1 {
                indices: indices.clone(),
                values: values.clone(),
            })
            .unwrap();
            zstd::encode_all(body.as_slice(), ZSTD_LEVEL).unwrap().len()
        };
        let mut sizes = Vec::new();
        for density in [0.1, 0.05] {
            let dense = pruned(256, 128, density, 1);
            let t = TensorData::sparse_from_dense(vec![256, 128], &dense).unwrap();
            let bytes = rmp_serde::to_vec_named(&t).unwrap();
            let back: TensorData = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back, t);
            let nnz = t.nonzero_count();
            // Values: a little over three bytes each (random mantissas); positions: under
            // the 0.47 bits an element of an unstructured 10 % bitmap.
            assert!(
                (bytes.len() as f64) < nnz as f64 * 3.4 + 0.47 / 8.0 * dense.len() as f64,
                "{} bytes for {nnz} non-zeros",
                bytes.len()
            );
            assert!(
                bytes.len() < v1_size(&t),
                "{} vs {}",
                bytes.len(),
                v1_size(&t)
            );
            sizes.push((nnz, bytes.len()));
        }
        // Half the non-zeros, well under 60 % of the bytes.
        assert!(sizes[1].0 * 10 < sizes[0].0 * 6);
        assert!(sizes[1].1 * 10 < sizes[0].1 * 6, "{sizes:?}");
    }

    #[test]
    fn quantized_tensors_round_trip_dense_and_sparse() {
        let dense = pruned(64, 40, 0.1, 2);
        for sparse in [false, true] {
            for bits in [8u8, 4] {
                let t =
                    crate::quantize::quantize_tensor(vec![64, 40], &dense, bits, 40, true, sparse);
                t.validate("q").unwrap();
                let bytes = rmp_serde::to_vec_named(&t).unwrap();
                let back: TensorData = rmp_serde::from_slice(&bytes).unwrap();
                assert_eq!(back, t, "bits {bits} sparse {sparse}");
            }
        }
    }

    #[test]
    fn damaged_tensor_streams_are_malformed_errors_naming_the_stream() {
        let t = TensorData::sparse_from_dense(vec![64, 40], &pruned(64, 40, 0.1, 3)).unwrap();
        let TensorData::SparseF32 {
            shape,
            indices,
            values,
        } = &t
        else {
            panic!("sparse")
        };
        let good_positions = crate::codec::encode_positions(indices, 64 * 40, 40);
        let good_values = crate::codec::encode_f32(values);
        let cases = [
            (
                good_positions[..good_positions.len() - 2].to_vec(),
                good_values.clone(),
                "sparse positions: the coded stream ends early",
            ),
            (
                good_positions.clone(),
                good_values[..good_values.len() - 1].to_vec(),
                "sparse values",
            ),
        ];
        for (positions, values, expected) in cases {
            let stored = StoredTensor::SparseF32 {
                shape: shape.clone(),
                positions,
                values,
            };
            let bytes = rmp_serde::to_vec_named(&stored).unwrap();
            let err = rmp_serde::from_slice::<TensorData>(&bytes).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        // A shape too large for u32 positions is refused before any decoding.
        let stored = StoredTensor::SparseF32 {
            shape: vec![1 << 20, 1 << 20],
            positions: good_positions,
            values: good_values,
        };
        let bytes = rmp_serde::to_vec_named(&stored).unwrap();
        let err = rmp_serde::from_slice::<TensorData>(&bytes).unwrap_err();
        assert!(
            err.to_string().contains("a stored tensor may hold"),
            "{err}"
        );
        // So is one that fits a u32 but would expand to gigabytes (a sparse tensor of a
        // few bytes can declare it), and one whose element count overflows.
        for (shape, expected) in [
            (vec![60_000, 60_000], "a stored tensor may hold"),
            (vec![usize::MAX, 2], "more elements than a u32"),
        ] {
            let stored = StoredTensor::SparseF32 {
                shape,
                positions: vec![1],
                values: crate::codec::encode_f32(&[]),
            };
            let bytes = rmp_serde::to_vec_named(&stored).unwrap();
            let err = rmp_serde::from_slice::<TensorData>(&bytes).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn drift_reference_bins_support_psi_and_ks_and_round_trip() {
        // Feature 0: 17 discrete levels; feature 1: continuous; feature 2: constant.
        let n = 2000;
        let rows: Vec<f32> = (0..n)
            .flat_map(|r| {
                let r = r as f32;
                [(r % 17.0).floor(), (r * 0.618).fract() * 10.0 - 5.0, 3.0]
            })
            .collect();
        let reference = DriftReference::from_rows(&rows, 3, vec![0.25, 0.75]);
        assert_eq!(reference.rows, n as u64);
        assert_eq!(reference.features.len(), 3);
        for f in &reference.features {
            f.validate("f").unwrap();
            assert!(f.edges.len() <= REFERENCE_BINS + 1);
        }
        assert_eq!(reference.features[2].edges, vec![3.0]);
        assert_eq!(reference.features[2].proportions, vec![1.0, 0.0]);
        // The training data itself does not drift; a shifted sample does.
        let column = |f: usize| -> Vec<f32> { (0..n).map(|r| rows[r * 3 + f]).collect() };
        for f in 0..3 {
            assert!(reference.features[f].psi(&column(f)) < 0.01, "feature {f}");
            assert!(reference.features[f].ks(&column(f)) < 0.01, "feature {f}");
        }
        let shifted: Vec<f32> = column(1).iter().map(|v| v + 2.0).collect();
        assert!(reference.features[1].psi(&shifted) > 0.5);
        let ks = reference.features[1].ks(&shifted);
        assert!((ks - 0.2).abs() < 0.06, "KS {ks} (true value 0.2)");
        // Discrete levels fall on edges: the KS statistic is exact there.
        let high: Vec<f32> = column(0).into_iter().filter(|v| *v >= 8.0).collect();
        let exact = 8.0 / 17.0;
        assert!((reference.features[0].ks(&high) - exact).abs() < 0.01);
        // Round trip through the stored form, and a small footprint.
        let bytes = rmp_serde::to_vec_named(&reference).unwrap();
        let back: DriftReference = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, reference);
        // Three features of 2 000 rows in a few hundred bytes (the rows: 12 KB as bf16).
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
    }

    #[test]
    fn a_version_1_artifact_is_still_read() {
        #[derive(Serialize)]
        enum V1Tensor {
            DenseF32 {
                shape: Vec<usize>,
                #[serde(with = "f32_bytes")]
                values: Vec<f32>,
            },
            SparseF32 {
                shape: Vec<usize>,
                #[serde(with = "index_gaps")]
                indices: Vec<u32>,
                #[serde(with = "f32_bytes")]
                values: Vec<f32>,
            },
        }
        #[derive(Serialize)]
        struct V1Layer {
            weight: V1Tensor,
            bias: V1Tensor,
        }
        #[derive(Serialize)]
        struct V1Row(#[serde(with = "byte_vec")] Vec<u8>);
        #[derive(Serialize)]
        struct V1Reference {
            rows: Vec<V1Row>,
            predicted_class_frequencies: Vec<f64>,
        }
        #[derive(Serialize)]
        struct V1Body {
            architecture: Architecture,
            layers: Vec<V1Layer>,
            preprocessing: crate::data::Standardizer,
            feature_names: Vec<String>,
            class_labels: Vec<String>,
            lineage: Vec<LineageEntry>,
            reference: V1Reference,
            metrics: BTreeMap<String, f64>,
        }
        let w0 = pruned(4, 3, 0.5, 4);
        let t0 = TensorData::sparse_from_dense(vec![4, 3], &w0).unwrap();
        let TensorData::SparseF32 {
            indices, values, ..
        } = &t0
        else {
            panic!("sparse")
        };
        let rows: Vec<Vec<f32>> = (0..50)
            .map(|r| vec![r as f32, (r % 4) as f32, 0.5])
            .collect();
        let body = V1Body {
            architecture: Architecture::Mlp(MlpConfig::new(3, vec![4], 2)),
            layers: vec![
                V1Layer {
                    weight: V1Tensor::SparseF32 {
                        shape: vec![4, 3],
                        indices: indices.clone(),
                        values: values.clone(),
                    },
                    bias: V1Tensor::DenseF32 {
                        shape: vec![4],
                        values: vec![0.1, 0.2, 0.3, 0.4],
                    },
                },
                V1Layer {
                    weight: V1Tensor::DenseF32 {
                        shape: vec![2, 4],
                        values: (0..8).map(|k| k as f32 * 0.5 - 2.0).collect(),
                    },
                    bias: V1Tensor::DenseF32 {
                        shape: vec![2],
                        values: vec![0.0, -1.0],
                    },
                },
            ],
            preprocessing: crate::data::Standardizer {
                mean: vec![0.0; 3],
                scale: vec![1.0; 3],
            },
            feature_names: vec!["a".into(), "b".into(), "c".into()],
            class_labels: vec!["no".into(), "yes".into()],
            lineage: Vec::new(),
            reference: V1Reference {
                rows: rows
                    .iter()
                    .map(|r| {
                        V1Row(
                            r.iter()
                                .flat_map(|v| f32_to_bf16_bits(*v).to_le_bytes())
                                .collect(),
                        )
                    })
                    .collect(),
                predicted_class_frequencies: vec![0.4, 0.6],
            },
            metrics: BTreeMap::from([("test_accuracy".to_string(), 0.9)]),
        };
        let body = zstd::encode_all(rmp_serde::to_vec_named(&body).unwrap().as_slice(), 3).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.push(ENCODING_ZSTD_MSGPACK);
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        let artifact = Artifact::from_bytes(&bytes).expect("version 1 is read");
        assert_eq!(artifact.layers[0].weight, t0);
        assert_eq!(artifact.layers[1].bias.to_dense_values(), vec![0.0, -1.0]);
        let reference = artifact.drift_reference();
        assert_eq!(reference.rows, 50);
        assert_eq!(reference.predicted_class_frequencies, vec![0.4, 0.6]);
        assert_eq!(reference.features[1].edges, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(reference.features[2].edges, vec![0.5]);
        // Written again, it is a version-2 artifact (nothing in it needs version 3) with the same content.
        let again = artifact.to_bytes();
        assert_eq!(u16::from_le_bytes([again[8], again[9]]), 2);
        assert_eq!(Artifact::from_bytes(&again).unwrap(), artifact);
    }

    #[test]
    fn four_bit_packing_round_trips_every_value() {
        let values: Vec<i8> = (-8..=7).chain([3, -8, 7]).collect();
        let packed = pack_quantized(&values, 4);
        assert_eq!(packed.len(), values.len().div_ceil(2));
        for (k, &v) in values.iter().enumerate() {
            assert_eq!(quantized_value(&packed, 4, k), v, "value {k}");
        }
        let eight: Vec<i8> = vec![-128, -1, 0, 1, 127];
        let packed = pack_quantized(&eight, 8);
        for (k, &v) in eight.iter().enumerate() {
            assert_eq!(quantized_value(&packed, 8, k), v);
        }
    }

    #[test]
    fn a_sparse_tensor_with_unordered_or_out_of_range_positions_is_refused() {
        let unordered = TensorData::SparseF32 {
            shape: vec![2, 3],
            indices: vec![4, 2],
            values: vec![1.0, 2.0],
        };
        let err = unordered.validate("layers[0].weight").unwrap_err();
        assert!(err.to_string().contains("layers[0].weight"), "{err}");
        let outside = TensorData::SparseF32 {
            shape: vec![2, 3],
            indices: vec![1, 6],
            values: vec![1.0, 2.0],
        };
        assert!(
            outside
                .validate("w")
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        let mismatched = TensorData::SparseF32 {
            shape: vec![2, 3],
            indices: vec![1],
            values: vec![1.0, 2.0],
        };
        assert!(mismatched.validate("w").is_err());
    }

    #[test]
    fn bf16_rounding_is_idempotent_and_exact_for_small_integers() {
        for v in [0.0f32, 1.0, 16.0, 255.0, -3.0, 1e30, 1e-30] {
            let once = round_to_bf16(v);
            assert_eq!(round_to_bf16(once), once);
        }
        for i in 0..=256 {
            assert_eq!(round_to_bf16(i as f32), i as f32);
        }
        assert!((round_to_bf16(std::f32::consts::PI) - std::f32::consts::PI).abs() < 0.02);
    }
}
