//! `lathe-model`: the machine-learning core of lathe — data, models, training, evaluation,
//! the artifact format and the inference engine. A pure library: it knows nothing of NATS
//! or of the services that call it.
//!
//! # Map
//!
//! - [`data`] — the built-in digits data, CSV and IDX parsing, seeded stratified splits and
//!   the [`data::Standardizer`] fitted on the training split.
//! - [`mlp`] — the MLP as a burn module (`MlpConfig` → `init` → `Mlp`), its seeded
//!   initialisation, and the choice of device (`BURN_DEVICE`, flex by default).
//! - [`train`] — mini-batch Adam with early stopping; returns a finished [`Artifact`].
//! - [`distill`] — knowledge distillation (Hinton et al.) into a smaller student, with
//!   teacher-labelled mixup/noise rows and the automatic choice of the student's width.
//! - [`eval`] — accuracy, per-class precision/recall and the confusion matrix.
//! - [`artifact`] — the versioned, checksummed artifact and its byte format, and the drift
//!   reference (per-feature quantile bins) a monitor compares traffic against.
//! - `codec` (private) — the adaptive range coder behind the artifact's tensor storage.
//! - [`engine`] — the hand-written forward pass the deployer serves (not through burn).
//! - [`prune`] — saliency, unstructured and structured pruning, the gradual schedule with
//!   masked fine-tuning, and `auto` sparsity inside an accuracy budget.
//! - [`quantize`] — post-training 8/4-bit weight quantization (per tensor, channel or
//!   group; symmetric or with zero points) and activation-range calibration.
//! - [`interop`] — PyTorch `nn.Sequential` state dicts in safetensors, both ways.
//! - `kernels` (private) — the SIMD-dispatched and GEMM kernels behind the engine; the
//!   crate's only `unsafe` code.
//!
//! **Invariant:** the engine and burn agree: for the same artifact, [`engine::Engine`]
//! predicts the class burn's forward pass predicts (checked on the digits test set).

pub mod artifact;
mod codec;
pub mod data;
pub mod distill;
pub mod engine;
pub mod eval;
pub mod interop;
mod kernels;
pub mod mlp;
mod neurons;
pub mod prune;
pub mod quantize;
pub mod train;

pub use artifact::{Artifact, ArtifactError};
pub use data::{Dataset, Splits, Standardizer};
pub use engine::{Engine, EngineError, Prediction};
pub use eval::Evaluation;
pub use mlp::{Mlp, MlpConfig};
pub use train::{EpochMetrics, TrainConfig, TrainError, TrainOutcome};
