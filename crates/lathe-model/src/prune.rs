//! Pruning a trained MLP: weight saliency (magnitude, or first-order Taylor `|∂L/∂w · w|`
//! averaged over training batches), unstructured pruning (single weights, ranked over the
//! whole model or within each layer) and structured pruning (whole hidden neurons, which are
//! then cut out so the dense model itself shrinks), a gradual schedule with masked
//! fine-tuning after every step, and `auto`: the highest sparsity whose validation accuracy
//! stays inside an accuracy budget.
//!
//! Weights are kept on the host as `[out][in]` between steps; each fine-tuning round builds
//! the burn model from them, and after every Adam step multiplies each weight by its mask,
//! so a pruned weight is exactly zero whenever the model is read. The pruned model is
//! written with sparse weight storage ([`TensorData::SparseF32`]) wherever that is smaller.

use std::collections::BTreeMap;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::artifact::{Architecture, Artifact, LayerTensors, TensorData as ArtifactTensor};
use crate::data::{Dataset, Splits};
use crate::engine::Engine;
use crate::eval::{Evaluation, evaluate};
use crate::mlp::{Mlp, MlpConfig, tensor_values, try_device};

/// Seed offset for the fine-tuning shuffles, apart from training's streams.
const FINETUNE_STREAM: u64 = 0x1a7e_0101;
/// A weight is stored sparse when at most this share of it is non-zero: the sparse form
/// costs about 5 bytes per non-zero against 4 per element densely (before compression).
const SPARSE_STORAGE_MAX_DENSITY: f64 = 0.6;
/// The sparsities `auto` tries, in order, for unstructured pruning (share of weights).
const AUTO_UNSTRUCTURED: &[f64] = &[0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98];
/// The shares of hidden neurons `auto` tries for structured pruning.
const AUTO_STRUCTURED: &[f64] = &[0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// How weights are scored; the lowest scores are pruned first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Saliency {
    /// `|w|`.
    Magnitude,
    /// `|∂L/∂w · w|`, averaged over the training batches.
    Taylor,
}

/// What is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// Single weights; the target is the share of weights set to zero.
    Unstructured,
    /// Whole hidden neurons; the target is the share of hidden neurons removed.
    Structured,
}

/// Whether scores are ranked across all layers or within each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Global,
    Layer,
}

/// The sparsity to reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A fixed share in `[0, 1)`.
    Fixed(f64),
    /// The highest share whose validation accuracy stays inside the budget.
    Auto,
}

/// How to prune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneConfig {
    pub saliency: Saliency,
    pub structure: Structure,
    pub scope: Scope,
    pub target: Target,
    /// Steps of the gradual schedule (a fixed target only; `auto` steps through its list).
    pub steps: usize,
    /// Fine-tuning epochs after each step (0: prune without fine-tuning).
    pub finetune_epochs: usize,
    /// Rows per fine-tuning (and Taylor) batch.
    pub batch_size: usize,
    /// Adam's step size for fine-tuning.
    pub learning_rate: f64,
    /// Seeds the fine-tuning shuffles.
    pub seed: u64,
    /// The largest accepted validation-accuracy drop against the input model (`auto`).
    pub max_accuracy_drop: f64,
}

impl PruneConfig {
    /// Checks each field, naming the first bad one.
    pub fn validate(&self) -> Result<(), PruneError> {
        let bad =
            |field: &'static str, reason: String| Err(PruneError::InvalidConfig { field, reason });
        if let Target::Fixed(s) = self.target
            && !(s.is_finite() && (0.0..1.0).contains(&s))
        {
            return bad(
                "target_sparsity",
                format!("must be in [0, 1) or \"auto\", got {s}"),
            );
        }
        if self.steps == 0 {
            return bad("steps", "must be at least 1, got 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1, got 0".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!(
                    "must be a positive finite number, got {}",
                    self.learning_rate
                ),
            );
        }
        if !(self.max_accuracy_drop.is_finite() && self.max_accuracy_drop >= 0.0) {
            return bad(
                "max_accuracy_drop",
                format!(
                    "must be a finite number >= 0, got {}",
                    self.max_accuracy_drop
                ),
            );
        }
        Ok(())
    }
}

/// Why pruning could not run.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PruneError {
    /// A pruning setting is out of range.
    #[error("prune.{field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The input model cannot be pruned.
    #[error("input model: {0}")]
    Model(String),
    /// The data does not fit the model.
    #[error("{split} split: {reason}")]
    Data { split: &'static str, reason: String },
    /// The compute device could not be chosen, or burn failed.
    #[error("device: {0}")]
    Device(String),
}

