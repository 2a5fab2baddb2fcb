//! The MLP classifier as a burn module (`MlpConfig` → `init(&device)` → `Mlp`), its seeded
//! initialisation, the conversion to and from the artifact's layer tensors, and the choice
//! of compute device.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::artifact::{LayerTensors, TensorData as ArtifactTensor};

/// The shape of an MLP classifier: `input` features, any number of hidden ReLU layers, and
/// `classes` logits. It travels inside the artifact so inference can rebuild the network.
#[derive(Config, Debug, PartialEq, Eq)]
pub struct MlpConfig {
    /// The number of input features.
    pub input: usize,
    /// The width of each hidden layer, in order; empty means a linear classifier.
    pub hidden: Vec<usize>,
    /// The number of classes (output logits).
    pub classes: usize,
}

/// What is wrong with an MLP shape or with the tensors offered for it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MlpError {
    /// A layer width is zero.
    #[error("{field} must be at least 1, got 0")]
    ZeroWidth { field: String },
    /// The tensors do not have the shapes this configuration needs.
    #[error("layer {layer} {tensor}: expected shape {expected:?}, found {found:?}")]
    Shape {
        layer: usize,
        tensor: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// The number of layer tensors does not match the configuration.
    #[error("expected {expected} layers for this configuration, found {found}")]
    LayerCount { expected: usize, found: usize },
    /// A tensor is stored in a form the burn model cannot take directly.
    #[error("layer {layer} {tensor} is stored as {kind}; only dense f32 can be loaded into burn")]
    NotDense {
        layer: usize,
        tensor: &'static str,
        kind: &'static str,
    },
}

impl MlpConfig {
    /// `(inputs, outputs)` of each linear layer, first to last.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut widths = Vec::with_capacity(self.hidden.len() + 2);
        widths.push(self.input);
        widths.extend_from_slice(&self.hidden);
        widths.push(self.classes);
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// The number of weights and biases.
    pub fn param_count(&self) -> usize {
        self.layer_dims().iter().map(|(i, o)| i * o + o).sum()
    }

    /// Checks that every width is at least one.
    pub fn validate(&self) -> Result<(), MlpError> {
        if self.input == 0 {
            return Err(MlpError::ZeroWidth {
                field: "input".into(),
            });
        }
        if self.classes == 0 {
            return Err(MlpError::ZeroWidth {
                field: "classes".into(),
            });
        }
        if let Some(i) = self.hidden.iter().position(|&w| w == 0) {
            return Err(MlpError::ZeroWidth {
                field: format!("hidden[{i}]"),
            });
        }
        Ok(())
    }

    /// Builds the network with burn's default initialisation, drawn from the device's
    /// random generator. Use [`MlpConfig::init_seeded`] when the run must be reproducible.
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            layers: self
                .layer_dims()
                .into_iter()
                .map(|(i, o)| LinearConfig::new(i, o).init(device))
                .collect(),
            activation: Relu::new(),
        }
    }

    /// Builds the network with weights and biases drawn from `U(-k, k)`, `k = 1/√fan_in`
    /// (the distribution of burn's and PyTorch's default `Linear` init), from a generator
    /// seeded with `seed`.
    ///
    /// burn's own seeding (`Device::seed`) sets one process-wide generator per backend, so
    /// two trainings on two threads would interleave their draws; drawing here keeps a
    /// seed's result independent of whatever else the process is doing.
    pub fn init_seeded(&self, seed: u64, device: &Device) -> Mlp {
        let mut rng = StdRng::seed_from_u64(seed);
        let layers = self
            .layer_dims()
            .into_iter()
            .map(|(fan_in, fan_out)| {
                let bound = 1.0 / (fan_in as f32).sqrt();
                // Drawn in PyTorch's [out][in] order, then laid out as burn's [in, out].
                let weight: Vec<f32> = (0..fan_in * fan_out)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let bias: Vec<f32> = (0..fan_out)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                linear_from_out_in(&weight, &bias, fan_in, fan_out, device)
            })
            .collect();
        Mlp {
            layers,
            activation: Relu::new(),
        }
    }
}

/// Builds a burn `Linear` from a PyTorch-layout `[out][in]` weight and its bias.
fn linear_from_out_in(
    weight_out_in: &[f32],
    bias: &[f32],
    fan_in: usize,
    fan_out: usize,
    device: &Device,
) -> Linear {
    let weight = Tensor::<2>::from_data(
        TensorData::new(weight_out_in.to_vec(), [fan_out, fan_in]),
        device,
    )
    .transpose();
    let bias = Tensor::<1>::from_data(TensorData::new(bias.to_vec(), [fan_out]), device);
    Linear {
        weight: Param::from_tensor(weight),
        bias: Some(Param::from_tensor(bias)),
    }
}

/// A multilayer perceptron: linear layers with a ReLU between each pair.
#[derive(Module, Debug)]
pub struct Mlp {
    /// The linear layers, input to output.
    pub layers: Vec<Linear>,
    /// The activation between layers (not after the last one).
    pub activation: Relu,
}

