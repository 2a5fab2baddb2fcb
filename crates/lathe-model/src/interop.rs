//! PyTorch interchange: the state dict of an `nn.Sequential` of `Linear` and `ReLU` layers,
//! stored as safetensors, in both directions.
//!
//! A state dict holds only weights. Preprocessing is not part of it, so an imported model
//! gets a [`crate::data::Standardizer`] that the caller fits on the job's training split and
//! passes to [`crate::artifact::Artifact::from_imported`]; an export leaves the artifact's
//! standardiser out, and PyTorch users must apply it themselves (its mean and scale are in
//! the artifact).

use std::collections::BTreeMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::artifact::{Artifact, LayerTensors, TensorData};
use crate::mlp::MlpConfig;

/// Why a state dict could not be imported or an artifact exported.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InteropError {
    /// The bytes are not a readable safetensors file.
    #[error("not a valid safetensors file: {reason}")]
    Safetensors { reason: String },
    /// The file holds no tensors.
    #[error("the safetensors file holds no tensors")]
    Empty,
    /// A key is not `[<prefix>.]<index>.weight` or `.bias`.
    #[error(
        "tensor {key:?} is not a Linear layer parameter (expected keys like \"0.weight\" and \"0.bias\")"
    )]
    UnexpectedKey { key: String },
    /// Keys use different prefixes (e.g. two sub-modules).
    #[error("tensor {key:?} has prefix {found:?} but earlier keys use {expected:?}")]
    MixedPrefixes {
        key: String,
        expected: String,
        found: String,
    },
    /// A layer has a weight and no bias, or the reverse.
    #[error("layer {index}: {missing:?} is missing (every Linear layer needs a weight and a bias)")]
    MissingTensor { index: u64, missing: String },
    /// A weight is not two-dimensional (convolution kernels are four-dimensional).
    #[error("tensor {key:?} has shape {shape:?}: a Linear weight must be 2-D [out, in]{hint}")]
    WeightNot2d {
        key: String,
        shape: Vec<usize>,
        hint: &'static str,
    },
    /// A bias does not match its weight's output count.
    #[error("tensor {key:?} has shape {shape:?}, expected [{expected}] to match the weight")]
    BiasShape {
        key: String,
        shape: Vec<usize>,
        expected: usize,
    },
    /// One layer's input width is not the previous layer's output width.
    #[error(
        "tensor {key:?} has shape {shape:?}: its {found} inputs do not match the {expected} outputs of {previous:?}"
    )]
    ShapesDoNotChain {
        key: String,
        shape: Vec<usize>,
        previous: String,
        expected: usize,
        found: usize,
    },
    /// A tensor's element type is not a float type this import converts.
    #[error("tensor {key:?} has dtype {dtype}; only F32, F64, F16 and BF16 are accepted")]
    UnsupportedDtype { key: String, dtype: String },
    /// A tensor holds NaN or infinity.
    #[error("tensor {key:?} holds a non-finite value at element {element}")]
    NonFinite { key: String, element: usize },
    /// A layer has zero inputs or outputs.
    #[error("tensor {key:?} has shape {shape:?}: a layer needs at least one input and output")]
    EmptyLayer { key: String, shape: Vec<usize> },
    /// The artifact has tensors that are not dense `f32`.
    #[error("layer {layer} {tensor} is stored as {kind}; only dense f32 models can be exported")]
    NotDense {
        layer: usize,
        tensor: &'static str,
        kind: &'static str,
    },
    /// The artifact is inconsistent.
    #[error("the artifact is invalid: {reason}")]
    InvalidArtifact { reason: String },
}

/// One parsed key: the layer index and whether it is the weight.
struct ParsedKey<'a> {
    prefix: &'a str,
    index: u64,
    is_weight: bool,
}