/// What one step of the schedule reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    /// The target of this step (share of weights, or of hidden neurons when structured).
    pub target: f64,
    /// The share of weights that are zero after the step.
    pub weight_sparsity: f64,
    /// Validation accuracy after fine-tuning.
    pub validation_accuracy: f64,
    /// Whether `auto` accepted this step (always true for a fixed target).
    pub accepted: bool,
}

/// The result of [`prune_mlp`].
#[derive(Debug, Clone, PartialEq)]
pub struct PruneOutcome {
    /// The pruned model (sparse storage where smaller; structured: fewer neurons).
    pub artifact: Artifact,
    /// The input model's accuracy on the same splits.
    pub baseline_test: f64,
    pub baseline_validation: f64,
    pub test: Evaluation,
    pub validation: Evaluation,
    /// The target that was kept (for `auto`, the one chosen).
    pub chosen_target: f64,
    /// Zero weights over the input model's weight count.
    pub sparsity: f64,
    /// Per layer: zero weights over the layer's weight count in the input model.
    pub layer_sparsity: Vec<f64>,
    /// Hidden neurons before and after.
    pub hidden_before: Vec<usize>,
    pub hidden_after: Vec<usize>,
    /// Non-zero weights and biases.
    pub nonzero_parameters: usize,
    pub steps: Vec<StepReport>,
}

/// One layer on the host: `[out][in]` weight, bias, and what is still allowed to be non-zero.
#[derive(Debug, Clone)]
struct HostLayer {
    n_in: usize,
    n_out: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    w_mask: Vec<bool>,
    b_mask: Vec<bool>,
}

impl HostLayer {
    fn apply_mask(&mut self) {
        for (w, &keep) in self.w.iter_mut().zip(&self.w_mask) {
            if !keep {
                *w = 0.0;
            }
        }
        for (b, &keep) in self.b.iter_mut().zip(&self.b_mask) {
            if !keep {
                *b = 0.0;
            }
        }
    }

    fn tensors(&self) -> LayerTensors {
        LayerTensors {
            weight: ArtifactTensor::DenseF32 {
                shape: vec![self.n_out, self.n_in],
                values: self.w.clone(),
            },
            bias: ArtifactTensor::DenseF32 {
                shape: vec![self.n_out],
                values: self.b.clone(),
            },
            input_range: None,
        }
    }
}

