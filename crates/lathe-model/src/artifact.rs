//! The model artifact: what a pipeline stage writes and the deployer serves, and its byte
//! format (version 1).
//!
//! # Byte layout, version 1
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `LATHEART` |
//! | 2 | format version, little-endian `u16` (= 1) |
//! | 1 | body encoding: 0 = MessagePack, 1 = zstd-compressed MessagePack |
//! | 8 | body length in bytes, little-endian `u64` |
//! | n | body: the [`Artifact`] as MessagePack with named fields (rmp-serde) |
//! | 32 | SHA-256 of every byte before it |
//!
//! The writer keeps whichever encoding is smaller (zstd wins for every trained model seen so
//! far). The body length lets a reader tell a truncated file from a corrupted one. Dense
//! tensor values are one MessagePack `bin` of four byte planes (every value's lowest byte,
//! then every second byte, …), not an array of floats, which would cost 5 bytes per `f32`;
//! zstd compresses the planes about twice as well as interleaved floats.
//!
//! Tensors are an enum ([`TensorData`]) so later stages can add sparse and int8 storage as
//! new variants; a reader that meets a variant it does not know reports a malformed body
//! instead of misreading it.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::Standardizer;
use crate::mlp::MlpConfig;

/// The first bytes of every artifact.
pub const MAGIC: &[u8; 8] = b"LATHEART";
/// The newest format version this build reads and the one it writes.
pub const FORMAT_VERSION: u16 = 1;
/// The most rows [`ReferenceSample::from_rows`] keeps; enough for PSI-style drift checks
/// without letting the sample outweigh a compressed model.
pub const REFERENCE_ROWS: usize = 200;

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
    #[error("artifact format version 0 is not a valid version")]
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