/// Splits `model.0.weight` into prefix `model`, index 0, weight.
fn parse_key(key: &str) -> Option<ParsedKey<'_>> {
    let (rest, kind) = key.rsplit_once('.')?;
    let is_weight = match kind {
        "weight" => true,
        "bias" => false,
        _ => return None,
    };
    let (prefix, index) = match rest.rsplit_once('.') {
        Some((prefix, index)) => (prefix, index),
        None => ("", rest),
    };
    // Only plain decimal indices, as nn.Sequential writes them.
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(ParsedKey {
        prefix,
        index: index.parse().ok()?,
        is_weight,
    })
}

/// The tensor's values as `f32`, converting other float types.
fn to_f32(key: &str, view: &TensorView<'_>) -> Result<Vec<f32>, InteropError> {
    let bytes = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
        other => {
            return Err(InteropError::UnsupportedDtype {
                key: key.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    };
    if let Some(element) = values.iter().position(|v| !v.is_finite()) {
        return Err(InteropError::NonFinite {
            key: key.to_string(),
            element,
        });
    }
    Ok(values)
}

/// IEEE 754 half precision to `f32` (exact: every half value is an `f32` value).
fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        // Subnormal: value = mantissa × 2^-24, exact in f32.
        (0, m) => {
            let value = (m as f32) * 2f32.powi(-24);
            return if sign == 0 { value } else { -value };
        }
        (0x1f, m) => 0x7f80_0000 | (m << 13),
        (e, m) => ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// A hint for a weight of the wrong rank.
fn rank_hint(shape: &[usize]) -> &'static str {
    match shape.len() {
        3..=5 => " (this looks like a convolution kernel; only Linear layers are supported)",
        1 => " (a 1-D tensor named weight is a norm layer's, not a Linear layer's)",
        _ => "",
    }
}

/// Reads the state dict of a PyTorch `nn.Sequential` of `Linear` and `ReLU` layers.
///
/// Keys are `<index>.weight` / `<index>.bias`, optionally under one common prefix
/// (`model.0.weight`); layers are taken in index order (ReLU layers have no keys, so the
/// indices of consecutive Linear layers are usually 0, 2, 4, …). Weights are PyTorch's
/// `[out, in]`; F32 is read as is and F64, F16 and BF16 are converted. Any other key, a
/// weight that is not 2-D, a missing bias or shapes that do not chain are errors.
pub fn import_safetensors(bytes: &[u8]) -> Result<(MlpConfig, Vec<LayerTensors>), InteropError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| InteropError::Safetensors {
        reason: e.to_string(),
    })?;
    let mut names: Vec<&str> = file.names().into_iter().collect();
    if names.is_empty() {
        return Err(InteropError::Empty);
    }
    names.sort_unstable();
    let mut prefix: Option<&str> = None;
    // index -> (weight key, bias key)
    let mut layers: BTreeMap<u64, (Option<String>, Option<String>)> = BTreeMap::new();
    for name in &names {
        let parsed = parse_key(name).ok_or_else(|| InteropError::UnexpectedKey {
            key: name.to_string(),
        })?;
        match prefix {
            None => prefix = Some(parsed.prefix),
            Some(p) if p != parsed.prefix => {
                return Err(InteropError::MixedPrefixes {
                    key: name.to_string(),
                    expected: p.to_string(),
                    found: parsed.prefix.to_string(),
                });
            }
            Some(_) => {}
        }
        let entry = layers.entry(parsed.index).or_default();
        if parsed.is_weight {
            entry.0 = Some(name.to_string());
        } else {
            entry.1 = Some(name.to_string());
        }
    }

    let key_for = |index: u64, kind: &str| match prefix {
        Some("") | None => format!("{index}.{kind}"),
        Some(p) => format!("{p}.{index}.{kind}"),
    };
    let mut tensors = Vec::with_capacity(layers.len());
    let mut widths = Vec::with_capacity(layers.len() + 1);
    let mut previous_key = String::new();
    for (index, (weight_key, bias_key)) in layers {
        let weight_key = weight_key.ok_or_else(|| InteropError::MissingTensor {
            index,
            missing: key_for(index, "weight"),
        })?;
        let bias_key = bias_key.ok_or_else(|| InteropError::MissingTensor {
            index,
            missing: key_for(index, "bias"),
        })?;
        let weight = file
            .tensor(&weight_key)
            .map_err(|e| InteropError::Safetensors {
                reason: e.to_string(),
            })?;
        let bias = file
            .tensor(&bias_key)
            .map_err(|e| InteropError::Safetensors {
                reason: e.to_string(),
            })?;
        let shape = weight.shape().to_vec();
        let [n_out, n_in] = shape[..] else {
            return Err(InteropError::WeightNot2d {
                hint: rank_hint(&shape),
                key: weight_key,
                shape,
            });
        };
        if n_out == 0 || n_in == 0 {
            return Err(InteropError::EmptyLayer {
                key: weight_key,
                shape,
            });
        }
        if bias.shape() != [n_out] {
            return Err(InteropError::BiasShape {
                key: bias_key,
                shape: bias.shape().to_vec(),
                expected: n_out,
            });
        }
        match widths.last() {
            None => widths.push(n_in),
            Some(&previous_out) if previous_out != n_in => {
                return Err(InteropError::ShapesDoNotChain {
                    key: weight_key,
                    shape,
                    previous: previous_key,
                    expected: previous_out,
                    found: n_in,
                });
            }
            Some(_) => {}
        }
        widths.push(n_out);
        tensors.push(LayerTensors {
            weight: TensorData::DenseF32 {
                shape,
                values: to_f32(&weight_key, &weight)?,
            },
            bias: TensorData::DenseF32 {
                shape: vec![n_out],
                values: to_f32(&bias_key, &bias)?,
            },
            input_range: None,
        });
        previous_key = weight_key;
    }
    let config = MlpConfig {
        input: widths[0],
        hidden: widths[1..widths.len() - 1].to_vec(),
        classes: widths[widths.len() - 1],
    };
    Ok((config, tensors))
}