/// Prunes `input` (a dense or sparse MLP artifact) on the job's splits. `on_step` is called
/// after every step, for progress reports.
pub fn prune_mlp(
    input: &Artifact,
    splits: &Splits,
    cfg: &PruneConfig,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<PruneOutcome, PruneError> {
    cfg.validate()?;
    input
        .validate()
        .map_err(|e| PruneError::Model(e.to_string()))?;
    let config = input.mlp_config().clone();
    if splits.train.rows() == 0 {
        return Err(PruneError::Data {
            split: "train",
            reason: "has no rows".into(),
        });
    }
    if splits.train.n_features != config.input {
        return Err(PruneError::Data {
            split: "train",
            reason: format!(
                "has {} features, the model takes {}",
                splits.train.n_features, config.input
            ),
        });
    }
    if let Some(row) = splits
        .train
        .labels
        .iter()
        .position(|&l| l as usize >= config.classes)
    {
        return Err(PruneError::Data {
            split: "train",
            reason: format!(
                "row {} has a class outside the model's {}",
                row + 1,
                config.classes
            ),
        });
    }
    let mut layers: Vec<HostLayer> = input
        .layers
        .iter()
        .zip(config.layer_dims())
        .map(|(l, (n_in, n_out))| HostLayer {
            n_in,
            n_out,
            w: l.weight.to_dense_values(),
            b: l.bias.to_dense_values(),
            // Weights already zero (an input pruned before) stay pruned.
            w_mask: l
                .weight
                .to_dense_values()
                .iter()
                .map(|v| *v != 0.0)
                .collect(),
            b_mask: vec![true; n_out],
        })
        .collect();
    let baseline_engine =
        Engine::from_artifact(input).map_err(|e| PruneError::Model(e.to_string()))?;
    let baseline_test = evaluate(&baseline_engine, &splits.test).accuracy;
    let baseline_validation = evaluate(&baseline_engine, &splits.validation).accuracy;
    let total_weights: usize = layers.iter().map(|l| l.w.len()).sum();
    // When the validation split is too small to resolve the budget (one row of digits' 145
    // is 0.69 points, more than the default 0.5), `auto` would have to demand a flawless
    // validation score and would stop at the first step; it then allows one row instead.
    let one_row = 1.0 / splits.validation.rows().max(1) as f64;
    let allowed_drop = cfg
        .max_accuracy_drop
        .max(one_row.min(2.0 * cfg.max_accuracy_drop));

    let device = try_device().map_err(|e| PruneError::Device(e.to_string()))?;
    let trainer = FineTuner::new(input, splits, cfg, &device);
    let schedule: Vec<f64> = match cfg.target {
        Target::Fixed(target) => (1..=cfg.steps)
            .map(|k| {
                // Zhu & Gupta's cubic schedule: big cuts while many redundant weights
                // remain, small ones near the target, where each weight matters more.
                let done = k as f64 / cfg.steps as f64;
                target * (1.0 - (1.0 - done).powi(3))
            })
            .collect(),
        Target::Auto => match cfg.structure {
            Structure::Unstructured => AUTO_UNSTRUCTURED.to_vec(),
            Structure::Structured => AUTO_STRUCTURED.to_vec(),
        },
    };
    let mut reports = Vec::new();
    let mut accepted: (f64, Vec<HostLayer>) = (0.0, layers.clone());
    let mut failures_in_a_row = 0;
    for (index, &target) in schedule.iter().enumerate() {
        let scores = trainer.saliency(&layers, cfg.saliency)?;
        match cfg.structure {
            Structure::Unstructured => mask_weights(&mut layers, &scores, target, cfg.scope),
            Structure::Structured => mask_neurons(&mut layers, &scores, target, cfg.scope),
        }
        for layer in &mut layers {
            layer.apply_mask();
        }
        trainer.finetune(&mut layers, index as u64)?;
        let engine = engine_of(input, &layers)?;
        let validation_accuracy = evaluate(&engine, &splits.validation).accuracy;
        let zeros: usize = layers
            .iter()
            .map(|l| l.w.iter().filter(|w| **w == 0.0).count())
            .sum();
        let inside = validation_accuracy + 1e-9 >= baseline_validation - allowed_drop;
        let ok = match cfg.target {
            Target::Fixed(_) => true,
            Target::Auto => inside,
        };
        let report = StepReport {
            step: index + 1,
            target,
            weight_sparsity: zeros as f64 / total_weights.max(1) as f64,
            validation_accuracy,
            accepted: ok,
        };
        on_step(&report);
        reports.push(report);
        if ok {
            accepted = (target, layers.clone());
            failures_in_a_row = 0;
        } else {
            // A small validation split makes one level's accuracy noisy (one row is
            // 0.7 points of digits' 145), so a single miss does not end the search; two
            // levels in a row outside the budget do, since sparsity only grows from here.
            failures_in_a_row += 1;
            if failures_in_a_row >= 2 {
                break;
            }
        }
    }
    let (chosen_target, layers) = accepted;
    finish(
        input,
        splits,
        layers,
        chosen_target,
        baseline_test,
        baseline_validation,
        reports,
    )
}

/// Packages the kept layers: the neurons without a use are cut out; weights go to
/// sparse storage where that is smaller.
fn finish(
    input: &Artifact,
    splits: &Splits,
    mut layers: Vec<HostLayer>,
    chosen_target: f64,
    baseline_test: f64,
    baseline_validation: f64,
    steps: Vec<StepReport>,
) -> Result<PruneOutcome, PruneError> {
    let original = input.mlp_config();
    let original_sizes: Vec<usize> = original.layer_dims().iter().map(|(i, o)| i * o).collect();
    // Structured pruning's removed neurons and the neurons unstructured pruning left
    // without a use both go: the model stays the same function and gets narrower.
    crate::neurons::remove_dead_neurons(&mut layers[..]);
    let hidden_after: Vec<usize> = layers[..layers.len() - 1].iter().map(|l| l.n_out).collect();
    let config = MlpConfig::new(original.input, hidden_after.clone(), original.classes);
    let tensors = layers
        .iter()
        .map(|l| {
            let nonzero = l.w.iter().filter(|w| **w != 0.0).count();
            let weight = if (nonzero as f64) <= SPARSE_STORAGE_MAX_DENSITY * l.w.len() as f64 {
                ArtifactTensor::sparse_from_dense(vec![l.n_out, l.n_in], &l.w)
                    .map_err(|e| PruneError::Model(e.to_string()))?
            } else {
                ArtifactTensor::DenseF32 {
                    shape: vec![l.n_out, l.n_in],
                    values: l.w.clone(),
                }
            };
            Ok(LayerTensors {
                weight,
                bias: ArtifactTensor::DenseF32 {
                    shape: vec![l.n_out],
                    values: l.b.clone(),
                },
                input_range: None,
            })
        })
        .collect::<Result<Vec<_>, PruneError>>()?;
    let mut artifact = input.clone();
    artifact.architecture = Architecture::Mlp(config);
    artifact.layers = tensors;
    artifact
        .validate()
        .map_err(|e| PruneError::Model(format!("the pruned model is inconsistent: {e}")))?;
    let engine = Engine::from_artifact(&artifact).map_err(|e| PruneError::Model(e.to_string()))?;
    let test = evaluate(&engine, &splits.test);
    let validation = evaluate(&engine, &splits.validation);
    refresh_reference(&mut artifact, &engine, &splits.train);

    let layer_nonzero: Vec<usize> = artifact
        .layers
        .iter()
        .map(|l| l.weight.nonzero_count())
        .collect();
    let layer_sparsity: Vec<f64> = layer_nonzero
        .iter()
        .zip(&original_sizes)
        .map(|(&nz, &size)| 1.0 - nz as f64 / size.max(1) as f64)
        .collect();
    let total: usize = original_sizes.iter().sum();
    let sparsity = 1.0 - layer_nonzero.iter().sum::<usize>() as f64 / total.max(1) as f64;
    let nonzero_parameters = artifact.nonzero_param_count();
    Ok(PruneOutcome {
        artifact,
        baseline_test,
        baseline_validation,
        test,
        validation,
        chosen_target,
        sparsity,
        layer_sparsity,
        hidden_before: original.hidden.clone(),
        hidden_after,
        nonzero_parameters,
        steps,
    })
}

/// The metrics a stage records for a pruning outcome (also written to the lineage).
pub fn outcome_metrics(outcome: &PruneOutcome) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::from([
        ("test_accuracy".to_string(), outcome.test.accuracy),
        (
            "validation_accuracy".to_string(),
            outcome.validation.accuracy,
        ),
        ("baseline_test_accuracy".to_string(), outcome.baseline_test),
        (
            "accuracy_drop".to_string(),
            outcome.baseline_test - outcome.test.accuracy,
        ),
        ("sparsity".to_string(), outcome.sparsity),
        ("target".to_string(), outcome.chosen_target),
        ("parameters".to_string(), outcome.nonzero_parameters as f64),
        (
            "hidden_neurons".to_string(),
            outcome.hidden_after.iter().sum::<usize>() as f64,
        ),
        (
            "hidden_neurons_removed".to_string(),
            (outcome.hidden_before.iter().sum::<usize>()
                - outcome.hidden_after.iter().sum::<usize>()) as f64,
        ),
    ]);
    for (i, s) in outcome.layer_sparsity.iter().enumerate() {
        m.insert(format!("sparsity.layer{i}"), *s);
    }
    m
}