/// How one tensor's values are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TensorData {
    /// Every value as an `f32`, row-major over `shape`.
    DenseF32 {
        /// The dimensions, outermost first (`[out, in]` for a weight).
        shape: Vec<usize>,
        /// `shape.iter().product()` values, row-major.
        #[serde(with = "f32_bytes")]
        values: Vec<f32>,
    },
    /// Only the non-zero values of an `f32` tensor, with their positions: the storage of a
    /// pruned weight, whose size is proportional to its non-zeros, not to its shape.
    ///
    /// `indices` are positions in the row-major dense tensor, strictly increasing; they are
    /// written as LEB128 varints of the gaps between consecutive positions (one byte per
    /// non-zero while the gaps stay under 128, i.e. at any sparsity a pruned MLP reaches),
    /// and `values` as the same four byte planes as [`TensorData::DenseF32`].
    SparseF32 {
        /// The logical dimensions, outermost first (`[out, in]` for a weight).
        shape: Vec<usize>,
        /// Row-major positions of the stored values, strictly increasing.
        #[serde(with = "index_gaps")]
        indices: Vec<u32>,
        /// The values at `indices` (exact zeros are not stored, but allowed).
        #[serde(with = "f32_bytes")]
        values: Vec<f32>,
    },
    /// Integer-quantized values: `value = scale · (q − zero_point)`, with one scale (and
    /// zero point) per `group` consecutive row-major elements — `group` = the row length is
    /// per output channel, = the element count is per tensor. 8-bit values are one `i8` a
    /// byte; 4-bit values (−8…7) are packed two a byte, the first in the low nibble. When
    /// `sparse`, only the elements at `indices` are stored (the rest are exactly 0.0), for a
    /// pruned and quantized weight.
    QuantizedInt {
        shape: Vec<usize>,
        /// 8 or 4.
        bits: u8,
        /// Elements per scale.
        group: usize,
        scales: Vec<f32>,
        /// One per scale; empty for symmetric quantization (zero point 0).
        zero_points: Vec<i8>,
        /// Whether only `indices` are stored.
        sparse: bool,
        /// Row-major positions of the stored values when `sparse` (else empty).
        #[serde(with = "index_gaps")]
        indices: Vec<u32>,
        /// The quantized values, packed.
        #[serde(with = "byte_vec")]
        data: Vec<u8>,
    },
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
                bits,
                group,
                scales,
                zero_points,
                sparse,
                indices,
                data,
                ..
            } => {
                let n = self.element_count();
                let mut dense = vec![0f32; n];
                let value = |k: usize, position: usize| {
                    let g = position / (*group).max(1);
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
                let groups = elements.div_ceil(*group);
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

/// Raw training rows and the model's prediction mix on them: the baseline a monitor
/// compares live traffic against (feature and prediction drift).
///
/// The rows are stored as bfloat16 (2 bytes a value: 8 significant bits and `f32`'s range),
/// plenty for binning a distribution and half the bytes of `f32`. [`ReferenceSample::from_rows`]
/// rounds the rows to bfloat16 up front, so what is in memory is exactly what a round trip
/// through bytes gives back; values put into `features` directly are rounded on writing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReferenceSample {
    /// Raw (unstandardised) feature rows, at most [`REFERENCE_ROWS`] of them.
    pub features: Vec<Vec<f32>>,
    /// The share of each class among the model's predictions on `features`, indexed like
    /// `class_labels` (empty when there is no sample).
    pub predicted_class_frequencies: Vec<f64>,
}

impl ReferenceSample {
    /// A sample of the first [`REFERENCE_ROWS`] of `rows`, rounded to bfloat16.
    pub fn from_rows(rows: Vec<Vec<f32>>, predicted_class_frequencies: Vec<f64>) -> Self {
        let features = rows
            .into_iter()
            .take(REFERENCE_ROWS)
            .map(|row| row.into_iter().map(round_to_bf16).collect())
            .collect();
        ReferenceSample {
            features,
            predicted_class_frequencies,
        }
    }
}

/// The stored form of [`ReferenceSample`]: each row one byte string of bfloat16 values.
#[derive(Serialize, Deserialize)]
struct StoredReference {
    rows: Vec<Bf16Row>,
    predicted_class_frequencies: Vec<f64>,
}

/// One row as little-endian bfloat16 values.
#[derive(Serialize, Deserialize)]
struct Bf16Row(#[serde(with = "byte_vec")] Vec<u8>);

impl Serialize for ReferenceSample {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rows = self
            .features
            .iter()
            .map(|row| {
                Bf16Row(
                    row.iter()
                        .flat_map(|v| f32_to_bf16_bits(*v).to_le_bytes())
                        .collect(),
                )
            })
            .collect();
        StoredReference {
            rows,
            predicted_class_frequencies: self.predicted_class_frequencies.clone(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ReferenceSample {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredReference::deserialize(deserializer)?;
        let mut features = Vec::with_capacity(stored.rows.len());
        for (i, Bf16Row(bytes)) in stored.rows.into_iter().enumerate() {
            if bytes.len() % 2 != 0 {
                return Err(serde::de::Error::custom(format!(
                    "reference row {i} holds {} bytes, not whole bfloat16 values",
                    bytes.len()
                )));
            }
            features.push(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            );
        }
        Ok(ReferenceSample {
            features,
            predicted_class_frequencies: stored.predicted_class_frequencies,
        })
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

/// The `f32` with the given bfloat16 bits.
fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `value` rounded to the nearest bfloat16.
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
    /// The drift baseline.
    pub reference: ReferenceSample,
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
            reference: ReferenceSample::default(),
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
        if let Some(i) = self
            .reference
            .features
            .iter()
            .position(|r| r.len() != input)
        {
            return Err(invalid(
                format!("reference.features[{i}]"),
                format!(
                    "{} values for {input} input features",
                    self.reference.features[i].len()
                ),
            ));
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

    /// Encodes the artifact in the version-1 byte format (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = rmp_serde::to_vec_named(self)
            // Every field is a plain struct, enum, string, number or map with string keys,
            // which MessagePack always encodes.
            .expect("artifact serializes to MessagePack");
        let compressed = zstd::encode_all(body.as_slice(), ZSTD_LEVEL).ok();
        let (encoding, body) = match compressed {
            Some(c) if c.len() < body.len() => (ENCODING_ZSTD_MSGPACK, c),
            _ => (ENCODING_MSGPACK, body),
        };
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len() + DIGEST_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.push(encoding);
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        bytes
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
        if version == 0 {
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
            ENCODING_MSGPACK => decode_body(body)?,
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
                decode_body(&decoded)?
            }
            other => return Err(ArtifactError::UnknownEncoding { found: other }),
        };
        artifact.validate()?;
        Ok(artifact)
    }
}

/// Decodes the MessagePack body.
fn decode_body(body: &[u8]) -> Result<Artifact, ArtifactError> {
    rmp_serde::from_slice(body).map_err(|e| ArtifactError::Malformed {
        reason: e.to_string(),
    })
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

/// Serde for strictly increasing `u32` positions as one byte string of LEB128 varints: the
/// first position, then each gap to the next. A decreasing or repeated position cannot be
/// written this way, so the writer stores the gap as 0 and the reader's validation (which
/// requires strictly increasing positions) rejects the artifact rather than misplacing values.
mod index_gaps {
    use serde::{Deserializer, Serializer};

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

/// Serde for a `Vec<f32>` as one byte string of four byte planes: the lowest byte of every
/// value, then every second byte, and so on (little-endian order within a value). The high
/// planes (sign and exponent) of trained weights are repetitive; grouped, zstd shrinks a
/// trained dense layer by about 14 % instead of 7 % for interleaved floats.
mod f32_bytes {
    use serde::{Deserializer, Serializer};

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