impl Mlp {
    /// The logits for a batch: `[batch, input]` → `[batch, classes]`.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len().saturating_sub(1);
        let mut x = input;
        for (i, layer) in self.layers.iter().enumerate() {
            // [batch, d_in] -> [batch, d_out]
            x = layer.forward(x);
            if i < last {
                x = self.activation.forward(x);
            }
        }
        x
    }

    /// Rebuilds the burn module from artifact tensors, checking each shape against `config`.
    pub fn from_layers(
        config: &MlpConfig,
        layers: &[LayerTensors],
        device: &Device,
    ) -> Result<Mlp, MlpError> {
        config.validate()?;
        let dims = config.layer_dims();
        if dims.len() != layers.len() {
            return Err(MlpError::LayerCount {
                expected: dims.len(),
                found: layers.len(),
            });
        }
        let mut linears = Vec::with_capacity(dims.len());
        for (index, ((fan_in, fan_out), layer)) in dims.into_iter().zip(layers).enumerate() {
            let (weight, bias) = dense_layer(index, layer)?;
            check_shape(index, "weight", &[fan_out, fan_in], weight.0)?;
            check_shape(index, "bias", &[fan_out], bias.0)?;
            linears.push(linear_from_out_in(
                weight.1, bias.1, fan_in, fan_out, device,
            ));
        }
        Ok(Mlp {
            layers: linears,
            activation: Relu::new(),
        })
    }

    /// The weights as artifact tensors in PyTorch's `[out][in]` layout. This reads the
    /// parameters back from the device.
    pub fn to_layers(&self) -> Vec<LayerTensors> {
        self.layers
            .iter()
            .map(|layer| {
                // burn stores [in, out]; the artifact stores [out][in] like PyTorch.
                let weight = layer.weight.val().transpose();
                let [fan_out, fan_in] = weight.dims();
                let weight_values = tensor_values(weight);
                let bias_values = match &layer.bias {
                    Some(bias) => tensor_values(bias.val()),
                    // Layers built here always have a bias; a missing one acts as zeros.
                    None => vec![0.0; fan_out],
                };
                LayerTensors {
                    weight: ArtifactTensor::DenseF32 {
                        shape: vec![fan_out, fan_in],
                        values: weight_values,
                    },
                    bias: ArtifactTensor::DenseF32 {
                        shape: vec![fan_out],
                        values: bias_values,
                    },
                    input_range: None,
                }
            })
            .collect()
    }
}

/// Reads a float tensor's values to the host as `f32`.
pub(crate) fn tensor_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        // The tensors read here are float tensors created by this crate, so the only
        // failure left is a backend fault, which is not recoverable input.
        .expect("float tensor converts to f32")
}

type DenseView<'a> = (&'a [usize], &'a [f32]);

/// The dense views of a layer's weight and bias, or the layer's non-dense storage kind.
fn dense_layer(
    index: usize,
    layer: &LayerTensors,
) -> Result<(DenseView<'_>, DenseView<'_>), MlpError> {
    Ok((
        dense_view(index, "weight", &layer.weight)?,
        dense_view(index, "bias", &layer.bias)?,
    ))
}

/// The dense view of one tensor.
fn dense_view<'a>(
    layer: usize,
    tensor: &'static str,
    data: &'a ArtifactTensor,
) -> Result<DenseView<'a>, MlpError> {
    match data {
        ArtifactTensor::DenseF32 { shape, values } => Ok((shape.as_slice(), values.as_slice())),
        #[allow(unreachable_patterns)]
        other => Err(MlpError::NotDense {
            layer,
            tensor,
            kind: other.kind(),
        }),
    }
}

/// Checks one tensor's shape.
fn check_shape(
    layer: usize,
    tensor: &'static str,
    expected: &[usize],
    found: &[usize],
) -> Result<(), MlpError> {
    if expected == found {
        Ok(())
    } else {
        Err(MlpError::Shape {
            layer,
            tensor,
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

/// The backends this build can run, for `BURN_DEVICE` checks.
const COMPILED_BACKENDS: &[&str] = &[
    "flex",
    #[cfg(feature = "cuda")]
    "cuda",
];

/// `BURN_DEVICE` names a backend this build does not have.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("BURN_DEVICE={value:?} is not a backend of this build; use one of {available:?}")]
pub struct DeviceError {
    /// What the variable said.
    pub value: String,
    /// The backends compiled into this build.
    pub available: Vec<&'static str>,
}

/// The compute device: burn's default (the first enabled backend, `flex` on a CPU build),
/// or the one `BURN_DEVICE` names. An unknown `BURN_DEVICE` is reported as an error instead
/// of burn's panic.
pub fn try_device() -> Result<Device, DeviceError> {
    if let Ok(value) = std::env::var("BURN_DEVICE") {
        let wanted = value.to_lowercase();
        if !COMPILED_BACKENDS.contains(&wanted.as_str()) {
            return Err(DeviceError {
                value,
                available: COMPILED_BACKENDS.to_vec(),
            });
        }
    }
    Ok(Device::default())
}

/// The compute device, as [`try_device`]. Call `try_device` once at start-up to report a
/// bad `BURN_DEVICE`; after that this function cannot fail.
///
/// # Panics
///
/// When `BURN_DEVICE` names a backend this build lacks (as burn itself does).
pub fn device() -> Device {
    match try_device() {
        Ok(device) => device,
        Err(e) => panic!("{e}"),
    }
}