/// An engine for host layers with the input's preprocessing.
fn engine_of(input: &Artifact, layers: &[HostLayer]) -> Result<Engine, PruneError> {
    let mut artifact = input.clone();
    artifact.layers = layers.iter().map(HostLayer::tensors).collect();
    Engine::from_artifact(&artifact).map_err(|e| PruneError::Model(e.to_string()))
}

/// Recomputes the reference's class mix with the pruned model on the training split.
fn refresh_reference(artifact: &mut Artifact, engine: &Engine, train: &Dataset) {
    if artifact.reference.predicted_class_frequencies.is_empty() || train.rows() == 0 {
        return;
    }
    if let Ok(classes) = engine.classes_batch(&train.features, train.rows()) {
        let mut counts = vec![0usize; engine.n_classes()];
        for c in classes {
            counts[c] += 1;
        }
        let total = train.rows() as f64;
        artifact.reference.predicted_class_frequencies =
            counts.iter().map(|&c| c as f64 / total).collect();
    }
}

/// Masks the lowest-scoring weights so that `target` of them (over all layers, or of each
/// layer) are masked; weights masked before stay masked (their score is below any other).
fn mask_weights(layers: &mut [HostLayer], scores: &[Vec<f32>], target: f64, scope: Scope) {
    let ranked = |layer_ids: &[usize], layers: &[HostLayer]| {
        let mut all: Vec<(f32, usize, usize)> = Vec::new();
        for &l in layer_ids {
            for (k, &s) in scores[l].iter().enumerate() {
                let s = if layers[l].w_mask[k] { s } else { -1.0 };
                all.push((s, l, k));
            }
        }
        // Ties (e.g. equal magnitudes) break by position, so the result is reproducible.
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        all
    };
    let groups: Vec<Vec<usize>> = match scope {
        Scope::Global => vec![(0..layers.len()).collect()],
        Scope::Layer => (0..layers.len()).map(|l| vec![l]).collect(),
    };
    for group in groups {
        let all = ranked(&group, layers);
        let count = (target * all.len() as f64).round() as usize;
        for &(_, l, k) in all.iter().take(count) {
            layers[l].w_mask[k] = false;
        }
    }
}