/// Writes a dense artifact's layers as the state dict of
/// `nn.Sequential(Linear, ReLU, Linear, …, Linear)`: keys `0.weight`, `0.bias`,
/// `2.weight`, … (the ReLUs take the odd indices), F32, `[out, in]`. PyTorch loads it with
/// `model.load_state_dict(safetensors.torch.load_file(path))`. The artifact's
/// standardisation is not included (a state dict has no place for it).
pub fn export_safetensors(artifact: &Artifact) -> Result<Vec<u8>, InteropError> {
    artifact
        .validate()
        .map_err(|e| InteropError::InvalidArtifact {
            reason: e.to_string(),
        })?;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> =
        Vec::with_capacity(artifact.layers.len() * 2);
    for (layer, tensors) in artifact.layers.iter().enumerate() {
        for (kind, tensor) in [("weight", &tensors.weight), ("bias", &tensors.bias)] {
            let values = tensor.dense_values().ok_or(InteropError::NotDense {
                layer,
                tensor: kind,
                kind: tensor.kind(),
            })?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((
                format!("{}.{kind}", layer * 2),
                tensor.shape().to_vec(),
                bytes,
            ));
        }
    }
    let views = owned
        .iter()
        .map(|(key, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (key.clone(), view))
                .map_err(|e| InteropError::Safetensors {
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| InteropError::Safetensors {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_and_without_prefix() {
        let k = parse_key("0.weight").expect("parses");
        assert_eq!((k.prefix, k.index, k.is_weight), ("", 0, true));
        let k = parse_key("model.net.12.bias").expect("parses");
        assert_eq!((k.prefix, k.index, k.is_weight), ("model.net", 12, false));
        assert!(parse_key("0.running_mean").is_none());
        assert!(parse_key("fc.weight").is_none());
        assert!(parse_key("weight").is_none());
    }

    #[test]
    fn half_precision_converts_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert_eq!(f16_to_f32(0x0000), 0.0);
    }
}