/// Masks the lowest-scoring hidden neurons so that `target` of them are masked: a neuron's
/// incoming weights, bias and outgoing weights. A neuron's score is the sum of its incoming
/// and outgoing weights' scores; ranked globally, each layer's scores are divided by their
/// mean first, because wide layers have smaller weights. Every hidden layer keeps a neuron.
fn mask_neurons(layers: &mut [HostLayer], scores: &[Vec<f32>], target: f64, scope: Scope) {
    let hidden = layers.len() - 1;
    let mut neurons: Vec<(f64, usize, usize)> = Vec::new();
    let mut per_layer: Vec<Vec<(f64, usize, usize)>> = Vec::new();
    for l in 0..hidden {
        let (n_in, n_out) = (layers[l].n_in, layers[l].n_out);
        let next_out = layers[l + 1].n_out;
        let mut layer_scores: Vec<(f64, usize, usize)> = (0..n_out)
            .map(|j| {
                let incoming: f64 = (0..n_in).map(|i| f64::from(scores[l][j * n_in + i])).sum();
                let outgoing: f64 = (0..next_out)
                    .map(|o| f64::from(scores[l + 1][o * n_out + j]))
                    .sum();
                (incoming + outgoing, l, j)
            })
            .collect();
        let alive: Vec<f64> = layer_scores
            .iter()
            .filter(|(_, _, j)| layers[l].b_mask[*j])
            .map(|s| s.0)
            .collect();
        let mean = alive.iter().sum::<f64>() / alive.len().max(1) as f64;
        for s in &mut layer_scores {
            if !layers[l].b_mask[s.2] {
                s.0 = -1.0;
            } else if scope == Scope::Global && mean > 0.0 {
                s.0 /= mean;
            }
        }
        neurons.extend(layer_scores.iter().copied());
        per_layer.push(layer_scores);
    }
    let groups = match scope {
        Scope::Global => vec![neurons],
        Scope::Layer => per_layer,
    };
    for mut group in groups {
        group.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let count = (target * group.len() as f64).round() as usize;
        for &(_, l, j) in group.iter().take(count) {
            let alive = layers[l].b_mask.iter().filter(|k| **k).count();
            if alive <= 1 && layers[l].b_mask[j] {
                continue;
            }
            kill_neuron(layers, l, j);
        }
    }
}

/// Masks neuron `j` of layer `l`: its incoming weights, its bias, its outgoing weights.
fn kill_neuron(layers: &mut [HostLayer], l: usize, j: usize) {
    let n_in = layers[l].n_in;
    layers[l].b_mask[j] = false;
    for i in 0..n_in {
        layers[l].w_mask[j * n_in + i] = false;
    }
    let n_out = layers[l].n_out;
    let next = &mut layers[l + 1];
    for o in 0..next.n_out {
        next.w_mask[o * n_out + j] = false;
    }
}

/// Cuts out every hidden neuron that cannot change an output ([`crate::neurons`]): those
/// without outgoing weights, and those without incoming ones once their constant output is
/// folded into the next layer's biases. Each hidden layer keeps at least one neuron.
pub fn remove_dead_neurons_from(layers: &[LayerTensors]) -> Vec<LayerTensors> {
    let mut host: Vec<HostLayer> = layers
        .iter()
        .map(|l| {
            let shape = l.weight.shape();
            let (n_out, n_in) = (shape[0], shape[1]);
            HostLayer {
                n_in,
                n_out,
                w: l.weight.to_dense_values(),
                b: l.bias.to_dense_values(),
                w_mask: vec![true; n_in * n_out],
                b_mask: vec![true; n_out],
            }
        })
        .collect();
    crate::neurons::remove_dead_neurons(&mut host[..]);
    host.iter().map(HostLayer::tensors).collect()
}

/// The elements of `v` at the positions `at`, in that order.
fn gather<T: Copy>(v: &[T], at: &[usize]) -> Vec<T> {
    at.iter().map(|&i| v[i]).collect()
}

/// The pruner's `[out][in]` layers, masks included, as neuron removal sees them.
impl crate::neurons::NeuronLayers for [HostLayer] {
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
        self[l].w[o * self[l].n_in + i]
    }
    fn bias(&self, l: usize, o: usize) -> f32 {
        self[l].b[o]
    }
    fn add_to_bias(&mut self, l: usize, o: usize, v: f32) {
        self[l].b[o] += v;
    }
    fn keep_outputs(&mut self, l: usize, keep: &[usize]) {
        let layer = &mut self[l];
        let n_in = layer.n_in;
        let rows: Vec<usize> = keep
            .iter()
            .flat_map(|&o| o * n_in..(o + 1) * n_in)
            .collect();
        layer.w = gather(&layer.w, &rows);
        layer.w_mask = gather(&layer.w_mask, &rows);
        layer.b = gather(&layer.b, keep);
        layer.b_mask = gather(&layer.b_mask, keep);
        layer.n_out = keep.len();
    }
    fn keep_inputs(&mut self, l: usize, keep: &[usize]) {
        let layer = &mut self[l];
        let n_in = layer.n_in;
        let columns: Vec<usize> = (0..layer.n_out)
            .flat_map(|o| keep.iter().map(move |&i| o * n_in + i))
            .collect();
        layer.w = gather(&layer.w, &columns);
        layer.w_mask = gather(&layer.w_mask, &columns);
        layer.n_in = keep.len();
    }
}

/// Fine-tuning and Taylor scores on the standardised training split.
struct FineTuner<'a> {
    config: MlpConfig,
    device: Device,
    x: Vec<f32>,
    y: Vec<i64>,
    rows: usize,
    cfg: &'a PruneConfig,
}

impl<'a> FineTuner<'a> {
    fn new(input: &Artifact, splits: &Splits, cfg: &'a PruneConfig, device: &Device) -> Self {
        let train: &Dataset = &splits.train;
        FineTuner {
            config: input.mlp_config().clone(),
            device: device.clone().autodiff(),
            x: input.preprocessing.transform(train),
            y: train.labels.iter().map(|&l| i64::from(l)).collect(),
            rows: train.rows(),
            cfg,
        }
    }

    fn network(&self, layers: &[HostLayer]) -> Result<Mlp, PruneError> {
        let tensors: Vec<LayerTensors> = layers.iter().map(HostLayer::tensors).collect();
        let config = MlpConfig::new(
            self.config.input,
            layers[..layers.len() - 1].iter().map(|l| l.n_out).collect(),
            self.config.classes,
        );
        Mlp::from_layers(&config, &tensors, &self.device)
            .map_err(|e| PruneError::Model(e.to_string()))
    }

    fn batch(&self, order: &[usize]) -> (Tensor<2>, Tensor<1, Int>) {
        let n_features = self.config.input;
        let mut x = Vec::with_capacity(order.len() * n_features);
        let mut y = Vec::with_capacity(order.len());
        for &r in order {
            x.extend_from_slice(&self.x[r * n_features..(r + 1) * n_features]);
            y.push(self.y[r]);
        }
        (
            Tensor::<2>::from_data(TensorData::new(x, [order.len(), n_features]), &self.device),
            Tensor::<1, Int>::from_data(TensorData::new(y, [order.len()]), &self.device),
        )
    }

    /// Per layer, per `[out][in]` weight: `|w|`, or `|∂L/∂w · w|` averaged over the
    /// training batches.
    fn saliency(
        &self,
        layers: &[HostLayer],
        saliency: Saliency,
    ) -> Result<Vec<Vec<f32>>, PruneError> {
        if saliency == Saliency::Magnitude {
            return Ok(layers
                .iter()
                .map(|l| l.w.iter().map(|w| w.abs()).collect())
                .collect());
        }
        let network = self.network(layers)?;
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let mut sums: Vec<Vec<f64>> = layers.iter().map(|l| vec![0.0; l.w.len()]).collect();
        let order: Vec<usize> = (0..self.rows).collect();
        let mut batches = 0usize;
        for chunk in order.chunks(self.cfg.batch_size) {
            let (x, y) = self.batch(chunk);
            let loss = loss_fn.forward(network.forward(x), y);
            let grads = loss.backward();
            for (l, layer) in network.layers.iter().enumerate() {
                let Some(grad) = layer.weight.val().grad(&grads) else {
                    return Err(PruneError::Device(format!(
                        "no gradient for layer {l}'s weight"
                    )));
                };
                // burn holds [in, out]; the host layout is [out][in].
                let g = tensor_values(grad);
                let (n_in, n_out) = (layers[l].n_in, layers[l].n_out);
                for i in 0..n_in {
                    for o in 0..n_out {
                        let k = o * n_in + i;
                        sums[l][k] += f64::from((g[i * n_out + o] * layers[l].w[k]).abs());
                    }
                }
            }
            batches += 1;
        }
        Ok(sums
            .into_iter()
            .map(|s| {
                s.into_iter()
                    .map(|v| (v / batches.max(1) as f64) as f32)
                    .collect()
            })
            .collect())
    }

    /// `finetune_epochs` of Adam from a fresh optimiser, re-applying the masks after every
    /// step so that pruned weights are zero whenever the model is read.
    fn finetune(&self, layers: &mut [HostLayer], round: u64) -> Result<(), PruneError> {
        if self.cfg.finetune_epochs == 0 {
            return Ok(());
        }
        let mut network = self.network(layers)?;
        let masks: Vec<(Tensor<2>, Tensor<1>)> = layers
            .iter()
            .map(|l| {
                // [out][in] → burn's [in, out].
                let mut m = vec![0f32; l.n_in * l.n_out];
                for o in 0..l.n_out {
                    for i in 0..l.n_in {
                        m[i * l.n_out + o] = f32::from(u8::from(l.w_mask[o * l.n_in + i]));
                    }
                }
                let b: Vec<f32> = l.b_mask.iter().map(|k| f32::from(u8::from(*k))).collect();
                (
                    Tensor::<2>::from_data(TensorData::new(m, [l.n_in, l.n_out]), &self.device),
                    Tensor::<1>::from_data(TensorData::new(b, [l.n_out]), &self.device),
                )
            })
            .collect();
        let mut optimizer = AdamConfig::new().with_epsilon(1e-8).init();
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let mut rng = StdRng::seed_from_u64(
            self.cfg.seed ^ FINETUNE_STREAM ^ round.wrapping_mul(0x9e37_79b9),
        );
        let mut order: Vec<usize> = (0..self.rows).collect();
        for _ in 0..self.cfg.finetune_epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(self.cfg.batch_size) {
                let (x, y) = self.batch(chunk);
                let loss = loss_fn.forward(network.forward(x), y);
                let gradients = GradientsParams::from_grads(loss.backward(), &network);
                network = optimizer.step(self.cfg.learning_rate, network, gradients);
                network.layers = network
                    .layers
                    .into_iter()
                    .zip(&masks)
                    .map(|(mut layer, (wm, bm))| {
                        // The masked value is detached and made a fresh leaf under the same
                        // parameter id, so Adam's state carries over and no graph grows.
                        layer.weight = layer
                            .weight
                            .map(|w| w.mul(wm.clone()).detach().require_grad());
                        layer.bias = layer
                            .bias
                            .map(|b| b.map(|t| t.mul(bm.clone()).detach().require_grad()));
                        layer
                    })
                    .collect();
            }
        }
        let trained = network.valid().to_layers();
        for (host, t) in layers.iter_mut().zip(trained) {
            host.w = t.weight.to_dense_values();
            host.b = t.bias.to_dense_values();
            // The product with the mask is exact, but a masked weight must be exactly +0.
            host.apply_mask();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{builtin, split};
    use crate::train::{TrainConfig, train_mlp};

    fn trained() -> (Artifact, Splits) {
        let (train, test) = builtin("digits").unwrap();
        let splits = split(train, Some(test), 0.1, 0.0, 0).unwrap();
        let cfg = TrainConfig {
            epochs: 8,
            ..TrainConfig::default()
        };
        let model = MlpConfig::new(64, vec![32, 16], 10);
        let outcome = train_mlp(&splits, &model, &cfg, &mut |_| {}).unwrap();
        (outcome.artifact, splits)
    }

    fn config(structure: Structure, target: f64) -> PruneConfig {
        PruneConfig {
            saliency: Saliency::Taylor,
            structure,
            scope: Scope::Global,
            target: Target::Fixed(target),
            steps: 2,
            finetune_epochs: 2,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 0,
            max_accuracy_drop: 0.005,
        }
    }

    #[test]
    fn masks_hold_during_fine_tuning_and_the_artifact_is_sparse() {
        let (input, splits) = trained();
        let outcome = prune_mlp(
            &input,
            &splits,
            &config(Structure::Unstructured, 0.8),
            &mut |_| {},
        )
        .unwrap();
        // Pruned weights stayed zero through two rounds of Adam: the share of zeros is the
        // schedule's target, not less.
        assert!(
            (outcome.sparsity - 0.8).abs() < 0.002,
            "sparsity {}",
            outcome.sparsity
        );
        let bytes = outcome.artifact.to_bytes();
        let back = Artifact::from_bytes(&bytes).unwrap();
        assert_eq!(back, outcome.artifact);
        // Each weight is stored sparse exactly when that is the smaller form.
        for layer in &back.layers {
            let density = layer.weight.nonzero_count() as f64 / layer.weight.element_count() as f64;
            let sparse = matches!(layer.weight, ArtifactTensor::SparseF32 { .. });
            assert_eq!(
                sparse,
                density <= SPARSE_STORAGE_MAX_DENSITY,
                "density {density}"
            );
        }
        assert!(matches!(
            back.layers[0].weight,
            ArtifactTensor::SparseF32 { .. }
        ));
        let dense_bytes = input.to_bytes().len();
        assert!(
            bytes.len() < dense_bytes,
            "{} vs {dense_bytes}",
            bytes.len()
        );
        // The engine reproduces the recorded accuracy from the file.
        let engine = Engine::from_artifact(&back).unwrap();
        // Its sparse kernels agree with the dense ones, for batches and single rows.
        assert!(engine.sparse_layers()[0]);
        let dense_kernels =
            Engine::with_kernels(&back, crate::engine::KernelChoice::DenseOnly).unwrap();
        let rows = &splits.test.features;
        let n = splits.test.rows();
        let a = engine.logits_batch(rows, n).unwrap();
        let b = dense_kernels.logits_batch(rows, n).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{x} vs {y}");
        }
        for r in 0..n {
            let a = engine.logits(splits.test.row(r)).unwrap();
            let b = dense_kernels.logits(splits.test.row(r)).unwrap();
            assert!(
                a.iter()
                    .zip(&b)
                    .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs()))
            );
        }
        assert_eq!(
            evaluate(&engine, &splits.test).accuracy,
            outcome.test.accuracy
        );
        assert!(outcome.test.accuracy > 0.8, "{}", outcome.test.accuracy);
    }

    #[test]
    fn fine_tuning_keeps_masked_weights_at_zero() {
        let (input, splits) = trained();
        let cfg = config(Structure::Unstructured, 0.5);
        let device = try_device().unwrap();
        let tuner = FineTuner::new(&input, &splits, &cfg, &device);
        let mut layers: Vec<HostLayer> = input
            .layers
            .iter()
            .map(|l| {
                let s = l.weight.shape();
                HostLayer {
                    n_in: s[1],
                    n_out: s[0],
                    w: l.weight.to_dense_values(),
                    b: l.bias.to_dense_values(),
                    // Every third weight masked, in a pattern unrelated to its value.
                    w_mask: (0..s[0] * s[1]).map(|k| k % 3 != 0).collect(),
                    b_mask: vec![true; s[0]],
                }
            })
            .collect();
        for l in &mut layers {
            l.apply_mask();
        }
        let before: Vec<Vec<f32>> = layers.iter().map(|l| l.w.clone()).collect();
        tuner.finetune(&mut layers, 0).unwrap();
        for (l, b) in layers.iter().zip(&before) {
            for k in 0..l.w.len() {
                if k % 3 == 0 {
                    assert_eq!(l.w[k].to_bits(), 0, "masked weight {k} is {}", l.w[k]);
                }
            }
            // The unmasked weights did move: fine-tuning ran.
            assert!(
                l.w.iter()
                    .zip(b)
                    .enumerate()
                    .any(|(k, (a, b))| k % 3 != 0 && a != b)
            );
        }
    }

    #[test]
    fn removing_dead_neurons_keeps_the_outputs_identical() {
        let (mut input, splits) = trained();
        // Kill hidden neurons 3, 7 and 11 of layer 0 by zeroing their outgoing weights.
        let n_hidden = 32;
        if let ArtifactTensor::DenseF32 { values, .. } = &mut input.layers[1].weight {
            for o in 0..16 {
                for j in [3usize, 7, 11] {
                    values[o * n_hidden + j] = 0.0;
                }
            }
        }
        // Neuron 5 loses its inputs with a positive bias (a constant, folded into the next
        // layer's biases), neuron 9 with a negative one (always 0: dead).
        let layer0 = &mut input.layers[0];
        if let (
            ArtifactTensor::DenseF32 { values, .. },
            ArtifactTensor::DenseF32 { values: b, .. },
        ) = (&mut layer0.weight, &mut layer0.bias)
        {
            for j in [5usize, 9] {
                values[j * 64..(j + 1) * 64].fill(0.0);
            }
            b[5] = 0.5;
            b[9] = -0.3;
        }
        let layers = remove_dead_neurons_from(&input.layers);
        assert_eq!(layers[0].weight.shape(), &[27, 64]);
        assert_eq!(layers[1].weight.shape(), &[16, 27]);
        let mut cut = input.clone();
        cut.architecture = Architecture::Mlp(MlpConfig::new(64, vec![27, 16], 10));
        cut.layers = layers;
        let a = Engine::from_artifact(&input).unwrap();
        let b = Engine::from_artifact(&cut).unwrap();
        let rows = &splits.test.features;
        let la = a.logits_batch(rows, splits.test.rows()).unwrap();
        let lb = b.logits_batch(rows, splits.test.rows()).unwrap();
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn structured_pruning_shrinks_the_dense_model() {
        let (input, splits) = trained();
        let outcome = prune_mlp(
            &input,
            &splits,
            &config(Structure::Structured, 0.5),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            outcome.hidden_after.iter().sum::<usize>(),
            24,
            "{:?}",
            outcome.hidden_after
        );
        assert_eq!(outcome.artifact.mlp_config().hidden, outcome.hidden_after);
        assert!(outcome.artifact.param_count() < input.param_count() / 2 + 200);
    }

    #[test]
    fn an_out_of_range_target_is_refused_naming_the_field() {
        let (input, splits) = trained();
        let err = prune_mlp(
            &input,
            &splits,
            &config(Structure::Unstructured, 1.0),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("target_sparsity"), "{err}");
    }
}
